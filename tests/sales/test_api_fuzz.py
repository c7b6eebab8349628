"""OpenAPI fuzzing of HQ with schemathesis, on SQLite and on PostgreSQL: every operation its
document describes, with data that fits the document and data that does not, sent with a
valid station credential for S001. No answer may be a 500, nor have a status, a content
type or a body the document does not describe.
Each operation is called signed in: the station routes (uploads, snapshot) with S001's
credential, every other one with an HQ admin's access token (the sign-in routes take
it and ignore it).

Bounded and deterministic: a fixed number of cases per operation, derandomized. HQ runs in
schemathesis' own event loop (the one its ASGI client serves requests in): it starts and
stops in the app's lifespan, so its database connections live in that loop. One HQ per
database for the whole module; uploads are fuzzed first, so that the queries after them
have sales, alerts and gaps to answer about.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from anyio.from_thread import start_blocking_portal
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis import APIOperation, Case, CheckFunction, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema

from forecourt.bootstrap import build_head_office
from forecourt.infra.access import app_routes, route_policy
from forecourt.network.handlers import SAMPLE_CHAIN, import_chain, issue_credential, load_chain_file
from forecourt.settings import Settings
from tests.conftest import PG_ADMIN_URL, _port_open, fresh_pg_database, service_missing
from tests.support import staff_headers

CHECKS: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
EXAMPLES = {GenerationMode.POSITIVE: 50, GenerationMode.NEGATIVE: 25}
STATION = "S001"
BATCH = "POST /v1/stations/{code}/sales:batch"
SNAPSHOT = "GET /v1/stations/{code}/snapshot"
# Operations that take the station credential: the station in their path is the credential's.
CREDENTIALED = {"/v1/stations/{code}/sales:batch", "/v1/stations/{code}/snapshot"}
# Access tokens outlive the fuzzing of a database (the default, 300 s, may not).
TOKEN_S = 3600.0


# HQ's OpenAPI document, from an HQ built (not started: building connects nothing).
APP = build_head_office(Settings(database_url="sqlite+aiosqlite://", log_json=False)).app
DOCUMENT = APP.openapi()
# The paths of its routes open to anyone (no credential): sign-in, health, docs.
OPEN_PATHS = {
    getattr(route, "path", "")
    for route in app_routes(APP.routes)
    if (policy := route_policy(route)) is not None and policy.is_open
}
# Its operations, uploads first.
OPERATIONS = sorted(
    (f"{method.upper()} {path}" for path, item in DOCUMENT["paths"].items() for method in item),
    key=lambda label: not label.startswith("POST "),
)


@dataclass
class Fuzzed:
    """HQ under fuzzing: its document as schemathesis loaded it, the station credential
    HQ issued when it started, the access token of an HQ admin signed in then, and what it
    answered (per operation and status; upload verdicts)."""

    schema: OpenApiSchema
    token: str
    staff: dict[str, str]
    answers: Counter[tuple[str, int]] = field(default_factory=Counter)
    verdicts: Counter[str] = field(default_factory=Counter)

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}

    def auth_for(self, operation: APIOperation) -> dict[str, str]:
        """The station credential on the station routes, the admin's token elsewhere."""
        return self.auth if operation.path in CREDENTIALED else self.staff


def _app_with_lifespan(database_url: str, credential: dict[str, str]) -> FastAPI:
    office = build_head_office(
        Settings(database_url=database_url, log_json=False, identity_access_token_s=TOKEN_S)
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await office.start(relay=False)
        await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
        credential["token"] = (await issue_credential(office.db, STATION))[1]
        credential["staff"] = (await staff_headers(office.identity))["authorization"]
        try:
            yield
        finally:
            await office.stop()

    office.app.router.lifespan_context = lifespan
    return office.app


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fuzzed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fuzzed]:
    with ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('fuzz') / 'hq.db'}"
        else:
            if not _port_open(PG_ADMIN_URL, 5432):
                service_missing(f"PostgreSQL not reachable at {PG_ADMIN_URL}")
            portal = stack.enter_context(start_blocking_portal())
            url = stack.enter_context(portal.wrap_async_context_manager(fresh_pg_database()))
        credential: dict[str, str] = {}
        app = _app_with_lifespan(url, credential)
        # Loading the document starts the app's lifespan: HQ starts, the credential is issued.
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        stack.callback(shutdown_lifespans)  # HQ stops in its loop, before its database goes
        assert credential.get("token"), "HQ started in its lifespan and issued a credential"
        assert credential.get("staff"), "an HQ admin signed in"
        result = Fuzzed(schema, credential["token"], {"authorization": credential["staff"]})
        yield result
        print(
            f"\nfuzzed on {request.param}: {sum(result.answers.values())} requests, "
            f"{dict(sorted(result.answers.items()))}, upload verdicts {dict(result.verdicts)}"
        )


