"""HTTP routes of ``audit``: read the chained records and verify the chain (``audit:read``);
a station uploads its edge's audit records (``audit:upload``, its own credential)."""

from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from forecourt.audit.domain import AuditRecord, Verdict
from forecourt.audit.handlers import (
    RefusedRecord,
    StationRecord,
    accept_station_records,
    list_records,
    verify,
)
from forecourt.audit.store import RecordQuery
from forecourt.infra.access import require
from forecourt.infra.db import Database
from forecourt.infra.http import error_responses
from forecourt.kernel.access import Permission, Policy, PrincipalKind

READ = Policy(Permission.AUDIT_READ)
UPLOAD = Policy(
    Permission.AUDIT_UPLOAD, station="path:code", kinds=frozenset({PrincipalKind.STATION})
)
STAFF_ERRORS = error_responses(401, 403, 422, 429)
MAX_LIMIT = 1000
MAX_UPLOAD = 500  # records per upload
CODE_LENGTH = 40


class StationRecordIn(BaseModel):
    """One audit record as the station's edge wrote it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    record_id: str = Field(
        pattern=r"^[0-9A-Za-z][0-9A-Za-z-]{0,63}$",
        description="the edge's id of the record: an upload repeated adds nothing",
    )
    at: AwareDatetime = Field(description="when it happened, by the edge's clock")
    actor: str = Field(min_length=1, max_length=150, examples=["terminal:pos-1"])
    action: str = Field(min_length=1, max_length=200, examples=["pump.authorize"])
    target: str = Field(max_length=200, examples=["pump:3"])
    details: dict[str, Any] = Field(default_factory=dict)


class StationAuditBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    records: list[Any] = Field(
        max_length=MAX_UPLOAD,
        description="StationRecordIn objects; each is judged on its own (one bad item "
        "never holds back the rest)",
    )


class StationRecordResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    index: int
    record_id: str | None
    status: str = Field(description="created, duplicate or refused")
    errors: list[dict[str, Any]] | None = None


class StationAuditResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    results: list[StationRecordResult]


def _judge(item: Any) -> StationRecord | RefusedRecord:
    try:
        r = StationRecordIn.model_validate(item)
    except ValidationError as exc:
        rid = item.get("record_id") if isinstance(item, dict) else None
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        return RefusedRecord(
            record_id=rid[:64] if isinstance(rid, str) else None,
            errors=[{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors],
        )
    return StationRecord(
        record_id=r.record_id,
        at=r.at,
        actor=r.actor,
        action=r.action,
        target=r.target,
        details=r.details,
    )


class Order(StrEnum):
    NEWEST = "newest"
    SEQ = "seq"


class AuditRecordPublic(BaseModel):
    """One chained audit record."""

    model_config = ConfigDict(frozen=True)

    seq: int = Field(description="position in the chain, from 1")
    record_id: str
    at: datetime
    actor: str = Field(examples=["user:alice"])
    action: str
    target: str
    details: Any = Field(description="the action's details (JSON) as recorded")
    trace_id: str | None
    source: str | None
    hash: str = Field(description="SHA-256 (hex) of the previous hash and this record")


class AuditRecordList(BaseModel):
    model_config = ConfigDict(frozen=True)

    items: list[AuditRecordPublic]
    next_after_seq: int | None = Field(
        default=None, description="order=seq: pass as after_seq for the next page"
    )
    next_before_seq: int | None = Field(
        default=None, description="order=newest: pass as before_seq for the next page"
    )


class VerdictPublic(BaseModel):
    model_config = ConfigDict(frozen=True)

    ok: bool
    records_checked: int
    checkpoints_checked: int
    first_bad_seq: int | None
    problem: str | None
    last_seq: int


def _details(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _public(r: AuditRecord) -> AuditRecordPublic:
    return AuditRecordPublic(
        seq=r.seq,
        record_id=r.record_id,
        at=datetime.fromisoformat(r.at),
        actor=r.actor,
        action=r.action,
        target=r.target,
        details=_details(r.details),
        trace_id=r.trace_id,
        source=r.source,
        hash=r.hash,
    )


def _verdict(v: Verdict) -> VerdictPublic:
    return VerdictPublic(
        ok=v.ok,
        records_checked=v.records_checked,
        checkpoints_checked=v.checkpoints_checked,
        first_bad_seq=v.first_bad_seq,
        problem=v.problem,
        last_seq=v.last_seq,
    )


Text = Annotated[str | None, Query(min_length=1, max_length=200)]
Seq = Annotated[int | None, Query(ge=0)]


def build_router(db: Database) -> APIRouter:
    router = APIRouter(tags=["audit"])

    @router.post(
        "/v1/stations/{code}/audit:batch",
        dependencies=[require(UPLOAD)],
        responses=error_responses(400, 401, 403, 413, 422, 429),
        summary="Upload the station's edge audit records into the chain",
    )
    async def upload_station_records(
        code: Annotated[str, Path(max_length=CODE_LENGTH)],  # noqa: ARG001 - the policy's
        body: StationAuditBatch,
        request: Request,
    ) -> StationAuditResult:
        """The station is the credential's (another station's credential: 403
        ``auth.wrong_station``). Each record is queued for the chain under the actor
        ``station:CODE/<edge actor>``; an upload repeated after a lost answer answers
        ``duplicate`` for what it already holds; an invalid item is ``refused`` with its
        errors (and audited as ``audit.upload_refused``) while the rest go in."""
        station = request.state.principal.subject
        items = [_judge(item) for item in body.records]
        statuses = await accept_station_records(db, station, items)
        return StationAuditResult(
            results=[
                StationRecordResult(
                    index=i,
                    record_id=item.record_id,
                    status=status,
                    errors=[dict(e) for e in item.errors]
                    if isinstance(item, RefusedRecord)
                    else None,
                )
                for i, (item, status) in enumerate(zip(items, statuses, strict=True))
            ]
        )

    @router.get(
        "/v1/audit/records",
        dependencies=[require(READ)],
        responses=STAFF_ERRORS,
        summary="Audit records (chained), newest first or in chain order",
    )
    async def get_records(
        actor: Text = None,
        action: Text = None,
        target: Text = None,
        after_seq: Seq = None,
        before_seq: Seq = None,
        order: Order = Order.NEWEST,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    ) -> AuditRecordList:
        """The records in the chain matching every filter given (exact match). ``order=newest``
        (the default): newest first, page on with ``before_seq``; ``order=seq``: chain order,
        page on with ``after_seq``. Records still waiting for the chainer (well under a
        second under normal load) are not listed yet."""
        newest = order is Order.NEWEST
        records = await list_records(
            db,
            RecordQuery(
                actor=actor,
                action=action,
                target=target,
                after_seq=after_seq,
                before_seq=before_seq,
                newest_first=newest,
                limit=limit,
            ),
        )
        full = len(records) == limit
        last = records[-1].seq if records and full else None
        return AuditRecordList(
            items=[_public(r) for r in records],
            next_after_seq=None if newest else last,
            next_before_seq=last if newest else None,
        )

    @router.get(
        "/v1/audit/verify",
        dependencies=[require(READ)],
        responses=STAFF_ERRORS,
        summary="Verify the hash chain and the signed checkpoints",
    )
    async def get_verify(
        from_seq: Annotated[
            int | None,
            Query(ge=1, description="check from this record on (trusts the one before it)"),
        ] = None,
    ) -> VerdictPublic:
        """Walk the chain (from ``from_seq``, else from the start) and report the first
        break. The whole chain takes about a minute per ten million records: pass
        ``from_seq`` to check only the recent part."""
        return _verdict(await verify(db, from_seq=from_seq))

    return router
