"""Idempotency for requests that move money: the ``Idempotency-Key`` header, a reservation
committed on its own before the work, an owner with a lease, stored responses replayed, and a
recovery hook for a record whose outside call may have happened.

It follows the IETF ``Idempotency-Key`` header draft and the payment APIs that do this well
(Stripe, Adyen). A route that moves money declares the dependency::

    charge_key = idempotent("payments.charge", lambda request: request.app.state.db,
                            recovery=query_provider)

    @app.post("/v1/charges")
    async def charge(body: ChargeIn, key: IdempotencyKey = charge_key) -> Response:
        ...                                      # validate; nothing outside called yet
        await key.mark_started(recovery_point=f"provider charge ref {ref}")
        result = await provider.charge(ref, ...)  # the outside call
        return await key.complete(201, {"charge": result.id})

and the app calls :func:`install_idempotency` once (it renders replays and adds
``Retry-After``). A record goes through these states:

``reserved``
    The first request with a key inserts the record (``INSERT ... ON CONFLICT DO NOTHING``,
    in its own short transaction, committed before the work starts): the owner (process and
    request) and ``lease_until``. Nothing outside has been called.
``started``
    :meth:`IdempotencyKey.mark_started` commits, on its own, that an outside call may now
    happen (with an optional ``recovery_point``). From here on the key is never freed, and
    the record has no expiry until it has an outcome.
``completed``
    :meth:`IdempotencyKey.complete` stores status, body and headers; every retry with the
    same request gets them back (``Idempotency-Replayed: true``). A failure after
    ``started`` is stored too (its error envelope; an unexpected error as ``500
    internal.error``) and replayed.
*freed* (``failed_before_start``)
    The work failed before ``started``: the record is deleted, so a retry runs again.

A retry meets a record of another owner: other request parameters -> ``422
idempotency.key_reused``; ``completed`` -> the stored response; ``reserved`` or ``started``
with a live lease -> ``409 idempotency.in_progress`` at once (with ``Retry-After``);
``reserved`` with an expired lease -> the owner died before any outside call: the retry takes
the record over (compare-and-set on the owner: of two retriers one wins) and runs the work;
``started`` with an expired lease -> the work never runs again: the recovery hook (the
payments context queries its provider) returns the outcome the record is completed with, or
None (``409 idempotency.recovering``, retry later); without a hook, ``409
idempotency.outcome_unknown`` until an operator resolves the record.

Handlers call :meth:`~IdempotencyKey.mark_started` and :meth:`~IdempotencyKey.complete`
outside any open transaction of theirs (each commits on its own; on SQLite a transaction held
meanwhile would wait for itself), or pass ``uow=`` to ``complete`` to commit the outcome
atomically with their own writes. The lease must outlast the outside call;
:meth:`~IdempotencyKey.renew` extends it. :func:`purge_expired` (and the consumer host's
hourly retention) deletes records past ``expires_at``, which is at least 24 h after the
outcome, and never a ``started`` record.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http import HTTPStatus
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.encoders import jsonable_encoder
from sqlalchemy.dialects import postgresql, sqlite
from starlette.exceptions import HTTPException

from forecourt.infra.crash import crash_point
from forecourt.infra.db import Database, UnitOfWork, idempotency_table
from forecourt.infra.http import error_envelope, error_response
from forecourt.infra.logging import get_logger
from forecourt.kernel.errors import ForecourtError

log = get_logger("forecourt.idempotency")

KEY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotency-Replayed"
MAX_KEY_LENGTH = 255
MIN_TTL = timedelta(hours=24)
DEFAULT_TTL = timedelta(hours=24)
DEFAULT_LEASE = timedelta(seconds=30)

RESERVED = "reserved"
STARTED = "started"
COMPLETED = "completed"
_FREED = "freed"  # failed before start: the row is deleted
_LOST = "lost"  # the record is no longer this owner's

_t = idempotency_table


# --- errors -----------------------------------------------------------------------------------


class IdempotencyError(ForecourtError):
    """An idempotency refusal; ``retry_after`` (seconds) becomes a ``Retry-After`` header."""

    code = "idempotency.error"
    http_status = 409

    def __init__(self, message: str, *, retry_after: float | None = None, **details: Any) -> None:
        self.retry_after = None if retry_after is None else max(1, math.ceil(retry_after))
        if self.retry_after is not None:
            details["retry_after"] = self.retry_after
        super().__init__(message, **details)

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


class KeyMissing(IdempotencyError):
    code = "idempotency.key_missing"
    http_status = 400


class KeyInvalid(IdempotencyError):
    code = "idempotency.key_invalid"
    http_status = 400


class KeyReused(IdempotencyError):
    code = "idempotency.key_reused"
    http_status = 422


class InProgress(IdempotencyError):
    code = "idempotency.in_progress"
    http_status = 409


class Recovering(IdempotencyError):
    code = "idempotency.recovering"
    http_status = 409


class OutcomeUnknown(IdempotencyError):
    code = "idempotency.outcome_unknown"
    http_status = 409


class LeaseLost(IdempotencyError):
    """The record is no longer this request's (its lease expired and another took it over, or
    it was purged): the handler must not make its outside call."""

    code = "idempotency.lease_lost"
    http_status = 409


# --- records ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredResponse:
    """A response as stored and replayed: status, JSON body, headers."""

    status_code: int
    body: Any
    headers: Mapping[str, str] = field(default_factory=dict)

    def encoded(self) -> str:
        return _encode(self.body)


@dataclass(frozen=True)
class IdempotencyRecord:
    """One record as read (what a recovery hook is handed)."""

    scope: str
    key: str
    request_hash: str
    owner: str
    state: str
    lease_until: datetime | None
    recovery_point: str | None
    created_at: datetime
    expires_at: datetime | None
    response: StoredResponse | None


RecoveryHook = Callable[[IdempotencyRecord], Awaitable[StoredResponse | None]]
"""Asked for the outcome of a ``started`` record whose owner died: the stored response to
complete the record with (what the provider says happened), or None (not known yet)."""


class Replay(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by the dependency to answer with a stored response (see install_idempotency)."""

    def __init__(self, stored: StoredResponse) -> None:
        super().__init__(f"replay {stored.status_code}")
        self.stored = stored


