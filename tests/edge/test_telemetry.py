"""The edge's telemetry publisher against a real, private Mosquitto: QoS 1 and retained last
states, the last will, buffering while the broker is away, credentials and the ACL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from structlog.testing import capture_logs

from forecourt.edge.telemetry import (
    FilterRules,
    TelemetryPublisher,
    telemetry_from_settings,
)
from forecourt.infra.mqtt import BrokerAddress
from forecourt.kernel.clock import SystemClock
from forecourt.kernel.errors import InvalidValue
from forecourt.kernel.telemetry import Message, decode, parse_topic, subscription, topic
from forecourt.protocols.model import (
    DeviceHealth,
    DeviceHealthState,
    FillingProgress,
    HealthChanged,
    PumpState,
    PumpStatus,
    PumpStatusChanged,
    TankMeasured,
    TankMeasurement,
)
from forecourt.settings import EdgeSettings, SettingsInvalid, load_settings
from tests.mqtt_broker import MqttBroker, mqtt_broker, persistent_mqtt_broker
from tests.support import eventually

__all__ = ["mqtt_broker", "persistent_mqtt_broker"]  # fixtures, imported for pytest

PREFIX = "forecourt/v1"
CREDENTIAL = "a-station-credential-of-32-chars"
FAST = {"reconnect_initial_s": 0.05, "reconnect_max_s": 0.3, "stop_timeout_s": 2.0}


def topic_of(station: str, kind: str, key: str | int | None = None) -> str:
    base = f"{PREFIX}/stations/{station}/{kind}"
    return base if key is None else f"{base}/{key}"


class Received:
    """What an HQ subscriber got, decoded with the wire format (a spoofed or broken message
    fails the test)."""

    def __init__(self) -> None:
        self.messages: list[tuple[aiomqtt.Message, Message]] = []

    def add(self, raw: aiomqtt.Message) -> None:
        name = str(raw.topic)
        station = parse_topic(PREFIX, name).station
        assert isinstance(raw.payload, bytes)
        self.messages.append((raw, decode(raw.payload, station)))

    def on(self, name: str) -> list[Message]:
        return [m for raw, m in self.messages if str(raw.topic) == name]

    def raw(self, name: str) -> list[aiomqtt.Message]:
        return [raw for raw, _ in self.messages if str(raw.topic) == name]

    def topics(self) -> set[str]:
        return {str(raw.topic) for raw, _ in self.messages}


@contextlib.asynccontextmanager
async def hq_subscriber(
    broker: MqttBroker, *, resume: str | None = None
) -> AsyncIterator[Received]:
    """HQ's user subscribed to every station (QoS 1) while the block runs; ``resume``: the
    identifier of a :func:`persistent_hq_session` to take up again (what waited for it)."""
    received = Received()
    async with broker.client(
        "hq", identifier=resume, clean_session=False if resume else None
    ) as client:
        if resume is None:
            # (subscribing again would also deliver the retained messages a second time)
            await client.subscribe(subscription(PREFIX), qos=1)

        async def collect() -> None:
            async for raw in client.messages:
                received.add(raw)

        task = asyncio.create_task(collect())
        try:
            yield received
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


async def persistent_hq_session(broker: MqttBroker, identifier: str) -> None:
    """Leave a persistent HQ session subscribed to every station: QoS 1 messages published
    while HQ is away (or the broker restarts, with persistence) wait for it."""
    async with broker.client("hq", identifier=identifier, clean_session=False) as client:
        await client.subscribe(subscription(PREFIX), qos=1)


@pytest.fixture
async def publishers() -> AsyncIterator[Callable[..., TelemetryPublisher]]:
    """Make started publishers; every one is stopped at the end."""
    made: list[TelemetryPublisher] = []

    def make(
        broker: MqttBroker,
        station: str = "S001",
        *,
        username: str | None = None,
        password: str | None = None,
        **options: Any,
    ) -> TelemetryPublisher:
        user = username or station
        publisher = TelemetryPublisher(
            station,
            broker.url,
            username=user,
            password=broker.password(user) if password is None else password,
            clock=SystemClock(),
            **(FAST | options),
        )
        publisher.start()
        made.append(publisher)
        return publisher

    yield make
    for publisher in made:
        await publisher.stop()


def idle(pump: int = 1) -> PumpStatus:
    return PumpStatus(pump, PumpState.IDLE)


def fuelling(volume_ml: int, pump: int = 1) -> PumpStatus:
    return PumpStatus(
        pump,
        PumpState.FUELLING,
        nozzle=1,
        volume_ml=volume_ml,
        amount_minor=volume_ml * 2,
        unit_price_mmu=2_000_000,
        transaction=41,
    )


def ended(volume_ml: int, pump: int = 1) -> PumpStatus:
    return PumpStatus(
        pump,
        PumpState.END_OF_TRANSACTION,
        nozzle=1,
        volume_ml=volume_ml,
        amount_minor=volume_ml * 2,
        unit_price_mmu=2_000_000,
        transaction=41,
    )


def reading(volume_ml: int, tank: int = 1) -> TankMeasurement:
    return TankMeasurement(
        tank=tank,
        measured_at=datetime(2026, 3, 2, 7, 0, tzinfo=UTC),
        volume_ml=volume_ml,
        tc_volume_ml=volume_ml - 1000,
        ullage_ml=30_000_000 - volume_ml,
        product_height_um=1_200_000,
        water_height_um=0,
        temperature_mdegc=14_500,
        water_volume_ml=0,
        product_code="1",
    )


async def settled(publisher: TelemetryPublisher, published: int | None = None) -> None:
    """Everything fed has been acknowledged by the broker (and ``published`` in all)."""
    await eventually(
        lambda: (
            publisher.stats.connected
            and publisher.pending == 0
            and (published is None or publisher.stats.published >= published)
        ),
        10,
        what="the publisher to send everything",
    )


# --- QoS 1, retained last states, change-only -----------------------------------------------


async def test_a_subscriber_that_connects_later_gets_each_last_state_retained_with_qos_1(
    mqtt_broker: MqttBroker, publishers: Callable[..., TelemetryPublisher]
) -> None:
    # Given an edge that published a pump's sale, a tank, a device line's health and an alarm
    publisher = publishers(mqtt_broker)
    publisher.pump("line1", fuelling(1500), "EUR")
    await settled(publisher)
    publisher.pump("line1", ended(2000), "EUR")
    publisher.tank("tls1", reading(20_000_000))
    health = DeviceHealth("line1", DeviceHealthState.DEGRADED, reason="bad_crc")
    publisher.device_health("line1", "dart", health)
    publisher.report_alarm(
        "gauge_unreachable", True, "a tank gauge does not answer", datetime.now(UTC)
    )
    await settled(publisher, published=6)  # online, 2 pump states, tank, device, alarm
    # When HQ subscribes afterwards
    async with hq_subscriber(mqtt_broker) as hq:
        await eventually(lambda: len(hq.topics()) == 4, 5, what="the retained states")
        # Then it gets the last state of each, retained, at QoS 1, and no alarm (not retained)
        [pump] = hq.on(topic_of("S001", "pumps", 1))
        assert pump.body == {
            "pump": 1,
            "device": "line1",
            "state": "end_of_transaction",
            "nozzle": 1,
            "volume_ml": 2000,
            "amount_minor": 4000,
            "currency": "EUR",
            "unit_price_mmu": 2_000_000,
            "transaction": 41,
            "error": None,
        }
        [tank] = hq.on(topic_of("S001", "tanks", 1))
        assert tank.body["volume_ml"] == 20_000_000
        assert tank.body["measured_at"] == "2026-03-02T07:00:00+00:00"
        assert tank.body["status"] == []
        [device] = hq.on(topic_of("S001", "devices", "line1"))
        assert device.body == {
            "device": "line1",
            "protocol": "dart",
            "state": "degraded",
            "detail": "bad_crc",
        }
        [status] = hq.on(topic_of("S001", "status"))
        assert status.body["online"] is True
        assert hq.on(topic_of("S001", "alarms")) == []
        assert all(raw.retain and raw.qos == 1 for raw, _ in hq.messages)
        assert {m.boot for _, m in hq.messages} == {publisher.boot}
        assert pump.seq > status.seq


async def test_states_go_out_only_when_they_change_and_the_latest_wins(
    mqtt_broker: MqttBroker, publishers: Callable[..., TelemetryPublisher]
) -> None:
    # Given HQ subscribed, and an edge with a long interval (only the deadband lets progress out)
    async with hq_subscriber(mqtt_broker) as hq:
        publisher = publishers(mqtt_broker, rules=FilterRules(pump_interval_s=3600))
        pump_topic = topic_of("S001", "pumps", 1)
        # When the same idle state is reported at every poll
        for _ in range(20):
            publisher.pump("line1", idle(), "EUR")
            await settled(publisher)
        # And the pump fuels 100 ml per poll, each poll given time to go out
        for volume in range(0, 2600, 100):
            publisher.pump("line1", fuelling(volume), "EUR")
            await settled(publisher)
        # And then reports 50 polls in a burst, faster than anything can be sent
        for volume in range(2600, 7600, 100):
            publisher.pump("line1", fuelling(volume), "EUR")
        publisher.pump("line1", ended(7600), "EUR")
        await settled(publisher)
        # Then HQ got idle once, the progress per litre, and of the burst only the last state
        await eventually(
            lambda: hq.on(pump_topic) and hq.on(pump_topic)[-1].body["state"] != "fuelling",
            5,
            what="the end of the transaction",
        )
        seen = [(m.body["state"], m.body["volume_ml"]) for m in hq.on(pump_topic)]
        assert seen == [
            ("idle", None),
            ("fuelling", 0),
            ("fuelling", 1000),
            ("fuelling", 2000),
            ("end_of_transaction", 7600),
        ]
        seqs = [m.seq for m in hq.on(pump_topic)]
        assert seqs == sorted(seqs)
        assert publisher.stats.suppressed > 60


async def test_driver_events_are_published_through_the_same_rules(
    mqtt_broker: MqttBroker, publishers: Callable[..., TelemetryPublisher]
) -> None:
    # Given HQ subscribed and an edge whose driver sink also feeds telemetry
    async with hq_subscriber(mqtt_broker) as hq:
        publisher = publishers(mqtt_broker, rules=FilterRules(pump_deadband_ml=1))
        status = PumpStatus(2, PumpState.AUTHORISED, nozzle=3, unit_price_mmu=1_900_000)
        # When the driver reports a state, filling progress, a tank reading and its health
        for event in (
            PumpStatusChanged("line1", status),
            FillingProgress("line1", 2, None, 500, 950),
            TankMeasured("tls1", reading(10_000_000, tank=3)),
            HealthChanged("line1", DeviceHealth("line1", DeviceHealthState.ONLINE)),
        ):
            publisher.device_event(event, protocol="jsonpts", currency="EUR")
            await settled(publisher)
        # Then each is on its topic; the progress keeps the nozzle and price of the state
        await eventually(lambda: len(hq.topics()) == 4, 5, what="every topic")
        progress = hq.on(topic_of("S001", "pumps", 2))[-1].body
        assert progress["state"] == "fuelling"
        assert (progress["nozzle"], progress["volume_ml"], progress["unit_price_mmu"]) == (
            3,
            500,
            1_900_000,
        )
        assert hq.on(topic_of("S001", "tanks", 3))[-1].body["volume_ml"] == 10_000_000
        assert hq.on(topic_of("S001", "devices", "line1"))[-1].body["protocol"] == "jsonpts"


# --- never blocking, buffering, reconnecting -----------------------------------------------


def time_feeds(publisher: TelemetryPublisher, pumps: int, rounds: int) -> float:
    started = time.perf_counter()
    for volume in range(rounds):
        for pump in range(1, pumps + 1):
            publisher.pump("line1", fuelling(volume * 10, pump), "EUR")
    return time.perf_counter() - started


async def test_with_the_broker_never_up_feeds_neither_block_nor_raise_and_arrive_once_it_is(
    persistent_mqtt_broker: MqttBroker, publishers: Callable[..., TelemetryPublisher]
) -> None:
    broker = persistent_mqtt_broker
    # Given HQ's persistent session, and a broker that is down when the edge starts
    await persistent_hq_session(broker, "hq-never-up")
    broker.stop()
    publisher = publishers(broker, alarm_buffer=5)
    await eventually(lambda: publisher.stats.attempts >= 2, 5, what="a retry")
    # When the edge feeds 32 pumps × 50 polls and 8 alarms while the broker is away
    spent = time_feeds(publisher, pumps=32, rounds=50)
    for pump in range(1, 33):
        publisher.pump("line1", ended(7000 + pump, pump), "EUR")
    for n in range(8):
        publisher.report_alarm(f"alarm_{n}", True, f"alarm {n}", datetime.now(UTC))
    # Then no call blocked or raised, the buffer holds one state per pump and the newest
    # alarms (the oldest dropped and counted), and the status says why nothing goes out
    assert spent < 1.0
    assert publisher.pending == 32 + 5
    assert publisher.stats.dropped == 3
    assert publisher.stats.rejected == 0
    assert not publisher.stats.connected
    assert publisher.stats.last_error
    assert publisher.as_json()["connected"] is False
    # When the broker comes up and HQ reconnects
    broker.start()
    await settled(publisher)
    async with hq_subscriber(broker, resume="hq-never-up") as hq:
        # Then HQ gets every pump's last state and the buffered alarms, in order
        await eventually(
            lambda: (
                len(hq.on(topic_of("S001", "alarms"))) == 5
                and all(hq.on(topic_of("S001", "pumps", p)) for p in range(1, 33))
            ),
            5,
            what="the buffered telemetry",
        )
        for pump in range(1, 33):
            [state] = hq.on(topic_of("S001", "pumps", pump))
            assert (state.body["state"], state.body["volume_ml"]) == (
                "end_of_transaction",
                7000 + pump,
            )
        names = [m.body["name"] for m in hq.on(topic_of("S001", "alarms"))]
        assert names == [f"alarm_{n}" for n in range(3, 8)]


async def test_a_broker_that_restarts_mid_run_gets_what_was_fed_while_it_was_away(
    persistent_mqtt_broker: MqttBroker, publishers: Callable[..., TelemetryPublisher]
) -> None:
    broker = persistent_mqtt_broker
    # Given an edge connected and HQ's persistent session
    await persistent_hq_session(broker, "hq-restart")
    publisher = publishers(broker)
    publisher.pump("line1", idle(), "EUR")
    await settled(publisher)
    # When the broker stops (saving HQ's session), and the pump fuels meanwhile
    broker.stop()
    await eventually(lambda: not publisher.stats.connected, 5, what="the loss noticed")
    for volume in range(0, 5000, 250):
        publisher.pump("line1", fuelling(volume), "EUR")
    publisher.pump("line1", ended(5000), "EUR")
    publisher.report_alarm("pump_error", True, "pump 1 in error", datetime.now(UTC))
    assert publisher.pending == 2
    # And the broker comes back
    broker.start()
    await settled(publisher)
    # Then the edge reconnected by itself, and HQ gets the sale's end and the alarm
    assert publisher.stats.connects == 2
    async with hq_subscriber(broker, resume="hq-restart") as hq:
        await eventually(
            lambda: hq.on(topic_of("S001", "alarms")), 5, what="the alarm after restart"
        )
        await eventually(
            lambda: any(
                m.body["state"] == "end_of_transaction" for m in hq.on(topic_of("S001", "pumps", 1))
            ),
            5,
            what="the pump's last state",
        )
        assert hq.on(topic_of("S001", "alarms"))[0].body["name"] == "pump_error"


async def test_a_broker_that_lost_its_retained_messages_gets_every_last_state_again(
    mqtt_broker: MqttBroker, publishers: Callable[..., TelemetryPublisher]
) -> None:
    # Given an edge that published three pumps and a tank (the broker keeps nothing on disk)
    publisher = publishers(mqtt_broker)
    for pump in (1, 2, 3):
        publisher.pump("line1", idle(pump), "EUR")
    publisher.tank("tls1", reading(12_000_000))
    await settled(publisher, published=5)
    # When the broker is killed (it says nothing) and started again, and the edge reconnects
    # with nothing new to say
    mqtt_broker.kill()
    mqtt_broker.start()
    await eventually(lambda: publisher.stats.connects == 2, 5, what="the reconnection")
    await settled(publisher)
    # Then a subscriber that connects now still finds every last state retained
    async with hq_subscriber(mqtt_broker) as hq:
        await eventually(lambda: len(hq.topics()) == 5, 5, what="the retained states")
        assert {m.body["pump"] for m in hq.on(topic_of("S001", "pumps", 2))} == {2}


# --- online, offline and the last will ---------------------------------------------------------

WILL_SCRIPT = """
import asyncio, os, sys
from forecourt.edge.telemetry import TelemetryPublisher
from forecourt.kernel.clock import SystemClock
from forecourt.protocols.model import PumpState, PumpStatus

