"""The edge's exactly-once invariants, each pinned by the fault that would break it.

These tests were written against surviving mutants of the controller, the journal, the
fuelling-point machine and the upload agent: every one fails if the guard it names is
dropped. The forecourt is the in-process rig (the simulated PTS-2 behind the real jsonPTS
driver and a real journal), stepped by hand, so every wait is a bounded number of polls.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from forecourt.edge.controller import (
    FLAG_FROM_REPORT,
    FLAG_TOTALIZER_GAP,
    FLAG_TOTALIZER_MISMATCH,
    ForecourtController,
)
from forecourt.edge.domain import FpState, FuellingPointMachine, Refusal, transaction_fingerprint
from forecourt.edge.drivers import PumpState
from forecourt.edge.journal import FLAG_EPOCH_CHANGE, Journal, journal_t, outbox_t
from forecourt.edge.sync import REGROW_AFTER_BATCHES, HqClient, SyncAgent
from forecourt.kernel.clock import SystemClock
from forecourt.sim.pts_controller import Phase
from tests.edge.forecourt_rig import Rig
from tests.edge.test_device_epochs import DRAFT, later


def journal_keys(payloads: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
    return sorted((p["fuelling_point"], p["device_txn"], p["volume_ml"]) for p in payloads)


def alarm_names(rig: Rig) -> set[str]:
    return {a["name"] for a in rig.controller.alarms.as_json()}


async def poll_until(
    rig: Rig, done: Callable[[], Awaitable[bool]], *, polls: int = 400, seconds: float = 0.5
) -> None:
    """Poll the edge until ``done`` holds; fail after ``polls`` polls."""
    for _ in range(polls):
        if await done():
            return
        await rig.poll(seconds=seconds)
    raise AssertionError(f"condition not reached within {polls} polls")


def run_forecourt_alone(rig: Rig, until: Callable[[], bool], *, steps: int = 400) -> None:
    """Time passes at the forecourt while the edge does not poll (away, or between polls)."""
    for _ in range(steps):
        if until():
            return
        rig.clock.advance(0.5)
        rig.monotonic += 0.5
        rig.station.advance(rig.clock.now())
    raise AssertionError(f"the forecourt did not get there within {steps} steps")


def authorise_at_the_device(rig: Rig, pump: int = 1) -> None:
    """Another terminal (or a prepay) authorises the pump: the edge does not."""
    rig.station.handle_items(
        [
            {
                "Id": 1,
                "Type": "PumpAuthorize",
                "Data": {"Pump": pump, "Nozzle": 1, "Type": "FullTank"},
            }
        ],
        rig.clock.now(),
    )


def close_at_the_device(rig: Rig, pump: int = 1) -> None:
    """Another terminal closes the finished transaction the pump holds."""
    pending = rig.station.pumps[pump].pending
    assert pending is not None
    rig.station.handle_items(
        [
            {
                "Id": 2,
                "Type": "PumpCloseTransaction",
                "Data": {"Pump": pump, "Transaction": pending.transaction},
            }
        ],
        rig.clock.now(),
    )


def finish_elsewhere(rig: Rig, *, litres: int, number: int, pump: int = 1) -> None:
    """A sale authorised by another terminal ends while the edge does not poll; the pump
    holds it, unclosed."""
    rig.customer(pump_grade=92 if pump == 1 else 95, litres=litres, number=number)
    state = rig.station.pumps[pump]

    def calling() -> bool:
        return state.phase is Phase.CALLING

    run_forecourt_alone(rig, calling)
    authorise_at_the_device(rig, pump)

    def finished() -> bool:
        return state.pending is not None

    run_forecourt_alone(rig, finished)


def sell_elsewhere(rig: Rig, *, litres: int, number: int, pump: int = 1) -> None:
    """A whole sale authorised and closed by another terminal while the edge does not poll."""
    finish_elsewhere(rig, litres=litres, number=number, pump=pump)
    close_at_the_device(rig, pump)


async def stored(journal: Journal, sale_id: str) -> dict[str, Any]:
    """The sale's journal row as it is on disk."""
    row = await journal.sale(sale_id)
    assert row is not None
    return row


# --- closing ----------------------------------------------------------------------------


