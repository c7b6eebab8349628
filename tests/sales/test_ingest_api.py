"""HQ sales ingest over HTTP, on SQLite and PostgreSQL: exactly once, nothing lost."""

from __future__ import annotations

import asyncio
import json
from uuid import UUID

import httpx
import pytest
import sqlalchemy as sa

from forecourt.bootstrap import build_head_office
from forecourt.infra.db import outbox_table
from forecourt.kernel.events import trace_id_of
from forecourt.network.handlers import (
    SAMPLE_CHAIN,
    import_chain,
    issue_credential,
    load_chain_file,
)
from forecourt.sales import api as sales_api
from forecourt.sales.store import alert_t, conflict_t, sale_t
from forecourt.settings import Settings
from tests.sales.conftest import Hq, make_sale


async def count(hq: Hq, table: sa.Table, *where: sa.ColumnElement[bool]) -> int:
    async with hq.office.db.connection() as conn:
        return int(
            await conn.scalar(sa.select(sa.func.count()).select_from(table).where(*where)) or 0
        )


async def test_a_new_sale_is_created_and_announced_through_the_outbox(hq: Hq) -> None:
    sale = make_sale()
    response = await hq.upload("S001", [sale])
    assert response.status_code == 200
    body = response.json()
    assert body["results"] == [
        {
            "index": 0,
            "sale_id": sale["sale_id"],
            "station_seq": sale["station_seq"],
            "status": "created",
            "flags": [],
        }
    ]
    assert await count(hq, sale_t) == 1
    types = await _outbox_types(hq)
    assert types.count("com.forecourt.sales.sale.completed.v1") == 1


async def test_the_same_batch_uploaded_twice_is_stored_once_and_answered_duplicate(hq: Hq) -> None:
    sales = [make_sale(), make_sale()]
    first = await hq.upload("S001", sales)
    second = await hq.upload("S001", sales)
    assert [r["status"] for r in first.json()["results"]] == ["created", "created"]
    assert [r["status"] for r in second.json()["results"]] == ["duplicate", "duplicate"]
    assert await count(hq, sale_t) == 2
    assert (await _outbox_types(hq)).count("com.forecourt.sales.sale.completed.v1") == 2


async def test_a_sale_repeated_inside_one_batch_is_stored_once(hq: Hq) -> None:
    sale = make_sale()
    response = await hq.upload("S001", [sale, sale])
    assert [r["status"] for r in response.json()["results"]] == ["created", "duplicate"]
    assert await count(hq, sale_t) == 1


async def test_same_sale_id_with_another_payload_is_a_conflict_kept_aside_with_an_alert(
    hq: Hq,
) -> None:
    sale = make_sale()
    await hq.upload("S001", [sale])
    changed = dict(sale, volume_ml=sale["volume_ml"] + 10, amount_minor=sale["amount_minor"] + 8)
    response = await hq.upload("S001", [changed])
    assert response.json()["results"][0]["status"] == "conflict"
    assert await count(hq, sale_t) == 1  # the first version stays authoritative
    async with hq.office.db.connection() as conn:
        stored = (await conn.execute(sa.select(sale_t.c.volume_ml))).scalar_one()
        kept = json.loads((await conn.execute(sa.select(conflict_t.c.payload))).scalar_one())
    assert stored == sale["volume_ml"]
    assert kept["volume_ml"] == changed["volume_ml"]
    assert await count(hq, alert_t, alert_t.c.kind == "conflict") == 1
    assert "com.forecourt.sales.sale.conflict.v1" in await _outbox_types(hq)


async def test_a_conflict_sent_again_is_answered_again_but_recorded_once(hq: Hq) -> None:
    # An edge that crashed before recording HQ's answer sends the same payload again.
    sale = make_sale()
    await hq.upload("S001", [sale])
    changed = dict(sale, volume_ml=sale["volume_ml"] + 10)
    other = dict(sale, volume_ml=sale["volume_ml"] + 20)
    for body in ([changed], [changed, changed], [other]):
        response = await hq.upload("S001", body)
        assert response.status_code == 200, response.text
        assert {r["status"] for r in response.json()["results"]} == {"conflict"}
    assert await count(hq, conflict_t) == 2  # two distinct other payloads
    assert await count(hq, alert_t, alert_t.c.kind == "conflict") == 2
    assert (await _outbox_types(hq)).count("com.forecourt.sales.sale.conflict.v1") == 2


