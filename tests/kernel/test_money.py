"""Money, unit prices and volumes as exact integers.

The dispenser amount (volume × unit price, rounded to the dispenser's resolution) is checked
against an independent reference computed with :meth:`decimal.Decimal.quantize`, for every
rounding mode and the resolutions dispensers use (1, 5 and 10 minor units).
"""

from __future__ import annotations

from decimal import ROUND_DOWN, ROUND_HALF_EVEN, ROUND_HALF_UP, ROUND_UP, Decimal, localcontext

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from forecourt.kernel.errors import CurrencyMismatch, InvalidValue
from forecourt.kernel.money import (
    CURRENCY_EXPONENTS,
    Money,
    Rounding,
    UnitPrice,
    currency_exponent,
    divide_rounded,
    litres_to_ml,
    ml_to_litres,
)

DECIMAL_MODES = {
    Rounding.HALF_UP: ROUND_HALF_UP,
    Rounding.HALF_EVEN: ROUND_HALF_EVEN,
    Rounding.DOWN: ROUND_DOWN,
    Rounding.UP: ROUND_UP,
}

volumes_ml = st.integers(min_value=0, max_value=2_000_000)
prices_mmu = st.integers(min_value=0, max_value=50_000_000)
resolutions = st.sampled_from([1, 5, 10])
roundings = st.sampled_from(list(Rounding))
currencies = st.sampled_from(sorted(CURRENCY_EXPONENTS))
minor_amounts = st.integers(min_value=-(10**18), max_value=10**18)


def reference_amount(volume_ml: int, price_mmu: int, resolution: int, rounding: Rounding) -> int:
    """volume (L) × price (minor/L), quantized to whole resolution steps by ``decimal``."""
    with localcontext() as ctx:
        ctx.prec = 60  # far more digits than 2e6 ml × 5e7 mmu needs: every step is exact
        litres = Decimal(volume_ml) / Decimal(1000)
        minor_per_litre = Decimal(price_mmu) / Decimal(1000)
        steps = (litres * minor_per_litre) / Decimal(resolution)
        return int(steps.quantize(Decimal(1), rounding=DECIMAL_MODES[rounding])) * resolution


def reference_division(numerator: int, denominator: int, rounding: Rounding) -> int:
    with localcontext() as ctx:
        ctx.prec = 80
        exact = Decimal(numerator) / Decimal(denominator)
        return int(exact.quantize(Decimal(1), rounding=DECIMAL_MODES[rounding]))


# --- UnitPrice.amount_for ------------------------------------------------------------------


@given(volume=volumes_ml, price=prices_mmu, resolution=resolutions, rounding=roundings)
@example(volume=500, price=1000, resolution=1, rounding=Rounding.HALF_EVEN)  # 0.5 → 0
@example(volume=1500, price=1000, resolution=1, rounding=Rounding.HALF_EVEN)  # 1.5 → 2
@example(volume=2500, price=10_000, resolution=10, rounding=Rounding.HALF_UP)  # 2.5 steps
@example(volume=2_000_000, price=50_000_000, resolution=5, rounding=Rounding.UP)  # the maxima
@example(volume=1, price=1, resolution=10, rounding=Rounding.UP)  # the smallest positive
def test_the_amount_for_a_volume_matches_decimal_quantize_in_every_rounding_mode(
    volume: int, price: int, resolution: int, rounding: Rounding
) -> None:
    # Given a unit price in milli-minor units per litre
    unit = UnitPrice(price, "CNY")
    # When a dispenser with this resolution and rounding charges the volume
    amount = unit.amount_for(volume, resolution_minor=resolution, rounding=rounding)
    # Then the amount is what decimal quantization of the exact product gives
    assert amount == Money(reference_amount(volume, price, resolution, rounding), "CNY")
    assert amount.minor % resolution == 0


