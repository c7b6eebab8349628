"""One station's edge node: journal, snapshot, controller, sync agent and its HTTP app."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Gauge

from forecourt import __version__
from forecourt.edge.controller import ForecourtController
from forecourt.edge.drivers import ForecourtDriver
from forecourt.edge.journal import Journal
from forecourt.edge.retention import JournalRetention
from forecourt.edge.sync import HqClient, SnapshotKeeper, SyncAgent
from forecourt.infra.background import BackgroundService, SupervisedTask
from forecourt.infra.http import install_common
from forecourt.infra.logging import get_logger
from forecourt.kernel.clock import Clock
from forecourt.network.contracts import StationSnapshot
from forecourt.settings import EdgeSettings

DriverFactory = Callable[[StationSnapshot], ForecourtDriver]

log = get_logger("forecourt.edge")


@dataclass
class EdgeNode:
    settings: EdgeSettings
    clock: Clock
    driver_factory: DriverFactory
    journal: Journal
    hq: HqClient
    snapshots: SnapshotKeeper
    controller: ForecourtController
    sync: SyncAgent
    registry: CollectorRegistry
    app: FastAPI = field(init=False)
    driver: ForecourtDriver | None = None
    started: bool = False
    retention: JournalRetention | None = None
    snapshot_refresh: SupervisedTask = field(init=False)

    def __post_init__(self) -> None:
        self.snapshot_refresh = SupervisedTask("edge-snapshots", self._refresh_snapshots)

    def services(self) -> list[BackgroundService]:
        """Every supervised background task of the node."""
        tasks: list[BackgroundService] = [self.controller, self.sync, self.snapshot_refresh]
        return tasks if self.retention is None else [*tasks, self.retention]

    async def start(self) -> None:
        """Open the journal, take the snapshot (from HQ, else the newest persisted one),
        connect the forecourt controller, recover unclosed transactions, then run."""
        await self.journal.open()
        snapshot = await self.snapshots.load()
        while snapshot is None:
            # No snapshot from HQ and none persisted: the station cannot price a sale yet.
            log.warning("edge.waiting_for_first_snapshot", error=self.snapshots.last_error)
            await asyncio.sleep(1.0)
            snapshot = await self.snapshots.load()
        self.driver = self.driver_factory(snapshot)
        await self.driver.open()
        self.controller.driver = self.driver
        # No waiting for the forecourt: pumps that do not answer yet are recovered (their
        # unclosed and closed-elsewhere sales journaled) by the controller loop when they do.
        self.controller.start()
        self.sync.start()
        self.snapshot_refresh.start()
        if self.retention is not None:
            self.retention.start()
        self.started = True

    async def _refresh_snapshots(self) -> None:
        while True:
            await asyncio.sleep(self.settings.snapshot_refresh_s)
            if not await self.snapshots.refresh():
                log.warning("edge.snapshot_refresh_failed", error=self.snapshots.last_error)

    async def stop_selling(self) -> None:
        """Stop polling the forecourt (used at shutdown after pumps are idle)."""
        await self.controller.stop()

    async def drain(self, timeout_s: float) -> bool:
        """Upload until the outbox is empty or the timeout passes; True when empty."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            pending, _, rejected = await self.journal.outbox_usage()
            if pending - rejected == 0:
                return True
            self.sync.wake.set()
            await asyncio.sleep(0.05)
        return False

    async def stop(self) -> None:
        await self.snapshot_refresh.stop()
        if self.retention is not None:
            await self.retention.stop()
        await self.controller.stop()
        await self.sync.stop()
        if self.driver is not None:
            await self.driver.close()
        await self.hq.close()
        await self.journal.close()
        self.started = False

    async def status(self) -> dict[str, Any]:
        pending, size, rejected = await self.journal.outbox_usage()
        snap = self.snapshots.current
        return {
            "station": self.settings.station,
            "snapshot_version": snap.version if snap else None,
            "snapshot_source": self.snapshots.source,
            "fuelling_points": self.controller.states(),
            "outbox": {
                "pending": pending,
                "bytes": size,
                "rejected": rejected,
                "budget_bytes": self.sync.budget_bytes,
                "alarm_level": self.sync.alarm_level,
            },
            "controller": self.controller.stats.__dict__,
            "device": {
                "device_id": self.controller.device_id or None,
                "epoch": self.controller.epoch,
                "reachable": self.controller.reachable,
                "boot_marker": (
                    self.controller.identity.boot_marker if self.controller.identity else None
                ),
            },
            "alarms": self.alarms(),
            "uploads": dict(self.sync.stats.__dict__),
            "storage": self._storage_status(),
            "tasks": {s.task_name: s.health() for s in self.services()},
        }

    def alarms(self) -> list[dict[str, Any]]:
        """Every active alarm of this edge, one list: forecourt, uploads, storage, tasks."""
        found = list(self.controller.alarms.as_json())
        sync = self.sync
        if self.snapshots.last_error and "credential rejected" in self.snapshots.last_error:
            found.append({"name": "credential", "message": self.snapshots.last_error})
        if sync.upload_alarm:
            found.append({"name": "upload", "message": sync.upload_alarm})
        if sync.alarm_level:
            found.append(
                {"name": "outbox_budget", "message": f"outbox budget level {sync.alarm_level}"}
            )
        if sync.journal_alarm_level:
            found.append(
                {
                    "name": "journal_budget",
                    "message": f"journal budget level {sync.journal_alarm_level}",
                }
            )
        if sync.disk_low:
            found.append({"name": "disk_low", "message": "free disk below the minimum"})
        for service in self.services():
            health = service.health()
            if health.get("alarm"):
                found.append(
                    {
                        "name": f"task_{service.task_name}",
                        "message": f"{service.task_name} crashed and was restarted",
                        "details": {"last_error": health.get("last_error")},
                    }
                )
        return found

    def _storage_status(self) -> dict[str, Any]:
        usage = self.sync.storage  # measured with the outbox budget, a few times a minute
        return {
            "journal_bytes": usage.journal_bytes if usage else None,
            "wal_bytes": usage.wal_bytes if usage else None,
            "free_bytes": usage.free_bytes if usage else None,
            "journal_budget_bytes": self.sync.journal_budget_bytes,
            "journal_alarm_level": self.sync.journal_alarm_level,
            "min_free_bytes": self.sync.min_free_bytes,
            "disk_low": self.sync.disk_low,
            "retention": (
                {
                    "archive_dir": str(self.retention.archive.directory),
                    "retention_days": self.retention.retention.days,
                    **self.retention.stats.__dict__,
                }
                if self.retention is not None
                else None
            ),
        }


