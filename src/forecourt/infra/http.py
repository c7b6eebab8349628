"""HTTP plumbing shared by HQ and edge apps: error mapping, trace context, request limits,
health, metrics, and API docs that work without internet."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from itertools import accumulate
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from forecourt.infra.access import declare, require
from forecourt.infra.logging import get_logger, source_var, trace_id_var
from forecourt.kernel.access import Permission, Policy
from forecourt.kernel.errors import ForecourtError
from forecourt.kernel.events import new_traceparent, trace_id_of

log = get_logger("forecourt.http")

ReadyCheck = Callable[[], Awaitable[dict[str, bool]]]

# Where the Swagger UI and ReDoc assets are served from. They come from the pinned
# ``fastapi-offline`` package (its ``static`` folder), not from a CDN: an edge node often has
# no internet, and its docs must still work.
DOCS_ASSETS_PATH = "/docs-assets"
_DOCS_ASSETS_PACKAGE = ("fastapi_offline", "static")

# Request limits (HQ takes them from its settings: ``max_body_bytes``, ``max_json_depth``).
# A 5 000-sale v2 batch weighs about 3.1 MiB; with every text field at its maximum length
# about 16 MiB. Nothing we parse nests deeper than 4.
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_JSON_DEPTH = 32

OPEN = Policy.open()
# /metrics: a scraper (a service account with the metrics_scraper role) over the whole chain.
METRICS_POLICY = Policy(Permission.METRICS_READ)


def install_common(
    app: FastAPI,
    registry: CollectorRegistry,
    ready: ReadyCheck,
    *,
    refresh_metrics: Callable[[], Awaitable[None]] | None = None,
    live: Collector | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    metrics_policy: Policy = METRICS_POLICY,
) -> None:
    """Error mapping (the one place errors become HTTP), traceparent, request limits,
    /health /ready /metrics, offline /docs and /redoc. ``refresh_metrics`` runs before every
    scrape (figures read fresh from the database); ``live`` (registered in ``registry``
    too) gives the figures that are read at the scrape rather than added up across
    processes (see :func:`metrics_text`). ``/health``, ``/ready`` and the docs are open;
    ``/metrics`` needs ``metrics_policy`` (a scraper's credential unless set open)."""

    @app.exception_handler(ForecourtError)
    async def _forecourt_error(_request: Request, exc: ForecourtError) -> JSONResponse:
        retry = exc.details.get("retry_after_s")
        headers = {"Retry-After": str(max(1, math.ceil(retry)))} if retry is not None else None
        return error_response(exc.http_status, exc.to_dict(), headers)

    # Starlette's own errors (no route: 404, wrong method: 405, and any HTTPException a
    # dependency raises) get the same envelope as ours, never FastAPI's ``{"detail": ...}``.
    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code in (204, 304):  # a body is not allowed
            return Response(status_code=exc.status_code, headers=exc.headers)
        return error_response(exc.status_code, _http_error_body(request, exc), exc.headers)

    # A bug still answers in the envelope; Starlette re-raises the exception afterwards, and
    # AnswerUnexpectedErrors logs it with its traceback (nothing is swallowed).
    @app.exception_handler(Exception)
    async def _unexpected_error(_request: Request, _exc: Exception) -> JSONResponse:
        return _internal_error()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _invalid_request([_clean(e) for e in exc.errors()])

    _describe_errors_in_openapi(app)
    app.add_middleware(LimitRequestBody, max_bytes=max_body_bytes)
    app.add_middleware(RefuseControlCharacters)
    _wrap_outermost(app)
    _install_offline_docs(app)

    @app.get("/health", include_in_schema=False, dependencies=[require(OPEN)])
    async def _health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", include_in_schema=False, dependencies=[require(OPEN)])
    async def _ready() -> JSONResponse:
        checks = await ready()
        ok = all(checks.values())
        return JSONResponse(
            status_code=200 if ok else 503,
            content={"status": "ready" if ok else "not_ready", "checks": checks},
        )

    @app.get(
        "/metrics",
        include_in_schema=False,
        dependencies=[require(metrics_policy)],
        responses=error_responses(401, 403, 429),
    )
    async def _metrics() -> Response:
        if refresh_metrics is not None:
            await refresh_metrics()
        return Response(metrics_text(registry, live), media_type=CONTENT_TYPE_LATEST)


# --- metrics across worker processes ---------------------------------------------------------

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def metrics_text(registry: CollectorRegistry, live: Collector | None = None) -> bytes:
    """The ``/metrics`` answer.

    One process: ``registry`` as it is. Several processes sharing a port (``forecourt serve
    --workers N`` sets ``PROMETHEUS_MULTIPROC_DIR`` for them): counters and histograms of
    every process, added up from the directory where each writes its own (the client
    library's multiprocess mode), so any scrape answers the totals whichever process it
    reaches; plus ``live``, the figures this process has just read (from the database,
    true for all of them), which must not be added up.
    """
    directory = os.environ.get(MULTIPROCESS_ENV)
    if not directory:
        return generate_latest(registry)
    merged = CollectorRegistry()
    MultiProcessCollector(merged, path=directory)
    if live is not None:
        merged.register(live)
    return generate_latest(merged)


# --- the error envelope -----------------------------------------------------------------------


def current_trace_id() -> str:
    """The trace id of the request being answered (TraceContextMiddleware sets it)."""
    return trace_id_var.get() or trace_id_of(new_traceparent()) or ""


def error_response(
    status: int, error: dict[str, Any], headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The one error envelope: ``{"error": {code, message, [details], trace_id}}``."""
    return JSONResponse(status_code=status, content=error_envelope(error), headers=headers)


def error_envelope(error: dict[str, Any]) -> dict[str, Any]:
    """The body of :func:`error_response`: ``error`` with the trace id of the request being
    answered."""
    return {"error": {**error, "trace_id": current_trace_id()}}


def _internal_error() -> JSONResponse:
    return error_response(500, {"code": "internal.error", "message": "internal server error"})


def _invalid_request(errors: list[object]) -> JSONResponse:
    return error_response(
        422,
        {
            "code": "request.invalid",
            "message": "request parameters are invalid",
            "details": {"errors": errors},
        },
    )


def _http_error_body(request: Request, exc: HTTPException) -> dict[str, Any]:
    try:
        status = HTTPStatus(exc.status_code)
        phrase, code = status.phrase, f"request.{status.name.lower()}"
    except ValueError:
        phrase, code = f"HTTP {exc.status_code}", f"request.http_{exc.status_code}"
    code = getattr(exc, "code", None) or code
    path = request.url.path
    if exc.detail and exc.detail != phrase:
        message = str(exc.detail)
    elif exc.status_code == 404:
        message = f"no route or resource at {path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {path}"
    else:
        message = phrase
    body: dict[str, Any] = {"code": code, "message": message}
    allow = (exc.headers or {}).get("Allow")
    if exc.status_code == 405 and allow:
        body["details"] = {"allowed": [m.strip() for m in allow.split(",") if m.strip()]}
    if isinstance(exc, RequestTooLarge):
        body["details"] = {"max_body_bytes": exc.limit}
    return body


# --- middlewares ------------------------------------------------------------------------------


def _wrap_outermost(app: FastAPI) -> None:
    """Put trace context and the last-resort error answer around everything Starlette builds,
    its ServerErrorMiddleware included: every answer carries the traceparent, and even an
    exception nothing inside answered (a failing error handler, a middleware bug) is
    answered with the envelope rather than the server's plain-text 500."""
    build = app.build_middleware_stack

    def build_middleware_stack() -> ASGIApp:
        return TraceContextMiddleware(AnswerUnexpectedErrors(build()))

    app.build_middleware_stack = build_middleware_stack  # type: ignore[method-assign]


# Sent with every answer. No CORS headers are ever sent: a browser page from another origin
# cannot read an answer (CORS closed); nothing may frame a page or sniff a type.
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
)
# The API's answers are data, never a page: no script, style or frame of any origin. The
# docs pages (Swagger UI, ReDoc: their own assets and an inline start script) go without.
_API_CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
_DOCS_PAGES = ("/docs", "/redoc", DOCS_ASSETS_PATH)


class TraceContextMiddleware:
    """W3C trace context: adopt the caller's ``traceparent`` (or start a trace), make it
    ``request.state.traceparent`` and the logs' trace id, and answer with it.

    Plain ASGI rather than ``@app.middleware("http")``: that style runs every request
    through a task and memory streams, which costs more than many handlers do."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((v for k, v in scope["headers"] if k == b"traceparent"), None)
        text = incoming.decode("latin-1") if incoming else None
        traceparent = text if text and trace_id_of(text) else new_traceparent()
        scope.setdefault("state", {})["traceparent"] = traceparent
        headers = [(b"traceparent", traceparent.encode("latin-1")), *SECURITY_HEADERS]
        if not scope["path"].startswith(_DOCS_PAGES):
            headers.append(_API_CSP)

        async def send_with_trace(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *headers]
            await send(message)

        token = trace_id_var.set(trace_id_of(traceparent))
        client = scope.get("client")
        source = source_var.set(str(client[0]) if client else None)
        try:
            await self.app(scope, receive, send_with_trace)
        finally:
            source_var.reset(source)
            trace_id_var.reset(token)


class AnswerUnexpectedErrors:
    """The last resort: an exception that reaches here is logged with its traceback and the
    trace id, answered ``500 internal.error`` in the envelope if nothing was answered yet,
    and raised again for the server (and test clients) to see."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            # The client went away before its request was read (an edge stopping mid-upload):
            # nothing to answer, and nothing happened that it asked for.
            log.info("http.client_disconnected", method=scope.get("method"), path=scope.get("path"))
            return
        except Exception:
            log.exception(
                "http.unexpected_error",
                method=scope.get("method"),
                path=scope.get("path"),
                answered=started,
            )
            if not started:
                await _internal_error()(scope, receive, send)
            raise


class RequestTooLarge(HTTPException):
    """The request body is larger than the app takes (413 ``request.too_large``).

    An HTTPException, so that whatever reads the body (a route, FastAPI's body parsing)
    lets it through to the error mapping rather than calling it a malformed body."""

    code = "request.too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            detail=f"the request body is larger than {limit} bytes",
            headers={"connection": "close"},  # the rest of the body is not read
        )
        self.limit = limit


