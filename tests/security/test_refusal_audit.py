"""Every refusal is in the audit trail: a cashier of S001 reaching for S002, a forged token,
a station credential that does not exist; a flood of 429s is one record per source and
minute, not one per request."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from forecourt.bootstrap import HeadOffice, build_head_office
from forecourt.infra.db import audit_outbox_table
from forecourt.network.handlers import SAMPLE_CHAIN, import_chain, load_chain_file
from forecourt.settings import Settings
from tests.support import staff_headers


@pytest.fixture
async def hq(db_url: str) -> AsyncIterator[tuple[HeadOffice, httpx.AsyncClient]]:
    office = build_head_office(
        Settings(database_url=db_url, log_json=False, station_auth_failures_per_minute=3)
    )
    await office.start(relay=False)
    await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
    transport = httpx.ASGITransport(app=office.app, client=("203.0.113.7", 4711))
    async with httpx.AsyncClient(transport=transport, base_url="http://hq") as client:
        yield office, client
    await office.stop()


async def _refusals(office: HeadOffice) -> list[dict[str, Any]]:
    async with office.db.connection() as conn:
        rows = (
            await conn.execute(
                sa.select(audit_outbox_table)
                .where(audit_outbox_table.c.action == "auth.refused")
                .order_by(audit_outbox_table.c.id)
            )
        ).all()
    return [{**r._asdict(), "details": json.loads(r.details)} for r in rows]


async def test_a_cashier_of_one_station_reaching_another_is_refused_and_recorded(
    hq: tuple[HeadOffice, httpx.AsyncClient],
) -> None:
    office, client = hq
    cashier = await staff_headers(office.identity, ("cashier", "station:S001"), name="carla")
    own = await client.get("/v1/sales", params={"station": "S001"}, headers=cashier)
    other = await client.get("/v1/sales", params={"station": "S002"}, headers=cashier)
    assert own.status_code == 200
    assert other.status_code == 403
    [record] = await _refusals(office)
    assert record["actor"] == "user:carla"
    assert record["target"] == "GET /v1/sales"
    assert record["source"] == "203.0.113.7"
    assert record["details"]["code"] == "auth.out_of_scope"
    assert record["details"]["permission"] == "sales:read"
    assert record["trace_id"] == other.headers["traceparent"].split("-")[1]


async def test_forged_tokens_and_unknown_station_credentials_are_recorded_as_anonymous(
    hq: tuple[HeadOffice, httpx.AsyncClient],
) -> None:
    office, client = hq
    forged = {"authorization": "Bearer eyJhbGciOiJFZERTQSIsImtpZCI6IngifQ.e30.c2ln"}
    assert (await client.get("/v1/network/stations", headers=forged)).status_code == 401
    unknown = {"authorization": "Bearer not-a-credential-of-any-station"}
    answer = await client.post(
        "/v1/stations/S001/sales:batch", json={"schema_version": 1, "sales": []}, headers=unknown
    )
    assert answer.status_code == 401
    records = await _refusals(office)
    assert [(r["actor"], r["details"]["code"]) for r in records] == [
        ("anonymous", "auth.invalid_token"),
        ("anonymous", "auth.unknown_credential"),
    ]


async def test_a_brute_force_run_is_refused_with_429_and_recorded_once_per_minute(
    hq: tuple[HeadOffice, httpx.AsyncClient],
) -> None:
    office, client = hq
    statuses = []
    for n in range(10):
        answer = await client.get(
            "/v1/stations/S001/snapshot", headers={"authorization": f"Bearer guess-{n:04d}"}
        )
        statuses.append(answer.status_code)
    assert statuses[:3] == [401, 401, 401]
    assert set(statuses[3:]) == {429}
    codes = [r["details"]["code"] for r in await _refusals(office)]
    assert codes == ["auth.unknown_credential"] * 3 + ["auth.too_many_failures"]


async def test_a_refusal_loses_nothing_when_its_record_cannot_be_written(
    hq: tuple[HeadOffice, httpx.AsyncClient], tmp_path: Path
) -> None:
    office, client = hq

    async def broken(*_: Any) -> None:
        raise RuntimeError("audit store down")

    office.app.state.on_refusal = broken
    answer = await client.get("/v1/network/stations")
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "auth.missing_credential"
