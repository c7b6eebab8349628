"""Provider notifications over real sockets: HQ served by uvicorn on a port of its own, the
WeChat Pay and Alipay simulators (real processes) notifying HQ's notify URLs themselves after
a charge or a refund. HQ's recovery worker does not run here: what settles an order is the
notification alone.

Every case of a charge uses the simulators' ``charge_no_answer_rate`` fault (the payer is
charged, the counter's request is never answered: HQ holds an unknown order), so only a
notification can make the order paid. Waits are conditions with deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn
from starlette.types import ASGIApp

from forecourt.bootstrap import build_head_office
from forecourt.demo import serve_until_started
from forecourt.infra.listener import listening_socket
from forecourt.network.handlers import SAMPLE_CHAIN, import_chain, issue_credential, load_chain_file
from forecourt.payments.domain import OrderState, PaymentOrder
from tests.support import staff_headers

from . import alipay_support, wechat_support
from .alipay_support import AlipaySimProcess
from .hq_payments import PaymentsHq, Sims, payments_settings
from .wechat_support import WechatSimProcess

PROVIDERS = ["wechat", "alipay"]
# The simulators re-send an unacknowledged notification after each of these (the providers'
# own schedules run over a day: WeChat 15 s ... 6 h, Alipay 4 min ... 15 h), long enough
# for HQ to be down a moment and back.
RETRY_MS = [200, 400, 800, 1600, 3200]
# How late a notification leaves the simulator: after the counter's request has failed.
NOTIFY_DELAY_MS = 500
WAIT_S = 20.0

T = TypeVar("T")


async def until(
    check: Callable[[], Awaitable[T | None]], what: str, timeout_s: float = WAIT_S
) -> T:
    """Poll ``check`` until it gives something (not None, not False); fail after
    ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        found = await check()
        if found is not None and found is not False:
            return found
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sims]:
    tmp = tmp_path_factory.mktemp("notify-sims")
    wechat = WechatSimProcess(wechat_support.sim_config(notify_retry_ms=RETRY_MS), tmp / "wx")
    alipay = AlipaySimProcess(alipay_support.sim_config(notify_retry_ms=RETRY_MS), tmp / "ali")
    wechat.start()
    try:
        alipay.start()
        try:
            yield Sims(wechat, alipay)
        finally:
            alipay.stop()
    finally:
        wechat.stop()


