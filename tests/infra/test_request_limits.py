"""Request limits and the last-resort error answer every app shares (``install_common``): a
body over the limit is refused as it arrives, not after it is held whole; JSON too deep for
a recursive parser is told without parsing it; control characters never reach a route; and
every error, a bug's 500 included, is the one envelope with the request's trace id."""

from __future__ import annotations

import json
import re
import tracemalloc
from collections.abc import AsyncIterator

import httpx
import pytest
import structlog
from fastapi import FastAPI, Request
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from starlette.types import Message

from forecourt.bootstrap import build_head_office
from forecourt.infra.http import DEFAULT_MAX_BODY_BYTES, install_common, json_too_deep
from forecourt.kernel.events import trace_id_of
from forecourt.network.handlers import SAMPLE_CHAIN, import_chain, issue_credential, load_chain_file
from forecourt.settings import Settings
from tests.sales.conftest import make_sale_v2
from tests.support import staff_headers

LIMIT = 8 * 1024


def limited_app(max_body_bytes: int = LIMIT) -> tuple[FastAPI, list[int]]:
    """An app with the common plumbing, a route that reads the body (it records the length
    of each body it got) and routes that fail on purpose."""
    app = FastAPI()
    bodies: list[int] = []

    async def _ready() -> dict[str, bool]:
        return {}

    install_common(app, CollectorRegistry(), _ready, max_body_bytes=max_body_bytes)

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        body = await request.body()
        bodies.append(len(body))
        return {"length": len(body)}

    @app.get("/q")
    async def query(request: Request) -> dict[str, str]:
        return dict(request.query_params)

    @app.get("/bug")
    async def bug() -> None:
        raise RuntimeError("a bug: secret internals")

    return app, bodies


def client_of(app: FastAPI, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url="http://app")


