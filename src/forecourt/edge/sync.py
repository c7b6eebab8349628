"""Talking to HQ: the snapshot puller and the upload agent (store-and-forward) for sales and
for the edge's audit records.

The station never stops recording while HQ is away: the controller journals locally and this
agent uploads outbox batches whenever HQ answers, with exponential backoff and full jitter.
HQ's per-sale answer is recorded and the item leaves the outbox, so nothing answered is ever
sent again. Only HQ's verdict on an item marks it refused (kept in the journal, out of the
pending set, counted and alarmed); an error about the whole batch (an HTTP error status, an
unreadable answer, no connection) changes no item: the agent backs off, raises an alarm and
tries again.

The edge's audit records (pump commands, price downloads, totalizer checks …) go the same way
into HQ's one audit trail, after the sales: HQ answers each ``created`` or ``duplicate`` (an
upload repeated after a lost answer) and the record leaves the edge, or ``refused`` and it
stays, marked, out of the pending set. Their failures back off on their own and raise the
``audit_upload`` alarm; they never hold back a sale.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from forecourt.edge.journal import Journal, PendingUpload
from forecourt.edge.retention import StorageUsage
from forecourt.infra.background import BackgroundService
from forecourt.infra.crash import crash_point
from forecourt.infra.logging import get_logger
from forecourt.network.contracts import StationSnapshot

log = get_logger("forecourt.edge.sync")


class HqClient:
    def __init__(
        self,
        base_url: str,
        station: str,
        credential: str,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.station = station
        # TCP_NODELAY: a POST goes out as headers then body; without it Nagle's algorithm can
        # hold the body back for a delayed ACK (tens of milliseconds per upload).
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers={"authorization": f"Bearer {credential}"},
            timeout=timeout,
            transport=transport
            or httpx.AsyncHTTPTransport(
                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
            ),
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def snapshot(self) -> tuple[StationSnapshot, str]:
        response = await self._client.get(f"/v1/stations/{self.station}/snapshot")
        response.raise_for_status()
        return StationSnapshot.model_validate_json(response.content), response.text

    # The batch envelope's version; each item keeps the version it was journaled with (a v2
    # batch may hold v1 items from before an upgrade).
    UPLOAD_SCHEMA_VERSION = 2

    async def upload(self, sales: list[dict[str, object]]) -> httpx.Response:
        return await self._client.post(
            f"/v1/stations/{self.station}/sales:batch",
            json={"schema_version": self.UPLOAD_SCHEMA_VERSION, "sales": sales},
        )

    async def upload_audit(self, records: list[dict[str, Any]]) -> httpx.Response:
        return await self._client.post(
            f"/v1/stations/{self.station}/audit:batch", json={"records": records}
        )


@dataclass
class SnapshotKeeper:
    """Holds the snapshot in force; pulls new versions and persists them; starts offline."""

    journal: Journal
    hq: HqClient
    current: StationSnapshot | None = None
    source: str = "none"  # "hq" or "journal"
    last_error: str | None = None

    async def load(self) -> StationSnapshot | None:
        """Try HQ first, fall back to the newest persisted snapshot."""
        if await self.refresh():
            return self.current
        stored = await self.journal.latest_snapshot()
        if stored is not None and self.current is None:
            self.current = StationSnapshot.model_validate_json(stored)
            self.source = "journal"
            log.warning(
                "edge.snapshot_from_journal", version=self.current.version, error=self.last_error
            )
        return self.current

    async def refresh(self) -> bool:
        try:
            snapshot, body = await self.hq.snapshot()
        except httpx.HTTPStatusError as exc:
            status = exc.response.status_code
            if status in (401, 403):
                self.last_error = (
                    f"credential rejected by HQ (HTTP {status}): check FORECOURT_EDGE_CREDENTIAL "
                    "(forecourt credential STATION issues a new one)"
                )
            else:
                self.last_error = f"HQ answered HTTP {status} for the snapshot"
            return False
        except (httpx.HTTPError, ValueError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            return False
        self.last_error = None
        await self.journal.save_snapshot(snapshot.version, body)
        known = self.current.version if self.current is not None else 0
        if snapshot.version >= known:  # never step back to an older network revision
            if snapshot.version > known:
                log.info("edge.snapshot_loaded", version=snapshot.version)
            self.current = snapshot
            self.source = "hq"
        return True


@dataclass
class UploadStats:
    uploaded: int = 0  # items HQ answered other than refused: they left the outbox
    batches: int = 0  # batches HQ answered item by item
    failures: int = 0  # batch-level failures (no item changed)
    refused: int = 0  # items HQ refused: kept, out of the pending set
    conflicts: int = 0
    last_error: str | None = None
    alarm: str | None = None  # the batch-level problem in force; None once uploads go through
    statuses: dict[str, int] = field(default_factory=dict)


@dataclass
class AuditUploadStats:
    uploaded: int = 0  # records HQ's trail holds now (created or duplicate): left the edge
    duplicates: int = 0  # of those, already held (an earlier upload's answer was lost)
    refused: int = 0  # records HQ refused: kept, marked, out of the pending set
    failures: int = 0  # batch-level failures (no record changed)
    last_error: str | None = None
    alarm: str | None = None


AUDIT_STATUSES = frozenset({"created", "duplicate", "refused"})


class SyncAgent(BackgroundService):
    task_name = "edge-sync"

    def __init__(
        self,
        journal: Journal,
        hq: HqClient,
        *,
        batch_size: int = 200,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 30.0,
        idle_s: float = 0.2,
        budget_bytes: int = 512 * 1024 * 1024,
        alarm_ratios: tuple[float, ...] = (0.5, 0.8),
        journal_budget_bytes: int = 0,
        min_free_bytes: int = 0,
        free_bytes: Callable[[Path], int] = lambda path: shutil.disk_usage(path).free,
        on_disk_low: Callable[[], None] = lambda: None,
    ) -> None:
        self.journal = journal
        self.hq = hq
        self.batch_size = batch_size
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.idle_s = idle_s
        self.budget_bytes = budget_bytes
        self.alarm_ratios = tuple(sorted(alarm_ratios))
        self.alarm_level = 0  # how many thresholds the outbox has crossed
        # The journal on disk (main file + WAL) against its own budget, 0 = not watched; and
        # the filesystem's free space, 0 = not watched. Both alarm; neither stops selling.
        self.journal_budget_bytes = journal_budget_bytes
        self.journal_alarm_level = 0
        self.min_free_bytes = min_free_bytes
        self.free_bytes = free_bytes
        self.on_disk_low = on_disk_low
        self.disk_low = False
        self.storage: StorageUsage | None = None
        self.stats = UploadStats()
        self.audit_stats = AuditUploadStats()
        self._audit_limit = BatchLimit(min(batch_size, 500))  # HQ takes 500 records at most
        self._audit_attempt = 0
        self._audit_not_before = 0.0  # monotonic: the audit upload's own back-off
        self.wake = asyncio.Event()
        self._attempt = 0
        self._sales_limit = BatchLimit(batch_size)
        self.budget_check_s = 5.0
        self._next_budget_check = 0.0

    async def check_budget(self) -> tuple[int, int, int]:
        """Alarm on the outbox (bytes waiting for HQ), the journal on disk and free space.
        Only alarms: the dispenser is the legal meter, selling never waits on the budget."""
        pending, size, rejected = await self.journal.outbox_usage()
        await self._check_storage()
        ratio = size / self.budget_bytes if self.budget_bytes else 0.0
        level = sum(1 for r in self.alarm_ratios if ratio >= r)
        if level != self.alarm_level:
            if level > self.alarm_level:
                log.error(
                    "edge.outbox_budget_alarm",
                    level=level,
                    used_bytes=size,
                    budget_bytes=self.budget_bytes,
                    ratio=round(ratio, 3),
                    pending=pending,
                )
            else:
                log.info("edge.outbox_budget_cleared", level=level, ratio=round(ratio, 3))
            self.alarm_level = level
        return pending, size, rejected

    async def _check_storage(self) -> None:
        db_bytes, wal_bytes = self.journal.disk_bytes()
        free = await asyncio.to_thread(self.free_bytes, self.journal.path.parent)
        self.storage = StorageUsage(db_bytes, wal_bytes, free)
        used = db_bytes + wal_bytes
        ratio = used / self.journal_budget_bytes if self.journal_budget_bytes else 0.0
        level = sum(1 for r in self.alarm_ratios if ratio >= r)
        if level > self.journal_alarm_level:
            log.error(
                "edge.journal_budget_alarm",
                level=level,
                journal_bytes=db_bytes,
                wal_bytes=wal_bytes,
                budget_bytes=self.journal_budget_bytes,
                ratio=round(ratio, 3),
            )
        elif level < self.journal_alarm_level:
            log.info("edge.journal_budget_cleared", level=level, ratio=round(ratio, 3))
        self.journal_alarm_level = level
        low = self.min_free_bytes > 0 and free < self.min_free_bytes
        if low and not self.disk_low:
            log.error("edge.disk_space_low", free_bytes=free, min_free_bytes=self.min_free_bytes)
            self.on_disk_low()  # retention at once rather than at its next interval
        elif self.disk_low and not low:
            log.info("edge.disk_space_recovered", free_bytes=free)
        self.disk_low = low

    @property
    def upload_alarm(self) -> str | None:
        """The batch-level upload problem in force (credential refused, batch refused, HQ
        unreachable …); None once a batch goes through. In the status as ``uploads.alarm``.
        (``alarm`` is the supervisor's: the task crashed.)"""
        return self.stats.alarm

    async def upload_once(self) -> int:
        """Upload one batch; returns how many outbox items HQ gave its verdict on (they left
        the pending set), 0 when idle or when the batch failed as a whole."""
        items = await self.journal.pending_uploads(self._sales_limit.size)
        if not items:
            return 0
        try:
            response = await self.hq.upload([i.payload for i in items])
        except httpx.HTTPError as exc:
            self._failed(items, "HQ unreachable", f"{type(exc).__name__}: {exc}")
            return 0
        crash_point("edge.mid_upload")
        if response.status_code != 200:
            self._batch_refused(items, response)
            return 0
        verdicts = _verdicts(items, response)
        if isinstance(verdicts, str):
            self._failed(items, "HQ answer unreadable", verdicts)
            return 0
        answered: list[tuple[str, str, list[str]]] = []
        unknown: list[str] = []
        for item, result in verdicts:
            status = result["status"]
            self.stats.statuses[status] = self.stats.statuses.get(status, 0) + 1
            if status == "refused":
                await self._refused(item, result.get("errors"))
            elif status in ANSWERED:
                answered.append((item.sale_id, status, list(result.get("flags") or [])))
                if status == "conflict":
                    self.stats.conflicts += 1
                    log.error(
                        "edge.upload_conflict",
                        station=self.hq.station,
                        sale_id=item.sale_id,
                        seq=item.seq,
                    )
            else:  # a verdict this edge does not know: keep the item pending, ask a person
                unknown.append(status)
        if answered:
            await self.journal.record_answers(answered)
        self.stats.uploaded += len(answered)
        self.stats.batches += 1
        self._sales_limit.succeeded()
        if unknown:
            self._failed([], "HQ answer unreadable", f"unknown statuses {sorted(set(unknown))}")
        else:
            self._attempt = 0
            self._set_alarm(None)
            self.stats.last_error = None  # recovered: the status shows no stale error
        return len(verdicts) - len(unknown)

    @property
    def audit_batch_size(self) -> int:
        """How many audit records the next upload takes (halved on 413, grown back)."""
        return self._audit_limit.size

    async def upload_audit_once(self) -> int:
        """Upload one batch of audit records; how many left the pending set (0 when idle,
        backing off, or when the batch failed as a whole)."""
        if time.monotonic() < self._audit_not_before:
            return 0
        items = await self.journal.pending_audit(self._audit_limit.size)
        if not items:
            return 0
        try:
            response = await self.hq.upload_audit([i.payload for i in items])
        except httpx.HTTPError as exc:
            self._audit_failed("HQ unreachable", f"{type(exc).__name__}: {exc}")
            return 0
        crash_point("edge.mid_audit_upload")
        if response.status_code != 200:
            code = _error_code(response)
            if response.status_code == 413:
                self._audit_limit.refused(len(items))
            self._audit_failed(
                f"audit upload refused by HQ: {code}",
                f"HTTP {response.status_code}: {response.text[:300]}",
            )
            return 0
        statuses = _audit_statuses(len(items), response)
        if isinstance(statuses, str):
            self._audit_failed("HQ audit answer unreadable", statuses)
            return 0
        delivered: list[int] = []
        refused: dict[int, str] = {}
        for item, (status, errors) in zip(items, statuses, strict=True):
            if status == "refused":
                refused[item.id] = f"refused by HQ: {json.dumps(errors, default=str)}"
                log.error(
                    "edge.audit_record_refused",
                    station=self.hq.station,
                    record_id=item.record_id,
                    errors=errors,
                )
            else:
                delivered.append(item.id)
                if status == "duplicate":
                    self.audit_stats.duplicates += 1
        await self.journal.audit_answered(delivered, refused)
        self._audit_limit.succeeded()
        self.audit_stats.uploaded += len(delivered)
        self.audit_stats.refused += len(refused)
        self._audit_attempt = 0
        self.audit_stats.last_error = None
        if self.audit_stats.alarm is not None:
            log.info("edge.audit_upload_alarm_cleared", was=self.audit_stats.alarm)
            self.audit_stats.alarm = None
        return len(items)

    def _audit_failed(self, alarm: str, detail: str) -> None:
        """A batch-level audit upload failure: no record changes; back off on its own."""
        self.audit_stats.failures += 1
        self.audit_stats.last_error = f"{alarm} ({detail})"
        self._audit_attempt += 1
        cap = self.backoff_cap(self._audit_attempt)
        self._audit_not_before = time.monotonic() + random.uniform(0, cap)
        if alarm != self.audit_stats.alarm:
            log.error("edge.audit_upload_alarm", station=self.hq.station, alarm=alarm)
            self.audit_stats.alarm = alarm
        log.warning("edge.audit_upload_failed", alarm=alarm, error=detail)

    async def _refused(self, item: PendingUpload, errors: object) -> None:
        """HQ's verdict that this item is not a valid sale: kept, out of the pending set."""
        detail = json.dumps(errors, default=str)
        await self.journal.record_failure([item.seq], f"refused by HQ: {detail}", reject=True)
        self.stats.refused += 1
        log.error(
            "edge.sale_refused",
            station=self.hq.station,
            sale_id=item.sale_id,
            seq=item.seq,
            errors=errors,
        )

    def _batch_refused(self, items: list[PendingUpload], response: httpx.Response) -> None:
        """An HTTP error about the whole batch: no item is judged, so none changes."""
        status = response.status_code
        code = _error_code(response)
        if status in (401, 403):
            alarm = f"credential rejected by HQ: {code}"
        elif status == 429:
            alarm = f"HQ is throttling uploads: {code}"
        elif status >= 500:
            alarm = f"HQ failing: {code}"
        else:
            alarm = f"upload refused by HQ: {code}"
        if status == 413:  # too large for HQ (or a proxy before it): smaller batches
            self._sales_limit.refused(len(items))
        self._failed(items, alarm, f"HTTP {status}: {response.text[:300]}")

    def _failed(self, items: list[PendingUpload], alarm: str, detail: str) -> None:
        """A batch-level failure: count it, back off, raise the alarm. Never touches items."""
        self.stats.failures += 1
        self.stats.last_error = f"{alarm} ({detail})"
        self._attempt += 1
        self._set_alarm(alarm)
        log.warning(
            "edge.upload_failed",
            alarm=alarm,
            error=detail,
            attempt=self._attempt,
            pending=len(items),
        )

    def _set_alarm(self, alarm: str | None) -> None:
        """Logged when it changes, not on every retry."""
        if alarm == self.stats.alarm:
            return
        if alarm is not None:
            log.error("edge.upload_alarm", station=self.hq.station, alarm=alarm)
        else:
            log.info("edge.upload_alarm_cleared", station=self.hq.station, was=self.stats.alarm)
        self.stats.alarm = alarm

    def backoff_cap(self, attempt: int | None = None) -> float:
        """The longest wait before the next try: min(max, initial × 2^failed attempts)
        (the sales upload's attempts unless ``attempt`` is given)."""
        failed = self._attempt if attempt is None else attempt
        return min(self.backoff_max_s, self.backoff_initial_s * 2 ** min(failed, 20))

    def backoff(self) -> float:
        """Full jitter: uniform in [0, :meth:`backoff_cap`]."""
        return random.uniform(0, self.backoff_cap())

    async def run(self) -> None:
        while True:
            try:
                if time.monotonic() >= self._next_budget_check:
                    # Summing a large offline backlog is not free: a few times a minute is enough.
                    self._next_budget_check = time.monotonic() + self.budget_check_s
                    await self.check_budget()
                n = await self.upload_once()
                n += await self.upload_audit_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the agent must outlive any one failure
                log.exception("edge.sync_error", error=str(exc))
                self._failed([], "sync agent error", f"{type(exc).__name__}: {exc}")
                n = 0
            if n:
                continue
            if self._attempt:
                await asyncio.sleep(self.backoff())  # HQ is struggling: do not hammer it
            else:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=self.idle_s)


