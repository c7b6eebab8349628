"""The DART simulator as a demo station runs it: serve(), autonomous customers, the record.

A small loop plays the edge's controller (authorise a calling pump, close what it holds);
what the dispensers measured (the record file) and what the driver numbered must agree, sale
for sale: the first two legs of a three-way reconciliation.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from forecourt.protocols.dart.driver import DartDriver
from forecourt.protocols.dart.simulator import serve
from forecourt.protocols.model import (
    DeviceRejected,
    DeviceTransaction,
    DriverUnavailable,
    Preset,
    PumpState,
)

PRICE = 789_000


async def play_controller(driver: DartDriver, pumps: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        for status in await driver.pump_status(pumps):
            try:
                if status.state is PumpState.CALLING:
                    await driver.authorize(status.pump, status.nozzle, Preset(), PRICE)
                elif status.state is PumpState.END_OF_TRANSACTION:
                    held = await driver.finished_transaction(status.pump)
                    if held is not None:
                        await driver.close_transaction(status.pump, held.transaction)
            except (DeviceRejected, DriverUnavailable):
                pass  # the customer changed their mind; the next poll says what is true
        await asyncio.sleep(0.02)


async def test_autonomous_customers_are_sold_and_recorded_and_both_counts_agree(
    tmp_path: Path,
) -> None:
    record = tmp_path / "dispensed.jsonl"
    endpoints: dict[str, str] = {}
    ready = asyncio.Event()

    def started(found: dict[str, str]) -> None:
        endpoints.update(found)
        ready.set()

    # Given a simulated line of two pumps with customers arriving on their own, fast
    line = asyncio.create_task(
        serve(
            "127.0.0.1:0",
            pumps=2,
            record=record,
            speed=300.0,
            customers_per_hour=240.0,
            seed=7,
            control="127.0.0.1:0",
            ready=started,
        )
    )
    try:
        await asyncio.wait_for(ready.wait(), 5)
        assert endpoints["tcp"].startswith("tcp://127.0.0.1:")
        assert "control" in endpoints
        # When a controller sells to them for a while
        driver = DartDriver(
            "demo", endpoints["tcp"], {1: 0x50, 2: 0x51}, timeout_s=0.2, poll_interval_s=0.01
        )
        stop = asyncio.Event()
        async with driver:
            seller = asyncio.create_task(play_controller(driver, [1, 2], stop))
            deadline = time.monotonic() + 30
            while not record.exists() or len(record.read_text().splitlines()) < 4:
                assert time.monotonic() < deadline, "too few sales recorded in time"
                await asyncio.sleep(0.05)
            stop.set()
            await seller

            async def everything_numbered() -> list[DeviceTransaction]:
                far = driver.clock.now()
                found: list[DeviceTransaction] = []
                for pump in (1, 2):
                    found += await driver.transactions(pump, far.replace(year=far.year - 1), far)
                return found

            # No more authorisations: once the last fillings end, all of them are numbered
            while True:
                assert time.monotonic() < deadline + 10, "fillings left unnumbered"
                busy = [
                    s
                    for s in await driver.pump_status([1, 2])
                    if s.state in (PumpState.AUTHORISED, PumpState.FUELLING)
                ]
                sold = await everything_numbered()
                if not busy and len(sold) == len(record.read_text().splitlines()):
                    break
                await asyncio.sleep(0.05)
        # Then every filling the dispensers recorded was numbered once by the driver
        dispensed = [json.loads(line) for line in record.read_text().splitlines()]
        measured = sorted(
            (d["pump"], d["nozzle"], d["volume_ml"], d["amount_minor"], d["totals"]["volume_ml"])
            for d in dispensed
        )
        numbered = sorted(
            (t.pump, t.nozzle, t.volume_ml, t.amount_minor, t.totalizer_end_ml) for t in sold
        )
        assert numbered == measured
        assert len({(t.pump, t.transaction) for t in sold}) == len(sold)
        assert all(d["unit_price_mmu"] == PRICE for d in dispensed)
    finally:
        line.cancel()
        await asyncio.gather(line, return_exceptions=True)
