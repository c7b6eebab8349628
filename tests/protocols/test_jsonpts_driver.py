"""JsonPtsDriver against canned controller replies: mapping, exact numbers, error translation.

The full round trip against the simulator process lives in tests/sim/test_pts_controller.py.
"""

from __future__ import annotations

import base64
import inspect
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from forecourt.edge.drivers import (
    DeviceRejected,
    DriverUnavailable,
    ForecourtDriver,
    NozzleTotals,
    Preset,
    PresetType,
    PumpState,
)
from forecourt.protocols.jsonpts.codec import (
    JsonPtsPrecision,
    Packet,
    confirmation,
    decode_envelope,
    encode_envelope,
    error_packet,
)
from forecourt.protocols.jsonpts.driver import JsonPtsDriver

SHANGHAI = ZoneInfo("Asia/Shanghai")
Reply = Callable[[Packet], Packet]


class FakeController:
    """Answers each request packet with ``replies[type](packet)``; records what it was sent."""

    def __init__(self, replies: dict[str, Reply], *, status_code: int = 200) -> None:
        self.replies = replies
        self.status_code = status_code
        self.requests: list[list[Packet]] = []
        self.auth_headers: list[str | None] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/jsonPTS"
        self.auth_headers.append(request.headers.get("authorization"))
        packets = decode_envelope(request.content)
        self.requests.append(packets)
        if self.status_code != 200:
            return httpx.Response(self.status_code, text="nope")
        answers = [self.replies[p.type](p) for p in packets]
        return httpx.Response(200, content=encode_envelope(answers))


def status_reply(packet_type: str, **data: Any) -> Reply:
    return lambda request: Packet(request.id, packet_type, {"Pump": request.data["Pump"], **data})


def make_driver(handler: Callable[[httpx.Request], httpx.Response], **kwargs: Any) -> JsonPtsDriver:
    return JsonPtsDriver(
        "http://pts.test",
        "admin",
        "secret",
        timezone="Asia/Shanghai",
        transport=httpx.MockTransport(handler),
        **kwargs,
    )


EOT_DATA = {
    "Nozzle": 2,
    "FuelGradeId": 95,
    "Volume": Decimal("35.20"),
    "TCVolume": Decimal("35.20"),
    "Price": Decimal("7.89"),
    "Amount": Decimal("277.73"),
    "Transaction": 41,
    "TotalVolume": Decimal("12345.67"),
    "TotalAmount": Decimal("98765.43"),
    "DateTimeStart": "2026-11-25T10:00:00",
    "DateTime": "2026-11-25T10:01:30",
}


def test_the_driver_satisfies_the_forecourt_driver_protocol():
    # Every operation the protocol names, as a coroutine with the same parameters: what an
    # edge node calls through the protocol is what the driver takes.
    operations = {
        name: member
        for name, member in vars(ForecourtDriver).items()
        if not name.startswith("_") and inspect.isfunction(member)
    }
    assert {"open", "pump_status", "authorize", "close_transaction"} <= set(operations)
    for name, member in operations.items():
        implementation = getattr(JsonPtsDriver, name, None)
        assert implementation is not None, name
        assert inspect.iscoroutinefunction(implementation), name
        assert inspect.signature(implementation).parameters.keys() == (
            inspect.signature(member).parameters.keys()
        ), name


