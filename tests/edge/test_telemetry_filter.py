"""The telemetry filter on a clock the test moves (change-only, deadbands, aggregation), and
the publisher's feed, which never raises."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from forecourt.edge.telemetry import FilterRules, TelemetryFilter, TelemetryPublisher, Update
from forecourt.protocols.model import PumpState, PumpStatus
from tests.support import ManualClock

T0 = datetime(2026, 3, 2, 7, 0, tzinfo=UTC)
PUMP = "forecourt/v1/stations/S001/pumps/1"
TANK = "forecourt/v1/stations/S001/tanks/1"
DEVICE = "forecourt/v1/stations/S001/devices/line1"
RULES = FilterRules(
    pump_deadband_ml=1000,
    pump_interval_s=2.0,
    tank_volume_deadband_ml=10_000,
    tank_temperature_deadband_mdegc=500,
    tank_water_deadband_um=1000,
    tank_heartbeat_s=300.0,
)


def pump(state: str, volume_ml: int | None = None, **more: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "pump": 1,
        "device": "line1",
        "state": state,
        "nozzle": 1 if state != "idle" else None,
        "volume_ml": volume_ml,
        "amount_minor": None if volume_ml is None else volume_ml * 2,
        "currency": "EUR",
        "unit_price_mmu": 2_000_000,
        "transaction": 7 if state != "idle" else None,
        "error": None,
    }
    return body | more


def tank(volume_ml: int, temperature_mdegc: int = 15_000, water_um: int = 0, **more: Any) -> Any:
    return {
        "tank": 1,
        "device": "tls1",
        "product_code": "1",
        "measured_at": T0.isoformat(),
        "volume_ml": volume_ml,
        "tc_volume_ml": volume_ml,
        "ullage_ml": 30_000_000 - volume_ml,
        "product_height_um": volume_ml // 10,
        "water_height_um": water_um,
        "water_volume_ml": water_um // 10,
        "temperature_mdegc": temperature_mdegc,
        "status": [],
    } | more


class Feeder:
    def __init__(self, rules: FilterRules = RULES) -> None:
        self.clock = ManualClock(T0)
        self.filter = TelemetryFilter(self.clock, rules)
        self.released: list[Update] = []

    def feed(self, name: str, body: dict[str, Any]) -> Update | None:
        kind = name.split("/")[4]
        update = Update(name, kind, body, self.clock.now())
        out = self.filter.offer(update)
        if out is not None:
            self.released.append(out)
        return out

    def tick(self, seconds: float) -> list[Update]:
        self.clock.advance(seconds)
        due = self.filter.due()
        self.released.extend(due)
        return due

    def bodies(self) -> list[dict[str, Any]]:
        return [u.body for u in self.released]


def test_the_same_pump_state_fed_again_is_not_released_again() -> None:
    # Given a pump whose idle state went out
    f = Feeder()
    f.feed(PUMP, pump("idle"))
    # When every poll reports the same state
    for _ in range(50):
        f.tick(0.1)
        f.feed(PUMP, pump("idle"))
    # Then it went out once
    assert f.bodies() == [pump("idle")]
    assert f.filter.suppressed == 50


def test_fuelling_progress_is_released_per_deadband_of_volume() -> None:
    # Given a pump that starts fuelling
    f = Feeder()
    f.feed(PUMP, pump("fuelling", 0))
    # When progress arrives every 100 ml within the interval
    for volume in range(100, 3100, 100):
        f.clock.advance(0.01)
        f.feed(PUMP, pump("fuelling", volume))
    # Then only each litre went out
    assert [b["volume_ml"] for b in f.bodies()] == [0, 1000, 2000, 3000]


def test_slow_fuelling_progress_is_released_once_per_interval_with_the_latest_volume() -> None:
    # Given a pump fuelling slowly (100 ml every half second, under the deadband)
    f = Feeder()
    f.feed(PUMP, pump("fuelling", 0))
    for step in range(1, 5):
        f.tick(0.5)
        f.feed(PUMP, pump("fuelling", step * 100))
    # Then the progress held at the end of the interval went out on time (300 at 2.0 s)
    assert [b["volume_ml"] for b in f.bodies()] == [0, 300]
    # When the progress stops and time passes
    f.feed(PUMP, pump("fuelling", 450))
    assert f.filter.next_due() == T0 + timedelta(seconds=4)
    f.tick(1.9)
    assert [b["volume_ml"] for b in f.bodies()] == [0, 300]
    f.tick(0.1)
    # Then the latest held progress (not the 400 before it) went out when its interval ended
    assert [b["volume_ml"] for b in f.bodies()] == [0, 300, 450]
    assert f.filter.held == 0


def test_end_of_transaction_is_released_at_once_even_within_the_deadband() -> None:
    # Given a pump whose last progress is held (within deadband and interval)
    f = Feeder()
    f.feed(PUMP, pump("fuelling", 0))
    f.feed(PUMP, pump("fuelling", 300))
    # When the nozzle is hung with 350 ml, then the pump goes idle
    eot = f.feed(PUMP, pump("end_of_transaction", 350))
    idle = f.feed(PUMP, pump("idle"))
    # Then both went out at once, and the held progress never will
    assert eot is not None
    assert idle is not None
    assert [b["state"] for b in f.bodies()] == ["fuelling", "end_of_transaction", "idle"]
    assert f.filter.held == 0
    assert f.tick(60) == []


def test_a_final_volume_correction_after_end_of_transaction_is_released() -> None:
    # Given a transaction that ended at 10 000 ml
    f = Feeder()
    f.feed(PUMP, pump("end_of_transaction", 10_000))
    # When the device corrects its final figure by 10 ml
    out = f.feed(PUMP, pump("end_of_transaction", 10_010))
    # Then it goes out: the deadband is only for progress while fuelling
    assert out is not None


def test_a_state_that_went_back_to_what_was_released_drops_the_held_update() -> None:
    # Given a released reading and a newer one held
    f = Feeder()
    f.feed(TANK, tank(20_000_000))
    f.feed(TANK, tank(20_001_000))
    assert f.filter.held == 1
    # When the reading returns to the released value
    f.feed(TANK, tank(20_000_000))
    # Then nothing is held: HQ already has that state
    assert f.filter.held == 0
    assert f.tick(1000) == []


def test_a_tank_reading_is_released_on_a_volume_temperature_or_water_deadband() -> None:
    # Given a tank whose reading went out
    f = Feeder()
    f.feed(TANK, tank(20_000_000))
    # When readings move under every deadband, then past each of them in turn
    assert f.feed(TANK, tank(20_009_000, 15_400, 900)) is None
    assert f.feed(TANK, tank(20_010_000)) is not None
    assert f.feed(TANK, tank(20_010_000, 15_500)) is not None
    assert f.feed(TANK, tank(20_010_000, 15_500, 1000)) is not None
    # Then a change of status or product goes out whatever the figures
    assert f.feed(TANK, tank(20_010_000, 15_500, 1000, status=["delivery_in_progress"]))


def test_a_tank_within_its_deadbands_is_released_at_its_heartbeat_with_the_latest_reading() -> None:
    # Given a tank whose readings barely move
    f = Feeder()
    f.feed(TANK, tank(20_000_000))
    for minute in range(1, 5):
        f.tick(60)
        later = (T0 + timedelta(minutes=minute)).isoformat()
        f.feed(TANK, tank(20_000_000 - minute * 100, measured_at=later))
    assert len(f.released) == 1
    # When the heartbeat comes
    f.tick(60)
    # Then the latest reading goes out
    assert len(f.released) == 2
    assert f.released[-1].body["volume_ml"] == 20_000_000 - 400


def test_device_health_is_released_on_every_change_only() -> None:
    f = Feeder()
    online = {"device": "line1", "protocol": "dart", "state": "online", "detail": None}
    offline = online | {"state": "offline", "detail": "timeout"}
    for body in (online, online, offline, offline, online):
        f.feed(DEVICE, body)
    assert f.bodies() == [online, offline, online]


def test_a_tank_that_reports_no_volume_is_released_on_every_height_change() -> None:
    f = Feeder()
    f.feed(TANK, tank(0) | {"volume_ml": None, "product_height_um": 1_000_000})
    out = f.feed(TANK, tank(0) | {"volume_ml": None, "product_height_um": 1_000_500})
    assert out is not None


# --- properties --------------------------------------------------------------------------

STATES = ["idle", "calling", "authorised", "fuelling", "suspended", "end_of_transaction"]
steps = st.lists(
    st.tuples(
        st.sampled_from(STATES),
        st.integers(min_value=0, max_value=1500),  # volume step
        st.floats(min_value=0.0, max_value=3.0, allow_nan=False),  # seconds before it
    ),
    min_size=1,
    max_size=60,
)


def feed_pump_sequence(
    f: Feeder, sequence: list[tuple[str, int, float]]
) -> list[tuple[Update, int]]:
    fed: list[tuple[Update, int]] = []
    volume = 0
    for state, step, wait in sequence:
        f.tick(wait)
        volume = volume + step if state in ("fuelling", "end_of_transaction") else 0
        body = pump(state, volume if state != "idle" else None)
        update = Update(PUMP, "pumps", body, f.clock.now())
        out = f.filter.offer(update)
        if out is not None:
            f.released.append(out)
        fed.append((update, len(fed)))
    return fed


@given(steps)
def test_whatever_is_fed_the_last_state_fed_is_the_last_released_once_it_settles(
    sequence: list[tuple[str, int, float]],
) -> None:
    # Given any sequence of pump states, progress and pauses
    f = Feeder()
    fed = feed_pump_sequence(f, sequence)
    # When time moves past every interval
    f.tick(RULES.pump_interval_s + 0.001)
    # Then what HQ has last is what the device said last
    assert f.released[-1].body == fed[-1][0].body
    assert f.filter.held == 0


@given(steps)
def test_releases_of_a_topic_never_go_back_to_an_older_state(
    sequence: list[tuple[str, int, float]],
) -> None:
    # Given any sequence of pump states
    f = Feeder()
    fed = feed_pump_sequence(f, sequence)
    f.tick(RULES.pump_interval_s + 0.001)
    # Then every release is of a later feed than the one before, and is not older in time
    order = {id(update): index for update, index in fed}
    indexes = [order[id(update)] for update in f.released]
    assert indexes == sorted(set(indexes))
    times = [update.at for update in f.released]
    assert times == sorted(times)


@given(steps)
def test_fuelling_progress_goes_out_at_most_per_deadband_or_interval_and_states_never_wait(
    sequence: list[tuple[str, int, float]],
) -> None:
    # Given any sequence of pump states
    f = Feeder()
    released_at: list[tuple[Update, datetime]] = []
    volume = 0
    last_state: str | None = None
    for state, step, wait in sequence:
        for due in f.tick(wait):
            released_at.append((due, f.clock.now()))
        volume = volume + step if state in ("fuelling", "end_of_transaction") else 0
        body = pump(state, volume if state != "idle" else None)
        out = f.filter.offer(Update(PUMP, "pumps", body, f.clock.now()))
        # Then a new state (a terminal one included) goes out the moment it is fed
        if state != last_state:
            assert out is body or (out is not None and out.body == body)
        if out is not None:
            released_at.append((out, f.clock.now()))
        last_state = state
    # And two fuelling releases in a row are a deadband or an interval apart
    for (a, _), (b, at) in zip(released_at, released_at[1:], strict=False):
        if a.body["state"] == b.body["state"] == "fuelling":
            moved = abs(b.body["volume_ml"] - a.body["volume_ml"])
            assert moved >= RULES.pump_deadband_ml or (at - a.at).total_seconds() >= 2.0 - 1e-9


# --- the feed never raises -------------------------------------------------------------------

anything = st.one_of(
    st.none(), st.booleans(), st.integers(), st.text(max_size=20), st.just(object())
)


@given(
    st.lists(
        st.one_of(
            st.builds(
                PumpStatus,
                pump=st.integers(min_value=-2, max_value=10_001),
                state=st.sampled_from(PumpState),
                nozzle=st.none() | st.integers(),
                volume_ml=st.none() | st.integers(),
                amount_minor=st.none() | st.integers(),
                unit_price_mmu=st.none() | st.integers(),
                transaction=st.none() | st.integers(),
                error=st.none() | st.text(max_size=30),
            ),
            st.tuples(
                st.text(max_size=12),
                st.datetimes(timezones=st.none() | st.just(UTC)),
                st.dictionaries(st.text(max_size=5), anything, max_size=3),
            ),
        ),
        max_size=30,
    )
)
def test_whatever_it_is_fed_the_publisher_never_raises_and_counts_what_it_cannot_carry(
    feeds: list[Any],
) -> None:
    # Given a publisher (not started: feeding does not need the broker)
    clock = ManualClock(T0)
    publisher = TelemetryPublisher(
        "S001", "unix:///nonexistent.sock", username="S001", password="x", clock=clock
    )
    for value in feeds:
        clock.advance(0.3)
        # When it is fed pump states with any numbers, and alarms with any name, time, details
        if isinstance(value, PumpStatus):
            publisher.pump("line1", value, "EUR")
        else:
            name, raised_at, details = value
            publisher.report_alarm(name, True, "m", raised_at, details)
    # Then nothing raised, and the buffer stays bounded by the topics and the alarm queue
    assert publisher.pending <= 10_001 + publisher.alarm_buffer
    assert publisher.stats.rejected >= sum(
        1 for v in feeds if isinstance(v, PumpStatus) and not 0 < v.pump < 10_000
    )
