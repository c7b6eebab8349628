"""Journal retention at the edge: old settled sales HQ has answered move to a checksummed,
append-only archive, written and fsynced before they leave the journal.

The archive is a directory (default ``<journal>.archive/``) of gzip-compressed JSON Lines
files, one per retention batch, each line one full journal row; next to each file a
``.sha256`` sidecar (``sha256sum -c`` format) and, for all of them, ``manifest.jsonl``: one
line per file with its checksum, row count and the exact seq ranges it holds. A manifest line
is the commit: a file without one is an orphan of an interrupted run (its rows are still in
the journal) and is removed. The order of one batch is file, sidecar, manifest line (each
fsynced), then the journal delete in one transaction; a crash after the manifest line leaves
rows both archived and in the journal, and the next run deletes them without writing them
again, because their seqs are already in the manifest.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import gzip
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from forecourt.edge.journal import Journal
from forecourt.infra.background import BackgroundService
from forecourt.infra.crash import crash_point
from forecourt.infra.logging import get_logger
from forecourt.kernel.clock import Clock
from forecourt.kernel.errors import ForecourtError

log = get_logger("forecourt.edge.retention")

MANIFEST = "manifest.jsonl"
FILE_PREFIX = "journal-"
FILE_SUFFIX = ".jsonl.gz"

SeqRange = tuple[int, int]


class ArchiveCorrupt(ForecourtError):
    code = "edge.archive_corrupt"
    http_status = 500


def default_archive_dir(journal_path: Path) -> Path:
    return journal_path.with_name(journal_path.name + ".archive")


def seq_ranges(seqs: Iterable[int]) -> list[SeqRange]:
    """Distinct seqs as sorted inclusive ranges: 1, 2, 3, 7 → (1, 3), (7, 7)."""
    ranges: list[SeqRange] = []
    for seq in sorted(set(seqs)):
        if ranges and ranges[-1][1] == seq - 1:
            ranges[-1] = (ranges[-1][0], seq)
        else:
            ranges.append((seq, seq))
    return ranges


def merge_ranges(ranges: Iterable[SeqRange]) -> list[SeqRange]:
    """Sorted, disjoint, adjacent ones joined; an overlap means a seq archived twice."""
    merged: list[SeqRange] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1]:
            raise ArchiveCorrupt(f"seqs {low}..{min(high, merged[-1][1])} are archived twice")
        if merged and low == merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], high)
        else:
            merged.append((low, high))
    return merged


def _contains(ranges: list[SeqRange], seq: int) -> bool:
    i = bisect.bisect_right(ranges, (seq, sys.maxsize)) - 1
    return i >= 0 and ranges[i][0] <= seq <= ranges[i][1]


@dataclass(frozen=True)
class ArchiveEntry:
    """One manifest line: an archive file and exactly what it holds."""

    file: str
    sha256: str
    rows: int
    seq_ranges: tuple[SeqRange, ...]
    journaled_from: str
    journaled_to: str
    archived_at: str

    def to_line(self) -> bytes:
        body = {
            "file": self.file,
            "sha256": self.sha256,
            "rows": self.rows,
            "seq_ranges": [list(r) for r in self.seq_ranges],
            "journaled_from": self.journaled_from,
            "journaled_to": self.journaled_to,
            "archived_at": self.archived_at,
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> ArchiveEntry:
        body = json.loads(line)
        return cls(
            file=body["file"],
            sha256=body["sha256"],
            rows=int(body["rows"]),
            seq_ranges=tuple((int(a), int(b)) for a, b in body["seq_ranges"]),
            journaled_from=body["journaled_from"],
            journaled_to=body["journaled_to"],
            archived_at=body["archived_at"],
        )


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    """Write, fsync, rename into place, fsync the directory: all of it or none of it."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Archive:
    """The archive directory. Blocking file I/O: call it from a worker thread."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.manifest = directory / MANIFEST

    def entries(self) -> list[ArchiveEntry]:
        """The committed files, oldest first. A last line without its newline is a write
        cut short by a crash: not committed, ignored."""
        try:
            data = self.manifest.read_bytes()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")[:-1]  # the part after the last newline is not committed
        entries = []
        for number, line in enumerate(lines, start=1):
            try:
                entries.append(ArchiveEntry.from_line(line))
            except (ValueError, KeyError, TypeError) as exc:
                raise ArchiveCorrupt(f"{self.manifest} line {number} is unreadable: {exc}") from exc
        return entries

    def archived_ranges(self) -> list[SeqRange]:
        """Every archived seq, as merged ranges (raises ArchiveCorrupt on a seq held twice)."""
        return merge_ranges(r for e in self.entries() for r in e.seq_ranges)

    def write(self, rows: list[dict[str, Any]], archived_at: datetime) -> ArchiveEntry:
        """Archive journal rows (distinct seqs, none archived before) as one new file."""
        if not rows:
            raise ValueError("nothing to archive")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._cut_torn_manifest_tail()
        rows = sorted(rows, key=lambda r: int(r["seq"]))
        first, last = int(rows[0]["seq"]), int(rows[-1]["seq"])
        name = f"{FILE_PREFIX}{first:012d}-{last:012d}{FILE_SUFFIX}"
        lines = b"".join(
            json.dumps({k: _plain(v) for k, v in row.items()}, sort_keys=True).encode() + b"\n"
            for row in rows
        )
        data = gzip.compress(lines, mtime=0)  # mtime 0: the same rows give the same bytes
        digest = hashlib.sha256(data).hexdigest()
        _write_durably(self.directory / name, data)
        _write_durably(self.directory / f"{name}.sha256", f"{digest}  {name}\n".encode())
        stamps = sorted(_plain(r["journaled_at"]) for r in rows)
        entry = ArchiveEntry(
            file=name,
            sha256=digest,
            rows=len(rows),
            seq_ranges=tuple(seq_ranges(int(r["seq"]) for r in rows)),
            journaled_from=stamps[0],
            journaled_to=stamps[-1],
            archived_at=archived_at.isoformat(),
        )
        created = not self.manifest.exists()
        with self.manifest.open("ab") as fh:
            fh.write(entry.to_line())
            fh.flush()
            os.fsync(fh.fileno())
        if created:
            _fsync_dir(self.directory)
        return entry

    def _cut_torn_manifest_tail(self) -> None:
        if not self.manifest.exists():
            return
        data = self.manifest.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.manifest.open("r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)
                fh.flush()
                os.fsync(fh.fileno())
            log.warning("edge.archive_manifest_repaired", manifest=str(self.manifest))

    def remove_orphans(self) -> list[str]:
        """Delete archive files no manifest line commits (an interrupted run's; their rows
        are still in the journal and will be archived again)."""
        if not self.directory.is_dir():
            return []
        committed = {e.file for e in self.entries()}
        removed = []
        for path in sorted(self.directory.iterdir()):
            name = path.name
            base = name.removesuffix(".tmp").removesuffix(".sha256")
            if not base.startswith(FILE_PREFIX) or not base.endswith(FILE_SUFFIX):
                continue
            if name.endswith(".tmp") or base not in committed:
                path.unlink()
                removed.append(name)
                log.warning("edge.archive_orphan_removed", file=name)
        return removed

    def read_rows(self, entry: ArchiveEntry) -> Iterator[dict[str, Any]]:
        with gzip.open(self.directory / entry.file, "rb") as fh:
            for line in fh:
                yield json.loads(line)

    def verify(self) -> list[str]:
        """Problems found (empty when sound): every committed file present, its SHA-256 as
        in the manifest and its sidecar, its rows exactly the seqs the manifest lists, and
        no seq in two files."""
        problems: list[str] = []
        try:
            entries = self.entries()
            merge_ranges(r for e in entries for r in e.seq_ranges)
        except ArchiveCorrupt as exc:
            return [exc.message]
        for entry in entries:
            path = self.directory / entry.file
            if not path.is_file():
                problems.append(f"{entry.file}: missing")
                continue
            actual = _sha256(path)
            if actual != entry.sha256:
                problems.append(f"{entry.file}: sha256 {actual}, manifest says {entry.sha256}")
                continue
            sidecar = self.directory / f"{entry.file}.sha256"
            if not sidecar.is_file() or sidecar.read_text().split()[:1] != [actual]:
                problems.append(f"{entry.file}: sidecar checksum missing or different")
            seqs = [int(row["seq"]) for row in self.read_rows(entry)]
            if len(seqs) != entry.rows or tuple(seq_ranges(seqs)) != entry.seq_ranges:
                problems.append(f"{entry.file}: rows differ from the manifest")
        return problems


@dataclass(frozen=True)
class StorageUsage:
    """The journal's footprint on disk and the room left on its filesystem, in bytes."""

    journal_bytes: int
    wal_bytes: int
    free_bytes: int


