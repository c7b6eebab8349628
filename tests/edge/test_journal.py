"""The edge journal: gap-free sequence, de-duplication of device transactions, the outbox."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from forecourt.edge.journal import Journal, SaleDraft
from forecourt.kernel.clock import SystemClock

DRAFT = SaleDraft(
    fuelling_point=1,
    nozzle=1,
    grade="92",
    volume_ml=40000,
    unit_price_mmu=755000,
    amount_minor=30200,
    currency="CNY",
    price_version="p",
    snapshot_version=1,
    totalizer_start_ml=0,
    totalizer_end_ml=40000,
    device_txn=1,
    dispense_type="sale",
    started_at=None,
    ended_at=datetime(2026, 11, 25, 1, 0, tzinfo=UTC),
    business_date=date(2026, 11, 25),
    shift_id="2026-11-25/1",
)


async def _journal(tmp_path: Path) -> Journal:
    journal = Journal(tmp_path / "edge.db", SystemClock())
    await journal.open()
    return journal


async def test_sales_get_a_gap_free_sequence_and_an_outbox_row_each(tmp_path: Path) -> None:
    journal = await _journal(tmp_path)
    try:
        results = await asyncio.gather(
            *(journal.record_sale(replace(DRAFT, device_txn=n)) for n in range(1, 21))
        )
        assert sorted(r.seq for r in results) == list(range(1, 21))
        assert len({r.sale_id for r in results}) == 20
        assert await journal.sequence_check() == (20, 20)
        pending = await journal.pending_uploads(100)
        assert [p.seq for p in pending] == list(range(1, 21))
        assert pending[0].payload["schema_version"] == 2
        assert pending[0].payload["station_seq"] == pending[0].seq
    finally:
        await journal.close()


async def test_a_re_read_device_transaction_keeps_its_first_sale_id(tmp_path: Path) -> None:
    journal = await _journal(tmp_path)
    try:
        first = await journal.record_sale(DRAFT)
        again = await journal.record_sale(DRAFT)
        assert first.new
        assert not again.new
        assert again.sale_id == first.sale_id
        assert again.seq == first.seq
        assert await journal.sequence_check() == (1, 1)
        # another pump may reuse the same device transaction number
        other = await journal.record_sale(replace(DRAFT, fuelling_point=2))
        assert other.new
        assert other.seq == 2
    finally:
        await journal.close()


async def test_answered_items_leave_the_outbox_and_are_never_sent_again(tmp_path: Path) -> None:
    journal = await _journal(tmp_path)
    try:
        a = await journal.record_sale(DRAFT)
        b = await journal.record_sale(replace(DRAFT, device_txn=2))
        await journal.record_answers([(a.sale_id, "created", [])])
        assert [p.sale_id for p in await journal.pending_uploads(10)] == [b.sale_id]
        row = await journal.sale(a.sale_id)
        assert row is not None
        assert row["hq_status"] == "created"
        await journal.record_failure([b.seq], "HTTP 422", reject=True)
        assert await journal.pending_uploads(10) == []
        pending, size, rejected = await journal.outbox_usage()
        assert (pending, rejected) == (1, 1)
        assert size > 100  # the rejected sale is kept, not dropped
    finally:
        await journal.close()


async def test_the_journal_survives_reopening(tmp_path: Path) -> None:
    journal = await _journal(tmp_path)
    first = await journal.record_sale(DRAFT)
    await journal.save_snapshot(3, '{"v": 3}')
    await journal.close()
    journal = await _journal(tmp_path)
    try:
        assert (await journal.record_sale(DRAFT)).sale_id == first.sale_id
        assert (await journal.record_sale(replace(DRAFT, device_txn=9))).seq == 2
        assert await journal.latest_snapshot() == '{"v": 3}'
    finally:
        await journal.close()


@settings(max_examples=10, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(1, 30)), min_size=1, max_size=40))
def test_any_mix_of_repeats_journals_each_device_transaction_once(
    txns: list[tuple[int, int]],
) -> None:
    import tempfile

    async def run() -> None:
        with tempfile.TemporaryDirectory() as d:
            journal = await _journal(Path(d))
            try:
                for fp, txn in txns:
                    await journal.record_sale(replace(DRAFT, fuelling_point=fp, device_txn=txn))
                unique = len(set(txns))
                assert await journal.sequence_check() == (unique, unique)
                assert len(await journal.pending_uploads(1000)) == unique
            finally:
                await journal.close()

    asyncio.run(run())
