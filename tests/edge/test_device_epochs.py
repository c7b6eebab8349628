"""Device transactions are de-duplicated by device, number, epoch and contents.

A controller that restarts with its counters reset (or is swapped, or wraps its counter)
re-uses transaction numbers: the journal must take a re-used number with other contents for
the new sale it is, and a re-read of a journaled one for the duplicate it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import tempfile
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from forecourt.edge.journal import FLAG_EPOCH_CHANGE, Journal, SaleDraft
from forecourt.infra.migrate import upgrade_sync
from forecourt.kernel.clock import SystemClock
from tests.edge.test_journal import DRAFT as JOURNAL_DRAFT

T0 = datetime(2026, 11, 25, 1, 0, tzinfo=UTC)
DRAFT = replace(
    JOURNAL_DRAFT,
    totalizer_start_ml=1_000_000,
    totalizer_end_ml=1_040_000,
    ended_at=T0,
    device_id="pts-0001",
)


def later(draft: SaleDraft, n: int) -> SaleDraft:
    """Another dispensing at the same nozzle: the meter and the time moved on."""
    return replace(
        draft,
        totalizer_start_ml=draft.totalizer_end_ml,
        totalizer_end_ml=(draft.totalizer_end_ml or 0) + 40000 * n,
        ended_at=draft.ended_at + timedelta(minutes=5 * n),
    )


async def _journal(path: Path) -> Journal:
    journal = Journal(path / "edge.db", SystemClock())
    await journal.open()
    return journal


async def test_a_re_used_number_with_other_contents_is_a_new_sale_in_a_new_epoch(
    tmp_path: Path,
) -> None:
    journal = await _journal(tmp_path)
    try:
        first = await journal.record_sale(DRAFT)
        reread = await journal.record_sale(DRAFT)
        assert (reread.new, reread.sale_id) == (False, first.sale_id)
        # The controller restarted with its counters reset: transaction 1 again, another sale.
        reused = await journal.record_sale(later(DRAFT, 1))
        assert reused.new
        assert reused.sale_id != first.sale_id
        assert (reused.epoch, reused.epoch_changed) == (1, True)
        assert await journal.sequence_check() == (2, 2)
        payload = (await journal.pending_uploads(10))[1].payload
        assert payload["device_epoch"] == 1
        assert FLAG_EPOCH_CHANGE in payload["device_flags"]
        # Both lives stay de-duplicated: the old sale re-read later is still the old sale.
        assert (await journal.record_sale(DRAFT)).sale_id == first.sale_id
        assert (await journal.record_sale(later(DRAFT, 1))).sale_id == reused.sale_id
        # Number 2 of the new epoch is simply the next sale (no second epoch change).
        nxt = await journal.record_sale(replace(later(DRAFT, 2), device_txn=2))
        assert (nxt.new, nxt.epoch, nxt.epoch_changed) == (True, 1, False)
    finally:
        await journal.close()


async def test_a_new_boot_marker_begins_an_epoch_and_the_same_one_does_not(
    tmp_path: Path,
) -> None:
    journal = await _journal(tmp_path)
    try:
        assert await journal.observe_device("pts-0001", "boot-a") == (0, False)
        assert await journal.observe_device("pts-0001", "boot-a") == (0, False)
        assert await journal.observe_device("pts-0001", None) == (0, False)
        before = await journal.record_sale(replace(DRAFT, device_txn=7))
        assert await journal.observe_device("pts-0001", "boot-b") == (1, True)
        assert await journal.device_epoch("pts-0001") == 1
        # After a restart seen by its boot marker, a re-used number is the new epoch's own.
        again = await journal.record_sale(replace(later(DRAFT, 1), device_txn=7))
        assert again.sale_id != before.sale_id
        assert (again.epoch, again.epoch_changed) == (1, False)
        # Re-used once more within the same epoch: that is a change of its own.
        third = await journal.record_sale(replace(later(DRAFT, 2), device_txn=7))
        assert (third.epoch, third.epoch_changed) == (2, True)
        assert await journal.device_epoch("pts-0001") == 2
    finally:
        await journal.close()


async def test_another_devices_numbers_never_collide_and_a_renamed_one_is_no_new_sale(
    tmp_path: Path,
) -> None:
    journal = await _journal(tmp_path)
    try:
        a = await journal.record_sale(DRAFT)
        # Another controller re-uses number 1 for its own dispensing: a new sale, no epoch.
        b = await journal.record_sale(replace(later(DRAFT, 1), device_id="pts-0002"))
        assert b.new
        assert b.sale_id != a.sale_id
        assert (b.epoch, b.epoch_changed) == (0, False)
        # The same dispensing read while the controller went by another name (an unreadable
        # identifier, say) is the sale already journaled, not a second one.
        again = await journal.record_sale(replace(DRAFT, device_id="http://192.0.2.10"))
        assert (again.new, again.sale_id) == (False, a.sale_id)
        assert await journal.sequence_check() == (2, 2)
    finally:
        await journal.close()


async def test_a_nozzles_newest_totalizer_is_found_by_index_not_by_a_scan(tmp_path: Path) -> None:
    journal = await _journal(tmp_path)
    try:
        await journal.record_sale(DRAFT)
    finally:
        await journal.close()
    with contextlib.closing(sqlite3.connect(journal.path)) as db:
        plan = db.execute(
            "EXPLAIN QUERY PLAN SELECT sale_id, totalizer_end_ml FROM journal WHERE "
            "fuelling_point = 1 AND nozzle = 1 AND totalizer_end_ml IS NOT NULL "
            "ORDER BY seq DESC LIMIT 1"
        ).fetchall()
    assert any("journal_nozzle_seq" in str(step) for step in plan), plan


async def test_open_sales_are_those_not_settled_and_settling_is_by_sale(tmp_path: Path) -> None:
    journal = await _journal(tmp_path)
    try:
        a = await journal.record_sale(DRAFT)
        b = await journal.record_sale(replace(later(DRAFT, 1), device_txn=2))
        assert [o.sale_id for o in await journal.open_sales()] == [a.sale_id, b.sale_id]
        await journal.mark_settled(a.sale_id)
        assert [o.device_txn for o in await journal.open_sales()] == [2]
        known = await journal.known(DRAFT)
        assert known is not None
        assert (known.sale_id, known.settled) == (a.sale_id, True)
        assert await journal.known(replace(DRAFT, volume_ml=1)) is None
        reading = await journal.last_reading(1, 1)
        assert reading is not None
        assert (reading.sale_id, reading.totalizer_end_ml) == (b.sale_id, 1_080_000)
        assert await journal.last_reading(1, 2) is None
        assert await journal.last_readings([(1, 1), (1, 2)]) == {(1, 1): reading, (1, 2): None}
        assert await journal.last_sale_end(1) == T0 + timedelta(minutes=5)
        assert await journal.last_sale_end(2) is None
    finally:
        await journal.close()


async def test_a_sale_without_totalizers_is_journaled_and_de_duplicated(tmp_path: Path) -> None:
    journal = await _journal(tmp_path)
    try:
        bare = replace(DRAFT, totalizer_start_ml=None, totalizer_end_ml=None)
        first = await journal.record_sale(bare)
        assert first.new
        assert not (await journal.record_sale(bare)).new
        payload = (await journal.pending_uploads(1))[0].payload
        assert payload["totalizer_start_ml"] is None
        assert payload["totalizer_end_ml"] is None
    finally:
        await journal.close()


def test_an_edge_0001_journal_is_carried_over_with_its_device_transactions(
    tmp_path: Path,
) -> None:
    """A journal written before epochs: its rows keep de-duplicating after the upgrade."""
    path = tmp_path / "edge.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        upgrade_sync_to(conn, "edge_0001")
        conn.execute(
            sa.text(
                "INSERT INTO journal (seq, sale_id, fuelling_point, device_txn, grade, "
                "volume_ml, amount_minor, dispense_type, business_date, payload, journaled_at) "
                "VALUES (1, 'a', 1, 1, '92', 40000, 30200, 'sale', '2026-11-25', :p, "
                "'2026-11-25 01:00:00')"
            ),
            {
                "p": '{"nozzle": 1, "volume_ml": 40000, "amount_minor": 30200, '
                '"unit_price_mmu": 755000, "ended_at": "2026-11-25T01:00:00+00:00", '
                '"totalizer_end_ml": 1040000}'
            },
        )
        conn.execute(sa.text("INSERT INTO device_txn VALUES (1, 1, 'a', NULL)"))
    engine.dispose()

    async def run() -> None:
        journal = await _journal(tmp_path)
        try:
            legacy = replace(DRAFT, device_id="")
            again = await journal.record_sale(legacy)
            assert (again.new, again.sale_id) == (False, "a")
            assert [o.sale_id for o in await journal.open_sales()] == ["a"]
        finally:
            await journal.close()

    asyncio.run(run())
    tables = {r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master")}
    assert "device_txn" not in tables
    assert {"device_sale", "device_epoch"} <= tables


def upgrade_sync_to(conn: sa.Connection, revision: str) -> None:
    from alembic import command

    from forecourt.infra.migrate import _config

    command.upgrade(_config("edge", conn, None), revision)


@settings(max_examples=15, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(0, 3)), min_size=1, max_size=40
    )
)
def test_each_distinct_dispensing_is_journaled_once_however_numbers_repeat(
    reads: list[tuple[int, int, int]],
) -> None:
    """(pump, number, contents variant): re-reads never add a sale, new contents always do."""

    async def run() -> None:
        with tempfile.TemporaryDirectory() as d:
            journal = await _journal(Path(d))
            try:
                ids: dict[tuple[int, int, int], str] = {}
                for fp, txn, variant in reads:
                    draft = replace(
                        DRAFT,
                        fuelling_point=fp,
                        device_txn=txn,
                        volume_ml=40000 + variant * 10,
                        ended_at=T0 + timedelta(minutes=variant),
                    )
                    result = await journal.record_sale(draft)
                    assert ids.setdefault((fp, txn, variant), result.sale_id) == result.sale_id
                unique = len(set(reads))
                assert len(set(ids.values())) == unique
                assert await journal.sequence_check() == (unique, unique)
            finally:
                await journal.close()

    asyncio.run(run())


assert upgrade_sync  # the runner the journal uses; the helper above stops at a revision
