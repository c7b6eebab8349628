"""HTTP routes of ``sales``: the edge upload endpoint and the query API."""

from __future__ import annotations

import asyncio
import json
from datetime import date
from typing import Any
from uuid import UUID

from fastapi import APIRouter, Query, Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import TypeAdapter, ValidationError
from pydantic_core import to_json

from forecourt.infra.db import Database
from forecourt.infra.http import bearer_token
from forecourt.kernel.errors import Unauthorized
from forecourt.network.contracts import StationDirectory
from forecourt.sales.contracts import (
    BIG,
    SUPPORTED_SCHEMA_VERSIONS,
    AnySale,
    BatchEnvelope,
    BatchResult,
    SalesBatch,
    SaleV1,
)
from forecourt.sales.domain import SchemaInvalid, StationMismatch, UnsupportedSchemaVersion
from forecourt.sales.handlers import IngestCounters, RefusedItem, UploadBatch, ingest_batch
from forecourt.sales.store import SalesStore

_BATCH: TypeAdapter[Any] = TypeAdapter(SalesBatch)
# Items as each envelope version allows them: v1 batches hold v1 sales only.
_ITEMS: dict[int, TypeAdapter[Any]] = {
    1: TypeAdapter(list[SaleV1]),
    2: TypeAdapter(list[AnySale]),
}
_UNION_TAGS = frozenset({"1", "2"})  # AnySale's tags, which pydantic puts in error locations
MAX_ITEM_ERRORS = 50


def parse_batch(body: bytes) -> UploadBatch:
    """Validate an upload body: envelope errors are the batch's (422, naming the fields);
    an invalid item is refused on its own, at its index, and the valid ones go on."""
    try:
        batch = _BATCH.validate_json(body)
    except ValidationError:
        return _parse_item_by_item(body)
    # The fast path: one validation for the whole batch, as before per-item verdicts.
    return UploadBatch(schema_version=batch.schema_version, sales=batch.sales)


def _parse_item_by_item(body: bytes) -> UploadBatch:
    try:
        document = json.loads(body)
    except ValueError:
        raise SchemaInvalid("body is not valid JSON", errors=[]) from None
    version = document.get("schema_version") if isinstance(document, dict) else None
    if type(version) is int and version not in SUPPORTED_SCHEMA_VERSIONS:
        raise UnsupportedSchemaVersion(
            f"upload schema v{version} is not supported",
            supported=list(SUPPORTED_SCHEMA_VERSIONS),
        )
    try:
        envelope = BatchEnvelope.model_validate(document)
    except ValidationError as exc:
        raise SchemaInvalid(
            "batch does not match the upload schema", errors=_errors(exc, 100)
        ) from None
    items = envelope.sales
    adapter = _ITEMS[envelope.schema_version]
    problems: dict[int, list[dict[str, Any]]] = {}
    try:
        adapter.validate_json(to_json(items))
    except ValidationError as exc:
        for e in exc.errors():
            index, *loc = e["loc"]
            if loc and loc[0] in _UNION_TAGS:
                loc = loc[1:]
            problems.setdefault(int(index), []).append(
                {"loc": loc, "msg": e["msg"], "type": e["type"]}
            )
    indices = [i for i in range(len(items)) if i not in problems]
    # The valid items, validated again on their own: each item's validity is its own.
    sales = adapter.validate_json(to_json([items[i] for i in indices])) if indices else []
    refused = [
        RefusedItem(
            index=i,
            sale_id=_readable_uuid(items[i]),
            station_seq=_readable_seq(items[i]),
            errors=errors[:MAX_ITEM_ERRORS],
        )
        for i, errors in sorted(problems.items())
    ]
    return UploadBatch(
        schema_version=envelope.schema_version, sales=sales, indices=indices, refused=refused
    )


def _errors(exc: ValidationError, limit: int) -> list[dict[str, Any]]:
    return [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()][
        :limit
    ]


def _readable_uuid(item: Any) -> UUID | None:
    value = item.get("sale_id") if isinstance(item, dict) else None
    if not isinstance(value, str):
        return None
    try:
        return UUID(value)
    except ValueError:
        return None


def _readable_seq(item: Any) -> int | None:
    value = item.get("station_seq") if isinstance(item, dict) else None
    return value if type(value) is int and -BIG < value < BIG else None