class HqServer:
    """HQ's app served by uvicorn in the test's loop on a port of its own, picked and held from
    construction on (the notify URLs name it before HQ serves); ``down()`` stops answering,
    ``up()`` answers again on the same port."""

    def __init__(self) -> None:
        self._socket: socket.socket | None = listening_socket("127.0.0.1", 0)
        self.port: int = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app: ASGIApp | None = None
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def up(self) -> None:
        assert self.app is not None
        # uvicorn closes the socket it served on: after down() a new one on the same port.
        sock = self._socket or listening_socket("127.0.0.1", self.port)
        self._socket = None
        config = uvicorn.Config(self.app, log_level="error", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._task = await serve_until_started(self._server, sock)

    async def down(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.wait_for(self._task, 30)
            self._server = None

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()


@dataclass
class Hq:
    """HQ on a socket (``server``, which can go down and come back on its port) and the
    payment helpers, speaking to it over that socket."""

    api: PaymentsHq
    server: HqServer
    sims: Sims

    def notify_url(self, provider: str) -> str:
        return f"{self.server.url}/v1/payments/notify/{provider}"

    def sim(self, provider: str) -> WechatSimProcess | AlipaySimProcess:
        return self.sims.wechat if provider == "wechat" else self.sims.alipay

    async def sim_call(self, provider: str, method: str, path: str, **kw: Any) -> Any:
        async with httpx.AsyncClient(base_url=self.sim(provider).base_url, timeout=5) as client:
            response = await client.request(method, path, **kw)
        response.raise_for_status()
        return response.json()

    async def faults(self, provider: str, **faults: Any) -> None:
        """The simulator's faults for this test; WeChat's payment notifications go to HQ."""
        payload: dict[str, Any] = {"faults": faults}
        if provider == "wechat":
            payload["notify_url"] = self.notify_url("wechat")
        await self.sim_call(provider, "POST", "/sim/control", json=payload)

    async def notifications(self, provider: str, out_trade_no: str) -> list[dict[str, Any]]:
        found = await self.sim_call(provider, "GET", "/sim/notifications")
        items = found["notifications"] if provider == "wechat" else found
        return [n for n in items if n["out_trade_no"] == out_trade_no]

    async def sim_trade(self, provider: str, out_trade_no: str) -> dict[str, Any]:
        trades = (await self.sim_call(provider, "GET", "/sim/trades"))["trades"]
        return next(t for t in trades if t["out_trade_no"] == out_trade_no)

    async def unanswered_charge(self, provider: str) -> dict[str, Any]:
        """A sale charged at the provider whose answer never came: HQ's order is unknown."""
        sale = await self.api.upload_sale(amount_minor=500)
        code = wechat_support.auth_code() if provider == "wechat" else alipay_support.auth_code()
        response = await self.api.pay(sale, code=code)
        assert response.status_code == 202, response.text
        order: dict[str, Any] = response.json()
        assert order["state"] == "unknown", order
        return order

    async def order(self, order: dict[str, Any]) -> PaymentOrder:
        return await self.api.order(order["order_id"])

    async def paid(self, order: dict[str, Any]) -> PaymentOrder:
        async def check() -> PaymentOrder | None:
            found = await self.order(order)
            return found if found.state is OrderState.PAID else None

        return await until(check, f"order {order['order_id']} paid")

    async def audits(self, action: str, order: dict[str, Any]) -> list[dict[str, Any]]:
        target = f"payment_order:{order['order_id']}"
        return [r for r in await self.api.audit(action) if r["target"] == target]


@pytest.fixture
async def hq(db_url: str, sims: Sims, tmp_path: Path) -> AsyncIterator[Hq]:
    sims.reset()
    settings = payments_settings(db_url, sims, tmp_path)
    server = HqServer()  # its port is known before HQ serves: the notify URLs name it
    office = build_head_office(
        settings.model_copy(
            update={
                "payments_wechat_notify_url": f"{server.url}/v1/payments/notify/wechat",
                "payments_alipay_notify_url": f"{server.url}/v1/payments/notify/alipay",
                "payments_recheck_s": 3600.0,
                "payments_recheck_max_s": 3600.0,
            }
        )
    )
    server.app = office.app
    await office.start(relay=False)  # no background work: the recovery worker does not run
    try:
        await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
        tokens = {c: (await issue_credential(office.db, c))[1] for c in ("S001", "S002")}
        cashier = await staff_headers(office.identity, ("cashier", "station:S001"))
        manager = await staff_headers(office.identity, ("station_manager", "station:S001"))
        admin = await staff_headers(office.identity)
        await server.up()
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                api = PaymentsHq(office, sims, client, tokens, cashier, manager, admin)
                yield Hq(api, server, sims)
        finally:
            await server.down()
    finally:
        server.close()
        await office.stop()
        with contextlib.suppress(httpx.HTTPError):
            sims.reset()


# --- (a) the notification alone settles an unanswered charge ----------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_charge_never_answered_is_paid_by_the_providers_notification_alone(
    hq: Hq, provider: str
) -> None:
    await hq.faults(provider, charge_no_answer_rate=1.0, notify_delay_ms=NOTIFY_DELAY_MS)
    order = await hq.unanswered_charge(provider)

    paid = await hq.paid(order)

    trade = await hq.sim_trade(provider, order["out_trade_no"])
    assert paid.provider_trade_no == trade.get("transaction_id", trade.get("trade_no"))
    assert trade["charged_times"] == 1
    moves = await hq.audits("payments.order.paid", order)
    assert [m["actor"] for m in moves] == [f"service:{provider}"]  # by the notification
    assert trade.get("queries", 0) == 0  # nobody asked the provider: no recovery ran
    (note,) = await hq.notifications(provider, order["out_trade_no"])
    assert note["deliveries"] == 1


# --- (b) duplicated and reordered notifications pay once -------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_duplicated_and_reordered_notifications_pay_each_order_once(
    hq: Hq, provider: str
) -> None:
    await hq.faults(
        provider,
        charge_no_answer_rate=1.0,
        notify_duplicate_rate=1.0,
        notify_reorder=True,
        notify_delay_ms=NOTIFY_DELAY_MS,
    )
    orders = [await hq.unanswered_charge(provider) for _ in range(3)]

    async def all_acknowledged() -> bool:
        for order in orders:
            notes = await hq.notifications(provider, order["out_trade_no"])
            if [(n["copies"], n["deliveries"]) for n in notes] != [(2, 2)]:
                return False
        return True

    await until(all_acknowledged, "both copies acknowledged")
    for order in orders:
        paid = await hq.paid(order)
        assert paid.version == (await hq.order(order)).version
        moves = await hq.audits("payments.order.paid", order)
        assert len(moves) == 1, moves
        assert moves[0]["actor"] == f"service:{provider}"
        trade = await hq.sim_trade(provider, order["out_trade_no"])
        assert trade["charged_times"] == 1


# --- (c) a refund notification settles the refund -------------------------------------------


