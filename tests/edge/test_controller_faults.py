"""The edge controller against a forecourt that misbehaves: every finished sale is journaled
exactly once and nothing unjournaled is ever closed, whatever the controller or the cable do.

Packet shapes come from the simulator, which follows the Technotrade jsonPTS material listed
in ../shared/protocols.md section 2 (PumpEndOfTransactionStatus with Transaction/TotalVolume;
ReportGetPumpTransactions; PumpCloseTransaction {Pump, Transaction}).
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from forecourt.edge.controller import FLAG_FROM_REPORT, FLAG_TOTALIZER_GAP
from forecourt.edge.domain import FpState
from forecourt.edge.drivers import FLAG_INEXACT, FLAG_NO_TOTALIZER
from forecourt.edge.journal import FLAG_EPOCH_CHANGE
from tests.edge.forecourt_rig import Rig


def journal_keys(payloads: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
    return sorted((p["fuelling_point"], p["device_txn"], p["volume_ml"]) for p in payloads)


async def test_a_controller_restart_with_counters_reset_loses_no_sale(tmp_path: Path) -> None:
    async with Rig(tmp_path) as rig:
        for n in range(3):
            await rig.sell(litres=10 + n, number=n)
        rig.restart_controller(reset_counters=True)
        for n in range(3):
            await rig.sell(litres=30 + n, number=10 + n)
        payloads = await rig.journaled()
        # Dispensers, journal: the same six sales, numbers 1..3 twice on pump 1.
        assert journal_keys(payloads) == rig.device_transactions()
        assert len(payloads) == 6
        assert [p["device_txn"] for p in payloads] == [1, 2, 3, 1, 2, 3]
        assert [p["device_epoch"] for p in payloads][3:] == [1, 1, 1]
        assert FLAG_EPOCH_CHANGE in payloads[3]["device_flags"]
        assert rig.controller.stats.epoch_changes == 1  # one restart, one new epoch
        assert {a["name"] for a in rig.controller.alarms.as_json()} & {
            "device_epoch_change",
            "controller_restarted",
        }
        # Nothing was closed that was not journaled first: every close named a journaled sale.
        assert rig.controller.stats.closed == 6


async def test_a_restart_while_a_sale_waits_to_be_closed_journals_it_once(
    tmp_path: Path,
) -> None:
    async with Rig(tmp_path) as rig:
        rig.wire.drop_requests_with["PumpCloseTransaction"] = 1_000  # the closes never arrive
        rig.customer(litres=15)
        for _ in range(200):
            await rig.poll()
            if len(await rig.journaled()) == 1:
                break
        assert rig.controller.states()[1] == FpState.FINISHED_UNPAID
        rig.wire.drop_requests_with.clear()
        rig.restart_controller(reset_counters=True)
        await rig.poll(3)
        assert len(await rig.journaled()) == 1  # the held sale is re-read, not doubled
        assert rig.station.pumps[1].pending is None  # ...and closed
        await rig.sell(litres=25, number=2)  # number 1 again, another sale
        assert journal_keys(await rig.journaled()) == rig.device_transactions()


async def test_a_lost_close_is_retried_and_the_pump_takes_the_next_customer(
    tmp_path: Path,
) -> None:
    async with Rig(tmp_path) as rig:
        rig.wire.drop_requests_with["PumpCloseTransaction"] = 3
        await rig.sell(litres=12)
        assert rig.controller.stats.close_failures == 3
        await rig.sell(litres=13, number=2)
        assert len(await rig.journaled()) == 2
        assert rig.station.pumps[1].pending is None


async def test_a_close_whose_answer_is_lost_is_settled_when_the_pump_moves_on(
    tmp_path: Path,
) -> None:
    async with Rig(tmp_path) as rig:
        rig.wire.lose_answers_to["PumpCloseTransaction"] = 1
        await rig.sell(litres=12)
        assert rig.controller.stats.closed_elsewhere == 1
        row = await rig.journal.sale((await rig.journaled())[0]["sale_id"])
        assert row is not None
        assert row["settled_at"] is not None
        await rig.sell(litres=14, number=2)
        assert journal_keys(await rig.journaled()) == rig.device_transactions()


async def test_the_edge_starts_with_the_controller_away_and_recovers_when_it_answers(
    tmp_path: Path,
) -> None:
    async with Rig(tmp_path, pumps=(1, 2, 3)) as rig:  # pump 3 is not on this controller
        rig.wire.unplugged = True
        assert await rig.controller.recover() == 0  # no exception, nothing journaled
        assert set(rig.controller.states().values()) == {FpState.OFFLINE}
        assert "controller_unreachable" in {a["name"] for a in rig.controller.alarms.as_json()}
        rig.wire.unplugged = False
        await rig.sell(litres=11)
        await rig.poll()
        states = rig.controller.states()
        assert states[3] == FpState.ERROR  # the unknown pump only: the controller refuses it
        assert states[2] == FpState.IDLE
        assert "controller_unreachable" not in {a["name"] for a in rig.controller.alarms.as_json()}
        assert len(await rig.journaled()) == 1


async def test_an_odd_value_on_one_pumps_status_blinds_only_that_pump(tmp_path: Path) -> None:
    def odd_volume(packet: dict[str, Any]) -> None:
        if packet["Data"]["Pump"] == 2:
            packet["Data"]["Volume"] = Decimal("1.234")  # three decimals, two configured

    async with Rig(tmp_path) as rig:
        rig.wire.rewrites.append(("PumpFillingStatus", odd_volume))
        rig.customer(pump_grade=95, litres=30, number=1)  # goes to pump 2 (95 only there)
        for _ in range(60):
            await rig.poll()
            if rig.controller.states().get(2) == FpState.ERROR:
                break
        assert rig.controller.states()[2] == FpState.ERROR
        await rig.sell(litres=10, number=2)  # pump 1 sells on regardless
        assert rig.controller.states()[1] != FpState.ERROR
        rig.wire.rewrites.clear()
        for _ in range(200):
            await rig.poll()
            if len(await rig.journaled()) == 2:
                break
        assert journal_keys(await rig.journaled()) == rig.device_transactions()


async def test_a_finished_sale_with_an_inexact_amount_is_journaled_as_received(
    tmp_path: Path,
) -> None:
    def odd_amount(packet: dict[str, Any]) -> None:
        packet["Data"]["Amount"] = Decimal(packet["Data"]["Amount"]) + Decimal("0.005")

    async with Rig(tmp_path) as rig:
        rig.wire.rewrites.append(("PumpEndOfTransactionStatus", odd_amount))
        await rig.sell(litres=10)
        (sale,) = await rig.journaled()
        assert FLAG_INEXACT in sale["device_flags"]
        assert "Amount" in sale["device_raw"]
        assert Decimal(sale["device_raw"]["Amount"]).as_tuple().exponent == -3
        assert "inexact_device_value" in {a["name"] for a in rig.controller.alarms.as_json()}


async def test_a_finished_sale_without_total_volume_is_journaled_and_closed(
    tmp_path: Path,
) -> None:
    def no_totals(packet: dict[str, Any]) -> None:
        packet["Data"].pop("TotalVolume", None)
        packet["Data"].pop("TotalAmount", None)

    async with Rig(tmp_path) as rig:
        rig.wire.rewrites.append(("PumpEndOfTransactionStatus", no_totals))
        await rig.sell(litres=10)
        await rig.sell(litres=11, number=2)
        sales = await rig.journaled()
        assert len(sales) == 2
        assert all(s["totalizer_end_ml"] is None for s in sales)
        assert all(FLAG_NO_TOTALIZER in s["device_flags"] for s in sales)


async def test_a_sale_closed_elsewhere_while_the_edge_was_away_is_found_in_the_report(
    tmp_path: Path,
) -> None:
    async with Rig(tmp_path) as rig:
        await rig.sell(litres=10)
        # The edge is away; another terminal authorises, and closes, a sale on pump 1.
        rig.customer(litres=22, number=2)
        for _ in range(200):
            rig.clock.advance(0.5)
            rig.station.advance(rig.clock.now())
            pump = rig.station.pumps[1]
            if pump.phase.value == "calling":
                rig.station.handle_items(
                    [
                        {
                            "Id": 1,
                            "Type": "PumpAuthorize",
                            "Data": {"Pump": 1, "Nozzle": 1, "Type": "FullTank"},
                        }
                    ],
                    rig.clock.now(),
                )
            if pump.pending is not None:
                rig.station.handle_items(
                    [
                        {
                            "Id": 2,
                            "Type": "PumpCloseTransaction",
                            "Data": {"Pump": 1, "Transaction": pump.pending.transaction},
                        }
                    ],
                    rig.clock.now(),
                )
                break
        assert len(rig.device_transactions()) == 2
        rig.wire.unplugged = True
        await rig.poll()
        rig.wire.unplugged = False
        await rig.poll(2)  # reconnect: the report is read
        sales = await rig.journaled()
        assert journal_keys(sales) == rig.device_transactions()
        assert FLAG_FROM_REPORT in sales[1]["device_flags"]
        assert rig.controller.stats.recovered_from_report == 1


async def test_a_pump_still_showing_the_call_is_not_authorised_twice(tmp_path: Path) -> None:
    lagging = {"polls": 0}

    def still_calling(packet: dict[str, Any]) -> None:
        # The device lags: for three polls after the authorisation it still shows the call.
        data = packet["Data"]
        if data.get("Pump") == 1 and lagging["polls"] > 0 and data.get("Volume") == 0:
            lagging["polls"] -= 1
            packet["Type"] = "PumpIdleStatus"
            packet["Data"] = {"Pump": 1, "NozzleUp": 1, "Nozzle": 1, "Request": ""}

    async with Rig(tmp_path) as rig:
        rig.wire.rewrites.append(("PumpFillingStatus", still_calling))
        rig.customer(litres=10)
        for _ in range(100):
            await rig.poll(seconds=0.2)
            if rig.controller.stats.authorisations:
                lagging["polls"] = 3
                break
        await rig.poll(3, seconds=0.2)
        assert lagging["polls"] == 0  # the device did lag
        for _ in range(200):
            await rig.poll()
            if rig.controller.stats.closed == 1:
                break
        await rig.sell(litres=10, number=2)
        assert rig.controller.stats.closed == 2
        assert rig.wire.sent.count("PumpAuthorize") == 2  # one per customer, never two
        assert rig.controller.stats.refused_moves == 1  # one lagging episode, counted once


async def test_the_start_totalizer_is_read_from_the_meter_and_a_gap_is_an_alarm(
    tmp_path: Path,
) -> None:
    async with Rig(tmp_path) as rig:
        await rig.sell(litres=10)
        (first,) = await rig.journaled()
        assert first["totalizer_start_ml"] == 1_000_000  # read by PumpGetTotals, not derived
        assert first["totalizer_end_ml"] == 1_010_000
        # The meter moves 500 ml with no sale seen by the edge (drift, or a missed sale).
        rig.station.pumps[1].nozzles[1].total_volume_ml += 500
        await rig.sell(litres=10, number=2)
        second = (await rig.journaled())[1]
        assert second["totalizer_start_ml"] == 1_010_500
        assert FLAG_TOTALIZER_GAP in second["device_flags"]
        assert FLAG_TOTALIZER_GAP not in first["device_flags"]
        assert rig.controller.stats.totalizer_gaps == 1
        assert "totalizer_gap" in {a["name"] for a in rig.controller.alarms.as_json()}


async def test_an_authorisation_nothing_is_dispensed_on_is_released_in_time(
    tmp_path: Path,
) -> None:
    """A pump authorised for a customer who drove off stays reserved for nobody (and a demo
    never finishes draining): the edge releases it after the authorisation timeout."""
    async with Rig(tmp_path, authorisation_timeout=timedelta(minutes=2)) as rig:
        rig.station.handle_items(
            [{"Id": 1, "Type": "PumpAuthorize", "Data": {"Pump": 2, "Type": "FullTank"}}],
            rig.clock.now(),
        )
        await rig.poll(seconds=1.0)
        assert rig.controller.states()[2] == FpState.AUTHORISED
        await rig.poll(100, seconds=1.0)  # 100 s: not yet
        assert rig.controller.stats.authorisations_cancelled == 0
        await rig.poll(25, seconds=1.0)
        assert rig.controller.stats.authorisations_cancelled == 1
        assert rig.controller.states()[2] == FpState.IDLE
        assert rig.station.pumps[2].auth is None
        await rig.sell(pump_grade=95, litres=10)  # and it sells again
        assert len(await rig.journaled()) == 1
