"""Edges of HQ's devices context that hand mutation testing found unpinned, on SQLite and
PostgreSQL: two boots at one instant, the exact stale threshold, stations without a status,
zero-padded pump topics, device lines named in the body, retained messages and last_seen,
alarm transitions and their instants, and a station whose only message was discarded.
The subscriber's own reading of its URL and of the retained flag comes last."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt
import pytest

from forecourt.bootstrap import build_head_office
from forecourt.devices.contracts import StationSummary
from forecourt.devices.handlers import DevicesService, Received
from forecourt.devices.store import reading
from forecourt.devices.subscriber import TelemetrySubscriber
from forecourt.infra.db import Database
from forecourt.kernel.telemetry import DEFAULT_PREFIX, encode, topic
from forecourt.network.handlers import SAMPLE_CHAIN, import_chain, load_chain_file
from forecourt.settings import Settings
from tests.conftest import _port_open, service_missing
from tests.devices.conftest import STALE_AFTER_S, START, DevicesHq, Edge
from tests.support import eventually

STATIONS = "/v1/devices/stations"
US = timedelta(microseconds=1)


def instant(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


async def summary(hq: DevicesHq, station: str = "S001") -> dict[str, Any]:
    [found] = [s for s in await hq.get(STATIONS) if s["station"] == station]
    return found


# --- ordering and staleness ---------------------------------------------------------------


async def test_two_boots_stamped_at_the_same_instant_end_in_the_same_state_in_either_order(
    hq: DevicesHq,
) -> None:
    # Given two processes of S001's edge whose messages carry the same instant
    a, b = Edge("S001", boot="boot-a"), Edge("S001", boot="boot-b")
    # When pump 1 hears boot-a then boot-b, and pump 2 the same two the other way round
    await hq.ingest(a.pump(1, "idle", seq=7), b.pump(1, "calling", seq=1))
    await hq.ingest(b.pump(2, "calling", seq=2), a.pump(2, "idle", seq=8))
    # Then both end with the greater boot's state: every reader agrees whatever came first
    for pump in (1, 2):
        current = (await hq.get(f"{STATIONS}/S001/pumps/{pump}"))["current"]
        assert (current["boot"], current["data"]["state"]) == ("boot-b", "calling"), pump


async def test_a_station_is_live_up_to_exactly_stale_after_and_stale_just_past_it(
    hq: DevicesHq,
) -> None:
    # Given S001 online and reporting at START
    edge = Edge("S001")
    await hq.ingest(edge.status(True), edge.pump(1, "idle"))
    # When exactly devices_stale_after_s passes without a message
    hq.clock.advance(STALE_AFTER_S)
    # Then it is still live, and the sweep raises nothing
    assert (await summary(hq))["stale"] is False
    assert await hq.devices.sweep() == 0
    # When a microsecond more passes
    hq.clock.advance(US)
    # Then it is stale
    assert (await summary(hq))["stale"] is True
    assert await hq.devices.sweep() == 1


async def test_a_station_that_reports_without_ever_sending_a_status_is_live(
    hq: DevicesHq,
) -> None:
    # Given S001 whose status message never arrived (online unknown) but whose pumps report
    await hq.ingest(Edge("S001").pump(1, "idle"))
    # When the chain and the station are read
    listed = await summary(hq)
    station = await hq.get(f"{STATIONS}/S001")
    # Then it is live: only an offline link or silence makes telemetry stale
    assert (listed["online"], listed["stale"]) == (None, False)
    assert (station["online"], station["stale"]) == (None, False)
    assert await hq.devices.sweep() == 0
    assert station["active_alarms"] == []


# --- what a message is about ----------------------------------------------------------------


async def test_a_pump_topic_with_leading_zeros_is_the_same_pump(hq: DevicesHq) -> None:
    # Given pump 7 reported on the topic "pumps/007"
    edge = Edge("S001")
    padded = await hq.ingest(edge.message("pumps", "007", {"pump": 7, "state": "idle"}))
    # When it reports again on "pumps/7"
    await hq.ingest(edge.message("pumps", 7, {"pump": 7, "state": "calling"}))
    # Then both are pump 7: accepted, one current state, one history
    assert (padded.accepted, dict(padded.discarded)) == (1, {})
    station = await hq.get(f"{STATIONS}/S001")
    assert [p["key"] for p in station["pumps"]] == ["7"]
    pump = await hq.get(f"{STATIONS}/S001/pumps/7")
    assert pump["current"]["data"]["state"] == "calling"
    assert [h["data"]["state"] for h in pump["history"]] == ["calling", "idle"]


async def test_a_device_line_payload_naming_another_line_is_discarded(hq: DevicesHq) -> None:
    # Given S001's device line pts-1
    edge = Edge("S001")
    body = {"device": "pts-2", "protocol": "jsonpts", "state": "online"}
    # When a message on pts-1's topic says it is about pts-2
    outcome = await hq.ingest(edge.message("devices", "pts-1", body))
    # Then it is discarded as a bad body and neither line gets a state
    assert outcome.discarded == {"bad_body": 1}
    station = await hq.get(f"{STATIONS}/S001")
    assert station["devices"] == []
    assert station["recent_discards"][0]["reason"] == "bad_body"


# --- retained messages and last_seen ----------------------------------------------------------


async def test_a_retained_message_counts_as_seen_when_it_was_stamped_not_when_it_arrived(
    hq: DevicesHq,
) -> None:
    # Given a retained status S001 published two stale periods ago, delivered on subscribing
    stamped = START - timedelta(seconds=2 * STALE_AFTER_S)
    old = dataclasses.replace(Edge("S001").status(True, at=stamped), retained=True)
    # When HQ applies it now
    assert (await hq.ingest(old)).accepted == 1
    # Then the station was last seen when the message was stamped, and so is stale already
    listed = await summary(hq)
    assert instant(listed["last_seen"]) == stamped
    assert listed["stale"] is True


async def test_an_older_retained_message_never_moves_last_seen_back(hq: DevicesHq) -> None:
    # Given S001 reporting live at START
    edge = Edge("S001")
    await hq.ingest(edge.pump(1, "idle"))
    # When, 10 s later, a retained tank reading stamped an hour ago is delivered
    hq.clock.advance(10)
    old = edge.tank(1, 100, at=START - timedelta(hours=1))
    await hq.ingest(dataclasses.replace(old, retained=True))
    # Then last_seen stays at the live message, and the station stays live
    listed = await summary(hq)
    assert instant(listed["last_seen"]) == START
    assert listed["stale"] is False


# --- alarms ------------------------------------------------------------------------------------


async def test_repeated_discards_raise_the_discard_alarm_once(hq: DevicesHq) -> None:
    # Given S001 reporting
    edge = Edge("S001")
    pump_topic = topic(DEFAULT_PREFIX, "S001", "pumps", 1)
    await hq.ingest(edge.pump(1, "idle"))
    # When junk arrives on its topic three times, in separate batches
    for _ in range(3):
        hq.clock.advance(1)
        await hq.ingest(Received(pump_topic, b"junk"))
    # Then every discard is recorded, but telemetry_discarded was raised once
    alarms = await hq.get(f"{STATIONS}/S001/alarms")
    raised = [e for e in alarms["recent"] if e["name"] == "telemetry_discarded"]
    assert [e["active"] for e in raised] == [True]
    assert (await hq.get(f"{STATIONS}/S001"))["discards"] == 3


async def test_an_edge_alarm_told_again_while_active_keeps_when_it_was_raised(
    hq: DevicesHq,
) -> None:
    # Given an edge alarm raised at START
    edge = Edge("S001")
    await hq.ingest(edge.alarm("tank_low", True))
    # When the edge tells it again, still active, 10 s later with a new message
    later = START + timedelta(seconds=10)
    body = {"name": "tank_low", "active": True, "message": "lower still", "details": {}}
    await hq.ingest(edge.message("alarms", None, body, at=later))
    # Then it shows the new message but was raised at START all along
    [alarm] = (await hq.get(f"{STATIONS}/S001/alarms"))["active"]
    assert alarm["message"] == "lower still"
    assert instant(alarm["raised_at"]) == START
    assert instant(alarm["updated_at"]) == later


async def test_a_cleared_alarm_keeps_on_record_when_it_was_raised(hq: DevicesHq) -> None:
    # Given an edge alarm raised at START
    edge = Edge("S001")
    await hq.ingest(edge.alarm("tank_low", True))
    # When it is cleared 10 s later
    cleared = START + timedelta(seconds=10)
    await hq.ingest(edge.alarm("tank_low", False, at=cleared))
    # Then the stored alarm is inactive with both instants: raised at START, cleared after
    async with reading(hq.devices.db) as store:
        row = (await store.alarms_of(["S001"]))[("S001", "edge", "tank_low")]
    assert row.active is False
    assert (row.raised_at, row.cleared_at) == (START, cleared)


async def test_a_station_whose_only_message_was_discarded_is_recorded_but_not_stale(
    hq: DevicesHq,
) -> None:
    # Given S002, which is in the network and never sent valid telemetry
    junk = Received(topic(DEFAULT_PREFIX, "S002", "pumps", 1), b"junk")
    # When a broken message arrives on its topic
    outcome = await hq.ingest(junk)
    # Then the discard is recorded and alarmed, and no staleness is raised for it
    assert outcome.discarded == {"malformed": 1}
    station = await hq.get(f"{STATIONS}/S002")
    assert station["discards"] == 1
    assert [a["name"] for a in station["active_alarms"]] == ["telemetry_discarded"]
    assert await hq.devices.sweep() == 0


async def test_the_discard_alarm_stays_raised_through_the_quiet_period(hq: DevicesHq) -> None:
    # Given S001 reporting, and a discard
    edge = Edge("S001")
    await hq.ingest(edge.pump(1, "idle"), Received(topic(DEFAULT_PREFIX, "S001", "pumps", 1), b"x"))

    async def discard_alarm() -> bool:
        station = await hq.get(f"{STATIONS}/S001")
        return "telemetry_discarded" in [a["name"] for a in station["active_alarms"]]

    # When sweeps run before devices_stale_after_s has passed without a discard
    assert await hq.devices.sweep() == 0
    hq.clock.advance(STALE_AFTER_S)
    await hq.ingest(edge.pump(1, "calling"))  # the station stays live
    await hq.devices.sweep()
    # Then the alarm is still raised
    assert await discard_alarm()
    # When one microsecond more has passed
    hq.clock.advance(US)
    await hq.devices.sweep()
    # Then it is cleared
    assert not await discard_alarm()


# --- the subscriber -----------------------------------------------------------------------------


def test_the_subscriber_takes_its_login_from_the_url_unless_settings_give_one() -> None:
    # Given HQ's devices service (not connected: nothing here touches the database)
    db = Database("sqlite+aiosqlite:///:memory:")
    service = DevicesService(
        db, prefix=DEFAULT_PREFIX, stale_after=timedelta(seconds=60), history_limit=5
    )
    url = "mqtt://hq:s%40cret@127.0.0.1:1883"
    # When a subscriber is made from a URL carrying a login
    from_url = TelemetrySubscriber(service, url, client_id="hq-test")
    # Then it logs in with that user and the decoded password
    assert (from_url.username, from_url.password) == ("hq", "s@cret")
    # And credentials of its own settings win over the URL's
    given = TelemetrySubscriber(service, url, client_id="hq-test", username="u", password="p")
    assert (given.username, given.password) == ("u", "p")


BROKER = "mqtt://127.0.0.1:1883"


@pytest.fixture
async def retained_prefix() -> AsyncIterator[str]:
    """A topic prefix of its own on the shared broker at 127.0.0.1:1883, cleared at the end."""
    if not _port_open(BROKER.replace("mqtt://", "tcp://"), 1883):
        service_missing(f"Mosquitto not reachable at {BROKER}")
    prefix = f"test/{uuid.uuid4()}/forecourt/v1"
    yield prefix
    async with aiomqtt.Client("127.0.0.1", 1883) as client:
        await client.publish(topic(prefix, "S001", "status"), b"", qos=1, retain=True)


async def test_a_retained_status_hq_finds_on_subscribing_is_dated_by_its_stamp(
    retained_prefix: str, sqlite_url: str
) -> None:
    # Given S001's retained status on the broker, stamped two hours ago (the edge went quiet)
    stamped = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    payload = encode("S001", stamped, "boot-1", 1, {"online": True, "software": "forecourt"})
    async with aiomqtt.Client("127.0.0.1", 1883) as edge:
        await edge.publish(topic(retained_prefix, "S001", "status"), payload, qos=1, retain=True)
    # When HQ starts and subscribes
    settings = Settings(
        database_url=sqlite_url,
        log_json=False,
        devices_mqtt_url=BROKER,
        devices_mqtt_client_id=f"forecourt-hq-test-{uuid.uuid4().hex[:12]}",
        devices_telemetry_prefix=retained_prefix,
    )
    office = build_head_office(settings)
    await office.start(relay=False, telemetry=False)
    try:
        await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))  # S001 is known first
        assert office.devices is not None
        assert office.telemetry is not None
        devices = office.devices
        office.telemetry.start()

        async def s001() -> StationSummary | None:
            return next((s for s in await devices.list_stations() if s.station == "S001"), None)

        # Then the station is known, last seen when the status was stamped, and stale
        station: StationSummary | None = await eventually(s001, 10, what="the status at HQ")
        assert isinstance(station, StationSummary)
        assert station.last_seen == stamped
        assert station.stale is True
        assert station.online is True
    finally:
        await office.stop()
        async with aiomqtt.Client(
            "127.0.0.1", 1883, identifier=settings.devices_mqtt_client_id, clean_session=True
        ):
            pass
