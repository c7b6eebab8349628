"""Edge retention and disk budget: old settled sales HQ has answered move to a checksummed
archive before they leave the journal (a crash in between loses nothing and doubles nothing),
audit rows and unfinished sales stay, the budget watches the journal on disk and the free
space, and the node supervises and reports its background tasks."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from forecourt.edge import retention as retention_module
from forecourt.edge.journal import Journal, Journaled, audit_t, device_txn_t, journal_t
from forecourt.edge.node import build_edge_node
from forecourt.edge.retention import Archive, ArchiveCorrupt, JournalRetention, merge_ranges
from forecourt.edge.sync import HqClient, SyncAgent
from forecourt.settings import EdgeSettings
from tests.edge.test_journal import DRAFT
from tests.support import ManualClock, eventually

T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
DAY = timedelta(days=1)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
async def journal(tmp_path: Path, clock: ManualClock) -> AsyncIterator[Journal]:
    journal = Journal(tmp_path / "edge.db", clock)
    await journal.open()
    yield journal
    await journal.close()


async def sell(
    journal: Journal, txn: int, *, settle: bool = True, answer: str | None = "created"
) -> Journaled:
    """Journal one sale; optionally close it at the device and record HQ's answer."""
    sale = await journal.record_sale(replace(DRAFT, device_txn=txn))
    if settle:
        await journal.mark_settled(sale.sale_id)
    if answer is not None:
        await journal.record_answers([(sale.sale_id, answer, [])])
    return sale


async def rows(journal: Journal, table: sa.Table) -> list[dict[str, Any]]:
    def read() -> list[dict[str, Any]]:
        with journal.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.select(table))]

    return await journal._run(read)


async def seqs(journal: Journal) -> list[int]:
    return sorted(r["seq"] for r in await rows(journal, journal_t))


def archived_rows(archive: Archive) -> list[dict[str, Any]]:
    return [row for entry in archive.entries() for row in archive.read_rows(entry)]


async def a_mixed_journal(journal: Journal, clock: ManualClock) -> None:
    """Seqs 1-3 may go after the retention; 4-8 must stay, each for its own reason."""
    await sell(journal, 1, answer="created")
    await sell(journal, 2, answer="duplicate")
    await sell(journal, 3, answer="conflict")
    await sell(journal, 4, answer=None)  # settled, still waiting for HQ in the outbox
    refused = await sell(journal, 5, answer=None)
    pending = await journal.pending_uploads(100)
    await journal.record_failure(
        [p.seq for p in pending if p.sale_id == refused.sale_id], "422", reject=True
    )
    await sell(journal, 6, settle=False)  # answered, but never closed at the device
    clock.at = T0 + 80 * DAY
    await sell(journal, 7, answer="quarantined")  # too young at T0 + 91 days
    await sell(journal, 8)  # the newest row: the next sale is numbered from it
    await journal.record_audit(actor="edge", action="price.changed", target="fp1", details={})


# --- retention --------------------------------------------------------------------------


async def test_only_settled_sales_hq_answered_older_than_the_retention_move_to_the_archive(
    journal: Journal, clock: ManualClock
) -> None:
    # Given a journal of sales in every state, 91 days on
    await a_mixed_journal(journal, clock)
    before = {r["seq"]: r for r in await rows(journal, journal_t)}
    clock.at = T0 + 91 * DAY
    retention = JournalRetention(journal, clock, retention_days=90)
    # When retention runs
    assert await retention.run_once() == 3
    # Then exactly the settled, answered, old ones left the journal for the archive, whole
    assert await seqs(journal) == [4, 5, 6, 7, 8]
    archived = archived_rows(retention.archive)
    assert [r["seq"] for r in archived] == [1, 2, 3]
    for row in archived:
        expected = before[row["seq"]]
        assert row.keys() == expected.keys()
        assert row == {
            k: v.isoformat() if isinstance(v, datetime) else v for k, v in expected.items()
        }
    # And the sequence still proves itself gap-free, counting the archive
    assert await journal.sequence_check_with_archive() == (5, 3, 8)
    # And the next sale continues the sequence
    assert (await journal.record_sale(replace(DRAFT, device_txn=9))).seq == 9
    # And a second run finds nothing more to do
    assert await retention.run_once() == 0
    assert len(retention.archive.entries()) == 1
    assert retention.archive.verify() == []