@given(
    half_steps=st.integers(min_value=0, max_value=4_999),
    resolution=resolutions,
    volume_litres=st.sampled_from([1, 2, 4, 5]),
    rounding=roundings,
)
def test_exact_ties_between_two_amount_steps_are_rounded_like_decimal_does(
    half_steps: int, resolution: int, volume_litres: int, rounding: Rounding
) -> None:
    # Given a price and volume whose product lies exactly halfway between two amount steps
    odd_halves = 2 * half_steps + 1
    price = odd_halves * resolution * 500 // volume_litres
    volume = volume_litres * 1000
    assert price * volume == odd_halves * resolution * 500 * 1000  # the product is a tie
    # When the amount is computed
    amount = UnitPrice(price, "EUR").amount_for(
        volume, resolution_minor=resolution, rounding=rounding
    )
    # Then it agrees with decimal's tie-breaking for the mode
    assert amount.minor == reference_amount(volume, price, resolution, rounding)


@pytest.mark.parametrize(
    ("price", "volume", "resolution", "expected"),
    [
        # 7.55 CNY/L × 40.00 L = 302.00 CNY exactly, whatever the mode
        (755_000, 40_000, 1, {"half_up": 30200, "half_even": 30200, "down": 30200, "up": 30200}),
        # 1.459 EUR/L × 1 ml = 0.1459 cent
        (145_900, 1, 1, {"half_up": 0, "half_even": 0, "down": 0, "up": 1}),
        # 0.01/L × 0.5 L = 0.5 minor: a tie below an even number
        (1_000, 500, 1, {"half_up": 1, "half_even": 0, "down": 0, "up": 1}),
        # 0.01/L × 1.5 L = 1.5 minor: a tie below an odd number
        (1_000, 1_500, 1, {"half_up": 2, "half_even": 2, "down": 1, "up": 2}),
        # 0.10/L × 2.5 L = 25 minor = 2.5 jiao on a 10-fen dispenser
        (10_000, 2_500, 10, {"half_up": 30, "half_even": 20, "down": 20, "up": 30}),
        # 7.62 CNY/L × 33.33 L = 253.9746 CNY on a 5-fen dispenser
        (762_000, 33_330, 5, {"half_up": 25395, "half_even": 25395, "down": 25395, "up": 25400}),
    ],
)
def test_worked_examples_of_dispenser_amounts_come_out_as_computed_by_hand(
    price: int, volume: int, resolution: int, expected: dict[str, int]
) -> None:
    # Given a unit price, a volume and a dispenser resolution worked out by hand
    unit = UnitPrice(price, "CNY")
    # When each rounding mode charges the volume
    got = {
        mode.value: unit.amount_for(volume, resolution_minor=resolution, rounding=mode).minor
        for mode in Rounding
    }
    # Then every mode gives the hand-computed amount
    assert got == expected


@pytest.mark.parametrize("resolution", [0, -5])
def test_a_dispenser_resolution_that_is_not_positive_is_refused(resolution: int) -> None:
    with pytest.raises(InvalidValue):
        UnitPrice(755_000, "CNY").amount_for(1000, resolution_minor=resolution)


@pytest.mark.parametrize("volume", [1000.0, True, "1000", Decimal("1000")])
def test_a_volume_that_is_not_an_integer_of_millilitres_is_refused(volume: object) -> None:
    with pytest.raises(InvalidValue):
        UnitPrice(755_000, "CNY").amount_for(volume)  # type: ignore[arg-type]


def test_a_negative_unit_price_is_refused() -> None:
    with pytest.raises(InvalidValue):
        UnitPrice(-1, "CNY")


# --- divide_rounded ------------------------------------------------------------------------

numerators = st.integers(min_value=-(10**20), max_value=10**20)
denominators = st.integers(min_value=1, max_value=10**12)


@given(numerator=numerators, denominator=denominators, rounding=roundings)
@example(numerator=5, denominator=2, rounding=Rounding.HALF_EVEN)
@example(numerator=-5, denominator=2, rounding=Rounding.HALF_UP)
@example(numerator=-7, denominator=2, rounding=Rounding.HALF_EVEN)
def test_divide_rounded_agrees_with_decimal_for_positive_and_negative_numerators(
    numerator: int, denominator: int, rounding: Rounding
) -> None:
    assert divide_rounded(numerator, denominator, rounding) == reference_division(
        numerator, denominator, rounding
    )


@given(numerator=numerators, denominator=denominators, rounding=roundings)
def test_divide_rounded_lands_on_a_neighbour_of_the_exact_quotient(
    numerator: int, denominator: int, rounding: Rounding
) -> None:
    # When a quotient is rounded in any mode
    q = divide_rounded(numerator, denominator, rounding)
    # Then it is less than one denominator away from the numerator
    assert abs(numerator - q * denominator) < denominator
    # And the half modes are never more than half a step away
    if rounding in (Rounding.HALF_UP, Rounding.HALF_EVEN):
        assert 2 * abs(numerator - q * denominator) <= denominator