async def test_a_changed_business_date_under_the_same_sale_id_is_a_conflict_too(hq: Hq) -> None:
    sale = make_sale()
    await hq.upload("S001", [sale])
    response = await hq.upload("S001", [dict(sale, business_date="2026-11-24")])
    assert response.json()["results"][0]["status"] == "conflict"
    assert await count(hq, sale_t) == 1


async def test_unknown_references_quarantine_the_sale_but_store_it(hq: Hq) -> None:
    unknown_nozzle = make_sale(nozzle=9)
    unknown_fp = make_sale(fuelling_point=77)
    wrong_grade = make_sale(grade="95")
    response = await hq.upload("S001", [unknown_nozzle, unknown_fp, wrong_grade])
    results = response.json()["results"]
    assert [r["status"] for r in results] == ["quarantined"] * 3
    assert results[0]["flags"] == ["unknown_nozzle"]
    assert results[1]["flags"] == ["unknown_fuelling_point"]
    assert "grade_mismatch" in results[2]["flags"]
    assert await count(hq, sale_t, sale_t.c.quarantined.is_(True)) == 3
    assert await count(hq, alert_t, alert_t.c.kind == "quarantined") == 3
    types = await _outbox_types(hq)
    assert types.count("com.forecourt.sales.sale.quarantined.v1") == 3
    assert "com.forecourt.sales.sale.completed.v1" not in types


async def test_an_amount_beyond_the_dispenser_rounding_is_recorded_flagged_and_announced(
    hq: Hq,
) -> None:
    # FP1 charges to the fen, rounding half up: its amount is exactly volume x price.
    exact = make_sale(amount_minor=30200)
    one_fen_off = make_sale(amount_minor=30201)
    beyond = make_sale(amount_minor=30215)
    response = await hq.upload("S001", [exact, one_fen_off, beyond])
    results = response.json()["results"]
    assert results[0] == {**results[0], "status": "created", "flags": []}
    assert [r["status"] for r in results[1:]] == ["created", "created"]
    assert [r["flags"] for r in results[1:]] == [["amount_mismatch"]] * 2
    assert await count(hq, sale_t) == 3
    assert (await _outbox_types(hq)).count("com.forecourt.sales.sale.amount_mismatch.v1") == 2
    assert await count(hq, alert_t, alert_t.c.kind == "amount_mismatch") == 2


async def test_a_natural_key_collision_is_flagged_and_nothing_is_dropped(hq: Hq) -> None:
    first = make_sale()
    twin = make_sale(
        device_txn=first["device_txn"],
        totalizer_start_ml=first["totalizer_start_ml"],
        totalizer_end_ml=first["totalizer_end_ml"],
    )
    await hq.upload("S001", [first])
    response = await hq.upload("S001", [twin])
    assert response.json()["results"][0]["flags"] == ["natural_key_collision"]
    assert await count(hq, sale_t) == 2
    summary = (await hq.client.get("/v1/sales/summary", params={"station": "S001"})).json()
    assert summary["natural_key_duplicates"] == 1


async def test_a_malformed_item_is_refused_on_its_own_naming_its_fields(hq: Hq) -> None:
    good = make_sale()
    bad = make_sale(volume_ml="40000", ended_at="2026-11-25T01:02:00", surprise=1)
    response = await hq.upload("S001", [good, bad])
    assert response.status_code == 200
    first, refused = response.json()["results"]
    assert (first["index"], first["status"]) == (0, "created")
    assert {k: refused[k] for k in ("index", "sale_id", "station_seq", "status", "flags")} == {
        "index": 1,
        "sale_id": bad["sale_id"],
        "station_seq": bad["station_seq"],
        "status": "refused",
        "flags": [],
    }
    locations = {tuple(e["loc"]) for e in refused["errors"]}
    assert locations == {("volume_ml",), ("ended_at",), ("surprise",)}  # naive time refused
    assert await count(hq, sale_t) == 1
    assert await count(hq, sale_t, sale_t.c.sale_id == UUID(bad["sale_id"])) == 0
    assert await count(hq, alert_t, alert_t.c.kind == "refused") == 1
    types = await _outbox_types(hq)
    assert types.count("com.forecourt.sales.sale.completed.v1") == 1


