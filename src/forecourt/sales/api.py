"""HTTP routes of ``sales``: the edge upload endpoint and the query API."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import date
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Path, Query, Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import BeforeValidator, TypeAdapter, ValidationError, WithJsonSchema
from pydantic_core import PydanticSerializationError, to_json

from forecourt.infra.access import require
from forecourt.infra.db import Database
from forecourt.infra.http import (
    DEFAULT_MAX_JSON_DEPTH,
    error_responses,
    json_too_deep,
)
from forecourt.kernel.access import Permission, Policy, PrincipalKind
from forecourt.network.contracts import StationDirectory
from forecourt.sales.contracts import (
    BIG,
    FIRST_DATE,
    LAST_DATE,
    SUPPORTED_SCHEMA_VERSIONS,
    AnySale,
    BatchEnvelope,
    BatchResult,
    SalesBatch,
    SaleV1,
)
from forecourt.sales.domain import SchemaInvalid, UnsupportedSchemaVersion
from forecourt.sales.handlers import (
    IngestCounters,
    RefusedItem,
    UploadBatch,
    ingest_batch,
    sales_summary,
)
from forecourt.sales.store import SalesStore

_BATCH: TypeAdapter[Any] = TypeAdapter(SalesBatch)
# Items as each envelope version allows them: v1 batches hold v1 sales only.
_ITEMS: dict[int, TypeAdapter[Any]] = {
    1: TypeAdapter(list[SaleV1]),
    2: TypeAdapter(list[AnySale]),
}
_UNION_TAGS = frozenset({"1", "2"})  # AnySale's tags, which pydantic puts in error locations
MAX_ITEM_ERRORS = 50
# The request body of the upload route, as OpenAPI documents it (the route reads the body
# itself): either envelope version, items as each allows them. Without the discriminator:
# OpenAPI's names a string property, ours is an integer, and each version's
# ``schema_version`` const tells the two apart already.
BATCH_BODY_SCHEMA = _BATCH.json_schema(ref_template="#/components/schemas/{model}")
BATCH_BODY_SCHEMA.pop("discriminator", None)


def parse_batch(body: bytes, *, max_json_depth: int = DEFAULT_MAX_JSON_DEPTH) -> UploadBatch:
    """Validate an upload body: envelope errors are the batch's (422, naming the fields);
    an invalid item is refused on its own, at its index, and the valid ones go on.

    A body nested deeper than ``max_json_depth`` is refused as the batch's error (a valid
    batch nests 4 deep, so only a body that fails the fast path is looked at)."""
    try:
        batch = _BATCH.validate_json(body)  # its parser stops at 200 levels by itself
    except ValidationError:
        return _parse_item_by_item(body, max_json_depth)
    # The fast path: one validation for the whole batch, as before per-item verdicts.
    return UploadBatch(schema_version=batch.schema_version, sales=batch.sales)


def _parse_item_by_item(body: bytes, max_json_depth: int) -> UploadBatch:
    # The standard library's parser recurses: a deep body would be a RecursionError.
    if json_too_deep(body, max_json_depth):
        raise SchemaInvalid(
            f"body nests arrays and objects deeper than {max_json_depth} levels",
            errors=[{"loc": [], "msg": "JSON nested too deep", "type": "json_too_deep"}],
        )
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
    # Text JSON can carry but Unicode cannot (a lone surrogate escape, "\ud800"): that item
    # is refused on its own, like any other invalid one.
    problems: dict[int, list[dict[str, Any]]] = {}
    try:
        payload = to_json(items)
    except PydanticSerializationError:
        bad = [i for i, item in enumerate(items) if not _is_unicode(item)]
        problems = {i: [dict(_NOT_UNICODE)] for i in bad}
        payload = to_json([item for i, item in enumerate(items) if i not in problems])
    checked = [i for i in range(len(items)) if i not in problems]
    try:
        adapter.validate_json(payload)
    except ValidationError as exc:
        for e in exc.errors():
            index, *loc = e["loc"]
            if loc and loc[0] in _UNION_TAGS:
                loc = loc[1:]
            problems.setdefault(checked[int(index)], []).append(
                {"loc": [_text(part) for part in loc], "msg": e["msg"], "type": e["type"]}
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


_NOT_UNICODE = {"loc": [], "msg": "text is not valid Unicode", "type": "string_unicode"}


def _is_unicode(item: Any) -> bool:
    try:
        to_json(item)
    except PydanticSerializationError:
        return False
    return True


def _text(part: Any) -> Any:
    """An error location's part as it can be answered (a key may hold a lone surrogate)."""
    if isinstance(part, str):
        return part.encode("utf-8", "backslashreplace").decode("utf-8")
    return part


def _errors(exc: ValidationError, limit: int) -> list[dict[str, Any]]:
    return [
        {"loc": [_text(part) for part in e["loc"]], "msg": e["msg"], "type": e["type"]}
        for e in exc.errors()
    ][:limit]


# --- query parameters: strict, so that a typo is an error rather than another query ---------

