"""Cashiers at the edge: a staff access token (HQ's JWT, ``EdDSA`` with a ``kid``) checked
offline against HQ's public keys, and the edge's one authenticator for terminals and staff.

HQ's key set (``GET /v1/auth/keys``, a JWK Set) is fetched when HQ answers — at start, every
``staff_keys_refresh_s`` and when a token names a key not known yet — and kept in the
journal's database, so an edge restarted without HQ still checks tokens; a JWK Set file
(``staff_keys_file``) is trusted as well. The claims are HQ's (issuer, audience, ``exp``,
``iat``, ``sub``, ``jti``, ``kind`` and ``grants`` as ``[role, scope]`` pairs); a grant of one
of ``pos_charge_roles`` allows ``payments:charge`` over its scope.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import jwt
import sqlalchemy as sa
from fastapi import Request

from forecourt.edge.commands import TerminalAuthenticator, _holder
from forecourt.edge.journal import Journal
from forecourt.infra.background import BackgroundService
from forecourt.infra.db import UTCDateTime
from forecourt.infra.logging import get_logger
from forecourt.kernel.access import Grant, Permission, Policy, Principal, PrincipalKind, Scope
from forecourt.kernel.clock import Clock
from forecourt.kernel.errors import ForecourtError, Unauthorized
from forecourt.kernel.tokens import ALGORITHM, looks_like_jwt, token_claims, token_kid

log = get_logger("forecourt.edge.cashiers")

#: the permission a counter payment needs (HQ's name for it)
PAYMENTS_CHARGE = "payments:charge"
_STAFF = frozenset({PrincipalKind.USER, PrincipalKind.SERVICE})

#: the POS routes: a staff member holding ``payments:charge`` over this station
CHARGE = Policy(PAYMENTS_CHARGE, station="self", kinds=_STAFF)

md = sa.MetaData()
staff_key_t = sa.Table(
    "staff_key",
    md,
    sa.Column("kid", sa.String(64), primary_key=True),
    sa.Column("jwk", sa.Text, nullable=False),
    sa.Column("fetched_at", UTCDateTime(), nullable=False),
)


class InvalidStaffToken(Unauthorized):
    code = "auth.invalid_token"


class StaffTokenExpired(Unauthorized):
    code = "auth.token_expired"


def _public_keys(jwks: Any, origin: str) -> dict[str, tuple[str, Any]]:
    """kid → (the JWK as JSON text, its public key) of the Ed25519 keys of a JWK Set."""
    found: dict[str, tuple[str, Any]] = {}
    keys = jwks.get("keys") if isinstance(jwks, dict) else None
    for jwk in keys if isinstance(keys, list) else []:
        if not isinstance(jwk, dict) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            continue
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > 64:
            continue
        try:
            key = jwt.PyJWK(jwk, algorithm=ALGORITHM).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as exc:
            log.warning("edge.staff_key_unreadable", kid=kid, origin=origin, error=str(exc))
            continue
        found[kid] = (json.dumps(jwk, sort_keys=True), key)
    return found


class StaffKeys(BackgroundService):
    """HQ's public keys for staff tokens: the cached set, the file's, and HQ's when it
    answers (HQ's set replaces the cached one: a key HQ retired stops verifying)."""

    task_name = "edge-staff-keys"

    def __init__(
        self,
        journal: Journal,
        clock: Clock,
        fetch: Callable[[], Awaitable[Any]],
        *,
        keys_file: Path | None = None,
        refresh_s: float = 300.0,
        miss_interval_s: float = 5.0,
        miss_retry_s: float = 0.1,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.journal = journal
        self.clock = clock
        self.fetch = fetch
        self.keys_file = keys_file
        self.refresh_s = refresh_s
        self.miss_interval_s = miss_interval_s
        self.miss_retry_s = miss_retry_s
        self.monotonic = monotonic
        self._cached: dict[str, Any] = {}
        self._file: dict[str, Any] = {}
        self._last_miss = float("-inf")
        self._held_keys = False  # the last refresh got HQ's keys
        self._miss_retries = 0  # refreshes on a miss since the last one that got keys
        self._lock = asyncio.Lock()
        self.source = "none"  # "hq", "cache" (the journal's database) or "none"
        self.last_error: str | None = None
        self.fetched = 0

    @property
    def kids(self) -> list[str]:
        return sorted({*self._cached, *self._file})

    async def load(self) -> None:
        """The keys kept in the journal's database and those of the keys file."""
        rows = await self.journal._run(self._read_cached)
        self._cached = {kid: key for kid, (_, key) in _public_keys({"keys": rows}, "cache").items()}
        if self._cached:
            self.source = "cache"
        if self.keys_file is not None:
            try:
                text = await asyncio.to_thread(self.keys_file.read_text)
                self._file = {k: v for k, (_, v) in _public_keys(json.loads(text), "file").items()}
            except (OSError, ValueError) as exc:
                log.error(
                    "edge.staff_keys_file_unreadable", path=str(self.keys_file), error=str(exc)
                )

    def _read_cached(self) -> list[Any]:
        with self.journal.engine.connect() as conn:
            return [json.loads(r.jwk) for r in conn.execute(sa.select(staff_key_t.c.jwk))]

    async def refresh(self) -> bool:
        """Fetch HQ's key set and keep it; False (the cached set stays) when HQ does not
        answer with one."""
        async with self._lock:
            try:
                jwks = await self.fetch()
            except Exception as exc:  # noqa: BLE001 - any failure keeps the cached keys
                self._held_keys = False
                self.last_error = f"{type(exc).__name__}: {exc}"
                return False
            keys = _public_keys(jwks, "hq")
            if not keys:
                self._held_keys = False
                self.last_error = "HQ's key set holds no Ed25519 key"
                return False
            await self.journal._run(self._store, {kid: text for kid, (text, _) in keys.items()})
            if set(keys) != set(self._cached):
                log.info("edge.staff_keys_loaded", kids=sorted(keys))
            self._cached = {kid: key for kid, (_, key) in keys.items()}
            self.source = "hq"
            self.last_error = None
            self.fetched += 1
            self._held_keys = True
            self._miss_retries = 0
            return True

    def _store(self, keys: dict[str, str]) -> None:
        now = self.clock.now()
        with self.journal.engine.begin() as conn:
            conn.execute(staff_key_t.delete())
            conn.execute(
                staff_key_t.insert(),
                [{"kid": kid, "jwk": text, "fetched_at": now} for kid, text in keys.items()],
            )

    async def key(self, kid: str) -> Any | None:
        """The public key ``kid`` names; an unknown one is asked of HQ (see
        :meth:`_miss_may_refresh`: a forged kid must not turn into a flood of fetches)."""
        found = self._cached.get(kid) or self._file.get(kid)
        if found is not None:
            return found
        now = self.monotonic()
        if self._miss_may_refresh(now):
            self._last_miss = now
            if not self._held_keys:
                self._miss_retries += 1
            await self.refresh()
        return self._cached.get(kid) or self._file.get(kid)

    def _miss_may_refresh(self, now: float) -> bool:
        """Whether a kid not known may fetch HQ's key set now. After a refresh that got
        HQ's keys, at most once every ``miss_interval_s`` (a key HQ made since is seldom
        needed at once: HQ signs with a new key only after rotating). After a refresh that
        failed or got no keys (HQ was away, or has not made its first key yet: it does when
        it first signs), the first miss fetches at once, and the next ones after
        ``miss_retry_s``, doubled with each further miss up to ``miss_interval_s``."""
        if self._held_keys or self._miss_retries == 0:
            gap = self.miss_interval_s if self._held_keys else 0.0
        else:
            gap = min(self.miss_interval_s, self.miss_retry_s * 2 ** (self._miss_retries - 1))
        return now - self._last_miss >= gap

    async def run(self) -> None:
        while True:
            if not await self.refresh():
                log.warning("edge.staff_keys_refresh_failed", error=self.last_error)
                await asyncio.sleep(min(self.refresh_s, 5.0))
                continue
            await asyncio.sleep(self.refresh_s)


def _expired(_: str) -> StaffTokenExpired:
    return StaffTokenExpired("the access token has expired: sign in again")


class StaffTokens:
    """Checks a staff access token as HQ does (a known key, ``EdDSA`` only, issuer,
    audience, lifetime on the edge's clock) and gives the principal it stands for."""

    def __init__(
        self,
        keys: StaffKeys,
        clock: Clock,
        *,
        issuer: str,
        audience: str,
        charge_roles: Iterable[str],
    ) -> None:
        self.keys = keys
        self.clock = clock
        self.issuer = issuer
        self.audience = audience
        self.charge_roles = frozenset(charge_roles)

    async def claims(self, token: str) -> dict[str, Any]:
        kid = token_kid(token, invalid=InvalidStaffToken)
        key = await self.keys.key(kid)
        if key is None:
            raise InvalidStaffToken("invalid access token: unknown key")
        return token_claims(
            token,
            key,
            issuer=self.issuer,
            audience=self.audience,
            now=self.clock.now().timestamp(),  # the lifetime on the edge's clock
            invalid=InvalidStaffToken,
            expired=_expired,
        )

    async def principal(self, token: str) -> Principal:
        claims = await self.claims(token)
        try:
            return self._principal(claims)
        except (KeyError, TypeError, ValueError):
            raise InvalidStaffToken("invalid access token: malformed claims") from None

    def _principal(self, claims: dict[str, Any]) -> Principal:
        kind = PrincipalKind(claims["kind"])
        if kind not in _STAFF:
            raise ValueError(kind)
        subject, session = claims["sub"], claims["jti"]
        if not isinstance(subject, str) or not isinstance(session, str):
            raise TypeError("sub")
        grants = []
        for role, scope in claims.get("grants", []):
            permissions = {Permission.SIGNED_IN.value}
            if role in self.charge_roles:
                permissions.add(PAYMENTS_CHARGE)
            grants.append(Grant(str(role), Scope.parse(str(scope)), frozenset(permissions)))
        return Principal(kind, subject, tuple(grants), session=session)


class EdgeAuthenticator:
    """The edge's authenticator: a staff access token (a JWT) through :class:`StaffTokens`,
    anything else as a terminal's or a reader's secret (:class:`TerminalAuthenticator`)."""

    def __init__(self, terminals: TerminalAuthenticator, staff: StaffTokens) -> None:
        self.terminals = terminals
        self.staff = staff

    def refuse_missing(self, source: str | None) -> Unauthorized:
        return self.terminals.refuse_missing(source)

    async def principal(self, token: str, source: str | None) -> Principal:
        known = self.terminals.terminals, self.terminals.readers
        if looks_like_jwt(token) and all(_holder(token, tokens) is None for tokens in known):
            try:
                return await self.staff.principal(token)
            except Unauthorized as refused:
                log.warning(
                    "edge.staff_token_refused",
                    source=source,
                    code=refused.code,
                    reason=str(refused),
                )
                raise
        return await self.terminals.principal(token, source)


def refusal_recorder(
    journal: Journal, prefix: str = "/v1/pos"
) -> Callable[[Request, ForecourtError, Principal | None, Policy], Awaitable[None]]:
    """The access layer's refusal hook for the POS routes: each refusal (401, 403, 429) is
    logged and audited in the journal (uploaded to HQ's trail like a pump command's)."""

    async def record(
        request: Request, refused: ForecourtError, principal: Principal | None, policy: Policy
    ) -> None:
        path = request.url.path
        if not path.startswith(prefix):
            return
        source = request.client.host if request.client else None
        actor = principal.actor if principal is not None else "anonymous"
        log.warning(
            "edge.pos_refused",
            actor=actor,
            path=path,
            code=refused.code,
            reason=refused.message,
            source=source,
        )
        await journal.record_audit(
            actor=actor,
            action="pos.refused",
            target=path[:200],
            details={
                "refused": refused.code,
                "message": refused.message,
                "permission": policy.permission,
                "source": source,
                **refused.details,
            },
        )

    return record
