"""HTTP plumbing shared by HQ and edge apps: error mapping, trace context, health, metrics."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

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

    @app.middleware("http")
    async def _trace(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        incoming = request.headers.get("traceparent")
        traceparent = incoming if incoming and trace_id_of(incoming) else new_traceparent()
        request.state.traceparent = traceparent
        token = trace_id_var.set(trace_id_of(traceparent))
        try:
            response = await call_next(request)
        finally:
            trace_id_var.reset(token)
        response.headers["traceparent"] = traceparent
        return response

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