def build_edge_node(
    settings: EdgeSettings, clock: Clock, driver_factory: DriverFactory
) -> EdgeNode:
    journal = Journal(settings.journal_path, clock)
    hq = HqClient(settings.hq_url, settings.station, settings.credential.get_secret_value())
    snapshots = SnapshotKeeper(journal, hq)
    retention = JournalRetention(
        journal,
        clock,
        archive_dir=settings.archive_dir,
        retention_days=settings.retention_days,
        interval_s=settings.retention_interval_s,
        batch_rows=settings.retention_batch_rows,
    )
    sync = SyncAgent(
        journal,
        hq,
        batch_size=settings.sync_batch_size,
        backoff_initial_s=settings.sync_backoff_initial_s,
        backoff_max_s=settings.sync_backoff_max_s,
        budget_bytes=settings.outbox_budget_bytes,
        alarm_ratios=tuple(settings.outbox_alarm_ratios),
        journal_budget_bytes=(
            settings.outbox_budget_bytes
            if settings.journal_budget_bytes is None
            else settings.journal_budget_bytes
        ),
        min_free_bytes=settings.min_free_disk_bytes,
        on_disk_low=retention.request,
    )
    controller = ForecourtController(
        None,
        journal,
        lambda: snapshots.current,
        clock,
        poll_interval_s=settings.poll_interval_s,
        auto_settle=settings.auto_settle,
        on_journaled=sync.wake.set,
        actor=f"edge:{settings.station}",
    )
    registry = CollectorRegistry()
    node = EdgeNode(
        settings,
        clock,
        driver_factory,
        journal,
        hq,
        snapshots,
        controller,
        sync,
        registry,
        retention=retention,
    )

    Gauge(
        "forecourt_edge_journaled", "Sales journaled by this edge since start", registry=registry
    ).set_function(lambda: controller.stats.journaled)
    Gauge(
        "forecourt_edge_uploaded", "Sales answered by HQ since start", registry=registry
    ).set_function(lambda: sync.stats.uploaded)
    Gauge(
        "forecourt_edge_upload_failures", "Failed upload attempts since start", registry=registry
    ).set_function(lambda: sync.stats.failures)
    Gauge(
        "forecourt_edge_outbox_alarm_level",
        "Outbox disk-budget thresholds crossed",
        registry=registry,
    ).set_function(lambda: sync.alarm_level)
    Gauge(
        "forecourt_edge_journal_alarm_level",
        "Journal-on-disk budget thresholds crossed",
        registry=registry,
    ).set_function(lambda: sync.journal_alarm_level)
    Gauge(
        "forecourt_edge_journal_disk_bytes",
        "Journal database file plus WAL on disk",
        registry=registry,
    ).set_function(
        lambda: sync.storage.journal_bytes + sync.storage.wal_bytes if sync.storage else 0
    )
    Gauge(
        "forecourt_edge_disk_free_bytes",
        "Free space on the journal's filesystem",
        registry=registry,
    ).set_function(lambda: sync.storage.free_bytes if sync.storage else 0)
    Gauge(
        "forecourt_edge_disk_low", "1 while free space is below the minimum", registry=registry
    ).set_function(lambda: int(sync.disk_low))
    Gauge(
        "forecourt_edge_archived", "Sales moved to the archive since start", registry=registry
    ).set_function(lambda: retention.stats.deleted)
    restarts = Gauge(
        "forecourt_edge_task_restarts",
        "Restarts of a background task after a crash",
        ["task"],
        registry=registry,
    )
    for service in node.services():
        restarts.labels(task=service.task_name).set_function(partial(getattr, service, "restarts"))
    Gauge(
        "forecourt_edge_alarms_active", "Edge alarms raised and not cleared", registry=registry
    ).set_function(lambda: len(controller.alarms.active))
    for stat, text in (
        ("epoch_changes", "Controller epochs begun (restart, swap, wrap) since start"),
        ("refused_moves", "Fuelling-point moves refused as impossible since start"),
        ("close_failures", "Failed closes of finished transactions since start"),
        ("recovered_from_report", "Sales found in the controller's report since start"),
        ("totalizer_gaps", "Nozzle totalizer gaps between journaled sales since start"),
    ):
        Gauge(f"forecourt_edge_{stat}", text, registry=registry).set_function(
            lambda stat=stat: getattr(controller.stats, stat)  # type: ignore[misc]
        )
    outbox_pending = Gauge(
        "forecourt_edge_outbox_pending", "Sales waiting for upload", registry=registry
    )
    outbox_bytes = Gauge(
        "forecourt_edge_outbox_bytes", "Bytes waiting for upload", registry=registry
    )

    async def ready() -> dict[str, bool]:
        pending, size, _ = await journal.outbox_usage() if node.started else (0, 0, 0)
        outbox_pending.set(pending)
        outbox_bytes.set(size)
        return {"started": node.started, "snapshot": snapshots.current is not None}

    app = FastAPI(title=f"Forecourt edge {settings.station}", version=__version__)
    install_common(app, registry, ready)

    @app.get("/v1/status")
    async def status() -> dict[str, Any]:
        return await node.status()

    @app.get("/v1/journal/summary")
    async def journal_summary() -> list[dict[str, Any]]:
        return await journal.summary()

    node.app = app
    return node


def jsonpts_factory(settings: EdgeSettings) -> DriverFactory:
    """A driver factory for a PTS-2 controller; its clock zone and currency come from the
    station snapshot, its decimals from the settings (they are configured in the device)."""

    def make(snapshot: StationSnapshot) -> ForecourtDriver:
        from forecourt.protocols.jsonpts.driver import JsonPtsDriver

        return JsonPtsDriver(
            settings.controller_url,
            settings.controller_user,
            settings.controller_password.get_secret_value(),
            timezone=snapshot.station.timezone,
            currency=snapshot.currency,
            volume_decimals=settings.controller_volume_decimals,
            amount_decimals=settings.controller_amount_decimals,
            price_decimals=settings.controller_price_decimals,
            auth_scheme=settings.controller_auth,
        )

    return make
