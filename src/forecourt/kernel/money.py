"""Money and unit prices as exact integers.

``Money`` is integer minor units (fen, cents) with an ISO-4217 currency. ``UnitPrice`` is a
separate type in *milli*-minor units per litre, because many countries price fuel to three
decimals (e.g. 1.459 EUR/L = 145 900 milli-cents/L). Volumes are integer millilitres.
Floats never enter: wire decimals are parsed with :class:`decimal.Decimal`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from decimal import Decimal

from forecourt.kernel.errors import CurrencyMismatch, InvalidValue

# ISO-4217 minor-unit exponents for the currencies we price in; extend as chains need.
CURRENCY_EXPONENTS: dict[str, int] = {
    "CNY": 2,
    "HKD": 2,
    "EUR": 2,
    "USD": 2,
    "GBP": 2,
    "CHF": 2,
    "JPY": 0,
    "KRW": 0,
    "KWD": 3,
    "BHD": 3,
    "SGD": 2,
    "AUD": 2,
    "CAD": 2,
}

MILLI = 1000  # milli-minor units per minor unit
ML_PER_LITRE = 1000


def currency_exponent(currency: str) -> int:
    try:
        return CURRENCY_EXPONENTS[currency]
    except KeyError:
        raise InvalidValue(
            f"unknown currency {currency!r}", code="kernel.unknown_currency"
        ) from None


def _decimal(value: Decimal | str) -> Decimal:
    """A finite decimal from text or Decimal, or a clear error (never a float)."""
    if isinstance(value, float):
        raise InvalidValue("floats are not accepted for money or volumes; pass a string")
    try:
        result = Decimal(value)
    except (ArithmeticError, ValueError, TypeError):
        raise InvalidValue(f"{value!r} is not a decimal number") from None
    if not result.is_finite():
        raise InvalidValue(f"{value!r} is not a finite number")
    return result


def _require_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValue(f"{name} must be an integer, got {type(value).__name__}")
    return value


class Rounding(enum.StrEnum):
    """How a dispenser rounds volume × price to its amount resolution."""

    HALF_UP = "half_up"
    HALF_EVEN = "half_even"
    DOWN = "down"  # truncate toward zero
    UP = "up"  # away from zero


def divide_rounded(numerator: int, denominator: int, rounding: Rounding) -> int:
    """``numerator / denominator`` rounded to an integer, for non-negative numerators."""
    if denominator <= 0:
        raise InvalidValue("denominator must be positive")
    if numerator < 0:
        return -divide_rounded(-numerator, denominator, rounding)
    q, r = divmod(numerator, denominator)
    if r == 0 or rounding is Rounding.DOWN:
        return q
    if rounding is Rounding.UP:
        return q + 1
    twice = 2 * r
    if twice > denominator:
        return q + 1
    if twice < denominator:
        return q
    if rounding is Rounding.HALF_UP:
        return q + 1
    return q + (q % 2)  # HALF_EVEN


def charge_minor(
    volume_ml: int, milli_minor_per_litre: int, resolution_minor: int, rounding: Rounding
) -> int:
    """Volume × unit price in minor units, rounded to the dispenser's resolution: the rule of
    :meth:`UnitPrice.amount_for` on plain integers, for hot paths that have checked their
    inputs already (positive resolution, integers, a known currency)."""
    exact_numerator = volume_ml * milli_minor_per_litre  # milli-minor × ml
    steps = divide_rounded(exact_numerator, ML_PER_LITRE * MILLI * resolution_minor, rounding)
    return steps * resolution_minor


@dataclass(frozen=True, slots=True, order=True)
class Money:
    minor: int
    currency: str

    def __post_init__(self) -> None:
        _require_int("Money.minor", self.minor)
        currency_exponent(self.currency)

    @classmethod
    def zero(cls, currency: str) -> Money:
        return cls(0, currency)

    def _same(self, other: Money) -> None:
        if not isinstance(other, Money):
            raise InvalidValue(f"cannot combine Money with {type(other).__name__}")
        if other.currency != self.currency:
            raise CurrencyMismatch(f"{self.currency} vs {other.currency}")

    def __add__(self, other: Money) -> Money:
        self._same(other)
        return Money(self.minor + other.minor, self.currency)

    def __sub__(self, other: Money) -> Money:
        self._same(other)
        return Money(self.minor - other.minor, self.currency)

    def __neg__(self) -> Money:
        return Money(-self.minor, self.currency)

    def to_decimal(self) -> Decimal:
        return Decimal(self.minor).scaleb(-currency_exponent(self.currency))

    @classmethod
    def from_decimal(cls, value: Decimal | str, currency: str) -> Money:
        """Exact conversion; a value with more decimals than the currency has is an error."""
        scaled = _decimal(value).scaleb(currency_exponent(currency))
        if scaled != scaled.to_integral_value():
            raise InvalidValue(f"{value} has more decimals than {currency} allows")
        return cls(int(scaled), currency)

    def __str__(self) -> str:
        return f"{self.to_decimal():f} {self.currency}"


@dataclass(frozen=True, slots=True, order=True)
class UnitPrice:
    """A price per litre in milli-minor units (789 000 = 7.89 CNY/L; 145 900 = 1.459 EUR/L)."""

    milli_minor_per_litre: int
    currency: str

    def __post_init__(self) -> None:
        _require_int("UnitPrice.milli_minor_per_litre", self.milli_minor_per_litre)
        if self.milli_minor_per_litre < 0:
            raise InvalidValue("a unit price cannot be negative")
        currency_exponent(self.currency)

    def to_decimal(self) -> Decimal:
        """Price per litre in major units (e.g. Decimal('7.890'))."""
        return Decimal(self.milli_minor_per_litre).scaleb(-(currency_exponent(self.currency) + 3))

    @classmethod
    def from_decimal(cls, value: Decimal | str, currency: str) -> UnitPrice:
        scaled = _decimal(value).scaleb(currency_exponent(currency) + 3)
        if scaled != scaled.to_integral_value():
            raise InvalidValue(f"{value} has more decimals than a milli-minor price allows")
        return cls(int(scaled), currency)

    def amount_for(
        self, volume_ml: int, *, resolution_minor: int = 1, rounding: Rounding = Rounding.HALF_UP
    ) -> Money:
        """What a dispenser charges for ``volume_ml``: volume × price rounded to its resolution.

        ``resolution_minor`` is the dispenser's smallest amount step in minor units (1 fen,
        10 fen = 1 jiao, 5 cents …).
        """
        _require_int("volume_ml", volume_ml)
        _require_int("resolution_minor", resolution_minor)
        if resolution_minor <= 0:
            raise InvalidValue("resolution_minor must be positive")
        return Money(
            charge_minor(volume_ml, self.milli_minor_per_litre, resolution_minor, rounding),
            self.currency,
        )

    def __str__(self) -> str:
        return f"{self.to_decimal():f} {self.currency}/L"


def litres_to_ml(litres: Decimal | str) -> int:
    """Exact litres (as a decimal string/Decimal) to integer millilitres."""
    scaled = _decimal(litres) * ML_PER_LITRE
    if scaled != scaled.to_integral_value():
        raise InvalidValue(f"{litres} L is finer than a millilitre")
    return int(scaled)


def ml_to_litres(volume_ml: int) -> Decimal:
    return Decimal(volume_ml).scaleb(-3)