class LimitRequestBody:
    """Refuse a request body over ``max_bytes`` with 413, before it is held in memory:
    a ``Content-Length`` over the limit is answered at once, without reading the body; a
    body without one (chunked) is counted as it arrives and refused once it passes the
    limit. Every route alike: nothing reads a body before this middleware lets it through."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        declared = _content_length(scope["headers"])
        if declared is not None and declared > limit:
            await _too_large(limit)(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise RequestTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except RequestTooLarge:
            if started:
                raise
            await _too_large(limit)(scope, receive, send)


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _too_large(limit: int) -> JSONResponse:
    exc = RequestTooLarge(limit)
    return error_response(
        413,
        {"code": exc.code, "message": exc.detail, "details": {"max_body_bytes": limit}},
        exc.headers,
    )


# C0 controls, DEL and C1 controls (Unicode category Cc).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
# The cheap test on the raw query: a control character raw, or percent-encoded (C1 ones are
# %C2%80-%C2%9F in UTF-8; %C2 alone is enough to look closer).
_MAYBE_CONTROL = re.compile(rb"[\x00-\x1f\x7f-\x9f]|%(?:[01][0-9A-Fa-f]|7[Ff]|[Cc]2)")


class RefuseControlCharacters:
    """Refuse a control character (U+0000-U+001F, U+007F-U+009F) in the path or in any query
    parameter, name or value, raw or percent-encoded, as an invalid request (422).

    PostgreSQL text cannot hold U+0000, so a parameter carrying one would fail in the
    database, a 500; no code, date, id or name of ours holds any control character. Refused
    before any route runs, on every app alike."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            errors = _control_errors(scope["path"], scope.get("query_string", b""))
            if errors:
                await _invalid_request(errors)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _control_errors(path: str, query: bytes) -> list[object]:
    errors: list[object] = []
    if _CONTROL.search(path):
        errors.append({"loc": ["path"], **_control_error(path)})
    if _MAYBE_CONTROL.search(query):  # the cheap test first: almost never true
        # Decoded as Starlette decodes it for the routes.
        for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if _CONTROL.search(name) or _CONTROL.search(value):
                shown = _CONTROL.sub("", name)
                errors.append({"loc": ["query", shown], **_control_error(name + value)})
    return errors


