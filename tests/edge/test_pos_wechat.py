"""Code payments end to end: the cashier's terminal → the edge's POS API → HQ's payments API →
the WeChat Pay simulator (a process of its own), with a simulated PTS-2 controller selling the
fuel. A declined code is followed by a new attempt under a new key; an attempt whose answer
was lost is sent again under its key and charged once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from forecourt.bootstrap import build_head_office
from forecourt.edge.pos import idempotency_key
from forecourt.kernel.clock import SimulatedClock
from forecourt.network.handlers import SAMPLE_CHAIN, import_chain, load_chain_file
from forecourt.settings import Settings
from tests.edge.conftest import HqServer, Station
from tests.edge.test_pos import TOKEN_S, Counter, envelope, running
from tests.payments.wechat_support import (
    APPID,
    MCHID,
    MERCHANT_SERIAL,
    WechatSimProcess,
    auth_code,
    keys,
    sim_config,
)
from tests.support import eventually


@pytest.fixture
async def wechat(tmp_path: Path) -> AsyncIterator[WechatSimProcess]:
    # The payer of a "confirm" code (ending 0002) confirms 1.5 s after paying, whatever is asked.
    config = sim_config(payer={"confirm_after_queries": 1000, "confirm_after_ms": 1500})
    sim = WechatSimProcess(config, tmp_path / "wechat")
    await asyncio.to_thread(sim.start)
    try:
        yield sim
    finally:
        sim.stop()


@pytest.fixture
async def hq(
    tmp_path: Path, clock: SimulatedClock, wechat: WechatSimProcess
) -> AsyncIterator[HqServer]:
    k = keys()
    merchant_key = tmp_path / "merchant.pem"
    merchant_key.write_text(k.merchant_private_pem, encoding="ascii")
    platform = tmp_path / "platform.pem"
    platform.write_text(k.platform_certificate_pem, encoding="ascii")
    office = build_head_office(
        Settings(
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'hq.db'}",
            log_json=False,
            identity_access_token_s=TOKEN_S,
            payments_wechat_mchid=MCHID,
            payments_wechat_appid=APPID,
            payments_wechat_merchant_serial_no=MERCHANT_SERIAL,
            payments_wechat_merchant_key_file=merchant_key,
            payments_wechat_apiv3_key=k.apiv3_key,
            payments_wechat_platform_certificate_file=platform,
            payments_wechat_base_url=wechat.base_url,
            payments_wechat_timeout_s=5.0,
            payments_confirm_wait_s=5.0,
            payments_poll_interval_s=0.2,
            # The simulated clock runs fast: no open order is given up during a test.
            payments_pending_deadline_s=3600,
            payments_unknown_deadline_s=86_400,
        ),
        clock=clock,
    )
    await office.start()
    await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
    server = HqServer(office)
    await server.up()
    yield server
    await server.down()
    await office.stop()


@contextlib.asynccontextmanager
async def counter_at(station: Station, **overrides: Any) -> AsyncIterator[Counter]:
    async with running(station, **overrides) as counter:
        yield counter


async def uploaded_sale(counter: Counter, headers: dict[str, str]) -> dict[str, Any]:
    """An unpaid sale HQ holds already."""
    sale = await counter.a_sale(headers)
    store = counter.node.app.state.pos.store

    async def at_hq() -> bool:
        return await store.upload_state(sale["sale_id"]) == "sent"

    await eventually(at_hq, 20, what="the sale at HQ")
    return sale


async def test_a_code_payment_goes_from_the_counter_through_hq_to_wechat_pay(
    station: Station, wechat: WechatSimProcess
) -> None:
    async with counter_at(station, pos_hq_timeout_s=10.0) as counter:  # HQ answers, if slowly
        headers = await counter.cashier()
        sale = await counter.a_sale(headers)  # its upload is flushed by the payment itself
        code = auth_code()
        answer = await counter.pay(sale["sale_id"], {"method": "code", "auth_code": code}, headers)
        assert answer.status_code == 200, answer.text
        payment = answer.json()["payment"]
        assert payment["status"] == "paid"
        assert payment["order_id"]
        assert payment["idempotency_key"] == idempotency_key(sale["sale_id"], 1)
        [order] = await counter.hq_orders(sale["sale_id"])
        assert (order["tender"], order["state"], order["amount_fen"]) == (
            "wechat",
            "paid",
            sale["amount_fen"],
        )
        assert order["order_id"] == payment["order_id"]
        trade = wechat.trade(order["out_trade_no"])
        assert trade["state"] == "SUCCESS"
        assert answer.json()["sale"]["payment_status"] == "paid"
        envelope(
            await counter.pay(sale["sale_id"], {"method": "code", "auth_code": code}, headers),
            409,
            "pos.sale_paid",
        )


async def test_a_declined_code_is_402_and_the_next_code_is_a_new_attempt_with_a_new_key(
    station: Station,
) -> None:
    async with counter_at(station, pos_hq_timeout_s=10.0) as counter:  # HQ answers, if slowly
        headers = await counter.cashier()
        sale = await uploaded_sale(counter, headers)
        poor = {"method": "code", "auth_code": auth_code("0001")}  # not enough balance
        error = envelope(
            await counter.pay(sale["sale_id"], poor, headers), 402, "pos.payment_declined"
        )
        assert error["details"]["attempt"] == 1
        good = {"method": "code", "auth_code": auth_code()}
        answer = await counter.pay(sale["sale_id"], good, headers)
        assert answer.status_code == 200, answer.text
        attempts = answer.json()["sale"]["attempts"]
        assert [(a["attempt"], a["status"], a["idempotency_key"]) for a in attempts] == [
            (1, "declined", idempotency_key(sale["sale_id"], 1)),
            (2, "paid", idempotency_key(sale["sale_id"], 2)),
        ]
        states = sorted(o["state"] for o in await counter.hq_orders(sale["sale_id"]))
        assert states == ["failed", "paid"]


async def test_an_attempt_whose_answer_is_lost_is_sent_again_under_its_key_and_charged_once(
    station: Station,
) -> None:
    # The edge gives up on HQ after 0.3 s; the payer takes 1.5 s to confirm.
    async with counter_at(station, pos_hq_timeout_s=0.3, pos_payment_wait_s=0.5) as counter:
        headers = await counter.cashier()
        sale = await uploaded_sale(counter, headers)
        body = {"method": "code", "auth_code": auth_code("0002")}
        started = time.monotonic()
        first = await counter.pay(sale["sale_id"], body, headers)
        assert time.monotonic() - started < 1.0
        envelope(first, 503, "pos.payment_outcome_unknown")
        # No cash while the code's outcome is open.
        cash = {"method": "cash", "tendered_fen": sale["amount_fen"]}
        envelope(await counter.pay(sale["sale_id"], cash, headers), 409, "pos.payment_in_progress")

        async def paid() -> dict[str, Any] | None:
            # A retry with another scanned code: the open attempt is sent as it was.
            again = await counter.pay(
                sale["sale_id"], {"method": "code", "auth_code": auth_code()}, headers
            )
            assert again.status_code in (200, 202, 503), again.text
            return again.json() if again.status_code == 200 else None

        answer = await eventually(paid, 30, interval=0.2, what="the payment's outcome")
        attempts = answer["sale"]["attempts"]
        assert [(a["attempt"], a["status"], a["idempotency_key"]) for a in attempts] == [
            (1, "paid", idempotency_key(sale["sale_id"], 1))
        ]
        orders = await counter.hq_orders(sale["sale_id"])
        assert [(o["tender"], o["state"]) for o in orders] == [("wechat", "paid")]
