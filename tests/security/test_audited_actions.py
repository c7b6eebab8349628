"""The audited actions carry their real actor, source and trace: a station's upload, a staff
member's price publication and withdrawal, each in the action's own transaction."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from forecourt.bootstrap import HeadOffice, build_head_office
from forecourt.infra.db import audit_outbox_table
from forecourt.network.handlers import SAMPLE_CHAIN, import_chain, issue_credential, load_chain_file
from forecourt.settings import Settings
from tests.sales.conftest import make_sale
from tests.support import staff_headers


@pytest.fixture
async def hq(db_url: str) -> AsyncIterator[tuple[HeadOffice, httpx.AsyncClient]]:
    office = build_head_office(Settings(database_url=db_url, log_json=False))
    await office.start(relay=False)
    await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
    transport = httpx.ASGITransport(app=office.app, client=("198.51.100.9", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://hq") as client:
        yield office, client
    await office.stop()


async def _records(office: HeadOffice, action: str) -> list[dict[str, Any]]:
    async with office.db.connection() as conn:
        rows = (
            await conn.execute(
                sa.select(audit_outbox_table)
                .where(audit_outbox_table.c.action == action)
                .order_by(audit_outbox_table.c.id)
            )
        ).all()
    return [{**r._asdict(), "details": json.loads(r.details)} for r in rows]


async def test_an_upload_is_audited_as_its_station_with_source_and_trace(
    hq: tuple[HeadOffice, httpx.AsyncClient],
) -> None:
    office, client = hq
    _, token = await issue_credential(office.db, "S001")
    sales = [make_sale(station_seq=n, device_txn=500 + n) for n in (1, 2, 3)]
    answer = await client.post(
        "/v1/stations/S001/sales:batch",
        json={"schema_version": 1, "sales": [*sales, sales[0]]},
        headers={"authorization": f"Bearer {token}"},
    )
    assert answer.status_code == 200
    [record] = await _records(office, "sales.upload")
    assert record["actor"] == "station:S001"
    assert record["target"] == "station:S001"
    assert record["source"] == "198.51.100.9"
    assert record["trace_id"] == answer.headers["traceparent"].split("-")[1]
    assert record["details"]["sales"] == 4
    assert record["details"]["stored"] == 3
    assert record["details"]["station_seq"] == [1, 3]


async def test_a_price_set_is_audited_as_the_staff_member_who_published_it(
    hq: tuple[HeadOffice, httpx.AsyncClient],
) -> None:
    office, client = hq
    admin = await staff_headers(office.identity, name="pricing-lead")
    start = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
    body = {
        "scope": "chain",
        "effective_from": start.isoformat(),
        "prices": dict.fromkeys(("92", "95", "98", "0"), "7.99"),
    }
    published = await client.post("/v1/network/price-sets", json=body, headers=admin)
    assert published.status_code == 201, published.text
    withdrawn = await client.delete(
        f"/v1/network/price-sets/{published.json()['price_set_id']}", headers=admin
    )
    assert withdrawn.status_code == 200, withdrawn.text
    actions = [
        (r["actor"], r["source"])
        for action in ("network.price_set.publish", "network.price_set.withdraw")
        for r in await _records(office, action)
    ]
    assert actions == [("user:pricing-lead", "198.51.100.9")] * 2
