"""Simulated forecourt customers: who arrives when, what they buy, how fast they pump.

Arrivals are a Poisson process per station (exponential gaps at ``arrivals_per_hour``). A car
wants 30-50 L of a grade drawn from the configured mix and pumps at 30-50 L/min; a small share
of trucks want 100-400 L of a diesel-type grade at up to 130 L/min (numbers from DOMAIN.md).
Everything random comes from one seeded :class:`random.Random`, so a run is reproducible given
the same sequence of controller commands.

Floats are fine here: they are flow rates and delays. Volumes leave this module as integer ml on
the device's volume grid.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from forecourt.kernel.errors import ForecourtError
from forecourt.kernel.money import litres_to_ml


class SimConfigError(ForecourtError):
    code = "sim.config_invalid"
    http_status = 422


@dataclass(frozen=True, slots=True)
class Customer:
    """One vehicle at the station."""

    id: int
    arrived_at: datetime
    grade_id: int
    target_ml: int  # what the driver wants (a full tank for them), on the volume grid
    flow_ml_per_s: float
    truck: bool


@dataclass(frozen=True, slots=True)
class CustomerModel:
    """The ``customers`` section of the simulator config (see pts_controller for the schema)."""

    arrivals: bool = True
    arrivals_per_hour: float = 60.0
    seed: int = 1
    grade_mix: tuple[tuple[int, float], ...] = ()
    car_volume_ml: tuple[int, int] = (30_000, 50_000)
    car_flow_l_per_min: tuple[float, float] = (30.0, 50.0)
    truck_share: float = 0.03
    truck_grade_ids: tuple[int, ...] = ()
    truck_volume_ml: tuple[int, int] = (100_000, 400_000)
    truck_flow_l_per_min: tuple[float, float] = (60.0, 130.0)
    authorise_timeout_s: float = 120.0
    lift_delay_s: tuple[float, float] = (10.0, 40.0)
    flow_start_delay_s: float = 2.0
    hangup_delay_s: tuple[float, float] = (3.0, 10.0)
    max_queue: int = 4
    queue_patience_s: float = 600.0

    @classmethod
    def from_json(cls, obj: Any, *, known_grades: set[int]) -> CustomerModel:
        if obj is None:
            obj = {}
        if not isinstance(obj, dict):
            raise SimConfigError("customers must be an object")
        mix_raw = obj.get("grade_mix")
        if mix_raw is None:
            # Default: every configured grade equally likely.
            mix = tuple((grade, 1.0) for grade in sorted(known_grades))
        else:
            if not isinstance(mix_raw, list) or not mix_raw:
                raise SimConfigError("customers.grade_mix must be a non-empty list")
            mix = tuple(
                (_int(item, "grade_id", "customers.grade_mix[]"), _num(item, "weight", "grade_mix"))
                for item in mix_raw
            )
        d = cls()  # the defaults (slots hide class-level default values)
        truck_grades = tuple(_int_list(obj.get("truck_grade_ids", []), "customers.truck_grade_ids"))
        model = cls(
            arrivals=_bool(obj, "arrivals", d.arrivals),
            arrivals_per_hour=_num(obj, "arrivals_per_hour", "customers", d.arrivals_per_hour),
            seed=_int(obj, "seed", "customers", d.seed),
            grade_mix=mix,
            car_volume_ml=_litres_range(obj, "car_volume_l", d.car_volume_ml),
            car_flow_l_per_min=_range(obj, "car_flow_l_per_min", d.car_flow_l_per_min),
            truck_share=_num(obj, "truck_share", "customers", d.truck_share),
            truck_grade_ids=truck_grades,
            truck_volume_ml=_litres_range(obj, "truck_volume_l", d.truck_volume_ml),
            truck_flow_l_per_min=_range(obj, "truck_flow_l_per_min", d.truck_flow_l_per_min),
            authorise_timeout_s=_num(
                obj, "authorise_timeout_s", "customers", d.authorise_timeout_s
            ),
            lift_delay_s=_range(obj, "lift_delay_s", d.lift_delay_s),
            flow_start_delay_s=_num(obj, "flow_start_delay_s", "customers", d.flow_start_delay_s),
            hangup_delay_s=_range(obj, "hangup_delay_s", d.hangup_delay_s),
            max_queue=_int(obj, "max_queue", "customers", d.max_queue),
            queue_patience_s=_num(obj, "queue_patience_s", "customers", d.queue_patience_s),
        )
        model._validate(known_grades)
        return model

    def _validate(self, known_grades: set[int]) -> None:
        if self.arrivals_per_hour < 0:
            raise SimConfigError("customers.arrivals_per_hour cannot be negative")
        if not 0 <= self.truck_share <= 1:
            raise SimConfigError("customers.truck_share must be between 0 and 1")
        if any(weight < 0 for _, weight in self.grade_mix) or not any(
            weight > 0 for _, weight in self.grade_mix
        ):
            raise SimConfigError("customers.grade_mix needs non-negative weights, one positive")
        unknown = {g for g, _ in self.grade_mix} | set(self.truck_grade_ids)
        unknown -= known_grades
        if unknown:
            raise SimConfigError(f"customers refer to grades no nozzle sells: {sorted(unknown)}")
        # No truck_grade_ids (a station without diesel) simply means no trucks come.
        if self.authorise_timeout_s <= 0 or self.flow_start_delay_s < 0:
            raise SimConfigError("customers delays must be positive")
        if self.max_queue < 0 or self.queue_patience_s <= 0:
            raise SimConfigError("customers.max_queue/queue_patience_s out of range")
        for low, _high in (self.car_flow_l_per_min, self.truck_flow_l_per_min):
            if low <= 0:
                raise SimConfigError("flow rates must be positive")


class CustomerSource:
    """Draws arrivals and customer behaviour from one seeded random stream."""

    def __init__(self, model: CustomerModel, *, volume_step_ml: int) -> None:
        self.model = model
        self._rng = random.Random(model.seed)
        self._step_ml = volume_step_ml
        self._next_id = 1

    def arrival_gap_s(self) -> float | None:
        """Seconds to the next arrival (exponential gaps = Poisson arrivals), None if no rate."""
        if self.model.arrivals_per_hour <= 0:
            return None
        return self._rng.expovariate(self.model.arrivals_per_hour / 3600.0)

    def new_customer(self, arrived_at: datetime) -> Customer:
        model = self.model
        truck = bool(model.truck_grade_ids) and self._rng.random() < model.truck_share
        if truck:
            grade = self._rng.choice(model.truck_grade_ids)
            volume_range, flow_range = model.truck_volume_ml, model.truck_flow_l_per_min
        else:
            grades = [grade for grade, _ in model.grade_mix]
            weights = [weight for _, weight in model.grade_mix]
            grade = self._rng.choices(grades, weights=weights)[0]
            volume_range, flow_range = model.car_volume_ml, model.car_flow_l_per_min
        low_steps = -(-volume_range[0] // self._step_ml)  # ceil: stay inside the range
        high_steps = max(low_steps, volume_range[1] // self._step_ml)
        target_ml = self._rng.randint(low_steps, high_steps) * self._step_ml
        flow_l_per_min = self._rng.uniform(*flow_range)
        customer = Customer(
            id=self._next_id,
            arrived_at=arrived_at,
            grade_id=grade,
            target_ml=max(target_ml, self._step_ml),
            flow_ml_per_s=flow_l_per_min * 1000.0 / 60.0,
            truck=truck,
        )
        self._next_id += 1
        return customer

    def choose(self, options: list[int]) -> int:
        return self._rng.choice(options)

    def lift_delay_s(self) -> float:
        """Drive up, get out, open the filler cap, lift the nozzle."""
        return self._rng.uniform(*self.model.lift_delay_s)

    def hangup_delay_s(self) -> float:
        """From the nozzle's auto shut-off (or a stop) to the nozzle back on its hook."""
        return self._rng.uniform(*self.model.hangup_delay_s)


