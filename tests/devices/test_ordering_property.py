"""Property: whatever order and duplication the broker delivers a station's messages in,
and however they are split into batches, HQ ends in the same current state, the newest of
each topic by (boot, seq) — on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forecourt.devices.handlers import DevicesService, Received
from forecourt.devices.store import reading
from forecourt.infra.db import Database
from forecourt.infra.migrate import upgrade
from forecourt.kernel.telemetry import DEFAULT_PREFIX, encode, topic
from tests.devices.conftest import START, ManualClock

# One edge's messages: (boot index, topic index); each boot's clock runs forward.
TOPICS = [("pumps", 1), ("pumps", 2), ("tanks", 1), ("status", None), ("alarms", None)]
MESSAGES = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, len(TOPICS) - 1), st.integers(0, 3)),
    min_size=1,
    max_size=25,
)


@pytest.fixture
async def service(db_url: str) -> AsyncIterator[DevicesService]:
    db = Database(db_url, clock=ManualClock(START))
    await db.connect()
    await upgrade(db, ("devices",))
    yield DevicesService(
        db, prefix=DEFAULT_PREFIX, stale_after=timedelta(seconds=60), history_limit=1000
    )
    await db.dispose()


def _messages(station: str, spec: list[tuple[int, int, int]]) -> list[Received]:
    out = []
    for seq, (boot, which, step) in enumerate(spec, start=1):
        kind, key = TOPICS[which]
        # A boot's messages are stamped in seq order; boots overlap in time.
        at = START + timedelta(seconds=boot * 7 + seq)
        bodies: dict[str, dict[str, Any]] = {
            "pumps": {"pump": key, "state": f"s{seq}"},
            "tanks": {"tank": key, "volume_ml": seq},
            "status": {"online": seq % 2 == 0},
            "alarms": {"name": f"a{step % 2}", "active": seq % 2 == 0},
        }
        body = bodies[kind]
        payload = encode(station, at, f"boot-{boot}", seq, body)
        out.append(Received(topic(DEFAULT_PREFIX, station, kind, key), payload))
    return out


async def _state(service: DevicesService, station: str) -> list[tuple[Any, ...]]:
    async with reading(service.db) as store:
        rows = await store.current_of([station])
        station_row = (await store.stations([station]))[station]
        alarms = await store.alarms_of([station])
    current = [(r.kind, r.key, r.boot, r.seq, json.loads(r.body)) for r in rows]
    edge_alarms = sorted((k[2], a.active) for k, a in alarms.items() if k[1] == "edge")
    return [*current, ("online", station_row.online), ("alarms", edge_alarms)]


@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=MESSAGES, seed=st.integers(0, 2**32))
async def test_any_order_or_duplication_of_the_same_messages_ends_in_the_same_state(
    service: DevicesService, spec: list[tuple[int, int, int]], seed: int
) -> None:
    rng = random.Random(seed)
    # Given one edge's messages, sent to two stations' topics alike
    first, second = f"P{uuid.uuid4().hex[:8]}", f"P{uuid.uuid4().hex[:8]}"
    in_order = _messages(first, spec)
    shuffled = _messages(second, spec)
    # When the first station's arrive in order, once, in one batch
    await service.ingest(in_order)
    # And the second's shuffled, some repeated, in batches of any size
    delivered = shuffled + rng.choices(shuffled, k=rng.randint(0, len(shuffled)))
    rng.shuffle(delivered)
    while delivered:
        size = rng.randint(1, len(delivered))
        await service.ingest(delivered[:size])
        delivered = delivered[size:]
    # Then both end in the same state
    state = await _state(service, first)
    assert state == await _state(service, second)
    # And that is, per topic, the newest message by its time, then boot, then seq
    newest: dict[tuple[str, str], tuple[int, str, int]] = {}
    for seq, (boot, which, step) in enumerate(spec, start=1):
        kind, key = TOPICS[which]
        name = f"a{step % 2}" if kind == "alarms" else "" if key is None else str(key)
        rank = (boot * 7 + seq, f"boot-{boot}", seq)
        newest[(kind, name)] = max(newest.get((kind, name), rank), rank)
    held = {(kind, key): (boot, seq) for kind, key, boot, seq, _ in state[:-2]}
    assert held == {k: (v[1], v[2]) for k, v in newest.items()}