@given(numerator=st.integers(min_value=0, max_value=10**20), denominator=denominators)
def test_down_and_up_bracket_the_exact_quotient_and_meet_only_when_it_divides(
    numerator: int, denominator: int
) -> None:
    down = divide_rounded(numerator, denominator, Rounding.DOWN)
    up = divide_rounded(numerator, denominator, Rounding.UP)
    assert down * denominator <= numerator <= up * denominator
    assert up - down == (0 if numerator % denominator == 0 else 1)


@given(numerator=numerators, denominator=denominators, rounding=roundings)
def test_divide_rounded_is_symmetric_around_zero(
    numerator: int, denominator: int, rounding: Rounding
) -> None:
    assert divide_rounded(-numerator, denominator, rounding) == -divide_rounded(
        numerator, denominator, rounding
    )


@given(quotient=st.integers(min_value=-(10**9), max_value=10**9), half=denominators)
def test_half_even_sends_an_exact_tie_to_the_even_neighbour(quotient: int, half: int) -> None:
    # Given a numerator exactly halfway between quotient and quotient + 1
    denominator = 2 * half
    numerator = quotient * denominator + half
    # When it is rounded half-even
    q = divide_rounded(numerator, denominator, Rounding.HALF_EVEN)
    # Then the result is one of the two neighbours, and the even one
    assert q in (quotient, quotient + 1)
    assert q % 2 == 0


@pytest.mark.parametrize("denominator", [0, -3])
def test_divide_rounded_refuses_a_denominator_that_is_not_positive(denominator: int) -> None:
    with pytest.raises(InvalidValue):
        divide_rounded(10, denominator, Rounding.HALF_UP)


# --- Money ---------------------------------------------------------------------------------


@given(a=minor_amounts, b=minor_amounts, currency=currencies)
def test_adding_then_subtracting_the_same_amount_gives_the_original_back(
    a: int, b: int, currency: str
) -> None:
    x, y = Money(a, currency), Money(b, currency)
    assert (x + y).minor == a + b
    assert (x - y).minor == a - b
    assert (x + y) - y == x
    assert x + (-x) == Money.zero(currency)


def test_money_in_the_same_currency_orders_by_amount() -> None:
    assert Money(100, "EUR") < Money(101, "EUR")
    assert sorted([Money(5, "CNY"), Money(-3, "CNY"), Money(0, "CNY")]) == [
        Money(-3, "CNY"),
        Money(0, "CNY"),
        Money(5, "CNY"),
    ]


@pytest.mark.parametrize("operation", ["add", "sub"])
def test_combining_two_currencies_is_a_currency_mismatch(operation: str) -> None:
    euros, yuan = Money(100, "EUR"), Money(100, "CNY")
    with pytest.raises(CurrencyMismatch) as caught:
        _ = euros + yuan if operation == "add" else euros - yuan
    assert caught.value.code == "kernel.currency_mismatch"


def test_adding_a_plain_number_to_money_is_refused() -> None:
    with pytest.raises(InvalidValue):
        _ = Money(100, "EUR") + 5  # type: ignore[operator]


@pytest.mark.parametrize("minor", [1.0, 0.5, True, False, "100", Decimal("100"), None])
def test_minor_units_that_are_not_a_plain_integer_are_refused(minor: object) -> None:
    with pytest.raises(InvalidValue) as caught:
        Money(minor, "EUR")  # type: ignore[arg-type]
    assert caught.value.code == "kernel.invalid_value"


@pytest.mark.parametrize("value", [789_000.0, True, "789000"])
def test_a_unit_price_that_is_not_a_plain_integer_is_refused(value: object) -> None:
    with pytest.raises(InvalidValue):
        UnitPrice(value, "CNY")  # type: ignore[arg-type]


@pytest.mark.parametrize("currency", ["XXX", "eur", "", "EURO"])
def test_an_unknown_currency_is_refused_everywhere(currency: str) -> None:
    for build in (
        lambda: Money(1, currency),
        lambda: UnitPrice(1, currency),
        lambda: Money.from_decimal("1", currency),
        lambda: currency_exponent(currency),
    ):
        with pytest.raises(InvalidValue) as caught:
            build()
        assert caught.value.code == "kernel.unknown_currency"


