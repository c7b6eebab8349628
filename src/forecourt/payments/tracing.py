"""Payment traces: the spans of payment commands and provider calls, on the shared tracing of
:mod:`forecourt.infra.tracing` (re-exported here: configuration, exporters, trace context).

A payment command continues its caller's trace (:func:`span_from_traceparent`, or
:func:`request_span` for an HTTP request); every provider call is a client span
``payments.<provider>.<operation>`` (:func:`provider_span`, or the :func:`provider_call`
decorator the adapters put on each call), whose context the adapter sends in ``traceparent``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from opentelemetry.trace import Span, SpanKind
from opentelemetry.util.types import AttributeValue

from forecourt.infra.tracing import (
    ENDPOINT_ENV,
    SERVICE_NAME,
    TRACES_ENDPOINT_ENV,
    TRACES_PATH,
    annotate,
    build_exporter,
    build_tracer_provider,
    configure_tracing,
    current_trace_id,
    current_traceparent,
    inject_trace_context,
    install_in_memory_exporter,
    otlp_traces_url,
    request_span,
    shutdown_tracing,
    span_from_traceparent,
    trace_headers,
    tracer,
    use_provider,
)

__all__ = [
    "ENDPOINT_ENV",
    "SERVICE_NAME",
    "TRACER_NAME",
    "TRACES_ENDPOINT_ENV",
    "TRACES_PATH",
    "annotate",
    "build_exporter",
    "build_tracer_provider",
    "configure_tracing",
    "current_trace_id",
    "current_traceparent",
    "inject_trace_context",
    "install_in_memory_exporter",
    "otlp_traces_url",
    "provider_call",
    "provider_span",
    "record_outcome",
    "request_span",
    "shutdown_tracing",
    "span_from_traceparent",
    "trace_headers",
    "tracer",
    "use_provider",
]

TRACER_NAME = "forecourt.payments"

P = ParamSpec("P")
R = TypeVar("R")


class _Provider(Protocol):
    name: str


S = TypeVar("S", bound=_Provider)


@contextmanager
def provider_span(provider: str, operation: str, **attributes: AttributeValue) -> Iterator[Span]:
    """A client span of one provider call (``payments.<provider>.<operation>``), a child of
    the current span; an exception is recorded on it and raised."""
    with tracer(TRACER_NAME).start_as_current_span(
        f"payments.{provider}.{operation}",
        kind=SpanKind.CLIENT,
        attributes={"payment.provider": provider, "payment.operation": operation, **attributes},
    ) as span:
        yield span


# Call arguments recorded on a provider call's span, by their keyword name.
_TRACED_ARGUMENTS = ("out_trade_no", "out_refund_no", "amount_fen", "refund_fen")


def record_outcome(span: Span, result: object) -> None:
    """The outcome of a provider call on its span: ``payment.status`` (the contract's status)
    and ``payment.provider_code`` (the provider's own code)."""
    status = getattr(result, "status", None)
    value = getattr(status, "value", status)
    if isinstance(value, str):
        span.set_attribute("payment.status", value)
    code = getattr(result, "code", None)
    if isinstance(code, str) and code:
        span.set_attribute("payment.provider_code", code)


def provider_call(
    operation: str,
) -> Callable[
    [Callable[Concatenate[S, P], Coroutine[Any, Any, R]]],
    Callable[Concatenate[S, P], Coroutine[Any, Any, R]],
]:
    """Decorate an adapter's call: it runs in :func:`provider_span` (named by the adapter's
    ``name``), with the trade and refund numbers and amounts given by keyword (or the trade
    number as the first argument) and the outcome recorded."""

    def wrap(
        method: Callable[Concatenate[S, P], Coroutine[Any, Any, R]],
    ) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]:
        @functools.wraps(method)
        async def call(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
            attributes: dict[str, AttributeValue] = {}
            given: dict[str, Any] = dict(kwargs)
            if args and isinstance(args[0], str):
                given.setdefault("out_trade_no", args[0])
            for name in _TRACED_ARGUMENTS:
                value = given.get(name)
                if isinstance(value, str | int) and not isinstance(value, bool):
                    attributes[f"payment.{name}"] = value
            with provider_span(self.name, operation, **attributes) as span:
                result = await method(self, *args, **kwargs)
                record_outcome(span, result)
                return result

        return call

    return wrap
