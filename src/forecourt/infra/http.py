"""HTTP plumbing shared by HQ and edge apps: error mapping, trace context, health, metrics."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from forecourt.infra.logging import get_logger, trace_id_var
from forecourt.kernel.errors import ForecourtError, Unauthorized
from forecourt.kernel.events import new_traceparent, trace_id_of

log = get_logger("forecourt.http")

ReadyCheck = Callable[[], Awaitable[dict[str, bool]]]


def install_common(app: FastAPI, registry: CollectorRegistry, ready: ReadyCheck) -> None:
    """Error mapping (the one place errors become HTTP), traceparent, /health /ready /metrics."""

    @app.exception_handler(ForecourtError)
    async def _forecourt_error(_request: Request, exc: ForecourtError) -> JSONResponse:
        return JSONResponse(status_code=exc.http_status, content={"error": exc.to_dict()})

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            status_code=422,
            content={
                "error": {
                    "code": "request.invalid",
                    "message": "request parameters are invalid",
                    "details": {"errors": [_clean(e) for e in exc.errors()]},
                }
            },
        )

    app.add_middleware(TraceContextMiddleware)

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