@pytest.mark.parametrize(
    ("packet_type", "data", "state"),
    [
        ("PumpIdleStatus", {"NozzleUp": 0}, PumpState.IDLE),
        ("PumpIdleStatus", {"NozzleUp": 2}, PumpState.CALLING),
        ("PumpFillingStatus", {"Volume": 0, "IsSuspended": False}, PumpState.AUTHORISED),
        ("PumpFillingStatus", {"Volume": Decimal("3.10")}, PumpState.FUELLING),
        (
            "PumpFillingStatus",
            {"Volume": Decimal("3.10"), "IsSuspended": True},
            PumpState.SUSPENDED,
        ),
        ("PumpFillingStatus", {"Volume": Decimal("3.10"), "IsStopped": True}, PumpState.STOPPED),
        ("PumpEndOfTransactionStatus", EOT_DATA, PumpState.END_OF_TRANSACTION),
        ("PumpOfflineStatus", {"State": "Offline"}, PumpState.OFFLINE),
    ],
)
async def test_each_jsonpts_status_maps_to_the_standard_pump_state(packet_type, data, state):
    filling = {"Nozzle": 2, "Price": Decimal("7.89"), "Amount": Decimal("0.00"), "Transaction": 7}
    if packet_type == "PumpFillingStatus":
        data = {**filling, **data}
    controller = FakeController({"PumpGetStatus": status_reply(packet_type, **data)})
    async with make_driver(controller) as driver:
        (status,) = await driver.pump_status([3])
    assert status.pump == 3
    assert status.state is state
    if state is PumpState.CALLING:
        assert status.nozzle == 2


async def test_a_filling_status_reports_exact_integers():
    controller = FakeController(
        {
            "PumpGetStatus": status_reply(
                "PumpFillingStatus",
                Nozzle=1,
                Volume=Decimal("12.34"),
                Price=Decimal("7.89"),
                Amount=Decimal("97.36"),
                Transaction=12,
            )
        }
    )
    async with make_driver(controller) as driver:
        (status,) = await driver.pump_status([1])
    assert (status.volume_ml, status.amount_minor, status.unit_price_mmu) == (
        12_340,
        9_736,
        789_000,
    )
    assert (status.nozzle, status.transaction) == (1, 12)


async def test_many_pumps_are_polled_in_one_post_and_matched_by_id_not_order():
    def handler(request: httpx.Request) -> httpx.Response:
        packets = decode_envelope(request.content)
        answers = [
            Packet(p.id, "PumpIdleStatus", {"Pump": p.data["Pump"], "NozzleUp": p.data["Pump"] % 2})
            for p in packets
        ]
        return httpx.Response(200, content=encode_envelope(reversed(answers)))

    posts: list[int] = []

    def counting(request: httpx.Request) -> httpx.Response:
        posts.append(len(decode_envelope(request.content)))
        return handler(request)

    async with make_driver(counting) as driver:
        statuses = await driver.pump_status([1, 2, 3, 4, 5, 6])
    assert posts == [6]
    assert [s.pump for s in statuses] == [1, 2, 3, 4, 5, 6]
    assert [s.state for s in statuses] == [PumpState.CALLING, PumpState.IDLE] * 3


async def test_a_refused_status_marks_that_pump_as_error_and_still_reports_the_others():
    def reply(request: Packet) -> Packet:
        if request.data["Pump"] == 2:
            return error_packet(request.id, request.type, 3, "no pump 2")
        return Packet(request.id, "PumpIdleStatus", {"Pump": request.data["Pump"], "NozzleUp": 0})

    async with make_driver(FakeController({"PumpGetStatus": reply})) as driver:
        statuses = await driver.pump_status([1, 2, 3])
    assert [s.state for s in statuses] == [PumpState.IDLE, PumpState.ERROR, PumpState.IDLE]


async def test_an_authorisation_carries_the_preset_and_price_as_exact_decimals():
    controller = FakeController({"PumpAuthorize": lambda p: confirmation(p.id, p.type)})
    async with make_driver(controller) as driver:
        await driver.authorize(1, 2, Preset(PresetType.VOLUME, volume_ml=20_000), 789_000)
        await driver.authorize(1, None, Preset(PresetType.AMOUNT, amount_minor=20_050), 712_000)
        await driver.authorize(3, 1, Preset(), 842_000)
    sent = [post[0].data for post in controller.requests]
    assert sent[0] == {
        "Pump": 1,
        "Nozzle": 2,
        "Type": "Volume",
        "Dose": Decimal("20.00"),
        "Price": Decimal("7.89"),
    }
    assert sent[1] == {
        "Pump": 1,
        "Type": "Amount",
        "Dose": Decimal("200.50"),
        "Price": Decimal("7.12"),
    }
    assert sent[2] == {"Pump": 3, "Nozzle": 1, "Type": "FullTank", "Price": Decimal("8.42")}
    assert str(sent[1]["Dose"]) == "200.50"


