"""TLS codec edges: counts past nine, frames cut or stretched, bytes that must not be inside a
reply, and units against their definitions.

"3xx manual" = Veeder-Root Serial Interface Manual 576013-635 rev U (TLS-300/350), from
``eredden/Veeder-Root-TLS-Socket-Library:docs/``, as in ``test_codec_manual.py``: frames are
built from the layouts of its functions 202 and 205 with the codec's checksum (§5), which
``test_codec_manual.py`` and ``test_codec_captures.py`` prove on the manual and on captures.
Unit definitions: the international yard and pound agreement (1959) for the inch (25.4 mm)
and the US gallon (231 cubic inches, 3.785411784 L); the UK Weights and Measures Act 1985 for
the imperial gallon (4.54609 L).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forecourt.protocols.model import LengthUnit, TemperatureUnit, VolumeUnit
from forecourt.protocols.tls.codec import (
    DeliveryReply,
    FrameReader,
    GaugeFloat,
    RawReply,
    RequestReader,
    TankStatusReply,
    TlsMalformed,
    UnknownCommandReply,
    WallClock,
    checksum,
    decode_reply,
    encode_reply,
    from_mdegc,
    from_ml,
    from_um,
    to_mdegc,
    to_ml,
    to_um,
)


def framed(body: str) -> bytes:
    covered = b"\x01" + body.encode("ascii") + b"&&"
    return covered + f"{checksum(covered):04X}".encode() + b"\x03"


def f32(value: float) -> str:
    return struct.pack(">f", value).hex().upper()


def reason_of(frame: bytes) -> str:
    with pytest.raises(TlsMalformed) as caught:
        decode_reply(frame)
    return caught.value.reason


# --- counts past nine ---------------------------------------------------------------------


def test_a_tank_with_its_ten_most_recent_deliveries_reads_all_ten():
    """3xx manual function 202: ``dd`` deliveries follow for the tank (decimal), each with
    its start and end time, a hex field count and that many floats."""
    one = "2601150930" + "2601151005" + "02" + f32(1000.0) + f32(3000.0)
    reply = decode_reply(framed("i20200" + "2601160800" + "01R" + "10" + one * 10))
    assert isinstance(reply, DeliveryReply)
    (tank,) = reply.tanks
    assert len(tank.deliveries) == 10
    assert all(d.ended == WallClock(2026, 1, 15, 10, 5) for d in tank.deliveries)
    assert encode_reply(reply) == framed("i20200" + "2601160800" + "01R" + "10" + one * 10)


def test_a_tank_with_more_than_nine_alarms_reads_each_of_them():
    """3xx manual function 205: ``nn`` (hex) alarm type numbers follow for the tank."""
    codes = ["02", "03", "04", "05", "06", "07", "08", "09", "10", "11", "12"]
    frame = framed("i20500" + "2601150930" + "01" + f"{len(codes):02X}" + "".join(codes))
    assert b"010B02" in frame  # eleven alarms: count 0B
    reply = decode_reply(frame)
    assert isinstance(reply, TankStatusReply)
    assert [(t.tank, t.codes) for t in reply.tanks] == [(1, tuple(codes))]
    assert encode_reply(reply) == frame


# --- bytes that do not belong -------------------------------------------------------------


def test_the_unknown_command_reply_is_recognised_in_lower_case_hex():
    """3xx manual §5: ``SOH 9999FF1B ETX``; hex digits are read in either letter case."""
    assert decode_reply(b"\x019999ff1b\x03") == UnknownCommandReply()
    assert decode_reply(b"\x019999FF1B\x03") == UnknownCommandReply()


@pytest.mark.parametrize("inside", ["\x03", "\x01"])
def test_a_reply_with_etx_or_soh_inside_is_refused_even_with_a_good_checksum(inside: str):
    frame = framed(f"i90200260115093{inside}0SOFTWARE# 346330-100-B")
    assert reason_of(frame) == "bad_frame"


def test_a_frame_cut_short_by_a_new_soh_is_reported_truncated_and_the_next_read():
    whole = encode_reply(RawReply("i90200", "2601150930 SOFTWARE# 346330-100-B"))
    reader = FrameReader()
    out = reader.feed(whole[:12] + whole)
    assert len(out) == 2
    assert isinstance(out[0], TlsMalformed)
    assert out[0].reason == "truncated"
    assert out[1] == whole
    assert reader.garbage_bytes == 0


@settings(max_examples=50, deadline=None)
@given(st.integers(8, 200))
def test_a_frame_of_the_maximum_size_is_read_and_one_byte_more_is_oversized(limit: int):
    # Given frames of exactly ``limit`` bytes and of one byte more (SOH to ETX)
    def frame_of(size: int) -> bytes:
        frame = encode_reply(RawReply("i90200", "x" * (size - 14)))
        assert len(frame) == size
        return frame

    fits, too_long = frame_of(max(limit, 14)), frame_of(max(limit, 14) + 1)
    reader = FrameReader(max_frame=max(limit, 14))
    # When each comes whole, or in two pieces
    for chunks in ([fits], [fits[:5], fits[5:]]):
        assert [f for c in chunks for f in reader.feed(c)] == [fits]
    for chunks in ([too_long], [too_long[:5], too_long[5:]]):
        out = [f for c in chunks for f in reader.feed(c)]
        # Then the one that fits is read, the longer one refused as oversized
        assert len(out) == 1
        assert isinstance(out[0], TlsMalformed)
        assert out[0].reason == "oversized"
    assert reader.garbage_bytes == 0


def test_the_rest_of_an_oversized_frame_is_skipped_not_counted_as_garbage():
    reader = FrameReader(max_frame=32)
    good = encode_reply(RawReply("i90200", "2601150930"))
    assert len(good) <= 32
    out = reader.feed(b"\x01" + b"i20100" + b"7" * 60)
    out += reader.feed(b"8" * 30 + b"&&0000\x03" + good)
    assert [type(item) for item in out] == [TlsMalformed, bytes]
    assert isinstance(out[0], TlsMalformed)
    assert out[0].reason == "oversized"
    assert out[1] == good
    assert reader.garbage_bytes == 0


def test_a_new_soh_abandons_an_unfinished_request_and_starts_the_next():
    reader = RequestReader()
    assert reader.feed(b"\x01i20\x01i20100") == [b"\x01i20100"]
    assert reader.garbage_bytes == 0


# --- units --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "ml"),
    [
        (VolumeUnit.LITRES, 1_000_000),
        (VolumeUnit.US_GALLONS, 3_785_412),  # 3785411.784 ml
        (VolumeUnit.IMPERIAL_GALLONS, 4_546_090),
    ],
)
def test_a_thousand_of_each_volume_unit_is_its_definition_in_millilitres(unit, ml):
    assert to_ml(GaugeFloat.of(1000.0), unit) == ml
    assert from_ml(ml, unit).value == pytest.approx(1000.0, abs=1e-3)


def test_lengths_and_temperatures_go_to_the_gauge_by_their_definitions():
    assert from_um(25_400, LengthUnit.INCHES).value == 1.0
    assert from_um(1_500, LengthUnit.MILLIMETRES).value == 1.5
    assert from_mdegc(100_000, TemperatureUnit.FAHRENHEIT).value == 212.0
    assert from_mdegc(0, TemperatureUnit.FAHRENHEIT).value == 32.0
    assert from_mdegc(-40_000, TemperatureUnit.FAHRENHEIT).value == -40.0
    assert from_mdegc(-40_000, TemperatureUnit.CELSIUS).value == -40.0


@settings(max_examples=200, deadline=None)
@given(st.integers(-50_000, 90_000), st.sampled_from(list(TemperatureUnit)))
def test_a_temperature_sent_to_the_gauge_reads_back_within_a_millidegree(mdegc, unit):
    assert abs(to_mdegc(from_mdegc(mdegc, unit), unit) - mdegc) <= 1  # type: ignore[operator]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 4_000_000), st.sampled_from(list(LengthUnit)))
def test_a_height_sent_to_the_gauge_reads_back_to_the_float_precision(um, unit):
    back = to_um(from_um(um, unit), unit)
    assert back is not None
    assert abs(back - um) <= max(1, um // 2**22)
