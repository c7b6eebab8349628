"""HQ's telemetry subscriber over a real Mosquitto (127.0.0.1:1883): what an edge publishes
with the wire format shows in the devices API; messages published while HQ was away arrive
when it is back (persistent session, QoS 1); a dropped connection is re-established; bad
payloads are survived. Each test has a topic prefix and a client id of its own."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import httpx
import pytest

from forecourt.bootstrap import HeadOffice, build_head_office
from forecourt.devices.subscriber import TelemetrySubscriber
from forecourt.kernel.telemetry import encode, topic
from forecourt.network.handlers import SAMPLE_CHAIN, import_chain, load_chain_file
from forecourt.settings import Settings
from tests.conftest import _port_open, service_missing
from tests.support import eventually, staff_headers

BROKER = "mqtt://127.0.0.1:1883"
STATION = "S001"


@dataclass
class Rig:
    office: HeadOffice
    client: httpx.AsyncClient
    prefix: str
    publisher: aiomqtt.Client
    published: set[str]
    boot: str = "boot-1"
    seq: int = 0

    @property
    def subscriber(self) -> TelemetrySubscriber:
        assert self.office.telemetry is not None
        return self.office.telemetry

    async def publish(
        self, kind: str, key: str | int | None, body: dict[str, Any], *, station: str = STATION
    ) -> None:
        self.seq += 1
        name = topic(self.prefix, STATION, kind, key)
        payload = encode(station, datetime.now(UTC), self.boot, self.seq, body)
        retain = kind != "alarms"
        await self.publisher.publish(name, payload, qos=1, retain=retain)
        if retain:
            self.published.add(name)

    async def get(self, path: str) -> Any:
        response = await self.client.get(path)
        return response.json() if response.status_code == 200 else None


@pytest.fixture
def broker() -> str:
    if not _port_open(BROKER.replace("mqtt://", "tcp://"), 1883):
        service_missing(f"Mosquitto not reachable at {BROKER}")
    return BROKER


@pytest.fixture
async def rig(broker: str, sqlite_url: str) -> AsyncIterator[Rig]:
    prefix = f"test/{uuid.uuid4()}/forecourt/v1"
    client_id = f"forecourt-hq-test-{uuid.uuid4().hex[:12]}"
    settings = Settings(
        database_url=sqlite_url,
        log_json=False,
        devices_mqtt_url=broker,
        devices_mqtt_client_id=client_id,
        devices_telemetry_prefix=prefix,
    )
    office = build_head_office(settings)
    await office.start(relay=False, telemetry=True)
    await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
    assert office.telemetry is not None
    await eventually(office.telemetry.connected.wait, 10, what="HQ subscribed")
    published: set[str] = set()
    transport = httpx.ASGITransport(app=office.app)
    staff = await staff_headers(office.identity)  # the devices reads, as an HQ admin
    try:
        async with (
            aiomqtt.Client("127.0.0.1", 1883, identifier=f"edge-{client_id}") as publisher,
            httpx.AsyncClient(transport=transport, base_url="http://hq", headers=staff) as client,
        ):
            yield Rig(office, client, prefix, publisher, published)
            for name in published:  # leave no retained message on the shared broker
                await publisher.publish(name, b"", qos=1, retain=True)
    finally:
        await office.stop()
        # and no persistent session: connect once with a clean one under HQ's client id
        async with aiomqtt.Client("127.0.0.1", 1883, identifier=client_id, clean_session=True):
            pass


async def test_telemetry_published_through_the_broker_shows_in_the_devices_api(rig: Rig) -> None:
    # Given HQ subscribed to the broker
    # When the station's edge publishes its status, a pump and a tank
    await rig.publish("status", None, {"online": True, "software": "forecourt"})
    await rig.publish("pumps", 1, {"pump": 1, "state": "fuelling", "volume_ml": 1200})
    await rig.publish("tanks", 1, {"tank": 1, "volume_ml": 9_000_000})

    # Then the devices API shows them
    async def shown() -> Any:
        tank = await rig.get(f"/v1/devices/stations/{STATION}/tanks/1")
        return tank if tank and tank["current"]["data"]["volume_ml"] == 9_000_000 else None

    await eventually(shown, 10, what="the tank at HQ")
    station = await rig.get(f"/v1/devices/stations/{STATION}")
    assert station["online"] is True
    assert station["stale"] is False
    assert station["pumps"][0]["current"]["data"]["state"] == "fuelling"


async def test_bad_and_spoofed_payloads_are_survived_and_counted(rig: Rig) -> None:
    # Given HQ subscribed to the broker
    # When junk, a spoofed message and then a valid one arrive over the broker
    await rig.publisher.publish(topic(rig.prefix, STATION, "alarms"), b"\x00junk", qos=1)
    await rig.publish("alarms", None, {"name": "x", "active": True}, station="S002")
    await rig.publish("pumps", 2, {"pump": 2, "state": "idle"})

    # Then the valid one is applied, and the two others discarded with their reasons
    await eventually(
        lambda: rig.get(f"/v1/devices/stations/{STATION}/pumps/2"), 10, what="pump 2 at HQ"
    )
    station = await rig.get(f"/v1/devices/stations/{STATION}")
    assert sorted(d["reason"] for d in station["recent_discards"]) == ["malformed", "spoofed"]
    assert rig.subscriber.running
    registry = rig.office.registry
    assert registry.get_sample_value(
        "forecourt_devices_telemetry_discarded_total", {"reason": "spoofed"}
    )


async def test_what_was_published_while_hq_was_away_arrives_when_it_is_back(rig: Rig) -> None:
    # Given HQ had subscribed once (the broker keeps its session), then stopped
    await rig.subscriber.stop()
    # When the edge raises an alarm (not retained: only the session can keep it for HQ)
    await rig.publish("alarms", None, {"name": "tank_low", "active": True, "message": "low"})
    # And HQ's subscriber starts again
    rig.subscriber.start()

    # Then the alarm is delivered and shown
    async def raised() -> Any:
        alarms = await rig.get(f"/v1/devices/stations/{STATION}/alarms")
        return alarms and [a["name"] for a in alarms["active"]] == ["tank_low"]

    await eventually(raised, 10, what="the alarm published while HQ was away")


async def test_the_subscriber_reconnects_after_its_connection_drops(rig: Rig) -> None:
    # Given HQ connected once
    assert rig.subscriber.connects == 1
    # When its connection to the broker breaks under it
    await rig.subscriber.drop_connection()
    # Then it connects again by itself
    await eventually(lambda: rig.subscriber.connects >= 2, 10, what="a reconnect")
    await eventually(rig.subscriber.connected.is_set, 10, what="connected again")
    # And what the edge publishes then is applied
    await rig.publish("pumps", 3, {"pump": 3, "state": "calling"})
    await eventually(
        lambda: rig.get(f"/v1/devices/stations/{STATION}/pumps/3"), 10, what="pump 3 at HQ"
    )
    assert rig.subscriber.restarts == 0  # survived inside run(), no crash


async def test_hq_acknowledges_what_it_applied_so_the_broker_keeps_sending(rig: Rig) -> None:
    # Given the broker lets only a few unacknowledged QoS 1 messages be in flight to HQ
    # When the edge raises more alarms than that, one after the other
    names = [f"alarm_{i:02d}" for i in range(60)]
    for name in names:
        await rig.publish("alarms", None, {"name": name, "active": True})

    # Then every one arrives: HQ acknowledges each batch once it is committed
    async def all_active() -> bool:
        alarms = await rig.get(f"/v1/devices/stations/{STATION}/alarms?limit=1000")
        return bool(alarms) and len(alarms["active"]) == len(names)

    await eventually(all_active, 15, what="every alarm at HQ")
    assert rig.subscriber.connects == 1  # without a reconnect (which would resend)