# --------------------------------------------------------------------------- config helpers


def _num(obj: Any, name: str, where: str, default: float | None = None) -> float:
    value = obj.get(name, default) if isinstance(obj, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise SimConfigError(f"{where}.{name} must be a number")
    return float(value)


def _int(obj: Any, name: str, where: str, default: int | None = None) -> int:
    value = obj.get(name, default) if isinstance(obj, dict) else None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SimConfigError(f"{where}.{name} must be an integer")
    return value


def _bool(obj: dict[str, Any], name: str, default: bool) -> bool:
    value = obj.get(name, default)
    if not isinstance(value, bool):
        raise SimConfigError(f"customers.{name} must be true or false")
    return value


def _int_list(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or any(
        isinstance(v, bool) or not isinstance(v, int) for v in value
    ):
        raise SimConfigError(f"{where} must be a list of integers")
    return list(value)


def _range(obj: dict[str, Any], name: str, default: tuple[float, float]) -> tuple[float, float]:
    value = obj.get(name)
    if value is None:
        return default
    if (
        not isinstance(value, list)
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int | Decimal) for v in value)
    ):
        raise SimConfigError(f"customers.{name} must be [low, high]")
    low, high = float(value[0]), float(value[1])
    if low < 0 or high < low:
        raise SimConfigError(f"customers.{name} must have 0 <= low <= high")
    return low, high


def _litres_range(obj: dict[str, Any], name: str, default: tuple[int, int]) -> tuple[int, int]:
    value = obj.get(name)
    if value is None:
        return default
    if (
        not isinstance(value, list)
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int | Decimal) for v in value)
    ):
        raise SimConfigError(f"customers.{name} must be [low, high] litres")
    try:
        low, high = litres_to_ml(Decimal(value[0])), litres_to_ml(Decimal(value[1]))
    except ForecourtError as exc:
        raise SimConfigError(f"customers.{name}: {exc.message}") from None
    if low <= 0 or high < low:
        raise SimConfigError(f"customers.{name} must have 0 < low <= high")
    return low, high
