"""The PTS-2 simulator: its pump model step by step, its HTTP face, and the real process + driver.

Three layers, fastest first: the station model driven with an explicit clock; the Starlette app
in-process (with the real driver on an ASGI transport); then the simulator as a real subprocess
on a fast SimulatedClock, driven by the real driver over TCP.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from forecourt.edge.drivers import DeviceRejected, Preset, PresetType, PumpState
from forecourt.kernel.clock import SimulatedClock
from forecourt.kernel.money import Rounding
from forecourt.protocols.jsonpts.codec import PtsErrorCode, decode_envelope, dumps
from forecourt.protocols.jsonpts.driver import JsonPtsDriver
from forecourt.sim.customers import CustomerModel, CustomerSource, SimConfigError
from forecourt.sim.pts_controller import (
    ControllerConfig,
    SimulatorProcess,
    Station,
    create_app,
)
from tests.sim.support import (
    SPEED,
    T0,
    Forecourt,
    amount_for,
    basic,
    car,
    config_dict,
    real_driver,
)
from tests.support import ManualClock, eventually

E = PtsErrorCode


# --------------------------------------------------------------------------- the pump model


def test_a_customer_lifting_a_nozzle_shows_as_nozzle_up_on_an_idle_status():
    forecourt = Forecourt()
    forecourt.station.arrive(car())
    assert forecourt.at(9).status().data["NozzleUp"] == 0  # still walking up
    status = forecourt.at(10).status()
    assert status.type == "PumpIdleStatus"
    assert (status.data["NozzleUp"], status.data["Nozzle"]) == (1, 1)


def test_a_customer_not_authorised_in_time_hangs_up_and_leaves_without_a_transaction():
    forecourt = Forecourt()
    forecourt.station.arrive(car())
    forecourt.at(10 + 119)
    assert forecourt.status().data["NozzleUp"] == 1
    forecourt.at(10 + 120)
    status = forecourt.status()
    assert (status.type, status.data["NozzleUp"], status.data["LastTransaction"]) == (
        "PumpIdleStatus",
        0,
        0,
    )
    assert forecourt.station.stats["left_unauthorised"] == 1
    report = forecourt.send(
        "ReportGetPumpTransactions",
        Pump=0,
        DateTimeStart="2026-11-25T00:00:00",
        DateTimeEnd="2026-11-25T23:59:59",
    )
    assert report.data == []


def test_an_authorised_customer_fuels_to_their_target_and_the_pump_holds_the_transaction():
    forecourt = Forecourt()
    forecourt.station.arrive(car(litres="40"))
    forecourt.at(20)
    # The device confirms an authorisation with the transaction number the dispensing gets:
    # PumpAuthorizeConfirmation {Pump, Transaction} (Technotrade Java SDK
    # com/technotrade/pts2/network/http/PumpAuthorize.java, stored file 17278643764).
    confirmed = forecourt.send("PumpAuthorize", Pump=1, Nozzle=1, Type="FullTank")
    assert (confirmed.type, confirmed.data, confirmed.error) == (
        "PumpAuthorizeConfirmation",
        {"Pump": 1, "Transaction": 1},
        False,
    )

    authorised = forecourt.status()
    assert authorised.type == "PumpFillingStatus"
    assert (authorised.data["Volume"], authorised.data["Transaction"]) == (0, 1)

    fuelling = forecourt.at(22 + 30).status()  # 30 s at 40 L/min
    assert fuelling.data["Volume"] == Decimal("20.00")
    assert fuelling.data["Amount"] == Decimal("157.80")
    assert fuelling.data["Price"] == Decimal("7.89")

    finished = forecourt.at(22 + 60 + 5).status()  # 60 s to 40 L, 5 s to hang up
    assert finished.type == "PumpEndOfTransactionStatus"
    data = finished.data
    assert (data["Transaction"], data["Nozzle"], data["FuelGradeId"]) == (1, 1, 92)
    assert data["Volume"] == Decimal("40.00")
    assert data["Amount"] == Decimal("315.60")
    assert data["TotalVolume"] == Decimal("1040.00")
    assert (data["DateTimeStart"], data["DateTime"]) == (
        "2026-11-25T10:00:20",
        "2026-11-25T10:01:27",
    )

    # Held however long nobody closes it.
    assert forecourt.at(5000).status().type == "PumpEndOfTransactionStatus"


def test_the_next_customer_waits_until_the_previous_transaction_is_closed():
    forecourt = Forecourt()
    forecourt.station.arrive(car(number=1))
    forecourt.station.arrive(car(number=2))  # queues: pump 1 is the only 92 pump
    forecourt.station.arrive(car(number=3))  # max_queue 1: drives on
    assert forecourt.station.stats["left_queue_too_long"] == 1
    forecourt.at(20).send("PumpAuthorize", Pump=1, Type="FullTank")
    forecourt.at(200)
    assert forecourt.status().type == "PumpEndOfTransactionStatus"
    assert len(forecourt.station.queue) == 1

    assert forecourt.send("PumpCloseTransaction", Pump=1, Transaction=1).message == "OK"
    assert forecourt.status().data["NozzleUp"] == 0
    assert forecourt.at(210).status().data["NozzleUp"] == 1  # the queued car drove up
    assert len(forecourt.station.queue) == 0


def test_the_amount_follows_the_pumps_resolution_and_rounding():
    forecourt = Forecourt(grade_mix=[{"grade_id": 95, "weight": 1}])
    forecourt.station.arrive(car(grade=95, litres="33.33"))
    forecourt.at(10).send("PumpAuthorize", Pump=2, Type="FullTank")
    data = forecourt.at(200).status(2).data
    expected = amount_for(33_330, 842_000, resolution=10, rounding=Rounding.HALF_EVEN)
    assert data["Volume"] == Decimal("33.33")
    assert data["Amount"] == expected.to_decimal() == Decimal("280.60")
    assert data["Transaction"] == 500


def test_a_volume_preset_stops_the_pump_at_the_dose():
    forecourt = Forecourt()
    forecourt.station.arrive(car(litres="40"))
    forecourt.at(10).send("PumpAuthorize", Pump=1, Nozzle=1, Type="Volume", Dose=Decimal("10.00"))
    data = forecourt.at(200).status().data
    assert (data["Volume"], data["Amount"]) == (Decimal("10.00"), Decimal("78.90"))


def test_an_amount_preset_stops_at_the_last_volume_step_within_the_dose():
    forecourt = Forecourt()
    forecourt.station.arrive(car(litres="40"))
    forecourt.at(10).send("PumpAuthorize", Pump=1, Type="Amount", Dose=Decimal("100.00"))
    data = forecourt.at(200).status().data
    volume_ml = int(data["Volume"] * 1000)
    assert data["Amount"] == amount_for(volume_ml, 789_000).to_decimal() <= Decimal("100.00")
    assert amount_for(volume_ml + 10, 789_000).to_decimal() > Decimal("100.00")
    assert data["Volume"] == Decimal("12.67")


def test_the_price_in_the_authorisation_wins_over_the_nozzle_price():
    forecourt = Forecourt()
    forecourt.station.arrive(car(litres="10"))
    forecourt.at(10).send("PumpAuthorize", Pump=1, Type="FullTank", Price=Decimal("7.50"))
    data = forecourt.at(200).status().data
    assert (data["Price"], data["Amount"]) == (Decimal("7.50"), Decimal("75.00"))


def test_new_prices_apply_from_the_next_authorisation():
    forecourt = Forecourt()
    reply = forecourt.send("PumpSetPrices", Pump=1, Prices=[Decimal("8.00"), Decimal("7.00")])
    assert reply.message == "OK"
    forecourt.station.arrive(car(litres="10"))
    forecourt.at(10).send("PumpAuthorize", Pump=1, Type="FullTank")
    assert forecourt.status().data["Price"] == Decimal("8.00")


def test_a_suspended_pump_holds_its_volume_until_resumed():
    forecourt = Forecourt()
    forecourt.station.arrive(car(litres="40"))
    forecourt.at(20).send("PumpAuthorize", Pump=1, Type="FullTank")
    forecourt.at(52).send("PumpSuspend", Pump=1)
    held = forecourt.at(400).status().data
    assert (held["Volume"], held["IsSuspended"]) == (Decimal("20.00"), True)
    assert forecourt.send("PumpResume", Pump=1).message == "OK"
    assert forecourt.at(415).status().data["Volume"] == Decimal("30.00")
    done = forecourt.at(400 + 30 + 5).status()
    assert (done.type, done.data["Volume"]) == ("PumpEndOfTransactionStatus", Decimal("40.00"))


def test_a_stop_ends_the_flow_and_the_transaction_keeps_the_partial_volume():
    forecourt = Forecourt()
    forecourt.station.arrive(car(litres="40"))
    forecourt.at(20).send("PumpAuthorize", Pump=1, Type="FullTank")
    forecourt.at(52).send("PumpStop", Pump=1)
    stopped = forecourt.at(54).status().data
    assert (stopped["Volume"], stopped["IsStopped"]) == (Decimal("20.00"), True)
    done = forecourt.at(57).status()
    assert (done.type, done.data["Volume"]) == ("PumpEndOfTransactionStatus", Decimal("20.00"))


def test_a_stop_before_any_product_flowed_leaves_no_transaction():
    forecourt = Forecourt()
    forecourt.station.arrive(car())
    forecourt.at(20).send("PumpAuthorize", Pump=1, Type="FullTank")
    forecourt.at(21).send("PumpStop", Pump=1)
    idle = forecourt.at(30).status()
    assert (idle.type, idle.data["LastTransaction"]) == ("PumpIdleStatus", 0)
    forecourt.station.arrive(car(number=2))
    forecourt.at(40).send("PumpAuthorize", Pump=1, Type="FullTank")
    assert forecourt.status().data["Transaction"] == 1  # the number was not used up


def test_a_prepay_authorisation_waits_for_the_next_customer():
    forecourt = Forecourt()
    forecourt.send("PumpAuthorize", Pump=1, Nozzle=1, Type="Volume", Dose=Decimal("5.00"))
    waiting = forecourt.at(100).status()
    assert (waiting.type, waiting.data["Volume"]) == ("PumpFillingStatus", 0)
    forecourt.station.arrive(car(litres="40"))
    forecourt.at(110 + 2 + 30)
    data = forecourt.status().data
    assert data["Volume"] == Decimal("5.00")


def test_only_the_pending_end_of_transaction_can_be_closed_and_only_once():
    # Codes/names: Technotrade Java SDK com/technotrade/pts2/enumeration/Result.java (stored file
    # 17288538076); a firmware that already closed answers ..._NOT_END_OF_TRANSACTION (stored
    # file 55826710776).
    forecourt = Forecourt()
    forecourt.station.arrive(car(litres="10"))
    forecourt.at(10).send("PumpAuthorize", Pump=1, Type="FullTank")
    forecourt.at(200)
    wrong = forecourt.send("PumpCloseTransaction", Pump=1, Transaction=2)
    assert (wrong.error, wrong.code, wrong.message) == (
        True,
        E.JSONPTS_ERROR_TRANSACTION_NUMBER_NOT_MATCH,
        "JSONPTS_ERROR_TRANSACTION_NUMBER_NOT_MATCH",
    )
    assert forecourt.status().type == "PumpEndOfTransactionStatus"  # still held
    assert forecourt.send("PumpCloseTransaction", Pump=1, Transaction=1).message == "OK"
    again = forecourt.send("PumpCloseTransaction", Pump=1, Transaction=1)
    assert (again.error, again.code, again.message) == (
        True,
        E.JSONPTS_ERROR_PUMP_STATUS_NOT_END_OF_TRANSACTION,
        "JSONPTS_ERROR_PUMP_STATUS_NOT_END_OF_TRANSACTION",
    )
    never = forecourt.send("PumpCloseTransaction", Pump=1, Transaction=7)
    assert never.code == E.JSONPTS_ERROR_PUMP_STATUS_NOT_END_OF_TRANSACTION


def test_an_authorisation_is_refused_while_the_pump_is_busy():
    forecourt = Forecourt()
    forecourt.station.arrive(car())
    forecourt.at(10).send("PumpAuthorize", Pump=1, Type="FullTank")
    again = forecourt.at(30).send("PumpAuthorize", Pump=1, Type="FullTank")
    assert (again.error, again.code) == (True, E.JSONPTS_ERROR_DUPLICATED_AUTHORIZATION_REQUEST)
    assert forecourt.station.stats["double_authorisations"] == 1
    forecourt.at(200)  # end of transaction, not closed
    held = forecourt.send("PumpAuthorize", Pump=1, Type="FullTank")
    assert held.code == E.JSONPTS_ERROR_PUMP_BUSY_FILLING


def test_totals_grow_by_what_each_transaction_dispensed():
    forecourt = Forecourt()
    before = forecourt.send("PumpGetTotals", Pump=1, Nozzle=1)
    assert (before.type, before.data["Volume"]) == ("PumpTotals", Decimal("1000.00"))
    forecourt.station.arrive(car(litres="40"))
    forecourt.at(10).send("PumpAuthorize", Pump=1, Type="FullTank")
    after = forecourt.at(200).send("PumpGetTotals", Pump=1, Nozzle=1).data
    assert (after["Volume"], after["Amount"], after["Transaction"]) == (
        Decimal("1040.00"),
        Decimal("315.60"),
        1,
    )


def test_the_transactions_report_covers_the_asked_local_time_window():
    forecourt = Forecourt()
    for number, start in ((1, 0), (2, 600)):
        forecourt.at(start).station.arrive(car(litres="10", number=number))
        forecourt.at(start + 10).send("PumpAuthorize", Pump=1, Type="FullTank")
        forecourt.at(start + 100).send("PumpCloseTransaction", Pump=1, Transaction=number)
    report = forecourt.send(
        "ReportGetPumpTransactions",
        Pump=1,
        DateTimeStart="2026-11-25T10:00:00",
        DateTimeEnd="2026-11-25T10:05:00",
    )
    assert report.type == "ReportPumpTransactions"
    assert [item["Transaction"] for item in report.data] == [1]
    item = report.data[0]
    assert (item["Volume"], item["TotalVolume"], item["UserId"]) == (
        Decimal("10.00"),
        Decimal("1010.00"),
        0,
    )


def test_bad_packets_get_error_packets_while_their_siblings_are_answered():
    forecourt = Forecourt()
    items = [
        {"Id": 1, "Type": "PumpGetStatus", "Data": {"Pump": 1}},
        {"Id": 2, "Type": "PumpAuthorize", "Data": {"Pump": 9, "Type": "FullTank"}},
        {"Id": 3, "Type": "PumpSelfDestruct", "Data": {"Pump": 1}},
        {"Id": "four", "Type": "PumpGetStatus"},
        {"Id": 5, "Type": "PumpAuthorize", "Data": {"Pump": 1, "Type": "Gallons"}},
        {"Id": 6, "Type": "PumpAuthorize", "Data": {"Pump": 1, "Type": "Volume", "Dose": 1.001}},
        {"Id": 7, "Type": "PumpGetStatus", "Data": {"Pump": True}},
        {"Id": 8, "Type": "PumpGetStatus", "Data": {"Pump": 2}},
    ]
    items[5]["Data"]["Dose"] = Decimal("1.001")  # finer than 0.01 L
    replies = forecourt.station.handle_items(items, T0)
    assert [r.id for r in replies] == [1, 2, 3, 0, 5, 6, 7, 8]
    # The vendor's codes, and its code name as the Message (Java SDK enumeration/Result.java,
    # stored file 17288538076).
    assert [r.code for r in replies] == [
        None,
        E.JSONPTS_ERROR_PUMP_NUMBER_OUT_OF_RANGE,
        E.JSONPTS_ERROR_NOT_FOUND,
        E.INVALID_JSON_REQUEST,
        E.JSONPTS_ERROR_TYPE_OUT_OF_RANGE,
        E.JSONPTS_ERROR_COULD_NOT_GET_DOSE_VALUE,
        E.JSONPTS_ERROR_COULD_NOT_GET_PUMP_NUMBER,
        None,
    ]
    assert [r.message for r in replies if r.error] == [
        "JSONPTS_ERROR_PUMP_NUMBER_OUT_OF_RANGE",
        "JSONPTS_ERROR_NOT_FOUND",
        "INVALID_JSON_REQUEST",
        "JSONPTS_ERROR_TYPE_OUT_OF_RANGE",
        "JSONPTS_ERROR_COULD_NOT_GET_DOSE_VALUE",
        "JSONPTS_ERROR_COULD_NOT_GET_PUMP_NUMBER",
    ]
    assert replies[0].type == replies[7].type == "PumpIdleStatus"
    assert forecourt.status().type == "PumpIdleStatus"  # the refused authorisations did nothing


def test_an_emergency_stop_halts_the_flow_at_once_and_blocks_the_pump_until_released():
    forecourt = Forecourt()
    forecourt.station.arrive(car(litres="40"))
    forecourt.at(20).send("PumpAuthorize", Pump=1, Type="FullTank")
    assert forecourt.at(52).send("PumpEmergencyStop", Pump=1).message == "OK"
    stopped = forecourt.at(53).status().data
    assert (stopped["Volume"], stopped["IsStopped"], stopped["EmergencyStop"]) == (
        Decimal("20.00"),
        True,
        True,
    )
    # The partial volume is a transaction like any other, closable while the pump is blocked.
    ended = forecourt.at(60).status()
    assert (ended.type, ended.data["Volume"]) == ("PumpEndOfTransactionStatus", Decimal("20.00"))
    assert forecourt.send("PumpCloseTransaction", Pump=1, Transaction=1).message == "OK"
    blocked = forecourt.status()
    assert (blocked.type, blocked.data["EmergencyStop"]) == ("PumpIdleStatus", True)
    forecourt.station.arrive(car(number=2))
    assert forecourt.at(100).status().data["NozzleUp"] == 0  # no customer takes a blocked pump
    refused = forecourt.send("PumpAuthorize", Pump=1, Type="FullTank")
    assert refused.code == E.JSONPTS_ERROR_PUMP_BUSY_OTHER_REQUEST_EXECUTED
    assert forecourt.station.health()["emergency_stopped_pumps"] == [1]

    assert forecourt.send("PumpResume", Pump=1).message == "OK"  # the release [I]
    released = forecourt.status().data
    assert "EmergencyStop" not in released
    assert forecourt.at(110).status().data["NozzleUp"] == 1  # the queued car drives up
    assert forecourt.send("PumpAuthorize", Pump=1, Type="FullTank").data["Transaction"] == 2
    assert forecourt.station.stats["emergency_stops"] == 1


def test_an_emergency_stop_cancels_a_prepay_and_its_release_packet_is_configurable():
    config = config_dict()
    config["emergency_release"] = "PumpEmergencyStopRelease"
    forecourt = Forecourt(config)
    forecourt.send("PumpAuthorize", Pump=1, Type="FullTank")
    forecourt.send("PumpEmergencyStop", Pump=1)
    assert forecourt.status().type == "PumpIdleStatus"  # the prepay is gone
    not_suspended = forecourt.send("PumpResume", Pump=1)
    assert not_suspended.code == E.JSONPTS_ERROR_PUMP_NOT_IN_FILLING_PROCESS
    assert forecourt.send("PumpEmergencyStopRelease", Pump=1).message == "OK"
    assert forecourt.send("PumpAuthorize", Pump=1, Type="FullTank").error is False


def test_the_controller_tells_its_decimals_identity_firmware_uptime_and_clock():
    # Reply types and fields: Technotrade Java SDK com/technotrade/pts2/network/http/
    # GetSystemDecimalDigits.java (stored file 17487983676), GetUniqueIdentifier.java (17114324032),
    # GetFirmwareInformation.java (17114670687), GetDateTime.java (17523703720); uptime: web UI
    # device-information page, SystemOperationInformation.SystemUpTime in ms (56316693476).
    config = config_dict()
    config["volume_decimals"] = 3
    config["volume_total_decimals"] = 3
    config["amount_total_decimals"] = 2
    forecourt = Forecourt(config)
    decimals = forecourt.send("GetSystemDecimalDigits")
    assert (decimals.type, decimals.data) == (
        "SystemDecimalDigits",
        {"Price": 2, "Amount": 2, "Volume": 3, "AmountTotal": 2, "VolumeTotal": 3},
    )
    identifier = forecourt.send("GetUniqueIdentifier")
    assert (identifier.type, identifier.data) == ("UniqueIdentifier", {"Id": 4242})
    firmware = forecourt.send("GetFirmwareInformation")
    assert (firmware.type, firmware.data["DateTime"]) == (
        "FirmwareInformation",
        "2024-01-01T00:00:00",
    )
    assert forecourt.send("GetSystemOperationInformation").data["SystemUpTime"] == 0
    uptime = forecourt.at(90.5).send("GetSystemOperationInformation")
    assert (uptime.type, uptime.data["SystemUpTime"]) == ("SystemOperationInformation", 90_500)
    clock = forecourt.send("GetDateTime")
    assert (clock.type, clock.data["DateTime"], clock.data["UTCOffset"]) == (
        "DateTime",
        "2026-11-25T10:01:30",
        8,
    )


def test_an_offline_pump_reports_offline_and_refuses_commands():
    forecourt = Forecourt()
    forecourt.station.set_offline({2})
    assert forecourt.status(2).type == "PumpOfflineStatus"
    refused = forecourt.send("PumpAuthorize", Pump=2, Type="FullTank")
    assert refused.code == E.JSONPTS_ERROR_PUMP_BUSY_OTHER_REQUEST_EXECUTED


def test_the_same_seed_and_commands_give_the_same_day():
    def run() -> dict[str, int]:
        forecourt = Forecourt(arrivals=True, arrivals_per_hour=30, max_queue=3)
        forecourt.at(6 * 3600)
        return dict(forecourt.station.stats)

    first = run()
    assert first == run()
    assert first["arrived"] > 100


def test_arrivals_follow_the_configured_hourly_rate():
    forecourt = Forecourt(arrivals=True, arrivals_per_hour=60, max_queue=1000)
    forecourt.at(50 * 3600)
    # Poisson: mean 3000, standard deviation about 55; 5 sigma either side.
    assert 2725 < forecourt.station.stats["arrived"] < 3275


def test_customers_want_realistic_volumes_on_the_device_grid():
    model = CustomerModel.from_json(
        {
            "seed": 3,
            "truck_share": Decimal("0.5"),
            "truck_grade_ids": [0],
            "grade_mix": [{"grade_id": 92, "weight": 1}],
        },
        known_grades={0, 92},
    )
    source = CustomerSource(model, volume_step_ml=10)
    customers = [source.new_customer(T0) for _ in range(500)]
    trucks = [c for c in customers if c.truck]
    cars = [c for c in customers if not c.truck]
    assert trucks
    assert cars
    assert all(c.target_ml % 10 == 0 for c in customers)
    assert all(30_000 <= c.target_ml <= 50_000 and c.grade_id == 92 for c in cars)
    assert all(100_000 <= c.target_ml <= 400_000 and c.grade_id == 0 for c in trucks)
    assert all(30 <= c.flow_ml_per_s * 60 / 1000 <= 50 for c in cars)
    assert all(c.flow_ml_per_s * 60 / 1000 <= 130 for c in trucks)


def test_a_station_without_truck_grades_gets_no_trucks():
    model = CustomerModel.from_json(
        {"truck_share": Decimal("0.9"), "truck_grade_ids": []}, known_grades={92, 95}
    )
    source = CustomerSource(model, volume_step_ml=10)
    assert not any(source.new_customer(T0).truck for _ in range(100))


def test_a_config_price_the_device_cannot_display_is_refused_at_start():
    broken = config_dict()
    broken["pumps"][0]["nozzles"][0]["price_mmu"] = 789_500  # 7.895 with 2 price decimals
    with pytest.raises(SimConfigError):
        ControllerConfig.from_json(broken)


# --------------------------------------------------------------------------- HTTP, in-process


@pytest.fixture
def app_and_clock():
    clock = ManualClock()
    return create_app(ControllerConfig.from_json(config_dict()), clock), clock


async def test_the_jsonpts_endpoint_wants_credentials(app_and_clock):
    app, _ = app_and_clock
    body = b'{"Protocol":"jsonPTS","Packets":[]}'
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://sim") as http:
        assert (await http.post("/jsonPTS", content=body)).status_code == 401
        wrong = await http.post("/jsonPTS", content=body, headers=basic("admin", "guess"))
        assert wrong.status_code == 401
        # "any" (the default): both schemes are offered, one challenge each.
        challenges = wrong.headers.get_list("www-authenticate")
        assert [c.split()[0] for c in challenges] == ["Digest", "Basic"]
        right = await http.post("/jsonPTS", content=body, headers=basic("admin", "secret"))
        assert right.status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"Protocol":"jsonPTS2","Packets":[{"Id":1,"Type":"PumpAuthorize","Data":{"Pump":1,"Type":"FullTank"}}]}',
        b'{"Protocol":"jsonPTS","Packets":{"Id":1,"Type":"PumpAuthorize","Data":{"Pump":1,"Type":"FullTank"}}}',
    ],
)
async def test_a_malformed_post_gets_http_400_and_changes_nothing(app_and_clock, body):
    app, _ = app_and_clock
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://sim") as http:
        reply = await http.post("/jsonPTS", content=body, headers=basic("admin", "secret"))
    assert reply.status_code == 400
    assert reply.json()["Code"] == "jsonpts.malformed"
    assert app.state.station.pumps[1].auth is None


async def test_the_control_endpoint_stops_and_starts_arrivals(app_and_clock):
    app, clock = app_and_clock
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://sim") as http:
        started = await http.post("/sim/control", content=b'{"arrivals": true}')
        assert started.json()["arrivals"] is True
        clock.advance(3600)
        health = (await http.get("/sim/health")).json()
        assert health["stats"]["arrived"] > 0
        stopped = await http.post("/sim/control", content=b'{"arrivals": false}')
        arrived = stopped.json()["stats"]["arrived"]
        clock.advance(3600)
        assert (await http.get("/sim/health")).json()["stats"]["arrived"] == arrived
        bad = await http.post("/sim/control", content=b'{"arrivals": "maybe"}')
        assert bad.status_code == 400


def test_health_counts_the_customers_on_the_forecourt_even_at_pumps_that_show_idle():
    forecourt = Forecourt()
    forecourt.at(0).station.arrive(car(litres="10"))
    forecourt.station.arrive(car(number=2))  # pump 1 is taken (pump 2 sells 95): it queues
    health = forecourt.station.health()
    assert (health["pumps"], health["queue"], health["customers"]) == (
        {"1": "idle", "2": "idle"},  # the first customer is still walking up
        1,
        2,
    )
    forecourt.at(10).send("PumpAuthorize", Pump=1, Type="FullTank")
    ended = forecourt.at(300).status(1)
    assert forecourt.station.health()["customers"] == 1  # hung up and gone; one still waits
    forecourt.send("PumpCloseTransaction", Pump=1, Transaction=ended.data["Transaction"])
    health = forecourt.station.health()
    # Every pump idle and nobody queued, yet the second customer walks up to pump 1.
    assert (health["pumps"], health["queue"], health["customers"]) == (
        {"1": "idle", "2": "idle"},
        0,
        1,
    )


async def test_the_driver_walks_a_whole_sale_through_the_simulator(app_and_clock):
    app, clock = app_and_clock
    driver = JsonPtsDriver(
        "http://sim",
        "admin",
        "secret",
        timezone="Asia/Shanghai",
        transport=httpx.ASGITransport(app),
    )
    station: Station = app.state.station
    async with driver:
        station.arrive(car(litres="40"))
        clock.advance(10)
        (calling,) = await driver.pump_status([1])
        assert (calling.state, calling.nozzle) == (PumpState.CALLING, 1)
        before = await driver.totals(1, 1)

        confirmed = await driver.authorize(
            1, 1, Preset(PresetType.VOLUME, volume_ml=25_000), 789_000
        )
        assert confirmed == 1
        (authorised,) = await driver.pump_status([1])
        assert (authorised.state, authorised.volume_ml, authorised.transaction) == (
            PumpState.AUTHORISED,
            0,
            1,
        )
        clock.advance(2 + 15)
        fuelling, idle = await driver.pump_status([1, 2])
        assert (fuelling.state, fuelling.volume_ml) == (PumpState.FUELLING, 10_000)
        assert idle.state is PumpState.IDLE
        await driver.suspend(1)
        assert (await driver.pump_status([1]))[0].state is PumpState.SUSPENDED
        await driver.resume(1)
        clock.advance(300)

        (ended,) = await driver.pump_status([1])
        assert ended.state is PumpState.END_OF_TRANSACTION
        (held,) = await driver.unacknowledged_transactions([1, 2])
        assert (held.pump, held.transaction, held.volume_ml) == (1, 1, 25_000)
        assert held.amount_minor == amount_for(25_000, 789_000).minor == 19_725
        assert held.totalizer_start_ml is None  # never derived: the edge reads totals itself
        assert held.totalizer_end_ml == before.volume_ml + 25_000
        assert (held.flags, held.raw) == ((), ())
        assert held.started_at == T0 + timedelta(seconds=10)
        assert held.closed is False
        assert await driver.finished_transaction(1) == held
        assert await driver.finished_transaction(2) is None

        await driver.close_transaction(1, 1)
        with pytest.raises(DeviceRejected) as closed_twice:
            await driver.close_transaction(1, 1)
        assert closed_twice.value.details["device_code"] == (
            E.JSONPTS_ERROR_PUMP_STATUS_NOT_END_OF_TRANSACTION
        )
        assert await driver.unacknowledged_transactions([1, 2]) == []
        (reported,) = await driver.transactions(1, T0, clock.now())
        assert (reported.transaction, reported.volume_ml, reported.closed) == (1, 25_000, True)
        after = await driver.totals(1, 1)
        assert after.volume_ml - before.volume_ml == 25_000
        assert after.amount_minor - before.amount_minor == 19_725

        with pytest.raises(DeviceRejected) as caught:
            await driver.resume(1)
        assert caught.value.details["device_code"] == E.JSONPTS_ERROR_PUMP_NOT_IN_FILLING_PROCESS
        assert caught.value.details["device_message"] == "JSONPTS_ERROR_PUMP_NOT_IN_FILLING_PROCESS"


# --------------------------------------------------------------------------- the real process


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[tuple[SimulatorProcess, SimulatedClock]]:
    clock = SimulatedClock(sim_epoch=T0, wall_epoch=time.time(), speed=SPEED)
    config = config_dict(
        arrivals=True,
        arrivals_per_hour=240,
        lift_delay_s=[5, 10],
        authorise_timeout_s=600,
        max_queue=2,
    )
    process = SimulatorProcess(config, tmp_path, env=clock.to_env())
    try:
        process.start()
        yield process, clock
    finally:
        process.stop()  # always: a leaked simulator would outlive the test run


async def test_the_simulator_process_announces_its_port_and_runs_on_simulated_time(simulator):
    process, clock = simulator
    port = int(process.port_file.read_text())
    assert process.base_url.endswith(f":{port}")
    health = httpx.get(f"{process.base_url}/sim/health").json()
    sim_time = datetime.fromisoformat(health["sim_time"])
    assert abs((sim_time - clock.now()).total_seconds()) < SPEED * 1.0
    assert "PTS-2 simulator listening" in process.log_tail()


async def test_the_real_driver_sells_fuel_through_the_simulator_process(simulator):
    process, clock = simulator
    async with real_driver(process) as driver:

        async def a_calling_pump():
            statuses = await driver.pump_status([1, 2])
            return next((s for s in statuses if s.state is PumpState.CALLING), None)

        calling = await eventually(a_calling_pump)
        before = await driver.totals(calling.pump, calling.nozzle)
        preset = Preset(PresetType.VOLUME, volume_ml=5_000)
        confirmed = await driver.authorize(calling.pump, calling.nozzle, preset, 789_000)

        async def finished():
            (status,) = await driver.pump_status([calling.pump])
            return status if status.state is PumpState.END_OF_TRANSACTION else None

        ended = await eventually(finished)
        assert ended.volume_ml == 5_000
        assert ended.amount_minor == amount_for(5_000, 789_000).minor

        (held,) = await driver.unacknowledged_transactions([calling.pump])
        assert held.transaction == ended.transaction == confirmed
        assert held.totalizer_end_ml == before.volume_ml + 5_000
        assert held.ended_at.utcoffset() is not None

        await driver.close_transaction(calling.pump, held.transaction)
        with pytest.raises(DeviceRejected):
            await driver.close_transaction(calling.pump, held.transaction)
        after = await driver.totals(calling.pump, calling.nozzle)
        assert after.volume_ml == before.volume_ml + 5_000
        report = await driver.transactions(calling.pump, T0, clock.now() + timedelta(seconds=5))
        assert [(t.transaction, t.closed) for t in report] == [(held.transaction, True)]


async def test_the_simulator_process_refuses_bad_requests_and_obeys_its_control(simulator):
    process, _ = simulator
    url = process.base_url
    async with httpx.AsyncClient(base_url=url, timeout=5.0) as http:
        unauthorised = await http.post("/jsonPTS", content=b'{"Protocol":"jsonPTS","Packets":[]}')
        assert unauthorised.status_code == 401
        broken = await http.post("/jsonPTS", content=b"{", headers=basic("admin", "secret"))
        assert broken.status_code == 400

        body = dumps(
            {
                "Protocol": "jsonPTS",
                "Packets": [
                    {"Id": 1, "Type": "PumpGetStatus", "Data": {"Pump": 1}},
                    {"Id": 2, "Type": "PumpGetStatus", "Data": {"Pump": 7}},
                ],
            }
        )
        mixed = await http.post("/jsonPTS", content=body, headers=basic("admin", "secret"))
        first, second = decode_envelope(mixed.content)
        assert first.error is False
        assert (second.error, second.code) == (True, E.JSONPTS_ERROR_PUMP_NUMBER_OUT_OF_RANGE)

        stopped = (await http.post("/sim/control", content=b'{"arrivals": false}')).json()
        assert stopped["arrivals"] is False
        a_minute_on = datetime.fromisoformat(stopped["sim_time"]) + timedelta(minutes=1)

        async def a_simulated_minute_later():
            health = (await http.get("/sim/health")).json()
            return health if datetime.fromisoformat(health["sim_time"]) >= a_minute_on else None

        later = await eventually(a_simulated_minute_later, interval=0.05)
        assert later["stats"].get("arrived", 0) == stopped["stats"].get("arrived", 0)


def test_stopping_the_simulator_process_ends_it(tmp_path):
    clock = SimulatedClock(sim_epoch=T0, wall_epoch=time.time(), speed=SPEED)
    process = SimulatorProcess(config_dict(), tmp_path, env=clock.to_env())
    try:
        process.start()
        child = process.process
        assert child is not None
        assert child.poll() is None
    finally:
        process.stop()
    assert child.poll() is not None