async def main() -> None:
    station = os.environ["TELEMETRY_STATION"]
    publisher = TelemetryPublisher(
        station, os.environ["TELEMETRY_URL"], username=station,
        password=os.environ["TELEMETRY_PASSWORD"], clock=SystemClock(),
    )
    publisher.start()
    publisher.pump("line1", PumpStatus(1, PumpState.IDLE), "EUR")
    while publisher.stats.published < 2 or publisher.pending:
        await asyncio.sleep(0.01)
    print("BOOT", publisher.boot, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def announced_boot(stdout: asyncio.StreamReader) -> str:
    while line := (await stdout.readline()).decode():
        if line.startswith("BOOT "):
            return line.split()[1]
    raise AssertionError("the edge process ended before it was online")


@contextlib.contextmanager
def killed_at_the_end(process: asyncio.subprocess.Process) -> Iterator[None]:
    try:
        yield
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()


async def test_an_edge_killed_with_sigkill_is_marked_offline_by_its_last_will(
    mqtt_broker: MqttBroker,
) -> None:
    # Given HQ subscribed, and an edge process that is online and has published a pump
    async with hq_subscriber(mqtt_broker) as hq:
        env = os.environ | {
            "TELEMETRY_STATION": "S002",
            "TELEMETRY_URL": mqtt_broker.url,
            "TELEMETRY_PASSWORD": mqtt_broker.password("S002"),
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WILL_SCRIPT, env=env, stdout=asyncio.subprocess.PIPE
        )
        with killed_at_the_end(process):
            assert process.stdout is not None
            boot = await asyncio.wait_for(announced_boot(process.stdout), 15)
            status = topic_of("S002", "status")
            await eventually(lambda: hq.on(status), 5, what="online")
            assert hq.on(status)[0].body["online"] is True
            # When it is killed without a word
            process.send_signal(signal.SIGKILL)
            await process.wait()
            # Then the broker delivers its will: offline, from that boot, after its online
            await eventually(lambda: len(hq.on(status)) == 2, 5, what="the last will")
        online, will = hq.on(status)
        assert will.body == {"online": False, "software": online.body["software"]}
        assert will.boot == online.boot == boot
        assert will.seq > online.seq
        assert hq.raw(status)[1].qos == 1
    # And it is the retained status a later subscriber finds
    async with hq_subscriber(mqtt_broker) as later:
        await eventually(lambda: later.on(status), 5, what="the retained status")
        assert later.on(status)[0].body["online"] is False


async def test_a_clean_stop_publishes_offline_itself(
    mqtt_broker: MqttBroker, publishers: Callable[..., TelemetryPublisher]
) -> None:
    # Given HQ subscribed and an edge online
    async with hq_subscriber(mqtt_broker) as hq:
        publisher = publishers(mqtt_broker, "S003")
        await settled(publisher)
        # When the edge stops
        await publisher.stop()
        # Then HQ gets online then offline, newer, and the publisher says it is not connected
        status = topic_of("S003", "status")
        await eventually(lambda: len(hq.on(status)) == 2, 5, what="offline")
        online, offline = hq.on(status)
        assert (online.body["online"], offline.body["online"]) == (True, False)
        assert offline.seq > online.seq
        assert not publisher.stats.connected
        assert not publisher.running


async def test_stopping_an_edge_that_never_reached_the_broker_returns_at_once(
    mqtt_broker: MqttBroker,
) -> None:
    # Given an edge whose broker is down
    mqtt_broker.stop()
    publisher = TelemetryPublisher(
        "S001",
        mqtt_broker.url,
        username="S001",
        password=mqtt_broker.password("S001"),
        clock=SystemClock(),
        **FAST,
    )
    publisher.start()
    await eventually(lambda: publisher.stats.attempts >= 1, 5, what="an attempt")
    # When it stops, Then it does so without waiting for anything
    await asyncio.wait_for(publisher.stop(), 2)
    assert not publisher.running


# --- credentials and the ACL -------------------------------------------------------------------


async def test_a_station_publishing_for_another_station_does_not_reach_hq(
    mqtt_broker: MqttBroker, publishers: Callable[..., TelemetryPublisher]
) -> None:
    async with hq_subscriber(mqtt_broker) as hq:
        # Given an edge that claims to be S002 with S001's credentials
        spoof = publishers(mqtt_broker, "S002", username="S001", identifier="spoof")
        spoof.pump("line1", ended(99_000), "EUR")
        spoof.report_alarm("fake", True, "not from S002", datetime.now(UTC))
        # When the broker has acknowledged all of it, and S001 then publishes its own pump
        await settled(spoof, published=3)
        honest = publishers(mqtt_broker, "S001")
        honest.pump("line1", idle(), "EUR")
        await eventually(
            lambda: hq.on(topic_of("S001", "pumps", 1)), 5, what="S001's own telemetry"
        )
        # Then HQ got nothing on S002's topics: the ACL dropped it
        assert not [t for t in hq.topics() if "/S002/" in t]
        assert spoof.stats.connected


async def test_a_wrong_password_is_reported_once_and_retried_slowly(
    mqtt_broker: MqttBroker, publishers: Callable[..., TelemetryPublisher]
) -> None:
    with capture_logs() as logs:
        # Given an edge with a wrong password (refusals retried every 0.3 s here)
        publisher = publishers(mqtt_broker, password="not-the-password")
        started = time.monotonic()
        # When it has tried three times
        await eventually(lambda: publisher.stats.attempts >= 3, 5, what="three attempts")
        elapsed = time.monotonic() - started
    # Then its status says the broker refused it, with the reason
    status = publisher.as_json()
    assert status["connected"] is False
    assert status["refused"] is True
    assert "refused" in status["last_error"]
    assert "authori" in status["last_error"].lower()
    # And the refusal was logged once, and not retried in a tight loop
    refused = [e for e in logs if e["event"] == "edge.telemetry_broker_refused"]
    assert len(refused) == 1
    assert elapsed >= 2 * 0.3 * 0.99


# --- settings ----------------------------------------------------------------------------------


def edge_settings(**values: Any) -> EdgeSettings:
    return load_settings(EdgeSettings, station="S001", credential=CREDENTIAL, **values)


def test_without_a_broker_url_there_is_no_publisher() -> None:
    assert telemetry_from_settings(edge_settings(), SystemClock()) is None


async def test_the_publisher_from_settings_uses_the_station_and_its_credential_by_default(
    mqtt_broker: MqttBroker,
) -> None:
    settings = edge_settings(mqtt_url=mqtt_broker.url, telemetry_pump_deadband_ml=250)
    publisher = telemetry_from_settings(settings, SystemClock())
    assert publisher is not None
    assert publisher.username == "S001"
    assert publisher._password == CREDENTIAL
    assert publisher.broker == BrokerAddress("unix", str(mqtt_broker.socket_path))
    assert publisher.filter.rules.pump_deadband_ml == 250
    assert publisher.status_topic == topic_of("S001", "status")
    tls = telemetry_from_settings(
        edge_settings(mqtt_url="mqtts://broker.example", mqtt_username="edge-s001"), SystemClock()
    )
    assert tls is not None
    assert tls.broker == BrokerAddress("tcp", "broker.example", 8883, tls=True)
    assert tls.tls_context is not None
    assert tls.username == "edge-s001"


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"mqtt_url": "http://broker:1883"}, "mqtt_url"),
        ({"mqtt_url": "mqtt://user:secret@broker"}, "mqtt_url"),
        ({"mqtt_url": "mqtt://broker:70000"}, "mqtt_url"),
        ({"mqtt_url": "unix://relative.sock"}, "mqtt_url"),
        ({"telemetry_prefix": "forecourt/#"}, "telemetry_prefix"),
        ({"telemetry_prefix": "/forecourt"}, "telemetry_prefix"),
        ({"telemetry_pump_interval_s": 0}, "telemetry_pump_interval_s"),
        ({"telemetry_pump_deadband_ml": -1}, "telemetry_pump_deadband_ml"),
        ({"telemetry_alarm_buffer": 0}, "telemetry_alarm_buffer"),
        ({"mqtt_keepalive_s": 1}, "mqtt_keepalive_s"),
    ],
)
def test_unusable_telemetry_settings_are_refused_at_start_naming_the_setting(
    values: dict[str, Any], named: str
) -> None:
    with pytest.raises(SettingsInvalid) as refused:
        edge_settings(**values)
    assert named in str(refused.value)
    assert "secret" not in str(refused.value)  # a password in a refused URL is not echoed