def _modes(operation: APIOperation) -> list[GenerationMode]:
    """Positive cases always; negative ones where something can be invalid (a body, or a
    parameter with a type or a constraint beyond "any text")."""
    raw = operation.definition.raw
    constrained = any(
        set(p.get("schema", {})) - {"type", "title", "description"}
        or p.get("schema", {}).get("type", "string") != "string"
        for p in raw.get("parameters", [])
    )
    if constrained or "requestBody" in raw:
        return [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    return [GenerationMode.POSITIVE]


def fuzz(
    fuzzed: Fuzzed,
    operation: APIOperation,
    mode: GenerationMode,
    checks: list[CheckFunction],
    max_examples: int,
) -> None:
    fixed = {"code": STATION} if operation.path in CREDENTIALED else None
    auth = fuzzed.auth_for(operation)

    @settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,  # the same cases on every run
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=fixed))
    def run(case: Case) -> None:
        response = case.call(headers=auth)
        fuzzed.answers[(operation.label, response.status_code)] += 1
        if operation.label == BATCH and response.status_code == 200:
            fuzzed.verdicts.update(r["status"] for r in json.loads(response.content)["results"])
        case.validate_response(response, checks=checks, headers=auth)

    run()


@pytest.mark.parametrize("label", OPERATIONS)
def test_no_operation_answers_a_500_or_anything_its_document_does_not_describe(
    fuzzed: Fuzzed, label: str
) -> None:
    operation = fuzzed.schema.find_operation_by_label(label)
    assert operation is not None, label
    for mode in _modes(operation):
        fuzz(fuzzed, operation, mode, CHECKS, EXAMPLES[mode])
    # Every case got an answer the document describes (else fuzz raised)
    assert sum(n for (op, _), n in fuzzed.answers.items() if op == label) > 0
    if label == BATCH:
        # And the fuzzer got through the upload's body: batches it made were judged, item
        # by item
        assert fuzzed.answers[(BATCH, 200)] > 0, fuzzed.answers
        assert sum(fuzzed.verdicts.values()) > 0


def test_the_snapshot_answers_its_documented_schema(fuzzed: Fuzzed) -> None:
    # Its station's business-day cut-off and shift starts are local wall-clock times (no
    # offset): documented as such, the answer matches its schema.
    operation = fuzzed.schema.find_operation_by_label(SNAPSHOT)
    assert operation is not None
    fuzz(fuzzed, operation, GenerationMode.POSITIVE, [response_schema_conformance], 5)
    assert fuzzed.answers[(SNAPSHOT, 200)] > 0, fuzzed.answers


def test_every_operation_of_the_document_is_fuzzed() -> None:
    assert BATCH in OPERATIONS
    assert SNAPSHOT in OPERATIONS
    assert len(OPERATIONS) == len(set(OPERATIONS)) >= 9


# --- the document itself ----------------------------------------------------------------------


def operation_of(label: str) -> dict[str, Any]:
    method, path = label.split(" ", 1)
    return DOCUMENT["paths"][path][method.lower()]  # type: ignore[no-any-return]


def refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def test_the_upload_documents_its_body_as_either_batch_version() -> None:
    body = operation_of(BATCH)["requestBody"]
    assert body["required"] is True
    schema = body["content"]["application/json"]["schema"]
    assert schema["oneOf"] == [
        {"$ref": "#/components/schemas/SalesBatchV1"},
        {"$ref": "#/components/schemas/SalesBatchV2"},
    ]
    schemas = DOCUMENT["components"]["schemas"]
    v2_items = schemas["SalesBatchV2"]["properties"]["sales"]["items"]
    assert v2_items["oneOf"] == [
        {"$ref": "#/components/schemas/SaleV1"},
        {"$ref": "#/components/schemas/SaleV2"},
    ]
    assert schemas["SalesBatchV2"]["properties"]["sales"]["maxItems"] == 5000
    assert schemas["SaleV2"]["additionalProperties"] is False


