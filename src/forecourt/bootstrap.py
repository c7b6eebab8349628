"""The composition root: the one place that wires contexts, infrastructure and HTTP apps.

Nothing connects at import time; :meth:`HeadOffice.start` connects, migrates and starts the
relay; :meth:`HeadOffice.stop` undoes it. A database or bus that does not answer at start is
raised as :class:`ServiceUnavailable`, naming which one and where.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import sqlalchemy as sa
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from forecourt import __version__
from forecourt.audit import api as audit_api
from forecourt.audit.handlers import AuditChainer, StaticSigningKey
from forecourt.devices import api as devices_api
from forecourt.devices.handlers import DevicesService
from forecourt.devices.subscriber import DevicesMetrics, TelemetrySubscriber
from forecourt.identity import api as identity_api
from forecourt.identity.handlers import IdentityConfig, IdentityService, looks_like_jwt
from forecourt.infra.access import install_access
from forecourt.infra.background import BackgroundService, Job
from forecourt.infra.bus import Bus, make_bus
from forecourt.infra.consumers import Consumer, ConsumerHost
from forecourt.infra.db import Database
from forecourt.infra.http import METRICS_POLICY, OPEN, install_common
from forecourt.infra.idempotency import install_idempotency
from forecourt.infra.migrate import upgrade
from forecourt.infra.relay import OutboxRelay
from forecourt.kernel.access import (
    STATION_PERMISSIONS,
    Grant,
    Principal,
    PrincipalKind,
    Scope,
)
from forecourt.kernel.clock import Clock, SimulatedClock
from forecourt.kernel.errors import ForecourtError, TooManyRequests, Unauthorized
from forecourt.network import api as network_api
from forecourt.network.contracts import StationDirectory
from forecourt.network.handlers import DbStationDirectory
from forecourt.payments import api as payments_api
from forecourt.payments.handlers import PaymentsService
from forecourt.sales import api as sales_api
from forecourt.settings import Settings


class ServiceUnavailable(ForecourtError):
    """The database or the bus did not answer when a process started.

    ``service`` says which, ``url`` where (as configured); the cause is chained. The CLI turns
    it into one line with a hint (``createdb …``, ``nats-server -js``).
    """

    code = "platform.service_unavailable"
    http_status = 503

    def __init__(self, service: Literal["database", "bus"], url: str, cause: BaseException):
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        super().__init__(f"{service} unavailable: {reason}", service=service)
        self.service = service
        self.url = url
        self.cause = cause


async def open_database(db: Database) -> None:
    """Connect and make one round trip, so that a missing database, a refused login or a
    server that is down shows here (as :class:`ServiceUnavailable`), not in a migration."""
    try:
        await db.connect()
        async with db.connection() as conn:
            await conn.execute(sa.text("SELECT 1"))
    except Exception as exc:
        await db.dispose()
        raise ServiceUnavailable("database", db.url, exc) from exc


async def open_bus(bus: Bus, url: str) -> None:
    """Connect the bus (NATS: and check the JetStream stream), or :class:`ServiceUnavailable`."""
    try:
        await bus.connect()
    except Exception as exc:
        raise ServiceUnavailable("bus", url, exc) from exc


class UnknownConsumer(ForecourtError):
    code = "platform.unknown_consumer"
    http_status = 400


def known_consumers() -> dict[str, Consumer]:
    """Every consumer a context registers, by name (one line per consumer here)."""
    from forecourt.infra.probe import PROBE

    return {c.name: c for c in (PROBE,)}


def known_jobs() -> dict[str, Job]:
    """Every background job a context registers, by name (hosted like the consumers)."""
    from forecourt.payments.worker import RECOVERY_JOB

    return {j.name: j for j in (RECOVERY_JOB,)}


def _check_names(names: list[str]) -> None:
    known = sorted({*known_consumers(), *known_jobs()})
    for name in names:
        if name not in ("none", "default") and name not in known:
            raise UnknownConsumer(
                f"unknown consumer {name!r}; known: {', '.join(known) or 'none'} (or default, none)"
            )


def select_consumers(names: list[str]) -> list[Consumer]:
    """The event consumers ``names`` asks for: names, ``default`` (every default consumer)
    or ``none``; a name neither a consumer nor a job is refused, naming the known ones."""
    _check_names(names)
    known = known_consumers()
    chosen: dict[str, Consumer] = {}
    for name in names:
        if name == "default":
            chosen.update({n: c for n, c in known.items() if c.default})
        elif name in known:
            chosen[name] = known[name]
    return list(chosen.values())


def select_jobs(names: list[str]) -> list[Job]:
    """The background jobs ``names`` asks for (as :func:`select_consumers` does)."""
    _check_names(names)
    known = known_jobs()
    chosen: dict[str, Job] = {}
    for name in names:
        if name == "default":
            chosen.update({n: j for n, j in known.items() if j.default})
        elif name in known:
            chosen[name] = known[name]
    return list(chosen.values())


def build_bus(settings: Settings, db: Database, *, manage_stream: bool = True) -> Bus:
    """The bus as the settings describe it (the in-process one keeps its deliveries in db).
    ``manage_stream=False``: a NATS bus that never creates or reconfigures the stream."""
    if settings.bus_url.startswith("memory"):
        from forecourt.infra.bus.memory import MemoryBus

        return MemoryBus(db, ack_wait=settings.consumer_ack_wait_s)
    return make_bus(
        settings.bus_url,
        db=db,
        stream=settings.nats_stream,
        subject_prefix=settings.nats_subject_prefix,
        max_age=settings.nats_max_age_s,
        max_bytes=settings.nats_max_bytes,
        max_msgs=settings.nats_max_msgs,
        replicas=settings.nats_replicas,
        duplicate_window=settings.nats_duplicate_window_s,
        ack_wait=settings.consumer_ack_wait_s,
        manage_stream=manage_stream,
    )


def build_consumer_host(
    db: Database,
    bus: Bus,
    settings: Settings,
    registry: CollectorRegistry | None,
    consumers: list[Consumer] | None = None,
) -> ConsumerHost:
    from datetime import timedelta

    return ConsumerHost(
        db,
        bus,
        select_consumers(settings.consumers) if consumers is None else consumers,
        registry=registry,
        inbox_retention=timedelta(days=settings.inbox_retention_days),
        dead_letter_retention=timedelta(days=settings.dead_letter_retention_days),
        pending_alarm=settings.consumer_pending_alarm,
    )


class LiveFigures(Collector):
    """Gauges whose values are set just before a scrape (``values``: name → value) and
    served as they are by whichever process answers, never added up across processes."""

    def __init__(
        self, documentation: dict[str, str], read: dict[str, Callable[[], float]] | None = None
    ) -> None:
        self.documentation = documentation
        self.values: dict[str, float] = dict.fromkeys(documentation, 0.0)
        self.read = read or {}  # figures read at every collection instead

    def collect(self) -> Iterable[Metric]:
        for name, doc in self.documentation.items():
            value = self.read[name]() if name in self.read else self.values[name]
            yield GaugeMetricFamily(name, doc, value=value)


class HeadOfficeAuthenticator:
    """HQ's :class:`~forecourt.infra.access.Authenticator`: a signed access token (staff, a
    service account) is the identity context's to verify; anything else is taken for a
    station's credential, the network's."""

    def __init__(self, identity: IdentityService, stations: StationDirectory) -> None:
        self.identity = identity
        self.stations = stations

    async def principal(self, token: str, source: str | None) -> Principal:
        if looks_like_jwt(token):
            return await self.identity.verifier.verify(token, source)
        station = await self.stations.authenticate(token, source)
        if station is None:
            raise Unauthorized("unknown station credential", code="auth.unknown_credential")
        grant = Grant("station", Scope.station(station.code), STATION_PERMISSIONS)
        return Principal(PrincipalKind.STATION, station.code, (grant,))


class RefusalAudit:
    """Every refused request (401, 403) is an audit record in a transaction of its own: who
    (the caller, or ``anonymous``), what route, why. A source refused with 429 is recorded
    once a minute, not once a request: a flood must not become a flood of writes."""

    def __init__(self, db: Database) -> None:
        from cachetools import TTLCache

        self.db = db
        self._throttled: TTLCache[str, bool] = TTLCache(maxsize=10_000, ttl=60)

    async def __call__(
        self, request: Request, refused: ForecourtError, principal: Principal | None, policy: Any
    ) -> None:
        source = request.client.host if request.client else None
        if isinstance(refused, TooManyRequests):
            if (source or "") in self._throttled:
                return
            self._throttled[source or ""] = True
        async with self.db.begin() as uow:
            await uow.record_audit(
                actor=principal.actor if principal is not None else "anonymous",
                action="auth.refused",
                target=f"{request.method} {request.url.path}"[:200],
                details={
                    "code": refused.code,
                    "status": refused.http_status,
                    "reason": refused.message,
                    "permission": policy.permission,
                },
                source=source,
            )


@dataclass
class HeadOffice:
    settings: Settings
    db: Database
    bus: Bus
    relay: OutboxRelay
    directory: DbStationDirectory
    registry: CollectorRegistry
    consumers: ConsumerHost
    identity: IdentityService
    chainer: AuditChainer
    app: FastAPI = field(init=False)
    bus_ready: bool = False
    devices: DevicesService | None = None  # the devices context, when this process runs it
    telemetry: TelemetrySubscriber | None = None  # its MQTT subscriber, when configured
    payments: PaymentsService | None = None  # the payments context, when this process runs it
    jobs: list[BackgroundService] = field(default_factory=list)  # the jobs this process runs

    async def start(
        self, *, migrate: bool = True, relay: bool | None = None, telemetry: bool | None = None
    ) -> None:
        """``telemetry``: run the devices MQTT subscriber (default: where the relay runs,
        the process that does HQ's background work; one subscriber per HQ)."""
        await open_database(self.db)
        if migrate:
            await upgrade(self.db)
        await open_bus(self.bus, self.settings.bus_url)
        self.bus_ready = True
        if self.settings.relay if relay is None else relay:
            self.relay.start()
            self.chainer.start()  # one chainer at a time chains, whatever the processes
        if self.consumers.consumers or "none" not in self.settings.consumers:
            await self.consumers.start()
        if self.telemetry is not None and (self.settings.relay if telemetry is None else telemetry):
            self.telemetry.start()
        if self.settings.relay if relay is None else relay:
            # The background jobs (payments recovery) are HQ's background work too: they run
            # where the relay runs, whatever the consumers (a worker may host them as well).
            for job in select_jobs(["default"]):
                service = job.build(self.settings, self.db)
                service.start()
                self.jobs.append(service)

    async def stop(self) -> None:
        jobs, self.jobs = self.jobs, []
        for service in jobs:
            await service.stop()
        if self.payments is not None:
            for provider in self.payments.providers.values():
                await provider.aclose()
        if self.telemetry is not None:
            await self.telemetry.stop()
        await self.consumers.stop()
        await self.relay.stop()
        await self.chainer.stop()
        await self.directory.close()
        await self.bus.close()
        self.bus_ready = False
        await self.db.dispose()


def build_relay(db: Database, bus: Bus, settings: Settings) -> OutboxRelay:
    """The outbox relay as the settings describe it (in HQ, or as ``forecourt relay``)."""
    return OutboxRelay(
        db,
        bus,
        batch_size=settings.relay_batch_size,
        idle_seconds=settings.relay_idle_seconds,
        vacuum_every=settings.relay_vacuum_every,
        lanes=settings.relay_lanes,
    )


def runs_devices(settings: Settings) -> bool:
    """Whether a process runs the devices context: when its services name it (the default
    names every known service: the whole HQ)."""
    return "devices" in settings.services


def build_devices(
    settings: Settings, db: Database, directory: DbStationDirectory, registry: CollectorRegistry
) -> tuple[DevicesService, TelemetrySubscriber | None]:
    """The devices context over ``db`` (stations checked against the network's directory),
    and its MQTT subscriber when ``devices_mqtt_url`` is set."""
    metrics = DevicesMetrics(registry)

    async def known_station(code: str) -> bool:
        return await directory.references(code) is not None

    service = DevicesService(
        db,
        prefix=settings.devices_telemetry_prefix,
        stale_after=timedelta(seconds=settings.devices_stale_after_s),
        history_limit=settings.devices_history_limit,
        known_station=known_station,
        on_discard=metrics.on_discard,
        on_applied=metrics.on_applied,
    )
    if settings.devices_mqtt_url is None:
        return service, None
    password = settings.devices_mqtt_password
    subscriber = TelemetrySubscriber(
        service,
        settings.devices_mqtt_url,
        client_id=settings.devices_mqtt_client_id,
        username=settings.devices_mqtt_username,
        password=password.get_secret_value() if password is not None else None,
        metrics=metrics,
    )
    return service, subscriber


def build_head_office(settings: Settings, *, clock: Clock | None = None) -> HeadOffice:
    db = Database(settings.database_url, clock=clock)
    bus = build_bus(settings, db)
    relay = build_relay(db, bus, settings)
    registry = CollectorRegistry()
    directory = DbStationDirectory(
        db,
        cache_size=settings.station_credential_cache_size,
        credential_ttl_s=settings.station_credential_cache_s,
        failures_per_minute=settings.station_auth_failures_per_minute,
    )
    host = build_consumer_host(db, bus, settings, registry)
    identity = IdentityService(db, IdentityConfig.from_settings(settings))
    key_file = settings.audit_signing_key_file
    chainer = AuditChainer(
        db,
        signing=StaticSigningKey.from_pem(key_file.read_bytes()) if key_file else None,
        interval_s=settings.audit_chain_interval_s,
        checkpoint_every=settings.audit_checkpoint_every,
        checkpoint_interval_s=settings.audit_checkpoint_interval_s,
    )
    hq = HeadOffice(settings, db, bus, relay, directory, registry, host, identity, chainer)
    if runs_devices(settings):
        hq.devices, hq.telemetry = build_devices(settings, db, directory, registry)

    # Database-wide figures, read at every scrape: every worker process serves the same
    # true value (a value cached per process would alternate between stale views), and
    # they are never added up across processes.
    figures = LiveFigures(
        {
            "forecourt_outbox_backlog": "Events waiting in the outbox",
            "forecourt_outbox_parked": "Events the broker refused, parked",
            "forecourt_outbox_published": "Events published by this process's relay",
        },
        read={"forecourt_outbox_published": lambda: float(relay.published)},
    )
    registry.register(figures)

    async def refresh_metrics() -> None:
        from forecourt.infra.relay import count_parked

        with contextlib.suppress(Exception):
            figures.values["forecourt_outbox_backlog"] = float(await relay.backlog())
            figures.values["forecourt_outbox_parked"] = float(await count_parked(db))

    async def ready() -> dict[str, bool]:
        checks = {"bus": hq.bus_ready and await bus.ready()}
        try:
            await relay.backlog()
            checks["database"] = True
        except Exception:  # noqa: BLE001 - not ready is the answer, not a crash
            checks["database"] = False
        return checks

    app = FastAPI(title="Forecourt head office", version=__version__)
    install_common(
        app,
        registry,
        ready,
        refresh_metrics=refresh_metrics,
        live=figures,
        max_body_bytes=settings.max_body_bytes,
        metrics_policy=OPEN if settings.metrics_open else METRICS_POLICY,
    )

    async def region_of(code: str) -> str | None:
        refs = await directory.references(code)
        return refs.region if refs is not None else None

    install_access(app, HeadOfficeAuthenticator(identity, directory), region_of, RefusalAudit(db))
    if "identity" in settings.services:
        app.include_router(identity_api.build_router(identity))
    if "audit" in settings.services:
        app.include_router(audit_api.build_router(db))
    if "network" in settings.services:
        app.include_router(network_api.build_router(db))
    if "sales" in settings.services:
        app.include_router(
            sales_api.build_router(
                db,
                directory,
                registry,
                ingest_concurrency=settings.ingest_concurrency,
                max_json_depth=settings.max_json_depth,
            )
        )
    if hq.devices is not None:
        app.include_router(devices_api.build_router(hq.devices))
    if "payments" in settings.services:
        from forecourt.payments.config import providers_from_settings
        from forecourt.payments.handlers import PaymentsConfig

        hq.payments = PaymentsService(
            db, providers_from_settings(settings), PaymentsConfig.from_settings(settings)
        )
        from forecourt.payments import metrics as payments_metrics

        with contextlib.suppress(ValueError):  # served from this registry once
            payments_metrics.register(registry)
        install_idempotency(app)
        app.include_router(payments_api.build_router(hq.payments))
    hq.app = app
    return hq


def create_app() -> FastAPI:
    """ASGI app factory for ``forecourt serve`` (one call per worker process).

    Settings come from the environment / TOML file; a simulation (``FORECOURT_SIM_*`` set)
    runs HQ in the same simulated time as its stations.
    """
    settings = Settings()
    hq = build_head_office(settings, clock=SimulatedClock.from_env(dict(os.environ)))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await hq.start()
        try:
            yield
        finally:
            await hq.stop()

    hq.app.router.lifespan_context = lifespan
    return hq.app
