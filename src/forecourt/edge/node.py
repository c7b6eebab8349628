"""One station's edge node: journal, snapshot, controller, sync agent and its HTTP app."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry, Gauge

from forecourt import __version__
from forecourt.edge.cashiers import EdgeAuthenticator, StaffKeys, StaffTokens, refusal_recorder
from forecourt.edge.commands import (
    AuthoriseRequest,
    CommandLine,
    PumpCommands,
    TerminalAuthenticator,
)
from forecourt.edge.controller import ForecourtController
from forecourt.edge.drivers import DeviceConfig, ForecourtDriver, PumpDriver
from forecourt.edge.gauges import GaugeReader
from forecourt.edge.journal import Journal
from forecourt.edge.pos import CashUploader, PosHq, PosService, PosStore
from forecourt.edge.pos import build_router as pos_router
from forecourt.edge.prices import PriceSchedule
from forecourt.edge.retention import JournalRetention
from forecourt.edge.sync import HqClient, SnapshotKeeper, SyncAgent
from forecourt.edge.telemetry import TelemetryPublisher, telemetry_from_settings
from forecourt.edge.totalizers import TotalizerWatch
from forecourt.infra.access import install_access, require
from forecourt.infra.background import BackgroundService, SupervisedTask
from forecourt.infra.http import error_responses, install_common, json_too_deep
from forecourt.infra.logging import get_logger
from forecourt.kernel.access import Permission, Policy, PrincipalKind
from forecourt.kernel.clock import Clock
from forecourt.network.contracts import StationSnapshot
from forecourt.protocols.driver import (
    DeviceConfigError,
    DriverContext,
    create_gauge_driver,
    create_pump_driver,
    gauge_protocols,
    pump_protocols,
)
from forecourt.protocols.model import DriverUnavailable
from forecourt.protocols.store import FileDriverStore
from forecourt.settings import EdgeSettings

DriverFactory = Callable[[StationSnapshot], ForecourtDriver]

ALARM_SWEEP_S = 5.0  # the computed alarms (uploads, storage, tasks) go to telemetry this often


@dataclass
class PumpLine:
    """One pump device line of the station: its configuration, driver and controller."""

    config: DeviceConfig | None  # None: the one controller given by a driver factory
    factory: DriverFactory
    controller: ForecourtController
    driver: ForecourtDriver | None = None
    totalizers: TotalizerWatch | None = None
    prices: PriceSchedule | None = None

    @property
    def name(self) -> str:
        return self.config.name if self.config else "controller"

    @property
    def protocol(self) -> str:
        return self.config.protocol if self.config else "jsonpts"

    def watchers(self) -> list[BackgroundService]:
        return [s for s in (self.totalizers, self.prices) if s is not None]


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
    lines: list[PumpLine] = field(default_factory=list)
    gauge_configs: list[DeviceConfig] = field(default_factory=list)
    gauges: list[GaugeReader] = field(default_factory=list)
    telemetry: TelemetryPublisher | None = None
    telemetry_alarms: SupervisedTask | None = None
    # Counter payments (forecourt.edge.pos): HQ's staff keys, the cash upload and its client.
    staff_keys: StaffKeys | None = None
    cash_upload: CashUploader | None = None
    pos_hq: PosHq | None = None

    def __post_init__(self) -> None:
        self.snapshot_refresh = SupervisedTask("edge-snapshots", self._refresh_snapshots)
        if not self.lines:
            self.lines = [PumpLine(None, self.driver_factory, self.controller)]
        if self.telemetry is not None:
            self.telemetry_alarms = SupervisedTask("edge-telemetry-alarms", self._publish_alarms)
        self._alarms_published: dict[tuple[str, str | None], dict[str, Any]] = {}

    @property
    def controllers(self) -> list[ForecourtController]:
        return [line.controller for line in self.lines]

    def services(self) -> list[BackgroundService]:
        """Every supervised background task of the node."""
        tasks: list[BackgroundService] = [
            *self.controllers,
            *(watcher for line in self.lines for watcher in line.watchers()),
            self.sync,
            self.snapshot_refresh,
            *self.gauges,
        ]
        if self.telemetry is not None and self.telemetry_alarms is not None:
            tasks += [self.telemetry, self.telemetry_alarms]
        tasks += [s for s in (self.staff_keys, self.cash_upload) if s is not None]
        return tasks if self.retention is None else [*tasks, self.retention]

    def _sink(self, line: PumpLine, snapshot: StationSnapshot) -> Callable[[Any], None]:
        """A pump line's driver events: to its controller, and to telemetry when it runs."""
        if self.telemetry is None:
            return line.controller.on_event
        return _both(line.controller.on_event, self.telemetry, line.protocol, snapshot.currency)

    async def _publish_alarms(self) -> None:
        """The alarms raised and cleared, to telemetry: at once when an alarm board changes,
        and every ``ALARM_SWEEP_S`` for the conditions the node computes (uploads, storage,
        tasks). A re-raise that only counts up is not sent again."""
        assert self.telemetry is not None
        changed = asyncio.Event()
        for board in [*(c.alarms for c in self.controllers), *(g.alarms for g in self.gauges)]:
            board.on_change(changed.set)
        while True:
            changed.clear()
            current = {(a["name"], a.get("device")): _uncounted(a) for a in self.alarms()}
            for key, alarm in current.items():
                if self._alarms_published.get(key) != alarm:
                    self._report_alarm(alarm, True)
            for key, alarm in self._alarms_published.items():
                if key not in current:
                    self._report_alarm(alarm, False)
            self._alarms_published = current
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), ALARM_SWEEP_S)

    def _report_alarm(self, alarm: dict[str, Any], active: bool) -> None:
        assert self.telemetry is not None
        self.telemetry.report_alarm(
            alarm["name"],
            active,
            alarm.get("message", ""),
            _alarm_time(alarm, self.clock),
            {**alarm.get("details", {}), "device": alarm.get("device")},
        )

    async def _open_pump_lines(self, snapshot: StationSnapshot) -> None:
        for line in self.lines:
            driver = line.factory(snapshot)
            line.driver = driver
            if isinstance(driver, PumpDriver):
                driver.subscribe(self._sink(line, snapshot))
            try:
                await driver.open()
            except DriverUnavailable as exc:
                # Its controller reports it offline and it is asked again at every poll.
                log.warning("edge.device_unavailable_at_start", device=line.name, error=str(exc))
            line.controller.driver = driver
        self.driver = self.lines[0].driver

    async def _open_gauges(self, snapshot: StationSnapshot) -> None:
        for config in self.gauge_configs:
            context = driver_context(config, self.settings, self.clock, snapshot)
            driver = create_gauge_driver(config, context)
            try:
                await driver.open()
            except DriverUnavailable as exc:
                log.warning("edge.device_unavailable_at_start", device=config.name, error=str(exc))
            reader = GaugeReader(
                driver,
                self.clock,
                interval_s=self.settings.gauge_interval_s,
                tanks=dict(config.tanks),
                journal=self.journal,
            )
            if self.telemetry is not None:
                driver.subscribe(
                    _both(reader.on_event, self.telemetry, config.protocol, snapshot.currency)
                )
            self.gauges.append(reader)
            reader.start()

    async def start(self) -> None:
        """Open the journal, take the snapshot (from HQ, else the newest persisted one),
        connect the forecourt controller, recover unclosed transactions, then run."""
        await self.journal.open()
        if self.staff_keys is not None:
            await self.staff_keys.load()  # the cached keys: a cashier signs in without HQ
            self.staff_keys.start()
        if self.telemetry is not None:
            self.telemetry.start()  # it does not wait for the broker: never on the sales path
        snapshot = await self.snapshots.load()
        while snapshot is None:
            # No snapshot from HQ and none persisted: the station cannot price a sale yet.
            log.warning("edge.waiting_for_first_snapshot", error=self.snapshots.last_error)
            await asyncio.sleep(1.0)
            snapshot = await self.snapshots.load()
        await self._open_pump_lines(snapshot)
        # No waiting for the forecourt: pumps that do not answer yet are recovered (their
        # unclosed and closed-elsewhere sales journaled) by the controller loop when they do.
        for controller in self.controllers:
            controller.start()
        for line in self.lines:
            for watcher in line.watchers():
                watcher.start()
        await self._open_gauges(snapshot)
        if self.telemetry_alarms is not None:
            self.telemetry_alarms.start()
        self.sync.start()
        if self.cash_upload is not None:
            self.cash_upload.start()
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
        for controller in self.controllers:
            await controller.stop()

    async def drain(self, timeout_s: float) -> bool:
        """Upload until the outbox (sales and audit records; HQ's refusals apart) is empty
        or the timeout passes; True when empty."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            pending, _, rejected = await self.journal.outbox_usage()
            audit_pending, _ = await self.journal.audit_usage()
            if pending - rejected == 0 and audit_pending == 0:
                return True
            self.sync.wake.set()
            await asyncio.sleep(0.05)
        return False

    async def stop(self) -> None:
        await self.snapshot_refresh.stop()
        if self.retention is not None:
            await self.retention.stop()
        for line in self.lines:
            for watcher in line.watchers():
                await watcher.stop()
        for controller in self.controllers:
            await controller.stop()
        for gauge in self.gauges:
            await gauge.stop()
        if self.telemetry_alarms is not None:
            await self.telemetry_alarms.stop()
        if self.telemetry is not None:
            await self.telemetry.stop()
        await self.sync.stop()
        for service in (self.cash_upload, self.staff_keys):
            if service is not None:
                await service.stop()
        for line in self.lines:
            if line.driver is not None:
                await line.driver.close()
        for gauge in self.gauges:
            await gauge.driver.close()
        self.gauges.clear()
        await self.hq.close()
        if self.pos_hq is not None:
            await self.pos_hq.close()
        await self.journal.close()
        self.started = False

    async def status(self) -> dict[str, Any]:
        pending, size, rejected = await self.journal.outbox_usage()
        audit_pending, audit_refused = await self.journal.audit_usage()
        snap = self.snapshots.current
        return {
            "station": self.settings.station,
            "snapshot_version": snap.version if snap else None,
            "snapshot_source": self.snapshots.source,
            "fuelling_points": self.fuelling_points(),
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
            "devices": [self._line_status(line) for line in self.lines],
            "tanks": [gauge.as_json() for gauge in self.gauges],
            "totalizers": [line.totalizers.as_json() for line in self.lines if line.totalizers],
            "prices": [line.prices.as_json() for line in self.lines if line.prices],
            "telemetry": self.telemetry.as_json() if self.telemetry else None,
            "alarms": self.alarms(),
            "uploads": dict(self.sync.stats.__dict__),
            "audit_uploads": {
                "pending": audit_pending,
                "refused_kept": audit_refused,
                **self.sync.audit_stats.__dict__,
            },
            "storage": self._storage_status(),
            "tasks": {s.task_name: s.health() for s in self.services()},
        }

    def fuelling_points(self) -> dict[int, str]:
        merged: dict[int, str] = {}
        for controller in self.controllers:
            merged.update(controller.states())
        return dict(sorted(merged.items()))

    def _line_status(self, line: PumpLine) -> dict[str, Any]:
        controller = line.controller
        driver = line.driver
        health = driver.health() if isinstance(driver, PumpDriver) else None
        return {
            "name": line.name,
            "protocol": line.config.protocol if line.config else None,
            "transport": line.config.transport if line.config else None,
            "pumps": controller.pumps(),
            "device_id": controller.device_id or None,
            "epoch": controller.epoch,
            "reachable": controller.reachable,
            "boot_marker": controller.identity.boot_marker if controller.identity else None,
            "health": (
                {
                    "state": health.state.value,
                    "reason": health.reason,
                    "frames_refused": health.frames_refused,
                    "timeouts": health.timeouts,
                }
                if health
                else None
            ),
            "stats": dict(controller.stats.__dict__),
            # A driver that runs its own line loop says how many rounds it made (DART).
            "line": line_stats()
            if callable(line_stats := getattr(driver, "line_stats", None))
            else None,
        }

    def alarms(self) -> list[dict[str, Any]]:
        """Every active alarm of this edge, one list: forecourt, uploads, storage, tasks."""
        found: list[dict[str, Any]] = []
        several = len(self.lines) > 1 or bool(self.gauges)
        for line in self.lines:
            for alarm in line.controller.alarms.as_json():
                found.append(alarm | {"device": line.name} if several else alarm)
        for gauge in self.gauges:
            found.extend(alarm | {"device": gauge.driver.name} for alarm in gauge.alarms.as_json())
        sync = self.sync
        if self.snapshots.last_error and "credential rejected" in self.snapshots.last_error:
            found.append({"name": "credential", "message": self.snapshots.last_error})
        if sync.upload_alarm:
            found.append({"name": "upload", "message": sync.upload_alarm})
        if sync.audit_stats.alarm:
            found.append({"name": "audit_upload", "message": sync.audit_stats.alarm})
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


# The edge's routes: a terminal (terminal_tokens) commands this station's pumps and reads it;
# a reader (reader_tokens) only reads it. Emergency stop is a permission of its own.
_EDGE = frozenset({PrincipalKind.TERMINAL})
READ = Policy(Permission.STATION_READ, station="self", kinds=_EDGE)
COMMAND = Policy(Permission.PUMPS_COMMAND, station="self", kinds=_EDGE)
EMERGENCY_STOP = Policy(Permission.PUMPS_EMERGENCY_STOP, station="self", kinds=_EDGE)


def build_edge_node(
    settings: EdgeSettings, clock: Clock, driver_factory: DriverFactory | None = None
) -> EdgeNode:
    """The station's edge node. Its devices come from ``settings.devices`` through the driver
    registry (one forecourt controller per pump device line, one reader per gauge), or, when
    no devices are configured, from one jsonPTS controller at ``controller_url``;
    ``driver_factory`` (tests) gives the one pump driver instead."""
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

    def new_controller(serves: frozenset[int] | None, device: str | None) -> ForecourtController:
        return ForecourtController(
            None,
            journal,
            lambda: snapshots.current,
            clock,
            poll_interval_s=settings.poll_interval_s,
            auto_settle=settings.auto_settle,
            on_journaled=sync.wake.set,
            actor=f"edge:{settings.station}",
            serves=serves,
            device=device,
        )

    pump_configs, gauge_configs = station_devices(settings)
    if driver_factory is not None or not pump_configs:
        lines = [
            PumpLine(None, driver_factory or jsonpts_factory(settings), new_controller(None, None))
        ]
    else:
        several = len(pump_configs) > 1
        lines = [
            PumpLine(
                config,
                registry_factory(config, settings, clock),
                new_controller(
                    # A line that names its pumps drives those only; the station's only line
                    # naming none drives every fuelling point of the snapshot.
                    frozenset(config.pumps) if config.pumps else None,
                    config.name if several else None,
                ),
            )
            for config in pump_configs
        ]
    for line in lines:
        watch = TotalizerWatch(line.controller, interval_s=settings.totalizer_check_interval_s)
        line.totalizers = watch
        line.prices = PriceSchedule(line.controller, tick_s=settings.price_check_interval_s)

        def journaled(watch: TotalizerWatch = watch) -> None:
            sync.wake.set()
            watch.sale_journaled()

        line.controller.on_journaled = journaled
    controller = lines[0].controller
    registry = CollectorRegistry()
    node = EdgeNode(
        settings,
        clock,
        lines[0].factory,
        journal,
        hq,
        snapshots,
        controller,
        sync,
        registry,
        retention=retention,
        lines=lines,
        gauge_configs=gauge_configs,
        telemetry=telemetry_from_settings(settings, clock),
    )
    pos_hq = PosHq(
        settings.hq_url,
        settings.station,
        settings.credential.get_secret_value(),
        settings.pos_hq_timeout_s,
    )
    pos_store = PosStore(journal)
    node.pos_hq = pos_hq
    node.staff_keys = StaffKeys(
        journal,
        clock,
        pos_hq.staff_keys,
        keys_file=settings.staff_keys_file,
        refresh_s=settings.staff_keys_refresh_s,
    )
    node.cash_upload = CashUploader(
        pos_store,
        pos_hq,
        batch_size=settings.pos_cash_batch_size,
        backoff_initial_s=settings.pos_upload_backoff_initial_s,
        backoff_max_s=settings.pos_upload_backoff_max_s,
    )
    pos = PosService(
        pos_store,
        pos_hq,
        lambda: node.controllers,
        wake_sync=sync.wake.set,
        wake_upload=node.cash_upload.wake.set,
        upload_sales=hq.upload,
        payment_wait_s=settings.pos_payment_wait_s,
        flush_timeout_s=settings.pos_hq_timeout_s,
    )

    Gauge(
        "forecourt_edge_journaled", "Sales journaled by this edge since start", registry=registry
    ).set_function(lambda: sum(c.stats.journaled for c in node.controllers))
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
    ).set_function(lambda: len(node.alarms()))
    for stat, text in (
        ("epoch_changes", "Controller epochs begun (restart, swap, wrap) since start"),
        ("refused_moves", "Fuelling-point moves refused as impossible since start"),
        ("close_failures", "Failed closes of finished transactions since start"),
        ("recovered_from_report", "Sales found in the controller's report since start"),
        ("totalizer_gaps", "Nozzle totalizer gaps between journaled sales since start"),
    ):
        Gauge(f"forecourt_edge_{stat}", text, registry=registry).set_function(
            lambda stat=stat: sum(  # type: ignore[misc]
                getattr(c.stats, stat) for c in node.controllers
            )
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
    install_common(app, registry, ready, metrics_policy=READ)
    app.state.station_code = settings.station
    terminals = TerminalAuthenticator(
        settings.station,
        {n: secret.get_secret_value() for n, secret in settings.terminal_tokens.items()},
        {n: secret.get_secret_value() for n, secret in settings.reader_tokens.items()},
    )
    staff = StaffTokens(
        node.staff_keys,
        clock,
        issuer=settings.staff_token_issuer,
        audience=settings.staff_token_audience,
        charge_roles=settings.pos_charge_roles,
    )

    async def region_of(station: str) -> str | None:
        snap = snapshots.current
        return snap.station.region if snap is not None and snap.station.code == station else None

    install_access(
        app,
        EdgeAuthenticator(terminals, staff),
        region_of=region_of,
        on_refusal=refusal_recorder(journal),
    )
    reads = [require(READ)]
    read_errors = error_responses(401, 403)

    @app.get("/v1/status", dependencies=reads, responses=read_errors)
    async def status() -> dict[str, Any]:
        return await node.status()

    @app.get("/v1/tanks", dependencies=reads, responses=read_errors)
    async def tanks() -> list[dict[str, Any]]:
        """The latest reading of every tank gauge (inventory, deliveries, alarms, health)."""
        return [gauge.as_json() for gauge in node.gauges]

    # --- pump commands (docs/pump-commands.md): a terminal's secret on each command -------
    commands = PumpCommands(
        lambda: [
            CommandLine(
                line.name, line.config.protocol if line.config else "jsonpts", line.controller
            )
            for line in node.lines
        ],
        journal,
        max_volume_ml=settings.max_preset_volume_ml,
        max_amount_minor=settings.max_preset_amount_minor,
    )
    app.state.commands = commands

    def terminal(request: Request) -> str:
        """The name of the terminal the request's credential belongs to (the audit's actor)."""
        return str(request.state.principal.subject)

    credential = [require(COMMAND)]
    refusals: dict[int | str, dict[str, Any]] = error_responses(401, 403, 404, 409, 422, 503)

    @app.get("/v1/pumps", dependencies=reads, responses=error_responses(401, 403, 503))
    async def pumps() -> list[dict[str, Any]]:
        """Every pump of the station as its device shows it now (state, nozzle, volume)."""
        return await commands.statuses()

    @app.get("/v1/pumps/{pump}", dependencies=reads, responses=error_responses(401, 403, 404, 503))
    async def pump_status(pump: int) -> dict[str, Any]:
        return await commands.status(pump)

    @app.post(
        "/v1/pumps/{pump}/authorize",
        responses=refusals,
        dependencies=credential,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": AuthoriseRequest.model_json_schema()}},
            }
        },
    )
    async def authorize(pump: int, request: Request) -> dict[str, Any]:
        """Release the pump with a preset (``{"volume_ml": N}`` or ``{"amount_minor": N}``) or,
        when asked (``"full": true``), for a full tank; answers the device transaction and
        the price it runs at."""
        actor = terminal(request)
        raw = await request.body()
        body: Any = None
        if not json_too_deep(raw, 16):
            with contextlib.suppress(ValueError, RecursionError):
                body = json.loads(raw)
        return await commands.authorise(actor, pump, body)

    @app.post("/v1/pumps/{pump}/stop", responses=refusals, dependencies=credential)
    async def stop(pump: int, request: Request) -> dict[str, Any]:
        return await commands.stop(terminal(request), pump)

    @app.post("/v1/pumps/{pump}/suspend", responses=refusals, dependencies=credential)
    async def suspend(pump: int, request: Request) -> dict[str, Any]:
        return await commands.suspend(terminal(request), pump)

    @app.post("/v1/pumps/{pump}/resume", responses=refusals, dependencies=credential)
    async def resume(pump: int, request: Request) -> dict[str, Any]:
        return await commands.resume(terminal(request), pump)

    @app.post("/v1/pumps/{pump}/release", responses=refusals, dependencies=credential)
    async def release(pump: int, request: Request) -> dict[str, Any]:
        """Release a pump after an emergency stop (as its protocol requires)."""
        return await commands.release(terminal(request), pump)

    @app.post(
        "/v1/forecourt/emergency-stop",
        responses=error_responses(401, 403),
        dependencies=[require(EMERGENCY_STOP)],
    )
    async def emergency_stop(request: Request) -> dict[str, Any]:
        """Stop every pump of every line at once; says per pump whether it stopped."""
        return await commands.emergency_stop(terminal(request))

    @app.get("/v1/journal/summary", dependencies=reads, responses=read_errors)
    async def journal_summary() -> list[dict[str, Any]]:
        return await journal.summary()

    # --- counter payments (docs/payments.md): a cashier's staff token on each request ------
    app.include_router(pos_router(pos))
    app.state.pos = pos

    node.app = app
    return node


def jsonpts_factory(settings: EdgeSettings) -> DriverFactory:
    """A driver factory for a PTS-2 controller; its clock zone and currency come from the
    station snapshot, its decimals from the settings (they are configured in the device)."""
    if settings.default_controller_password:  # production refuses it (settings.py)
        log.warning(
            "edge.default_controller_password",
            controller_url=settings.controller_url,
            hint="fine with the simulator only; set FORECOURT_EDGE_CONTROLLER_PASSWORD",
        )

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


def station_devices(settings: EdgeSettings) -> tuple[list[DeviceConfig], list[DeviceConfig]]:
    """The station's pump and gauge device lines (empty when none are configured); a protocol
    no driver is registered for is refused here, before anything starts."""
    if settings.devices is None:
        return [], []
    pumps: list[DeviceConfig] = []
    gauges: list[DeviceConfig] = []
    pump_drivers, gauge_drivers = set(pump_protocols()), set(gauge_protocols())
    for line in settings.devices:
        config = DeviceConfig(
            name=line.name,
            protocol=line.protocol,
            transport=line.transport,
            pumps=dict(line.pumps),
            tanks=dict(line.tanks),
            options=dict(line.options),
        )
        is_gauge = line.protocol in gauge_drivers and (
            line.protocol not in pump_drivers or (line.tanks and not line.pumps)
        )
        if is_gauge:
            gauges.append(config)
        elif line.protocol in pump_drivers:
            pumps.append(config)
        else:
            known = ", ".join(sorted(pump_drivers | gauge_drivers))
            raise DeviceConfigError(
                f"device {line.name!r}: no driver for protocol {line.protocol!r} (known: {known})",
                hint="fix [[edge.devices]] protocol",
            )
    if len(pumps) > 1:
        for config in pumps:
            if not config.pumps:
                raise DeviceConfigError(
                    f"device {config.name!r} names no pumps; with several pump devices each "
                    "names the fuelling points it drives",
                    hint="pumps = {1 = 0x50, 2 = 0x51} or pumps = [1, 2]",
                )
    return pumps, gauges


def driver_context(
    config: DeviceConfig, settings: EdgeSettings, clock: Clock, snapshot: StationSnapshot
) -> DriverContext:
    """What a device's driver is given: the clock, the station's time zone and currency, and
    a store of its own beside the journal (``<journal>.drivers/<device name>``)."""
    journal = settings.journal_path
    return DriverContext(
        clock=clock,
        store=FileDriverStore(journal.parent / f"{journal.name}.drivers" / config.name),
        timezone=snapshot.station.timezone,
        currency=snapshot.currency,
    )


def registry_factory(config: DeviceConfig, settings: EdgeSettings, clock: Clock) -> DriverFactory:
    """A driver factory for one device line: the driver registered for its protocol, given
    :func:`driver_context`."""

    def make(snapshot: StationSnapshot) -> ForecourtDriver:
        return create_pump_driver(config, driver_context(config, settings, clock, snapshot))

    return make


def _uncounted(alarm: dict[str, Any]) -> dict[str, Any]:
    """An alarm as telemetry compares it: how often it was raised again is not news."""
    return {key: value for key, value in alarm.items() if key != "count"}


def _alarm_time(alarm: dict[str, Any], clock: Clock) -> datetime:
    raised = alarm.get("raised_at")
    if isinstance(raised, str):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(raised)
    return clock.now()


def _both(
    first: Callable[[Any], None], telemetry: TelemetryPublisher, protocol: str, currency: str
) -> Callable[[Any], None]:
    """A driver's one event sink feeding its reader (controller or gauge) and telemetry."""

    def sink(event: Any) -> None:
        first(event)
        telemetry.device_event(event, protocol=protocol, currency=currency)

    return sink