# HQ's verdicts after which an item leaves the outbox (``refused`` keeps it, marked).
ANSWERED = frozenset({"created", "duplicate", "quarantined", "conflict"})
REGROW_AFTER_BATCHES = 50


class BatchLimit:
    """A batch size halved on 413 and doubled back (up to its maximum) after
    :data:`REGROW_AFTER_BATCHES` successes in a row: a size limit is usually static, and every
    413 costs a back-off, so bigger batches are tried again only now and then."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.size = maximum
        self._successes = 0

    def refused(self, tried: int) -> None:
        """HQ (or a proxy before it) answered 413 to ``tried`` items."""
        self.size = max(1, tried // 2)
        self._successes = 0

    def succeeded(self) -> None:
        if self.size >= self.maximum:
            return
        self._successes += 1
        if self._successes >= REGROW_AFTER_BATCHES:
            self.size = min(self.maximum, self.size * 2)
            self._successes = 0


def _verdicts(
    items: list[PendingUpload], response: httpx.Response
) -> list[tuple[PendingUpload, dict[str, Any]]] | str:
    """Pair each item with HQ's result for it (by ``index``; by position from an HQ that
    sends none), or say why the answer cannot be trusted item by item."""
    try:
        results = response.json()["results"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"no results: {type(exc).__name__}: {exc}"
    if not isinstance(results, list) or len(results) != len(items):
        return f"{len(results) if isinstance(results, list) else 'no'} results for {len(items)}"
    paired: dict[int, tuple[PendingUpload, dict[str, Any]]] = {}
    for position, result in enumerate(results):
        if not isinstance(result, dict) or not isinstance(result.get("status"), str):
            return f"result {position} has no status"
        index = result.get("index", position)
        if type(index) is not int or not 0 <= index < len(items) or index in paired:
            return f"result {position} has index {index!r}"
        item = items[index]
        sale_id = result.get("sale_id")
        if sale_id is not None and str(sale_id).lower() != item.sale_id.lower():
            return f"result {position} is for {sale_id}, item {index} is {item.sale_id}"
        paired[index] = (item, result)
    return [paired[i] for i in range(len(items))]


def _audit_statuses(count: int, response: httpx.Response) -> list[tuple[str, Any]] | str:
    """HQ's (status, errors) for each uploaded record in upload order, or why the answer
    cannot be trusted record by record."""
    try:
        results = response.json()["results"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"no results: {type(exc).__name__}: {exc}"
    if not isinstance(results, list) or len(results) != count:
        return f"{len(results) if isinstance(results, list) else 'no'} results for {count}"
    found: dict[int, tuple[str, Any]] = {}
    for position, result in enumerate(results):
        if not isinstance(result, dict) or result.get("status") not in AUDIT_STATUSES:
            return f"result {position} has no known status"
        index = result.get("index", position)
        if type(index) is not int or not 0 <= index < count or index in found:
            return f"result {position} has index {index!r}"
        found[index] = (result["status"], result.get("errors"))
    return [found[i] for i in range(count)]


def _error_code(response: httpx.Response) -> str:
    """The stable code of an HQ error envelope, or the bare HTTP status (a proxy's page)."""
    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
        code = response.json()["error"]["code"]
        if isinstance(code, str):
            return code
    return f"http_{response.status_code}"