async def test_audit_rows_hq_lacks_are_never_deleted_however_old(
    journal: Journal, clock: ManualClock
) -> None:
    # Given audit rows and archivable sales, ten years on, none of the audit rows in HQ's
    # trail yet (waiting for the upload, or refused by HQ)
    await a_mixed_journal(journal, clock)
    await journal.record_audit(actor="edge", action="odd", target="x", details={})
    assert len(await rows(journal, audit_t)) >= 2
    pending = await journal.pending_audit(100)
    await journal.audit_answered([], {pending[0].id: "refused by HQ: test"})
    audit_before = await rows(journal, audit_t)
    clock.at = T0 + 3650 * DAY
    retention = JournalRetention(journal, clock, retention_days=90, batch_rows=1)
    # When retention runs
    assert await retention.run_once() == 4  # 1, 2, 3 and 7 (one file per batch of one)
    # Then every audit row is still there
    assert await rows(journal, audit_t) == audit_before
    assert await seqs(journal) == [4, 5, 6, 8]
    assert len(retention.archive.entries()) == 4


async def test_audit_rows_in_hqs_trail_go_after_the_retention_period(
    journal: Journal, clock: ManualClock
) -> None:
    # Given audit rows HQ's trail took (uploaded) at T0, and one it has not
    await a_mixed_journal(journal, clock)
    pending = await journal.pending_audit(100)
    uploaded_at = clock.at
    await journal.audit_answered([p.id for p in pending], {})
    await journal.record_audit(actor="edge", action="late", target="x", details={})
    retention = JournalRetention(journal, clock, retention_days=90, batch_rows=100)
    # When retention runs inside the period, they stay
    clock.at = uploaded_at + 89 * DAY
    await retention.run_once()
    assert len(await rows(journal, audit_t)) == len(pending) + 1
    # And after it, the uploaded ones go and the one HQ lacks stays
    clock.at = uploaded_at + 91 * DAY
    await retention.run_once()
    assert [r["action"] for r in await rows(journal, audit_t)] == ["late"]


async def test_device_transaction_memory_goes_only_for_archived_sales_closed_before_the_cutoff(
    journal: Journal, clock: ManualClock
) -> None:
    await a_mixed_journal(journal, clock)
    clock.at = T0 + 91 * DAY
    await JournalRetention(journal, clock).run_once()
    remembered = {r["device_txn"]: r for r in await rows(journal, device_txn_t)}
    # the archived sales' device transactions were closed 91 days ago: no pump shows them
    assert sorted(remembered) == [4, 5, 6, 7, 8]
    assert remembered[6]["closed_at"] is None  # never closed: a pump may still show it


async def test_the_archive_checksum_verifies_and_a_changed_file_is_detected(
    journal: Journal, clock: ManualClock
) -> None:
    await a_mixed_journal(journal, clock)
    clock.at = T0 + 91 * DAY
    retention = JournalRetention(journal, clock)
    await retention.run_once()
    archive = retention.archive
    assert archive.directory == journal.path.with_name("edge.db.archive")
    [entry] = archive.entries()
    path = archive.directory / entry.file
    # The sidecar is sha256sum format and matches the file and the manifest
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert (archive.directory / f"{entry.file}.sha256").read_text() == f"{digest}  {entry.file}\n"
    assert entry.sha256 == digest
    assert (entry.rows, entry.seq_ranges) == (3, ((1, 3),))
    # The file is gzip JSON Lines, one full journal row per line
    lines = gzip.decompress(path.read_bytes()).splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [1, 2, 3]
    assert archive.verify() == []
    # A changed byte is found
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    [problem] = archive.verify()
    assert "sha256" in problem


