"""Clocks: timezone-aware and injectable, so simulations and tests control time."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current instant, timezone-aware (UTC)."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


@dataclass(frozen=True)
class SimulatedClock:
    """A clock that runs ``speed`` times faster than wall time from a fixed anchor.

    Every process given the same (``sim_epoch``, ``wall_epoch``, ``speed``) reads the same
    simulated time, so a demo's simulators, edges and head office agree without talking.
    """

    sim_epoch: datetime
    wall_epoch: float
    speed: float = 1.0

    def __post_init__(self) -> None:
        if self.sim_epoch.tzinfo is None:
            raise ValueError("sim_epoch must be timezone-aware")
        if self.speed <= 0:
            raise ValueError("speed must be positive")

    @classmethod
    def ending_before_now(cls, wall_seconds: float, speed: float) -> SimulatedClock:
        """A clock that starts ``wall_seconds × speed`` in the past and, after ``wall_seconds``
        of wall time, reaches the instant it was made: it is never ahead of real time within
        that budget, so nothing it stamps lies in the future."""
        wall_now = time.time()
        ahead = timedelta(microseconds=_scaled_micros(*wall_seconds.as_integer_ratio(), speed))
        return cls(
            sim_epoch=datetime.fromtimestamp(wall_now, UTC) - ahead,
            wall_epoch=wall_now,
            speed=speed,
        )

    def now(self) -> datetime:
        """``sim_epoch + (wall now − wall_epoch) × speed``, exact on the floats' values."""
        wall_n, wall_d = time.time().as_integer_ratio()
        epoch_n, epoch_d = self.wall_epoch.as_integer_ratio()
        elapsed_n, elapsed_d = wall_n * epoch_d - epoch_n * wall_d, wall_d * epoch_d
        return self.sim_epoch + timedelta(
            microseconds=_scaled_micros(elapsed_n, elapsed_d, self.speed)
        )

    def wall_seconds(self, sim_seconds: float) -> float:
        return sim_seconds / self.speed

    def to_env(self) -> dict[str, str]:
        return {
            "FORECOURT_SIM_EPOCH": self.sim_epoch.isoformat(),
            "FORECOURT_SIM_WALL_EPOCH": repr(self.wall_epoch),
            "FORECOURT_SIM_SPEED": repr(self.speed),
        }

    @classmethod
    def from_env(cls, env: dict[str, str]) -> SimulatedClock | None:
        if "FORECOURT_SIM_EPOCH" not in env:
            return None
        return cls(
            sim_epoch=datetime.fromisoformat(env["FORECOURT_SIM_EPOCH"]),
            wall_epoch=float(env["FORECOURT_SIM_WALL_EPOCH"]),
            speed=float(env["FORECOURT_SIM_SPEED"]),
        )


def _scaled_micros(numerator: int, denominator: int, speed: float) -> int:
    """``numerator / denominator`` seconds × ``speed`` in microseconds, rounded once (half to
    even) on exact integers. Float arithmetic would round the product, then ``timedelta``
    again, and could land a microsecond off; rounding once also keeps the result monotonic
    in the seconds, which ``ending_before_now``'s promise relies on."""
    speed_n, speed_d = speed.as_integer_ratio()
    scaled_n, scaled_d = numerator * speed_n * 1_000_000, denominator * speed_d
    micros, rest = divmod(scaled_n, scaled_d)
    if 2 * rest > scaled_d or (2 * rest == scaled_d and micros % 2):
        micros += 1
    return micros


def ensure_aware(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime not allowed: {value!r}")
    return value
