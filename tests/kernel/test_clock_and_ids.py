"""Clocks and identifiers: simulated time that processes agree on, and time-ordered UUIDv7s.

Wall time is replaced by a fake ``time`` module inside ``forecourt.kernel.clock`` so the
properties do not depend on how fast the machine is.
"""

from __future__ import annotations

import math
import time as real_time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from fractions import Fraction
from unittest import mock

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from forecourt.kernel import clock as clock_module
from forecourt.kernel.clock import SimulatedClock, SystemClock, ensure_aware
from forecourt.kernel.ids import new_id, parse_id, uuid5_str

EPOCH = datetime(2026, 11, 25, 6, 0, tzinfo=UTC)


class FakeWallTime:
    """Stands in for the ``time`` module inside the clock module: wall time we set by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@contextmanager
def wall_time_at(seconds: float) -> Iterator[FakeWallTime]:
    fake = FakeWallTime(seconds)
    with mock.patch.object(clock_module, "time", fake):
        yield fake


speeds = st.floats(min_value=0.01, max_value=10_000, allow_nan=False)
wall_epochs = st.floats(min_value=1.6e9, max_value=2.0e9, allow_nan=False)
aware_epochs = st.builds(
    lambda micros, minutes: (
        datetime(2000, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
    ).astimezone(timezone(timedelta(minutes=minutes))),
    st.integers(min_value=0, max_value=100 * 365 * 86_400 * 10**6),
    st.integers(min_value=-12 * 60, max_value=14 * 60),
)


@given(
    speed=speeds,
    wall_epoch=wall_epochs,
    elapsed=st.floats(min_value=0, max_value=3600, allow_nan=False),
)
# Once flaky: ``wall_epoch + elapsed`` rounds to the float spacing at 1.6e9 (2.4e-7 s), so the
# clock sees 2.4e-7 s, not the 1.19e-7 s meant, and speed 8391 makes that a millisecond.
@example(speed=8391.0, wall_epoch=1.6e9, elapsed=1.1920929e-07)
# Float arithmetic (product, then timedelta's rounding) landed a microsecond off here.
@example(speed=2742.9291313405365, wall_epoch=1879472654.0235934, elapsed=1787.1983603173867)
def test_simulated_time_advances_speed_times_faster_than_wall_time(
    speed: float, wall_epoch: float, elapsed: float
) -> None:
    # Given a simulated clock anchored at a wall instant
    clock = SimulatedClock(sim_epoch=EPOCH, wall_epoch=wall_epoch, speed=speed)
    with wall_time_at(wall_epoch) as wall:
        # Then at the anchor it reads its simulated epoch
        assert clock.now() == EPOCH
        # And after some wall seconds it has moved speed times as far
        wall.now = wall_epoch + elapsed
        later = clock.now()
    assert later.utcoffset() == timedelta(0)
    moved_us = (later - EPOCH) // timedelta(microseconds=1)
    # Exactly: the wall seconds the clock saw, times speed, rounded once to the microsecond
    seen = Fraction(wall.now) - Fraction(wall_epoch)
    assert moved_us == round(seen * Fraction(speed) * 10**6)
    # And against the elapsed time we meant: off by at most the rounding of the wall reading
    # (half the float spacing at its magnitude) times speed, plus half a microsecond
    error_s = abs(Fraction(moved_us, 10**6) - Fraction(elapsed) * Fraction(speed))
    assert error_s <= Fraction(math.ulp(wall.now)) / 2 * Fraction(speed) + Fraction(1, 2 * 10**6)


def test_a_simulated_clock_at_sixty_times_speed_covers_an_hour_in_a_wall_minute() -> None:
    clock = SimulatedClock(sim_epoch=EPOCH, wall_epoch=1_800_000_000.0, speed=60.0)
    with wall_time_at(1_800_000_060.0):
        assert clock.now() == EPOCH + timedelta(hours=1)
    assert clock.wall_seconds(3600) == 60


@given(sim_epoch=aware_epochs, wall_epoch=wall_epochs, speed=speeds)
def test_a_simulated_clock_survives_a_round_trip_through_the_environment(
    sim_epoch: datetime, wall_epoch: float, speed: float
) -> None:
    # Given a simulated clock handed to another process through environment variables
    clock = SimulatedClock(sim_epoch=sim_epoch, wall_epoch=wall_epoch, speed=speed)
    env = clock.to_env()
    assert all(isinstance(v, str) for v in env.values())
    # When that process rebuilds it
    rebuilt = SimulatedClock.from_env(env)
    # Then it is the same clock and reads the same time at the same wall instant
    assert rebuilt == clock
    with wall_time_at(wall_epoch + 12.5):
        assert rebuilt.now() == clock.now()


def test_an_environment_without_a_simulated_epoch_means_no_simulated_clock() -> None:
    assert SimulatedClock.from_env({}) is None
    assert SimulatedClock.from_env({"FORECOURT_SIM_SPEED": "60"}) is None


@given(
    budget=st.floats(min_value=0.001, max_value=3600, allow_nan=False),
    speed=speeds,
    fraction=st.floats(min_value=0, max_value=1, allow_nan=False),
    start=wall_epochs,
)
# ``start + budget`` rounded up past the budget (by up to half the float spacing at 1.7e9,
# 1.2e-7 s, times speed 10 000: more than the 1 ms budget), so the clock read ahead.
@example(budget=0.001027004384942532, speed=10_000.0, fraction=1.0, start=1706425607.047258)
def test_a_clock_ending_before_now_is_never_ahead_of_real_time_within_its_budget(
    budget: float, speed: float, fraction: float, start: float
) -> None:
    # Given a clock that should only reach real time after ``budget`` wall seconds
    with wall_time_at(start) as wall:
        clock = SimulatedClock.ending_before_now(budget, speed)
        # Then when created it is budget × speed simulated seconds behind, to the microsecond
        behind = datetime.fromtimestamp(start, UTC) - clock.now()
        assert behind == timedelta(microseconds=round(Fraction(budget) * Fraction(speed) * 10**6))
        # And at any wall reading within the budget it is still behind real time. A float
        # reading cannot always land on ``start + fraction × budget``: the nearest one may
        # lie past the budget, so step down to the last reading inside it.
        wall.now = start + fraction * budget
        while wall.now - start > budget:
            wall.now = math.nextafter(wall.now, 0.0)
        assert clock.now() <= datetime.fromtimestamp(wall.now, UTC)
    assert clock.speed == speed


def test_a_clock_ending_before_now_stays_behind_the_real_clock_while_time_really_passes() -> None:
    # Given a fast clock with a short real budget
    budget = 0.2
    clock = SimulatedClock.ending_before_now(budget, speed=500.0)
    started = real_time.monotonic()
    samples = 0
    # When it is read repeatedly against the system clock for the whole budget
    while real_time.monotonic() - started < budget:
        simulated, real = clock.now(), SystemClock().now()
        # Then it never runs ahead of real time
        assert simulated <= real
        samples += 1
        real_time.sleep(0.005)
    assert samples > 5


def test_a_simulated_clock_needs_an_aware_epoch_and_a_positive_speed() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        SimulatedClock(sim_epoch=datetime(2026, 11, 25), wall_epoch=0.0)  # noqa: DTZ001
    for speed in (0.0, -1.0):
        with pytest.raises(ValueError, match="positive"):
            SimulatedClock(sim_epoch=EPOCH, wall_epoch=0.0, speed=speed)


def test_the_system_clock_reads_aware_utc_time_and_naive_values_are_refused() -> None:
    now = SystemClock().now()
    assert now.utcoffset() == timedelta(0)
    assert ensure_aware(now) is now
    with pytest.raises(ValueError, match="naive"):
        ensure_aware(datetime(2026, 11, 25))  # noqa: DTZ001


# --- identifiers ---------------------------------------------------------------------------


def test_a_new_id_is_an_rfc_9562_uuid_version_7() -> None:
    value = new_id()
    assert isinstance(value, uuid.UUID)
    assert value.version == 7
    assert value.variant == uuid.RFC_4122


def test_a_new_id_carries_the_millisecond_it_was_made_in() -> None:
    before_ms = real_time.time_ns() // 1_000_000
    value = new_id()
    assert value.int >> 80 >= before_ms  # the leading 48 bits: Unix time in milliseconds


def test_ids_created_in_sequence_sort_in_creation_order() -> None:
    # Given ids made one after another, many within the same millisecond
    ids = [new_id() for _ in range(2000)]
    real_time.sleep(0.002)
    ids.append(new_id())
    # Then they are distinct and sort in the order they were made, as UUIDs and as text
    assert len(set(ids)) == len(ids)
    assert sorted(ids) == ids
    assert sorted(str(i) for i in ids) == [str(i) for i in ids]


def test_parse_id_accepts_text_and_uuids_alike() -> None:
    value = new_id()
    assert parse_id(str(value)) == value
    assert parse_id(value) is value
    with pytest.raises(ValueError, match="hexadecimal"):
        parse_id("not-a-uuid")


@given(st.uuids(), st.text())
def test_uuid5_str_is_the_standard_uuid5(namespace: uuid.UUID, name: str) -> None:
    assert uuid5_str(namespace.bytes, name) == str(uuid.uuid5(namespace, name))
