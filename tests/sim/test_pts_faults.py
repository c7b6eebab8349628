"""The simulator's fault injection: each fault on the model, through its control API, and what
the real driver makes of it."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from forecourt.edge.drivers import FLAG_INEXACT, FLAG_NO_TOTALIZER, Preset, PumpState
from forecourt.protocols.jsonpts.codec import PtsErrorCode
from forecourt.protocols.jsonpts.driver import JsonPtsDriver
from forecourt.sim.customers import SimConfigError
from forecourt.sim.pts_controller import ControllerConfig, create_app
from tests.sim.support import T0, Forecourt, car, config_dict
from tests.support import ManualClock

E = PtsErrorCode
REPORT_DAY = {"DateTimeStart": "2026-11-25T00:00:00", "DateTimeEnd": "2026-11-25T23:59:59"}


def with_faults(**faults: Any) -> Forecourt:
    return Forecourt(config_dict(faults=faults))


def close(pump: int, transaction: int) -> dict[str, Any]:
    return {
        "Id": 1,
        "Type": "PumpCloseTransaction",
        "Data": {"Pump": pump, "Transaction": transaction},
    }


# --------------------------------------------------------------------------- numbering


def test_transaction_numbers_wrap_after_the_configured_maximum():
    config = config_dict(faults={"transaction_wrap": 3})
    del config["pumps"][1]["first_transaction"]
    forecourt = Forecourt(config)
    numbers = []
    for index in range(4):
        numbers.append(forecourt.sell(number=index, at=index * 1000))
        forecourt.send("PumpCloseTransaction", Pump=1, Transaction=numbers[-1])
    assert numbers == [1, 2, 3, 1]
    report = forecourt.send("ReportGetPumpTransactions", Pump=1, **REPORT_DAY)
    assert [item["Transaction"] for item in report.data] == [1, 2, 3, 1]


def test_a_first_transaction_beyond_the_wrap_is_a_config_error():
    config = config_dict(faults={"transaction_wrap": 100})  # pump 2 starts at 500
    with pytest.raises(SimConfigError):
        ControllerConfig.from_json(config)


# --------------------------------------------------------------------------- lost closes


def test_every_nth_close_is_lost_in_transit_with_its_whole_post():
    forecourt = with_faults(drop_close_every=2)
    first = forecourt.sell(number=1)
    assert forecourt.station.receive([close(1, first)], forecourt.now).status == 200
    second = forecourt.sell(number=2, at=1000)
    price_change = {
        "Id": 2,
        "Type": "PumpSetPrices",
        "Data": {"Pump": 1, "Prices": [Decimal("9.99")]},
    }
    lost = forecourt.station.receive([close(1, second), price_change], forecourt.now)
    assert (lost.status, lost.replies) == (503, [])
    assert forecourt.status().type == "PumpEndOfTransactionStatus"  # not applied
    assert forecourt.station.pumps[1].nozzles[1].price_mmu == 789_000  # nor its sibling
    retried = forecourt.station.receive([close(1, second)], forecourt.now)  # the third close
    assert retried.status == 200
    assert forecourt.status().type == "PumpIdleStatus"
    assert forecourt.station.stats["closes_dropped"] == 1


def test_every_nth_close_reply_is_lost_although_the_close_was_applied():
    forecourt = with_faults(lose_close_reply_every=1)
    number = forecourt.sell()
    lost = forecourt.station.receive([close(1, number)], forecourt.now)
    assert (lost.status, lost.replies) == (503, [])
    assert forecourt.status().type == "PumpIdleStatus"  # applied
    again = forecourt.station.receive([close(1, number)], forecourt.now)
    assert again.status == 503  # every close reply is lost with n = 1...
    assert forecourt.station.stats["close_replies_lost"] == 2
    forecourt.station.set_faults(forecourt.station.faults_with({"lose_close_reply_every": None}))
    (refused,) = forecourt.station.receive([close(1, number)], forecourt.now).replies
    assert refused.code == E.JSONPTS_ERROR_PUMP_STATUS_NOT_END_OF_TRANSACTION  # ...and it was


# --------------------------------------------------------------------------- odd numbers


def test_odd_decimals_pumps_show_a_filling_volume_with_one_decimal_too_many():
    forecourt = with_faults(odd_decimals_pumps=[1])
    forecourt.station.arrive(car(litres="40"))
    forecourt.at(20).send("PumpAuthorize", Pump=1, Type="FullTank")
    assert forecourt.status().data["Volume"] == 0  # authorised: nothing odd to show yet
    assert forecourt.at(22 + 30).status().data["Volume"] == Decimal("20.005")
    finished = forecourt.at(200).status()
    assert finished.data["Volume"] == Decimal("40.00")  # the finished record is exact


def test_odd_decimals_finished_records_an_amount_finer_than_a_fen_and_reports_it_so():
    forecourt = with_faults(odd_decimals_finished=[1])
    before = forecourt.send("PumpGetTotals", Pump=1, Nozzle=1).data["Amount"]
    forecourt.sell(litres="40")  # 40 L at 7.89 = 315.60
    status = forecourt.status().data
    assert status["Amount"] == Decimal("315.604")
    report = forecourt.send("ReportGetPumpTransactions", Pump=1, **REPORT_DAY).data
    assert report[0]["Amount"] == Decimal("315.604")  # the device's record, the same odd value
    after = forecourt.send("PumpGetTotals", Pump=1, Nozzle=1).data["Amount"]
    assert after - before == Decimal("315.60")  # the totalizer moved by the whole amount


def test_omit_total_volume_leaves_the_totalizers_out_of_finished_transactions():
    forecourt = with_faults(omit_total_volume=True)
    forecourt.sell()
    status = forecourt.status().data
    report = forecourt.send("ReportGetPumpTransactions", Pump=1, **REPORT_DAY).data
    for fields in (status, report[0]):
        assert "TotalVolume" not in fields
        assert "TotalAmount" not in fields
        assert fields["Volume"] == Decimal("10.00")


# --------------------------------------------------------------------------- lagging call


def test_an_authorised_pump_keeps_showing_the_call_for_the_configured_polls():
    forecourt = with_faults(calling_after_authorize_polls=2)
    forecourt.station.arrive(car())
    forecourt.at(10)
    assert forecourt.send("PumpAuthorize", Pump=1, Type="FullTank").data["Transaction"] == 1
    lagging = [forecourt.status() for _ in range(2)]
    assert [(s.type, s.data["NozzleUp"]) for s in lagging] == [("PumpIdleStatus", 1)] * 2
    # The edge, seeing a call, authorises again: refused, the pump is authorised already.
    again = forecourt.send("PumpAuthorize", Pump=1, Type="FullTank")
    assert (again.error, again.code) == (True, E.JSONPTS_ERROR_DUPLICATED_AUTHORIZATION_REQUEST)
    assert forecourt.status().type == "PumpFillingStatus"
    stats = forecourt.station.stats
    assert (stats["double_authorisations"], stats["lagged_status_polls"]) == (1, 2)


# --------------------------------------------------------------------------- control API


@pytest.fixture
def app_and_clock():
    clock = ManualClock()
    return create_app(ControllerConfig.from_json(config_dict()), clock), clock


async def control(app, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://sim") as http:
        return await http.post("/sim/control", json=body)


async def test_faults_set_at_runtime_merge_and_show_in_health(app_and_clock):
    app, _ = app_and_clock
    first = await control(app, {"faults": {"drop_close_every": 3, "odd_decimals_pumps": [2]}})
    assert first.status_code == 200
    counters = first.json()["stats"]
    assert (counters["closes_dropped"], counters["double_authorisations"]) == (0, 0)
    merged = (await control(app, {"faults": {"omit_total_volume": True}})).json()["faults"]
    assert (merged["drop_close_every"], merged["odd_decimals_pumps"]) == (3, [2])
    assert merged["omit_total_volume"] is True
    reset = (await control(app, {"faults": {"drop_close_every": None}})).json()["faults"]
    assert reset["drop_close_every"] is None
    assert app.state.station.faults.omit_total_volume is True


@pytest.mark.parametrize(
    "faults",
    [
        {"drop_every_close": 2},
        {"reset_counters_on_start": True},
        {"odd_decimals_pumps": [9]},
        {"transaction_wrap": "10"},
        {"calling_after_authorize_polls": -1},
        {"odd_amount_digit": 0},
        [],
    ],
)
async def test_bad_fault_settings_are_refused_and_change_nothing(app_and_clock, faults):
    app, _ = app_and_clock
    reply = await control(app, {"arrivals": True, "faults": faults})
    assert reply.status_code == 400
    station = app.state.station
    assert station.arrivals is False  # the valid part of the body was not applied either
    assert station.faults == ControllerConfig.from_json(config_dict()).faults


async def test_unknown_control_keys_are_refused(app_and_clock):
    app, _ = app_and_clock
    assert (await control(app, {"fault": {"omit_total_volume": True}})).status_code == 400


async def test_the_real_driver_isolates_an_odd_pump_and_flags_an_odd_finished_amount(
    app_and_clock,
):
    app, clock = app_and_clock
    station = app.state.station
    reply = await control(
        app,
        {
            "faults": {
                "odd_decimals_pumps": [1],
                "odd_decimals_finished": [2],
                "odd_amount_digit": 5,
            }
        },
    )
    assert reply.status_code == 200
    driver = JsonPtsDriver(
        "http://sim",
        "admin",
        "secret",
        timezone="Asia/Shanghai",
        transport=httpx.ASGITransport(app),
    )
    async with driver:
        station.arrive(car(litres="40"))
        station.arrive(car(grade=95, litres="33.33", number=2))
        clock.advance(10)
        await driver.authorize(1, None, Preset(), 789_000)
        await driver.authorize(2, None, Preset(), 842_000)
        clock.advance(2 + 15)
        one, two = await driver.pump_status([1, 2])
        assert one.state is PumpState.ERROR
        assert one.error is not None
        assert two.state is PumpState.FUELLING
        clock.advance(600)
        finished = await driver.finished_transaction(2)
    assert finished is not None
    # 33.33 L at 8.42 to 10 fen half-even = 280.60; the device records 280.605 (digit 5):
    # half-even to the fen gives 280.60 back.
    assert (finished.amount_minor, finished.flags, finished.raw) == (
        28_060,
        (FLAG_INEXACT,),
        (("Amount", "280.605"),),
    )


async def test_the_real_driver_sees_no_totalizer_when_the_device_omits_it(app_and_clock):
    app, clock = app_and_clock
    await control(app, {"faults": {"omit_total_volume": True}})
    driver = JsonPtsDriver(
        "http://sim",
        "admin",
        "secret",
        timezone="Asia/Shanghai",
        transport=httpx.ASGITransport(app),
    )
    async with driver:
        app.state.station.arrive(car(litres="10"))
        clock.advance(10)
        await driver.authorize(1, None, Preset(), 789_000)
        clock.advance(300)
        (held,) = await driver.unacknowledged_transactions([1, 2])
        report = await driver.transactions(1, T0, clock.now() + timedelta(seconds=1))
    assert (held.totalizer_end_ml, held.flags) == (None, (FLAG_NO_TOTALIZER,))
    assert [(t.transaction, t.closed, t.totalizer_end_ml) for t in report] == [(1, False, None)]
