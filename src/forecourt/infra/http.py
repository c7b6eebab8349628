"""HTTP plumbing shared by HQ and edge apps: error mapping, trace context, health, metrics,
and API docs that work without internet."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from forecourt.infra.logging import get_logger, trace_id_var
from forecourt.kernel.errors import ForecourtError, Unauthorized
from forecourt.kernel.events import new_traceparent, trace_id_of

log = get_logger("forecourt.http")

ReadyCheck = Callable[[], Awaitable[dict[str, bool]]]

# Where the Swagger UI and ReDoc assets are served from. They come from the pinned
# ``fastapi-offline`` package (its ``static`` folder), not from a CDN: an edge node often has
# no internet, and its docs must still work.
DOCS_ASSETS_PATH = "/docs-assets"
_DOCS_ASSETS_PACKAGE = ("fastapi_offline", "static")


def install_common(
    app: FastAPI,
    registry: CollectorRegistry,
    ready: ReadyCheck,
    *,
    refresh_metrics: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Error mapping (the one place errors become HTTP), traceparent, /health /ready /metrics,
    offline /docs and /redoc. ``refresh_metrics`` runs before every scrape (figures read
    fresh from the database)."""

    @app.exception_handler(ForecourtError)
    async def _forecourt_error(_request: Request, exc: ForecourtError) -> JSONResponse:
        return JSONResponse(status_code=exc.http_status, content={"error": exc.to_dict()})

    # Starlette's own errors (no route: 404, wrong method: 405, and any HTTPException a
    # dependency raises) get the same envelope as ours, never FastAPI's ``{"detail": ...}``.
    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code in (204, 304):  # a body is not allowed
            return Response(status_code=exc.status_code, headers=exc.headers)
        return JSONResponse(
            status_code=exc.status_code,
            content={"error": _http_error_body(request, exc)},
            headers=exc.headers,
        )

    # A bug still answers in the envelope; Starlette re-raises the exception afterwards, so
    # the server logs it with its traceback (nothing is swallowed).
    @app.exception_handler(Exception)
    async def _unexpected_error(_request: Request, _exc: Exception) -> JSONResponse:
        return JSONResponse(
            status_code=500,
            content={"error": {"code": "internal.error", "message": "internal server error"}},
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _invalid_request([_clean(e) for e in exc.errors()])

    _describe_errors_in_openapi(app)
    app.add_middleware(RefuseNulCharacters)
    app.add_middleware(TraceContextMiddleware)  # added last: outermost, so every answer has it
    _install_offline_docs(app)

    @app.get("/health", include_in_schema=False)
    async def _health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", include_in_schema=False)
    async def _ready() -> JSONResponse:
        checks = await ready()
        ok = all(checks.values())
        return JSONResponse(
            status_code=200 if ok else 503,
            content={"status": "ready" if ok else "not_ready", "checks": checks},
        )

    @app.get("/metrics", include_in_schema=False)
    async def _metrics() -> Response:
        if refresh_metrics is not None:
            await refresh_metrics()
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


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
        header = (b"traceparent", traceparent.encode("latin-1"))

        async def send_with_trace(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        token = trace_id_var.set(trace_id_of(traceparent))
        try:
            await self.app(scope, receive, send_with_trace)
        finally:
            trace_id_var.reset(token)


def _invalid_request(errors: list[object]) -> JSONResponse:
    return JSONResponse(
        status_code=422,
        content={
            "error": {
                "code": "request.invalid",
                "message": "request parameters are invalid",
                "details": {"errors": errors},
            }
        },
    )


class RefuseNulCharacters:
    """Refuse a NUL character in the path or the query as an invalid request (422).

    PostgreSQL text cannot hold U+0000: a parameter carrying one would reach the database
    and fail there, a 500. No code, date or id of ours contains it, so it is refused before
    any route runs, on every app alike."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            errors = _nul_errors(scope["path"], scope.get("query_string", b""))
            if errors:
                await _invalid_request(errors)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _nul_errors(path: str, query: bytes) -> list[object]:
    nul = {"msg": "NUL characters are not allowed", "type": "string_nul"}
    errors: list[object] = []
    if "\x00" in path:
        errors.append({"loc": ["path"], **nul})
    if b"%00" in query or b"\x00" in query:  # the cheap test first: almost never true
        for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if "\x00" in name or "\x00" in value:
                errors.append({"loc": ["query", name.replace("\x00", "")], **nul})
    return errors


def _http_error_body(request: Request, exc: HTTPException) -> dict[str, Any]:
    try:
        status = HTTPStatus(exc.status_code)
        phrase, code = status.phrase, f"request.{status.name.lower()}"
    except ValueError:
        phrase, code = f"HTTP {exc.status_code}", f"request.http_{exc.status_code}"
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
    return body


ERROR_ENVELOPE_SCHEMA: dict[str, Any] = {
    "title": "ErrorEnvelope",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "examples": ["request.invalid"]},
                "message": {"type": "string"},
                "details": {
                    "type": "object",
                    "description": "for request.invalid: errors, a list of {loc, msg, type}",
                },
            },
        }
    },
}


def _describe_errors_in_openapi(app: FastAPI) -> None:
    """Make the OpenAPI document describe the 422 that is sent (the envelope), not FastAPI's
    ``HTTPValidationError`` (``{"detail": [...]}``), which no route of ours answers."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()  # FastAPI's, cached until the routes change
        schemas = schema.get("components", {}).get("schemas", {})
        if "HTTPValidationError" in schemas:
            schemas["HTTPValidationError"] = ERROR_ENVELOPE_SCHEMA
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

        app.add_route(app.docs_url, swagger_ui, include_in_schema=False)

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

        app.add_route(app.redoc_url, redoc, include_in_schema=False)


def _is_route_at(route: BaseRoute, paths: set[str]) -> bool:
    return isinstance(route, Route) and route.path in paths


def _clean(error: object) -> object:
    if isinstance(error, dict):
        return {k: v for k, v in error.items() if k in ("loc", "msg", "type")}
    return str(error)


def bearer_token(request: Request) -> str:
    """The bearer token of a request, or a 401 error with a stable code."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer credential", code="auth.missing_credential")
    return token.strip()
