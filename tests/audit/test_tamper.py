"""Tampering with the stored chain on PostgreSQL, with raw SQL as an intruder would: every
kind is found by ``verify`` and by ``forecourt audit verify`` (exit 1, the record named)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from click.testing import CliRunner, Result

from forecourt.audit.cli import audit
from forecourt.audit.domain import link
from forecourt.audit.handlers import AuditChainer, verify
from forecourt.infra.db import Database
from forecourt.infra.migrate import upgrade

SIGNED = 200  # records 1–200, checkpoints at 50, 100, 150, 200
TAIL = 5  # records 201–205, after the last checkpoint


@dataclass
class Trail:
    url: str
    db: Database

    async def sql(self, *statements: str) -> None:
        conn = await asyncpg.connect(self.url)
        try:
            async with conn.transaction():
                for statement in statements:
                    await conn.execute(statement)
        finally:
            await conn.close()

    async def fetchrow(self, query: str) -> Any:
        conn = await asyncpg.connect(self.url)
        try:
            return await conn.fetchrow(query)
        finally:
            await conn.close()


def cli(*args: str) -> Awaitable[Result]:
    return asyncio.to_thread(CliRunner().invoke, audit, list(args))


@pytest.fixture
async def trail(pg_url: str) -> AsyncIterator[Trail]:
    db = Database(pg_url)
    await db.connect()
    await upgrade(db, ("platform", "audit"))
    n = 0
    for _ in range((SIGNED + TAIL) // 5):
        async with db.begin() as uow:
            for _ in range(5):
                n += 1
                await uow.record_audit(
                    actor=f"user:staff{n % 7}",
                    action="network.prices.publish",
                    target=f"price_set:PS{n}",
                    details={"n": n, "grades": ["E10", "B7"]},
                    source="192.0.2.10",
                )
    chainer = AuditChainer(db, batch_size=50, checkpoint_every=50)
    for _ in range(SIGNED // 50):
        assert await chainer.run_once() == 50
    chainer.checkpoint_every = 10_000
    assert await chainer.run_once() == TAIL
    assert chainer.checkpoints == 4
    assert (await verify(db)).ok
    yield Trail(pg_url, db)
    await db.dispose()


async def shift_up_from(trail: Trail, seq: int) -> None:
    await trail.sql(
        f"UPDATE audit.audit_record SET seq = -seq WHERE seq >= {seq}",
        "UPDATE audit.audit_record SET seq = -seq + 1 WHERE seq < 0",
    )


async def insert_forged(trail: Trail) -> None:
    before = await trail.fetchrow("SELECT hash FROM audit.audit_record WHERE seq = 60")
    await shift_up_from(trail, 61)
    at = "2026-12-02T10:00:00.000000Z"
    fields = (
        61,
        "forged-record",
        at,
        "user:mallory",
        "identity.user.grant",
        "user:mallory",
        '{"role": "admin"}',
        None,
        None,
    )
    await trail.sql(
        "INSERT INTO audit.audit_record (seq, record_id, at, actor, action, target, details, "
        f"hash) VALUES (61, 'forged-record', '{at}', 'user:mallory', 'identity.user.grant', "
        f"""'user:mallory', '{{"role": "admin"}}', '{link(before["hash"], fields)}')"""
    )


async def rewrite_after(trail: Trail) -> None:
    """Edit record 120 and recompute every later hash: only the checkpoint at 150 can tell."""
    await trail.sql("UPDATE audit.audit_record SET actor = 'user:mallory' WHERE seq = 120")
    conn = await asyncpg.connect(trail.url)
    try:
        rows = await conn.fetch(
            "SELECT seq, record_id, to_char(at AT TIME ZONE 'UTC', "
            """'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), actor, action, target, details, trace_id, """
            "source, hash FROM audit.audit_record WHERE seq >= 119 ORDER BY seq"
        )
        prev = rows[0]["hash"]
        for row in rows[1:]:
            prev = link(prev, tuple(row)[:9])
            await conn.execute(
                "UPDATE audit.audit_record SET hash = $1 WHERE seq = $2", prev, row["seq"]
            )
    finally:
        await conn.close()


Tamper = Callable[[Trail], Awaitable[None]]


def sql(*statements: str) -> Tamper:
    return lambda trail: trail.sql(*statements)


