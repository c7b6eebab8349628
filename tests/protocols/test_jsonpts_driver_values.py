"""JsonPtsDriver on odd replies: one pump's bad reply stays that pump's; finished transactions
are never dropped for an odd value; authorisations return the confirmed number."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest

from forecourt.edge.drivers import (
    FLAG_EXTRA_DECIMALS,
    FLAG_INEXACT,
    FLAG_NO_TOTALIZER,
    DeviceRejected,
    DriverUnavailable,
    Preset,
    PumpState,
)
from forecourt.protocols.jsonpts.codec import (
    Packet,
    PtsErrorCode,
    confirmation,
    decode_envelope,
    dumps,
    vendor_error,
)
from forecourt.protocols.model import Capability
from forecourt.protocols.renumber import renumbered
from tests.protocols.test_jsonpts_driver import EOT_DATA, FakeController, make_driver

FILLING = {
    "Nozzle": 1,
    "FuelGradeId": 92,
    "Volume": Decimal("12.34"),
    "Price": Decimal("7.89"),
    "Amount": Decimal("97.36"),
    "Transaction": 12,
    "IsSuspended": False,
}


def by_pump(replies: dict[int, Any]) -> FakeController:
    """A controller answering PumpGetStatus per pump: (type, data) or a ready Packet factory."""

    def status(request: Packet) -> Packet:
        answer = replies[request.data["Pump"]]
        if callable(answer):
            return answer(request)
        packet_type, data = answer
        return Packet(request.id, packet_type, data)

    return FakeController({"PumpGetStatus": status})


async def test_one_pumps_over_precise_filling_volume_makes_only_that_pump_error():
    controller = by_pump(
        {
            1: ("PumpIdleStatus", {"Pump": 1, "NozzleUp": 0}),
            2: ("PumpFillingStatus", {"Pump": 2, **FILLING, "Volume": Decimal("12.345")}),
            3: ("PumpFillingStatus", {"Pump": 3, **FILLING}),
        }
    )
    async with make_driver(controller) as driver:
        statuses = await driver.pump_status([1, 2, 3])
    assert len(controller.requests) == 1  # still one batched POST
    assert [s.state for s in statuses] == [PumpState.IDLE, PumpState.ERROR, PumpState.FUELLING]
    assert statuses[1].error is not None
    assert "Volume" in statuses[1].error
    assert statuses[2].volume_ml == 12_340
    assert statuses[0].error is None


async def test_malformed_foreign_refused_or_missing_replies_make_only_their_pumps_error():
    def missing(request: Packet) -> Packet:
        return Packet(request.id + 1000, "PumpIdleStatus", {"Pump": 5, "NozzleUp": 0})

    controller = by_pump(
        {
            1: ("PumpIdleStatus", {"Pump": 1, "NozzleUp": 2}),
            2: ("PumpIdleStatus", {"Pump": 2, "NozzleUp": "x"}),
            3: ("PumpIdleStatus", {"Pump": 9, "NozzleUp": 0}),
            4: missing,
            5: lambda p: vendor_error(
                p.id, p.type, PtsErrorCode.JSONPTS_ERROR_PUMP_IS_NOT_CONFIGURED
            ),
            6: ("PumpTag", {"Pump": 6}),  # a one-shot reply twice in a row
        }
    )
    async with make_driver(controller) as driver:
        statuses = await driver.pump_status([1, 2, 3, 4, 5, 6])
    assert [s.state for s in statuses] == [PumpState.CALLING] + [PumpState.ERROR] * 5
    errors = [s.error or "" for s in statuses]
    assert "NozzleUp" in errors[1]
    assert "pump 9" in errors[2]
    assert "no reply" in errors[3]
    assert "52" in errors[4]
    assert "PumpTag" in errors[5]


async def test_a_broken_packet_among_good_ones_costs_only_its_pump():
    def handler(request: httpx.Request) -> httpx.Response:
        first, second = decode_envelope(request.content)
        good = Packet(first.id, "PumpIdleStatus", {"Pump": 1, "NozzleUp": 0}).to_json()
        broken = {"Id": second.id, "Type": 7}  # Type must be a string
        return httpx.Response(
            200, content=dumps({"Protocol": "jsonPTS", "Packets": [good, broken]})
        )

    async with make_driver(handler) as driver:
        one, two = await driver.pump_status([1, 2])
    assert (one.state, two.state) == (PumpState.IDLE, PumpState.ERROR)
    assert two.error is not None


async def test_an_emergency_stopped_pump_shows_as_stopped():
    # "EmergencyStop" is the simulator's marker [I] (see forecourt.sim.pts_controller).
    controller = by_pump(
        {
            1: ("PumpIdleStatus", {"Pump": 1, "NozzleUp": 0, "EmergencyStop": True}),
            2: ("PumpFillingStatus", {"Pump": 2, **FILLING, "EmergencyStop": True}),
        }
    )
    async with make_driver(controller) as driver:
        idle, filling = await driver.pump_status([1, 2])
    assert (idle.state, filling.state) == (PumpState.STOPPED, PumpState.STOPPED)
    assert filling.volume_ml == 12_340


# --------------------------------------------------------------------------- finished values


def eot(**changes: Any) -> dict[str, Any]:
    data = {"Pump": 2, **EOT_DATA, **changes}
    return {k: v for k, v in data.items() if v is not None}


async def finished(data: dict[str, Any], **driver_kwargs: Any):
    controller = by_pump({2: ("PumpEndOfTransactionStatus", data)})
    async with make_driver(controller, **driver_kwargs) as driver:
        return await driver.finished_transaction(2)


async def test_a_finished_value_with_extra_but_exact_decimals_is_taken_exactly_and_flagged():
    found = await finished(eot(Volume=Decimal("35.205"), TotalVolume=Decimal("12345.675")))
    assert (found.volume_ml, found.totalizer_end_ml) == (35_205, 12_345_675)
    assert (found.flags, found.raw) == ((FLAG_EXTRA_DECIMALS,), ())


@pytest.mark.parametrize(
    ("wire", "nearest"),
    [("277.735", 27_774), ("277.725", 27_772), ("277.7251", 27_773), ("-0.005", 0)],
)
async def test_a_finished_amount_finer_than_a_fen_becomes_the_half_even_nearest_with_its_text(
    wire, nearest
):
    found = await finished(eot(Amount=Decimal(wire)))
    assert found.amount_minor == nearest
    assert found.flags == (FLAG_INEXACT,)
    assert found.raw == (("Amount", wire),)
    assert found.volume_ml == 35_200  # the other values are untouched


async def test_a_finished_transaction_without_totalizer_says_so_and_guesses_nothing():
    # TotalVolume/TotalAmount are optional in the vendor SDK (Java SDK network/http/
    # PumpGetStatus.java reads them only when present, stored file 17311632924).
    found = await finished(eot(TotalVolume=None, TotalAmount=None))
    assert (found.totalizer_start_ml, found.totalizer_end_ml) == (None, None)
    assert found.flags == (FLAG_NO_TOTALIZER,)


async def test_an_end_of_transaction_with_an_odd_amount_is_still_reported_as_finished():
    controller = by_pump({2: ("PumpEndOfTransactionStatus", eot(Amount=Decimal("277.735")))})
    async with make_driver(controller) as driver:
        (status,) = await driver.pump_status([2])
    assert (status.state, status.amount_minor, status.transaction) == (
        PumpState.END_OF_TRANSACTION,
        27_774,
        41,
    )


async def test_finished_transaction_is_none_for_a_pump_holding_nothing():
    controller = by_pump({2: ("PumpIdleStatus", {"Pump": 2, "NozzleUp": 1})})
    async with make_driver(controller) as driver:
        assert await driver.finished_transaction(2) is None


async def test_finished_transaction_raises_when_the_pump_cannot_say():
    refused = by_pump(
        {
            2: lambda p: vendor_error(
                p.id, p.type, PtsErrorCode.JSONPTS_ERROR_PUMP_NUMBER_OUT_OF_RANGE
            )
        }
    )
    async with make_driver(refused) as driver:
        with pytest.raises(DeviceRejected) as caught:
            await driver.finished_transaction(2)
    assert caught.value.details["device_code"] == 20
    assert caught.value.details["device_message"] == "JSONPTS_ERROR_PUMP_NUMBER_OUT_OF_RANGE"
    broken = by_pump({2: ("PumpEndOfTransactionStatus", eot(Transaction=None))})
    async with make_driver(broken) as driver:
        with pytest.raises(DriverUnavailable):
            await driver.finished_transaction(2)
        with pytest.raises(DriverUnavailable):
            await driver.unacknowledged_transactions([2])


async def test_report_items_with_odd_values_are_kept_and_flagged():
    def report(request: Packet) -> Packet:
        items = [
            {**eot(Transaction=40, Amount=Decimal("10.005")), "UserId": 0},
            {**eot(Transaction=41), "UserId": 0},
        ]
        return Packet(request.id, "ReportPumpTransactions", items)

    controller = FakeController(
        {
            "ReportGetPumpTransactions": report,
            "PumpGetStatus": lambda p: Packet(p.id, "PumpIdleStatus", {"Pump": 2, "NozzleUp": 0}),
        }
    )
    async with make_driver(controller) as driver:
        found = await driver.transactions(
            2, datetime(2026, 11, 25, tzinfo=UTC), datetime(2026, 11, 26, tzinfo=UTC)
        )
    assert [(t.transaction, t.amount_minor, t.flags) for t in found] == [
        (40, 1000, (FLAG_INEXACT,)),
        (41, 27_773, ()),
    ]
    assert found[0].raw == (("Amount", "10.005"),)


# --------------------------------------------------------------------------- authorisation


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        # The device's answer: PumpAuthorizeConfirmation {Pump, Transaction} (Technotrade Java
        # SDK com/technotrade/pts2/network/http/PumpAuthorize.java, stored file 17278643764).
        (lambda p: Packet(p.id, "PumpAuthorizeConfirmation", {"Pump": 1, "Transaction": 7}), 7),
        (lambda p: confirmation(p.id, p.type), None),
        (
            lambda p: Packet(p.id, "PumpAuthorizeConfirmation", {"Pump": 1, "Transaction": "x"}),
            None,
        ),
    ],
)
async def test_an_authorisation_returns_the_transaction_number_the_device_confirms(reply, expected):
    async with make_driver(FakeController({"PumpAuthorize": reply})) as driver:
        assert await driver.authorize(1, 1, Preset(), 789_000) == expected


# --------------------------------------------------------------------------- emergency stop


def _stop_refused_for(pump: int) -> FakeController:
    def stop(request: Packet) -> Packet:
        if request.data["Pump"] == pump:
            return Packet(request.id, "PumpEmergencyStop", error=True, code=12, message="busy")
        return Packet(request.id, "PumpEmergencyStop", message="OK")

    return FakeController({"PumpEmergencyStop": stop})


async def test_every_pump_is_emergency_stopped_in_one_request_and_a_refusal_is_per_pump():
    # Given a controller that refuses the stop of pump 2 only
    controller = _stop_refused_for(2)
    async with make_driver(controller) as driver:
        # When the whole line is stopped
        assert Capability.EMERGENCY_STOP_ALL in driver.capabilities
        failed = await driver.emergency_stop_all([1, 2, 3])
    # Then one request carried a stop for each pump, and only pump 2 is reported
    (request,) = controller.requests
    assert [(p.type, p.data["Pump"]) for p in request] == [
        ("PumpEmergencyStop", 1),
        ("PumpEmergencyStop", 2),
        ("PumpEmergencyStop", 3),
    ]
    assert list(failed) == [2]
    assert isinstance(failed[2], DeviceRejected)
    assert failed[2].details["device_code"] == 12


async def test_an_emergency_stop_of_the_line_that_gets_no_answer_raises():
    controller = FakeController({}, status_code=503)
    async with make_driver(controller) as driver:
        with pytest.raises(DriverUnavailable):
            await driver.emergency_stop_all([1, 2])


async def test_a_renumbered_line_stops_its_device_pumps_and_reports_station_numbers():
    # Given station pumps 5 and 6 as the controller's pumps 1 and 2, the second refusing
    controller = _stop_refused_for(2)
    async with make_driver(controller) as inner:
        driver = renumbered(inner, {5: 1, 6: 2})
        failed = await driver.emergency_stop_all([5, 6])  # type: ignore[attr-defined]
    assert [p.data["Pump"] for p in controller.requests[0]] == [1, 2]
    assert list(failed) == [6]
