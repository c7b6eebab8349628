"""Payment metrics (the series each helper changes, multiprocess mode) and traces (W3C trace
context in and out, the in-memory exporter, the OTLP exporter only when configured)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from forecourt.payments import metrics, tracing
from forecourt.payments.domain import OrderState, Tender

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


def _value(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    assert value is not None, f"no series {name}{labels}"
    return value


# --- metrics ---------------------------------------------------------------------------------


def test_observe_attempt_counts_exactly_its_series() -> None:
    name = "forecourt_payment_attempts_total"
    series = [
        {"provider": p, "method": m, "outcome": o}
        for p in ("wechat", "alipay")
        for m in ("code", "refund")
        for o in ("success", "declined")
    ]
    before = {json.dumps(s): _value(name, **s) for s in series}

    metrics.observe_attempt("wechat", "code", "declined")
    metrics.observe_attempt(Tender.WECHAT, "code", "declined")  # the tender is its provider

    for s in series:
        expected = before[json.dumps(s)] + (2 if s == series[1] else 0)
        assert _value(name, **s) == expected, s


def test_observe_attempt_refuses_unknown_labels() -> None:
    before = generate_latest(REGISTRY)
    with pytest.raises(ValueError, match="provider"):
        metrics.observe_attempt("unionpay", "code", "success")
    with pytest.raises(ValueError, match="method"):
        metrics.observe_attempt("wechat", "charge", "success")
    with pytest.raises(ValueError, match="outcome"):
        metrics.observe_attempt("wechat", "code", "timeout")
    assert b"unionpay" not in generate_latest(REGISTRY)
    assert before.count(b"forecourt_payment_attempts_total{") == generate_latest(REGISTRY).count(
        b"forecourt_payment_attempts_total{"
    )


def test_series_start_at_zero() -> None:
    text = generate_latest(REGISTRY).decode()
    for provider in ("wechat", "alipay"):
        assert (
            f'forecourt_payment_attempts_total{{method="code",outcome="success",'
            f'provider="{provider}"}}' in text
        )
        assert (
            f'forecourt_payment_provider_seconds_count{{operation="charge",provider="{provider}"}}'
            in text
        )
    for state in OrderState:
        assert f'forecourt_payment_orders{{state="{state.value}"}}' in text


def test_timed_observes_the_call_also_when_it_raises() -> None:
    labels = {"provider": "alipay", "operation": "query_refund"}
    count = _value("forecourt_payment_provider_seconds_count", **labels)
    total = _value("forecourt_payment_provider_seconds_sum", **labels)
    slow = _value("forecourt_payment_provider_seconds_bucket", le="0.005", **labels)

    with metrics.timed("alipay", "query_refund") as timer:
        pass
    assert timer.seconds is not None
    with pytest.raises(RuntimeError), metrics.timed("alipay", "query_refund"):
        raise RuntimeError("boom")

    async def call() -> float | None:
        async with metrics.timed("alipay", "query_refund") as t:
            await asyncio.sleep(0.02)
        return t.seconds

    waited = asyncio.run(call())
    assert waited is not None
    assert waited >= 0.02
    assert _value("forecourt_payment_provider_seconds_count", **labels) == count + 3
    assert _value("forecourt_payment_provider_seconds_sum", **labels) >= total + 0.02
    # the 20 ms call is above the lowest bucket
    assert _value("forecourt_payment_provider_seconds_bucket", le="0.005", **labels) <= slow + 2
    assert _value("forecourt_payment_provider_seconds_bucket", le="30.0", **labels) == count + 3


def test_timed_refuses_unknown_labels() -> None:
    with pytest.raises(ValueError, match="provider"):
        metrics.timed("cash", "charge")
    with pytest.raises(ValueError, match="operation"):
        metrics.timed("wechat", "code")


def test_set_order_gauges_sets_every_state() -> None:
    metrics.set_order_gauges({"pending": 3, OrderState.UNKNOWN: 2, "paid": 40}, 7, 125.5)
    assert _value("forecourt_payment_orders", state="pending") == 3
    assert _value("forecourt_payment_orders", state="unknown") == 2
    assert _value("forecourt_payment_orders", state="paid") == 40
    assert _value("forecourt_payment_orders", state="refunding") == 0
    assert _value("forecourt_payment_recovery_backlog") == 7
    assert _value("forecourt_payment_unknown_oldest_seconds") == 125.5

    # a state no longer counted goes back to 0, not its last value
    metrics.set_order_gauges({"paid": 41}, 0, 0.0)
    assert _value("forecourt_payment_orders", state="pending") == 0
    assert _value("forecourt_payment_orders", state="unknown") == 0
    assert _value("forecourt_payment_orders", state="paid") == 41
    assert _value("forecourt_payment_recovery_backlog") == 0
    assert _value("forecourt_payment_unknown_oldest_seconds") == 0

    with pytest.raises(ValueError, match="state"):
        metrics.set_order_gauges({"lost": 1}, 0, 0.0)
    assert _value("forecourt_payment_orders", state="paid") == 41


def test_register_serves_the_same_metrics_from_an_app_registry() -> None:
    registry = CollectorRegistry()
    metrics.register(registry)
    metrics.observe_attempt("cash", "cash", "success")
    labels = {"provider": "cash", "method": "cash", "outcome": "success"}
    assert registry.get_sample_value("forecourt_payment_attempts_total", labels) == _value(
        "forecourt_payment_attempts_total", **labels
    )
    text = generate_latest(registry).decode()
    for name in (
        "forecourt_payment_attempts_total",
        "forecourt_payment_provider_seconds_bucket",
        "forecourt_payment_orders",
        "forecourt_payment_recovery_backlog",
        "forecourt_payment_unknown_oldest_seconds",
    ):
        assert f"\n{name}" in text, name


_WORKER = """
import sys
from forecourt.payments import metrics
metrics.observe_attempt("wechat", "code", "success")
with metrics.timed("wechat", "charge"):
    pass