async def test_a_crash_between_archive_write_and_delete_loses_nothing_and_doubles_nothing(
    journal: Journal, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given archivable sales and a process that dies right after the archive is committed
    await a_mixed_journal(journal, clock)
    clock.at = T0 + 91 * DAY
    retention = JournalRetention(journal, clock)

    def crash(name: str) -> None:
        if name == "edge.after_archive_write":
            raise SystemExit("crashed")

    monkeypatch.setattr(retention_module, "crash_point", crash)
    with pytest.raises(SystemExit):
        await retention.run_once()
    # Then the rows are both archived and still in the journal, and counted once
    assert await seqs(journal) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["seq"] for r in archived_rows(retention.archive)] == [1, 2, 3]
    assert await journal.sequence_check_with_archive() == (8, 0, 8)
    # When the next run (after the restart) goes through
    monkeypatch.undo()
    restarted = JournalRetention(journal, clock)
    assert await restarted.run_once() == 3
    # Then they left the journal and are in the archive exactly once
    assert await seqs(journal) == [4, 5, 6, 7, 8]
    assert [r["seq"] for r in archived_rows(restarted.archive)] == [1, 2, 3]
    assert len(restarted.archive.entries()) == 1
    assert restarted.stats.archived == 0  # nothing written again
    assert restarted.archive.verify() == []
    assert await journal.sequence_check_with_archive() == (5, 3, 8)


async def test_an_archive_write_cut_short_leaves_nothing_the_next_run_trusts(
    journal: Journal, clock: ManualClock
) -> None:
    # Given the leftovers of a run killed while writing: a temporary file, a file and sidecar
    # no manifest line commits, and a manifest line without its newline
    await a_mixed_journal(journal, clock)
    clock.at = T0 + 91 * DAY
    retention = JournalRetention(journal, clock)
    archive = retention.archive
    archive.directory.mkdir()
    (archive.directory / "journal-000000000001-000000000002.jsonl.gz.tmp").write_bytes(b"x")
    (archive.directory / "journal-000000000001-000000000002.jsonl.gz").write_bytes(b"partial")
    (archive.directory / "journal-000000000001-000000000002.jsonl.gz.sha256").write_text("0  x\n")
    (archive.directory / "notes.txt").write_text("an operator's file")
    (archive.directory / "manifest.jsonl").write_bytes(b'{"file":"journal-0000000')
    assert archive.entries() == []
    # When retention runs
    assert await retention.run_once() == 3
    # Then the orphans are gone, the torn line cut, and the archive sound
    assert retention.stats.orphans_removed == 3
    names = sorted(p.name for p in archive.directory.iterdir())
    assert names == [
        "journal-000000000001-000000000003.jsonl.gz",
        "journal-000000000001-000000000003.jsonl.gz.sha256",
        "manifest.jsonl",
        "notes.txt",
    ]
    assert archive.verify() == []
    assert await journal.sequence_check_with_archive() == (5, 3, 8)


def test_a_seq_archived_twice_is_reported_as_corruption() -> None:
    assert merge_ranges([(5, 9), (1, 4), (11, 11)]) == [(1, 9), (11, 11)]
    with pytest.raises(ArchiveCorrupt, match="archived twice"):
        merge_ranges([(1, 4), (4, 6)])


CRASHING_RETENTION = textwrap.dedent(
    """
    import asyncio, sys
    from datetime import datetime
    from pathlib import Path
    from forecourt.edge.journal import Journal
    from forecourt.edge.retention import JournalRetention

    class Fixed:
        def now(self):
            return datetime.fromisoformat(sys.argv[2])

    async def main():
        journal = Journal(Path(sys.argv[1]), Fixed())
        await journal.open()
        await JournalRetention(journal, Fixed()).run_once()

    asyncio.run(main())
    """
)