async def test_a_finished_sale_that_cannot_be_journaled_is_not_closed(tmp_path: Path) -> None:
    """The snapshot is gone when the sale is read: the pump keeps it until it is journaled."""
    async with Rig(tmp_path) as rig:
        original = rig.driver.finished_transaction
        kept: list[Any] = []

        async def read_while_the_snapshot_is_withdrawn(pump: int) -> Any:
            kept.append(rig.snap)
            rig.snap = None  # type: ignore[assignment]
            return await original(pump)

        rig.driver.finished_transaction = read_while_the_snapshot_is_withdrawn  # type: ignore[method-assign]
        rig.customer(litres=10)

        async def read() -> bool:
            return bool(kept)

        await poll_until(rig, read)
        pump = rig.station.pumps[1]
        assert pump.pending is not None  # still held at the device
        assert "PumpCloseTransaction" not in rig.wire.sent
        assert await rig.journaled() == []
        # The snapshot is back: the same sale is journaled, then closed.
        rig.driver.finished_transaction = original  # type: ignore[method-assign]
        rig.snap = kept[0]

        async def closed() -> bool:
            return pump.pending is None

        await poll_until(rig, closed, polls=20)
        assert journal_keys(await rig.journaled()) == rig.device_transactions()
        assert rig.controller.stats.closed == 1


async def test_a_held_sale_is_never_closed_for_another_sale_under_the_same_number(
    tmp_path: Path,
) -> None:
    """The edge's close of sale 1 does not arrive. While the edge is away another terminal
    closes it, the controller restarts with its counters reset, and a new sale finishes under
    number 1 again. The edge must journal the new sale before it closes it."""
    async with Rig(tmp_path) as rig:
        rig.wire.drop_requests_with["PumpCloseTransaction"] = 1_000
        rig.customer(litres=15)

        async def journaled_one() -> bool:
            return len(await rig.journaled()) == 1

        await poll_until(rig, journaled_one)
        rig.wire.drop_requests_with.clear()
        rig.wire.unplugged = True
        await rig.poll()
        close_at_the_device(rig)
        rig.restart_controller(reset_counters=True)
        finish_elsewhere(rig, litres=25, number=2)
        pump = rig.station.pumps[1]
        assert pump.pending is not None
        assert pump.pending.transaction == 1  # the number the held sale had
        rig.wire.unplugged = False

        async def new_sale_closed() -> bool:
            return pump.pending is None

        await poll_until(rig, new_sale_closed, polls=20)
        payloads = await rig.journaled()
        assert journal_keys(payloads) == rig.device_transactions()
        assert [p["volume_ml"] for p in payloads] == [15_000, 25_000]


async def test_a_failing_close_is_retried_with_backoff_and_alarms_at_the_fifth_failure(
    tmp_path: Path,
) -> None:
    async with Rig(tmp_path, close_backoff_initial_s=1.0, close_backoff_max_s=4.0) as rig:
        rig.wire.drop_requests_with["PumpCloseTransaction"] = 1_000
        rig.customer(litres=10)
        stats = rig.controller.stats

        async def first_failure() -> bool:
            return stats.close_failures == 1

        await poll_until(rig, first_failure, seconds=0.2)
        # Polled every 0.2 s, the close is tried again only after 1 s, 2 s, then 4 s (the cap).
        tried_at = [rig.monotonic]
        for _ in range(60):
            await rig.poll(seconds=0.2)
            if stats.close_failures > len(tried_at):
                tried_at.append(rig.monotonic)
            if len(tried_at) == 4:
                break
        gaps = [b - a for a, b in zip(tried_at, tried_at[1:], strict=False)]
        assert len(gaps) == 3
        for gap, backoff in zip(gaps, (1.0, 2.0, 4.0), strict=True):
            assert backoff - 1e-6 <= gap <= backoff + 0.2 + 1e-6  # at the first poll after it
        assert "close_failing_fp1" not in alarm_names(rig)  # four failures: not yet

        async def fifth_failure() -> bool:
            return stats.close_failures == 5

        await poll_until(rig, fifth_failure, polls=30, seconds=0.2)
        assert "close_failing_fp1" in alarm_names(rig)
        rig.wire.drop_requests_with.clear()

        async def closed() -> bool:
            return rig.station.pumps[1].pending is None

        await poll_until(rig, closed, polls=30, seconds=0.2)
        assert "close_failing_fp1" not in alarm_names(rig)
        assert stats.closed == 1
        assert len(await rig.journaled()) == 1


# --- the meter ----------------------------------------------------------------------------


