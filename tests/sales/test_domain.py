"""Pure sales domain: the sequence book and amount checks (property-based)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime
from uuid import UUID, uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forecourt.kernel.money import Rounding
from forecourt.sales.domain import (
    SEQUENCE_JUMP,
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


def test_a_far_sequence_number_costs_one_range_not_memory() -> None:
    far = SEQUENCE_JUMP  # the farthest that is not a jump from an empty book
    book = SequenceBook().receive([1, far])
    assert book.gaps == ((2, far - 1),)


def test_a_wild_sequence_number_is_kept_aside_not_a_range_of_missing_sales() -> None:
    book = SequenceBook().receive([1, 10**15])
    assert (book.high_water, book.gaps, book.jumps) == (1, (), (10**15,))


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
CHANGED_V2: dict[str, object] = {
    "totalizer_start_ml": None,
    "totalizer_end_ml": None,
    "device_id": "pts-2",
    "device_epoch": 4,
    "device_flags": ("totalizer_gap",),
    "device_raw": (("volume_ml", "40.0005"),),
}
V2 = {"device_id": "pts-1", "device_epoch": 3, "device_flags": (), "device_raw": None}


def test_every_field_of_a_sale_takes_part_in_its_payload_hash() -> None:
    assert set(CHANGED) | set(CHANGED_V2) == {f.name for f in dataclasses.fields(Sale)}
    sale = _sale(schema_version=2, **V2)
    for name, value in {**CHANGED, **CHANGED_V2}.items():
        if name == "schema_version":
            value = 3
        changed = dataclasses.replace(sale, **{name: value})
        assert sale.payload_hash() != changed.payload_hash(), name
    assert sale.payload_hash() == dataclasses.replace(sale).payload_hash()
    v1 = _sale()
    for name, value in CHANGED.items():
        changed = dataclasses.replace(v1, **{name: value})
        assert v1.payload_hash() != changed.payload_hash(), name


def test_the_digest_of_a_v1_sale_is_the_one_stored_before_v2_existed() -> None:
    # Every stored v1 sale keeps this digest: a change here would turn re-uploads into
    # conflicts. The value was computed by the v1-only code.
    sale = Sale(
        sale_id=UUID("0193a5b2-7c4e-7000-8000-000000000001"),
        station_code="S001",
        station_seq=17,
        fuelling_point=3,
        nozzle=1,
        grade="92",
        volume_ml=40120,
        unit_price_mmu=755000,
        amount_minor=30291,
        currency="CNY",
        price_version="p-92",
        snapshot_version=4,
        totalizer_start_ml=1200000,
        totalizer_end_ml=1240120,
        device_txn=812,
        dispense_type=DispenseType.SALE,
        started_at=datetime(2026, 11, 25, 1, 12, 3, tzinfo=UTC),
        ended_at=datetime(2026, 11, 25, 1, 13, 20, tzinfo=UTC),
        business_date=date(2026, 11, 25),
        shift_id="2026-11-25/2",
        schema_version=1,
    )
    assert sale.payload_hash() == (
        "48644eee44d56248e9c857e001c8d71d48760a0e1d32f02df9c6260a6bece3c2"
    )
    bare = dataclasses.replace(sale, started_at=None, price_version=None, device_txn=None)
    assert bare.payload_hash() == (
        "4b6ec2f5be5be099651abc75a4930dc95cb43f90cf7a96eb3beeff2736ff0ee7"
    )


def test_the_natural_key_of_v2_names_the_device_and_epoch_and_survives_a_missing_totalizer() -> (
    None
):
    v1 = _sale(device_txn=812)
    v2 = _sale(device_txn=812, schema_version=2, **V2)
    assert v1.natural_key == (None, None, 1, 1, 812, 40000)
    assert v2.natural_key == ("pts-1", 3, 1, 1, 812, 40000)
    assert dataclasses.replace(v2, device_epoch=4).natural_key != v2.natural_key
    assert dataclasses.replace(v2, totalizer_end_ml=None).natural_key == (
        "pts-1",
        3,
        1,
        1,
        812,
        None,
    )
    assert dataclasses.replace(v2, device_txn=None).natural_key is None


def test_the_same_instant_in_another_offset_hashes_the_same() -> None:
    from zoneinfo import ZoneInfo

    sale = _sale()
    shifted = dataclasses.replace(
        sale, ended_at=sale.ended_at.astimezone(ZoneInfo("Asia/Shanghai"))
    )
    assert sale.payload_hash() == shifted.payload_hash()
