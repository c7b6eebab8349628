"""Absurd but real sales, on SQLite and PostgreSQL: stored, flagged and alerted, never dropped
(the dispenser is the legal meter); what cannot be stored is refused item by item, never a
500; and the sequence book stays truthful whatever numbers arrive (properties)."""

from __future__ import annotations

import bisect
import json
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from forecourt.infra.db import outbox_table
from forecourt.sales.domain import MAX_GAPS, MAX_JUMPS, SEQUENCE_JUMP, SequenceBook
from forecourt.sales.store import alert_t, sale_t
from tests.sales.conftest import Hq, make_sale, make_sale_v2

NEAR_2_53 = 2**53 - 1


async def count(hq: Hq, table: sa.Table, *where: sa.ColumnElement[bool]) -> int:
    async with hq.office.db.connection() as conn:
        return int(
            await conn.scalar(sa.select(sa.func.count()).select_from(table).where(*where)) or 0
        )


async def alerts(hq: Hq, kind: str) -> list[dict[str, Any]]:
    async with hq.office.db.connection() as conn:
        rows = await conn.execute(
            sa.select(alert_t).where(alert_t.c.kind == kind).order_by(alert_t.c.id)
        )
        return [{"sale_id": str(r.sale_id), **json.loads(r.details)} for r in rows]


