"""Fixtures for the devices tests: a head office on each database with the sample chain and
a manual clock, and helpers that build telemetry as an edge publishes it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import count
from typing import Any

import httpx
import pytest

from forecourt.bootstrap import HeadOffice, build_head_office
from forecourt.devices.handlers import DevicesService, IngestOutcome, Received
from forecourt.kernel.telemetry import DEFAULT_PREFIX, encode, topic
from forecourt.network.handlers import SAMPLE_CHAIN, import_chain, load_chain_file
from forecourt.settings import Settings
from tests.mqtt_broker import persistent_mqtt_broker  # noqa: F401 (a fixture)
from tests.network.support import StaffAuth
from tests.support import ManualClock

START = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
STALE_AFTER_S = 60.0
HISTORY_LIMIT = 5


@dataclass
class Edge:
    """Builds an edge's telemetry: envelope stamps from one boot, rising seq."""

    station: str
    boot: str = "boot-1"
    prefix: str = DEFAULT_PREFIX
    at: datetime = START
    seq: count[int] = field(default_factory=lambda: count(1))

    def message(
        self,
        kind: str,
        key: str | int | None,
        body: dict[str, Any],
        *,
        seq: int | None = None,
        at: datetime | None = None,
        station: str | None = None,
    ) -> Received:
        payload = encode(
            station or self.station,
            at or self.at,
            self.boot,
            next(self.seq) if seq is None else seq,
            body,
        )
        return Received(topic(self.prefix, self.station, kind, key), payload)

    def status(self, online: bool, **kw: Any) -> Received:
        return self.message("status", None, {"online": online, "software": "forecourt"}, **kw)

    def pump(self, pump: int, state: str, **kw: Any) -> Received:
        body = {"pump": pump, "device": "pts-1", "state": state, "volume_ml": 0}
        return self.message("pumps", pump, {**body, **kw.pop("body", {})}, **kw)

    def tank(self, tank: int, volume_ml: int, **kw: Any) -> Received:
        body = {"tank": tank, "device": "tls-1", "volume_ml": volume_ml, "status": []}
        return self.message("tanks", tank, body, **kw)

    def alarm(self, name: str, active: bool, **kw: Any) -> Received:
        body = {"name": name, "active": active, "message": f"{name} alarm", "details": {}}
        return self.message("alarms", None, body, **kw)


@dataclass
class DevicesHq:
    office: HeadOffice
    client: httpx.AsyncClient  # signed in as an HQ admin
    clock: ManualClock

    @property
    def devices(self) -> DevicesService:
        assert self.office.devices is not None
        return self.office.devices

    async def ingest(self, *messages: Received) -> IngestOutcome:
        return await self.devices.ingest(list(messages))

    async def get(self, path: str, status: int = 200) -> Any:
        response = await self.client.get(path)
        assert response.status_code == status, response.text
        return response.json()

    def discarded(self, reason: str) -> float:
        value = self.office.registry.get_sample_value(
            "forecourt_devices_telemetry_discarded_total", {"reason": reason}
        )
        return value or 0.0


def devices_settings(database_url: str, **overrides: Any) -> Settings:
    return Settings(
        database_url=database_url,
        log_json=False,
        devices_stale_after_s=STALE_AFTER_S,
        devices_history_limit=HISTORY_LIMIT,
        **overrides,
    )


@pytest.fixture
async def hq(db_url: str) -> AsyncIterator[DevicesHq]:
    clock = ManualClock(START)
    office = build_head_office(devices_settings(db_url), clock=clock)
    await office.start(relay=False)
    await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
    transport = httpx.ASGITransport(app=office.app)
    # Devices reads go as an HQ admin, signed in again whenever the clock has moved past
    # the token's lifetime.
    async with httpx.AsyncClient(
        transport=transport, base_url="http://hq", auth=StaffAuth(office.identity)
    ) as client:
        yield DevicesHq(office, client, clock)
    await office.stop()