async def test_a_body_that_is_not_json_gets_422(hq: Hq) -> None:
    response = await hq.client.post(
        "/v1/stations/S001/sales:batch", content=b"{not json", headers=hq.auth("S001")
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "sales.schema_invalid"


async def test_an_unsupported_schema_version_is_refused_with_the_supported_list(hq: Hq) -> None:
    response = await hq.upload("S001", [make_sale()], schema_version=3)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "sales.unsupported_schema_version"
    assert error["details"]["supported"] == [1, 2]
    assert await count(hq, sale_t) == 0


async def test_an_unknown_or_missing_credential_is_refused(hq: Hq) -> None:
    body = {"schema_version": 1, "sales": [make_sale()]}
    missing = await hq.anonymous.post("/v1/stations/S001/sales:batch", json=body)
    unknown = await hq.anonymous.post(
        "/v1/stations/S001/sales:batch", json=body, headers={"authorization": "Bearer nope"}
    )
    assert missing.status_code == 401
    assert unknown.status_code == 401
    assert unknown.json()["error"]["code"] == "auth.unknown_credential"
    assert await count(hq, sale_t) == 0


async def test_the_station_comes_from_the_credential_not_the_path(hq: Hq) -> None:
    response = await hq.client.post(
        "/v1/stations/S002/sales:batch",
        json={"schema_version": 1, "sales": [make_sale()]},
        headers=hq.auth("S001"),
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "auth.wrong_station"
    assert await count(hq, sale_t) == 0


async def test_batches_out_of_order_keep_a_high_water_mark_and_gap_list(hq: Hq) -> None:
    s = [make_sale(station_seq=n, device_txn=1000 + n) for n in range(1, 8)]
    await hq.upload("S002", [s[4], s[6]])  # 5 and 7 first
    seq = (await hq.client.get("/v1/stations/S002/sequence")).json()
    assert seq["high_water_mark"] == 7
    assert seq["gaps"] == [[1, 4], [6, 6]]
    response = await hq.upload("S002", [s[0], s[2], s[5]])
    assert response.json()["gaps"] == [[2, 2], [4, 4]]
    await hq.upload("S002", [s[1], s[3]])
    seq = (await hq.client.get("/v1/stations/S002/sequence")).json()
    assert seq == {"station": "S002", "high_water_mark": 7, "gaps": [], "missing": 0}
    assert await count(hq, sale_t, sale_t.c.station_code == "S002") == 7


async def test_queries_filter_by_station_business_date_and_grade(hq: Hq) -> None:
    await hq.upload(
        "S001",
        [
            make_sale(),
            make_sale(business_date="2026-11-24"),
            make_sale(nozzle=2, grade="95", unit_price_mmu=803000, amount_minor=32120),
        ],
    )
    await hq.upload("S002", [make_sale()])
    by_station = (await hq.client.get("/v1/sales", params={"station": "S001"})).json()["items"]
    assert len(by_station) == 3
    by_day = (
        await hq.client.get("/v1/sales", params={"station": "S001", "business_date": "2026-11-25"})
    ).json()["items"]
    assert len(by_day) == 2
    by_grade = (await hq.client.get("/v1/sales", params={"grade": "95"})).json()["items"]
    assert [s["grade"] for s in by_grade] == ["95"]
    summary = (await hq.client.get("/v1/sales/summary", params={"station": "S001"})).json()
    grades = {g["grade"]: g for g in summary["groups"]}
    assert grades["92"]["sales"] == 2
    assert grades["92"]["volume_ml"] == 80000
    assert grades["95"]["amount_minor"] == 32120
    page = (await hq.client.get("/v1/sales", params={"limit": 2})).json()
    rest = (await hq.client.get("/v1/sales", params={"after": page["next_after"]})).json()
    assert len(page["items"]) + len(rest["items"]) == 4


async def test_bad_query_parameters_get_a_clear_422(hq: Hq) -> None:
    response = await hq.client.get("/v1/sales", params={"business_date": "yesterday"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "request.invalid"


async def _outbox_types(hq: Hq) -> list[str]:
    async with hq.office.db.connection() as conn:
        return list(await conn.scalars(sa.select(outbox_table.c.type)))


async def test_a_batch_that_fails_midway_leaves_no_trace(hq: Hq, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import json as _json

    import pytest

    from forecourt.infra.db import UnitOfWork
    from forecourt.sales.api import parse_batch
    from forecourt.sales.handlers import ingest_batch

    emit_records = UnitOfWork.emit_records

    async def emit_then_fail(self: UnitOfWork, records: object) -> None:
        await emit_records(self, records)  # type: ignore[arg-type]
        raise RuntimeError("disk full")

    # Fails after the sales and their events were written in the transaction.
    monkeypatch.setattr(UnitOfWork, "emit_records", emit_then_fail)
    batch = parse_batch(
        _json.dumps({"schema_version": 1, "sales": [make_sale(), make_sale()]}).encode()
    )
    with pytest.raises(RuntimeError, match="disk full"):
        await ingest_batch(hq.office.db, hq.office.directory, "S001", batch)
    assert await count(hq, sale_t) == 0
    assert await count(hq, outbox_table, outbox_table.c.type.like("com.forecourt.sales.%")) == 0


async def test_health_ready_and_metrics_answer_and_count_ingest(hq: Hq) -> None:
    assert (await hq.client.get("/health")).json() == {"status": "ok"}
    ready = await hq.client.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"bus": True, "database": True}
    await hq.upload("S001", [make_sale(), make_sale(nozzle=9)])
    metrics = (await hq.client.get("/metrics")).text
    assert 'forecourt_sales_ingested_total{status="created"} 1.0' in metrics
    assert 'forecourt_sales_ingested_total{status="quarantined"} 1.0' in metrics
    assert "forecourt_outbox_backlog" in metrics


async def test_the_callers_trace_context_travels_into_the_events(hq: Hq) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    response = await hq.client.post(
        "/v1/stations/S001/sales:batch",
        json={"schema_version": 1, "sales": [make_sale()]},
        headers={**hq.auth("S001"), "traceparent": traceparent},
    )
    assert response.headers["traceparent"] == traceparent
    async with hq.office.db.connection() as conn:
        stored = await conn.scalar(
            sa.select(outbox_table.c.traceparent).where(
                outbox_table.c.type == "com.forecourt.sales.sale.completed.v1"
            )
        )
    assert stored == traceparent


async def test_every_answer_carries_a_trace_context_and_a_malformed_one_is_replaced(
    hq: Hq,
) -> None:
    refused = await hq.anonymous.post(
        "/v1/stations/S001/sales:batch",
        json={"schema_version": 1, "sales": [make_sale()]},
        headers={"traceparent": "00-not-a-trace-01"},
    )
    assert refused.status_code == 401
    fresh = refused.headers["traceparent"]
    assert fresh != "00-not-a-trace-01"
    assert trace_id_of(fresh) is not None
    health = await hq.client.get("/health")
    assert trace_id_of(health.headers["traceparent"]) not in (None, trace_id_of(fresh))


async def test_the_answer_is_compact_json_one_result_per_sale(hq: Hq) -> None:
    # The ingest benchmark counts statuses in the raw answer; this is the shape it relies on.
    response = await hq.upload("S001", [make_sale(), make_sale(), make_sale(nozzle=9)])
    assert response.content.count(b'"status":"created"') == 2
    assert response.content.count(b'"status":"quarantined"') == 1
    assert response.content.count(b'"sale_id"') == 3


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_uploads_are_admitted_a_few_at_a_time(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = 0
    most = 0
    order: list[int] = []
    real = sales_api.ingest_batch

    async def slow_ingest(*args: object, **kwargs: object) -> object:
        nonlocal running, most
        running += 1
        most = max(most, running)
        order.append(args[3].sales[0].station_seq)  # type: ignore[attr-defined]
        try:
            await asyncio.sleep(0.05)
            return await real(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            running -= 1

    monkeypatch.setattr(sales_api, "ingest_batch", slow_ingest)
    office = build_head_office(Settings(database_url=db_url, log_json=False, ingest_concurrency=1))
    await office.start(relay=False)
    try:
        await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
        token = (await issue_credential(office.db, "S001"))[1]
        transport = httpx.ASGITransport(app=office.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://hq") as client:
            sales = [make_sale() for _ in range(4)]

            async def upload(sale: dict[str, object], delay: float) -> httpx.Response:
                await asyncio.sleep(delay)
                return await client.post(
                    "/v1/stations/S001/sales:batch",
                    json={"schema_version": 1, "sales": [sale]},
                    headers={"authorization": f"Bearer {token}"},
                )

            answers = await asyncio.gather(
                *(upload(sale, i * 0.005) for i, sale in enumerate(sales))
            )
    finally:
        await office.stop()

    assert [a.status_code for a in answers] == [200] * 4
    assert most == 1
    assert sorted(order) == sorted(s["station_seq"] for s in sales)