def assert_envelope(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    """The one error envelope, with the request's trace id (its traceparent's)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str)
    assert error["message"]
    assert set(error) <= {"code", "message", "details", "trace_id"}
    assert error["trace_id"] == trace_id_of(response.headers["traceparent"])
    return error  # type: ignore[no-any-return]


# --- the body limit ---------------------------------------------------------------------------


async def test_a_body_declared_over_the_limit_is_refused_before_it_is_read() -> None:
    app, bodies = limited_app()
    async with client_of(app) as client:
        response = await client.post("/echo", content=b"x" * (LIMIT + 1))
    error = assert_envelope(response, 413, "request.too_large")
    assert error["details"] == {"max_body_bytes": LIMIT}
    assert response.headers["connection"] == "close"
    # The route never ran: nothing held the body
    assert bodies == []


async def test_a_chunked_body_is_counted_as_it_arrives_and_refused_once_over_the_limit() -> None:
    app, bodies = limited_app()
    pulled = 0

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: sent chunked
        nonlocal pulled
        for _ in range(1000):  # 1 MiB, if it were all read
            pulled += 1
            yield b"y" * 1024

    async with client_of(app) as client:
        response = await client.post("/echo", content=chunks())
    assert_envelope(response, 413, "request.too_large")
    assert bodies == []
    # Reading stopped at the chunk that went past the limit
    assert pulled == LIMIT // 1024 + 1


async def test_a_body_up_to_the_limit_is_taken_whole() -> None:
    app, bodies = limited_app()
    async with client_of(app) as client:
        declared = await client.post("/echo", content=b"x" * LIMIT)

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(LIMIT // 1024):
                yield b"y" * 1024

        chunked = await client.post("/echo", content=chunks())
    assert declared.status_code == chunked.status_code == 200
    assert bodies == [LIMIT, LIMIT]


def test_the_limits_are_settings_whose_default_takes_the_largest_batch() -> None:
    settings_ = Settings()
    assert settings_.max_body_bytes == DEFAULT_MAX_BODY_BYTES == 32 * 1024 * 1024
    assert settings_.max_json_depth == 32
    # A full batch of 5 000 v2 sales as edges send them (about 3.1 MiB), ten times over
    typical = len(json.dumps({"schema_version": 2, "sales": [make_sale_v2()] * 5000}))
    assert 10 * typical <= settings_.max_body_bytes
    # And one where every text and every number is at its maximum (about 16 MiB)
    item = make_sale_v2(
        station_seq=2**53 - 1,
        fuelling_point=999,
        nozzle=99,
        grade="g" * 40,
        volume_ml=10**9,
        unit_price_mmu=10**12,
        amount_minor=-(10**15),
        price_version="p" * 64,
        snapshot_version=2**53 - 1,
        totalizer_start_ml=2**53 - 1,
        totalizer_end_ml=2**53 - 1,
        device_txn=2**53 - 1,
        dispense_type="drive_off",
        started_at="2026-11-25T01:00:00.123456+08:00",
        ended_at="2026-11-25T01:02:00.123456+08:00",
        shift_id="s" * 40,
        device_id="d" * 64,
        device_epoch=2**53 - 1,
        device_flags=[f"f{i:02d}" + "x" * 37 for i in range(16)],
        device_raw={f"k{i:02d}" + "y" * 37: "v" * 64 for i in range(16)},
    )
    largest = len(json.dumps({"schema_version": 2, "sales": [item] * 5000}))
    assert 1.9 * largest <= settings_.max_body_bytes


def test_the_limits_can_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORECOURT_MAX_BODY_BYTES", str(64 * 1024 * 1024))
    monkeypatch.setenv("FORECOURT_MAX_JSON_DEPTH", "16")
    assert Settings().max_body_bytes == 64 * 1024 * 1024
    assert Settings().max_json_depth == 16


# --- control characters -----------------------------------------------------------------------

CONTROLS = ["%00", "%01", "%09", "%0A", "%0d", "%1F", "%7F", "%7f", "%C2%80", "%c2%85", "%C2%9F"]


@pytest.mark.parametrize("control", CONTROLS)
async def test_a_control_character_anywhere_in_the_query_or_the_path_is_refused(
    control: str,
) -> None:
    app, _ = limited_app()
    async with client_of(app) as client:
        in_value = await client.get(f"/q?station=S0{control}1&grade=92")
        in_name = await client.get(f"/q?sta{control}tion=S001")
        in_path = await client.get(f"/q{control}")
    for response, loc in [
        (in_value, ["query", "station"]),
        (in_name, ["query", "station"]),
        (in_path, ["path"]),
    ]:
        error = assert_envelope(response, 422, "request.invalid")
        [only] = error["details"]["errors"]  # type: ignore[index]
        assert only["loc"] == loc
        assert only["type"] == ("string_nul" if control == "%00" else "string_control_character")


async def test_a_raw_control_byte_in_the_query_is_refused() -> None:
    app, _ = limited_app()
    messages: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/q",
        "raw_path": b"/q",
        "query_string": b"station=S\x001",
        "headers": [],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("app", 80),
        "client": ("test", 1),
        "root_path": "",
    }
    await app(scope, receive, send)
    assert messages[0]["status"] == 422


@pytest.mark.parametrize("text", ["%C2%A0", "%C3%A9", "caf%C3%A9", "%E2%82%AC", "a+b", "%2500"])
async def test_other_text_goes_through(text: str) -> None:
    app, _ = limited_app()
    async with client_of(app) as client:
        response = await client.get(f"/q?station={text}")
    assert response.status_code == 200, response.text


# --- JSON depth -------------------------------------------------------------------------------


def depth_of(value: object) -> int:
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    return 0


# Text that looks like structure: brackets, quotes, backslashes inside strings and keys.
TRICKY = st.text(alphabet='[]{}"\\ax\u00e9\n', max_size=8)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | TRICKY,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TRICKY, inner, max_size=3),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(value=JSON_VALUES, limit=st.integers(0, 12), indent=st.sampled_from([None, 1]))
def test_the_depth_check_tells_what_a_parser_would_find(
    value: object, limit: int, indent: int | None
) -> None:
    body = json.dumps(value, indent=indent, ensure_ascii=indent is None).encode()
    assert json_too_deep(body, limit) is (depth_of(value) > limit)


@pytest.mark.parametrize(
    ("body", "too_deep"),
    [
        (b"[" * 32 + b"]" * 32, False),
        (b"[" * 33 + b"]" * 33, True),
        (b"[" * 50_000 + b"]" * 50_000, True),
        (b"[" * 50_000, True),  # not JSON, but a recursive parser would still go down
        (b'{"a": ' * 40 + b"1" + b"}" * 40, True),
        (b"[[]" * 10_000 + b"]" * 10_000, True),  # no long run of openers
        (b'["' + b"[" * 10_000 + b'"]', False),  # brackets in a string are text
        (b'["\\"' + b"[" * 100 + b'"]', False),  # after an escaped quote too
        (b'["\\\\"' + b"[" * 100 + b"]" * 100 + b"]", True),  # an escaped backslash ends it
    ],
)
def test_the_depth_check_on_bodies_made_to_mislead_it(body: bytes, too_deep: bool) -> None:
    assert json_too_deep(body, 32) is too_deep


# --- one envelope for every error -------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nowhere", 404, "request.not_found"),
        ("DELETE", "/echo", 405, "request.method_not_allowed"),
        ("GET", "/q?x=%00", 422, "request.invalid"),
    ],
)
async def test_every_error_carries_the_trace_id_of_its_request(
    method: str, path: str, status: int, code: str
) -> None:
    app, _ = limited_app()
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with client_of(app) as client:
        response = await client.request(method, path, headers={"traceparent": traceparent})
        fresh = await client.request(method, path)
    error = assert_envelope(response, status, code)
    assert error["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"  # the caller's trace
    assert re.fullmatch(r"[0-9a-f]{32}", str(assert_envelope(fresh, status, code)["trace_id"]))


async def test_a_bug_answers_500_in_the_envelope_with_nothing_of_the_bug_and_is_logged() -> None:
    app, _ = limited_app()
    with structlog.testing.capture_logs() as logs:
        async with client_of(app, raise_app_exceptions=False) as client:
            response = await client.get("/bug")
    error = assert_envelope(response, 500, "internal.error")
    assert set(error) == {"code", "message", "trace_id"}
    assert "secret" not in response.text
    assert "RuntimeError" not in response.text
    [logged] = [e for e in logs if e["event"] == "http.unexpected_error"]
    assert logged["log_level"] == "error"
    assert logged["exc_info"] is True
    assert logged["path"] == "/bug"


async def test_an_error_nothing_inside_answered_still_gets_the_envelope() -> None:
    # When the error handler itself fails, Starlette's ServerErrorMiddleware has nothing to
    # answer with: the server would send its own plain-text 500
    app, _ = limited_app()

    async def failing_handler(_request: Request, _exc: Exception) -> None:
        raise RuntimeError("the handler fails too")

    app.add_exception_handler(Exception, failing_handler)  # type: ignore[arg-type]
    with structlog.testing.capture_logs() as logs:
        async with client_of(app, raise_app_exceptions=False) as client:
            response = await client.get("/bug")
        assert_envelope(response, 500, "internal.error")
        # And the server still sees the exception, to log it
        async with client_of(app) as client:
            with pytest.raises(RuntimeError):
                await client.get("/bug")
    assert [e["event"] for e in logs] == ["http.unexpected_error"] * 2


async def test_a_middleware_that_fails_gets_the_envelope_too() -> None:
    app, _ = limited_app()

    class Broken:
        def __init__(self, inner: object) -> None:
            self.inner = inner

        async def __call__(self, scope: object, receive: object, send: object) -> None:
            raise RuntimeError("middleware bug")

    app.add_middleware(Broken)
    with structlog.testing.capture_logs():
        async with client_of(app, raise_app_exceptions=False) as client:
            response = await client.get("/q")
    assert_envelope(response, 500, "internal.error")


# --- on HQ's upload route, on both databases ----------------------------------------------------


@pytest.fixture
async def hq(db_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    """HQ with the sample chain, its client (signed in as an HQ admin, for the sales reads)
    and the authorization header for S001 (its uploads)."""
    office = build_head_office(Settings(database_url=db_url, log_json=False))
    await office.start(relay=False)
    await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
    token = (await issue_credential(office.db, "S001"))[1]
    staff = await staff_headers(office.identity)
    try:
        async with client_of(office.app) as client:
            client.headers.update(staff)
            yield client, {"authorization": f"Bearer {token}"}
    finally:
        await office.stop()


BATCH_ROUTE = "/v1/stations/S001/sales:batch"


async def stored(client: httpx.AsyncClient) -> int:
    summary = (await client.get("/v1/sales/summary")).json()
    return sum(g["sales"] for g in summary["groups"])


async def test_a_batch_over_the_body_limit_is_refused_413_and_nothing_is_stored(
    hq: tuple[httpx.AsyncClient, dict[str, str]],
) -> None:
    client, auth = hq
    # A valid-looking batch past the limit (it was parsed whole, then refused for its size)
    sale = json.dumps(make_sale_v2()).encode()
    count = DEFAULT_MAX_BODY_BYTES // len(sale) + 1
    body = b'{"schema_version": 2, "sales": [' + b",".join([sale] * count) + b"]}"
    response = await client.post(BATCH_ROUTE, content=body, headers=auth)
    error = assert_envelope(response, 413, "request.too_large")
    assert error["details"] == {"max_body_bytes": DEFAULT_MAX_BODY_BYTES}
    assert await stored(client) == 0


async def test_a_full_batch_of_5000_v2_sales_is_under_the_limit_and_taken(
    hq: tuple[httpx.AsyncClient, dict[str, str]],
) -> None:
    client, auth = hq
    sales = [make_sale_v2() for _ in range(5000)]
    response = await client.post(
        BATCH_ROUTE, json={"schema_version": 2, "sales": sales}, headers=auth
    )
    assert response.status_code == 200, response.text[:500]
    assert len(response.json()["results"]) == 5000


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 50_000 + b"]" * 50_000,
        b'{"schema_version": 2, "sales": [' + b"[" * 50_000 + b"]" * 50_000 + b"]}",
        b'{"schema_version": 2, "sales": [{"device_raw": '
        + b'{"a": ' * 100
        + b"1"
        + b"}" * 101
        + b"]}",
        b"[" * 50_000,
    ],
    ids=["bare", "in-sales", "in-an-item", "unclosed"],
)
async def test_a_body_nested_too_deep_is_refused_as_the_batchs_error_never_a_500(
    hq: tuple[httpx.AsyncClient, dict[str, str]], body: bytes
) -> None:
    client, auth = hq
    response = await client.post(BATCH_ROUTE, content=body, headers=auth)
    error = assert_envelope(response, 422, "sales.schema_invalid")
    assert "deeper than 32" in str(error["message"])
    assert error["details"] == {
        "errors": [{"loc": [], "msg": "JSON nested too deep", "type": "json_too_deep"}]
    }


async def test_an_item_with_text_that_is_not_unicode_is_refused_on_its_own(
    hq: tuple[httpx.AsyncClient, dict[str, str]],
) -> None:
    # JSON can escape a lone surrogate ("\ud800"); no text of a sale can hold one
    client, auth = hq
    good = json.dumps(make_sale_v2())
    bad = json.dumps(make_sale_v2(grade="GRADE", device_raw={"KEY": "1"}))
    bad = bad.replace('"GRADE"', '"\\ud800"').replace('"KEY"', '"\\udfff"')
    batch = f'{{"schema_version": 2, "sales": [{good}, {bad}]}}'
    response = await client.post(BATCH_ROUTE, content=batch.encode(), headers=auth)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["status"] for r in results] == ["created", "refused"]
    assert {"loc": [], "msg": "text is not valid Unicode", "type": "string_unicode"} in results[1][
        "errors"
    ]
    assert await stored(client) == 1


async def test_a_batch_field_named_with_a_lone_surrogate_is_refused_422_not_500(
    hq: tuple[httpx.AsyncClient, dict[str, str]],
) -> None:
    client, auth = hq
    sale = json.dumps(make_sale_v2())
    batch = f'{{"schema_version": 2, "sales": [{sale}], "\\udfff": 1}}'
    response = await client.post(BATCH_ROUTE, content=batch.encode(), headers=auth)
    error = assert_envelope(response, 422, "sales.schema_invalid")
    assert error["details"]["errors"][0]["type"] == "string_unicode"  # type: ignore[index]


HUGE = 300 * 1024 * 1024  # the observed attack: a 300 MiB string field in one sale
CHUNK = 1024 * 1024


async def test_a_300_mib_string_field_is_refused_413_reading_no_more_than_the_limit(
    hq: tuple[httpx.AsyncClient, dict[str, str]],
) -> None:
    # It cost 1.3 GiB once (read whole, then parsed). Now the body is refused once past the
    # limit, so the server reads (and holds) at most the limit and a chunk of it.
    client, auth = hq
    sale = json.dumps(make_sale_v2(grade="GRADE")).encode()
    head, tail = sale.split(b'"GRADE"')
    prefix = b'{"schema_version": 2, "sales": [' + head + b'"'
    suffix = b'"' + tail + b"]}"
    pulled = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal pulled
        pulled += 1
        yield prefix
        for _ in range(HUGE // CHUNK):
            pulled += 1
            yield b"9" * CHUNK
        yield suffix

    tracemalloc.start()
    try:
        chunked = await client.post(BATCH_ROUTE, content=chunks(), headers=auth)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_envelope(chunked, 413, "request.too_large")
    assert pulled <= DEFAULT_MAX_BODY_BYTES // CHUNK + 2  # not 300 chunks: reading stopped
    assert peak < 4 * DEFAULT_MAX_BODY_BYTES < HUGE, peak  # the body was never held whole

    pulled = 0
    declared = await client.post(
        BATCH_ROUTE,
        content=chunks(),
        headers={**auth, "content-length": str(len(prefix) + HUGE + len(suffix))},
    )
    assert_envelope(declared, 413, "request.too_large")
    assert pulled <= 1  # told by its Content-Length, before its body is read
    assert await stored(client) == 0


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v1/nowhere", 404, "request.not_found"),
        ("POST", "/v1/stations/S001/nothing", 404, "request.not_found"),
        ("DELETE", "/v1/sales", 405, "request.method_not_allowed"),
        ("GET", BATCH_ROUTE, 405, "request.method_not_allowed"),
    ],
)
async def test_hq_answers_unknown_routes_and_methods_with_the_envelope_not_detail(
    hq: tuple[httpx.AsyncClient, dict[str, str]], method: str, path: str, status: int, code: str
) -> None:
    client, _ = hq
    response = await client.request(method, path)
    error = assert_envelope(response, status, code)
    assert "detail" not in response.json()
    assert path in str(error["message"])
    if status == 405:
        assert error["details"]["allowed"] == response.headers["allow"].split(", ")  # type: ignore[index]
