"""The chainer: records written in real transactions are chained in order, none lost, none
twice, a late commit of a lower id included; one chain with two chainers; checkpoints."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa

from forecourt.audit import store
from forecourt.audit.domain import Verdict
from forecourt.audit.handlers import (
    AuditChainer,
    DatabaseSigningKeys,
    StaticSigningKey,
    chain_waiting,
    verify,
)
from forecourt.infra.db import Database, audit_outbox_table
from forecourt.infra.migrate import upgrade
from tests.support import ManualClock

TREES = ("platform", "audit")


async def open_db(url: str, clock: ManualClock | None = None) -> Database:
    db = Database(url, clock=clock)
    await db.connect()
    await upgrade(db, TREES)
    return db


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = await open_db(db_url)
    yield database
    await database.dispose()


async def write(db: Database, *targets: str, actor: str = "user:alice") -> None:
    async with db.begin() as uow:
        for target in targets:
            await uow.record_audit(
                actor=actor, action="test.act", target=target, details={"t": target}
            )


async def chained(db: Database) -> list[tuple[int, str, str]]:
    async with db.connection() as conn:
        rows = await conn.execute(
            sa.select(
                store.record_t.c.seq, store.record_t.c.target, store.record_t.c.record_id
            ).order_by(store.record_t.c.seq)
        )
        return [(r.seq, r.target, r.record_id) for r in rows]


async def waiting(db: Database) -> int:
    async with db.connection() as conn:
        return await store.waiting_count(conn)


async def drain(chainer: AuditChainer) -> int:
    total = 0
    while moved := await chainer.run_once():
        total += moved
    return total


async def test_records_are_chained_in_order_once(db: Database) -> None:
    await write(db, "a1", "a2", "a3")
    await write(db, "b1")
    await write(db, *(f"c{i}" for i in range(20)))
    chainer = AuditChainer(db, batch_size=7, checkpoint_every=10)
    assert await drain(chainer) == 24
    rows = await chained(db)
    assert [seq for seq, _, _ in rows] == list(range(1, 25))
    assert [t for _, t, _ in rows] == ["a1", "a2", "a3", "b1", *(f"c{i}" for i in range(20))]
    assert len({rid for _, _, rid in rows}) == 24
    assert await waiting(db) == 0
    assert await chainer.run_once() == 0  # nothing twice
    verdict = await verify(db)
    assert verdict == Verdict(True, 24, chainer.checkpoints, last_seq=24)
    assert chainer.checkpoints == 2  # at 14 (≥ 10 since 0) and at 24

    await write(db, "d1")
    assert await chainer.run_once() == 1
    assert (await verify(db)).records_checked == 25
    assert (await verify(db, from_seq=20)).records_checked == 6


async def test_a_lower_id_committed_later_is_chained_later(pg_url: str) -> None:
    db = await open_db(pg_url)
    try:
        chainer = AuditChainer(db)
        async with db.begin() as slow:
            await slow.record_audit(actor="user:slow", action="test.act", target="first-id")
            await write(db, "second-id")  # another transaction: a higher id, committed first
            assert await chainer.run_once() == 1
            assert [t for _, t, _ in await chained(db)] == ["second-id"]
        # the slow one committed now: a later pass chains it, nothing is lost
        assert await chainer.run_once() == 1
        assert [t for _, t, _ in await chained(db)] == ["second-id", "first-id"]
        assert await waiting(db) == 0
        assert (await verify(db)).ok
    finally:
        await db.dispose()


async def test_a_rolled_back_action_leaves_no_record(db: Database) -> None:
    async def failing_action() -> None:
        async with db.begin() as uow:
            await uow.record_audit(actor="user:a", action="test.act", target="never")
            raise RuntimeError("the action failed")

    with pytest.raises(RuntimeError):
        await failing_action()
    await write(db, "kept")
    assert await drain(AuditChainer(db)) == 1
    assert [t for _, t, _ in await chained(db)] == ["kept"]


async def test_two_chainers_make_one_gap_free_chain(pg_url: str) -> None:
    one, two = await open_db(pg_url), await open_db(pg_url)
    chainers = [
        AuditChainer(d, batch_size=25, interval_s=0.005, checkpoint_every=100) for d in (one, two)
    ]
    try:
        for c in chainers:
            c.start()

        async def writer(w: int) -> None:
            for i in range(40):
                await write(one if i % 2 else two, *(f"w{w}-{i}-{k}" for k in range(3)))

        await asyncio.gather(*(writer(w) for w in range(8)))
        for _ in range(400):
            if await waiting(one) == 0:
                break
            await asyncio.sleep(0.02)
        for c in chainers:
            await c.stop()
        rows = await chained(one)
        assert [seq for seq, _, _ in rows] == list(range(1, 961))
        assert len({t for _, t, _ in rows}) == 960
        assert all(c.chained > 0 for c in chainers), [c.chained for c in chainers]
        assert sum(c.chained for c in chainers) == 960
        # each writer's records in the order it wrote them
        for w in range(8):
            mine = [t for _, t, _ in rows if t.startswith(f"w{w}-")]
            assert mine == [f"w{w}-{i}-{k}" for i in range(40) for k in range(3)]
        verdict = await verify(one)
        assert verdict.ok
        assert verdict.records_checked == 960
        assert verdict.checkpoints_checked >= 9
    finally:
        for c in chainers:
            await c.stop()
        await one.dispose()
        await two.dispose()


async def test_checkpoints_by_count_and_by_time(db_url: str) -> None:
    clock = ManualClock()
    db = await open_db(db_url, clock)
    try:
        chainer = AuditChainer(db, checkpoint_every=1000, checkpoint_interval_s=60)
        await write(db, "a")
        await chainer.run_once()
        assert chainer.checkpoints == 0  # neither 1000 records nor 60 s yet
        await chainer.run_once(force_checkpoint=True)
        assert chainer.checkpoints == 1
        clock.advance(61)
        await chainer.run_once()
        assert chainer.checkpoints == 1  # the head did not move
        await write(db, "b")
        await chainer.run_once()
        assert chainer.checkpoints == 2  # moved, and 60 s since the last
        await write(db, "c")
        await chainer.run_once()
        assert chainer.checkpoints == 2
        async with db.connection() as conn:
            cps = await store.checkpoints_from(conn, 1)
        assert [cp.seq for cp in cps] == [1, 2]
        assert (await verify(db)).checkpoints_checked == 2
    finally:
        await db.dispose()


async def test_the_signing_key_is_created_once_under_a_race(pg_url: str) -> None:
    one, two = await open_db(pg_url), await open_db(pg_url)
    try:

        async def take(db: Database) -> str:
            async with db.begin() as uow:
                signer = await DatabaseSigningKeys().signer(uow.conn, db)
                await asyncio.sleep(0.05)
                return signer.kid

        kids = await asyncio.gather(take(one), take(two), take(one))
        assert len(set(kids)) == 1
        async with one.connection() as conn:
            assert list(await store.public_keys(conn)) == [kids[0]]
    finally:
        await one.dispose()
        await two.dispose()


async def test_a_key_kept_outside_the_database(db: Database) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    signing = StaticSigningKey(key)
    await write(db, "a", "b")
    chained_n, head = await chain_waiting(db, signing=signing)
    assert (chained_n, head) == (2, 2)
    async with db.connection() as conn:
        rows = (await conn.execute(sa.select(store.key_t))).all()
    assert [r.private_key for r in rows] == [None]
    assert (await verify(db)).checkpoints_checked == 1
    # a verifier holding other trusted keys refuses the checkpoint
    verdict = await verify(db, trusted_keys={})
    assert not verdict.ok
    assert verdict.first_bad_seq == 2


async def test_the_chainer_runs_in_the_background(db: Database) -> None:
    chainer = AuditChainer(db, interval_s=0.01)
    chainer.start()
    try:
        await write(db, "x", "y")
        for _ in range(300):
            if len(await chained(db)) == 2:
                break
            await asyncio.sleep(0.01)
        assert [t for _, t, _ in await chained(db)] == ["x", "y"]
    finally:
        await chainer.stop()
    async with db.connection() as conn:
        left = await conn.execute(sa.select(sa.func.count()).select_from(audit_outbox_table))
        assert left.scalar_one() == 0


async def test_an_empty_trail_verifies(db: Database) -> None:
    assert await AuditChainer(db).run_once(force_checkpoint=True) == 0
    verdict = await verify(db)
    assert verdict == Verdict(True, 0, 0, last_seq=0)
    assert verdict.describe() == "audit trail intact: 0 records, 0 checkpoints"