def _control_error(text: str) -> dict[str, str]:
    if "\x00" in text:
        return {"msg": "NUL characters are not allowed", "type": "string_nul"}
    return {"msg": "control characters are not allowed", "type": "string_control_character"}


# --- JSON bodies ------------------------------------------------------------------------------

_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
_CONTAINERS_AS_LISTS = bytes.maketrans(b"{}", b"[]")
_STRING = re.compile(rb'"[^"]*"')
_DEPTH_STEP = bytes.maketrans(b"[]", b"\x01\xff")


def json_too_deep(body: bytes, max_depth: int) -> bool:
    """Whether JSON ``body`` nests arrays and objects deeper than ``max_depth``, told without
    parsing it (the standard library's parser recurses: 50 000 levels are a RecursionError).

    Only the structure is looked at: escapes are dropped, then everything but quotes and
    brackets, then the strings (with any bracket inside them); the depth is the highest
    running count of opening less closing brackets. A body that is not JSON may be judged
    either way: its parser refuses it before it nests deeper than counted here."""
    if len(body) <= max_depth:
        return False
    if b"\\" in body:  # pairs of backslashes first, then escaped quotes: left to right
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    structure = body.translate(_CONTAINERS_AS_LISTS, _NOT_STRUCTURE)
    structure = structure.replace(b'""', b"")  # most strings hold no bracket: gone cheaply
    if b'"' in structure:  # the parity of the quotes before each bracket is unchanged
        structure = _STRING.sub(b"", structure)
    # Innermost containers off, a level a pass, while that shrinks the structure a lot (a
    # batch of sales is gone in 4 passes); then the running count over what is left.
    passes = 0
    while structure:
        if b"[" * (max_depth + 1 - passes) in structure:  # the usual attack, told at once
            return True
        reduced = structure.replace(b"[]", b"")
        shrunk = len(reduced) * 2 <= len(structure)
        if len(reduced) < len(structure):
            passes += 1  # each pass takes one level off the deepest nesting
        structure = reduced
        if not shrunk:
            break
    if not structure:
        return False
    steps = memoryview(structure.translate(_DEPTH_STEP)).cast("b")
    return max(accumulate(steps)) > max_depth - passes


