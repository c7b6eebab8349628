"""Talking to HQ: the snapshot puller and the sales upload agent (store-and-forward).

The station never stops recording while HQ is away: the controller journals locally and this
agent uploads outbox batches whenever HQ answers, with exponential backoff and full jitter.
HQ's per-sale answer is recorded and the item leaves the outbox, so nothing answered is ever
sent again. A batch HQ refuses as schema-invalid (422) is split in halves until the single
offending sale is found; that one is kept, marked rejected and alarmed, and never blocks the
others.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from dataclasses import dataclass, field

import httpx

from forecourt.edge.journal import Journal, PendingUpload
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

    async def upload(self, sales: list[dict[str, object]]) -> httpx.Response:
        return await self._client.post(
            f"/v1/stations/{self.station}/sales:batch",
            json={"schema_version": 1, "sales": sales},
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
        except (httpx.HTTPError, ValueError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            return False
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
    uploaded: int = 0
    batches: int = 0
    failures: int = 0
    rejected: int = 0
    conflicts: int = 0
    last_error: str | None = None
    statuses: dict[str, int] = field(default_factory=dict)


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
        self.stats = UploadStats()
        self.wake = asyncio.Event()
        self._attempt = 0
        self._limit = batch_size
        self.budget_check_s = 5.0
        self._next_budget_check = 0.0

    async def check_budget(self) -> tuple[int, int, int]:
        pending, size, rejected = await self.journal.outbox_usage()
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

    async def upload_once(self) -> int:
        """Upload one batch; returns how many outbox items moved on (answered, rejected, or a
        bisection step taken), 0 when idle or when the upload failed."""
        items = await self.journal.pending_uploads(self._limit)
        if not items:
            return 0
        try:
            response = await self.hq.upload([i.payload for i in items])
        except httpx.HTTPError as exc:
            await self._failed(items, f"transport: {type(exc).__name__}: {exc}")
            return 0
        crash_point("edge.mid_upload")
        if response.status_code == 200:
            body = response.json()
            answers = [(r["sale_id"], r["status"], r.get("flags", [])) for r in body["results"]]
            await self.journal.record_answers(answers)
            for _, status, _ in answers:
                self.stats.statuses[status] = self.stats.statuses.get(status, 0) + 1
                if status == "conflict":
                    self.stats.conflicts += 1
                    log.error("edge.upload_conflict", station=self.hq.station)
            self.stats.uploaded += len(answers)
            self.stats.batches += 1
            self._attempt = 0
            self._limit = self.batch_size
            return len(answers)
        if response.status_code == 422:
            if len(items) > 1:
                self._limit = max(1, len(items) // 2)  # bisect toward the offending sale
                return 1
            await self.journal.record_failure([items[0].seq], response.text, reject=True)
            self.stats.rejected += 1
            self._limit = self.batch_size
            log.error(
                "edge.sale_rejected",
                sale_id=items[0].sale_id,
                seq=items[0].seq,
                answer=response.text[:500],
            )
            return 1
        await self._failed(items, f"HTTP {response.status_code}: {response.text[:300]}")
        return 0

    async def _failed(self, items: list[PendingUpload], error: str) -> None:
        self.stats.failures += 1
        self.stats.last_error = error
        self._attempt += 1
        await self.journal.record_failure([i.seq for i in items], error)
        log.warning("edge.upload_failed", error=error, attempt=self._attempt, pending=len(items))

    def backoff(self) -> float:
        """Full jitter: uniform in [0, min(max, initial × 2^attempt)]."""
        cap = min(self.backoff_max_s, self.backoff_initial_s * 2 ** min(self._attempt, 20))
        return random.uniform(0, cap)

    async def run(self) -> None:
        while True:
            try:
                if time.monotonic() >= self._next_budget_check:
                    # Summing a large offline backlog is not free: a few times a minute is enough.
                    self._next_budget_check = time.monotonic() + self.budget_check_s
                    await self.check_budget()
                n = await self.upload_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the agent must outlive any one failure
                log.exception("edge.sync_error", error=str(exc))
                self._attempt += 1
                n = 0
            if n:
                continue
            if self._attempt:
                await asyncio.sleep(self.backoff())  # HQ is struggling: do not hammer it
            else:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=self.idle_s)
