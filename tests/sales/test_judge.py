"""How HQ judges one sale against its station (``judge``, ``amount_agrees``, ``quarantines``),
with hand-built references: each test here kills a plausible bug the rest of the suite let
through (an amount check blind to under-reporting, a dispenser's resolution or rounding
ignored, a foreign currency not quarantined, quarantine only when every flag quarantines)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime
from uuid import uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forecourt.kernel.money import Rounding, UnitPrice
from forecourt.network.contracts import NozzleRef, StationReferences
from forecourt.sales.domain import (
    QUARANTINE_FLAGS,
    DispenseType,
    Flag,
    Sale,
    amount_agrees,
    quarantines,
)
from forecourt.sales.handlers import judge
from tests.sales.conftest import Hq, make_sale

# Fuelling point → (amount resolution in minor units, rounding), one dispenser each.
RULES = {
    1: (1, Rounding.HALF_UP),
    2: (10, Rounding.HALF_UP),
    3: (10, Rounding.DOWN),
    4: (1, Rounding.HALF_EVEN),
}
REFS = StationReferences(
    code="T001",
    region="TEST",
    timezone="Asia/Shanghai",
    currency="CNY",
    nozzles={(fp, 1): NozzleRef(grade="92", tank=1) for fp in RULES},
    amount_rules=RULES,
    grades=frozenset({"92"}),
)
PRICE = 755_000  # 7.55 CNY/L


def sale(**kw: object) -> Sale:
    base = Sale(
        sale_id=uuid4(),
        station_code="T001",
        station_seq=1,
        fuelling_point=1,
        nozzle=1,
        grade="92",
        volume_ml=40_000,
        unit_price_mmu=PRICE,
        amount_minor=30_200,
        currency="CNY",
        price_version=None,
        snapshot_version=1,
        totalizer_start_ml=0,
        totalizer_end_ml=40_000,
        device_txn=1,
        dispense_type=DispenseType.SALE,
        started_at=datetime(2026, 11, 25, 1, 0, tzinfo=UTC),
        ended_at=datetime(2026, 11, 25, 1, 2, tzinfo=UTC),
        business_date=date(2026, 11, 25),
        shift_id="2026-11-25/1",
        schema_version=1,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_the_dispensers_own_amount_is_accepted() -> None:
    assert judge(sale(), REFS) == []


@pytest.mark.parametrize("amount", [30_199, 30_100, 29_000, 0, 1])
def test_an_under_reported_amount_is_flagged(amount: int) -> None:
    """An amount below volume x price is how cash is skimmed: flagged like one above."""
    assert judge(sale(amount_minor=amount), REFS) == [Flag.AMOUNT_MISMATCH]
    assert not amount_agrees(
        sale(amount_minor=amount), resolution_minor=1, rounding=Rounding.HALF_UP
    )


@pytest.mark.parametrize("amount", [30_201, 30_215, 40_000])
def test_an_over_reported_amount_is_flagged(amount: int) -> None:
    assert judge(sale(amount_minor=amount), REFS) == [Flag.AMOUNT_MISMATCH]


# 40.010 L x 7.55 = 302.0755 CNY: 302.08 to the fen, 302.10 to the jiao half up, 302.00 down.
ODD_VOLUME = 40_010


def test_a_ten_fen_dispenser_rounding_correctly_is_accepted() -> None:
    assert judge(sale(fuelling_point=2, volume_ml=ODD_VOLUME, amount_minor=30_210), REFS) == []


@pytest.mark.parametrize(
    "amount",
    [
        30_208,  # what a one-fen dispenser would charge: not this one
        30_211,  # one fen off: a ten-fen dispenser cannot show it
        30_209,
        30_200,  # rounded down: this dispenser rounds half up
        30_220,
    ],
)
def test_a_ten_fen_dispenser_amount_off_by_any_fen_is_flagged(amount: int) -> None:
    flags = judge(sale(fuelling_point=2, volume_ml=ODD_VOLUME, amount_minor=amount), REFS)
    assert flags == [Flag.AMOUNT_MISMATCH]


def test_a_dispenser_rounding_down_is_judged_by_its_own_rounding() -> None:
    down = sale(fuelling_point=3, volume_ml=ODD_VOLUME, amount_minor=30_200)
    assert judge(down, REFS) == []
    assert judge(dataclasses.replace(down, amount_minor=30_210), REFS) == [Flag.AMOUNT_MISMATCH]
    # The same amounts on the half-up ten-fen dispenser: the other way round.
    assert judge(dataclasses.replace(down, fuelling_point=2), REFS) == [Flag.AMOUNT_MISMATCH]


def test_half_up_and_half_even_dispensers_part_at_a_tie() -> None:
    # 0.300 L x 7.55 = 2.265 CNY: a tie at the fen; half up 2.27, half even 2.26.
    half_up = sale(fuelling_point=1, volume_ml=300, amount_minor=227)
    half_even = sale(fuelling_point=4, volume_ml=300, amount_minor=226)
    assert judge(half_up, REFS) == []
    assert judge(half_even, REFS) == []
    assert judge(dataclasses.replace(half_up, amount_minor=226), REFS) == [Flag.AMOUNT_MISMATCH]
    assert judge(dataclasses.replace(half_even, amount_minor=227), REFS) == [Flag.AMOUNT_MISMATCH]


@given(
    st.integers(0, 2_000_000),
    st.integers(0, 30_000_000),
    st.sampled_from([1, 5, 10, 50, 100]),
    st.sampled_from(list(Rounding)),
    st.integers(-25, 25).filter(bool),
)
def test_exactly_the_dispensers_amount_agrees(
    volume_ml: int, price: int, resolution: int, rounding: Rounding, off: int
) -> None:
    charged = UnitPrice(price, "CNY").amount_for(
        volume_ml, resolution_minor=resolution, rounding=rounding
    )
    right = sale(volume_ml=volume_ml, unit_price_mmu=price, amount_minor=charged.minor)
    assert amount_agrees(right, resolution_minor=resolution, rounding=rounding)
    wrong = dataclasses.replace(right, amount_minor=charged.minor + off)
    assert not amount_agrees(wrong, resolution_minor=resolution, rounding=rounding)


def test_a_foreign_currency_sale_is_flagged_and_quarantined() -> None:
    flags = judge(sale(currency="EUR"), REFS)
    assert flags == [Flag.CURRENCY_MISMATCH]
    assert quarantines(flags)


def test_a_quarantine_flag_quarantines_whatever_flags_come_with_it() -> None:
    flags = judge(sale(nozzle=9, amount_minor=30_000), REFS)
    assert flags == [Flag.UNKNOWN_NOZZLE, Flag.AMOUNT_MISMATCH]
    assert quarantines(flags)
    for flag in QUARANTINE_FLAGS:
        assert quarantines([Flag.ZERO_VOLUME, flag, Flag.SEQUENCE_JUMP])
        assert quarantines([flag])
    assert not quarantines([Flag.ZERO_VOLUME, Flag.AMOUNT_MISMATCH, Flag.SEQUENCE_JUMP])
    assert not quarantines([])


def test_the_value_flags_come_with_the_reference_flags() -> None:
    odd = sale(
        nozzle=9,
        volume_ml=0,
        amount_minor=-5,
        totalizer_start_ml=10,
        totalizer_end_ml=5,
        started_at=datetime(2026, 11, 25, 2, 0, tzinfo=UTC),
        business_date=date(1996, 11, 25),
        currency="EUR",
    )
    assert judge(odd, REFS) == [
        Flag.UNKNOWN_NOZZLE,
        Flag.ZERO_VOLUME,
        Flag.NEGATIVE_AMOUNT,
        Flag.TOTALIZER_REVERSED,
        Flag.ENDED_BEFORE_STARTED,
        Flag.BUSINESS_DATE_FAR,
        Flag.CURRENCY_MISMATCH,
    ]


# --- the same through ingest, on both databases -------------------------------------------


async def test_a_foreign_currency_sale_is_quarantined_through_ingest(hq: Hq) -> None:
    response = await hq.upload("S001", [make_sale(currency="EUR"), make_sale()])
    results = response.json()["results"]
    assert [(r["status"], r["flags"]) for r in results] == [
        ("quarantined", ["currency_mismatch"]),
        ("created", []),
    ]


async def test_a_quarantine_flag_with_another_flag_quarantines_through_ingest(hq: Hq) -> None:
    response = await hq.upload(
        "S001", [make_sale(nozzle=9, amount_minor=30_000), make_sale(amount_minor=30_000)]
    )
    results = response.json()["results"]
    assert [(r["status"], r["flags"]) for r in results] == [
        ("quarantined", ["unknown_nozzle", "amount_mismatch"]),
        ("created", ["amount_mismatch"]),
    ]


async def test_an_under_reported_amount_is_flagged_through_ingest(hq: Hq) -> None:
    response = await hq.upload("S001", [make_sale(amount_minor=30_100)])
    (result,) = response.json()["results"]
    assert (result["status"], result["flags"]) == ("created", ["amount_mismatch"])