async def test_every_request_carries_basic_auth_credentials():
    controller = FakeController({"PumpStop": lambda p: confirmation(p.id, p.type)})
    async with make_driver(controller) as driver:
        await driver.stop(1)
    assert controller.auth_headers == ["Basic " + base64.b64encode(b"admin:secret").decode()]


async def test_an_error_packet_becomes_device_rejected_with_the_device_code():
    controller = FakeController(
        {"PumpAuthorize": lambda p: error_packet(p.id, p.type, 4, "pump 1 is fuelling")}
    )
    async with make_driver(controller) as driver:
        with pytest.raises(DeviceRejected) as caught:
            await driver.authorize(1, 1, Preset(), 789_000)
    assert caught.value.details["device_code"] == 4
    assert "pump 1 is fuelling" in caught.value.message


@pytest.mark.parametrize("status_code", [500, 502, 503, 401])
async def test_server_faults_and_refused_credentials_make_the_driver_unavailable(status_code):
    async with make_driver(FakeController({}, status_code=status_code)) as driver:
        with pytest.raises(DriverUnavailable):
            await driver.stop(1)


async def test_a_timeout_makes_the_driver_unavailable():
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("no answer", request=request)

    async with make_driver(slow) as driver:
        with pytest.raises(DriverUnavailable) as caught:
            await driver.pump_status([1])
    assert caught.value.code == "jsonpts.timeout"


async def test_an_unreachable_controller_makes_the_driver_unavailable():
    driver = JsonPtsDriver("http://127.0.0.1:9", "a", "b", timezone="UTC", timeout=1.0)
    async with driver:
        with pytest.raises(DriverUnavailable):
            await driver.pump_status([1])


@pytest.mark.parametrize(
    "body",
    [
        b"<html>busy</html>",
        b'{"Protocol":"jsonPTS","Packets":[]}',  # the reply lacks our packet
        b'{"Protocol":"jsonPTS","Packets":[{"Id":77,"Type":"PumpIdleStatus","Data":{}}]}',
        b'{"Protocol":"jsonPTS","Packets":[{"Type":"PumpIdleStatus"}]}',  # no Id to match
    ],
)
async def test_an_unreadable_reply_makes_the_driver_unavailable_not_crash(body):
    driver = make_driver(lambda request: httpx.Response(200, content=body))
    async with driver:
        with pytest.raises(DriverUnavailable):
            await driver.pump_status([1])


async def test_unacknowledged_transactions_are_the_end_of_transaction_pumps():
    def reply(request: Packet) -> Packet:
        pump = request.data["Pump"]
        if pump == 2:
            return Packet(request.id, "PumpEndOfTransactionStatus", {"Pump": 2, **EOT_DATA})
        return Packet(request.id, "PumpIdleStatus", {"Pump": pump, "NozzleUp": 0})

    controller = FakeController({"PumpGetStatus": reply})
    async with make_driver(controller) as driver:
        (found,) = await driver.unacknowledged_transactions([1, 2, 3])
    assert len(controller.requests) == 1
    assert (found.pump, found.nozzle, found.transaction) == (2, 2, 41)
    assert (found.volume_ml, found.amount_minor, found.unit_price_mmu) == (35_200, 27_773, 789_000)
    assert found.totalizer_end_ml == 12_345_670
    assert found.totalizer_start_ml is None  # never derived from end - volume
    assert (found.flags, found.raw) == ((), ())
    assert found.grade_code == "95"
    assert found.closed is False
    assert found.ended_at == datetime(2026, 11, 25, 2, 1, 30, tzinfo=UTC)
    assert found.ended_at.utcoffset() is not None
    assert found.started_at == datetime(2026, 11, 25, 2, 0, 0, tzinfo=UTC)


