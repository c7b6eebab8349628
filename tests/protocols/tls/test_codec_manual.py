"""Codec against the Veeder-Root Serial Interface Manuals' own examples and layouts.

"3xx manual" = 576013-635 rev U (TLS-300/350), "TLS4 manual" = 577013-950 rev T, both from
``eredden/Veeder-Root-TLS-Socket-Library:docs/``. Where the manual gives only a layout (the
computer format of i201/i202/i20C/i205), the frame is built from that layout with the values
of the same function's display-format example, and the test names the section.
"""

from __future__ import annotations

import math
import struct
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from forecourt.protocols.model import LengthUnit, TemperatureUnit, VolumeUnit
from forecourt.protocols.tls.codec import (
    FLAG_NON_FINITE,
    METRIC,
    UNKNOWN_COMMAND_FRAME,
    DeliveryReply,
    GaugeFloat,
    GaugeUnits,
    InventoryReply,
    Request,
    RequestReader,
    TankStatusReply,
    TlsMalformed,
    UnknownCommandReply,
    WallClock,
    alarm_from,
    checksum,
    decode_reply,
    decode_request,
    delivery_from,
    describe,
    encode_reply,
    encode_request,
    measurement_from,
    parse_text,
    to_mdegc,
    to_ml,
    to_um,
)

US = GaugeUnits(VolumeUnit.US_GALLONS, LengthUnit.INCHES, TemperatureUnit.FAHRENHEIT)
CHICAGO = ZoneInfo("America/Chicago")


def framed(body: str) -> bytes:
    covered = b"\x01" + body.encode("ascii") + b"&&"
    return covered + f"{checksum(covered):04X}".encode() + b"\x03"


def f32(value: float) -> str:
    return struct.pack(">f", value).hex().upper()


def reason_of(frame: bytes) -> str:
    with pytest.raises(TlsMalformed) as caught:
        decode_reply(frame)
    assert "\n" not in caught.value.message
    return caught.value.reason


# --- floats (3xx manual §6.3.2) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("3F800000", 1.0), ("B8D1B717", -0.0001), ("C2C7FAE1", -99.99), ("461C4000", 10000.0)],
)
def test_the_manuals_float_examples_decode_to_their_values(text, value):
    """3xx manual §6.3.2.1-4."""
    decoded = GaugeFloat(text).value
    assert decoded == struct.unpack(">f", struct.pack(">f", value))[0]
    assert math.isclose(decoded, value, rel_tol=1e-6)
    assert GaugeFloat.of(value).hex == text


def test_a_float_is_read_in_either_letter_case():
    assert GaugeFloat("c2c7fae1") == GaugeFloat("C2C7FAE1")


def test_zero_is_all_zero_digits_by_convention():
    """3xx manual §6.3.1.4: 00000000 represents 0.0."""
    assert GaugeFloat("00000000").value == 0.0


def test_a_float_of_question_marks_is_no_data():
    """3xx manual §7: an inactive device's numbers are filled with question marks."""
    assert GaugeFloat("????????").value is None
    assert to_ml(GaugeFloat("????????"), VolumeUnit.LITRES) is None


def test_a_float_with_a_non_hex_digit_is_refused_as_bad_float():
    with pytest.raises(TlsMalformed) as caught:
        GaugeFloat("45G37B04")
    assert caught.value.reason == "bad_float"


# --- envelope (3xx manual §5, §6.1) -------------------------------------------------------


def test_the_unknown_command_reply_is_soh_9999ff1b_etx_and_ff1b_is_its_checksum():
    """3xx manual §5: "FF1B is the appropriate checksum for the preceding <SOH>9999"."""
    assert checksum(b"\x019999") == 0xFF1B
    assert UNKNOWN_COMMAND_FRAME == b"\x019999FF1B\x03"
    assert isinstance(decode_reply(UNKNOWN_COMMAND_FRAME), UnknownCommandReply)
    assert encode_reply(UnknownCommandReply()) == UNKNOWN_COMMAND_FRAME


def test_a_checksum_adds_to_zero_with_the_frame():
    """3xx manual §6.1: the 16-bit sum of the characters and the checksum is zero."""
    frame = framed("i205002601150930")
    assert (sum(frame[:-5]) + int(frame[-5:-1], 16)) & 0xFFFF == 0


