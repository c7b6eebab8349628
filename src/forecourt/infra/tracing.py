"""Traces (OpenTelemetry) shared by HQ and the edge: spans joined to the caller's W3C trace
context and handed on in ``traceparent``.

Spans are exported over OTLP/HTTP when a collector endpoint is given (an argument, or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` used as it is, or ``OTEL_EXPORTER_OTLP_ENDPOINT`` with
``/v1/traces`` appended); without one nothing leaves the process, but spans still get their
own ids, so trace context reaches the next hop all the same. Forecourt keeps its own tracer
provider (:func:`configure_tracing`, or configured from the environment on first use); the
OpenTelemetry global one is set only when asked. The service name is the argument, else
``OTEL_SERVICE_NAME``, else ``forecourt``.

A span opened from a request that brought no valid ``traceparent`` starts a trace whose id is
the one the request's answer and log lines already carry (``request.state.traceparent``), so
an operator finds the same trace id in the answer, the logs and the spans.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import httpx
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import Span, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from forecourt import __version__
from forecourt.infra.logging import trace_id_var
from forecourt.kernel.events import trace_id_of

SERVICE_NAME = "forecourt"
SERVICE_NAME_ENV = "OTEL_SERVICE_NAME"
TRACER_NAME = "forecourt"
TRACES_PATH = "/v1/traces"
ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
TRACES_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACE_ID = re.compile(r"^(?!0{32})[0-9a-f]{32}$")
_provider: TracerProvider | None = None
# The trace id the next new trace takes (a request's announced id), set around one span start.
_next_trace_id: ContextVar[int] = ContextVar("next_trace_id", default=0)


class _TraceIds(RandomIdGenerator):
    """Random ids, but a new trace takes the id asked for, if any."""

    def generate_trace_id(self) -> int:
        wanted = _next_trace_id.get()
        return wanted if wanted else super().generate_trace_id()


def otlp_traces_url(
    endpoint: str | None = None, environ: Mapping[str, str] | None = None
) -> str | None:
    """Where spans go, or None: ``endpoint`` (a collector's base URL, or its full traces URL)
    or else the standard environment variables."""
    env = os.environ if environ is None else environ
    base = endpoint or None
    if base is None:
        exact = env.get(TRACES_ENDPOINT_ENV, "").strip()
        if exact:
            return exact
        base = env.get(ENDPOINT_ENV, "").strip() or None
    if base is None:
        return None
    base = base.rstrip("/")
    return base if base.endswith(TRACES_PATH) else base + TRACES_PATH


def build_exporter(
    endpoint: str | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 10.0,
    environ: Mapping[str, str] | None = None,
) -> SpanExporter | None:
    """An OTLP/HTTP exporter when an endpoint is configured, otherwise None. ``headers``
    (e.g. a collector's API key) default to ``OTEL_EXPORTER_OTLP_HEADERS``."""
    url = otlp_traces_url(endpoint, environ)
    if url is None:
        return None
    return OTLPSpanExporter(
        endpoint=url, headers=dict(headers) if headers else None, timeout=timeout_s
    )


def _resource(service_name: str | None, environ: Mapping[str, str] | None) -> Resource:
    env = os.environ if environ is None else environ
    name = service_name or env.get(SERVICE_NAME_ENV, "").strip() or SERVICE_NAME
    return Resource.create({"service.name": name, "service.version": __version__})


def new_tracer_provider(
    service_name: str | None = None, environ: Mapping[str, str] | None = None
) -> TracerProvider:
    """A tracer provider with no processor yet (our resource and id generator)."""
    return TracerProvider(resource=_resource(service_name, environ), id_generator=_TraceIds())


def build_tracer_provider(
    *,
    endpoint: str | None = None,
    service_name: str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 10.0,
    environ: Mapping[str, str] | None = None,
    exporter: SpanExporter | None = None,
) -> TracerProvider:
    """A tracer provider: spans batched to ``exporter``, or to the OTLP exporter the endpoint
    names (see :func:`build_exporter`), or to nowhere."""
    provider = new_tracer_provider(service_name, environ)
    chosen = exporter or build_exporter(
        endpoint, headers=headers, timeout_s=timeout_s, environ=environ
    )
    if chosen is not None:
        provider.add_span_processor(BatchSpanProcessor(chosen))
    return provider


def configure_tracing(
    *,
    endpoint: str | None = None,
    service_name: str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 10.0,
    environ: Mapping[str, str] | None = None,
    set_global: bool = False,
) -> TracerProvider:
    """Build the tracer provider (:func:`build_tracer_provider`) and use it from now on (the
    previous one is shut down, its spans flushed). ``set_global``: make it the OpenTelemetry
    global provider too (possible once per process)."""
    provider = build_tracer_provider(
        endpoint=endpoint,
        service_name=service_name,
        headers=headers,
        timeout_s=timeout_s,
        environ=environ,
    )
    use_provider(provider)
    if set_global:
        trace.set_tracer_provider(provider)
    return provider


def use_provider(provider: TracerProvider) -> None:
    """Make ``provider`` the tracer provider, shutting down the previous one."""
    global _provider
    previous, _provider = _provider, provider
    if previous is not None and previous is not provider:
        previous.shutdown()


def install_in_memory_exporter(service_name: str = SERVICE_NAME) -> InMemorySpanExporter:
    """For tests: a provider whose spans are kept in memory, exported as each one ends."""
    exporter = InMemorySpanExporter()
    provider = new_tracer_provider(service_name)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    use_provider(provider)
    return exporter


def shutdown_tracing() -> None:
    """Flush and shut down the tracer provider (at process stop)."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def tracer(name: str = TRACER_NAME) -> Tracer:
    """A tracer (the provider is configured from the environment on first use)."""
    provider = _provider or configure_tracing()
    return provider.get_tracer(name, __version__)


def _has_current_span() -> bool:
    return trace.get_current_span().get_span_context().is_valid


@contextmanager
def _current(span: Span) -> Iterator[Span]:
    """``span`` made current (and the logs' trace id its own) until it ends; an exception is
    recorded on it and raised."""
    token = trace_id_var.set(format(span.get_span_context().trace_id, "032x"))
    try:
        with trace.use_span(span, end_on_exit=True):
            yield span
    finally:
        trace_id_var.reset(token)


@contextmanager
def span_from_traceparent(
    name: str,
    traceparent: str | None,
    tracestate: str | None = None,
    *,
    kind: SpanKind = SpanKind.SERVER,
    attributes: Mapping[str, AttributeValue] | None = None,
    trace_id: str | None = None,
    tracer_name: str = TRACER_NAME,
) -> Iterator[Span]:
    """A current span continuing the trace of an incoming ``traceparent`` (a request's, or one
    stored with an order). A missing or malformed one starts a new trace, under ``trace_id``
    (32 hex digits) when given. While it is open, log lines carry its trace id."""
    valid = trace_id_of(traceparent) is not None
    carrier = {"traceparent": traceparent} if valid and traceparent else {}
    if carrier and tracestate:
        carrier["tracestate"] = tracestate
    context = _PROPAGATOR.extract(carrier)
    wanted = int(trace_id, 16) if not carrier and trace_id and _TRACE_ID.fullmatch(trace_id) else 0
    token = _next_trace_id.set(wanted)
    try:
        span = tracer(tracer_name).start_span(
            name, context=context, kind=kind, attributes=attributes
        )
    finally:
        _next_trace_id.reset(token)
    with _current(span):
        yield span


@contextmanager
def request_span(
    request: Any,
    name: str,
    *,
    attributes: Mapping[str, AttributeValue] | None = None,
    tracer_name: str = TRACER_NAME,
) -> Iterator[Span]:
    """The server span of an HTTP request (a Starlette ``Request``): it continues the
    caller's ``traceparent``; without a valid one it starts the trace whose id the answer
    carries already (``request.state.traceparent``, set by the HTTP plumbing)."""
    headers = request.headers
    announced = getattr(request.state, "traceparent", None)
    with span_from_traceparent(
        name,
        headers.get("traceparent"),
        headers.get("tracestate"),
        kind=SpanKind.SERVER,
        attributes=attributes,
        trace_id=trace_id_of(announced),
        tracer_name=tracer_name,
    ) as span:
        yield span


@contextmanager
def client_span(
    name: str,
    *,
    traceparent: str | None = None,
    attributes: Mapping[str, AttributeValue] | None = None,
    tracer_name: str = TRACER_NAME,
) -> Iterator[Span]:
    """A client span of one outgoing call, a child of the current span (or, with none
    current, of ``traceparent`` when valid, else a new trace); an exception is recorded on it
    and raised. Send :func:`trace_headers` with the call made inside it."""
    if _has_current_span() or trace_id_of(traceparent) is None:
        span = tracer(tracer_name).start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
    else:
        context = _PROPAGATOR.extract({"traceparent": traceparent or ""})
        span = tracer(tracer_name).start_span(
            name, context=context, kind=SpanKind.CLIENT, attributes=attributes
        )
    with _current(span):
        yield span


def annotate(attributes: Mapping[str, AttributeValue | None]) -> None:
    """Set attributes on the current span (None values are left out)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})


def trace_headers(headers: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The current span's ``traceparent`` (and ``tracestate``), added to ``headers`` when
    given (a dict, ``httpx.Headers``) and returned."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    if headers is not None:
        headers.update(carrier)
    return carrier


def current_traceparent() -> str | None:
    """The current span's ``traceparent`` (to store with what it made), or None outside a
    span."""
    return trace_headers().get("traceparent")


def current_trace_id() -> str | None:
    """The current span's trace id (32 hex digits), or None outside a span."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


async def inject_trace_context(request: httpx.Request) -> None:
    """An ``httpx.AsyncClient`` request hook: every request carries the current trace
    context (``event_hooks={"request": [inject_trace_context]}``)."""
    trace_headers(request.headers)