# --- OpenAPI ----------------------------------------------------------------------------------

ERROR_ENVELOPE_SCHEMA: dict[str, Any] = {
    "title": "ErrorEnvelope",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "trace_id"],
            "properties": {
                "code": {"type": "string", "examples": ["request.invalid"]},
                "message": {"type": "string"},
                "details": {
                    "type": "object",
                    "description": "for request.invalid: errors, a list of {loc, msg, type}",
                },
                "trace_id": {
                    "type": "string",
                    "description": "the trace id of the request (its traceparent's), as logged",
                },
            },
        }
    },
}
_ENVELOPE_REF = {"$ref": "#/components/schemas/ErrorEnvelope"}
_ERROR_DESCRIPTIONS = {
    400: "Bad request",
    401: "Missing or unknown credential",
    403: "The credential is not for this station",
    404: "Not found",
    409: "Conflict",
    413: "The request body is larger than the server takes",
    422: "Invalid request: parameters or body",
    429: "Too many failed credentials from this source: wait (Retry-After), then retry",
    503: "Unavailable: retry later",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route for the error statuses it answers, each the envelope."""
    return {
        status: {
            "description": _ERROR_DESCRIPTIONS.get(status, HTTPStatus(status).phrase),
            "content": {"application/json": {"schema": _ENVELOPE_REF}},
        }
        for status in statuses
    }


def _describe_errors_in_openapi(app: FastAPI) -> None:
    """Make the OpenAPI document describe the errors that are sent (the envelope), not
    FastAPI's ``HTTPValidationError`` (``{"detail": [...]}``), which no route of ours
    answers; document the 422 every operation can answer (a control character in the path
    or the query is refused before any route runs); and move the ``$defs`` of request body
    schemas given whole (``openapi_extra``) into the components, where their references
    point."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()  # FastAPI's, cached until the routes change
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas["ErrorEnvelope"] = ERROR_ENVELOPE_SCHEMA
        # FastAPI's name for its 422 body, kept (as the envelope) for clients that use it.
        schemas["HTTPValidationError"] = ERROR_ENVELOPE_SCHEMA
        schemas.pop("ValidationError", None)  # FastAPI's item of it: nothing refers to it
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                if not isinstance(operation, dict) or "responses" not in operation:
                    continue
                operation["responses"].setdefault("422", error_responses(422)[422])
                content = operation.get("requestBody", {}).get("content", {})
                for media in content.values():
                    for name, definition in media.get("schema", {}).pop("$defs", {}).items():
                        schemas.setdefault(name, definition)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _install_offline_docs(app: FastAPI) -> None:
    """Serve /docs (Swagger UI) and /redoc from assets packaged with Forecourt.

    FastAPI's own pages load their JavaScript, CSS, favicon and fonts from CDNs. Apps are
    built with FastAPI's defaults (HQ in ``bootstrap``, the edge in ``edge.node``), so their
    pages are replaced here, at the same URLs, by ones that reference only this app."""
    if not app.openapi_url:
        return
    openapi_url = app.openapi_url
    replaced = {url for url in (app.docs_url, app.redoc_url) if url}
    app.router.routes[:] = [r for r in app.router.routes if not _is_route_at(r, replaced)]
    app.mount(
        DOCS_ASSETS_PATH,
        StaticFiles(packages=[_DOCS_ASSETS_PACKAGE]),
        name="docs-assets",
    )
    declare(OPEN, app.router.routes[-1])
    # FastAPI's own: the document and Swagger UI's OAuth2 redirect page.
    own = {openapi_url, app.swagger_ui_oauth2_redirect_url}
    for route in app.router.routes:
        if isinstance(route, Route) and route.path in own:
            declare(OPEN, route)

    def assets(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/") + DOCS_ASSETS_PATH

    if app.docs_url:
        oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url

        async def swagger_ui(request: Request) -> HTMLResponse:
            root = request.scope.get("root_path", "").rstrip("/")
            return get_swagger_ui_html(
                openapi_url=root + openapi_url,
                title=f"{app.title} - Swagger UI",
                swagger_js_url=f"{assets(request)}/swagger-ui-bundle.js",
                swagger_css_url=f"{assets(request)}/swagger-ui.css",
                swagger_favicon_url=f"{assets(request)}/favicon.png",
                oauth2_redirect_url=root + oauth2_redirect_url if oauth2_redirect_url else None,
                init_oauth=app.swagger_ui_init_oauth,
                # No online validator badge: it would call validator.swagger.io.
                swagger_ui_parameters={"validatorUrl": None, **(app.swagger_ui_parameters or {})},
            )

        app.add_route(app.docs_url, declare(OPEN, swagger_ui), include_in_schema=False)

    if app.redoc_url:

        async def redoc(request: Request) -> HTMLResponse:
            root = request.scope.get("root_path", "").rstrip("/")
            return get_redoc_html(
                openapi_url=root + openapi_url,
                title=f"{app.title} - ReDoc",
                redoc_js_url=f"{assets(request)}/redoc.standalone.js",
                redoc_favicon_url=f"{assets(request)}/favicon.png",
                with_google_fonts=False,
            )

        app.add_route(app.redoc_url, declare(OPEN, redoc), include_in_schema=False)


def _is_route_at(route: BaseRoute, paths: set[str]) -> bool:
    return isinstance(route, Route) and route.path in paths


def _clean(error: object) -> object:
    if isinstance(error, dict):
        return {k: v for k, v in error.items() if k in ("loc", "msg", "type")}
    return str(error)