@dataclass
class RetentionStats:
    passes: int = 0
    archived: int = 0  # rows written to the archive since start
    deleted: int = 0  # rows deleted from the journal since start
    files: int = 0
    early_requests: int = 0
    last_run_at: str | None = None
    last_removed: int = 0
    orphans_removed: int = 0


class JournalRetention(BackgroundService):
    """Every ``interval_s`` (or at once when ``request()`` is called, e.g. on low disk)
    archives and deletes the sales that are past retention."""

    task_name = "edge-retention"

    def __init__(
        self,
        journal: Journal,
        clock: Clock,
        *,
        archive_dir: Path | None = None,
        retention_days: int = 90,
        interval_s: float = 3600.0,
        batch_rows: int = 10_000,
    ) -> None:
        self.journal = journal
        self.clock = clock
        self.archive = Archive(archive_dir or default_archive_dir(journal.path))
        self.retention = timedelta(days=retention_days)
        self.interval_s = interval_s
        self.batch_rows = batch_rows
        self.stats = RetentionStats()
        self.wake = asyncio.Event()

    def request(self) -> None:
        """Run a pass now rather than at the next interval."""
        self.stats.early_requests += 1
        self.wake.set()

    async def run_once(self) -> int:
        """One pass: returns how many rows left the journal."""
        cutoff = self.clock.now() - self.retention
        orphans = await asyncio.to_thread(self.archive.remove_orphans)
        self.stats.orphans_removed += len(orphans)
        archived = await asyncio.to_thread(self.archive.archived_ranges)
        removed = 0
        while True:
            rows = await self.journal.retention_candidates(cutoff, self.batch_rows)
            if not rows:
                break
            fresh = [r for r in rows if not _contains(archived, int(r["seq"]))]
            if fresh:
                entry = await asyncio.to_thread(self.archive.write, fresh, self.clock.now())
                archived = merge_ranges([*archived, *entry.seq_ranges])
                self.stats.archived += entry.rows
                self.stats.files += 1
            crash_point("edge.after_archive_write")
            deleted = await self.journal.delete_archived([int(r["seq"]) for r in rows], cutoff)
            removed += deleted
            if len(rows) < self.batch_rows or deleted < len(rows):
                break  # the last batch, or rows that stopped qualifying: never spin on them
        pruned = await self.journal.prune_gauge_history(cutoff)
        if pruned:
            log.info("edge.gauge_history_pruned", rows=pruned, before=cutoff.isoformat())
        audit_pruned = await self.journal.prune_uploaded_audit(cutoff)
        if audit_pruned:
            log.info("edge.audit_pruned", rows=audit_pruned, before=cutoff.isoformat())
        pruned += audit_pruned
        if removed or pruned:
            await self.journal.checkpoint()
        if removed:
            log.info("edge.journal_archived", rows=removed, before=cutoff.isoformat())
        self.stats.passes += 1
        self.stats.deleted += removed
        self.stats.last_removed = removed
        self.stats.last_run_at = self.clock.now().isoformat()
        return removed

    async def run(self) -> None:
        while True:
            self.wake.clear()
            await self.run_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=self.interval_s)
