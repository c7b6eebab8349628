"""Pure sales domain: the sequence book and amount checks (property-based)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime
from uuid import uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forecourt.kernel.money import Rounding
from forecourt.sales.domain import (
    DispenseType,
    Sale,
    SalesError,
    SequenceBook,
    amount_agrees,
)


def _reference_gaps(received: set[int]) -> tuple[tuple[int, int], ...]:
    top = max(received, default=0)
    missing = [n for n in range(1, top + 1) if n not in received]
    out: list[tuple[int, int]] = []
    for n in missing:
        if out and out[-1][1] == n - 1:
            out[-1] = (out[-1][0], n)
        else:
            out.append((n, n))
    return tuple(out)


@given(st.lists(st.lists(st.integers(1, 300), max_size=40), max_size=12))
def test_the_sequence_book_matches_a_reference_whatever_the_batch_order(
    batches: list[list[int]],
) -> None:
    book = SequenceBook()
    seen: set[int] = set()
    for batch in batches:
        book = book.receive(batch)
        seen.update(batch)
        assert book.high_water == max(seen, default=0)
        assert book.gaps == _reference_gaps(seen)
        assert book.missing_count() == book.high_water - len(seen)


@given(st.permutations(list(range(1, 60))), st.integers(1, 10))
def test_every_sequence_received_in_any_order_closes_every_gap(order: list[int], size: int) -> None:
    book = SequenceBook()
    for i in range(0, len(order), size):
        book = book.receive(order[i : i + size])
    assert book == SequenceBook(high_water=59, gaps=())


def test_a_wild_sequence_number_costs_one_range_not_memory() -> None:
    book = SequenceBook().receive([1, 10**15])
    assert book.gaps == ((2, 10**15 - 1),)


def test_sequence_numbers_start_at_one() -> None:
    with pytest.raises(SalesError):
        SequenceBook().receive([0])


def _sale(**kw: object) -> Sale:
    base = Sale(
        sale_id=uuid4(),
        station_code="S001",
        station_seq=1,
        fuelling_point=1,
        nozzle=1,
        grade="92",
        volume_ml=40000,
        unit_price_mmu=755000,
        amount_minor=30200,
        currency="CNY",
        price_version=None,
        snapshot_version=1,
        totalizer_start_ml=0,
        totalizer_end_ml=40000,
        device_txn=1,
        dispense_type=DispenseType.SALE,
        started_at=None,
        ended_at=datetime(2026, 11, 25, tzinfo=UTC),
        business_date=date(2026, 11, 25),
        shift_id="2026-11-25/1",
        schema_version=1,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


@given(st.integers(0, 500_000), st.integers(100_000, 12_000_000), st.sampled_from(list(Rounding)))
def test_the_dispenser_amount_always_agrees_and_two_steps_off_never_does(
    volume_ml: int, price: int, rounding: Rounding
) -> None:
    from forecourt.kernel.money import UnitPrice

    exact = UnitPrice(price, "CNY").amount_for(volume_ml, resolution_minor=10, rounding=rounding)
    sale = _sale(volume_ml=volume_ml, unit_price_mmu=price, amount_minor=exact.minor)
    assert amount_agrees(sale, resolution_minor=10, rounding=rounding)
    off = dataclasses.replace(sale, amount_minor=exact.minor + 11)
    assert not amount_agrees(off, resolution_minor=10, rounding=rounding)


CHANGED: dict[str, object] = {
    "sale_id": uuid4(),
    "station_code": "S002",
    "station_seq": 2,
    "fuelling_point": 2,
    "nozzle": 2,
    "grade": "95",
    "volume_ml": 40001,
    "unit_price_mmu": 755001,
    "amount_minor": 30201,
    "currency": "EUR",
    "price_version": "p2",
    "snapshot_version": 2,
    "totalizer_start_ml": 1,
    "totalizer_end_ml": 40001,
    "device_txn": None,
    "dispense_type": DispenseType.PUMP_TEST,
    "started_at": datetime(2026, 11, 24, 23, 58, tzinfo=UTC),
    "ended_at": datetime(2026, 11, 25, 0, 1, tzinfo=UTC),
    "business_date": date(2026, 11, 24),
    "shift_id": "2026-11-25/2",
    "schema_version": 2,
}


def test_every_field_of_a_sale_takes_part_in_its_payload_hash() -> None:
    assert set(CHANGED) == {f.name for f in dataclasses.fields(Sale)}
    sale = _sale()
    for name, value in CHANGED.items():
        changed = dataclasses.replace(sale, **{name: value})
        assert sale.payload_hash() != changed.payload_hash(), name
    assert sale.payload_hash() == dataclasses.replace(sale).payload_hash()


def test_the_same_instant_in_another_offset_hashes_the_same() -> None:
    from zoneinfo import ZoneInfo

    sale = _sale()
    shifted = dataclasses.replace(
        sale, ended_at=sale.ended_at.astimezone(ZoneInfo("Asia/Shanghai"))
    )
    assert sale.payload_hash() == shifted.payload_hash()