def test_a_display_format_reply_without_a_checksum_is_refused_as_bad_frame():
    """3xx manual §6.2: display format is SOH function data ETX, with no && checksum."""
    assert reason_of(b"\x01\r\nI20100\r\nJAN 22, 1996  3:06 PM\r\n\x03") == "bad_frame"


def test_a_reply_without_etx_is_truncated():
    assert reason_of(framed("i205002601150930")[:-1]) == "truncated"


def test_a_reply_whose_checksum_is_not_hex_is_refused_as_bad_checksum():
    assert reason_of(b"\x01i205002601150930&&ZZZZ\x03") == "bad_checksum"


# --- requests (3xx manual §5) -------------------------------------------------------------


def test_a_computer_format_request_is_soh_and_the_function_code():
    request = decode_request(b"\x01i20100")
    assert (request.function, request.tank, request.security_code) == ("i201", 0, None)
    assert request.code == "i20100"
    assert encode_request(request) == b"\x01i20100"


def test_a_request_may_carry_a_six_character_security_code_first():
    request = decode_request(b"\x01ABC123i20C01")
    assert (request.function, request.tank, request.security_code) == ("i20C", 1, "ABC123")
    assert encode_request(request) == b"\x01ABC123i20C01"


@pytest.mark.parametrize("tail", [b"\r", b"\n", b"\r\n"])
def test_a_trailing_cr_lf_after_a_request_is_tolerated(tail):
    assert decode_request(b"\x01i20500" + tail) == Request("i205", 0)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"i20100", "bad_frame"),
        (b"\x01i2010", "truncated"),
        (b"\x01hello!", "bad_field"),
        (b"\x01i20100i20100i", "bad_field"),
        (b"\x01i201\x0200", "truncated"),
    ],
)
def test_anything_else_is_refused_as_a_request(frame, reason):
    with pytest.raises(TlsMalformed) as caught:
        decode_request(frame)
    assert caught.value.reason == reason


def test_a_request_for_a_function_the_codec_does_not_answer_is_an_unknown_command():
    assert decode_request(b"\x01i99900").known is False
    with pytest.raises(TlsMalformed) as caught:
        decode_request(b"\x01i99900", known_only=True)
    assert caught.value.reason == "unknown_command"


def test_the_request_reader_splits_a_stream_of_requests_and_counts_garbage():
    reader = RequestReader()
    out = reader.feed(b"xx\x01i201") + reader.feed(b"00\r\n\x01i20500\x01i2")
    assert out == [b"\x01i20100", b"\x01i20500"]
    assert reader.garbage_bytes == 2


def test_the_request_reader_of_a_secured_gauge_waits_for_twelve_characters():
    reader = RequestReader(security_code=True)
    assert reader.feed(b"\x01ABC123i20100") == [b"\x01ABC123i20100"]
    assert reader.feed(b"\x01i20100\r") == [b"\x01i20100"]  # early CR: it will not decode


# --- i201 inventory (3xx manual §7.2.2, function 201) -------------------------------------


def inventory_frame(fields: list[str], status: str = "0000") -> bytes:
    return framed(f"i20100260122150601R{status}{len(fields):02X}{''.join(fields)}")


def test_an_i201_tank_record_is_tank_product_status_count_and_floats():
    """Layout of 3xx manual function 201, values of its display example (tank 1, 5329 /
    5413 / 4699 / 48.97 / 0.00 / 37.39, JAN 22 3:06 PM; year 2026 here, as the gauge's
    two-digit years are read in 2000-2099)."""
    values = [5329.0, 5413.0, 4699.0, 48.97, 0.0, 37.39, 0.0]
    reply = decode_reply(inventory_frame([f32(v) for v in values]))

    assert isinstance(reply, InventoryReply)
    assert reply.at == WallClock(2026, 1, 22, 15, 6)
    (tank,) = reply.tanks
    assert (tank.tank, tank.product, tank.status) == (1, "R", 0)
    assert tank.field("volume").value == 5329.0
    assert tank.field("height").value == pytest.approx(48.97)
    assert tank.field("temperature").value == pytest.approx(37.39)


