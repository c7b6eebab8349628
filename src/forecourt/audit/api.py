"""HTTP routes of ``audit``: read the chained records, verify the chain (``audit:read``)."""

from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from forecourt.audit.domain import AuditRecord, Verdict
from forecourt.audit.handlers import list_records, verify
from forecourt.audit.store import RecordQuery
from forecourt.infra.access import require
from forecourt.infra.db import Database
from forecourt.infra.http import error_responses
from forecourt.kernel.access import Permission, Policy

READ = Policy(Permission.AUDIT_READ)
STAFF_ERRORS = error_responses(401, 403, 422, 429)
MAX_LIMIT = 1000


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
    router = APIRouter(prefix="/v1/audit", tags=["audit"])

    @router.get(
        "/records",
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
        "/verify",
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