CASES: dict[str, tuple[Tamper, int, str]] = {
    "edit a field": (
        sql("UPDATE audit.audit_record SET actor = 'user:mallory' WHERE seq = 17"),
        17,
        "record 17: hash does not match (edited, inserted or reordered)",
    ),
    "edit the details": (
        sql("""UPDATE audit.audit_record SET details = '{"n": 1}' WHERE seq = 120"""),
        120,
        "record 120: hash does not match",
    ),
    "edit the time": (
        sql("UPDATE audit.audit_record SET at = at + interval '1 microsecond' WHERE seq = 3"),
        3,
        "record 3: hash does not match",
    ),
    "null the source": (
        sql("UPDATE audit.audit_record SET source = NULL WHERE seq = 204"),
        204,
        "record 204: hash does not match",
    ),
    "edit a stored hash": (
        sql(f"UPDATE audit.audit_record SET hash = '{'ab' * 32}' WHERE seq = 88"),
        88,
        "record 88: hash does not match",
    ),
    "delete a middle record": (
        sql("DELETE FROM audit.audit_record WHERE seq = 42"),
        42,
        "record 42 missing (sequence jumps 41 → 43)",
    ),
    "delete the first record": (
        sql("DELETE FROM audit.audit_record WHERE seq = 1"),
        1,
        "record 1 missing (the chain starts at 2)",
    ),
    "insert a forged record": (insert_forged, 62, "record 62: hash does not match"),
    "swap two records": (
        sql(
            "UPDATE audit.audit_record SET seq = -1 WHERE seq = 30",
            "UPDATE audit.audit_record SET seq = 30 WHERE seq = 70",
            "UPDATE audit.audit_record SET seq = 70 WHERE seq = -1",
        ),
        30,
        "record 30: hash does not match",
    ),
    "truncate the tail": (
        sql("DELETE FROM audit.audit_record WHERE seq > 190"),
        191,
        "chain ends at 190 but checkpoint at 200 was signed: records 191–200 removed (truncated)",
    ),
    "edit a checkpoint's hash": (
        sql(
            "UPDATE audit.audit_checkpoint SET hash = "
            "(SELECT hash FROM audit.audit_record WHERE seq = 99) WHERE seq = 100"
        ),
        100,
        "checkpoint at 100: signature invalid",
    ),
    "edit a checkpoint's signature": (
        sql(
            "UPDATE audit.audit_checkpoint SET signature = "
            "overlay(signature placing 'ff' from 1 for 2) WHERE seq = 150"
        ),
        150,
        "checkpoint at 150: signature invalid",
    ),
    "rewrite the chain after an edit": (
        rewrite_after,
        150,
        "checkpoint at 150: the chain's hash differs from the signed one",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_tampering_is_found(trail: Trail, case: str) -> None:
    tamper, bad_seq, problem = CASES[case]
    await tamper(trail)

    verdict = await verify(trail.db)
    assert not verdict.ok
    assert verdict.first_bad_seq == bad_seq, verdict.problem
    assert verdict.problem is not None
    assert verdict.problem.startswith(problem)

    result = await cli("verify", "--database-url", trail.url)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines == [f"audit trail broken: {verdict.problem}"]
    assert problem in lines[0]
    assert "Traceback" not in result.output

    result = await cli("verify", "--database-url", trail.url, "--json")
    assert result.exit_code == 1
    assert json.loads(result.output)["first_bad_seq"] == bad_seq


async def test_an_intact_trail_and_from(trail: Trail) -> None:
    result = await cli("verify", "--database-url", trail.url)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "audit trail intact: 205 records, 4 checkpoints"

    await trail.sql("UPDATE audit.audit_record SET actor = 'user:mallory' WHERE seq = 17")
    # from 101: record 100 is trusted, the edit before it is not seen
    result = await cli("verify", "--from", "101", "--database-url", trail.url)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "audit trail intact: 105 records, 2 checkpoints"
    result = await cli("verify", "--from", "10", "--database-url", trail.url)
    assert result.exit_code == 1
    assert "record 17: hash does not match" in result.output

    await trail.sql("DELETE FROM audit.audit_record WHERE seq = 150")
    result = await cli("verify", "--from", "151", "--database-url", trail.url)
    assert result.exit_code == 1
    assert "record 150 missing" in result.output
    verdict = await verify(trail.db, from_seq=160)
    assert verdict.ok
    assert verdict.records_checked == 46


async def test_the_tail_after_the_last_checkpoint_is_not_covered(trail: Trail) -> None:
    """A documented limit: records after the newest checkpoint can go unnoticed (sign
    checkpoints often; keep the newest one elsewhere too)."""
    await trail.sql("DELETE FROM audit.audit_record WHERE seq > 200")
    verdict = await verify(trail.db)
    assert verdict.ok
    assert verdict.records_checked == 200


async def test_chain_command_then_verify(trail: Trail) -> None:
    async with trail.db.begin() as uow:
        await uow.record_audit(actor="user:bob", action="test.act", target="x")
    result = await cli("chain", "--database-url", trail.url)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"chained": 1, "head_seq": 206}
    result = await cli("verify", "--database-url", trail.url)
    assert result.output.strip() == "audit trail intact: 206 records, 5 checkpoints"


async def test_an_unreachable_database_is_one_line() -> None:
    result = await cli("verify", "--database-url", "postgresql://postgres@127.0.0.1:1/none")
    assert result.exit_code == 1
    assert "cannot reach the database" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output


async def test_a_server_encoding_difference_is_not_taken_for_tampering(
    trail: Trail, monkeypatch: pytest.MonkeyPatch
) -> None:
    from forecourt.audit import store

    skewed = store._PG_STREAM.replace("'27:'", "CASE WHEN seq = 5 THEN '26:' ELSE '27:' END")
    assert skewed != store._PG_STREAM
    monkeypatch.setattr(store, "_PG_STREAM", skewed)
    verdict = await verify(trail.db, chunk=1000)
    assert verdict.ok, verdict.problem
    assert verdict.records_checked == 205
    await trail.sql("UPDATE audit.audit_record SET target = 'x' WHERE seq = 5")
    verdict = await verify(trail.db)
    assert verdict.first_bad_seq == 5