async def test_a_sale_authorised_elsewhere_is_checked_against_its_own_meter_reading(
    tmp_path: Path,
) -> None:
    """The start totalizer the edge read for one sale never serves the next one."""
    async with Rig(tmp_path) as rig:
        await rig.sell(litres=10)
        authorise_at_the_device(rig)  # a prepay: the edge sees no call, reads no totals
        await rig.sell(litres=20, number=2)
        first, second = await rig.journaled()
        assert first["totalizer_start_ml"] == 1_000_000
        assert second["totalizer_start_ml"] is None  # not read, and never guessed
        assert second["totalizer_end_ml"] == 1_030_000
        for sale in (first, second):
            assert FLAG_TOTALIZER_GAP not in sale["device_flags"]
            assert FLAG_TOTALIZER_MISMATCH not in sale["device_flags"]
        assert rig.controller.stats.totalizer_gaps == 0


async def test_without_a_start_reading_the_meter_is_continued_from_end_minus_volume(
    tmp_path: Path,
) -> None:
    async with Rig(tmp_path) as rig:
        await rig.sell(litres=10)
        rig.wire.drop_requests_with["PumpGetTotals"] = 1  # the start totals cannot be read
        await rig.sell(litres=20, number=2)
        second = (await rig.journaled())[1]
        assert second["totalizer_start_ml"] is None
        assert FLAG_TOTALIZER_GAP not in second["device_flags"]
        assert "totalizer_gap" not in alarm_names(rig)
        # ...and a real gap is still seen without a start reading.
        rig.station.pumps[1].nozzles[1].total_volume_ml += 700
        rig.wire.drop_requests_with["PumpGetTotals"] = 1
        await rig.sell(litres=5, number=3)
        third = (await rig.journaled())[2]
        assert FLAG_TOTALIZER_GAP in third["device_flags"]