def test_a_gauge_year_is_read_as_20yy():
    """Two-digit years: the gauge's clock is read in 2000-2099."""
    reply = decode_reply(framed("i205002601150930"))
    assert isinstance(reply, TankStatusReply)
    assert reply.at == WallClock(2026, 1, 15, 9, 30)
    assert reply.at.to_datetime(CHICAGO) == datetime(2026, 1, 15, 9, 30, tzinfo=CHICAGO)


def test_an_i201_record_with_fewer_fields_leaves_the_missing_ones_none():
    """Function 201 note 5: NN is the number of fields that follow."""
    reply = decode_reply(inventory_frame([f32(1000.0), f32(990.0), f32(500.0)]))
    assert isinstance(reply, InventoryReply)
    tank = reply.tanks[0]
    assert tank.field("ullage").value == 500.0
    assert tank.field("height") is None
    assert tank.field("water_volume") is None
    m = measurement_from(tank, tank=1, measured_at=datetime.now(CHICAGO), units=METRIC)
    assert (m.ullage_ml, m.product_height_um, m.temperature_mdegc) == (500000, None, None)


def test_an_i201_record_with_more_fields_keeps_them_and_reads_the_first_seven():
    fields = [f32(float(n)) for n in range(1, 10)]
    reply = decode_reply(inventory_frame(fields))
    assert isinstance(reply, InventoryReply)
    tank = reply.tanks[0]
    assert len(tank.fields) == 9
    assert tank.field("water_volume").value == 7.0
    assert encode_reply(reply) == inventory_frame(fields)


def test_i201_status_bits_name_delivery_leak_test_and_invalid_height():
    """Function 201 note 4: bit 1 (LSB) delivery, bit 2 leak test, bit 3 invalid height."""
    reply = decode_reply(inventory_frame([f32(1.0)], status="0007"))
    assert isinstance(reply, InventoryReply)
    assert reply.tanks[0].status_names == (
        "delivery_in_progress",
        "leak_test_in_progress",
        "invalid_height",
    )
    reply = decode_reply(inventory_frame([f32(1.0)], status="0002"))
    assert isinstance(reply, InventoryReply)
    assert reply.tanks[0].status_names == ("leak_test_in_progress",)


def test_a_nan_float_becomes_none_with_a_flag_and_its_hex_kept():
    reply = decode_reply(inventory_frame(["7FC00000", "7F800000", f32(1.0)]))
    assert isinstance(reply, InventoryReply)
    m = measurement_from(reply.tanks[0], tank=1, measured_at=datetime.now(CHICAGO), units=METRIC)
    assert m.volume_ml is None
    assert m.tc_volume_ml is None
    assert m.ullage_ml == 1000
    assert FLAG_NON_FINITE in m.flags
    assert ("volume", "7FC00000") in m.raw
    assert ("tc_volume", "7F800000") in m.raw


def test_an_i201_record_cut_short_inside_its_floats_is_truncated():
    assert reason_of(framed(f"i20100260122150601R000007{f32(1.0)}")) == "truncated"


def test_an_i201_reply_with_an_impossible_date_is_refused_as_bad_field():
    assert reason_of(framed("i201002613301506")) == "bad_field"


def test_an_i201_float_with_a_non_hex_digit_is_refused_as_bad_float():
    assert reason_of(framed("i20100260122150601R00000145G37B04")) == "bad_float"


# --- i202 / i20C deliveries (3xx manual functions 202 and 20C; TLS4 manual 20C) ------------


def delivery_floats() -> list[str]:
    """The display example of function 202 (JUL 28 1997, 3:05 PM -> 3:14 PM): start 1244
    gal / TC 1231 / water 0.00 / 73.89 °F, end 3231 / 3194 / 0.00 / 76.14 °F, height
    24.40 -> 48.27 in."""
    return [f32(v) for v in (1244.0, 1231.0, 0.0, 73.89, 3231.0, 3194.0, 0.0, 76.14, 24.40, 48.27)]


