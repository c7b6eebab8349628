"""The HTTP plumbing every app shares (``install_common``), on the real HQ and edge apps:
every error answers in the one envelope, and /docs works without internet."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from forecourt.bootstrap import build_head_office
from forecourt.edge.node import build_edge_node
from forecourt.infra.http import install_common
from forecourt.settings import EdgeSettings, Settings
from tests.conftest import fresh_pg_database
from tests.support import staff_headers

# The edge's read-only credential: its reads (status, tanks, pumps) are reached, as before.
READER = "reader-secret-of-sixteen+"


class FixedClock:
    def now(self) -> datetime:
        return datetime(2026, 6, 1, 4, 0, tzinfo=UTC)


@contextlib.asynccontextmanager
async def hq_app(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """HQ, its client signed in as an HQ admin (every route is reached, as before guards)."""
    office = build_head_office(
        Settings(database_url=database_url, log_json=False), clock=FixedClock()
    )
    await office.start(relay=False)
    try:
        transport = httpx.ASGITransport(app=office.app)
        staff = await staff_headers(office.identity)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://hq", headers=staff
        ) as client:
            yield client
    finally:
        await office.stop()


@contextlib.asynccontextmanager
async def edge_app(journal: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The edge app over its journal, with no HQ and no forecourt (none is needed to serve);
    its client sends a reader credential (the station's reads are reached, as before)."""
    settings = EdgeSettings(
        station="S001",
        hq_url="http://127.0.0.1:9",
        credential="x" * 32,
        journal_path=journal,
        log_json=False,
        reader_tokens={"test-reader": READER},
    )
    no_forecourt = lambda snapshot: None  # noqa: E731
    node = build_edge_node(settings, FixedClock(), no_forecourt)  # type: ignore[arg-type]
    await node.journal.open()
    try:
        transport = httpx.ASGITransport(app=node.app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://edge",
            headers={"authorization": f"Bearer {READER}"},
        ) as client:
            yield client
    finally:
        await node.journal.close()


@pytest.fixture
async def hq_client(db_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """HQ on SQLite and on PostgreSQL."""
    async with hq_app(db_url) as client:
        yield client


@pytest.fixture
async def edge_client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with edge_app(tmp_path / "edge.db") as client:
        yield client


@pytest.fixture(params=["hq-sqlite", "hq-postgresql", "edge"])
async def client(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[httpx.AsyncClient]:
    """Each test using it runs on HQ (over both databases) and on the edge app."""
    if request.param == "edge":
        async with edge_app(tmp_path / "edge.db") as edge:
            yield edge
    elif request.param == "hq-sqlite":
        async with hq_app(f"sqlite+aiosqlite:///{tmp_path / 'hq.db'}") as hq:
            yield hq
    else:
        async with fresh_pg_database() as url, hq_app(url) as hq:
            yield hq


def assert_envelope(response: httpx.Response) -> dict[str, object]:
    """The response is the one error envelope, and nothing else; returns its ``error``."""
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["code"], str)
    assert re.fullmatch(r"[a-z]+(\.[a-z0-9_]+)+", error["code"]), error
    assert isinstance(error["message"], str)
    assert error["message"]
    assert set(error) <= {"code", "message", "details", "trace_id"}
    assert re.fullmatch(r"[0-9a-f]{32}", error["trace_id"]), error  # every answer names its trace
    return {k: v for k, v in error.items() if k != "trace_id"}  # type: ignore[no-any-return]


# --- the error envelope ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v1/no-such-route", 404, "request.not_found"),
        ("GET", "/", 404, "request.not_found"),
        ("GET", "/docs-assets/no-such-asset.js", 404, "request.not_found"),
        ("POST", "/health", 405, "request.method_not_allowed"),
        ("DELETE", "/metrics", 405, "request.method_not_allowed"),
        ("PUT", "/ready", 405, "request.method_not_allowed"),
    ],
)
async def test_an_unknown_route_or_a_wrong_method_answers_in_the_error_envelope(
    client: httpx.AsyncClient, method: str, path: str, status: int, code: str
) -> None:
    # When a route that does not exist, or a method a route does not take, is asked for
    response = await client.request(method, path)
    # Then the answer is the envelope with a stable code, never FastAPI's {"detail": ...}
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = assert_envelope(response)
    assert error["code"] == code
    assert path in str(error["message"])
    # And a wrong method names the methods the route takes, in the body and in Allow
    if status == 405:
        assert error["details"] == {"allowed": ["GET"]}
        assert response.headers["allow"] == "GET"


async def test_a_wrong_method_on_an_hq_route_names_the_methods_it_takes(
    hq_client: httpx.AsyncClient,
) -> None:
    response = await hq_client.put("/v1/stations/S001/sales:batch")
    assert response.status_code == 405
    assert assert_envelope(response)["details"] == {"allowed": ["POST"]}


async def test_a_wrong_method_on_an_edge_route_names_the_methods_it_takes(
    edge_client: httpx.AsyncClient,
) -> None:
    response = await edge_client.post("/v1/status")
    assert response.status_code == 405
    assert assert_envelope(response)["code"] == "request.method_not_allowed"


@pytest.mark.parametrize(
    ("url", "where"),
    [
        ("/v1/sales?limit=abc", ["query", "limit"]),
        ("/v1/sales?limit=0", ["query", "limit"]),
        ("/v1/sales?business_date=yesterday", ["query", "business_date"]),
        ("/v1/sales?after=not-a-uuid", ["query", "after"]),
        ("/v1/sales/alerts?limit=100000", ["query", "limit"]),
        # PostgreSQL text cannot hold NUL: refused before it reaches the database
        ("/v1/sales?station=S%00", ["query", "station"]),
        ("/v1/sales/summary?grade=9%002", ["query", "grade"]),
        ("/v1/network/stations/S%00", ["path"]),
        ("/v1/stations/%00/sequence", ["path"]),
    ],
)
async def test_invalid_query_parameters_answer_422_in_the_envelope_naming_each_field(
    hq_client: httpx.AsyncClient, url: str, where: list[str]
) -> None:
    response = await hq_client.get(url)
    assert response.status_code == 422
    error = assert_envelope(response)
    assert error["code"] == "request.invalid"
    errors = error["details"]["errors"]  # type: ignore[index]
    assert [e["loc"] for e in errors] == [where]
    assert all(set(e) == {"loc", "msg", "type"} for e in errors)