metrics.set_order_gauges({"unknown": int(sys.argv[1])}, int(sys.argv[1]), float(sys.argv[1]))
"""


def test_multiprocess_mode_adds_counts_and_keeps_one_gauge_series(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for backlog in ("5", "9"):  # two worker processes, the second one sets its figures last
        subprocess.run([sys.executable, "-c", _WORKER, backlog], env=env, check=True, timeout=60)
    from prometheus_client.multiprocess import MultiProcessCollector

    merged = CollectorRegistry()
    MultiProcessCollector(merged, path=str(tmp_path))
    attempts = {"provider": "wechat", "method": "code", "outcome": "success"}
    assert merged.get_sample_value("forecourt_payment_attempts_total", attempts) == 2
    charge = {"provider": "wechat", "operation": "charge"}
    assert merged.get_sample_value("forecourt_payment_provider_seconds_count", charge) == 2
    text = generate_latest(merged).decode()
    lines = [
        line for line in text.splitlines() if line.startswith("forecourt_payment_recovery_backlog")
    ]
    assert lines == ["forecourt_payment_recovery_backlog 9.0"]  # neither 14 nor one per pid
    assert merged.get_sample_value("forecourt_payment_orders", {"state": "unknown"}) == 9
    assert merged.get_sample_value("forecourt_payment_unknown_oldest_seconds", {}) == 9
    assert 'pid="' not in text


# --- traces ----------------------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = tracing.install_in_memory_exporter()
    yield exporter
    tracing.shutdown_tracing()


def test_span_continues_the_incoming_trace(spans: InMemorySpanExporter) -> None:
    with tracing.span_from_traceparent("payments.charge", TRACEPARENT) as span:
        context = span.get_span_context()
        assert f"{context.trace_id:032x}" == TRACE_ID
        assert f"{context.span_id:016x}" != PARENT_ID
    (finished,) = spans.get_finished_spans()
    assert finished.name == "payments.charge"
    assert finished.kind is SpanKind.SERVER
    assert finished.parent is not None
    assert f"{finished.parent.span_id:016x}" == PARENT_ID
    assert finished.parent.is_remote


def test_injected_header_carries_the_trace_and_the_current_span(
    spans: InMemorySpanExporter,
) -> None:
    with tracing.span_from_traceparent("payments.charge", TRACEPARENT) as span:
        span_id = f"{span.get_span_context().span_id:016x}"
        headers = tracing.trace_headers()
        assert headers["traceparent"] == f"00-{TRACE_ID}-{span_id}-01"
        assert tracing.current_traceparent() == headers["traceparent"]
        outgoing = httpx.Headers({"content-type": "application/json"})
        tracing.trace_headers(outgoing)
        assert outgoing["traceparent"] == headers["traceparent"]
        assert outgoing["content-type"] == "application/json"
    assert tracing.current_traceparent() is None  # outside any span


def test_httpx_hook_injects_the_provider_call_span(spans: InMemorySpanExporter) -> None:
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["traceparent"])
        return httpx.Response(200, json={"ok": True})

    async def call() -> str:
        async with httpx.AsyncClient(
            transport=httpx.MockTransport(answer),
            event_hooks={"request": [tracing.inject_trace_context]},
        ) as client:
            with tracing.span_from_traceparent("payments.charge", TRACEPARENT):
                with tracing.provider_span("wechat", "charge", out_trade_no="FC1") as span:
                    await client.post("https://api.mch.weixin.qq.com/v3/pay/transactions/codepay")
                    return f"{span.get_span_context().span_id:016x}"

    client_span_id = asyncio.run(call())
    assert seen == [f"00-{TRACE_ID}-{client_span_id}-01"]
    client_span, server_span = spans.get_finished_spans()
    assert client_span.name == "payments.wechat.charge"
    assert client_span.kind is SpanKind.CLIENT
    assert client_span.parent is not None
    assert client_span.parent.span_id == server_span.context.span_id
    assert dict(client_span.attributes or {}) == {
        "payment.provider": "wechat",
        "payment.operation": "charge",
        "out_trade_no": "FC1",
    }


def test_provider_span_records_a_failure(spans: InMemorySpanExporter) -> None:
    with pytest.raises(httpx.ConnectTimeout), tracing.provider_span("alipay", "query"):
        raise httpx.ConnectTimeout("no answer")
    (span,) = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]


@pytest.mark.parametrize(
    "incoming", [None, "", "not-a-traceparent", f"00-{'0' * 32}-{PARENT_ID}-01"]
)
def test_a_missing_or_bad_traceparent_starts_a_new_trace(
    spans: InMemorySpanExporter, incoming: str | None
) -> None:
    with tracing.span_from_traceparent("payments.charge", incoming) as span:
        assert span.get_span_context().is_valid
        assert f"{span.get_span_context().trace_id:032x}" != TRACE_ID
    (finished,) = spans.get_finished_spans()
    assert finished.parent is None


def test_the_in_memory_exporter_captures_every_span(spans: InMemorySpanExporter) -> None:
    for name in ("a", "b", "c"):
        with tracing.span_from_traceparent(name, TRACEPARENT, attributes={"payment.n": name}):
            pass
    finished = spans.get_finished_spans()
    assert [s.name for s in finished] == ["a", "b", "c"]
    assert {s.context.trace_id for s in finished} == {int(TRACE_ID, 16)}
    assert finished[0].resource.attributes["service.name"] == tracing.SERVICE_NAME


def test_otlp_exporter_only_with_an_endpoint() -> None:
    assert tracing.build_exporter(environ={}) is None
    assert tracing.build_exporter("", environ={}) is None
    assert tracing.otlp_traces_url(environ={}) is None

    given = tracing.build_exporter("http://collector:4318", environ={})
    assert isinstance(given, OTLPSpanExporter)
    given.shutdown()
    assert tracing.otlp_traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert (
        tracing.otlp_traces_url("http://collector:4318/v1/traces")
        == "http://collector:4318/v1/traces"
    )
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://otel.example:4318"}
    assert tracing.otlp_traces_url(environ=env) == "https://otel.example:4318/v1/traces"
    from_env = tracing.build_exporter(environ=env)
    assert isinstance(from_env, OTLPSpanExporter)
    from_env.shutdown()
    exact = {**env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces.example/otlp"}
    assert tracing.otlp_traces_url(environ=exact) == "http://traces.example/otlp"
    # an argument wins over the environment
    assert (
        tracing.otlp_traces_url("http://mine:4318", environ=exact) == "http://mine:4318/v1/traces"
    )


class _Collector(BaseHTTPRequestHandler):
    received: list[tuple[str, str, int]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        self.rfile.read(length)
        self.received.append((self.path, self.headers.get("content-type", ""), length))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_configured_endpoint_receives_the_spans_over_otlp_http() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Collector.received.clear()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        provider = tracing.configure_tracing(endpoint=endpoint, environ={}, timeout_s=5)
        with tracing.span_from_traceparent("payments.charge", TRACEPARENT):
            pass
        assert provider.force_flush(5000)
        tracing.shutdown_tracing()
    finally:
        server.shutdown()
        server.server_close()
    assert len(_Collector.received) == 1
    path, content_type, length = _Collector.received[0]
    assert path == "/v1/traces"
    assert content_type == "application/x-protobuf"
    assert length > 0


def test_without_an_endpoint_spans_still_get_their_own_ids() -> None:
    tracing.configure_tracing(environ={})
    try:
        with tracing.span_from_traceparent("payments.charge", TRACEPARENT) as span:
            assert span.is_recording()
            span_id = f"{span.get_span_context().span_id:016x}"
            assert span_id != PARENT_ID
            assert tracing.trace_headers()["traceparent"] == f"00-{TRACE_ID}-{span_id}-01"
    finally:
        tracing.shutdown_tracing()