def test_an_i202_delivery_is_start_and_end_times_then_ten_floats():
    fields = delivery_floats()
    frame = framed(f"i20200970729090201R0197072815059707281514{len(fields):02X}{''.join(fields)}")
    reply = decode_reply(frame)

    assert isinstance(reply, DeliveryReply)
    (tank,) = reply.tanks
    (record,) = tank.deliveries
    assert record.started == WallClock(2097, 7, 28, 15, 5)
    assert record.ended == WallClock(2097, 7, 28, 15, 14)
    assert record.field("start_volume").value == 1244.0
    assert record.field("end_height").value == pytest.approx(48.27)
    assert encode_reply(reply) == frame


def test_an_i202_delivery_in_gallons_inches_and_fahrenheit_converts_to_our_units():
    fields = delivery_floats()
    frame = framed(f"i20200970729090201R0197072815059707281514{len(fields):02X}{''.join(fields)}")
    reply = decode_reply(frame)
    assert isinstance(reply, DeliveryReply)
    d = delivery_from(reply.tanks[0].deliveries[0], tank=3, product="R", tz=CHICAGO, units=US)

    assert d.tank == 3
    assert d.started_at == datetime(2097, 7, 28, 15, 5, tzinfo=CHICAGO)
    assert d.start_volume_ml == 4709052  # 1244 × 3785.411784 = 4709052.26
    assert d.end_volume_ml == 12230665  # 3231 × 3785.411784 = 12230665.47
    assert d.volume_ml == 12230665 - 4709052
    assert d.start_tc_volume_ml == 4659842
    assert d.start_water_height_um == 0
    assert d.start_temperature_mdegc == to_mdegc(GaugeFloat(f32(73.89)), TemperatureUnit.FAHRENHEIT)
    assert 23270 <= d.start_temperature_mdegc <= 23273  # 73.89 °F = 23.272 °C
    assert d.end_product_height_um == to_um(GaugeFloat(f32(48.27)), LengthUnit.INCHES)
    assert 1226050 <= d.end_product_height_um <= 1226070  # 48.27 in = 1226.058 mm
    assert ("start_volume", f32(1244.0)) in d.raw


def test_an_i20c_delivery_of_a_tls4_with_twelve_floats_ignores_the_masses():
    """TLS4 manual function 20C adds 11. Starting Mass, 12. Ending Mass."""
    fields = [*delivery_floats(), f32(1.0), f32(2.0)]
    frame = framed(f"i20C00970729090301R0197072815059707281514{len(fields):02X}{''.join(fields)}")
    reply = decode_reply(frame)
    assert isinstance(reply, DeliveryReply)
    record = reply.tanks[0].deliveries[0]
    assert len(record.fields) == 12
    d = delivery_from(record, tank=1, product="R", tz=CHICAGO, units=US)
    assert d.end_volume_ml == 12230665


def test_an_i202_tank_with_no_deliveries_has_a_zero_count():
    """Function 202 note 4: dd is 00 if no data is available for this tank."""
    reply = decode_reply(framed("i20200260115093001R0002P00"))
    assert isinstance(reply, DeliveryReply)
    assert [(t.tank, t.product, t.deliveries) for t in reply.tanks] == [(1, "R", ()), (2, "P", ())]


# --- i205 status (3xx manual function 205, alarm types of function 101 AA=02) -------------


def test_an_i205_reply_lists_the_alarm_type_numbers_active_per_tank():
    reply = decode_reply(framed("i205002601150930010205110200030110"))
    assert isinstance(reply, TankStatusReply)
    assert [(t.tank, t.codes) for t in reply.tanks] == [(1, ("05", "11")), (2, ()), (3, ("10",))]


@pytest.mark.parametrize(
    ("device_code", "name"),
    [
        ("02", "leak"),
        ("03", "high_water"),
        ("04", "overfill"),
        ("05", "low_product"),
        ("06", "sudden_loss"),
        ("07", "high_product"),
        ("09", "probe_out"),
        ("10", "high_water_warning"),
        ("11", "delivery_needed"),
        ("12", "max_product"),
        ("99", "unknown_99"),
    ],
)
def test_tank_alarm_type_numbers_map_to_standard_names_keeping_the_device_code(device_code, name):
    """3xx manual function 101 notes, "If AA is 02 and NN is"."""
    alarm = alarm_from(device_code, tank=4)
    assert (alarm.source, alarm.number, alarm.code, alarm.device_code) == (
        "tank",
        4,
        name,
        device_code,
    )