def test_every_reference_in_the_document_resolves() -> None:
    schemas = DOCUMENT["components"]["schemas"]
    for ref in set(refs(DOCUMENT)):
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    assert "$defs" not in str(DOCUMENT["paths"])


def test_guarded_routes_document_the_bearer_credential_and_open_ones_need_none() -> None:
    # One scheme for every credential (staff or service access token, station credential);
    # every route but the open ones (sign-in, health, docs) requires it.
    assert DOCUMENT["components"]["securitySchemes"]["Bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": DOCUMENT["components"]["securitySchemes"]["Bearer"]["description"],
    }
    assert set(DOCUMENT["components"]["securitySchemes"]) == {"Bearer"}
    assert {"/v1/auth/sign-in", "/v1/auth/token", "/health"} <= OPEN_PATHS
    assert not CREDENTIALED & OPEN_PATHS
    for label in OPERATIONS:
        security = operation_of(label).get("security")
        if label.split(" ", 1)[1] in OPEN_PATHS:
            assert security is None, label
        else:
            assert security == [{"Bearer": []}], label
    # Its description names both kinds: where a staff token comes from, and a station's.
    description = DOCUMENT["components"]["securitySchemes"]["Bearer"]["description"]
    assert "/v1/auth/sign-in" in description
    assert "station" in description


@pytest.mark.parametrize(
    ("label", "statuses"),
    [
        (BATCH, {"200", "401", "403", "404", "413", "422", "429"}),
        ("GET /v1/stations/{code}/snapshot", {"200", "401", "403", "404", "422", "429"}),
        # Staff reads: 401 without a (valid) token, 403 beyond its grants, 429 after too
        # many bad tokens from one source.
        ("GET /v1/network/stations/{code}", {"200", "401", "403", "404", "422", "429"}),
        ("GET /v1/sales", {"200", "401", "403", "422", "429"}),
        ("GET /v1/sales/summary", {"200", "401", "403", "422", "429"}),
        ("GET /v1/sales/alerts", {"200", "401", "403", "422", "429"}),
        ("GET /v1/stations/{code}/sequence", {"200", "401", "403", "422", "429"}),
        # 422: a control character in the query
        ("GET /v1/network/grades", {"200", "401", "403", "422", "429"}),
    ],
)
def test_each_route_documents_every_status_it_answers_errors_as_the_envelope(
    label: str, statuses: set[str]
) -> None:
    responses = operation_of(label)["responses"]
    assert set(responses) == statuses
    for status, response in responses.items():
        if status.startswith("2"):
            continue
        schema = response["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorEnvelope"}, (label, status)


def test_the_documented_envelope_has_a_code_a_message_and_the_trace_id() -> None:
    envelope = DOCUMENT["components"]["schemas"]["ErrorEnvelope"]
    assert envelope["required"] == ["error"]
    error = envelope["properties"]["error"]
    assert error["required"] == ["code", "message", "trace_id"]
    assert set(error["properties"]) == {"code", "message", "details", "trace_id"}


def test_the_snapshot_documents_station_times_as_local_wall_clock_times() -> None:
    # Not format: time (RFC 3339 full-time has an offset): the station's own local time.
    station = DOCUMENT["components"]["schemas"]["SnapshotStation"]["properties"]
    for schema in (station["business_day_cutoff"], station["shift_starts"]["items"]):
        assert schema["type"] == "string"
        assert "format" not in schema
        assert "time zone" in schema["description"]
        pattern = re.compile(schema["pattern"])
        for answered in ("06:00:00", "23:59:59", "00:00", "14:00:00.000005"):
            assert pattern.fullmatch(answered), answered
        for not_local in ("06:00:00Z", "06:00:00+08:00", "24:00:00", "6:00"):
            assert not pattern.fullmatch(not_local), not_local