def test_a_station_code_that_cannot_be_a_topic_is_refused_at_start() -> None:
    settings = edge_settings(mqtt_url="mqtt://127.0.0.1:1883")
    settings.station = "S 001/+"
    with pytest.raises(SettingsInvalid, match="cannot publish telemetry"):
        telemetry_from_settings(settings, SystemClock())


def test_a_ca_file_that_cannot_be_read_is_refused_at_start(tmp_path: Path) -> None:
    settings = edge_settings(mqtt_url="mqtts://broker:8883", mqtt_ca_file=tmp_path / "none.pem")
    with pytest.raises(SettingsInvalid, match="mqtt_ca_file"):
        telemetry_from_settings(settings, SystemClock())


def test_feeding_values_the_format_cannot_carry_is_counted_not_raised() -> None:
    # Given a publisher (never started)
    publisher = TelemetryPublisher(
        "S001", "unix:///nonexistent.sock", username="S001", password="x", clock=SystemClock()
    )
    # When it is fed a pump number no topic can have, and an alarm too big for a payload
    publisher.pump("line1", idle(pump=0), "EUR")
    publisher.report_alarm("big", True, "x" * 70_000, datetime.now(UTC))
    publisher.report_alarm("naive", True, "no zone", datetime(2026, 1, 1))  # noqa: DTZ001
    # Then nothing raised, nothing is queued, and the status counts them
    assert publisher.stats.rejected == 3
    assert publisher.pending == 0


def test_the_edge_never_makes_a_topic_or_payload_hq_would_refuse() -> None:
    # A pump or tank number outside 1-9999 has no topic (parse_topic refuses it at HQ)
    for number in (0, 10_000, "01x"):
        with pytest.raises(InvalidValue):
            topic(PREFIX, "S001", "pumps", number)
    assert parse_topic(PREFIX, topic(PREFIX, "S001", "tanks", 9999)).key == "9999"
    # And a payload nested deeper than a parser's stack is refused as invalid, not a crash
    with pytest.raises(InvalidValue, match="nested"):
        decode(b"[" * 60_000, "S001")