async def test_a_wechat_refund_notification_settles_the_refund(hq: Hq) -> None:
    await hq.faults("wechat")  # no faults; notifications go to HQ
    sale = await hq.api.upload_sale(amount_minor=1000)
    paid = await hq.api.pay(sale, code=wechat_support.auth_code())
    assert paid.status_code == 201, paid.text
    order = paid.json()
    refund = await hq.api.client.post(
        f"/v1/stations/S001/payments/{order['order_id']}/refunds",
        json={"amount_fen": 400, "reason": "pump overcharge"},
        headers={**hq.api.manager, "Idempotency-Key": uuid.uuid4().hex},
    )
    assert refund.status_code == 202, refund.text
    assert refund.json()["state"] == "processing"

    async def refunded() -> PaymentOrder | None:
        found = await hq.order(order)
        return found if found.state is OrderState.PARTIALLY_REFUNDED else None

    after = await until(refunded, "the refund settled")
    assert (after.refunded_fen, after.refund_pending_fen) == (400, 0)
    refunds = await hq.api.client.get(
        f"/v1/stations/S001/payments/{order['order_id']}/refunds", headers=hq.api.manager
    )
    (settled,) = refunds.json()
    assert settled["state"] == "succeeded"
    sim_refund = next(
        r
        for r in (await hq.sim_call("wechat", "GET", "/sim/trades"))["refunds"]
        if r["out_refund_no"] == refund.json()["out_refund_no"]
    )
    assert settled["provider_refund_no"] == sim_refund["refund_id"]
    moves = await hq.audits("payments.order.refund_succeeded", order)
    assert [m["actor"] for m in moves] == ["service:wechat"]
    notes = [
        n
        for n in await hq.notifications("wechat", order["out_trade_no"])
        if n["event_type"] == "REFUND.SUCCESS"
    ]
    assert [n["deliveries"] for n in notes] == [1]


# --- (d) a notification signed with a wrong key is refused -----------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_notification_signed_with_a_wrong_key_is_refused_and_audited(
    hq: Hq, provider: str
) -> None:
    before = len(await hq.api.audit("payments.notification.refused"))
    await hq.faults(
        provider,
        charge_no_answer_rate=1.0,
        notify_wrong_key_rate=1.0,
        notify_delay_ms=NOTIFY_DELAY_MS,
    )
    order = await hq.unanswered_charge(provider)
    unknown = await hq.order(order)

    async def refused_twice() -> list[str] | None:
        (note,) = await hq.notifications(provider, order["out_trade_no"])
        answers: list[str] = note["answers"]
        return answers if len(answers) >= 2 else None

    answers = await until(refused_twice, "two refusals")
    # The provider's own failure format, so that it sends the notification again.
    for answer in answers:
        if provider == "wechat":
            status, _, body = answer.partition(" ")
            assert status == "500", answer
            assert '"code":"FAIL"' in body.replace(" ", ""), answer
        else:
            assert answer == "200 fail", answer
    after = await hq.order(order)
    assert (after.state, after.version) == (OrderState.UNKNOWN, unknown.version)
    assert not await hq.audits("payments.order.paid", order)
    refused = (await hq.api.audit("payments.notification.refused"))[before:]
    assert len(refused) >= 2
    assert all(r["target"] == f"payments:notify/{provider}" for r in refused)
    assert all('"security": true' in r["details"] for r in refused)


# --- (e) HQ down when the provider notifies ---------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_notification_sent_while_hq_is_down_is_resent_and_pays_once_hq_is_back(
    hq: Hq, provider: str
) -> None:
    await hq.faults(provider, charge_no_answer_rate=1.0, notify_delay_ms=NOTIFY_DELAY_MS * 2)
    order = await hq.unanswered_charge(provider)
    await hq.server.down()

    async def failed_twice() -> dict[str, Any] | None:
        (note,) = await hq.notifications(provider, order["out_trade_no"])
        return note if len(note["answers"]) >= 2 else None

    note = await until(failed_twice, "two unanswered sends")
    assert note["deliveries"] == 0
    assert all(a.startswith("no answer") for a in note["answers"]), note["answers"]
    assert (await hq.order(order)).state is OrderState.UNKNOWN

    await hq.server.up()
    await hq.paid(order)

    (note,) = await hq.notifications(provider, order["out_trade_no"])
    assert note["deliveries"] == 1
    assert note["answers"][-1].startswith(("204", "200 success")), note["answers"]
    moves = await hq.audits("payments.order.paid", order)
    assert [m["actor"] for m in moves] == [f"service:{provider}"]
    assert (await hq.sim_trade(provider, order["out_trade_no"]))["charged_times"] == 1
