"""Tests that kill mutants a mutation pass over the audit trail left alive: checkpoints at
the edges of a partial check, what a checkpoint's signature covers, the truncation message,
the chainer's interval boundary and its duplicate check past one chunk, what HQ keeps of a
station's upload (its source address, trace id, every refusal) and the 500-record limit."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from forecourt.audit import store
from forecourt.audit.api import MAX_UPLOAD
from forecourt.audit.domain import (
    GENESIS_HASH,
    AuditRecord,
    ChainVerifier,
    Checkpoint,
    canonical,
    chain,
    format_at,
    key_id,
    public_bytes,
    sign_checkpoint,
    verify_chain,
)
from forecourt.audit.handlers import AuditChainer, chain_waiting, station_record_id, verify
from forecourt.bootstrap import HeadOffice, build_head_office
from forecourt.infra.db import Database, audit_outbox_table
from forecourt.infra.migrate import upgrade
from forecourt.network.handlers import SAMPLE_CHAIN, import_chain, issue_credential, load_chain_file
from forecourt.settings import Settings
from tests.support import ManualClock

KEY = Ed25519PrivateKey.generate()
KID = key_id(public_bytes(KEY))
KEYS = {KID: public_bytes(KEY)}
BASE = datetime(2026, 12, 1, tzinfo=UTC)


def build(n: int, every: int) -> tuple[list[AuditRecord], list[Checkpoint]]:
    rows = [(f"r{i}", format_at(BASE), "a", "b", "c", "{}", None, None) for i in range(n)]
    records = chain(GENESIS_HASH, 1, rows)
    cps = [sign_checkpoint(KEY, KID, r.seq, r.hash, r.at) for r in records if r.seq % every == 0]
    return records, cps


# --- the pure chain logic ---------------------------------------------------------------------


def test_a_checkpoint_whose_time_was_edited_is_refused() -> None:
    # The signature covers the checkpoint's time too: a moved time is a forged checkpoint.
    records, cps = build(20, 10)
    moved = [cps[0], replace(cps[1], at=format_at(datetime(2027, 1, 1, tzinfo=UTC)))]
    verdict = verify_chain(records, moved, KEYS)
    assert not verdict.ok
    assert verdict.first_bad_seq == 20
    assert verdict.problem == "checkpoint at 20: signature invalid"


def test_a_partial_check_from_a_checkpoints_own_seq_checks_that_checkpoint() -> None:
    records, cps = build(30, 10)
    start = 10  # a checkpoint signs exactly this record
    verdict = verify_chain(
        records[start - 1 :], cps, KEYS, start_seq=start, prev_hash=records[8].hash
    )
    assert verdict.ok, verdict.problem
    assert (verdict.records_checked, verdict.checkpoints_checked) == (21, 3)
    forged = [replace(cps[0], signature="00" * 64), *cps[1:]]
    verdict = verify_chain(
        records[start - 1 :], forged, KEYS, start_seq=start, prev_hash=records[8].hash
    )
    assert not verdict.ok
    assert verdict.first_bad_seq == 10


def test_truncation_names_the_furthest_signed_checkpoint() -> None:
    records, cps = build(100, 25)
    verdict = verify_chain(records[:30], cps, KEYS)
    assert verdict.first_bad_seq == 31
    assert verdict.problem == (
        "chain ends at 30 but checkpoint at 100 was signed: records 31–100 removed (truncated)"
    )


def test_a_forged_checkpoint_past_the_end_is_named_at_its_seq() -> None:
    records, cps = build(10, 10)
    beyond = sign_checkpoint(KEY, KID, 20, records[-1].hash, records[-1].at)
    forged = replace(beyond, signature="00" * 64)
    verdict = verify_chain(records, [*cps, forged], KEYS)
    assert not verdict.ok
    assert verdict.first_bad_seq == 20
    assert verdict.problem == "checkpoint at 20: signature invalid"


def test_recheck_takes_only_the_record_that_failed() -> None:
    records, cps = build(10, 5)
    encoded = [(r.seq, canonical(r), r.hash) for r in records]
    encoded[6] = (7, b"different", records[6].hash)
    verifier = ChainVerifier(cps, KEYS)
    assert not verifier.feed(encoded, encoded=True)
    assert not verifier.recheck(records[7])  # record 8 cannot clear record 7's break
    verdict = verifier.finish()
    assert verdict.first_bad_seq == 7
    assert verdict.problem == "record 7: hash does not match (edited, inserted or reordered)"


# --- the chainer and verify, on both databases ------------------------------------------------


async def _open(url: str, clock: ManualClock | None = None) -> Database:
    db = Database(url, clock=clock)
    await db.connect()
    await upgrade(db, ("platform", "audit"))
    return db


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = await _open(db_url)
    yield database
    await database.dispose()


async def _write(db: Database, n: int, prefix: str = "t") -> None:
    async with db.begin() as uow:
        for i in range(n):
            await uow.record_audit(actor="user:a", action="test.act", target=f"{prefix}{i}")


async def test_verify_from_a_checkpoints_seq_counts_that_checkpoint(db: Database) -> None:
    await _write(db, 12)
    chainer = AuditChainer(db, batch_size=5, checkpoint_every=5)
    while await chainer.run_once():
        pass
    async with db.connection() as conn:
        assert [cp.seq for cp in await store.checkpoints_from(conn, 1)] == [5, 10]
    verdict = await verify(db, from_seq=5)
    assert verdict.ok, verdict.problem
    assert (verdict.records_checked, verdict.checkpoints_checked) == (8, 2)


async def test_a_checkpoint_is_due_when_exactly_the_interval_has_passed(sqlite_url: str) -> None:
    clock = ManualClock()
    db = await _open(sqlite_url, clock)
    try:
        chainer = AuditChainer(db, checkpoint_every=1000, checkpoint_interval_s=60)
        await _write(db, 1)
        await chainer.run_once(force_checkpoint=True)
        assert chainer.checkpoints == 1
        await _write(db, 1)
        clock.advance(60)
        await chainer.run_once()
        assert chainer.checkpoints == 2
    finally:
        await db.dispose()


async def test_a_record_queued_again_past_the_first_500_is_not_chained_twice(
    sqlite_url: str,
) -> None:
    db = await _open(sqlite_url)
    try:
        await _write(db, 1, "first")
        await chain_waiting(db, checkpoint=False)
        async with db.connection() as conn:
            first = (await conn.execute(sa.select(store.record_t))).one()
        await _write(db, 550)
        async with db.begin() as uow:  # a station's upload racing the chainer: after the 550
            await uow.conn.execute(
                audit_outbox_table.insert().values(
                    record_id=first.record_id,
                    at=first.at,
                    actor=first.actor,
                    action=first.action,
                    target=first.target,
                    details=first.details,
                )
            )
        chainer = AuditChainer(db, batch_size=1000)
        assert await chainer.run_once() == 551
        assert chainer.chained == 550
        async with db.connection() as conn:
            assert await store.waiting_count(conn) == 0
            ids = (await conn.execute(sa.select(store.record_t.c.record_id))).scalars().all()
        assert len(ids) == len(set(ids)) == 551
        assert (await verify(db)).ok
    finally:
        await db.dispose()


# --- a station's upload -----------------------------------------------------------------------


@pytest.fixture
async def office(sqlite_url: str) -> AsyncIterator[tuple[HeadOffice, dict[str, str]]]:
    hq = build_head_office(Settings(database_url=sqlite_url, log_json=False))
    await hq.start(relay=False)
    await import_chain(hq.db, load_chain_file(SAMPLE_CHAIN))
    tokens = {"S001": (await issue_credential(hq.db, "S001"))[1]}
    yield hq, tokens
    await hq.stop()


def _record(i: int) -> dict[str, Any]:
    return {
        "record_id": f"0193a7c2-0000-7000-8000-{i:012d}",
        "at": "2026-12-01T10:00:00+08:00",
        "actor": "terminal:pos-1",
        "action": "pump.stop",
        "target": f"pump:{i}",
        "details": {"i": i},
    }


async def _post(
    hq: HeadOffice, token: str, records: list[Any], headers: dict[str, str] | None = None
) -> httpx.Response:
    transport = httpx.ASGITransport(app=hq.app, client=("192.0.2.7", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://hq") as http:
        return await http.post(
            "/v1/stations/S001/audit:batch",
            json={"records": records},
            headers={"authorization": f"Bearer {token}", **(headers or {})},
        )


async def _chained(hq: HeadOffice, action: str) -> list[Any]:
    await chain_waiting(hq.db)
    async with hq.db.connection() as conn:
        rows = await conn.execute(
            sa.select(store.record_t)
            .where(store.record_t.c.action == action)
            .order_by(store.record_t.c.seq)
        )
        return list(rows)


async def test_a_station_record_keeps_the_uploads_source_and_trace_id(
    office: tuple[HeadOffice, dict[str, str]],
) -> None:
    hq, tokens = office
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    answer = await _post(
        hq, tokens["S001"], [_record(1)], {"traceparent": f"00-{trace}-00f067aa0ba902b7-01"}
    )
    assert answer.status_code == 200, answer.text
    (row,) = await _chained(hq, "pump.stop")
    assert row.record_id == station_record_id("S001", _record(1)["record_id"])
    assert (row.source, row.trace_id) == ("192.0.2.7", trace)


async def test_every_refused_item_is_audited_and_each_result_names_its_record(
    office: tuple[HeadOffice, dict[str, str]],
) -> None:
    hq, tokens = office
    bad_one = {**_record(7), "actor": ""}
    bad_two = {**_record(8), "at": "2026-12-01T10:00:00"}  # naive
    answer = await _post(hq, tokens["S001"], [_record(1), bad_one, bad_two, _record(2)])
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [(r["index"], r["record_id"], r["status"]) for r in results] == [
        (0, _record(1)["record_id"], "created"),
        (1, bad_one["record_id"], "refused"),
        (2, bad_two["record_id"], "refused"),
        (3, _record(2)["record_id"], "created"),
    ]
    refusals = await _chained(hq, "audit.upload_refused")
    assert [json.loads(r.details)["record_id"] for r in refusals] == [
        bad_one["record_id"],
        bad_two["record_id"],
    ]


async def test_an_upload_of_exactly_the_limit_goes_in_and_one_more_is_refused(
    office: tuple[HeadOffice, dict[str, str]],
) -> None:
    hq, tokens = office
    assert MAX_UPLOAD == 500
    over = await _post(hq, tokens["S001"], [_record(i) for i in range(501)])
    assert over.status_code == 422, over.text
    full = await _post(hq, tokens["S001"], [_record(i) for i in range(500)])
    assert full.status_code == 200, full.text
    assert [r["status"] for r in full.json()["results"]] == ["created"] * 500
