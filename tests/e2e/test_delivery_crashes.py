"""Crash tests of the delivery contract with real processes: ``forecourt worker`` hosting the
``probe`` consumer is SIGKILLed at a named crash point (it kills itself there and leaves a
marker), restarted, and the event ends processed exactly once or dead-lettered — on SQLite
with the in-process bus and on PostgreSQL with NATS JetStream.

* ``consumer.after_effect``: the effect is committed, the delivery not yet settled; the
  redelivery finds the inbox row and applies nothing twice.
* ``consumer.last_delivery``: an event that always fails is on its last allowed attempt;
  the redelivery runs past the budget and is dead-lettered without running again.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
import sqlalchemy as sa

from forecourt.bootstrap import build_bus
from forecourt.infra.db import Database, dead_letter_table, outbox_table, probe_effect_table
from forecourt.infra.migrate import upgrade
from forecourt.infra.probe import FAIL_MARKER
from forecourt.infra.relay import OutboxRelay
from forecourt.settings import Settings
from tests.cli.support import CLI, Running, clean_env
from tests.infra.support import sale_event
from tests.support import eventually

pytestmark = pytest.mark.e2e


@pytest.fixture(params=["embedded", "postgresql+nats"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, unique_stream: str) -> dict[str, str]:
    if request.param == "embedded":
        return {
            "FORECOURT_DATABASE_URL": f"sqlite:///{tmp_path / 'hq.db'}",
            "FORECOURT_BUS_URL": "memory://",
        }
    nats_url = request.getfixturevalue("nats_url")
    pg_url = request.getfixturevalue("pg_url")
    return {
        "FORECOURT_DATABASE_URL": pg_url,
        "FORECOURT_BUS_URL": nats_url,
        "FORECOURT_NATS_STREAM": unique_stream,
        "FORECOURT_NATS_SUBJECT_PREFIX": unique_stream.lower(),
    }


def worker(tmp_path: Path, env: dict[str, str], name: str, **extra: str) -> Running:
    proc = Running(
        [*CLI, "worker", "--consumers", "probe"],
        tmp_path,
        clean_env(**env, FORECOURT_CONSUMER_ACK_WAIT_S="2", **extra),
        name=name,
    )
    proc.wait_for(lambda t: "consumers running" in t, 60.0, "the consumers running line")
    return proc


def settings_of(env: dict[str, str]) -> Settings:
    """The HQ settings the worker processes run with."""
    return Settings(
        database_url=env["FORECOURT_DATABASE_URL"],
        bus_url=env["FORECOURT_BUS_URL"],
        nats_stream=env.get("FORECOURT_NATS_STREAM", "FORECOURT"),
        nats_subject_prefix=env.get("FORECOURT_NATS_SUBJECT_PREFIX"),
    )


async def publish(env: dict[str, str], *events: object) -> None:
    """Write the events to the outbox and relay them, as HQ does."""
    settings = settings_of(env)
    db = Database(settings.database_url)
    await db.connect()
    await upgrade(db)
    bus = build_bus(settings, db)
    await bus.connect()
    try:
        async with db.begin() as uow:
            await uow.emit(*events)  # type: ignore[arg-type]
        relay = OutboxRelay(db, bus)
        await relay.drain()
        async with db.connection() as conn:
            assert await conn.scalar(sa.select(sa.func.count()).select_from(outbox_table)) == 0
    finally:
        await bus.close()
        await db.dispose()


async def count(env: dict[str, str], table: sa.Table, *where: object) -> int:
    db = Database(env["FORECOURT_DATABASE_URL"])
    await db.connect()
    try:
        async with db.connection() as conn:
            query = sa.select(sa.func.count()).select_from(table)
            for clause in where:
                query = query.where(clause)  # type: ignore[arg-type]
            return int(await conn.scalar(query) or 0)
    finally:
        await db.dispose()


async def settled(env: dict[str, str]) -> bool:
    """Nothing pending for the probe on the bus (the killed delivery came back, settled)."""
    settings = settings_of(env)
    db = Database(settings.database_url)
    await db.connect()
    bus = build_bus(settings, db)
    await bus.connect()
    try:
        return await bus.pending("probe") == 0
    finally:
        await bus.close()
        await db.dispose()


def died_at(proc: Running, marker: Path, point: str) -> None:
    assert proc.process.wait(timeout=60) == -signal.SIGKILL, proc.stderr()
    assert point in marker.read_text(), marker.read_text()


async def test_a_consumer_killed_after_its_effect_applies_it_once(
    backend: dict[str, str], tmp_path: Path
) -> None:
    marker = tmp_path / "crash.marker"
    first = worker(
        tmp_path,
        backend,
        "worker-1",
        FORECOURT_CRASH_AT="consumer.after_effect",
        FORECOURT_CRASH_MARKER=str(marker),
    )
    try:
        event = sale_event(1)
        await publish(backend, event)
        await asyncio.to_thread(died_at, first, marker, "consumer.after_effect")
        assert await count(backend, probe_effect_table) == 1  # committed before the kill
        second = worker(tmp_path, backend, "worker-2")
        try:
            later = sale_event(2)
            await publish(backend, later)
            t = probe_effect_table
            await eventually(
                lambda: count(backend, t, t.c.event_id == later.id),
                timeout=30,
                what="the event behind the redelivered one",
            )
            await eventually(lambda: settled(backend), timeout=30, what="the redelivery settled")
            assert await count(backend, t, t.c.event_id == event.id) == 1
            assert second.stop(signal.SIGTERM) == 0
        finally:
            second.kill()
    finally:
        first.kill()


async def test_a_consumer_killed_on_its_last_allowed_delivery_dead_letters_the_event(
    backend: dict[str, str], tmp_path: Path
) -> None:
    marker = tmp_path / "crash.marker"
    first = worker(
        tmp_path,
        backend,
        "worker-1",
        FORECOURT_CRASH_AT="consumer.last_delivery",
        FORECOURT_CRASH_MARKER=str(marker),
    )
    try:
        poison = sale_event(3, shift_id=FAIL_MARKER)
        await publish(backend, poison)
        await asyncio.to_thread(died_at, first, marker, "consumer.last_delivery")
        second = worker(tmp_path, backend, "worker-2")
        try:
            d = dead_letter_table
            await eventually(
                lambda: count(backend, d, d.c.event_id == poison.id, d.c.consumer == "probe"),
                timeout=60,
                what="the dead letter",
            )
            assert await count(backend, probe_effect_table) == 0
            assert second.stop(signal.SIGTERM) == 0
        finally:
            second.kill()
    finally:
        first.kill()
