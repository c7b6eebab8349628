"""Payment traces (OpenTelemetry): spans of payment commands and provider calls, joined to the
caller's W3C trace context and handed on to the providers in ``traceparent``.

Spans are exported over OTLP/HTTP when a collector endpoint is given (an argument, or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` used as it is, or ``OTEL_EXPORTER_OTLP_ENDPOINT`` with
``/v1/traces`` appended); without one nothing leaves the process, but spans still get their
own ids, so trace context reaches the providers all the same. The payments context keeps its
own tracer provider (:func:`configure_tracing`); the OpenTelemetry global one is set only when
asked.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager

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
from opentelemetry.trace import Span, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from forecourt import __version__

SERVICE_NAME = "forecourt"
TRACER_NAME = "forecourt.payments"
TRACES_PATH = "/v1/traces"
ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
TRACES_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"

_PROPAGATOR = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None


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


def build_tracer_provider(
    *,
    endpoint: str | None = None,
    service_name: str = SERVICE_NAME,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 10.0,
    environ: Mapping[str, str] | None = None,
    exporter: SpanExporter | None = None,
) -> TracerProvider:
    """A tracer provider: spans batched to ``exporter``, or to the OTLP exporter the endpoint
    names (see :func:`build_exporter`), or to nowhere."""
    resource = Resource.create({"service.name": service_name, "service.version": __version__})
    provider = TracerProvider(resource=resource)
    chosen = exporter or build_exporter(
        endpoint, headers=headers, timeout_s=timeout_s, environ=environ
    )
    if chosen is not None:
        provider.add_span_processor(BatchSpanProcessor(chosen))
    return provider


def configure_tracing(
    *,
    endpoint: str | None = None,
    service_name: str = SERVICE_NAME,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 10.0,
    environ: Mapping[str, str] | None = None,
    set_global: bool = False,
) -> TracerProvider:
    """Build the payments tracer provider (:func:`build_tracer_provider`) and use it from now
    on (the previous one is shut down, its spans flushed). ``set_global``: make it the
    OpenTelemetry global provider too (possible once per process)."""
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
    """Make ``provider`` the payments tracer provider, shutting down the previous one."""
    global _provider
    previous, _provider = _provider, provider
    if previous is not None and previous is not provider:
        previous.shutdown()


def install_in_memory_exporter(service_name: str = SERVICE_NAME) -> InMemorySpanExporter:
    """For tests: a provider whose spans are kept in memory, exported as each one ends."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    use_provider(provider)
    return exporter


def shutdown_tracing() -> None:
    """Flush and shut down the payments tracer provider (at process stop)."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def tracer() -> Tracer:
    """The payments tracer (the provider is configured from the environment on first use)."""
    provider = _provider or configure_tracing()
    return provider.get_tracer(TRACER_NAME, __version__)


@contextmanager
def span_from_traceparent(
    name: str,
    traceparent: str | None,
    tracestate: str | None = None,
    *,
    kind: SpanKind = SpanKind.SERVER,
    attributes: Mapping[str, AttributeValue] | None = None,
) -> Iterator[Span]:
    """A current span continuing the trace of an incoming ``traceparent`` (a request's, or one
    stored with an order); a missing or malformed one starts a new trace."""
    carrier = {"traceparent": traceparent} if traceparent else {}
    if traceparent and tracestate:
        carrier["tracestate"] = tracestate
    context = _PROPAGATOR.extract(carrier)
    with tracer().start_as_current_span(
        name, context=context, kind=kind, attributes=attributes
    ) as span:
        yield span


@contextmanager
def provider_span(provider: str, operation: str, **attributes: AttributeValue) -> Iterator[Span]:
    """A client span of one provider call (``payments.<provider>.<operation>``), a child of
    the current span; an exception is recorded on it and raised."""
    with tracer().start_as_current_span(
        f"payments.{provider}.{operation}",
        kind=SpanKind.CLIENT,
        attributes={"payment.provider": provider, "payment.operation": operation, **attributes},
    ) as span:
        yield span


def trace_headers(headers: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The current span's ``traceparent`` (and ``tracestate``), added to ``headers`` when
    given (a dict, ``httpx.Headers``) and returned: what an adapter's ``trace_headers`` take."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    if headers is not None:
        headers.update(carrier)
    return carrier


def current_traceparent() -> str | None:
    """The current span's ``traceparent`` (to store with an order), or None outside a span."""
    return trace_headers().get("traceparent")


async def inject_trace_context(request: httpx.Request) -> None:
    """An ``httpx.AsyncClient`` request hook: every request carries the current trace
    context (``event_hooks={"request": [inject_trace_context]}``)."""
    trace_headers(request.headers)