def replay_response(stored: StoredResponse) -> Response:
    headers = {**stored.headers, REPLAYED_HEADER: "true"}
    return Response(
        content=stored.encoded(),
        status_code=stored.status_code,
        headers=headers,
        media_type="application/json",
    )


async def _replay_handler(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Replay)
    return replay_response(exc.stored)


def install_idempotency(app: FastAPI) -> None:
    """Render replays and idempotency errors (envelope plus ``Retry-After``). Call it once,
    before the app serves; the dependency refuses to run without it."""

    async def _error(_request: Request, exc: Exception) -> Response:
        # The one error envelope (code, message, details, trace_id), plus Retry-After.
        assert isinstance(exc, IdempotencyError)
        return error_response(exc.http_status, exc.to_dict(), exc.headers())

    app.add_exception_handler(Replay, _replay_handler)
    app.add_exception_handler(IdempotencyError, _error)


# --- helpers ----------------------------------------------------------------------------------


def _handler_for(app: Any, exc_type: type[BaseException]) -> Callable[..., Any] | None:
    """The app's exception handler for ``exc_type``, looked up as Starlette does (by MRO)."""
    handlers = app.exception_handlers
    return next((handlers[c] for c in exc_type.__mro__ if c in handlers), None)


async def _call(handler: Callable[..., Any], request: Request, exc: BaseException) -> Response:
    response = handler(request, exc)
    if inspect.isawaitable(response):
        response = await response
    assert isinstance(response, Response)
    return response


async def rendered_error(request: Request, exc: BaseException) -> StoredResponse:
    """The answer the app's error handlers give ``exc``: what is stored for a failure after
    the work began, so that a replay is that very answer."""
    handler = _handler_for(request.app, type(exc))
    if handler is not None and handler is not _replay_handler:
        response = await _call(handler, request, exc)
        try:
            body = json.loads(bytes(response.body)) if response.body else None
        except ValueError:
            body = None
        else:
            kept = {
                k: v
                for k, v in response.headers.items()
                if k not in ("content-length", "content-type")
            }
            return StoredResponse(response.status_code, body, kept)
    return _error_response(exc)


def error_outcome(status_code: int, code: str, message: str, **details: Any) -> StoredResponse:
    """An error outcome in the one envelope (code, message, details, the trace id of the
    request being answered): what a recovery hook returns when the provider says the work
    failed or never happened."""
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error["details"] = details
    return StoredResponse(status_code, error_envelope(error))


