"""A forecourt on a hand-driven clock: the simulated PTS-2 (in-process, jsonPTS over an ASGI
transport), the real jsonPTS driver, a real journal and the edge's controller.

Between the driver and the simulator sits :class:`Wire`, the cable: it can be unplugged, lose a
request or its answer, and alter a reply packet on its way (an odd value, a missing optional
field), so the edge meets exactly the bytes a misbehaving device or network would give it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from forecourt.edge.controller import ForecourtController
from forecourt.edge.journal import Journal
from forecourt.network.contracts import StationSnapshot
from forecourt.protocols.jsonpts.driver import JsonPtsDriver
from forecourt.sim.customers import Customer
from forecourt.sim.pts_controller import ControllerConfig, Phase, Station, create_app
from tests.support import ManualClock

T0 = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai
PRICE_92 = 789_000
PRICE_95 = 842_000


def sim_config(**overrides: Any) -> dict[str, Any]:
    """Two pumps: pump 1 sells 92 on nozzle 1, pump 2 sells 95 on nozzle 1."""
    config: dict[str, Any] = {
        "currency": "CNY",
        "volume_decimals": 2,
        "amount_decimals": 2,
        "price_decimals": 2,
        "auth": {"username": "admin", "password": "secret"},
        "timezone": "Asia/Shanghai",
        "pumps": [
            {
                "pump": 1,
                "amount_resolution_minor": 1,
                "rounding": "half_up",
                "nozzles": [
                    {"nozzle": 1, "grade_id": 92, "price_mmu": PRICE_92, "totalizer_ml": 1_000_000}
                ],
            },
            {
                "pump": 2,
                "amount_resolution_minor": 1,
                "rounding": "half_up",
                "nozzles": [
                    {"nozzle": 1, "grade_id": 95, "price_mmu": PRICE_95, "totalizer_ml": 5_000_000}
                ],
            },
        ],
        "customers": {
            "arrivals": False,
            "seed": 7,
            "grade_mix": [{"grade_id": 92, "weight": 1}],
            "truck_share": 0,
            "lift_delay_s": [10, 10],
            "hangup_delay_s": [5, 5],
            "flow_start_delay_s": 2,
            "authorise_timeout_s": 600,
            "max_queue": 4,
        },
    }
    config.update(overrides)
    return config


def snapshot(pumps: tuple[int, ...] = (1, 2)) -> StationSnapshot:
    grades = {1: "92", 2: "95", 3: "92"}
    return StationSnapshot.model_validate(
        {
            "version": 1,
            "generated_at": T0.isoformat(),
            "chain": "C",
            "currency": "CNY",
            "station": {
                "code": "S001",
                "name": "Test",
                "region": "R",
                "timezone": "Asia/Shanghai",
                "business_day_cutoff": "00:00:00",
                "shift_starts": ["06:00:00"],
            },
            "grades": [
                {"code": "92", "name": "92#", "kind": "gasoline"},
                {"code": "95", "name": "95#", "kind": "gasoline"},
            ],
            "tanks": [
                {"number": 1, "grade": "92", "capacity_ml": 30_000_000},
                {"number": 2, "grade": "95", "capacity_ml": 30_000_000},
            ],
            "fuelling_points": [
                {
                    "number": n,
                    "dispenser": n,
                    "model": {
                        "code": "M",
                        "amount_resolution_minor": 1,
                        "rounding": "half_up",
                        "volume_decimals": 2,
                    },
                    "nozzles": [
                        {"number": 1, "grade": grades[n], "tank": 1 if grades[n] == "92" else 2}
                    ],
                }
                for n in pumps
            ],
            "prices": [
                {
                    "price_id": f"p{grade}",
                    "grade": grade,
                    "scope": "chain",
                    "scope_code": "C",
                    "milli_minor_per_litre": price,
                    "currency": "CNY",
                    "effective_from": (T0 - timedelta(days=1)).isoformat(),
                }
                for grade, price in (("92", PRICE_92), ("95", PRICE_95))
            ],
        }
    )


Rewrite = Callable[[dict[str, Any]], None]


@dataclass
class Wire(httpx.AsyncBaseTransport):
    """The cable between edge and controller, with faults on demand."""

    target: httpx.AsyncBaseTransport
    unplugged: bool = False
    drop_requests_with: dict[str, int] = field(default_factory=dict)  # type → how many
    lose_answers_to: dict[str, int] = field(default_factory=dict)  # type → how many
    rewrites: list[tuple[str, Rewrite]] = field(default_factory=list)  # (reply type, fn)
    sent: list[str] = field(default_factory=list)  # packet types that reached the device

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.unplugged:
            raise httpx.ConnectError("cable unplugged", request=request)
        body = await request.aread()
        types = [p.get("Type") for p in json.loads(body).get("Packets", [])] if body else []
        for kind in types:
            if self.drop_requests_with.get(kind, 0) > 0:
                self.drop_requests_with[kind] -= 1
                return httpx.Response(503, request=request)
        response = await self.target.handle_async_request(request)
        content = await response.aread()
        self.sent.extend(t for t in types if isinstance(t, str))
        for kind in types:
            if self.lose_answers_to.get(kind, 0) > 0:
                self.lose_answers_to[kind] -= 1
                return httpx.Response(503, request=request)
        if response.status_code == 200 and self.rewrites and content:
            document = json.loads(content, parse_float=Decimal)
            for packet in document.get("Packets", []):
                for kind, rewrite in self.rewrites:
                    if packet.get("Type") == kind:
                        rewrite(packet)
            content = _dumps(document)
        return httpx.Response(
            response.status_code, headers=response.headers, content=content, request=request
        )


def _dumps(value: Any) -> bytes:
    from forecourt.protocols.jsonpts.codec import dumps

    return dumps(value)


class Rig:
    """One station's forecourt and edge controller, stepped by hand."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        config: dict[str, Any] | None = None,
        pumps: tuple[int, ...] = (1, 2),
        **controller: Any,
    ) -> None:
        self.tmp_path = tmp_path
        self.clock = ManualClock()
        self.config = config or sim_config()
        self.app = create_app(ControllerConfig.from_json(self.config), self.clock)
        self.wire = Wire(httpx.ASGITransport(self.app))
        self.driver = JsonPtsDriver(
            "http://pts", "admin", "secret", timezone="Asia/Shanghai", transport=self.wire
        )
        self.journal = Journal(tmp_path / "edge.db", self.clock)
        self.snap = snapshot(pumps)
        controller.setdefault("close_backoff_initial_s", 0.0)
        controller.setdefault("close_backoff_max_s", 0.0)
        self.monotonic = 1000.0
        self.controller = ForecourtController(
            self.driver,
            self.journal,
            lambda: self.snap,
            self.clock,
            monotonic=lambda: self.monotonic,
            **controller,
        )

    @property
    def station(self) -> Station:
        station: Station = self.app.state.station
        return station

    async def __aenter__(self) -> Rig:
        await self.journal.open()
        await self.driver.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.driver.close()
        await self.journal.close()

    def restart_controller(self, *, reset_counters: bool = True) -> None:
        """The PTS-2 restarts: a new process on the same dispensers. Their totalizers and the
        transaction memory survive; with ``reset_counters`` numbering starts again at 1."""
        old = self.station
        pumps = []
        for p in self.config["pumps"]:
            pump = old.pumps[p["pump"]]
            pumps.append(
                {
                    **p,
                    "first_transaction": 1 if reset_counters else pump.next_transaction,
                    "nozzles": [
                        {**n, "totalizer_ml": pump.nozzles[n["nozzle"]].total_volume_ml}
                        for n in p["nozzles"]
                    ],
                }
            )
        self.config = {**self.config, "pumps": pumps}
        self.app = create_app(ControllerConfig.from_json(self.config), self.clock)
        for number, pump in old.pumps.items():  # the dispensers' own memory
            new = self.station.pumps[number]
            new.memory.extend(pump.memory)
            if pump.pending is not None:  # a finished sale still waits at the dispenser
                new.pending, new.phase = pump.pending, Phase.END_OF_TRANSACTION
        self.wire.target = httpx.ASGITransport(self.app)

    async def poll(self, times: int = 1, *, seconds: float = 0.5) -> None:
        for _ in range(times):
            self.clock.advance(seconds)
            self.monotonic += seconds
            await self.controller.poll_once()

    def customer(self, pump_grade: int = 92, litres: int = 20, number: int = 1) -> None:
        self.station.arrive(
            Customer(
                id=number,
                arrived_at=self.clock.now(),
                grade_id=pump_grade,
                target_ml=litres * 1000,
                flow_ml_per_s=40_000 / 60,
                truck=False,
            )
        )

    async def sell(self, pump_grade: int = 92, litres: int = 20, number: int = 1) -> None:
        """A customer arrives, is served by the edge, and drives off; bounded in polls."""
        before = self.controller.stats.closed + self.controller.stats.closed_elsewhere
        self.customer(pump_grade, litres, number)
        for _ in range(400):
            await self.poll()
            done = self.controller.stats.closed + self.controller.stats.closed_elsewhere
            if done > before:
                return
        raise AssertionError("the sale did not finish within 400 polls")

    async def journaled(self) -> list[dict[str, Any]]:
        return [p.payload for p in await self.journal.pending_uploads(10_000)]

    def device_transactions(self) -> list[tuple[int, int, int]]:
        """(pump, transaction, volume) of everything the dispensers recorded."""
        return sorted(
            (r.pump, r.transaction, r.volume_ml)
            for pump in self.station.pumps.values()
            for r in pump.memory
        )
