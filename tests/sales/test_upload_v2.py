"""Upload schema v2 and per-item verdicts, on SQLite and PostgreSQL: v1 and v2 side by side,
an invalid item refused on its own, envelope errors refused as a whole."""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

import pytest
import sqlalchemy as sa

from forecourt.infra.db import outbox_table
from forecourt.sales.contracts import MAX_BATCH
from forecourt.sales.store import alert_t, sale_t
from tests.sales.conftest import Hq, make_sale, make_sale_v2


async def count(hq: Hq, table: sa.Table, *where: sa.ColumnElement[bool]) -> int:
    async with hq.office.db.connection() as conn:
        return int(
            await conn.scalar(sa.select(sa.func.count()).select_from(table).where(*where)) or 0
        )


async def listed(hq: Hq, sale_id: str) -> dict[str, Any]:
    items = (await hq.client.get("/v1/sales", params={"station": "S001"})).json()["items"]
    return next(i for i in items if i["sale_id"] == sale_id)


def statuses(response: Any) -> list[str]:
    assert response.status_code == 200, response.text
    return [r["status"] for r in response.json()["results"]]


async def test_a_v1_batch_is_accepted_and_stored_as_v1(hq: Hq) -> None:
    sale = make_sale()
    response = await hq.upload("S001", [sale], schema_version=1)
    assert statuses(response) == ["created"]
    stored = await listed(hq, sale["sale_id"])
    assert stored["schema_version"] == 1
    assert (stored["device_id"], stored["device_epoch"], stored["device_flags"]) == (None, None, [])
    assert stored["totalizer_end_ml"] == sale["totalizer_end_ml"]


async def test_a_v2_batch_is_accepted_and_its_device_fields_are_stored_and_listed(hq: Hq) -> None:
    sale = make_sale_v2(
        device_id="pts-7",
        device_epoch=3,
        device_flags=["totalizer_start_derived", "extra_device_decimals"],
        device_raw={"volume_ml": "40.0000"},
    )
    no_totalizer = make_sale_v2(
        totalizer_start_ml=None, totalizer_end_ml=None, device_flags=["no_device_totalizer"]
    )
    response = await hq.upload("S001", [sale, no_totalizer], schema_version=2)
    assert statuses(response) == ["created", "created"]  # edge flags do not quarantine
    assert response.json()["schema_version"] == 2
    stored = await listed(hq, sale["sale_id"])
    assert stored["schema_version"] == 2
    assert stored["device_id"] == "pts-7"
    assert stored["device_epoch"] == 3
    assert stored["device_flags"] == ["extra_device_decimals", "totalizer_start_derived"]
    assert stored["device_raw"] == {"volume_ml": "40.0000"}
    assert stored["quarantined"] is False
    bare = await listed(hq, no_totalizer["sale_id"])
    assert (bare["totalizer_start_ml"], bare["totalizer_end_ml"]) == (None, None)
    assert bare["device_flags"] == ["no_device_totalizer"]


async def test_a_v2_batch_may_hold_v1_items_from_before_the_edge_upgraded(hq: Hq) -> None:
    old = make_sale()  # journaled as v1: schema_version 1, no device fields
    old["schema_version"] = 1
    new = make_sale_v2()
    response = await hq.upload("S001", [old, new], schema_version=2)
    assert statuses(response) == ["created", "created"]
    assert (await listed(hq, old["sale_id"]))["schema_version"] == 1
    assert (await listed(hq, new["sale_id"]))["schema_version"] == 2
    again = await hq.upload("S001", [old, new], schema_version=2)
    assert statuses(again) == ["duplicate", "duplicate"]


async def test_a_v2_item_in_a_v1_batch_is_refused_and_the_rest_created(hq: Hq) -> None:
    v1, v2 = make_sale(), make_sale_v2()
    response = await hq.upload("S001", [v1, v2], schema_version=1)
    assert statuses(response) == ["created", "refused"]
    assert await count(hq, sale_t) == 1


async def test_an_inexact_device_value_quarantines_the_sale_and_alerts(hq: Hq) -> None:
    sale = make_sale_v2(device_flags=["inexact_device_value"], device_raw={"volume_ml": "40.0005"})
    response = await hq.upload("S001", [sale], schema_version=2)
    result = response.json()["results"][0]
    assert result["status"] == "quarantined"
    assert result["flags"] == ["inexact_device_value"]
    assert (await listed(hq, sale["sale_id"]))["quarantined"] is True
    assert await count(hq, alert_t, alert_t.c.kind == "quarantined") == 1
    types = [r for r in await _outbox_types(hq) if r.startswith("com.forecourt.sales.")]
    assert types == ["com.forecourt.sales.sale.quarantined.v1"]


