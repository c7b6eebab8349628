"""jsonPTS codec: exact numbers, envelope round trips, and a clear error for any garbage."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forecourt.kernel.errors import ForecourtError
from forecourt.protocols.jsonpts.codec import (
    JsonPtsMalformed,
    JsonPtsPrecision,
    NumberFormat,
    Packet,
    PtsErrorCode,
    Quantity,
    decimal_to_nearest,
    decode_envelope,
    dumps,
    encode_envelope,
    error_packet,
    format_local,
    get_int,
    get_number,
    loads,
    parse_envelope,
    parse_local,
    parse_packet,
    vendor_error,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")


def fixed_point(units: int, places: int) -> Decimal:
    """``units`` of ``10**-places`` as a Decimal, built exactly (strategies use it)."""
    return Decimal(units).scaleb(-places)


# --------------------------------------------------------------------------- exact scaling


@given(
    volume_decimals=st.integers(0, 3),
    steps=st.integers(-(10**12), 10**12),
)
def test_a_volume_on_the_device_grid_survives_ml_to_wire_and_back(volume_decimals, steps):
    fmt = NumberFormat(volume_decimals=volume_decimals)
    volume_ml = steps * fmt.volume_step_ml
    wire = fmt.ml_to_volume(volume_ml)
    assert -wire.as_tuple().exponent == volume_decimals
    assert fmt.volume_to_ml(wire) == volume_ml


@given(volume_decimals=st.integers(0, 3), units=st.integers(-(10**12), 10**12))
def test_a_wire_volume_with_the_configured_decimals_survives_wire_to_ml_and_back(
    volume_decimals, units
):
    fmt = NumberFormat(volume_decimals=volume_decimals)
    wire = fixed_point(units, volume_decimals)
    assert fmt.ml_to_volume(fmt.volume_to_ml(wire)) == wire


@given(
    currency=st.sampled_from(["CNY", "JPY", "KWD"]),
    amount_decimals=st.integers(0, 5),
    units=st.integers(-(10**12), 10**12),
)
def test_amounts_round_trip_exactly_at_every_decimals_setting(currency, amount_decimals, units):
    fmt = NumberFormat(amount_decimals=amount_decimals, currency=currency)
    wire = fixed_point(units, amount_decimals)
    try:
        minor = fmt.amount_to_minor(wire)
    except JsonPtsMalformed:
        # Only a value finer than the currency's minor unit may be refused.
        assert amount_decimals > {"CNY": 2, "JPY": 0, "KWD": 3}[currency]
        return
    assert fmt.minor_to_amount(minor) == wire
    assert fmt.amount_to_minor(fmt.minor_to_amount(minor)) == minor


@given(
    currency=st.sampled_from(["CNY", "EUR", "JPY"]),
    price_decimals=st.integers(0, 5),
    units=st.integers(0, 10**9),
)
def test_prices_round_trip_exactly_at_every_decimals_setting(currency, price_decimals, units):
    fmt = NumberFormat(price_decimals=price_decimals, currency=currency)
    wire = fixed_point(units, price_decimals)
    try:
        mmu = fmt.price_to_mmu(wire)
    except JsonPtsMalformed:
        # Only a price finer than a milli-minor unit per litre may be refused.
        assert price_decimals > {"CNY": 5, "EUR": 5, "JPY": 3}[currency]
        return
    assert fmt.mmu_to_price(mmu) == wire
    assert fmt.price_to_mmu(fmt.mmu_to_price(mmu)) == mmu


def test_a_china_price_of_seven_eighty_nine_is_789000_milli_fen_per_litre():
    fmt = NumberFormat(price_decimals=2, currency="CNY")
    assert fmt.price_to_mmu(Decimal("7.89")) == 789_000
    assert str(fmt.mmu_to_price(789_000)) == "7.89"
    assert fmt.price_to_mmu(Decimal("7.890")) == 789_000  # trailing zeros are not extra decimals


def test_a_wire_value_finer_than_the_configured_decimals_is_malformed_not_rounded():
    fmt = NumberFormat(volume_decimals=2, amount_decimals=2, price_decimals=2)
    with pytest.raises(JsonPtsMalformed):
        fmt.volume_to_ml(Decimal("5.235"))
    with pytest.raises(JsonPtsMalformed):
        fmt.amount_to_minor(Decimal("1.001"))
    with pytest.raises(JsonPtsMalformed):
        fmt.price_to_mmu(Decimal("7.891"))


def test_an_integer_off_the_device_grid_cannot_be_written_and_says_why():
    fmt = NumberFormat(volume_decimals=2, price_decimals=2)
    with pytest.raises(JsonPtsPrecision) as caught:
        fmt.ml_to_volume(5_235)
    assert caught.value.code == "jsonpts.precision"
    with pytest.raises(JsonPtsPrecision):
        fmt.mmu_to_price(789_500)


def test_decimals_settings_outside_what_the_units_can_hold_are_refused():
    with pytest.raises(ForecourtError):
        NumberFormat(volume_decimals=4)  # 0.0001 L is not a whole ml
    with pytest.raises(ForecourtError):
        NumberFormat(currency="XXX")


# --------------------------------------------------------------------------- JSON text


def test_decimals_are_written_as_exact_json_numbers_keeping_their_digits():
    assert dumps({"Price": Decimal("7.80"), "Volume": Decimal("0.10")}) == (
        b'{"Price":7.80,"Volume":0.10}'
    )
    assert dumps([Decimal("123456789012345678901234567890.01")]) == (
        b"[123456789012345678901234567890.01]"
    )


def test_floats_are_refused_by_the_encoder_so_none_slips_onto_the_wire():
    with pytest.raises(TypeError):
        dumps({"Volume": 1.1})


def test_json_fractions_are_parsed_as_decimals_and_integers_as_ints():
    parsed = loads(b'{"a": 0.1, "b": 10, "c": 1e2}')
    assert parsed == {"a": Decimal("0.1"), "b": 10, "c": Decimal("1E+2")}
    assert isinstance(parsed["a"], Decimal)
    assert isinstance(parsed["b"], int)


def test_nan_and_infinity_are_malformed():
    for text in ("NaN", "[Infinity]", '{"a": -Infinity}'):
        with pytest.raises(JsonPtsMalformed):
            loads(text)


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.text(max_size=20)
    | st.builds(fixed_point, st.integers(-(10**15), 10**15), st.integers(0, 8))
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
packets = st.builds(
    Packet,
    id=st.integers(0, 2**31 - 1),
    type=st.text(min_size=1, max_size=30),
    data=st.none()
    | st.dictionaries(st.text(max_size=10), json_values, max_size=5)
    | st.lists(json_values, max_size=4),
)
error_packets = st.builds(
    error_packet,
    st.integers(0, 2**31 - 1),
    st.text(max_size=30),
    st.integers(-1000, 1000),
    st.text(max_size=50),
)


@given(st.lists(packets | error_packets, max_size=6))
def test_any_packets_survive_encode_then_decode_unchanged(message):
    assert decode_envelope(encode_envelope(message)) == message


@given(json_values)
def test_any_json_value_survives_dumps_then_loads_unchanged(value):
    assert loads(dumps(value)) == value


# --------------------------------------------------------------------------- garbage


def decodes_or_fails_clearly(body: bytes | str) -> None:
    """Either a valid message, or JsonPtsMalformed with its code; any other exception escapes."""
    failure = None
    try:
        decode_envelope(body)
    except JsonPtsMalformed as exc:
        failure = exc
    assert failure is None or failure.code == "jsonpts.malformed"


@given(st.binary(max_size=200))
def test_random_bytes_raise_the_clear_malformed_error_and_nothing_else(body):
    decodes_or_fails_clearly(body)


@given(st.text(max_size=200))
def test_random_text_raises_the_clear_malformed_error_and_nothing_else(body):
    decodes_or_fails_clearly(body)


@given(json_values)
def test_valid_json_of_the_wrong_shape_raises_the_clear_malformed_error(value):
    # Wrapped in an envelope half the time, so the packet-level checks get exercised too.
    for body in (value, {"Protocol": "jsonPTS", "Packets": [value]}):
        decodes_or_fails_clearly(json.dumps(body, default=str))


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"\xff\xfe\x00",
        b"[" * 100_000,
        b"1" * 5_000,  # beyond Python's int-digit limit
        b"[]",
        b'{"Protocol": "jsonPTS"}',
        b'{"Protocol": "PTS", "Packets": []}',
        b'{"Protocol": "jsonPTS", "Packets": {}}',
        b'{"Protocol": "jsonPTS", "Packets": [{"Id": "1", "Type": "PumpGetStatus"}]}',
        b'{"Protocol": "jsonPTS", "Packets": [{"Id": 1.0, "Type": "PumpGetStatus"}]}',
        b'{"Protocol": "jsonPTS", "Packets": [{"Id": true, "Type": "PumpGetStatus"}]}',
        b'{"Protocol": "jsonPTS", "Packets": [{"Id": 1}]}',
        b'{"Protocol": "jsonPTS", "Packets": [{"Id": 1, "Type": "X", "Data": 5}]}',
        b'{"Protocol": "jsonPTS", "Packets": [{"Id": 1, "Type": "X", "Error": true}]}',
        b'{"Protocol": "jsonPTS", "Packets": [{"Id": 1, "Type": "X", "Error": "yes", "Code": 1}]}',
    ],
)
def test_each_kind_of_broken_message_is_reported_as_malformed(body):
    with pytest.raises(JsonPtsMalformed) as caught:
        decode_envelope(body)
    assert caught.value.code == "jsonpts.malformed"
    assert isinstance(caught.value, ForecourtError)


def test_a_broken_packet_does_not_stop_its_envelope_from_being_read():
    items = parse_envelope(b'{"Protocol":"jsonPTS","Packets":[{"Id":1,"Type":"A"},7]}')
    assert parse_packet(items[0]) == Packet(1, "A")
    with pytest.raises(JsonPtsMalformed):
        parse_packet(items[1])


def test_an_error_packet_carries_code_and_message_on_the_wire():
    body = encode_envelope([error_packet(4, "PumpAuthorize", 3, "no pump 9")])
    assert json.loads(body)["Packets"][0] == {
        "Id": 4,
        "Type": "PumpAuthorize",
        "Error": True,
        "Code": 3,
        "Message": "no pump 9",
    }


def test_typed_field_readers_name_the_field_at_fault():
    with pytest.raises(JsonPtsMalformed) as caught:
        get_int({"Pump": True}, "Pump")
    assert caught.value.details == {"field": "Pump"}
    with pytest.raises(JsonPtsMalformed):
        get_int({}, "Pump")
    with pytest.raises(JsonPtsMalformed):
        get_number({"Volume": "5.00"}, "Volume")
    assert get_number({"Volume": 5}, "Volume") == Decimal(5)


# --------------------------------------------------------------------------- date-times


def test_local_device_time_is_read_as_an_aware_instant_in_the_controller_zone():
    parsed = parse_local("2026-11-25T10:00:00", SHANGHAI)
    assert parsed.utcoffset() is not None
    assert parsed.astimezone(UTC) == datetime(2026, 11, 25, 2, 0, tzinfo=UTC)


def test_an_instant_is_written_as_local_wall_clock_time_without_offset():
    instant = datetime(2026, 11, 25, 2, 0, 0, 900_000, tzinfo=UTC)
    assert format_local(instant, SHANGHAI) == "2026-11-25T10:00:00"


@pytest.mark.parametrize("text", ["", "2026-11-25 10:00:00", "2026-11-25T10:00:00+08:00", 5])
def test_a_device_date_time_in_another_format_is_malformed(text):
    with pytest.raises(JsonPtsMalformed):
        parse_local(text, SHANGHAI)


# --------------------------------------------------------------------------- lenient reading


@given(
    units=st.integers(-(10**15), 10**15),
    places=st.integers(0, 8),
    decimals=st.integers(0, 5),
    unit_exponent=st.integers(0, 5),
)
def test_a_lenient_read_is_the_half_even_nearest_unit_and_says_what_it_had_to_do(
    units, places, decimals, unit_exponent
):
    wire = fixed_point(units, places)
    read = decimal_to_nearest(wire, decimals=decimals, unit_exponent=unit_exponent)
    exact_units = wire.scaleb(unit_exponent)
    reference = exact_units.quantize(Decimal(1), rounding=ROUND_HALF_EVEN)
    assert read.units == int(reference)
    assert read.exact is (exact_units == reference)
    significant = -wire.normalize().as_tuple().exponent if wire else 0
    assert read.extra_decimals is (significant > decimals)
    assert Decimal(read.wire) == wire


@given(units=st.integers(-(10**12), 10**12), places=st.integers(0, 4))
def test_a_lenient_read_agrees_with_the_strict_one_whenever_the_strict_one_succeeds(units, places):
    fmt = NumberFormat(volume_decimals=2, amount_decimals=2, price_decimals=2)
    wire = fixed_point(units, places)
    for quantity in Quantity:
        read = fmt.read(wire, quantity)
        try:
            strict = fmt.to_units(wire, quantity)
        except JsonPtsMalformed:
            assert not read.exact or read.extra_decimals
            continue
        assert (read.units, read.exact, read.extra_decimals) == (strict, True, False)


def test_lenient_reading_still_refuses_what_is_not_a_sane_number():
    with pytest.raises(JsonPtsMalformed):
        decimal_to_nearest(Decimal("1E+999999999"), decimals=2, unit_exponent=3)
    with pytest.raises(JsonPtsMalformed):
        decimal_to_nearest(Decimal("NaN"), decimals=2, unit_exponent=3)


def test_totalizers_have_decimals_of_their_own_defaulting_to_the_transactions_ones():
    fmt = NumberFormat(volume_decimals=2, amount_decimals=2)
    assert (fmt.total_volume_decimals, fmt.total_amount_decimals) == (2, 2)
    totals = NumberFormat(volume_decimals=2, volume_total_decimals=3, amount_total_decimals=1)
    assert str(totals.to_wire(1_234_567, Quantity.TOTAL_VOLUME)) == "1234.567"
    assert totals.to_units(Decimal("1234.567"), Quantity.TOTAL_VOLUME) == 1_234_567
    with pytest.raises(JsonPtsMalformed):
        totals.to_units(Decimal("1234.567"), Quantity.VOLUME)
    with pytest.raises(ForecourtError):
        NumberFormat(volume_total_decimals=4)


def test_a_vendor_error_packet_carries_the_code_and_its_name():
    # Codes and names: Technotrade Java SDK com/technotrade/pts2/enumeration/Result.java
    # (stored file 17288538076); clients compare Message to the name (stored file 23248885078).
    packet = vendor_error(
        3, "PumpCloseTransaction", PtsErrorCode.JSONPTS_ERROR_TRANSACTION_NUMBER_NOT_MATCH
    )
    assert json.loads(encode_envelope([packet]))["Packets"][0] == {
        "Id": 3,
        "Type": "PumpCloseTransaction",
        "Error": True,
        "Code": 27,
        "Message": "JSONPTS_ERROR_TRANSACTION_NUMBER_NOT_MATCH",
    }
    assert PtsErrorCode.JSONPTS_ERROR_PUMP_STATUS_NOT_END_OF_TRANSACTION == 69
    assert PtsErrorCode.JSONPTS_ERROR_NOT_FOUND == 1