async def test_a_process_killed_after_the_archive_write_loses_and_doubles_nothing(
    tmp_path: Path, journal: Journal, clock: ManualClock
) -> None:
    # Given archivable sales, and a retention process SIGKILLed right after the archive commit
    await a_mixed_journal(journal, clock)
    await journal.close()
    marker = tmp_path / "crash.marker"
    later = T0 + 91 * DAY
    env = {
        **os.environ,
        "FORECOURT_CRASH_AT": "edge.after_archive_write",
        "FORECOURT_CRASH_MARKER": str(marker),
    }
    process = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", CRASHING_RETENTION, str(journal.path), later.isoformat()],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()
    assert marker.read_text().startswith("edge.after_archive_write")
    # When the node comes back and retention runs again
    again = Journal(journal.path, ManualClock(later))
    await again.open()
    try:
        assert await again.sequence_check_with_archive() == (8, 0, 8)
        retention = JournalRetention(again, ManualClock(later))
        assert await retention.run_once() == 3
        # Then nothing was lost and nothing is archived twice
        assert await seqs(again) == [4, 5, 6, 7, 8]
        assert [r["seq"] for r in archived_rows(retention.archive)] == [1, 2, 3]
        assert retention.archive.verify() == []
        assert await again.sequence_check_with_archive() == (5, 3, 8)
    finally:
        await again.close()


# --- disk budget ------------------------------------------------------------------------


def agent(journal: Journal, **budget: Any) -> SyncAgent:
    return SyncAgent(journal, HqClient("http://127.0.0.1:9", "S001", "x" * 32), **budget)


async def test_the_journal_budget_counts_the_database_file_and_its_wal(
    journal: Journal,
) -> None:
    # Given a journal with sales not yet checkpointed out of its write-ahead log
    for txn in range(1, 6):
        await sell(journal, txn, answer=None)
    db_bytes, wal_bytes = journal.disk_bytes()
    assert db_bytes == os.path.getsize(journal.path)
    assert wal_bytes == os.path.getsize(f"{journal.path}-wal") > 0
    # And a budget the main file alone stays under half of, but main file + WAL reach
    watcher = agent(
        journal, journal_budget_bytes=2 * (db_bytes + wal_bytes), alarm_ratios=(0.5, 0.8)
    )
    with capture_logs() as logs:
        await watcher.check_budget()
    # Then the first alarm level is raised and logged as an error
    assert watcher.journal_alarm_level == 1
    assert watcher.storage is not None
    assert (watcher.storage.journal_bytes, watcher.storage.wal_bytes) == (db_bytes, wal_bytes)
    [alarm] = [e for e in logs if e["event"] == "edge.journal_budget_alarm"]
    assert alarm["log_level"] == "error"
    assert alarm["journal_bytes"] + alarm["wal_bytes"] == db_bytes + wal_bytes
    # And the station keeps selling
    assert (await journal.record_sale(replace(DRAFT, device_txn=6))).new
    # And a larger budget clears the alarm
    watcher.journal_budget_bytes = 100 * (db_bytes + wal_bytes)
    await watcher.check_budget()
    assert watcher.journal_alarm_level == 0


async def test_low_free_disk_space_alarms_and_runs_retention_early(
    journal: Journal, clock: ManualClock
) -> None:
    # Given a retention service running on a long interval, and archivable sales by now
    await a_mixed_journal(journal, clock)
    retention = JournalRetention(journal, clock, interval_s=3600)
    retention.start()
    free = {"bytes": 10**6}
    watcher = agent(
        journal,
        min_free_bytes=5 * 10**6,
        free_bytes=lambda path: free["bytes"] if path == journal.path.parent else -1,
        on_disk_low=retention.request,
    )
    try:
        await eventually(lambda: retention.stats.passes == 1)  # its first pass, at start
        assert retention.stats.deleted == 0
        clock.at = T0 + 91 * DAY
        # When free space is below the minimum
        with capture_logs() as logs:
            await watcher.check_budget()
        # Then it alarms and retention runs without waiting for its interval
        assert watcher.disk_low
        assert [e["log_level"] for e in logs if e["event"] == "edge.disk_space_low"] == ["error"]
        await eventually(lambda: retention.stats.passes == 2)
        assert retention.stats.deleted == 3
        assert retention.stats.early_requests == 1
        # And a second check while still low does not ask again
        await watcher.check_budget()
        assert retention.stats.early_requests == 1
        # And the alarm clears when space is back
        free["bytes"] = 10**7
        await watcher.check_budget()
        assert not watcher.disk_low
        # And selling never stopped
        assert (await journal.record_sale(replace(DRAFT, device_txn=99))).new
    finally:
        await retention.stop()


