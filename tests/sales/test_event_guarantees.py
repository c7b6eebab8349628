"""What ingest promises about its events and alerts: one id per fact, alerts only for
what committed."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
import structlog

from forecourt.infra.db import UnitOfWork, outbox_table
from forecourt.sales.api import parse_batch
from forecourt.sales.handlers import ingest_batch
from tests.sales.conftest import Hq, make_sale


async def _outbox(hq: Hq) -> list[tuple[str, str]]:
    async with hq.office.db.connection() as conn:
        rows = await conn.execute(sa.select(outbox_table.c.event_id, outbox_table.c.type))
        return [(r.event_id, r.type) for r in rows]


async def test_conflicting_versions_in_one_batch_each_get_their_own_event_id(hq: Hq) -> None:
    sale = make_sale()
    changed = dict(sale, volume_ml=sale["volume_ml"] + 10)
    other = dict(sale, volume_ml=sale["volume_ml"] + 20)
    response = await hq.upload("S001", [sale, changed, other, changed])
    assert response.status_code == 200, response.text
    assert [r["status"] for r in response.json()["results"]] == [
        "created",
        "conflict",
        "conflict",
        "conflict",
    ]
    third = dict(sale, volume_ml=sale["volume_ml"] + 30)
    response = await hq.upload("S001", [third, other])
    assert response.status_code == 200, response.text
    events = await _outbox(hq)
    conflicts = [e for e, t in events if t.endswith("sale.conflict.v1")]
    assert len(conflicts) == 3  # changed, other, third: each its own fact
    ids = [e for e, _ in events]
    assert len(ids) == len(set(ids)), "two outbox rows share an event id"


async def test_an_alert_is_logged_only_once_its_batch_committed(hq: Hq, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    emit_records = UnitOfWork.emit_records

    async def emit_then_fail(self: UnitOfWork, records: object) -> None:
        await emit_records(self, records)  # type: ignore[arg-type]
        raise RuntimeError("disk full")

    unknown_nozzle = make_sale(nozzle=9)  # quarantined: an alert
    batch = parse_batch(json.dumps({"schema_version": 1, "sales": [unknown_nozzle]}).encode())
    monkeypatch.setattr(UnitOfWork, "emit_records", emit_then_fail)
    with structlog.testing.capture_logs() as logs, pytest.raises(RuntimeError, match="disk full"):
        await ingest_batch(hq.office.db, hq.office.directory, "S001", batch)
    assert [e for e in logs if e["event"] == "sales.alert"] == []
    monkeypatch.setattr(UnitOfWork, "emit_records", emit_records)
    with structlog.testing.capture_logs() as logs:
        await ingest_batch(hq.office.db, hq.office.directory, "S001", batch)
    alerts = [e for e in logs if e["event"] == "sales.alert"]
    assert [a["kind"] for a in alerts] == ["quarantined"]
    assert alerts[0]["sale_id"] == unknown_nozzle["sale_id"]