def _encode(body: Any) -> str:
    return json.dumps(
        jsonable_encoder(body), ensure_ascii=False, allow_nan=False, separators=(",", ":")
    )


def _canonical_body(body: bytes) -> bytes:
    if not body:
        return b""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body
    return json.dumps(parsed, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def request_hash(method: str, target: str, body: bytes) -> str:
    """sha256 of method, target (path and query) and the canonical body (JSON with sorted
    keys and no whitespace; other bodies as sent)."""
    digest = hashlib.sha256()
    digest.update(method.upper().encode())
    digest.update(b"\n")
    digest.update(target.encode())
    digest.update(b"\n")
    digest.update(_canonical_body(body))
    return digest.hexdigest()


def parse_key(raw: str | None) -> str:
    """The key of an ``Idempotency-Key`` header: 1-255 printable ASCII characters, sent bare
    (as Stripe does) or as a structured-field string (``"..."``, as the IETF draft does)."""
    if raw is None:
        raise KeyMissing(f"this request moves money: send an {KEY_HEADER} header")
    value = raw
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner, value, escaped = value[1:-1], "", False
        for ch in inner:
            if escaped or ch != "\\":
                value += ch
                escaped = False
            else:
                escaped = True
    if not 1 <= len(value) <= MAX_KEY_LENGTH or not all(" " <= ch <= "~" for ch in value):
        raise KeyInvalid(f"{KEY_HEADER} must be 1 to {MAX_KEY_LENGTH} printable ASCII characters")
    return value


def new_owner() -> str:
    return f"{socket.gethostname()[:120]}/{os.getpid()}/{uuid.uuid4().hex[:16]}"


def _target(request: Request) -> str:
    query = request.url.query
    return f"{request.url.path}?{query}" if query else request.url.path


def _insert(db: Database) -> Any:
    return (sqlite.insert if db.is_sqlite else postgresql.insert)(_t)


def _record(row: Any) -> IdempotencyRecord:
    stored = None
    if row.state == COMPLETED and row.status_code is not None:
        stored = StoredResponse(
            status_code=row.status_code,
            body=json.loads(row.response) if row.response is not None else None,
            headers=json.loads(row.response_headers) if row.response_headers else {},
        )
    return IdempotencyRecord(
        scope=row.scope,
        key=row.key,
        request_hash=row.request_hash,
        owner=row.owner,
        state=row.state,
        lease_until=row.lease_until,
        recovery_point=row.recovery_point,
        created_at=row.created_at,
        expires_at=row.expires_at,
        response=stored,
    )


def _error_response(exc: BaseException) -> StoredResponse:
    """The answer the error handlers give for ``exc`` (stored when it happened after start)."""
    if isinstance(exc, ForecourtError):
        return StoredResponse(exc.http_status, error_envelope(exc.to_dict()))
    if isinstance(exc, HTTPException):
        try:
            status = HTTPStatus(exc.status_code)
            code, phrase = f"request.{status.name.lower()}", status.phrase
        except ValueError:
            code, phrase = f"request.http_{exc.status_code}", f"HTTP {exc.status_code}"
        message = str(exc.detail) if exc.detail and exc.detail != phrase else phrase
        return StoredResponse(exc.status_code, error_envelope({"code": code, "message": message}))
    return StoredResponse(
        500, error_envelope({"code": "internal.error", "message": "internal server error"})
    )


# --- the key of one request -------------------------------------------------------------------


class IdempotencyKey:
    """The idempotency record a request holds: what the route handler uses."""

    def __init__(
        self,
        db: Database,
        scope: str,
        key: str,
        request_hash: str,
        *,
        ttl: timedelta = DEFAULT_TTL,
        lease: timedelta = DEFAULT_LEASE,
        owner: str | None = None,
    ) -> None:
        self.db = db
        self.scope = scope
        self.key = key
        self.request_hash = request_hash
        self.ttl = ttl
        self.lease = lease
        self.owner = owner or new_owner()
        self.state = ""
        self.taken_over = False  # the previous owner died before starting: run again
        self._completed_in_uow = False

    def _mine(self, *states: str) -> Any:
        return sa.and_(
            _t.c.scope == self.scope,
            _t.c.key == self.key,
            _t.c.owner == self.owner,
            _t.c.state.in_(states),
        )

    def _now(self) -> datetime:
        return self.db.clock.now()

    # -- reservation (the dependency) --

    async def acquire(self, recovery: RecoveryHook | None = None) -> None:
        """Reserve the key in a transaction of its own, or raise what a retry gets:
        :class:`Replay`, :class:`KeyReused`, :class:`InProgress`, :class:`Recovering`,
        :class:`OutcomeUnknown`."""
        for _attempt in range(3):  # "gone": freed between our statements; look again
            decision, record = await self._try_reserve(has_recovery=recovery is not None)
            if decision == RESERVED:
                self.state = RESERVED
                crash_point("idempotency.after_reserve")
                return
            if decision == "recover":
                assert record is not None
                assert recovery is not None
                await self._recover(record, recovery)  # raises
        raise InProgress(f"request {self.key!r} is being processed", retry_after=1)

    async def _try_reserve(self, *, has_recovery: bool) -> tuple[str, IdempotencyRecord | None]:
        now = self._now()
        pk = sa.and_(_t.c.scope == self.scope, _t.c.key == self.key)
        async with self.db.begin() as uow:
            conn = uow.conn
            # Past its expiry a record is gone (a started one has none: never).
            await conn.execute(_t.delete().where(pk, _t.c.expires_at <= now))
            inserted = await conn.execute(
                _insert(self.db)
                .values(
                    scope=self.scope,
                    key=self.key,
                    request_hash=self.request_hash,
                    owner=self.owner,
                    state=RESERVED,
                    lease_until=now + self.lease,
                    created_at=now,
                    expires_at=now + self.ttl,
                )
                .on_conflict_do_nothing(index_elements=[_t.c.scope, _t.c.key])
            )
            if inserted.rowcount == 1:
                return RESERVED, None
            row = (await conn.execute(sa.select(_t).where(pk))).first()
            if row is None:
                return "gone", None
            record = _record(row)
            if record.request_hash != self.request_hash:
                raise KeyReused(
                    f"{KEY_HEADER} {self.key!r} was used for a request with other parameters"
                )
            if record.state == COMPLETED and record.response is not None:
                raise Replay(record.response)
            lease_live = record.lease_until is not None and record.lease_until > now
            if lease_live:
                assert record.lease_until is not None
                raise InProgress(
                    f"request {self.key!r} is being processed",
                    retry_after=(record.lease_until - now).total_seconds(),
                )
            if record.state == STARTED and not has_recovery:
                log.error(
                    "idempotency.outcome_unknown",
                    scope=self.scope,
                    key=self.key,
                    owner=record.owner,
                    recovery_point=record.recovery_point,
                )
                raise OutcomeUnknown(
                    f"request {self.key!r} may have reached the outside world before its "
                    "process died, and nothing here can tell what happened: an operator must "
                    "resolve it (until then, every retry gets this answer)",
                    recovery_point=record.recovery_point,
                )
            # The lease expired: its owner is gone (or too slow: it loses the record).
            claimed = await conn.execute(
                _t.update()
                .where(
                    pk,
                    _t.c.owner == record.owner,
                    _t.c.state == record.state,
                    sa.or_(_t.c.lease_until.is_(None), _t.c.lease_until <= now),
                )
                .values(owner=self.owner, lease_until=now + self.lease)
            )
            if claimed.rowcount != 1:
                raise InProgress(f"request {self.key!r} is being processed", retry_after=1)
        if record.state == RESERVED:
            # Nothing outside was called: safe to run again.
            self.taken_over = True
            log.warning("idempotency.taken_over", scope=self.scope, key=self.key, was=record.owner)
            return RESERVED, None
        return "recover", record

    async def _recover(self, record: IdempotencyRecord, recovery: RecoveryHook) -> None:
        """``record`` was started by an owner that died: never run again; ask the hook."""
        try:
            outcome = await recovery(record)
        except Exception as exc:  # noqa: BLE001 - a failed query is "not known yet"
            log.warning(
                "idempotency.recovery_failed", scope=self.scope, key=self.key, error=repr(exc)
            )
            outcome = None
        if outcome is None:
            await self._release_lease()
            raise Recovering(
                f"the outcome of request {self.key!r} is being recovered; retry later",
                retry_after=self.lease.total_seconds(),
            )
        self.state = STARTED
        if not await self._store(outcome, STARTED):
            raise InProgress(f"request {self.key!r} is being processed", retry_after=1)
        log.info(
            "idempotency.recovered", scope=self.scope, key=self.key, status=outcome.status_code
        )
        raise Replay(outcome)

    async def _release_lease(self) -> None:
        """Hand a started record back with an expired lease: the next retry recovers again."""
        async with self.db.begin() as uow:
            await uow.conn.execute(
                _t.update().where(self._mine(STARTED)).values(lease_until=self._now())
            )
        self.state = _LOST

    # -- the handler's calls --

    async def mark_started(self, recovery_point: str | None = None) -> None:
        """Commit that the outside call may now happen (and ``recovery_point``, what a
        recovery needs to find it, e.g. the provider reference). From here on the key is never
        freed. Raises :class:`LeaseLost` if the record is no longer ours: then the outside
        call must not be made."""
        if self.state != RESERVED:
            raise RuntimeError(f"mark_started on a key in state {self.state!r}")
        now = self._now()
        async with self.db.begin() as uow:
            done = await uow.conn.execute(
                _t.update()
                .where(self._mine(RESERVED))
                .values(
                    state=STARTED,
                    recovery_point=recovery_point,
                    lease_until=now + self.lease,
                    expires_at=None,
                )
            )
        if done.rowcount != 1:
            self.state = _LOST
            raise LeaseLost(
                f"the reservation of {self.key!r} was taken over after its lease expired; retry"
            )
        self.state = STARTED
        crash_point("idempotency.after_start")

    async def renew(self) -> None:
        """Extend the lease by ``lease`` from now (for an outside call that takes long)."""
        now = self._now()
        async with self.db.begin() as uow:
            done = await uow.conn.execute(
                _t.update()
                .where(self._mine(RESERVED, STARTED))
                .values(lease_until=now + self.lease)
            )
        if done.rowcount != 1:
            self.state = _LOST
            raise LeaseLost(f"the record of {self.key!r} is no longer this request's")

    async def complete(
        self,
        status_code: int,
        body: Any,
        headers: Mapping[str, str] | None = None,
        *,
        uow: UnitOfWork | None = None,
    ) -> Response:
        """Store the outcome and return the response to send. In a transaction of its own,
        or in ``uow`` (committed with the handler's writes). Raises :class:`LeaseLost` if the
        record is no longer ours."""
        if self.state == STARTED:
            crash_point("idempotency.after_outside_call")
        if self.state not in (RESERVED, STARTED):
            raise RuntimeError(f"complete on a key in state {self.state!r}")
        stored = StoredResponse(status_code, body, dict(headers or {}))
        if not await self._store(stored, self.state, uow=uow):
            self.state = _LOST
            raise LeaseLost(f"the record of {self.key!r} was taken over; the outcome is not ours")
        if uow is None:
            crash_point("idempotency.after_complete")
        else:
            self._completed_in_uow = True
        return Response(
            content=stored.encoded(),
            status_code=status_code,
            headers=dict(stored.headers),
            media_type="application/json",
        )

    async def _store(
        self, stored: StoredResponse, state: str, *, uow: UnitOfWork | None = None
    ) -> bool:
        now = self._now()
        statement = (
            _t.update()
            .where(self._mine(state))
            .values(
                state=COMPLETED,
                status_code=stored.status_code,
                response=stored.encoded(),
                response_headers=json.dumps(dict(stored.headers), sort_keys=True),
                lease_until=None,
                expires_at=now + self.ttl,
            )
        )
        if uow is not None:
            done = await uow.conn.execute(statement)
        else:
            async with self.db.begin() as own:
                done = await own.conn.execute(statement)
        if done.rowcount == 1:
            # With ``uow`` it is completed once that commits: told at the end (refresh).
            self.state = COMPLETED
            return True
        return False

    async def refresh(self) -> None:
        """After ``complete(uow=...)``: the state the record has now (the handler's
        transaction may have rolled back)."""
        if not self._completed_in_uow:
            return
        self._completed_in_uow = False
        async with self.db.connection() as conn:
            state = (
                await conn.execute(
                    sa.select(_t.c.state).where(
                        _t.c.scope == self.scope, _t.c.key == self.key, _t.c.owner == self.owner
                    )
                )
            ).scalar_one_or_none()
        self.state = state or _LOST
        if self.state == COMPLETED:
            crash_point("idempotency.after_complete")

    # -- the end of the request (the dependency) --

    async def free(self) -> None:
        """Delete a reservation that never started: a retry runs the work again."""
        async with self.db.begin() as uow:
            await uow.conn.execute(_t.delete().where(self._mine(RESERVED)))
        self.state = _FREED

    async def finish_after_error(
        self, exc: BaseException, answer: StoredResponse | None = None
    ) -> None:
        """The handler raised ``exc``: before start the key is freed; after, ``answer`` (the
        error answer the client gets) is stored as the outcome."""
        await self.refresh()
        if self.state == RESERVED:
            await self.free()
            log.info("idempotency.freed", scope=self.scope, key=self.key, error=repr(exc))
        elif self.state == STARTED:
            stored = answer or _error_response(exc)
            if await self._store(stored, STARTED):
                log.warning(
                    "idempotency.failed_after_start",
                    scope=self.scope,
                    key=self.key,
                    status=stored.status_code,
                    error=repr(exc),
                )

    async def finish_after_return(self) -> None:
        await self.refresh()
        if self.state == RESERVED:
            await self.free()
            log.warning("idempotency.not_completed", scope=self.scope, key=self.key)
        elif self.state == STARTED:
            # Returned without an outcome after an outside call may have happened: never
            # freed; once the lease expires, a retry goes to recovery.
            log.error("idempotency.started_not_completed", scope=self.scope, key=self.key)


# --- the dependency ---------------------------------------------------------------------------


def idempotent(
    scope: str | Callable[[Request], str],
    db_getter: Callable[[Request], Database],
    *,
    ttl: timedelta = DEFAULT_TTL,
    lease: timedelta = DEFAULT_LEASE,
    recovery: RecoveryHook | None = None,
) -> Any:
    """A FastAPI dependency (``key: IdempotencyKey = idempotent(...)``) for a POST that
    moves money. ``scope`` names the operation (or derives it from the request, e.g. per
    station); ``ttl`` (at least 24 h) is how long an outcome is kept; ``lease`` how long the
    owner holds the record before a retry may take it over or recover it."""
    if ttl < MIN_TTL:
        raise ValueError(f"idempotency records are kept at least {MIN_TTL}, not {ttl}")
    if lease <= timedelta(0):
        raise ValueError("the lease must be positive")

    async def dependency(
        request: Request,
        idempotency_key: Annotated[
            str | None,
            Header(
                alias=KEY_HEADER,
                description="1-255 printable ASCII characters, unique per operation "
                "(e.g. a UUID); a retry sends the same key and the same request",
            ),
        ] = None,
    ) -> AsyncIterator[IdempotencyKey]:
        if Replay not in request.app.exception_handlers:
            raise RuntimeError("install_idempotency(app) was not called on this app")
        key_text = parse_key(idempotency_key)
        body = await request.body()
        key = IdempotencyKey(
            db_getter(request),
            scope(request) if callable(scope) else scope,
            key_text,
            request_hash(request.method, _target(request), body),
            ttl=ttl,
            lease=lease,
        )
        await key.acquire(recovery)
        try:
            yield key
        except Exception as exc:
            await key.refresh()
            answer = await rendered_error(request, exc) if key.state == STARTED else None
            await key.finish_after_error(exc, answer)
            raise
        except BaseException:
            # Cancelled (the client went away, the server stops): before start the key is
            # freed; after, its outcome is unknown and left to recovery.
            if key.state == RESERVED:
                await key.free()
            raise
        else:
            await key.finish_after_return()

    # scope="function": the end of the dependency runs before the response is sent, so what
    # a failure stores is stored before the client can retry.
    return Depends(dependency, scope="function")


# --- retention --------------------------------------------------------------------------------


async def purge_expired(target: Database | UnitOfWork) -> int:
    """Delete records past ``expires_at`` (outcomes kept ``ttl``; reservations that never
    started). A ``started`` record without an outcome has no expiry and is never deleted."""
    statement = _t.delete().where(_t.c.expires_at <= _now_of(target), _t.c.state != STARTED)
    if isinstance(target, UnitOfWork):
        result = await target.conn.execute(statement)
    else:
        async with target.begin() as uow:
            result = await uow.conn.execute(statement)
    return int(result.rowcount or 0)


def _now_of(target: Database | UnitOfWork) -> datetime:
    db = target.db if isinstance(target, UnitOfWork) else target
    return db.clock.now()