async def test_a_meter_that_moves_more_than_the_sale_is_flagged(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        rig.customer(litres=10)
        pump = rig.station.pumps[1]

        async def fuelling() -> bool:
            return pump.phase is Phase.FUELLING

        await poll_until(rig, fuelling)
        pump.nozzles[1].total_volume_ml += 300  # the meter counts 300 ml the sale does not

        async def closed() -> bool:
            return rig.controller.stats.closed == 1

        await poll_until(rig, closed)
        (sale,) = await rig.journaled()
        assert sale["totalizer_end_ml"] - sale["totalizer_start_ml"] == sale["volume_ml"] + 300
        assert FLAG_TOTALIZER_MISMATCH in sale["device_flags"]


# --- settling and recovery ----------------------------------------------------------------


async def test_a_sale_settled_at_the_device_is_settled_once(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        rig.wire.lose_answers_to["PumpCloseTransaction"] = 1  # applied, but the answer is lost
        await rig.sell(litres=12)
        await rig.poll(5)
        stats = rig.controller.stats
        assert (stats.closed, stats.closed_elsewhere) == (0, 1)
        await rig.sell(litres=14, number=2)
        await rig.poll(5)
        assert (stats.closed, stats.closed_elsewhere) == (1, 1)
        assert await rig.journal.open_sales() == []


async def test_a_report_that_cannot_be_read_is_read_again(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        await rig.sell(litres=10)
        rig.wire.unplugged = True
        await rig.poll()
        sell_elsewhere(rig, litres=22, number=2)
        rig.wire.unplugged = False
        rig.wire.drop_requests_with["ReportGetPumpTransactions"] = 1  # the first read fails

        async def recovered() -> bool:
            return len(await rig.journaled()) == 2

        await poll_until(rig, recovered, polls=10)
        sales = await rig.journaled()
        assert journal_keys(sales) == rig.device_transactions()
        assert FLAG_FROM_REPORT in sales[1]["device_flags"]


async def test_a_fuelling_that_vanishes_between_two_polls_is_found_and_the_pump_serves_on(
    tmp_path: Path,
) -> None:
    async with Rig(tmp_path) as rig:
        rig.customer(litres=20)
        pump = rig.station.pumps[1]

        async def fuelling() -> bool:
            return rig.controller.states().get(1) == FpState.FUELLING

        await poll_until(rig, fuelling)

        # Between two polls the sale ends and another terminal closes it.
        def finished() -> bool:
            return pump.pending is not None

        run_forecourt_alone(rig, finished)
        close_at_the_device(rig)

        async def recovered() -> bool:
            return len(await rig.journaled()) == 1

        await poll_until(rig, recovered, polls=5)
        (sale,) = await rig.journaled()
        assert FLAG_FROM_REPORT in sale["device_flags"]
        assert (await stored(rig.journal, sale["sale_id"]))["settled_at"] is not None
        assert rig.controller.stats.recovered_from_report == 1
        assert rig.controller.states()[1] == FpState.IDLE
        await rig.sell(litres=15, number=2)  # the edge authorises the next customer
        assert journal_keys(await rig.journaled()) == rig.device_transactions()
        assert rig.controller.stats.closed == 1


async def test_a_sale_that_ends_while_its_pump_answers_oddly_is_found_when_it_answers(
    tmp_path: Path,
) -> None:
    def odd_volume(packet: dict[str, Any]) -> None:
        if packet["Data"]["Pump"] == 1:
            packet["Data"]["Volume"] = Decimal("1.234")  # three decimals, two configured

    async with Rig(tmp_path) as rig:
        rig.customer(litres=20)
        pump = rig.station.pumps[1]

        async def fuelling() -> bool:
            return pump.phase is Phase.FUELLING

        await poll_until(rig, fuelling)
        rig.wire.rewrites.append(("PumpFillingStatus", odd_volume))

        async def blind() -> bool:
            return rig.controller.states()[1] == FpState.ERROR

        await poll_until(rig, blind, polls=5)

        # While the edge cannot read the pump, the sale ends and another terminal closes it.
        def finished() -> bool:
            return pump.pending is not None

        run_forecourt_alone(rig, finished)
        close_at_the_device(rig)
        rig.wire.rewrites.clear()

        async def recovered() -> bool:
            return len(await rig.journaled()) == 1

        await poll_until(rig, recovered, polls=5)
        assert journal_keys(await rig.journaled()) == rig.device_transactions()
        assert rig.controller.stats.recovered_from_report == 1


async def test_a_sale_found_in_the_report_is_journaled_settled(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        await rig.sell(litres=10)
        rig.wire.unplugged = True
        await rig.poll()
        sell_elsewhere(rig, litres=22, number=2)
        rig.wire.unplugged = False
        await rig.poll(2)
        sales = await rig.journaled()
        assert len(sales) == 2
        assert (await stored(rig.journal, sales[1]["sale_id"]))["settled_at"] is not None
        assert await rig.journal.open_sales() == []


async def test_a_sale_still_held_at_the_pump_when_the_edge_starts_is_not_taken_as_closed(
    tmp_path: Path,
) -> None:
    """The edge was away when the sale finished; it finds it held at the pump. The report shows
    it too, but only the status path journals it, and it is settled only once closed."""
    async with Rig(tmp_path) as rig:
        finish_elsewhere(rig, litres=18, number=1)
        pump = rig.station.pumps[1]
        rig.wire.drop_requests_with["PumpCloseTransaction"] = 1_000  # it cannot be closed yet

        async def journaled() -> bool:
            return len(await rig.journaled()) == 1

        await poll_until(rig, journaled, polls=5)
        await rig.poll(3)
        (sale,) = await rig.journaled()
        assert FLAG_FROM_REPORT not in sale["device_flags"]
        assert rig.controller.stats.recovered_from_report == 0
        assert pump.pending is not None
        assert (await stored(rig.journal, sale["sale_id"]))["settled_at"] is None  # still held
        assert [o.sale_id for o in await rig.journal.open_sales()] == [sale["sale_id"]]
        rig.wire.drop_requests_with.clear()

        async def closed() -> bool:
            return pump.pending is None

        await poll_until(rig, closed, polls=5)
        assert (await stored(rig.journal, sale["sale_id"]))["settled_at"] is not None


# --- the journal ----------------------------------------------------------------------------


async def _journal(tmp_path: Path) -> Journal:
    journal = Journal(tmp_path / "edge.db", SystemClock())
    await journal.open()
    return journal


async def test_a_journaled_sale_is_known_by_its_pump_number_and_contents(tmp_path: Path) -> None:
    journal = await _journal(tmp_path)
    try:
        first = await journal.record_sale(DRAFT)
        known = await journal.known(DRAFT)
        assert known is not None
        assert (known.sale_id, known.new, known.settled) == (first.sale_id, False, False)
        assert await journal.known(replace(DRAFT, fuelling_point=2)) is None
        assert await journal.known(replace(DRAFT, device_txn=2)) is None
        assert await journal.known(replace(DRAFT, device_txn=None)) is None
    finally:
        await journal.close()


async def test_a_re_read_tells_whether_the_sale_is_already_settled(tmp_path: Path) -> None:
    journal = await _journal(tmp_path)
    try:
        first = await journal.record_sale(DRAFT)
        assert not (await journal.record_sale(DRAFT)).settled
        await journal.mark_settled(first.sale_id)
        again = await journal.record_sale(DRAFT)
        assert (again.new, again.sale_id, again.settled) == (False, first.sale_id, True)
    finally:
        await journal.close()


async def test_the_first_sale_of_a_new_epoch_is_flagged_in_its_journal_row(
    tmp_path: Path,
) -> None:
    journal = await _journal(tmp_path)
    try:
        await journal.record_sale(DRAFT)
        reused = await journal.record_sale(later(DRAFT, 1))
        assert reused.epoch_changed
        row = await journal.sale(reused.sale_id)
        assert row is not None
        assert FLAG_EPOCH_CHANGE in row["flags"].split(",")
        assert row["device_epoch"] == 1
    finally:
        await journal.close()


async def test_a_device_showing_its_first_boot_marker_stays_in_its_epoch(tmp_path: Path) -> None:
    """A device first seen without a boot marker (an older driver) that later shows one has
    not restarted: the marker is learnt, no epoch begins."""
    journal = await _journal(tmp_path)
    try:
        assert await journal.observe_device("pts-0001", None) == (0, False)
        assert await journal.observe_device("pts-0001", "boot-a") == (0, False)
        assert await journal.observe_device("pts-0001", "boot-a") == (0, False)
        assert await journal.observe_device("pts-0001", "boot-b") == (1, True)
    finally:
        await journal.close()


async def test_a_restart_is_one_epoch_however_often_the_new_marker_is_seen(
    tmp_path: Path,
) -> None:
    journal = await _journal(tmp_path)
    try:
        assert await journal.observe_device("pts-0001", "boot-a") == (0, False)
        assert await journal.observe_device("pts-0001", "boot-b") == (1, True)
        for _ in range(3):  # every reconnect asks again
            assert await journal.observe_device("pts-0001", "boot-b") == (1, False)
        assert await journal.device_epoch("pts-0001") == 1
    finally:
        await journal.close()


async def test_hqs_answer_is_stored_with_its_flags(tmp_path: Path) -> None:
    journal = await _journal(tmp_path)
    try:
        a = await journal.record_sale(DRAFT)
        b = await journal.record_sale(replace(DRAFT, device_txn=2))
        await journal.record_answers(
            [
                (a.sale_id, "quarantined", ["grade_mismatch", "amount_mismatch"]),
                (b.sale_id, "created", []),
            ]
        )
        row_a, row_b = await journal.sale(a.sale_id), await journal.sale(b.sale_id)
        assert row_a is not None
        assert row_b is not None
        assert (row_a["hq_status"], row_a["hq_flags"]) == (
            "quarantined",
            "grade_mismatch,amount_mismatch",
        )
        assert (row_b["hq_status"], row_b["hq_flags"]) == ("created", "")
        assert row_a["hq_acked_at"] is not None
        assert await journal.outbox_usage() == (0, 0, 0)
    finally:
        await journal.close()


# --- the fuelling-point machine and the identity of a transaction ---------------------------


def test_a_finished_sale_seen_calling_was_closed_behind_our_back() -> None:
    """A customer already lifts the next nozzle: the pump serves on, through CLOSED."""
    m = FuellingPointMachine(1, state=FpState.FINISHED_UNPAID)
    assert m.observe(PumpState.CALLING) is FpState.CALLING
    assert m.history[-2:] == [
        (FpState.FINISHED_UNPAID, FpState.CLOSED),
        (FpState.CLOSED, FpState.CALLING),
    ]
    assert m.refused == 0


def test_a_report_of_the_state_the_machine_is_in_changes_nothing() -> None:
    m = FuellingPointMachine(1, state=FpState.FINISHED_UNPAID)
    assert isinstance(m.observe(PumpState.FUELLING), Refusal)
    history = list(m.history)
    # The device flickers between the held sale and the impossible report: one episode.
    for _ in range(3):
        assert m.observe(PumpState.END_OF_TRANSACTION) is FpState.FINISHED_UNPAID
        assert m.observe(PumpState.FUELLING) is FpState.FINISHED_UNPAID
    assert m.refused == 1
    assert m.history == history
    assert m.move(FpState.FINISHED_UNPAID) is None


def _fingerprint(**changes: Any) -> str:
    values: dict[str, Any] = {
        "nozzle": 1,
        "volume_ml": 40_000,
        "amount_minor": 30_200,
        "unit_price_mmu": 755_000,
        "ended_at": datetime(2026, 11, 25, 1, 0, 7, tzinfo=UTC),
        "totalizer_end_ml": 1_040_000,
    }
    values.update(changes)
    return transaction_fingerprint(**values)


def test_every_part_of_a_dispensing_tells_two_sales_under_one_number_apart() -> None:
    same = _fingerprint()
    assert _fingerprint() == same
    # the same end second read again (the device keeps whole seconds)
    assert _fingerprint(ended_at=datetime(2026, 11, 25, 1, 0, 7, 900_000, tzinfo=UTC)) == same
    others = {
        "nozzle": _fingerprint(nozzle=2),
        "volume": _fingerprint(volume_ml=40_010),
        "amount": _fingerprint(amount_minor=30_201),
        "price": _fingerprint(unit_price_mmu=755_001),
        "end time": _fingerprint(ended_at=datetime(2026, 11, 25, 1, 0, 8, tzinfo=UTC)),
        "end totalizer": _fingerprint(totalizer_end_ml=1_080_000),
        "no totalizer": _fingerprint(totalizer_end_ml=None),
    }
    assert same not in others.values()
    assert len(set(others.values())) == len(others)


# --- uploads: only HQ's verdict on an item changes that item --------------------------------

Answer = Callable[[list[dict[str, Any]]], httpx.Response]


def hq_answering(answer: Answer, seen: list[int] | None = None) -> HqClient:
    """An HQ that answers each batch with ``answer(sales)``; ``seen`` gets each batch's size."""

    async def handle(request: httpx.Request) -> httpx.Response:
        sales = json.loads(request.content)["sales"]
        if seen is not None:
            seen.append(len(sales))
        return answer(sales)

    return HqClient("http://hq", "S001", "x" * 32, transport=httpx.MockTransport(handle))


def results(sales: list[dict[str, Any]], *statuses: str) -> list[dict[str, Any]]:
    return [
        {"index": i, "sale_id": s["sale_id"], "status": status, "flags": []}
        for i, (s, status) in enumerate(zip(sales, statuses, strict=True))
    ]


async def outbox_rows(journal: Journal) -> list[tuple[Any, ...]]:
    def read() -> list[tuple[Any, ...]]:
        with journal.engine.connect() as conn:
            outbox = conn.execute(sa.select(outbox_t).order_by(outbox_t.c.seq)).all()
            answers = conn.execute(
                sa.select(journal_t.c.seq, journal_t.c.hq_status, journal_t.c.hq_acked_at)
            ).all()
            return [tuple(r) for r in outbox] + [tuple(r) for r in answers]

    return await journal._run(read)


async def test_every_final_verdict_takes_its_item_out_of_the_outbox(tmp_path: Path) -> None:
    def answer(sales: list[dict[str, Any]]) -> httpx.Response:
        statuses = ("created", "duplicate", "quarantined", "conflict")
        return httpx.Response(200, json={"results": results(sales, *statuses)})

    journal = await _journal(tmp_path)
    client = hq_answering(answer)
    try:
        sales = [await journal.record_sale(replace(DRAFT, device_txn=n)) for n in range(1, 5)]
        agent = SyncAgent(journal, client)
        assert await agent.upload_once() == 4
        assert await journal.outbox_usage() == (0, 0, 0)
        statuses = [(await stored(journal, s.sale_id))["hq_status"] for s in sales]
        assert statuses == ["created", "duplicate", "quarantined", "conflict"]
        assert agent.stats.uploaded == 4
        assert agent.upload_alarm is None
    finally:
        await client.close()
        await journal.close()


async def test_a_verdict_the_edge_does_not_know_keeps_the_item_and_raises_the_alarm(
    tmp_path: Path,
) -> None:
    def answer(sales: list[dict[str, Any]]) -> httpx.Response:
        statuses = ["created"] * len(sales)
        statuses[-1] = "parked"  # a verdict from a newer HQ
        return httpx.Response(200, json={"results": results(sales, *statuses)})

    journal = await _journal(tmp_path)
    client = hq_answering(answer)
    try:
        first = await journal.record_sale(DRAFT)
        second = await journal.record_sale(replace(DRAFT, device_txn=2))
        agent = SyncAgent(journal, client, backoff_initial_s=0.1)
        assert await agent.upload_once() == 1
        assert [p.sale_id for p in await journal.pending_uploads(10)] == [second.sale_id]
        assert (await stored(journal, first.sale_id))["hq_status"] == "created"
        assert (await stored(journal, second.sale_id))["hq_status"] is None
        assert agent.upload_alarm == "HQ answer unreadable"
        assert agent.stats.failures == 1
        assert agent.backoff_cap() == 0.2  # it backs off rather than ask again at once
        assert agent.stats.uploaded == 1
    finally:
        await client.close()
        await journal.close()


async def test_results_in_any_order_are_applied_to_the_items_they_name(tmp_path: Path) -> None:
    def answer(sales: list[dict[str, Any]]) -> httpx.Response:
        paired = results(sales, "created", "refused", "created")
        paired[1]["errors"] = [{"loc": ["volume_ml"]}]
        return httpx.Response(200, json={"results": list(reversed(paired))})

    journal = await _journal(tmp_path)
    client = hq_answering(answer)
    try:
        sales = [await journal.record_sale(replace(DRAFT, device_txn=n)) for n in range(1, 4)]
        agent = SyncAgent(journal, client)
        assert await agent.upload_once() == 3
        statuses = [(await stored(journal, s.sale_id))["hq_status"] for s in sales]
        assert statuses == ["created", None, "created"]
        assert agent.stats.refused == 1
        pending, _, rejected = await journal.outbox_usage()
        assert (pending, rejected) == (1, 1)  # the refused one is kept, marked
        assert await journal.pending_uploads(10) == []
    finally:
        await client.close()
        await journal.close()


def _misnamed(sales: list[dict[str, Any]]) -> httpx.Response:
    paired = results(sales, "created", "refused")
    paired[0]["sale_id"], paired[1]["sale_id"] = paired[1]["sale_id"], paired[0]["sale_id"]
    return httpx.Response(200, json={"results": paired})


def _repeated_index(sales: list[dict[str, Any]]) -> httpx.Response:
    paired = results(sales, "created", "created")
    paired[1]["index"] = 0
    del paired[1]["sale_id"]
    return httpx.Response(200, json={"results": paired})


@pytest.mark.parametrize(
    "answer", [_misnamed, _repeated_index], ids=["sale-ids-swapped", "index-twice"]
)
async def test_an_answer_that_cannot_be_matched_to_the_items_changes_no_item(
    tmp_path: Path, answer: Answer
) -> None:
    journal = await _journal(tmp_path)
    client = hq_answering(answer)
    try:
        for n in (1, 2):
            await journal.record_sale(replace(DRAFT, device_txn=n))
        before = await outbox_rows(journal)
        agent = SyncAgent(journal, client)
        assert await agent.upload_once() == 0
        assert await outbox_rows(journal) == before
        assert agent.upload_alarm == "HQ answer unreadable"
        assert (agent.stats.uploaded, agent.stats.refused, agent.stats.failures) == (0, 0, 1)
    finally:
        await client.close()
        await journal.close()


async def test_after_a_413_the_batch_grows_back_after_a_run_of_successes(tmp_path: Path) -> None:
    def answer(sales: list[dict[str, Any]]) -> httpx.Response:
        if len(sales) > 2:
            return httpx.Response(413, text="<h1>413</h1>")
        return httpx.Response(200, json={"results": results(sales, *["created"] * len(sales))})

    sizes: list[int] = []
    journal = await _journal(tmp_path)
    client = hq_answering(answer, sizes)
    try:
        total = 2 * REGROW_AFTER_BATCHES + 8
        for n in range(1, total + 1):
            await journal.record_sale(replace(DRAFT, device_txn=n))
        agent = SyncAgent(journal, client, batch_size=4)
        for _ in range(2 * REGROW_AFTER_BATCHES):
            await agent.upload_once()
            if len(sizes) > REGROW_AFTER_BATCHES + 1:
                break
        # 4 refused, then 2 at a time; after REGROW_AFTER_BATCHES of those, 4 are tried again.
        assert sizes == [4] + [2] * REGROW_AFTER_BATCHES + [4]
        assert agent.stats.uploaded == 2 * REGROW_AFTER_BATCHES
    finally:
        await client.close()
        await journal.close()


async def test_after_a_restart_the_newest_open_sale_of_a_pump_is_kept_until_it_is_closed(
    tmp_path: Path,
) -> None:
    """The journal of an earlier life holds two unclosed sales for pump 1: an old one the pump
    no longer shows, and the one it holds now. The old one is settled; the held one stays
    open until its close goes through."""
    async with Rig(tmp_path, auto_settle=False) as rig:
        await rig.poll()  # the first life starts: it has nothing open yet
        stale = await rig.journal.record_sale(
            replace(DRAFT, device_id=rig.controller.device_id, device_txn=99)
        )
        rig.customer(litres=12)

        async def journaled() -> bool:
            return len(await rig.journaled()) == 2

        await poll_until(rig, journaled)
        held = (await rig.journaled())[1]["sale_id"]
        assert sorted(o.sale_id for o in await rig.journal.open_sales()) == sorted(
            [stale.sale_id, held]
        )

        # The edge restarts; its closes do not arrive at first.
        rig.controller = ForecourtController(
            rig.driver,
            rig.journal,
            lambda: rig.snap,
            rig.clock,
            monotonic=lambda: rig.monotonic,
            close_backoff_initial_s=0.0,
            close_backoff_max_s=0.0,
        )
        rig.wire.drop_requests_with["PumpCloseTransaction"] = 2
        await rig.poll(2)
        assert rig.station.pumps[1].pending is not None
        assert (await stored(rig.journal, stale.sale_id))["settled_at"] is not None
        assert (await stored(rig.journal, held))["settled_at"] is None  # the pump still holds it
        await rig.poll()
        assert rig.station.pumps[1].pending is None
        assert (await stored(rig.journal, held))["settled_at"] is not None
        assert rig.controller.stats.closed == 1


# --- who the controller is ------------------------------------------------------------------


def controller_up_for_a_while(rig: Rig) -> None:
    """The controller has been running ten minutes when the edge first asks who it is (its
    driver tells a restart by an uptime lower than the one it last read)."""
    rig.clock.advance(600)
    rig.station.advance(rig.clock.now())


async def _away_while(rig: Rig, change: Callable[[], None]) -> None:
    """The controller goes away for two minutes; ``change`` happens to it meanwhile."""
    rig.wire.unplugged = True
    await rig.poll()
    rig.clock.advance(120)  # past the boot marker's one-minute resolution
    change()
    rig.wire.unplugged = False


async def test_a_controller_restart_seen_by_its_boot_marker_is_a_new_epoch_and_an_alarm(
    tmp_path: Path,
) -> None:
    async with Rig(tmp_path) as rig:
        controller_up_for_a_while(rig)
        await rig.sell(litres=10)
        assert rig.controller.epoch == 0

        def restart_keeping_counters() -> None:
            rig.restart_controller(reset_counters=False)

        await _away_while(rig, restart_keeping_counters)
        await rig.sell(litres=11, number=2)
        assert "controller_restarted" in alarm_names(rig)
        assert rig.controller.stats.epoch_changes == 1
        assert rig.controller.epoch == 1
        first, second = await rig.journaled()
        assert (first["device_epoch"], second["device_epoch"]) == (0, 1)
        assert second["device_txn"] == 2  # counters kept: no re-used number, no epoch flag
        assert FLAG_EPOCH_CHANGE not in second["device_flags"]


async def test_a_restart_seen_only_by_a_re_used_number_reads_every_pumps_report(
    tmp_path: Path,
) -> None:
    """The controller restarts between two polls (the edge sees no outage) with its counters
    reset, and a sale on pump 2 was closed elsewhere meanwhile. The re-used number on pump 1
    shows the new epoch; then every pump's report is read, and pump 2's sale is found."""
    async with Rig(tmp_path) as rig:
        await rig.sell(litres=10)
        sell_elsewhere(rig, litres=30, number=2, pump=2)
        rig.restart_controller(reset_counters=True)
        await rig.sell(litres=12, number=3)
        assert rig.controller.stats.epoch_changes == 1

        async def found() -> bool:
            return len(await rig.journaled()) == 3

        await poll_until(rig, found, polls=5)
        sales = await rig.journaled()
        assert journal_keys(sales) == rig.device_transactions()
        assert [s["fuelling_point"] for s in sales if FLAG_FROM_REPORT in s["device_flags"]] == [2]


async def test_a_controller_swapped_while_away_raises_an_alarm(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        controller_up_for_a_while(rig)
        await rig.sell(litres=10)
        before = rig.controller.device_id

        def swap() -> None:
            rig.config = {**rig.config, "unique_identifier": 2}
            rig.restart_controller(reset_counters=True)
            for pump in rig.station.pumps.values():
                pump.memory.clear()  # another controller: it never saw the old sales

        await _away_while(rig, swap)
        await rig.sell(litres=11, number=2)
        assert rig.controller.device_id != before
        assert len(await rig.journaled()) == 2  # a new device's numbers: nothing collides
        assert "controller_replaced" in alarm_names(rig)


async def test_an_unreadable_controller_identifier_journals_no_sale_twice(
    tmp_path: Path,
) -> None:
    def no_id(packet: dict[str, Any]) -> None:
        packet["Data"].pop("Id", None)

    async with Rig(tmp_path) as rig:
        await rig.sell(litres=10)
        await rig.sell(litres=12, number=2)
        rig.wire.unplugged = True
        await rig.poll()
        rig.wire.unplugged = False
        rig.wire.rewrites.append(("UniqueIdentifier", no_id))  # one odd answer on reconnect
        await rig.poll(3)
        rig.wire.rewrites.clear()
        await rig.sell(litres=14, number=3)
        assert journal_keys(await rig.journaled()) == rig.device_transactions()