async def test_the_transactions_report_is_asked_in_local_time_and_marks_the_open_one():
    def report(request: Packet) -> Packet:
        items = [
            {**EOT_DATA, "Pump": 1, "Transaction": 40, "UserId": 0},
            {**EOT_DATA, "Pump": 1, "Transaction": 41, "UserId": 0},
        ]
        return Packet(request.id, "ReportPumpTransactions", items)

    controller = FakeController(
        {
            "ReportGetPumpTransactions": report,
            "PumpGetStatus": lambda p: Packet(
                p.id, "PumpEndOfTransactionStatus", {"Pump": 1, **EOT_DATA}
            ),
        }
    )
    start = datetime(2026, 11, 25, 0, 0, tzinfo=UTC)
    end = datetime(2026, 11, 25, 3, 0, 0, 500_000, tzinfo=UTC)
    async with make_driver(controller) as driver:
        found = await driver.transactions(1, start, end)
    (post,) = controller.requests
    assert post[0].data == {
        "Pump": 1,
        "DateTimeStart": "2026-11-25T08:00:00",
        "DateTimeEnd": "2026-11-25T11:00:00",
    }
    assert [(t.transaction, t.closed) for t in found] == [(40, True), (41, False)]


async def test_totals_are_read_as_exact_integers():
    def totals(request: Packet) -> Packet:
        data = {"Pump": 1, "Nozzle": request.data["Nozzle"], "Volume": Decimal("123456.78")}
        return Packet(request.id, "PumpTotals", {**data, "Amount": Decimal("974074.99")})

    async with make_driver(FakeController({"PumpGetTotals": totals})) as driver:
        result = await driver.totals(1, 2)
    assert result == NozzleTotals(pump=1, nozzle=2, volume_ml=123_456_780, amount_minor=97_407_499)


async def test_totals_delivered_later_through_the_status_poll_are_waited_for():
    polls = []

    def status(request: Packet) -> Packet:
        polls.append(request)
        if len(polls) < 2:
            return Packet(request.id, "PumpIdleStatus", {"Pump": 1, "NozzleUp": 0})
        data = {"Pump": 1, "Nozzle": 1, "Volume": Decimal("10.00"), "Amount": Decimal("78.90")}
        return Packet(request.id, "PumpTotals", data)

    controller = FakeController(
        {"PumpGetTotals": lambda p: confirmation(p.id, p.type), "PumpGetStatus": status}
    )
    async with make_driver(controller) as driver:
        result = await driver.totals(1, 1)
    assert (result.volume_ml, result.amount_minor) == (10_000, 7_890)


async def test_set_prices_sends_one_exact_price_per_nozzle_in_order():
    controller = FakeController({"PumpSetPrices": lambda p: confirmation(p.id, p.type)})
    async with make_driver(controller) as driver:
        await driver.set_prices(4, [789_000, 842_000, 712_000])
    assert controller.requests[0][0].data == {
        "Pump": 4,
        "Prices": [Decimal("7.89"), Decimal("8.42"), Decimal("7.12")],
    }


async def test_a_price_the_device_cannot_express_is_refused_before_sending():
    controller = FakeController({})
    async with make_driver(controller) as driver:
        with pytest.raises(JsonPtsPrecision):
            await driver.set_prices(1, [789_500])
    assert controller.requests == []


async def test_using_the_driver_before_open_is_a_clear_unavailable_error():
    driver = make_driver(FakeController({}))
    with pytest.raises(DriverUnavailable):
        await driver.stop(1)


async def test_close_transaction_sends_pump_and_transaction():
    controller = FakeController({"PumpCloseTransaction": lambda p: confirmation(p.id, p.type)})
    async with make_driver(controller) as driver:
        await driver.close_transaction(2, 41)
    assert controller.requests[0][0].data == {"Pump": 2, "Transaction": 41}