# --- units ---------------------------------------------------------------------------------


def test_unit_conversions_are_exact_then_rounded_half_even():
    assert to_ml(GaugeFloat.of(1.0), VolumeUnit.US_GALLONS) == 3785  # 3785.411784
    assert to_ml(GaugeFloat.of(1.0), VolumeUnit.IMPERIAL_GALLONS) == 4546  # 4546.09
    # 1/16 L is exactly 62.5 ml and 3/16 L 187.5 ml: ties go to the even neighbour.
    assert to_ml(GaugeFloat.of(0.0625), VolumeUnit.LITRES) == 62
    assert to_ml(GaugeFloat.of(0.1875), VolumeUnit.LITRES) == 188
    assert to_ml(GaugeFloat.of(0.5), VolumeUnit.LITRES) == 500
    assert to_um(GaugeFloat.of(1.0), LengthUnit.INCHES) == 25400
    assert to_um(GaugeFloat.of(0.0625), LengthUnit.MILLIMETRES) == 62
    assert to_mdegc(GaugeFloat.of(0.1875), TemperatureUnit.CELSIUS) == 188
    assert to_mdegc(GaugeFloat.of(212.0), TemperatureUnit.FAHRENHEIT) == 100000
    assert to_mdegc(GaugeFloat.of(-40.0), TemperatureUnit.FAHRENHEIT) == -40000


def test_converting_to_the_model_without_units_is_refused():
    reply = decode_reply(inventory_frame([f32(1.0)]))
    assert isinstance(reply, InventoryReply)
    with pytest.raises(TlsMalformed):
        measurement_from(
            reply.tanks[0], tank=1, measured_at=datetime.now(CHICAGO), units=GaugeUnits()
        )


# --- describe and parse_text --------------------------------------------------------------


def test_describe_tells_a_request_from_a_reply_by_its_etx():
    request = describe(b"\x01i20100")
    assert request["direction"] == "to-device"
    assert request["kind"] == "request"
    assert request["all_tanks"] is True
    assert request["meaning"] == "in-tank inventory report"
    reply = describe(UNKNOWN_COMMAND_FRAME)
    assert reply["direction"] == "from-device"
    assert reply["kind"] == "unknown_command"


def test_describe_masks_a_security_code():
    body = describe(b"\x01ABC123i20100", "to-device")
    assert body["security_code"] == "present"
    assert "ABC123" not in str(body)


def test_describe_with_units_adds_scaled_integers():
    body = describe(inventory_frame([f32(1000.5)]), units=METRIC, timezone="America/Chicago")
    assert body["tanks"][0]["scaled"]["volume_ml"] == 1000500
    assert body["units"] == {"volume": "litres", "length": "millimetres", "temperature": "celsius"}
    assert body["gauge_time"]["at"].endswith("-06:00")


def test_describe_names_the_reason_of_a_frame_that_does_not_decode():
    with pytest.raises(TlsMalformed) as caught:
        describe(b"\x01i205002601150930&&0000\x03")
    assert caught.value.reason == "bad_checksum"


@pytest.mark.parametrize(
    "text",
    [r"\x01i20100", "<SOH>i20100", "<soh>i20100", "^Ai20100", "\x01i20100"],
)
def test_parse_text_reads_escapes_tokens_and_caret_notation(text):
    assert parse_text(text) == b"\x01i20100"


def test_parse_text_reads_a_whole_reply_with_etx():
    assert parse_text(r"\x019999FF1B<ETX>") == UNKNOWN_COMMAND_FRAME
    assert parse_text("^A9999FF1B^C") == UNKNOWN_COMMAND_FRAME
    assert parse_text(r"<SOH>i20100\r\n") == b"\x01i20100\r\n"


@pytest.mark.parametrize("text", ["\\", r"\q", r"\x0", "é"])
def test_parse_text_refuses_what_it_cannot_read(text):
    with pytest.raises(TlsMalformed):
        parse_text(text)
