"""Shared helpers for the PTS-2 simulator tests: a station config, customers, a hand clock."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from forecourt.kernel.money import Money, Rounding, UnitPrice
from forecourt.protocols.jsonpts.codec import Packet
from forecourt.protocols.jsonpts.driver import JsonPtsDriver
from forecourt.sim.customers import Customer
from forecourt.sim.pts_controller import ControllerConfig, SimulatorProcess, StateJournal, Station

T0 = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai
CNY = "CNY"
SPEED = 200.0  # simulated seconds per wall second, for the real process


def config_dict(*, faults: dict[str, Any] | None = None, **customers: Any) -> dict[str, Any]:
    """Pump 1 sells 92 (and 0# diesel) to the fen; pump 2 sells 95 to 10 fen, half-even."""
    config: dict[str, Any] = {
        "currency": CNY,
        "volume_decimals": 2,
        "amount_decimals": 2,
        "price_decimals": 2,
        "auth": {"username": "admin", "password": "secret"},
        "timezone": "Asia/Shanghai",
        "unique_identifier": 4242,
        "pumps": [
            {
                "pump": 1,
                "amount_resolution_minor": 1,
                "rounding": "half_up",
                "nozzles": [
                    {"nozzle": 1, "grade_id": 92, "price_mmu": 789_000, "totalizer_ml": 1_000_000},
                    {"nozzle": 2, "grade_id": 0, "price_mmu": 712_000, "totalizer_ml": 2_000_000},
                ],
            },
            {
                "pump": 2,
                "amount_resolution_minor": 10,
                "rounding": "half_even",
                "first_transaction": 500,
                "nozzles": [{"nozzle": 1, "grade_id": 95, "price_mmu": 842_000, "totalizer_ml": 0}],
            },
        ],
        "customers": {
            "arrivals": False,
            "seed": 7,
            "grade_mix": [{"grade_id": 92, "weight": 1}],
            "car_volume_l": [40, 40],
            "car_flow_l_per_min": [40, 40],
            "truck_share": 0,
            "lift_delay_s": [10, 10],
            "hangup_delay_s": [5, 5],
            "flow_start_delay_s": 2,
            "authorise_timeout_s": 120,
            "max_queue": 1,
            **customers,
        },
    }
    if faults is not None:
        config["faults"] = faults
    return config


def car(grade: int = 92, litres: str = "40", l_per_min: float = 40.0, number: int = 1) -> Customer:
    return Customer(
        id=number,
        arrived_at=T0,
        grade_id=grade,
        target_ml=int(Decimal(litres) * 1000),
        flow_ml_per_s=l_per_min * 1000 / 60,
        truck=False,
    )


class Forecourt:
    """The station model with a hand-driven clock, spoken to in raw jsonPTS packets."""

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        *,
        journal: StateJournal | None = None,
        reset_counters: bool = False,
        start: datetime = T0,
        **customers: Any,
    ) -> None:
        raw = config if config is not None else config_dict(**customers)
        self.station = Station(
            ControllerConfig.from_json(raw), start, journal=journal, reset_counters=reset_counters
        )
        self.start = start
        self.now = start

    def at(self, seconds: float) -> Forecourt:
        self.now = self.start + timedelta(seconds=seconds)
        self.station.advance(self.now)
        return self

    def send(self, packet_type: str, **data: Any) -> Packet:
        item: dict[str, Any] = {"Id": 9, "Type": packet_type}
        if data:
            item["Data"] = data
        (reply,) = self.station.handle_items([item], self.now)
        return reply

    def status(self, pump: int = 1) -> Packet:
        return self.send("PumpGetStatus", Pump=pump)

    def sell(self, litres: str = "10", *, number: int = 1, pump: int = 1, at: float = 0) -> int:
        """A customer buys ``litres`` at ``pump`` from ``at`` s on; returns the transaction."""
        grade = 92 if pump == 1 else 95
        self.at(at).station.arrive(car(grade=grade, litres=litres, number=number))
        reply = self.at(at + 10).send("PumpAuthorize", Pump=pump, Type="FullTank")
        assert reply.type == "PumpAuthorizeConfirmation", reply
        self.at(at + 300)
        status = self.status(pump)
        assert status.type == "PumpEndOfTransactionStatus", status
        return int(status.data["Transaction"])


def amount_for(
    volume_ml: int, price_mmu: int, resolution: int = 1, rounding: Rounding = Rounding.HALF_UP
) -> Money:
    return UnitPrice(price_mmu, CNY).amount_for(
        volume_ml, resolution_minor=resolution, rounding=rounding
    )


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def real_driver(process: SimulatorProcess, **kwargs: Any) -> JsonPtsDriver:
    return JsonPtsDriver(
        process.base_url, "admin", "secret", timezone="Asia/Shanghai", timeout=5.0, **kwargs
    )