def bare_app() -> FastAPI:
    """An app with nothing but the common plumbing and routes that fail on purpose: no real
    route raises an HTTPException or crashes, but a dependency or a bug might."""
    app = FastAPI()

    async def _ready() -> dict[str, bool]:
        return {}

    install_common(app, CollectorRegistry(), _ready)

    def no_teapots() -> None:
        raise HTTPException(418, detail="no teapots here", headers={"x-why": "policy"})

    @app.get("/teapot", dependencies=[Depends(no_teapots)])
    async def teapot() -> None: ...

    @app.get("/gone")
    async def gone() -> None:
        raise HTTPException(410)

    @app.get("/bug")
    async def bug() -> None:
        raise RuntimeError("a bug")

    return app


async def test_an_http_exception_from_a_dependency_answers_in_the_envelope() -> None:
    transport = httpx.ASGITransport(app=bare_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        teapot = await client.get("/teapot")
        gone = await client.get("/gone")
    assert teapot.status_code == 418
    assert assert_envelope(teapot) == {"code": "request.im_a_teapot", "message": "no teapots here"}
    assert teapot.headers["x-why"] == "policy"
    assert gone.status_code == 410
    assert assert_envelope(gone) == {"code": "request.gone", "message": "Gone"}


async def test_an_unexpected_error_answers_500_in_the_envelope_and_still_raises() -> None:
    app = bare_app()
    # Then the server (here the test client) still sees the exception, to log it
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        with pytest.raises(RuntimeError, match="a bug"):
            await client.get("/bug")
    # And the caller gets the envelope, with nothing of the bug in it
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        response = await client.get("/bug")
    assert response.status_code == 500
    assert assert_envelope(response) == {
        "code": "internal.error",
        "message": "internal server error",
    }


# Paths near the real routes (so that both routing and validation are exercised), then
# anything made of URL-safe characters.
PREFIXES = [
    "",
    "/v1",
    "/v1/sales",
    "/v1/sales/summary",
    "/v1/sales/alerts",
    "/v1/network/stations",
    "/v1/network/grades",
    "/v1/stations/S001",
    "/v1/stations/S001/snapshot",
    "/v1/status",
    "/v1/journal/summary",
    "/health",
    "/metrics",
    "/docs",
    "/docs-assets",
    "/openapi.json",
]
SEGMENT = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~:", min_size=1, max_size=12
)
QUERY_NAMES = ["limit", "after", "station", "business_date", "grade", "x"]
QUERY_VALUES = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(
        [
            "",
            "abc",
            "\x00",
            "S001\x00",
            "2026-02-30",
            "2026-06-01",
            "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
        ]
    ),
    st.text(max_size=20),
)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
    prefix=st.sampled_from(PREFIXES),
    segments=st.lists(st.one_of(SEGMENT, st.just("S%00")), max_size=3),
    query=st.lists(st.tuples(st.sampled_from(QUERY_NAMES), QUERY_VALUES), max_size=4),
)
async def test_any_request_is_answered_without_a_crash_and_every_error_in_the_envelope(
    client: httpx.AsyncClient,
    method: str,
    prefix: str,
    segments: list[str],
    query: list[tuple[str, str]],
) -> None:
    path = "/".join([prefix, *segments]) if segments else prefix or "/"
    response = await client.request(method, path, params=query)
    assert response.status_code < 500, (method, path, query, response.text)
    if response.status_code >= 400 and urlsplit(str(response.url)).path != "/ready":
        assert_envelope(response)


# --- docs without internet ------------------------------------------------------------------

REFERENCE = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_the_api_docs_load_everything_from_the_app_itself(
    client: httpx.AsyncClient, page: str
) -> None:
    # When the docs page is asked for
    response = await client.get(page)
    assert response.status_code == 200
    html = response.text
    # Then it names no other host: no CDN, no web fonts, no online validator
    assert "http://" not in html
    assert "https://" not in html
    # And every script, style sheet and icon it references is served by the app
    references = REFERENCE.findall(html)
    assert any(r.endswith(".js") for r in references), references
    if page == "/docs":
        assert any(r.endswith(".css") for r in references), references
    for reference in references:
        assert reference.startswith("/"), reference
        assert not reference.startswith("//"), reference  # another host, scheme-relative
        asset = await client.get(reference)
        assert asset.status_code == 200, reference
        assert len(asset.content) > 1000, reference
    # And the OpenAPI document the page loads is there too
    assert (await client.get("/openapi.json")).status_code == 200


async def test_the_openapi_document_describes_validation_errors_as_the_envelope(
    client: httpx.AsyncClient,
) -> None:
    # FastAPI would describe every 422 as {"detail": [...]}, which no route answers
    document = (await client.get("/openapi.json")).json()
    schema = document.get("components", {}).get("schemas", {}).get("HTTPValidationError")
    if schema is None:  # an app whose routes take no parameters has no 422 to describe
        assert "422" not in str(document["paths"])
        return
    assert schema["required"] == ["error"]
    assert set(schema["properties"]["error"]["properties"]) == {
        "code",
        "message",
        "details",
        "trace_id",
    }
    assert "detail" not in schema["properties"]
