"""One W3C trace per payment, from the cashier's terminal to the provider: the edge's POS API
(its server span, and a client span per call of HQ) → HQ's payments API (a server span per
command) → the provider adapter (a client span per call, whose ``traceparent`` the provider
receives) → the WeChat Pay or Alipay simulator, a process of its own reached over a socket.
The spans are read from the in-memory exporter; the simulators tell what they received.

An order whose outcome is unknown is settled later by the recovery worker in the order's own
trace (the traceparent stored with it). Spans leave the process only when an OTLP endpoint is
configured."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pydantic import SecretStr

from forecourt.bootstrap import build_head_office
from forecourt.infra import tracing as shared_tracing
from forecourt.kernel.clock import SimulatedClock
from forecourt.network.handlers import SAMPLE_CHAIN, import_chain, load_chain_file
from forecourt.payments import store, tracing
from forecourt.payments.domain import OrderState
from forecourt.payments.recovery import drive
from forecourt.settings import Settings
from tests.edge.conftest import HqServer, Station, clock, station  # noqa: F401 - fixtures
from tests.edge.test_pos import TOKEN_S, Counter, running
from tests.payments import alipay_support, wechat_support
from tests.payments.alipay_support import AlipaySimProcess
from tests.payments.wechat_support import WechatSimProcess
from tests.support import eventually

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TERMINAL_SPAN = "b7ad6b7169203331"
TERMINAL_TRACEPARENT = f"00-{TRACE_ID}-{TERMINAL_SPAN}-01"


# --- the rig ----------------------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = tracing.install_in_memory_exporter()
    yield exporter
    tracing.shutdown_tracing()


@pytest.fixture
async def wechat(tmp_path: Path) -> AsyncIterator[WechatSimProcess]:
    sim = WechatSimProcess(wechat_support.sim_config(), tmp_path / "wechat")
    await asyncio.to_thread(sim.start)
    try:
        yield sim
    finally:
        sim.stop()


@pytest.fixture
async def alipay(tmp_path: Path) -> AsyncIterator[AlipaySimProcess]:
    sim = AlipaySimProcess(alipay_support.sim_config(), tmp_path / "alipay")
    await asyncio.to_thread(sim.start)
    try:
        yield sim
    finally:
        sim.stop()


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="ascii")
    return path


@pytest.fixture
async def hq(
    tmp_path: Path,
    clock: SimulatedClock,  # noqa: F811 - the fixture
    wechat: WechatSimProcess,
    alipay: AlipaySimProcess,
) -> AsyncIterator[HqServer]:
    wk, ak = wechat_support.keys(), alipay_support.keys()
    office = build_head_office(
        Settings(
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'hq.db'}",
            log_json=False,
            identity_access_token_s=TOKEN_S,
            payments_wechat_mchid=wechat_support.MCHID,
            payments_wechat_appid=wechat_support.APPID,
            payments_wechat_merchant_serial_no=wechat_support.MERCHANT_SERIAL,
            payments_wechat_merchant_key_file=_write(tmp_path / "wx.pem", wk.merchant_private_pem),
            payments_wechat_apiv3_key=SecretStr(wk.apiv3_key),
            payments_wechat_platform_certificate_file=_write(
                tmp_path / "wx_platform.pem", wk.platform_certificate_pem
            ),
            payments_wechat_base_url=wechat.base_url,
            payments_wechat_timeout_s=5.0,
            payments_alipay_app_id=alipay_support.APP_ID,
            payments_alipay_gateway_url=alipay.gateway_url,
            payments_alipay_app_key_file=_write(tmp_path / "ali.pem", ak.app_private_pem),
            payments_alipay_public_key_file=_write(tmp_path / "ali_pub.pem", ak.alipay_public_pem),
            payments_alipay_seller_id=alipay_support.SELLER_ID,
            payments_alipay_timeout_s=5.0,
            payments_confirm_wait_s=1.0,
            payments_poll_interval_s=0.1,
            # The simulated clock runs fast: no open order is given up during a test.
            payments_pending_deadline_s=3600,
            payments_unknown_deadline_s=86_400,
        ),
        clock=clock,
    )
    # No background work: the recovery worker's look at an order is the test's own.
    await office.start(relay=False)
    await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
    server = HqServer(office)
    await server.up()
    yield server
    await server.down()
    await office.stop()


@contextlib.asynccontextmanager
async def at_the_counter(station: Station, **overrides: Any) -> AsyncIterator[Counter]:  # noqa: F811
    async with running(station, pos_hq_timeout_s=10.0, **overrides) as counter:
        yield counter


async def _uploaded_sale(counter: Counter, headers: dict[str, str]) -> dict[str, Any]:
    sale = await counter.a_sale(headers)
    pos_store = counter.node.app.state.pos.store

    async def at_hq() -> str | None:
        state: str | None = await pos_store.upload_state(sale["sale_id"])
        return state if state == "sent" else None

    await eventually(at_hq, 20, what="the sale at HQ")
    return sale


def _one(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def _hex_trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.trace_id, "032x")


def _hex_span(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.span_id, "016x")


def _attrs(span: ReadableSpan) -> Mapping[str, Any]:
    assert span.attributes is not None
    return span.attributes


def _parent(span: ReadableSpan) -> str | None:
    return format(span.parent.span_id, "016x") if span.parent is not None else None


def _chain(spans: Sequence[ReadableSpan], provider: str) -> list[ReadableSpan]:
    """The spans of one payment, edge to provider, each checked to be the parent of the
    next: the edge's server span, its call of HQ, HQ's command, the provider call."""
    chain = [
        _one(spans, "edge.pos.pay"),
        _one(spans, "edge.hq.charge"),
        _one(spans, "payments.charge"),
        _one(spans, f"payments.{provider}.charge"),
    ]
    kinds = [s.kind for s in chain]
    assert kinds == [SpanKind.SERVER, SpanKind.CLIENT, SpanKind.SERVER, SpanKind.CLIENT]
    assert len({_hex_trace(s) for s in chain}) == 1, "one trace"
    for parent, child in zip(chain, chain[1:], strict=False):
        assert _parent(child) == _hex_span(parent), (child.name, parent.name)
    return chain


def _received(requests: list[dict[str, Any]], **match: str) -> list[str]:
    """The (trace id, parent id) of each of the simulator's requests whose fields contain
    ``match``, as ``<trace id>-<parent id>``."""
    return [
        "-".join((r["traceparent"] or "none--").split("-")[1:3])
        for r in requests
        if all(value in (r.get(key) or "") for key, value in match.items())
    ]


# --- the tests ------------------------------------------------------------------------------


async def test_a_wechat_payment_is_one_trace_from_the_terminal_to_wechat_pay(
    station: Station,  # noqa: F811
    wechat: WechatSimProcess,
    spans: InMemorySpanExporter,
) -> None:
    async with at_the_counter(station) as counter:
        headers = await counter.cashier()
        sale = await _uploaded_sale(counter, headers)
        spans.clear()
        answer = await counter.api.post(
            f"/v1/pos/sales/{sale['sale_id']}/pay",
            json={"method": "code", "auth_code": wechat_support.auth_code()},
            headers={**headers, "traceparent": TERMINAL_TRACEPARENT},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["trace_id"] == TRACE_ID  # the terminal's trace is kept
        assert answer.headers["traceparent"].split("-")[1] == TRACE_ID

    finished = spans.get_finished_spans()
    edge, call, command, provider = _chain(finished, "wechat")
    assert _hex_trace(edge) == TRACE_ID
    assert _parent(edge) == TERMINAL_SPAN
    assert _attrs(edge)["pos.payment.status"] == "paid"
    assert _attrs(command)["payment.state"] == "paid"
    assert _attrs(command)["http.response.status_code"] == 201
    assert _attrs(provider)["payment.status"] == "paid"
    assert _attrs(provider)["payment.out_trade_no"] == _attrs(command)["payment.out_trade_no"]
    assert _attrs(call)["http.response.status_code"] == 201

    # WeChat Pay received the provider call's own span as the parent, in the same trace.
    received = _received(wechat.get("/sim/requests")["requests"], path="/codepay")
    assert received == [f"{TRACE_ID}-{_hex_span(provider)}"]

    # HQ keeps the trace with the order, for whoever drives it later.
    office = counter.hq.office
    async with office.db.connection() as conn:
        [order] = await store.orders_of_sale(conn, "S001", uuid.UUID(sale["sale_id"]))
        kept = await store.traceparent_of(conn, order.order_id)
    assert kept == f"00-{TRACE_ID}-{_hex_span(command)}-01"


async def test_an_alipay_payment_without_a_terminal_trace_starts_the_one_it_answers(
    station: Station,  # noqa: F811
    alipay: AlipaySimProcess,
    spans: InMemorySpanExporter,
) -> None:
    async with at_the_counter(station) as counter:
        headers = await counter.cashier()
        sale = await _uploaded_sale(counter, headers)
        spans.clear()
        answer = await counter.pay(
            sale["sale_id"], {"method": "code", "auth_code": alipay_support.auth_code()}, headers
        )
        assert answer.status_code == 200, answer.text

    edge, _, _, provider = _chain(spans.get_finished_spans(), "alipay")
    # A new trace, rooted at the edge, under the id its answer announces.
    assert edge.parent is None
    trace_id = _hex_trace(edge)
    assert answer.json()["trace_id"] == trace_id
    assert answer.headers["traceparent"].split("-")[1] == trace_id
    received = _received(alipay.get("/sim/requests")["requests"], method="alipay.trade.pay")
    assert received == [f"{trace_id}-{_hex_span(provider)}"]


async def test_an_unknown_outcome_settled_later_by_recovery_lands_in_the_orders_trace(
    station: Station,  # noqa: F811
    wechat: WechatSimProcess,
    spans: InMemorySpanExporter,
) -> None:
    async with at_the_counter(station, pos_payment_wait_s=0.3) as counter:
        headers = await counter.cashier()
        sale = await _uploaded_sale(counter, headers)
        wechat.faults(charge_no_answer_rate=1.0)  # charged, but the answer never comes
        spans.clear()
        answer = await counter.api.post(
            f"/v1/pos/sales/{sale['sale_id']}/pay",
            json={"method": "code", "auth_code": wechat_support.auth_code()},
            headers={**headers, "traceparent": TERMINAL_TRACEPARENT},
        )
        assert answer.status_code == 202, answer.text
        wechat.reset_faults()
        _, _, command, charge = _chain(spans.get_finished_spans(), "wechat")
        assert _attrs(charge)["payment.status"] == "unknown"

        office = counter.hq.office
        service = office.payments
        assert service is not None
        [order] = await counter.hq_orders(sale["sale_id"])
        assert order["state"] == "unknown"
        async with office.db.connection() as conn:
            due = [
                o
                for o in await store.due_orders(conn, office.db.clock.now() + timedelta(hours=1))
                if str(o.order_id) == order["order_id"]
            ]
        # The recovery worker's look at the order, in the order's trace.
        async with service.traced(due[0]):
            settled = await drive(service, due[0], office.db.clock.now())
        assert settled.state is OrderState.PAID

    look = _one(spans.get_finished_spans(), "payments.recovery")
    query = _one(spans.get_finished_spans(), "payments.wechat.query")
    assert (_hex_trace(look), _hex_trace(query)) == (TRACE_ID, TRACE_ID)
    assert _parent(look) == _hex_span(command)  # the command that made the order
    assert _parent(query) == _hex_span(look)
    assert _attrs(query)["payment.status"] == "paid"
    queries = _received(
        wechat.get("/sim/requests")["requests"], method="GET", path="/out-trade-no/"
    )
    assert queries[-1] == f"{TRACE_ID}-{_hex_span(query)}"


# --- export -------------------------------------------------------------------------------------


class _Collector(BaseHTTPRequestHandler):
    received: list[tuple[str, str, bytes]]
    arrived: threading.Event

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length)
        self.received.append((self.path, self.headers.get("content-type", ""), body))
        self.arrived.set()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@contextlib.contextmanager
def _collector() -> Iterator[tuple[str, type[_Collector]]]:
    handler = type("Collector", (_Collector,), {"received": [], "arrived": threading.Event()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _a_payment_trace() -> None:
    with (
        tracing.span_from_traceparent("payments.charge", TERMINAL_TRACEPARENT),
        tracing.provider_span("wechat", "charge"),
    ):
        pass


def test_without_an_otlp_endpoint_nothing_is_exported(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (tracing.ENDPOINT_ENV, tracing.TRACES_ENDPOINT_ENV):
        monkeypatch.delenv(name, raising=False)
    with _collector() as (_, collector):
        provider = tracing.configure_tracing()
        try:
            _a_payment_trace()
            assert provider.force_flush(5_000)
            # No exporter at all: nothing is sent anywhere.
            assert provider._active_span_processor._span_processors == ()
        finally:
            tracing.shutdown_tracing()
        assert collector.received == []


def test_with_the_otlp_endpoint_set_the_spans_arrive_at_the_collector(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(tracing.TRACES_ENDPOINT_ENV, raising=False)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "forecourt-hq")
    with _collector() as (endpoint, collector):
        monkeypatch.setenv(tracing.ENDPOINT_ENV, endpoint)
        assert os.environ[tracing.ENDPOINT_ENV] == endpoint
        shared_tracing.shutdown_tracing()  # configured from the environment on first use
        try:
            _a_payment_trace()
            assert shared_tracing._provider is not None
            assert shared_tracing._provider.force_flush(5_000)
            assert collector.arrived.wait(5)
        finally:
            tracing.shutdown_tracing()
    path, content_type, body = collector.received[0]
    assert (path, content_type) == ("/v1/traces", "application/x-protobuf")
    request = ExportTraceServiceRequest.FromString(body)
    [resource_spans] = request.resource_spans
    service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}[
        "service.name"
    ]
    assert service == "forecourt-hq"
    exported = [s for scope in resource_spans.scope_spans for s in scope.spans]
    assert sorted(s.name for s in exported) == ["payments.charge", "payments.wechat.charge"]
    assert {s.trace_id.hex() for s in exported} == {TRACE_ID}