async def test_the_payload_hash_covers_the_device_fields(hq: Hq) -> None:
    sale = make_sale_v2()
    await hq.upload("S001", [sale], schema_version=2)
    for changed in (
        dict(sale, device_epoch=1),
        dict(sale, device_id="pts-other"),
        dict(sale, device_flags=["totalizer_gap"]),
        dict(sale, device_raw={"amount_minor": "302.005"}),
        dict(sale, totalizer_start_ml=None),
    ):
        response = await hq.upload("S001", [changed], schema_version=2)
        assert statuses(response) == ["conflict"], changed
    assert await count(hq, sale_t) == 1


async def test_the_v2_natural_key_names_device_and_epoch_and_works_without_a_totalizer(
    hq: Hq,
) -> None:
    first = make_sale_v2(device_txn=9001)
    same_meter = {k: first[k] for k in ("device_txn", "totalizer_start_ml", "totalizer_end_ml")}
    next_epoch = make_sale_v2(device_epoch=1, **same_meter)  # numbering restarted: no twin
    other_device = make_sale_v2(device_id="pts-S001-2", **same_meter)
    v1_twin = make_sale(**same_meter)  # v1 knows no device: another key
    response = await hq.upload("S001", [first, next_epoch, other_device, v1_twin], schema_version=2)
    assert [r["flags"] for r in response.json()["results"]] == [[], [], [], []]

    twin = make_sale_v2(**same_meter)
    assert response.json()["results"][0]["status"] == "created"
    response = await hq.upload("S001", [twin], schema_version=2)
    assert response.json()["results"][0]["flags"] == ["natural_key_collision"]

    blind = make_sale_v2(device_txn=9002, totalizer_start_ml=None, totalizer_end_ml=None)
    blind_twin = make_sale_v2(device_txn=9002, totalizer_start_ml=None, totalizer_end_ml=None)
    response = await hq.upload("S001", [blind], schema_version=2)
    assert response.json()["results"][0]["flags"] == []
    response = await hq.upload("S001", [blind_twin], schema_version=2)
    assert response.json()["results"][0]["flags"] == ["natural_key_collision"]
    summary = (await hq.client.get("/v1/sales/summary", params={"station": "S001"})).json()
    assert summary["natural_key_duplicates"] == 2


async def test_an_unreadable_item_is_refused_without_an_id_and_alerted(hq: Hq) -> None:
    good = make_sale_v2()
    response = await hq.upload(
        "S001", [42, good, {"sale_id": "nope", "station_seq": "x"}], schema_version=2
    )
    assert statuses(response) == ["refused", "created", "refused"]
    results = response.json()["results"]
    assert [r["index"] for r in results] == [0, 1, 2]
    assert (results[0]["sale_id"], results[0]["station_seq"]) == (None, None)
    assert (results[2]["sale_id"], results[2]["station_seq"]) == (None, None)
    assert results[0]["errors"]
    assert results[2]["errors"]
    async with hq.office.db.connection() as conn:
        alerts = list(await conn.execute(sa.select(alert_t).where(alert_t.c.kind == "refused")))
    assert sorted(json.loads(a.details)["index"] for a in alerts) == [0, 2]
    assert all(a.sale_id is None for a in alerts)
    metrics = (await hq.client.get("/metrics")).text
    assert 'forecourt_sales_ingested_total{status="refused"} 2.0' in metrics
    assert 'forecourt_sales_ingested_total{status="created"} 1.0' in metrics


async def test_an_item_with_a_readable_id_is_refused_under_that_id(hq: Hq) -> None:
    bad = make_sale_v2(device_flags=["Not A Flag"], device_epoch=-1)
    response = await hq.upload("S001", [bad], schema_version=2)
    (result,) = response.json()["results"]
    assert result["status"] == "refused"
    assert (result["sale_id"], result["station_seq"]) == (bad["sale_id"], bad["station_seq"])
    assert {tuple(e["loc"]) for e in result["errors"]} == {("device_flags", 0), ("device_epoch",)}
    async with hq.office.db.connection() as conn:
        alert = (await conn.execute(sa.select(alert_t))).one()
    assert (alert.kind, alert.sale_id) == ("refused", UUID(bad["sale_id"]))
    assert await count(hq, sale_t) == 0