# --- the node's wiring ------------------------------------------------------------------


def node_settings(tmp_path: Path, **overrides: Any) -> EdgeSettings:
    return EdgeSettings(
        station="S001",
        hq_url="http://127.0.0.1:9",
        credential="x" * 32,
        journal_path=tmp_path / "edge.db",
        log_json=False,
        **overrides,
    )


def test_retention_and_disk_settings_have_their_documented_defaults(tmp_path: Path) -> None:
    settings = node_settings(tmp_path)
    assert settings.retention_days == 90
    assert settings.archive_dir is None
    assert settings.min_free_disk_bytes == 1024**3
    assert settings.journal_budget_bytes is None
    assert settings.retention_interval_s == 3600
    assert settings.retention_batch_rows == 10_000


async def test_the_node_supervises_its_snapshot_refresh_and_reports_every_task(
    tmp_path: Path, clock: ManualClock
) -> None:
    # Given an edge node whose HQ does not answer, refreshing its snapshot often
    node = build_edge_node(
        node_settings(tmp_path, snapshot_refresh_s=0.01, retention_days=30, min_free_disk_bytes=7),
        clock,
        lambda snapshot: None,  # type: ignore[arg-type,return-value]  # no forecourt needed
    )
    assert node.retention is not None
    assert node.retention.archive.directory == tmp_path / "edge.db.archive"
    assert node.sync.journal_budget_bytes == node.settings.outbox_budget_bytes
    assert node.sync.min_free_bytes == 7
    await node.journal.open()
    refresh = node.snapshot_refresh
    refresh.restart_initial_s = 0.001
    try:
        # When a refresh fails, then it is a warning, and the loop goes on
        with capture_logs() as logs:
            refresh.start()
            await eventually(
                lambda: sum(e["event"] == "edge.snapshot_refresh_failed" for e in logs) >= 2
            )
        assert {e["log_level"] for e in logs if e["event"] == "edge.snapshot_refresh_failed"} == {
            "warning"
        }
        assert refresh.restarts == 0

        # When a refresh raises, then the supervisor restarts the loop
        async def broken() -> bool:
            raise RuntimeError("snapshot store broken")

        node.snapshots.refresh = broken  # type: ignore[method-assign]
        await eventually(lambda: refresh.restarts >= 2)
        await node.sync.check_budget()
        status = await node.status()
        tasks = status["tasks"]
        assert set(tasks) == {
            "edge-controller",
            "edge-totalizers-forecourt",
            "edge-prices-forecourt",
            "edge-sync",
            "edge-snapshots",
            "edge-retention",
            "edge-staff-keys",
            "edge-pos-cash",
        }
        assert tasks["edge-snapshots"]["restarts"] >= 2
        assert tasks["edge-snapshots"]["last_error"] == "RuntimeError: snapshot store broken"
        assert tasks["edge-snapshots"]["alarm"] is True
        assert tasks["edge-sync"] == {
            "running": False,
            "restarts": 0,
            "last_error": None,
            "alarm": False,
        }
        storage = status["storage"]
        assert storage["journal_bytes"] == os.path.getsize(node.journal.path)
        assert storage["free_bytes"] > 0
        assert storage["disk_low"] is False
        assert storage["retention"]["retention_days"] == 30
        assert storage["retention"]["archive_dir"] == str(tmp_path / "edge.db.archive")
        metrics = node.registry
        assert (
            metrics.get_sample_value("forecourt_edge_task_restarts", {"task": "edge-snapshots"})
            >= 2
        )
        assert metrics.get_sample_value("forecourt_edge_journal_disk_bytes") > 0
    finally:
        await refresh.stop()
        await node.hq.close()
        await node.journal.close()
