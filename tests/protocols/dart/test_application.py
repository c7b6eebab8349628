"""DART application level: transactions from real traffic, BCD, exact scaling, describe().

Vectors: captured frames from ``moduslightstech-lgtm/intelipump:tests/fixtures/dart/
data_frames.json`` (fixture names given), lab frames from ``moduslightstech-lgtm/intelipump:
docs/real-wayne-price-programming-review.md`` and field-log frames quoted in stored file
22760329427 (a DART "Authorization Guide"); every one of them carries a valid CRC-16/ARC.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forecourt.kernel.errors import InvalidValue
from forecourt.protocols.dart.application import (
    Alarm,
    AllowedNozzles,
    Command,
    DartPrecision,
    Decimals,
    Direction,
    FilledValues,
    NozzleStatus,
    PresetAmount,
    PresetVolume,
    PriceUpdate,
    PumpCommand,
    PumpIdentity,
    PumpParameters,
    PumpPrices,
    PumpStatusReply,
    RequestTotals,
    TotalCounters,
    UnknownTransaction,
    bcd_decode,
    bcd_encode,
    decode_transactions,
    describe,
    encode_transactions,
    parse_hex,
    raw_to_units,
    units_to_raw,
)
from forecourt.protocols.dart.line import DartMalformed, decode_frame

# data-capture_2026-07-19_merged_a-addr50-seqE-13: DC2 + DC3 + DC1 + DC101 in one frame.
FOUR_TRANSACTIONS = (
    "50 3E 02 08 00 00 00 00 00 00 00 00 03 04 00 99 07 07 01 01 05 65 10 01 13 36 38 49 66"
    " 13 36 38 49 66 00 00 00 00 00 39 10 FA 03 FA"
)


def data_of(frame_hex: str) -> bytes:
    return decode_frame(parse_hex(frame_hex)).data


def test_a_captured_frame_of_four_transactions_decodes_each_of_them() -> None:
    # Given data-capture_2026-07-19_merged_a-addr50-seqE-13 from the pump
    # When its transactions are decoded as the pump's
    items = decode_transactions(data_of(FOUR_TRANSACTIONS), Direction.FROM_DEVICE)
    # Then: no filling on display, price 00 99 07 with nozzle 7 in its holster, status 5
    # (filling completed), and nozzle 1's volume counter 1336384966 with meter 1 the same
    assert items == [
        FilledValues(0, 0),
        NozzleStatus(9907, 7, False),
        PumpStatusReply(5),
        TotalCounters(1, 1336384966, 1336384966, 0),
    ]


@pytest.mark.parametrize(
    ("source", "frame_hex", "expected"),
    [
        (
            "data-capture_2026-07-19_merged_a-addr51-seqC-4",
            "51 3C 01 01 05 03 04 00 11 75 01 1A C7 03 FA",
            [PumpStatusReply(5), NozzleStatus(1175, 1, False)],
        ),
        (
            "data-capture_2026-07-19_merged_a-addr51-seqD-6",
            "51 3D 65 10 01 00 00 00 00 02 00 00 00 00 02 00 00 00 00 00 58 F8 03 FA",
            [TotalCounters(1, 2, 2, 0)],
        ),
        (
            "stored file 22760329427, usc-fuel.log 6:29:11 PM (pump in RESET, nozzle 1 out)",
            "50 34 01 01 01 03 04 00 21 80 11 9C 82 03 FA",
            [PumpStatusReply(1), NozzleStatus(2180, 1, True)],
        ),
        (
            "stored file 22760329427, usc-fuel.log 6:29:12 PM (AUTHORIZED)",
            "50 36 01 01 02 03 04 00 21 80 11 0E 48 03 FA",
            [PumpStatusReply(2), NozzleStatus(2180, 1, True)],
        ),
        (
            "stored file 22760329427, usc-fuel.log 6:38:11 PM (NOT PROGRAMMED)",
            "50 34 01 01 00 9E 6C 03 FA",
            [PumpStatusReply(0)],
        ),
    ],
)
def test_captured_pump_frames_decode_to_their_transactions(
    source: str, frame_hex: str, expected: list[object]
) -> None:
    # Given a frame a pump sent
    # When decoded from the device
    items = decode_transactions(data_of(frame_hex), Direction.FROM_DEVICE)
    # Then the transactions are the documented ones
    assert items == expected, source


@pytest.mark.parametrize(
    ("source", "frame_hex", "expected"),
    [
        (
            "data-capture_2026-07-19_merged_a-addr51-seq0-0 (CD101 request totals)",
            "51 30 65 01 01 22 83 03 FA",
            [RequestTotals(1)],
        ),
        (
            "data-capture_2026-07-19_merged_a-addr51-seq0-3 (CD1 return status)",
            "51 30 01 01 00 A2 9C 03 FA",
            [Command(PumpCommand.RETURN_STATUS)],
        ),
        (
            "data-capture_2026-07-19_merged_a-addr51-seq4-11 (CD5, one nozzle)",
            "51 34 05 03 00 11 75 45 42 03 FA",
            [PriceUpdate((1175,))],
        ),
        (
            "real-wayne-price-programming-review.md, CD5 two nozzles",
            "50 30 05 06 00 11 75 00 11 75 da c7 03 fa",
            [PriceUpdate((1175, 1175))],
        ),
        (
            "real-wayne-price-programming-review.md, CD2 nozzles 1+2 then CD1 RESET",
            "50 34 02 02 01 02 01 01 05 70 ed 03 fa",
            [AllowedNozzles((1, 2)), Command(PumpCommand.RESET)],
        ),
        (
            "stored file 22760329427, usc-fuel.log 6:29:12 PM (AUTHORIZE)",
            "50 37 01 01 06 1E 2A 03 FA",
            [Command(PumpCommand.AUTHORIZE)],
        ),
    ],
)
def test_captured_controller_frames_decode_to_their_commands(
    source: str, frame_hex: str, expected: list[object]
) -> None:
    # Given a frame a site controller sent
    items = decode_transactions(data_of(frame_hex), Direction.TO_DEVICE)
    # Then its transactions are the documented commands, and they encode back the same
    assert items == expected, source
    assert encode_transactions(items) == data_of(frame_hex)


def test_command_codes_are_the_documented_values() -> None:
    # Then the CD1 codes are the Pump Interface's
    assert {c.name: c.value for c in PumpCommand} == {
        "RETURN_STATUS": 0x00,
        "RETURN_PUMP_PARAMETERS": 0x02,
        "RETURN_PUMP_IDENTITY": 0x03,
        "RETURN_FILLING_INFORMATION": 0x04,
        "RESET": 0x05,
        "AUTHORIZE": 0x06,
        "STOP": 0x08,
        "SWITCH_OFF": 0x0A,
        "SUSPEND": 0x0D,
        "RESUME": 0x0E,
        "RETURN_PRICES": 0x0F,
    }


def test_pump_parameters_carry_the_pumps_own_decimals_at_their_offsets() -> None:
    # Given DC7 with decimals 2/2/3, max amount 9999.99 and two graded nozzles
    parameters = PumpParameters(2, 2, 3, 999999, (1, 2))
    data = encode_transactions([parameters])
    # Then the layout is TRANS 07 LNG 50: 22 reserved, DPVOL DPAMO DPUNP at 22-24, MAMO at
    # 29-32, grades from 35
    assert data[:2] == bytes((0x07, 50))
    body = data[2:]
    assert (body[22], body[23], body[24]) == (2, 2, 3)
    assert body[29:33] == bytes.fromhex("00999999")
    assert body[35:37] == bytes((1, 2))
    # And it decodes back, with two nozzles counted
    (decoded,) = decode_transactions(data, Direction.FROM_DEVICE)
    assert isinstance(decoded, PumpParameters)
    assert decoded.nozzles == 2
    assert (decoded.volume_decimals, decoded.amount_decimals, decoded.price_decimals) == (2, 2, 3)


def test_an_unknown_transaction_code_is_kept_raw_not_an_error() -> None:
    # Given a transaction 0x66 (DC102, which we do not read) between two known ones
    data = bytes.fromhex("01 01 05 66 02 00 01 03 04 00 11 75 01".replace(" ", ""))
    # Then it decodes as unknown with its bytes, and the others decode normally
    assert decode_transactions(data, Direction.FROM_DEVICE) == [
        PumpStatusReply(5),
        UnknownTransaction(0x66, b"\x00\x01"),
        NozzleStatus(1175, 1, False),
    ]


@pytest.mark.parametrize(
    ("data_hex", "reason"),
    [
        ("0101", "bad_length"),  # LNG 1 but no data
        ("02080000", "bad_length"),  # DC2 cut short
        ("0102 0505", "bad_length"),  # DC1 with two bytes
        ("0304 00 1A 75 01", "bad_bcd"),  # price nibble A
        ("0208 00000000 000000F0", "bad_bcd"),
    ],
)
def test_broken_pump_transactions_are_refused_with_a_reason(data_hex: str, reason: str) -> None:
    with pytest.raises(DartMalformed) as caught:
        decode_transactions(parse_hex(data_hex), Direction.FROM_DEVICE)
    assert caught.value.reason == reason


def test_packed_bcd_refuses_non_decimal_nibbles_and_values_that_do_not_fit() -> None:
    assert bcd_decode(bytes.fromhex("00001234")) == 1234
    assert bcd_encode(1175, 3) == bytes.fromhex("001175")
    with pytest.raises(DartMalformed):
        bcd_decode(b"\x0a")
    with pytest.raises(InvalidValue):
        bcd_encode(1_000_000, 3)
    with pytest.raises(InvalidValue):
        bcd_encode(-1, 3)


# --------------------------------------------------------------------------- scaling


def test_scaling_uses_the_pumps_decimals_to_our_integer_units() -> None:
    # Given a pump with 2 volume, 2 amount and 3 price decimals, in CNY
    d = Decimals(2, 2, 3, "CNY")
    # Then 35.20 L is 35200 ml, 277.73 is 27773 fen, 7.890/L is 789000 milli-fen per litre
    assert d.volume_ml(3520).units == 35200
    assert d.amount_minor(27773).units == 27773
    assert d.price_mmu(7890).units == 789000
    # And back, exactly
    assert d.raw_volume(35200) == 3520
    assert d.raw_price(789000) == 7890


def test_a_value_finer_than_our_unit_is_the_nearest_integer_half_even_and_flagged() -> None:
    # Given a volume with 4 decimals (finer than a millilitre)
    # Then 1.2345 L -> 1234 ml (half to even), 1.2355 L -> 1236 ml, both not exact
    assert raw_to_units(12345, 4, 3).units == 1234
    assert raw_to_units(12355, 4, 3).units == 1236
    assert not raw_to_units(12345, 4, 3).exact
    assert raw_to_units(12345, 4, 3).text == "1.2345"
    assert raw_to_units(12340, 4, 3).exact


def test_an_integer_the_pump_cannot_show_is_refused_not_rounded() -> None:
    # Given a pump showing prices with 2 decimals
    d = Decimals(2, 2, 2, "CNY")
    # Then 7.895/L cannot be sent to it
    with pytest.raises(DartPrecision):
        d.raw_price(789500)


@given(st.integers(0, 99_999_999), st.integers(0, 8), st.integers(0, 5))
def test_scaling_up_then_down_is_exact_whenever_it_is_exact(
    raw: int, decimals: int, exponent: int
) -> None:
    scaled = raw_to_units(raw, decimals, exponent)
    if scaled.exact:
        assert units_to_raw(scaled.units, decimals, exponent, what="x") == raw


# --------------------------------------------------------------------------- describe


def test_describe_explains_a_captured_frame_with_the_pumps_decimals() -> None:
    # Given the four-transaction frame and decimals 2/2/3 (as DC7 would say)
    result = describe(parse_hex(FOUR_TRANSACTIONS), "from-device", Decimals(2, 2, 3))
    # Then the line level and each transaction are shown, with raw and scaled values
    assert result["address"] == "0x50"
    assert result["kind"] == "data"
    assert result["tx"] == 14
    assert result["crc"] == "0xFA39"
    names = [t["name"] for t in result["transactions"]]
    assert names == [
        "DC2 filled volume and amount",
        "DC3 nozzle status and filling price",
        "DC1 pump status",
        "DC101 total counters",
    ]
    price = result["transactions"][1]
    assert price["fields"] == {"price_raw": 9907, "nozzle": 7, "nozzle_out": False}
    assert price["scaled"]["price"] == {"text": "9.907", "unit_price_mmu": 990700, "exact": True}
    assert result["transactions"][3]["scaled"]["total"]["volume_ml"] == 13363849660
    json.dumps(result)  # JSON-able


def test_describe_without_decimals_says_they_are_unknown_and_keeps_raw_values() -> None:
    result = describe(parse_hex("51 3C 01 01 05 03 04 00 11 75 01 1A C7 03 FA"), "from-device")
    assert result["decimals"] == "unknown"
    assert result["transactions"][1]["fields"]["price_raw"] == 1175
    assert "scaled" not in result["transactions"][1]


def test_describe_without_a_direction_gives_both_readings() -> None:
    # Given a frame whose code means a command to the pump and a status from it
    result = describe(parse_hex("51 30 01 01 00 A2 9C 03 FA"), None)
    # Then both readings are there and the direction says unknown
    assert result["direction"] == "unknown"
    assert result["as_to_device"][0]["fields"]["meaning"] == "return_status"
    assert result["as_from_device"][0]["fields"]["meaning"].startswith("not programmed")
    json.dumps(result)


def test_describe_explains_a_short_frame() -> None:
    result = describe(parse_hex("51:CA:FA"), "from-device")
    assert (result["kind"], result["tx"]) == ("ack", 10)


def test_describe_refuses_a_frame_with_a_bad_crc_in_one_line() -> None:
    with pytest.raises(DartMalformed) as caught:
        describe(parse_hex("50 37 01 01 06 1D 3D 03 FA"), "to-device")
    assert caught.value.reason == "bad_crc"
    assert "\n" not in caught.value.message


def test_parse_hex_accepts_spaces_colons_and_prefixes_and_refuses_the_rest() -> None:
    assert parse_hex("50 20 FA") == parse_hex("50:20:fa") == parse_hex("0x50 0x20 0xFA")
    with pytest.raises(DartMalformed):
        parse_hex("50 2")
    with pytest.raises(DartMalformed):
        parse_hex("zz")


# --------------------------------------------------------------------------- properties

bcd8 = st.integers(0, 99_999_999)
bcd6 = st.integers(0, 999_999)
nozzle = st.integers(1, 15)
to_device = st.one_of(
    st.builds(Command, st.sampled_from(list(PumpCommand))),
    st.builds(AllowedNozzles, st.lists(nozzle, min_size=1, max_size=15).map(tuple)),
    st.builds(PresetVolume, bcd8),
    st.builds(PresetAmount, bcd8),
    st.builds(PriceUpdate, st.lists(bcd6, min_size=1, max_size=15).map(tuple)),
    st.builds(RequestTotals, st.sampled_from([*range(1, 16), *range(0x11, 0x20)])),
)
from_device = st.one_of(
    st.builds(PumpStatusReply, st.integers(0, 255)),
    st.builds(FilledValues, bcd8, bcd8),
    st.builds(NozzleStatus, bcd6, st.integers(0, 15), st.booleans()),
    st.builds(Alarm, st.integers(0, 255)),
    st.builds(
        PumpParameters,
        st.integers(0, 8),
        st.integers(0, 8),
        st.integers(0, 8),
        bcd8,
        st.lists(st.integers(0, 255), min_size=15, max_size=15).map(tuple),
    ),
    st.builds(PumpIdentity, st.integers(0, 9_999_999_999).map(lambda n: f"{n:010d}")),
    st.builds(
        TotalCounters,
        st.integers(0, 255),
        st.integers(0, 10**10 - 1),
        st.integers(0, 10**10 - 1),
        st.integers(0, 10**10 - 1),
    ),
    st.builds(PumpPrices, st.lists(bcd6, min_size=1, max_size=15).map(tuple)),
)


@given(st.lists(to_device, min_size=1, max_size=6))
def test_every_command_transaction_round_trips(items: list[object]) -> None:
    data = encode_transactions(items)  # type: ignore[arg-type]
    assert decode_transactions(data, Direction.TO_DEVICE) == items


@given(st.lists(from_device, min_size=1, max_size=5))
def test_every_pump_transaction_round_trips(items: list[object]) -> None:
    data = encode_transactions(items)  # type: ignore[arg-type]
    assert decode_transactions(data, Direction.FROM_DEVICE) == items


@given(st.binary(max_size=300), st.sampled_from(list(Direction)))
def test_random_transaction_bytes_never_raise_anything_but_the_codec_error(
    data: bytes, direction: Direction
) -> None:
    reasons = []
    try:
        decode_transactions(data, direction)
    except DartMalformed as exc:
        reasons.append(exc.reason)
    assert all(reasons)


@given(st.binary(min_size=3, max_size=80), st.sampled_from(["to-device", "from-device", None]))
def test_describe_of_random_bytes_is_json_or_the_codec_error(
    data: bytes, direction: str | None
) -> None:
    try:
        result = describe(data, direction, Decimals(2, 2, 3))
    except DartMalformed:
        return
    json.dumps(result)
