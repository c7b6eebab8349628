"""HQ's telemetry subscriber on a private Mosquitto (unix socket, passwords, per-station
ACL) that goes away and comes back: HQ marks the silent station stale with an alarm, keeps
answering, reconnects by itself and shows what the station publishes after the restart."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from itertools import count
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from forecourt.bootstrap import HeadOffice, build_head_office
from forecourt.kernel.telemetry import DEFAULT_PREFIX, encode, topic
from forecourt.network.handlers import SAMPLE_CHAIN, import_chain, load_chain_file
from forecourt.settings import Settings
from tests.mqtt_broker import HQ_USER, MqttBroker
from tests.support import eventually, staff_headers

STATION = "S001"
STALE_AFTER_S = 1.0


@pytest.fixture
async def office(persistent_mqtt_broker: MqttBroker, sqlite_url: str) -> AsyncIterator[HeadOffice]:
    settings = Settings(
        database_url=sqlite_url,
        log_json=False,
        devices_mqtt_url=persistent_mqtt_broker.url,
        devices_mqtt_username=HQ_USER,
        devices_mqtt_password=SecretStr(persistent_mqtt_broker.password(HQ_USER)),
        devices_mqtt_client_id=f"hq-{uuid.uuid4().hex[:8]}",
        devices_stale_after_s=STALE_AFTER_S,
    )
    office = build_head_office(settings)
    await office.start(relay=False, telemetry=True)
    await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
    try:
        yield office
    finally:
        await office.stop()


async def test_hq_marks_a_station_stale_while_the_broker_is_away_and_recovers(
    persistent_mqtt_broker: MqttBroker, office: HeadOffice
) -> None:
    broker = persistent_mqtt_broker
    subscriber = office.telemetry
    assert subscriber is not None
    seq = count(1)
    transport = httpx.ASGITransport(app=office.app)

    async def publish(kind: str, key: int | None, body: dict[str, Any]) -> None:
        async with broker.client(STATION) as edge:
            payload = encode(STATION, datetime.now(UTC), "boot-1", next(seq), body)
            await edge.publish(topic(DEFAULT_PREFIX, STATION, kind, key), payload, 1, True)

    staff = await staff_headers(office.identity)  # the devices reads, as an HQ admin
    async with httpx.AsyncClient(
        transport=transport, base_url="http://hq", headers=staff
    ) as client:

        async def station() -> Any:
            return (await client.get(f"/v1/devices/stations/{STATION}")).json()

        async def pump_state() -> str | None:
            response = await client.get(f"/v1/devices/stations/{STATION}/pumps/1")
            if response.status_code != 200:
                return None
            return response.json()["current"]["data"]["state"]  # type: ignore[no-any-return]

        # Given HQ logged in to the broker and the station's edge published a pump's state
        await eventually(subscriber.connected.wait, 10, what="HQ subscribed")
        await publish("status", None, {"online": True})
        await publish("pumps", 1, {"pump": 1, "state": "idle"})
        await eventually(pump_state, 10, what="the pump at HQ")

        # When the broker goes away
        await asyncio.to_thread(broker.stop)

        # Then HQ sees it is disconnected and, with nothing arriving, marks the station stale
        await eventually(lambda: not subscriber.connected.is_set(), 10, what="disconnected")

        async def stale_alarm() -> bool:
            s = await station()
            return s["stale"] and "telemetry_stale" in [a["name"] for a in s["active_alarms"]]

        await eventually(stale_alarm, 10, what="the station stale, with an alarm")

        # When the broker is back and the edge publishes again
        await asyncio.to_thread(broker.start)
        await eventually(lambda: subscriber.connects >= 2, 15, what="HQ reconnected")
        await publish("pumps", 1, {"pump": 1, "state": "fuelling"})

        # Then HQ shows the new state and the stale alarm was cleared, without a crash
        async def fuelling() -> bool:
            return await pump_state() == "fuelling"

        await eventually(fuelling, 10, what="the new state")
        alarms = (await client.get(f"/v1/devices/stations/{STATION}/alarms")).json()
        transitions = [(e["name"], e["active"]) for e in alarms["recent"]]
        assert ("telemetry_stale", False) in transitions
        assert subscriber.restarts == 0