QUERY_DATES = (FIRST_DATE, LAST_DATE)  # the business dates an upload can carry
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_DECIMAL = re.compile(r"-?[0-9]{1,18}")
_CANONICAL_UUID = re.compile(r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")


def _query_date(value: Any) -> Any:
    """YYYY-MM-DD, a day of the calendar within QUERY_DATES (not ``0``, a Unix time)."""
    if not isinstance(value, str):
        return value
    if not _ISO_DATE.fullmatch(value):
        raise ValueError("a date is written YYYY-MM-DD")
    try:
        day = date.fromisoformat(value)
    except ValueError:
        raise ValueError("not a day of the calendar") from None
    low, high = QUERY_DATES
    if not low <= day <= high:
        raise ValueError(f"a date from {low} to {high}")
    return day


def _query_int(value: Any) -> Any:
    """Decimal digits only (not ``1.0``, ``1_000``, `` 1``)."""
    if isinstance(value, str):
        if not _DECIMAL.fullmatch(value):
            raise ValueError("an integer is written in decimal digits")
        return int(value)
    return value


def _query_uuid(value: Any) -> Any:
    """The canonical 8-4-4-4-12 form a sale id is answered in."""
    if isinstance(value, str):
        if not _CANONICAL_UUID.fullmatch(value):
            raise ValueError("a sale id is written as 8-4-4-4-12 hexadecimal digits")
        return UUID(value)
    return value


QueryDate = Annotated[
    date,
    BeforeValidator(_query_date),
    WithJsonSchema(
        {
            "type": "string",
            "format": "date",
            "description": f"YYYY-MM-DD, {QUERY_DATES[0]} to {QUERY_DATES[1]}",
        }
    ),
]
QueryInt = Annotated[int, BeforeValidator(_query_int)]
QuerySaleId = Annotated[
    UUID, BeforeValidator(_query_uuid), WithJsonSchema({"type": "string", "format": "uuid"})
]
CODE_LENGTH = 40  # station codes and grades, as the network stores them
QueryCode = Annotated[str, Query(max_length=CODE_LENGTH)]


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


# A station uploads its own sales (its credential); staff read them where they may: a
# station-scoped reader names the station (?station=CODE), a chain-wide one need not.
UPLOAD = Policy(
    Permission.SALES_UPLOAD, station="path:code", kinds=frozenset({PrincipalKind.STATION})
)
READ = Policy(Permission.SALES_READ, station="query:station")
READ_STATION = Policy(Permission.SALES_READ, station="path:code")
STAFF_READ_ERRORS = error_responses(401, 403, 422, 429)


def build_router(
    db: Database,
    directory: StationDirectory,
    registry: CollectorRegistry,
    *,
    ingest_concurrency: int = 2,
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH,
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

    @router.post(
        "/v1/stations/{code}/sales:batch",
        response_model=BatchResult,
        dependencies=[require(UPLOAD)],
        responses=error_responses(401, 403, 404, 413, 422, 429),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": BATCH_BODY_SCHEMA}},
            }
        },
    )
    async def upload_sales(code: str, request: Request) -> Response:  # noqa: ARG001
        """Upload journaled sales. The station is the credential's, never the body's (the
        policy refuses a credential of another station: 403 ``auth.wrong_station``)."""
        station = request.state.principal.subject
        body = await request.body()
        async with admission:
            batch = parse_batch(body, max_json_depth=max_json_depth)
            with batch_seconds.time():
                result = await ingest_batch(
                    db,
                    directory,
                    station,
                    batch,
                    traceparent=request.state.traceparent,
                    counters=counters,
                )
        # Serialised once here (the BatchResult shape); a model per sale would cost more
        # than the rest of the answer.
        return Response(result.to_json(), media_type="application/json")

    @router.get("/v1/sales", dependencies=[require(READ)], responses=STAFF_READ_ERRORS)
    async def list_sales(
        station: QueryCode | None = None,
        business_date: QueryDate | None = None,
        grade: QueryCode | None = None,
        after: QuerySaleId | None = None,
        limit: Annotated[QueryInt, Query(ge=1, le=5000)] = 500,
    ) -> dict[str, Any]:
        async with db.connection() as conn:
            rows = await SalesStore(conn).list_sales(
                station=station, business_date=business_date, grade=grade, after=after, limit=limit
            )
        items = [_sale_json(r) for r in rows]
        return {"items": items, "next_after": items[-1]["sale_id"] if len(items) == limit else None}

    @router.get("/v1/sales/summary", dependencies=[require(READ)], responses=STAFF_READ_ERRORS)
    async def summary(
        station: QueryCode | None = None,
        business_date: QueryDate | None = None,
        grade: QueryCode | None = None,
    ) -> dict[str, Any]:
        return await sales_summary(db, station=station, business_date=business_date, grade=grade)

    @router.get(
        "/v1/stations/{code}/sequence",
        dependencies=[require(READ_STATION)],
        responses=STAFF_READ_ERRORS,
    )
    async def sequence(code: Annotated[str, Path(max_length=CODE_LENGTH)]) -> dict[str, Any]:
        async with db.connection() as conn:
            book = await SalesStore(conn).sequence_book(code)
        return {
            "station": code,
            "high_water_mark": book.high_water,
            "gaps": [list(g) for g in book.gaps],
            "missing": book.missing_count(),
        }

    @router.get("/v1/sales/alerts", dependencies=[require(READ)], responses=STAFF_READ_ERRORS)
    async def alerts(
        station: QueryCode | None = None,
        limit: Annotated[QueryInt, Query(ge=1, le=1000)] = 100,
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