@given(minor=minor_amounts, currency=currencies)
def test_money_survives_a_round_trip_through_decimal_and_its_string(
    minor: int, currency: str
) -> None:
    money = Money(minor, currency)
    assert Money.from_decimal(money.to_decimal(), currency) == money
    assert Money.from_decimal(f"{money.to_decimal():f}", currency) == money
    assert str(money) == f"{money.to_decimal():f} {currency}"


@pytest.mark.parametrize(
    ("minor", "currency", "decimal"),
    [
        (12345, "EUR", "123.45"),
        (-5, "CNY", "-0.05"),
        (500, "JPY", "500"),
        (1234, "KWD", "1.234"),
    ],
)
def test_money_converts_to_the_decimal_of_its_currency_exponent(
    minor: int, currency: str, decimal: str
) -> None:
    assert Money(minor, currency).to_decimal() == Decimal(decimal)
    assert Money.from_decimal(decimal, currency) == Money(minor, currency)


@pytest.mark.parametrize(
    ("value", "currency"),
    [("1.234", "EUR"), ("0.001", "CNY"), ("1.5", "JPY"), ("0.0001", "KWD")],
)
def test_a_decimal_with_more_places_than_the_currency_has_is_refused(
    value: str, currency: str
) -> None:
    with pytest.raises(InvalidValue):
        Money.from_decimal(value, currency)


def test_trailing_zeros_beyond_the_currency_exponent_are_not_extra_precision() -> None:
    assert Money.from_decimal("1.230", "EUR") == Money(123, "EUR")


# --- UnitPrice decimals --------------------------------------------------------------------


def test_a_three_decimal_euro_price_becomes_milli_cents_per_litre() -> None:
    assert UnitPrice.from_decimal("1.459", "EUR") == UnitPrice(145_900, "EUR")
    assert UnitPrice.from_decimal("1.459", "EUR").milli_minor_per_litre == 145_900
    assert UnitPrice.from_decimal(Decimal("7.89"), "CNY").milli_minor_per_litre == 789_000
    assert UnitPrice.from_decimal("150", "JPY").milli_minor_per_litre == 150_000


@pytest.mark.parametrize(("value", "currency"), [("1.459001", "EUR"), ("150.0001", "JPY")])
def test_a_unit_price_finer_than_milli_minor_units_is_refused(value: str, currency: str) -> None:
    with pytest.raises(InvalidValue):
        UnitPrice.from_decimal(value, currency)


@given(price=st.integers(min_value=0, max_value=10**12), currency=currencies)
def test_a_unit_price_survives_a_round_trip_through_decimal(price: int, currency: str) -> None:
    unit = UnitPrice(price, currency)
    assert UnitPrice.from_decimal(unit.to_decimal(), currency) == unit
    assert UnitPrice.from_decimal(f"{unit.to_decimal():f}", currency) == unit


# --- litres and millilitres ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("litres", "ml"),
    [("40.00", 40_000), ("0.001", 1), ("12.345", 12_345), ("1E+3", 1_000_000), ("0", 0)],
)
def test_litres_convert_to_exact_millilitres(litres: str, ml: int) -> None:
    assert litres_to_ml(litres) == ml
    assert litres_to_ml(Decimal(litres)) == ml


@given(ml=st.integers(min_value=0, max_value=10**12))
def test_millilitres_survive_a_round_trip_through_litres(ml: int) -> None:
    assert litres_to_ml(ml_to_litres(ml)) == ml
    assert litres_to_ml(f"{ml_to_litres(ml):f}") == ml


@given(ml=st.integers(min_value=0, max_value=10**9), tenths=st.integers(min_value=1, max_value=9))
def test_a_volume_finer_than_a_millilitre_is_refused(ml: int, tenths: int) -> None:
    # Given a volume a fraction of a millilitre above a whole number of millilitres
    litres = Decimal(ml).scaleb(-3) + Decimal(tenths).scaleb(-4)
    # When it is converted, then it is refused rather than rounded
    with pytest.raises(InvalidValue):
        litres_to_ml(litres)