@pytest.mark.parametrize("field", ["shift_id", "grade", "device_id", "price_version"])
async def test_a_nul_character_in_a_text_field_refuses_that_item_only(hq: Hq, field: str) -> None:
    """PostgreSQL text cannot hold NUL: once it answered 500 for the whole batch, which the
    edge would have re-sent for ever."""
    bad = make_sale_v2(**{field: "S\x001"})
    good = make_sale_v2()
    response = await hq.upload("S001", [bad, good], schema_version=2)
    assert statuses(response) == ["refused", "created"]
    (error,) = response.json()["results"][0]["errors"]
    assert error["loc"] == [field]
    assert await count(hq, sale_t) == 1


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"schema_version": 2, "sales": []}, "sales.schema_invalid"),
        ({"schema_version": 2, "sales": {"0": {}}}, "sales.schema_invalid"),
        ({"schema_version": 2}, "sales.schema_invalid"),
        ({"schema_version": 2, "sales": [{}], "station": "S002"}, "sales.schema_invalid"),
        ({"schema_version": "2", "sales": [{}]}, "sales.schema_invalid"),
        ({"sales": [{}]}, "sales.schema_invalid"),
        ([{"schema_version": 2}], "sales.schema_invalid"),
        ({"schema_version": 3, "sales": [{}]}, "sales.unsupported_schema_version"),
    ],
    ids=[
        "no-items",
        "items-not-a-list",
        "items-missing",
        "unknown-envelope-field",
        "version-as-text",
        "version-missing",
        "not-an-object",
        "unknown-version",
    ],
)
async def test_an_envelope_error_refuses_the_whole_batch_and_stores_nothing(
    hq: Hq, body: object, code: str
) -> None:
    if isinstance(body, dict) and body.get("sales") == [{}]:
        body["sales"] = [make_sale_v2(), make_sale()]  # valid items do not save the batch
    response = await hq.client.post(
        "/v1/stations/S001/sales:batch", json=body, headers=hq.auth("S001")
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == code
    if code == "sales.unsupported_schema_version":
        assert error["details"]["supported"] == [1, 2]
    else:
        assert error["details"]["errors"]
    assert await count(hq, sale_t) == 0
    assert await count(hq, alert_t) == 0
    assert await count(hq, outbox_table, outbox_table.c.type.like("com.forecourt.sales.%")) == 0


async def test_more_items_than_a_batch_holds_is_an_envelope_error(hq: Hq) -> None:
    item = make_sale_v2()
    body = {"schema_version": 2, "sales": [item] * (MAX_BATCH + 1)}
    response = await hq.client.post(
        "/v1/stations/S001/sales:batch", json=body, headers=hq.auth("S001")
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "sales.schema_invalid"
    assert [e["loc"] for e in error["details"]["errors"]] == [["sales"]]
    assert await count(hq, sale_t) == 0


async def _outbox_types(hq: Hq) -> list[str]:
    async with hq.office.db.connection() as conn:
        return list(await conn.scalars(sa.select(outbox_table.c.type).order_by(outbox_table.c.id)))


def test_a_sale_row_lines_up_with_the_table_columns() -> None:
    from datetime import UTC, date, datetime

    from forecourt.sales.domain import DispenseType, Sale
    from forecourt.sales.handlers import _row
    from forecourt.sales.store import SALE_COLUMNS

    sale = Sale(
        sale_id=UUID("0193a5b2-7c4e-7000-8000-000000000001"),
        station_code="S009",
        station_seq=17,
        fuelling_point=3,
        nozzle=2,
        grade="95",
        volume_ml=40120,
        unit_price_mmu=755000,
        amount_minor=30291,
        currency="CNY",
        price_version="p-95",
        snapshot_version=4,
        totalizer_start_ml=None,
        totalizer_end_ml=1240120,
        device_txn=812,
        dispense_type=DispenseType.PUMP_TEST,
        started_at=datetime(2026, 11, 25, 1, 12, tzinfo=UTC),
        ended_at=datetime(2026, 11, 25, 1, 13, tzinfo=UTC),
        business_date=date(2026, 11, 24),
        shift_id="2026-11-24/3",
        schema_version=2,
        device_id="pts-9",
        device_epoch=5,
        device_flags=("no_device_totalizer", "totalizer_gap"),
        device_raw=(("volume_ml", "40.1205"),),
    )
    now = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)
    row = dict(zip(SALE_COLUMNS, _row(sale, "digest", True, ["grade_mismatch"], now), strict=True))
    expected = {name: getattr(sale, name) for name in SALE_COLUMNS if hasattr(sale, name)} | {
        "dispense_type": "pump_test",
        "payload_hash": "digest",
        "quarantined": True,
        "flags": "grade_mismatch",
        "received_at": now,
        "device_flags": "no_device_totalizer,totalizer_gap",
        "device_raw": '{"volume_ml": "40.1205"}',
    }
    assert row == expected
