"""Edges of the telemetry filter and publisher that hand mutation testing found unpinned:
figures becoming unknown, the exact end of an interval, alarms told apart by device and
instant, the reconnect backoff's start and cap, the bound on state topics (all in-process, on
a clock the test moves), and the status a clean stop leaves retained (on a private
Mosquitto)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from forecourt.edge.telemetry import (
    MAX_TOPICS,
    FilterRules,
    TelemetryFilter,
    TelemetryPublisher,
    Update,
)
from forecourt.kernel.clock import SystemClock
from forecourt.kernel.telemetry import decode, topic
from forecourt.protocols.model import DeviceHealth, DeviceHealthState
from tests.mqtt_broker import MqttBroker, mqtt_broker
from tests.support import ManualClock, eventually

__all__ = ["mqtt_broker"]  # a fixture, imported for pytest

T0 = datetime(2026, 3, 2, 7, 0, tzinfo=UTC)
PUMP = "forecourt/v1/stations/S001/pumps/1"
TANK = "forecourt/v1/stations/S001/tanks/1"
RULES = FilterRules(pump_deadband_ml=1000, pump_interval_s=2.0, tank_heartbeat_s=300.0)


def fuelling(volume_ml: int) -> dict[str, Any]:
    return {
        "pump": 1,
        "device": "line1",
        "state": "fuelling",
        "nozzle": 1,
        "volume_ml": volume_ml,
        "amount_minor": volume_ml * 2,
        "currency": "EUR",
        "unit_price_mmu": 2_000_000,
        "transaction": 7,
        "error": None,
    }


def tank(temperature_mdegc: int | None = 15_000) -> dict[str, Any]:
    return {
        "tank": 1,
        "device": "tls1",
        "product_code": "1",
        "measured_at": T0.isoformat(),
        "volume_ml": 20_000_000,
        "tc_volume_ml": 20_000_000,
        "ullage_ml": 10_000_000,
        "product_height_um": 2_000_000,
        "water_height_um": 0,
        "water_volume_ml": 0,
        "temperature_mdegc": temperature_mdegc,
        "status": [],
    }


class Feeder:
    """A filter on a manual clock, and what it released."""

    def __init__(self) -> None:
        self.clock = ManualClock(T0)
        self.filter = TelemetryFilter(self.clock, RULES)

    def feed(self, name: str, body: dict[str, Any]) -> Update | None:
        return self.filter.offer(Update(name, name.split("/")[4], body, self.clock.now()))


@pytest.fixture
def publisher() -> TelemetryPublisher:
    """A publisher that is never started: what it would send stays pending."""
    return TelemetryPublisher(
        "S001",
        "mqtt://127.0.0.1:1883",
        username="S001",
        password="a-station-credential-of-32-chars",
        clock=ManualClock(T0),
        reconnect_initial_s=0.2,
        reconnect_max_s=30.0,
    )


# --- the filter ------------------------------------------------------------------------------


@pytest.mark.parametrize(("before", "after"), [(15_000, None), (None, 15_000)])
def test_a_tank_figure_that_becomes_unknown_or_known_again_goes_out_at_once(
    before: int | None, after: int | None
) -> None:
    # Given a tank reading that went out
    f = Feeder()
    assert f.feed(TANK, tank(before)) is not None
    # When the next reading differs only in that its temperature became (un)known
    out = f.feed(TANK, tank(after))
    # Then it goes out at once rather than waiting for the heartbeat
    assert out is not None
    assert out.body["temperature_mdegc"] == after
    assert f.filter.held == 0


def test_progress_exactly_one_interval_after_the_last_release_goes_out_at_once() -> None:
    # Given a fuelling pump whose progress went out at T0
    f = Feeder()
    f.feed(PUMP, fuelling(0))
    # When progress within the deadband arrives exactly pump_interval_s later
    f.clock.advance(RULES.pump_interval_s)
    out = f.feed(PUMP, fuelling(100))
    # Then it goes out then and there: the interval has passed, nothing is held
    assert out is not None
    assert out.body["volume_ml"] == 100
    assert f.filter.held == 0
    # And a microsecond short of the next interval the progress after it is held
    f.clock.advance(timedelta(seconds=RULES.pump_interval_s) - timedelta(microseconds=1))
    assert f.feed(PUMP, fuelling(200)) is None
    assert f.filter.held == 1


# --- alarms ----------------------------------------------------------------------------------


def test_the_same_alarm_of_two_pumps_or_devices_is_published_for_each(
    publisher: TelemetryPublisher,
) -> None:
    # Given an alarm raised for pump 1 of line1
    raised = T0 - timedelta(minutes=1)
    publisher.report_alarm(
        "pump_error", True, "pump error", raised, {"device": "line1", "number": 1}
    )
    # When the same alarm is raised for pump 2, and for pump 1 of another line
    publisher.report_alarm(
        "pump_error", True, "pump error", raised, {"device": "line1", "number": 2}
    )
    publisher.report_alarm(
        "pump_error", True, "pump error", raised, {"device": "line2", "number": 1}
    )
    # Then each is its own alarm and goes out; only a repeat of one of them is suppressed
    assert publisher.pending == 3
    publisher.report_alarm(
        "pump_error", True, "pump error", raised, {"device": "line1", "number": 2}
    )
    assert publisher.pending == 3
    assert publisher.stats.suppressed == 1


def test_an_alarm_raised_again_at_a_new_instant_is_published_again(
    publisher: TelemetryPublisher,
) -> None:
    # Given an alarm raised, then told again unchanged (suppressed)
    publisher.report_alarm("gauge_unreachable", True, "no answer", T0)
    publisher.report_alarm("gauge_unreachable", True, "no answer", T0)
    assert (publisher.pending, publisher.stats.suppressed) == (1, 1)
    # When it is raised again with the same message but a later raised_at (a new episode)
    publisher.report_alarm("gauge_unreachable", True, "no answer", T0 + timedelta(minutes=5))
    # Then it goes out again
    assert publisher.pending == 2
    assert publisher.stats.suppressed == 1


# --- the link --------------------------------------------------------------------------------


def test_the_reconnect_backoff_starts_at_the_initial_delay_doubles_and_stops_at_the_cap(
    publisher: TelemetryPublisher,
) -> None:
    # Given reconnect_initial_s 0.2 and reconnect_max_s 30 (less up to a fifth at random)
    for _ in range(50):
        # Then the first retry waits the initial delay, the second twice it
        assert 0.16 <= publisher.retry_delay(1) <= 0.2
        assert 0.32 <= publisher.retry_delay(2) <= 0.4
        # And after many failures in a row the delay is the cap, never more
        assert 24.0 <= publisher.retry_delay(20) <= 30.0
        assert publisher.retry_delay(1000) <= 30.0


def test_updates_for_more_state_topics_than_max_topics_are_dropped_and_counted(
    publisher: TelemetryPublisher,
) -> None:
    # Given MAX_TOPICS device lines whose health is pending
    health = DeviceHealth("line", DeviceHealthState.ONLINE)
    for n in range(MAX_TOPICS):
        publisher.device_health(f"line{n}", "dart", health)
    assert (publisher.pending, publisher.stats.dropped) == (MAX_TOPICS, 0)
    # When one more device line reports
    publisher.device_health("one-too-many", "dart", health)
    # Then it is dropped and counted, and the bound holds
    assert (publisher.pending, publisher.stats.dropped) == (MAX_TOPICS, 1)
    # And a topic already buffered still takes its newer state
    publisher.device_health("line0", "dart", DeviceHealth("line0", DeviceHealthState.OFFLINE))
    assert (publisher.pending, publisher.stats.dropped) == (MAX_TOPICS, 1)


async def test_a_clean_stop_leaves_offline_as_the_status_a_later_subscriber_finds(
    mqtt_broker: MqttBroker,
) -> None:
    # Given an edge that connected (its retained status says online)
    publisher = TelemetryPublisher(
        "S003",
        mqtt_broker.url,
        username="S003",
        password=mqtt_broker.password("S003"),
        clock=SystemClock(),
        reconnect_initial_s=0.05,
        reconnect_max_s=0.3,
    )
    publisher.start()
    try:
        await eventually(
            lambda: publisher.stats.connected and publisher.pending == 0, 10, what="online"
        )
    finally:
        # When it stops cleanly
        await publisher.stop()
    # Then a subscriber that comes afterwards finds offline as the retained status
    status = topic("forecourt/v1", "S003", "status")
    async with mqtt_broker.client() as hq:
        await hq.subscribe(status, qos=1)
        async with asyncio.timeout(5):
            message = await anext(aiter(hq.messages))
    assert message.retain
    assert isinstance(message.payload, bytes)
    assert decode(message.payload, "S003").body["online"] is False