async def event_of(hq: Hq, sale: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The completed or quarantined event of a sale: its type and data."""
    async with hq.office.db.connection() as conn:
        row = (
            await conn.execute(
                sa.select(outbox_table.c.type, outbox_table.c.data).where(
                    outbox_table.c.subject == f"S001/{sale['sale_id']}",
                    outbox_table.c.type.like("%sale.completed%")
                    | outbox_table.c.type.like("%sale.quarantined%"),
                )
            )
        ).one()
    return row.type.split(".")[-2], json.loads(row.data)


async def sequence(hq: Hq, station: str = "S001") -> dict[str, Any]:
    return (await hq.client.get(f"/v1/stations/{station}/sequence")).json()  # type: ignore[no-any-return]


def single(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    return result  # type: ignore[no-any-return]


# --- absurd values: stored, flagged, alerted ----------------------------------------------

ABSURD: dict[str, tuple[dict[str, Any], str, str]] = {
    # name: (overrides of make_sale, flag, status)
    "zero volume": (
        {"volume_ml": 0, "amount_minor": 0, "totalizer_start_ml": 5, "totalizer_end_ml": 5},
        "zero_volume",
        "created",
    ),
    "totalizer end below start": (
        {"totalizer_start_ml": 2_000_000, "totalizer_end_ml": 1_960_000},
        "totalizer_reversed",
        "quarantined",
    ),
    "ended before started": (
        {"started_at": "2026-11-25T01:05:00+00:00", "ended_at": "2026-11-25T01:02:00+00:00"},
        "ended_before_started",
        "created",
    ),
    "business date decades away": (
        {"business_date": "2056-11-25"},
        "business_date_far",
        "quarantined",
    ),
}


@pytest.mark.parametrize("case", sorted(ABSURD))
async def test_an_absurd_sale_is_stored_flagged_alerted_and_announced(hq: Hq, case: str) -> None:
    overrides, flag, status = ABSURD[case]
    sale = make_sale(**overrides)
    result = single(await hq.upload("S001", [sale]))
    assert (result["status"], result["flags"]) == (status, [flag])
    assert await count(hq, sale_t) == 1
    (alert,) = await alerts(hq, flag)
    assert alert["sale_id"] == sale["sale_id"]
    assert len(await alerts(hq, "quarantined")) == (status == "quarantined")
    kind, data = await event_of(hq, sale)
    assert kind == {"created": "completed", "quarantined": "quarantined"}[status]
    assert data["flags"] == [flag]


@pytest.mark.parametrize("dispense_type", ["sale", "pump_test", "own_use", "drive_off"])
async def test_a_negative_amount_quarantines_whatever_the_dispense_type(
    hq: Hq, dispense_type: str
) -> None:
    sale = make_sale(amount_minor=-30200, dispense_type=dispense_type)
    result = single(await hq.upload("S001", [sale]))
    assert result["status"] == "quarantined"
    assert result["flags"] == ["negative_amount", "amount_mismatch"]
    (alert,) = await alerts(hq, "negative_amount")
    assert (alert["amount_minor"], alert["dispense_type"]) == (-30200, dispense_type)
    assert len(await alerts(hq, "quarantined")) == 1
    kind, data = await event_of(hq, sale)
    assert (kind, data["flags"]) == ("quarantined", ["negative_amount", "amount_mismatch"])


async def test_a_business_date_a_day_off_is_a_cutoff_not_a_flag(hq: Hq) -> None:
    late = make_sale(business_date="2026-11-24")
    early = make_sale(business_date="2026-11-26")
    response = await hq.upload("S001", [late, early])
    assert [r["flags"] for r in response.json()["results"]] == [[], []]


# --- station_seq: two claimants, and jumps --------------------------------------------------


async def test_two_sales_claiming_one_station_seq_are_both_stored_the_later_flagged(
    hq: Hq,
) -> None:
    first = make_sale()
    twin = make_sale(station_seq=first["station_seq"])
    response = await hq.upload("S001", [first, twin])
    assert [(r["status"], r["flags"]) for r in response.json()["results"]] == [
        ("created", []),
        ("created", ["duplicate_station_seq"]),
    ]
    late = make_sale(station_seq=first["station_seq"])  # against the stored ones
    again = await hq.upload("S001", [late, first])  # the first itself: a duplicate, no flag
    assert [(r["status"], r["flags"]) for r in again.json()["results"]] == [
        ("created", ["duplicate_station_seq"]),
        ("duplicate", []),
    ]
    assert await count(hq, sale_t) == 3
    found = await alerts(hq, "duplicate_station_seq")
    assert [a["sale_id"] for a in found] == [twin["sale_id"], late["sale_id"]]
    assert {a["other_sale_id"] for a in found} == {first["sale_id"]}
    assert all(a["station_seq"] == first["station_seq"] for a in found)
    kind, data = await event_of(hq, late)
    assert (kind, data["flags"]) == ("completed", ["duplicate_station_seq"])
    assert (await sequence(hq))["missing"] == first["station_seq"] - 1


async def test_a_station_seq_near_2_53_is_stored_and_alerted_but_moves_no_mark(hq: Hq) -> None:
    normal = make_sale(station_seq=1)
    wild = make_sale(station_seq=NEAR_2_53)
    response = await hq.upload("S001", [normal, wild])
    results = response.json()["results"]
    assert [(r["status"], r["flags"]) for r in results] == [
        ("created", []),
        ("created", ["sequence_jump"]),
    ]
    assert (response.json()["high_water_mark"], response.json()["gaps"]) == (1, [])
    assert await sequence(hq) == {
        "station": "S001",
        "high_water_mark": 1,
        "gaps": [],
        "missing": 0,
    }
    (alert,) = await alerts(hq, "sequence_jump")
    assert (alert["sale_id"], alert["station_seq"]) == (wild["sale_id"], NEAR_2_53)
    assert alert["high_water_mark"] == 0  # the mark it was judged against (the batch's start)
    assert await count(hq, sale_t) == 2
    kind, data = await event_of(hq, wild)
    assert (kind, data["flags"]) == ("completed", ["sequence_jump"])
    # The numbering goes on as before; the wild number claimed again is a duplicate claim.
    after = [make_sale(station_seq=2), make_sale(station_seq=NEAR_2_53)]
    response = await hq.upload("S001", after)
    assert [r["flags"] for r in response.json()["results"]] == [
        [],
        ["duplicate_station_seq", "sequence_jump"],
    ]
    assert (await sequence(hq))["high_water_mark"] == 2


async def test_a_far_sequence_number_within_the_jump_limit_still_opens_a_gap(hq: Hq) -> None:
    far = make_sale(station_seq=SEQUENCE_JUMP)
    assert single(await hq.upload("S001", [far]))["flags"] == []
    assert (await sequence(hq))["gaps"] == [[1, SEQUENCE_JUMP - 1]]


async def test_the_gap_list_stays_bounded_and_says_what_it_gave_up(hq: Hq) -> None:
    # Every other number: one gap per sale, more than the book keeps.
    n = MAX_GAPS + 2
    sales = [make_sale(station_seq=2 * i) for i in range(1, n + 1)]
    response = await hq.upload("S001", sales)
    assert response.status_code == 200, response.text
    assert {r["status"] for r in response.json()["results"]} == {"created"}
    book = await sequence(hq)
    assert len(book["gaps"]) == MAX_GAPS
    assert book["gaps"][0] == [2 * (n - MAX_GAPS) + 1] * 2  # the lowest were given up
    assert book["high_water_mark"] == 2 * n
    (alert,) = await alerts(hq, "sequence_gaps_dropped")
    assert (alert["ranges"], alert["missing"], alert["first"]) == (2, 2, [1, 1])


# --- what cannot be stored: refused item by item, with a clear message ---------------------


UNSTORABLE: list[tuple[dict[str, Any], str, str]] = [  # (overrides, error loc, words)
    ({"ended_at": "0001-01-01T00:00:00+05:00"}, "ended_at", "2000 to 2100"),  # was a 500
    ({"ended_at": "9999-12-31T23:00:00-05:00"}, "ended_at", "2000 to 2100"),  # was a 500
    ({"ended_at": "1999-12-31T23:59:59+00:00"}, "ended_at", "2000 to 2100"),
    ({"started_at": "0001-01-01T00:00:00+05:00"}, "started_at", "2000 to 2100"),
    ({"ended_at": "2026-11-25T01:02:00+20:00"}, "ended_at", "offset"),
    ({"business_date": "0001-01-01"}, "business_date", "2000 to 2100"),
    ({"business_date": "9999-12-31"}, "business_date", "2000 to 2100"),
    ({"station_seq": 2**53}, "station_seq", "less than"),
    ({"station_seq": 0}, "station_seq", "greater than"),
    ({"volume_ml": 10**9 + 1}, "volume_ml", "less than"),
    ({"unit_price_mmu": 10**12 + 1}, "unit_price_mmu", "less than"),
    ({"amount_minor": 10**15 + 1}, "amount_minor", "less than"),
    ({"amount_minor": -(10**15) - 1}, "amount_minor", "greater than"),
    ({"totalizer_end_ml": 2**63}, "totalizer_end_ml", "less than"),
    ({"device_txn": 2**64}, "device_txn", "less than"),
    ({"device_epoch": 2**63}, "device_epoch", "less than"),
    ({"snapshot_version": 2**63}, "snapshot_version", "less than"),
]


async def test_a_value_hq_cannot_store_refuses_that_item_only(hq: Hq) -> None:
    bad = [make_sale_v2(**overrides) for overrides, _, _ in UNSTORABLE]
    good = make_sale_v2()
    response = await hq.upload("S001", [*bad, good], schema_version=2)
    assert response.status_code == 200, response.text
    *refused, created = response.json()["results"]
    assert created["status"] == "created"
    for (overrides, loc, words), result in zip(UNSTORABLE, refused, strict=True):
        assert result["status"] == "refused", overrides
        (error,) = result["errors"]
        assert error["loc"] == [loc], overrides
        assert words in error["msg"], (overrides, error)
    assert await count(hq, sale_t) == 1
    assert len(await alerts(hq, "refused")) == len(UNSTORABLE)


CONTROL = ["\x00", "\x01", "\t", "\n", "\r", "\x1b", "\x1f"]
TEXT_FIELDS = ["grade", "shift_id", "price_version", "device_id"]


async def test_a_control_character_in_a_text_field_refuses_that_item_only(hq: Hq) -> None:
    cases = [(field, char) for field in TEXT_FIELDS for char in CONTROL]
    bad = [make_sale_v2(**{field: f"9{char}2"}) for field, char in cases]
    response = await hq.upload("S001", [*bad, make_sale_v2()], schema_version=2)
    assert response.status_code == 200, response.text
    *refused, created = response.json()["results"]
    assert created["status"] == "created"
    for (field, char), result in zip(cases, refused, strict=True):
        assert result["status"] == "refused", (field, char)
        (error,) = result["errors"]
        assert error["loc"] == [field]
        assert "control characters" in error["msg"]
    assert await count(hq, sale_t) == 1


async def test_a_control_character_in_device_raw_refuses_that_item_only(hq: Hq) -> None:
    in_value = make_sale_v2(device_raw={"volume_ml": "40.0\n"})
    in_key = make_sale_v2(device_raw={"vol\x00ume": "40.0"})
    response = await hq.upload("S001", [in_value, in_key, make_sale_v2()], schema_version=2)
    assert [r["status"] for r in response.json()["results"]] == ["refused", "refused", "created"]
    assert await count(hq, sale_t) == 1


async def test_a_nul_anywhere_in_an_item_refuses_that_item_only_never_a_500(hq: Hq) -> None:
    # PostgreSQL text cannot hold U+0000: a NUL in a value, in a field's name, or in a
    # value HQ keeps aside (the refusal's alert) once made the whole batch a 500.
    items = [
        make_sale_v2(grade="\x00"),
        make_sale_v2(shift_id="2026-11-25/1\x00"),
        {**make_sale_v2(), "gr\x00ade": "92"},
        make_sale_v2(device_raw={"\x00": "\x00"}),
        {**make_sale_v2(), "sale_id": "\x00"},
    ]
    response = await hq.upload("S001", [*items, make_sale_v2()], schema_version=2)
    assert response.status_code == 200, response.text
    statuses = [r["status"] for r in response.json()["results"]]
    assert statuses == ["refused"] * len(items) + ["created"]
    assert await count(hq, sale_t) == 1
    assert len(await alerts(hq, "refused")) == len(items)


async def test_started_after_ended_is_no_refusal_and_ordinary_offsets_are_taken(hq: Hq) -> None:
    sales = [
        make_sale(started_at="2026-11-25T09:10:00+08:00", ended_at="2026-11-25T09:02:00+08:00"),
        make_sale(ended_at="2026-11-25T01:02:00-11:30", business_date="2026-11-25"),
        make_sale(ended_at="2100-12-31T23:59:59+00:00", business_date="2100-12-31"),
    ]
    response = await hq.upload("S001", sales)
    results = response.json()["results"]
    assert [r["status"] for r in results] == ["created"] * 3
    assert results[0]["flags"] == ["ended_before_started"]


# --- the sequence book, property by property ----------------------------------------------

# Ordinary numbers, numbers around the jump limit, and wild ones up to 2⁵³ - 1.
seqs = st.one_of(
    st.integers(1, 400),
    st.integers(SEQUENCE_JUMP - 50, SEQUENCE_JUMP + 450),
    st.integers(2 * SEQUENCE_JUMP, 2 * SEQUENCE_JUMP + 300),
    st.integers(10**12, NEAR_2_53),
)


def _missing(received: list[int], high: int) -> tuple[tuple[int, int], ...]:
    """The ranges of 1..high not in ``received`` (sorted, distinct, all <= high)."""
    out: list[tuple[int, int]] = []
    previous = 0
    for n in [*received, high + 1]:
        if n > previous + 1:
            out.append((previous + 1, n - 1))
        previous = n
    return tuple(out)


def _inside(gaps: tuple[tuple[int, int], ...], n: int) -> bool:
    i = bisect.bisect_right(gaps, (n, NEAR_2_53 + 1)) - 1  # the last gap starting at n or before
    return i >= 0 and gaps[i][0] <= n <= gaps[i][1]


@given(st.lists(st.lists(seqs, max_size=20), max_size=12))  # fewer jumps than MAX_JUMPS
def test_the_sequence_book_never_lies_whatever_numbers_arrive(batches: list[list[int]]) -> None:
    book = SequenceBook()
    received: set[int] = set()
    jumped: set[int] = set()
    for batch in batches:
        before = book
        book = book.receive(batch)
        received.update(batch)
        jumped.update(s for s in batch if before.is_jump(s))
        # The high-water mark never goes back, and never moves by a jump.
        assert before.high_water <= book.high_water <= before.high_water + SEQUENCE_JUMP
        assert book.high_water == max(
            [before.high_water, *(s for s in batch if not before.is_jump(s))]
        )
        # Gaps: sorted, apart, under the mark, bounded; never a received number.
        assert all(1 <= a <= b <= book.high_water for a, b in book.gaps)
        assert all(b + 1 < c for (_, b), (c, _) in zip(book.gaps, book.gaps[1:], strict=False))
        assert len(book.gaps) <= MAX_GAPS
        assert not any(_inside(book.gaps, n) for n in received)
        assert not any(_inside(book.gaps, n) for n in jumped)  # jumps never enter gaps
        # Exactly what is missing under the mark (jumps the mark reached count as received).
        under = sorted(n for n in received if n <= book.high_water)
        assert book.gaps == _missing(under, book.high_water)
        assert book.jumps == tuple(sorted(n for n in received if n > book.high_water))
        assert book.missing_count() <= book.high_water


@given(st.lists(st.integers(1, 3 * MAX_GAPS), max_size=2 * MAX_GAPS))
def test_a_bounded_gap_list_gives_up_the_oldest_and_never_claims_a_received_number(
    got: list[int],
) -> None:
    book = SequenceBook().receive(got[::2]).receive(got[1::2])
    assert len(book.gaps) <= MAX_GAPS
    assert not any(_inside(book.gaps, n) for n in got)
    if got:
        assert book.high_water == max(got)


def test_the_book_remembers_a_bounded_number_of_jumps() -> None:
    wild = [NEAR_2_53 - i for i in range(MAX_JUMPS + 10)]
    book = SequenceBook().receive([1]).receive(wild)
    assert (book.high_water, book.gaps) == (1, ())
    assert book.jumps == tuple(sorted(wild))[:MAX_JUMPS]  # the lowest: reached first


def test_a_jump_the_mark_reaches_later_counts_as_received() -> None:
    jump = SEQUENCE_JUMP + 500
    book = SequenceBook().receive([10]).receive([jump])
    assert (book.high_water, book.gaps, book.jumps) == (10, ((1, 9),), (jump,))
    book = book.receive([60_000]).receive([jump + 100])  # the mark walks past it
    assert book.jumps == ()
    assert book.gaps == ((1, 9), (11, 59_999), (60_001, jump - 1), (jump + 1, jump + 99))