def build_router(
    db: Database,
    directory: StationDirectory,
    registry: CollectorRegistry,
    *,
    ingest_concurrency: int = 2,
) -> APIRouter:
    router = APIRouter(tags=["sales"])
    # Uploads are CPU-bound in this process: letting every one in at once shares the CPU
    # among all of them, so each, large ones above all, takes as long as the slowest. A
    # few at a time, first come first served (asyncio's semaphore is fair), answers each
    # sooner; two overlap one's database round trips with another's work.
    admission = asyncio.Semaphore(max(1, ingest_concurrency))
    ingested = Counter(
        "forecourt_sales_ingested",
        "Sales answered by HQ ingest, by status",
        ["status"],
        registry=registry,
    )
    flagged = Counter(
        "forecourt_sales_flagged", "Sale flags raised at ingest", ["flag"], registry=registry
    )
    batch_seconds = Histogram(
        "forecourt_sales_batch_seconds",
        "Time to ingest one upload batch",
        registry=registry,
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    )
    counters = IngestCounters(
        on_status=lambda s, n: ingested.labels(s).inc(n),
        on_flag=lambda f, n: flagged.labels(f).inc(n),
    )

    @router.post("/v1/stations/{code}/sales:batch", response_model=BatchResult)
    async def upload_sales(code: str, request: Request) -> Response:
        """Upload journaled sales. The station is the credential's, never the body's."""
        identity = await directory.authenticate(bearer_token(request))
        if identity is None:
            raise Unauthorized("unknown station credential", code="auth.unknown_credential")
        if identity.code != code:
            raise StationMismatch(f"credential is for {identity.code}, not {code}")
        body = await request.body()
        async with admission:
            batch = parse_batch(body)
            with batch_seconds.time():
                result = await ingest_batch(
                    db,
                    directory,
                    identity.code,
                    batch,
                    traceparent=request.state.traceparent,
                    counters=counters,
                )
        # Serialised once here (the BatchResult shape); a model per sale would cost more
        # than the rest of the answer.
        return Response(result.to_json(), media_type="application/json")

    @router.get("/v1/sales")
    async def list_sales(
        station: str | None = None,
        business_date: date | None = None,
        grade: str | None = None,
        after: UUID | None = None,
        limit: int = Query(default=500, ge=1, le=5000),
    ) -> dict[str, Any]:
        async with db.connection() as conn:
            rows = await SalesStore(conn).list_sales(
                station=station, business_date=business_date, grade=grade, after=after, limit=limit
            )
        items = [_sale_json(r) for r in rows]
        return {"items": items, "next_after": items[-1]["sale_id"] if len(items) == limit else None}

    @router.get("/v1/sales/summary")
    async def summary(
        station: str | None = None, business_date: date | None = None, grade: str | None = None
    ) -> dict[str, Any]:
        async with db.connection() as conn:
            store = SalesStore(conn)
            rows = await store.summary(station=station, business_date=business_date, grade=grade)
            duplicates = await store.natural_key_duplicates(station)
        return {
            "groups": [
                {
                    "station": r.station_code,
                    "grade": r.grade,
                    "quarantined": bool(r.quarantined),
                    "sales": int(r.sales),
                    "volume_ml": int(r.volume_ml),
                    "amount_minor": int(r.amount_minor),
                }
                for r in rows
            ],
            "natural_key_duplicates": duplicates,
        }

    @router.get("/v1/stations/{code}/sequence")
    async def sequence(code: str) -> dict[str, Any]:
        async with db.connection() as conn:
            book = await SalesStore(conn).sequence_book(code)
        return {
            "station": code,
            "high_water_mark": book.high_water,
            "gaps": [list(g) for g in book.gaps],
            "missing": book.missing_count(),
        }

    @router.get("/v1/sales/alerts")
    async def alerts(
        station: str | None = None, limit: int = Query(default=100, ge=1, le=1000)
    ) -> list[dict[str, Any]]:
        async with db.connection() as conn:
            rows = await SalesStore(conn).alerts(station, limit)
        return [
            {
                "station": r.station_code,
                "kind": r.kind,
                "sale_id": str(r.sale_id) if r.sale_id else None,
                "details": json.loads(r.details),
                "raised_at": r.raised_at.isoformat(),
            }
            for r in rows
        ]

    return router


def _sale_json(r: Any) -> dict[str, Any]:
    return {
        "sale_id": str(r.sale_id),
        "station": r.station_code,
        "station_seq": r.station_seq,
        "business_date": r.business_date.isoformat(),
        "shift_id": r.shift_id,
        "fuelling_point": r.fuelling_point,
        "nozzle": r.nozzle,
        "grade": r.grade,
        "volume_ml": r.volume_ml,
        "unit_price_mmu": r.unit_price_mmu,
        "amount_minor": r.amount_minor,
        "currency": r.currency,
        "price_version": r.price_version,
        "snapshot_version": r.snapshot_version,
        "totalizer_start_ml": r.totalizer_start_ml,
        "totalizer_end_ml": r.totalizer_end_ml,
        "device_txn": r.device_txn,
        "device_id": r.device_id,
        "device_epoch": r.device_epoch,
        "device_flags": [f for f in r.device_flags.split(",") if f],
        "device_raw": json.loads(r.device_raw) if r.device_raw is not None else None,
        "schema_version": r.schema_version,
        "dispense_type": r.dispense_type,
        "started_at": r.started_at.isoformat() if r.started_at else None,
        "ended_at": r.ended_at.isoformat(),
        "quarantined": r.quarantined,
        "flags": [f for f in r.flags.split(",") if f],
        "received_at": r.received_at.isoformat(),
    }
