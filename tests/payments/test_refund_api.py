"""Refunds and voids through HQ's API against the simulators, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from forecourt.payments.domain import OrderState
from tests.support import eventually

from . import alipay_support, wechat_support
from .hq_payments import PaymentsHq, Sims, payments_hq, running_sims


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sims]:
    with running_sims(tmp_path_factory.mktemp("sims")) as running:
        yield running


@pytest.fixture
async def hq(db_url: str, sims: Sims, tmp_path: Path) -> AsyncIterator[PaymentsHq]:
    async with payments_hq(db_url, sims, tmp_path) as running:
        yield running


async def _paid(hq: PaymentsHq, code: str | None = None, amount: int = 30200) -> dict[str, Any]:
    sale = await hq.upload_sale(amount_minor=amount)
    response = await hq.pay(sale, code=code)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def _refund(
    hq: PaymentsHq,
    order_id: str,
    amount: int | None = None,
    *,
    key: str | None = None,
    headers: dict[str, str] | None = None,
    station: str = "S001",
) -> httpx.Response:
    body: dict[str, Any] = {"reason": "customer changed their mind"}
    if amount is not None:
        body["amount_fen"] = amount
    return await hq.client.post(
        f"/v1/stations/{station}/payments/{order_id}/refunds",
        json=body,
        headers={**(headers or hq.manager), "Idempotency-Key": key or uuid.uuid4().hex},
    )


def _code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


# --- refused -----------------------------------------------------------------------------------


async def test_a_refund_of_an_unknown_order_is_404(hq: PaymentsHq) -> None:
    response = await _refund(hq, str(uuid.uuid4()), 100)
    assert response.status_code == 404
    assert _code(response) == "payments.order_unknown"


async def test_a_refund_above_what_was_paid_is_422_and_changes_nothing(hq: PaymentsHq) -> None:
    order = await _paid(hq, alipay_support.auth_code(), 1000)
    response = await _refund(hq, order["order_id"], 1001)
    assert response.status_code == 422, response.text
    assert _code(response) == "payments.refund_too_large"
    assert (await hq.order(order["order_id"])).state is OrderState.PAID
    # part of it, then more than what is left
    assert (await _refund(hq, order["order_id"], 600)).status_code == 201
    over = await _refund(hq, order["order_id"], 401)
    assert over.status_code == 422
    assert over.json()["error"]["details"]["refundable_fen"] == 400


async def test_a_refund_of_a_cancelled_or_failed_order_is_409(hq: PaymentsHq) -> None:
    sale = await hq.upload_sale()
    declined = await hq.pay(sale, code=wechat_support.auth_code("0001"))
    assert declined.status_code == 402
    failed_id = declined.json()["error"]["details"]["order"]["order_id"]
    response = await _refund(hq, failed_id, 100)
    assert response.status_code == 409
    assert _code(response) == "payments.refund_not_allowed"
    cash = await _paid(hq)
    void = await hq.client.post(
        f"/v1/stations/S001/payments/{cash['order_id']}/void", json={}, headers=hq.manager
    )
    assert void.status_code == 200, void.text
    assert void.json()["state"] == "cancelled"
    response = await _refund(hq, cash["order_id"], 100)
    assert response.status_code == 409


async def test_a_cashier_may_not_refund_and_is_audited(hq: PaymentsHq) -> None:
    order = await _paid(hq)
    response = await _refund(hq, order["order_id"], 100, headers=hq.cashier)
    assert response.status_code == 403
    assert any(order["order_id"] in r["target"] for r in await hq.audit("auth.refused"))


async def test_two_concurrent_refunds_of_one_order_one_wins_none_is_lost(hq: PaymentsHq) -> None:
    order = await _paid(hq, alipay_support.auth_code(), 1000)
    answers = await asyncio.gather(
        _refund(hq, order["order_id"], 700), _refund(hq, order["order_id"], 700)
    )
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [201, 409], [a.text for a in answers]
    after = await hq.order(order["order_id"])
    assert (after.state, after.refunded_fen, after.refund_pending_fen) == (
        OrderState.PARTIALLY_REFUNDED,
        700,
        0,
    )
    trade = hq.sims.alipay.trade(order["out_trade_no"])
    assert trade is not None
    assert trade["refunded_fen"] == 700


# --- refunds that go through ---------------------------------------------------------------------


async def test_alipay_partial_then_full_refund(hq: PaymentsHq) -> None:
    order = await _paid(hq, alipay_support.auth_code(), 1000)
    first = await _refund(hq, order["order_id"], 300, key="r1")
    assert first.status_code == 201, first.text
    assert first.json()["state"] == "succeeded"
    assert first.json()["order"]["state"] == "partially_refunded"
    replay = await _refund(hq, order["order_id"], 300, key="r1")
    assert replay.status_code == 201
    assert replay.headers["Idempotency-Replayed"] == "true"
    rest = await _refund(hq, order["order_id"], key="r2")  # what is left: 700
    assert rest.status_code == 201, rest.text
    assert rest.json()["amount_fen"] == 700
    assert rest.json()["order"]["state"] == "refunded"
    listed = await hq.client.get(
        f"/v1/stations/S001/payments/{order['order_id']}/refunds", headers=hq.manager
    )
    assert [r["amount_fen"] for r in listed.json()] == [300, 700]
    assert len(await hq.audit("payments.order.refund_succeeded")) >= 2


async def test_a_wechat_refund_in_processing_is_finished_by_the_worker(hq: PaymentsHq) -> None:
    order = await _paid(hq, wechat_support.auth_code(), 1000)
    response = await _refund(hq, order["order_id"], 400)
    assert response.status_code in (201, 202), response.text
    if response.status_code == 202:
        assert response.json()["state"] == "processing"

    async def refunded() -> bool:
        await hq.recover(after_s=60)
        return (await hq.order(order["order_id"])).state is OrderState.PARTIALLY_REFUNDED

    await eventually(refunded, 10, interval=0.05, what="the refund to finish")
    after = await hq.order(order["order_id"])
    assert after.refunded_fen == 400
    assert hq.sims.wechat.trade(order["out_trade_no"])["refunded_fen"] == 400


async def test_a_cash_refund_is_done_at_once(hq: PaymentsHq) -> None:
    order = await _paid(hq)
    response = await _refund(hq, order["order_id"], 200)
    assert response.status_code == 201, response.text
    assert response.json()["order"]["refunded_fen"] == 200


# --- voids -----------------------------------------------------------------------------------


async def test_voiding_a_payer_still_confirming_reverses_it(hq: PaymentsHq) -> None:
    sale = await hq.upload_sale()
    pending = await hq.pay(sale, code=wechat_support.auth_code("0003"))
    assert pending.status_code == 202, pending.text
    order_id = pending.json()["order_id"]
    void = await hq.client.post(
        f"/v1/stations/S001/payments/{order_id}/void",
        json={"reason": "the customer left"},
        headers=hq.manager,
    )
    assert void.status_code == 200, void.text
    assert void.json()["state"] == "cancelled"
    assert hq.sims.wechat.trade(pending.json()["out_trade_no"])["state"] == "REVOKED"
    again = await hq.client.post(
        f"/v1/stations/S001/payments/{order_id}/void", json={}, headers=hq.manager
    )
    assert again.status_code == 200
    assert again.json()["state"] == "cancelled"
    assert any(order_id in r["target"] for r in await hq.audit("payments.order.reversed"))


async def test_voiding_a_paid_code_payment_the_same_day_refunds_it_in_full(
    hq: PaymentsHq,
) -> None:
    order = await _paid(hq, alipay_support.auth_code(), 1000)
    void = await hq.client.post(
        f"/v1/stations/S001/payments/{order['order_id']}/void", json={}, headers=hq.manager
    )
    assert void.status_code == 200, void.text
    assert void.json()["state"] == "refunded"


async def test_a_failed_order_cannot_be_voided(hq: PaymentsHq) -> None:
    sale = await hq.upload_sale()
    declined = await hq.pay(sale, code=alipay_support.auth_code("0006"))
    assert declined.status_code == 402, declined.text
    order_id = declined.json()["error"]["details"]["order"]["order_id"]
    void = await hq.client.post(
        f"/v1/stations/S001/payments/{order_id}/void", json={}, headers=hq.manager
    )
    assert void.status_code == 409
    assert _code(void) == "payments.void_refused"


async def test_a_cashier_may_not_void(hq: PaymentsHq) -> None:
    order = await _paid(hq)
    void = await hq.client.post(
        f"/v1/stations/S001/payments/{order['order_id']}/void", json={}, headers=hq.cashier
    )
    assert void.status_code == 403


async def test_voiding_an_unanswered_charge_reverses_it_once_no_trade_can_still_land(
    hq: PaymentsHq,
) -> None:
    sale = await hq.upload_sale()
    hq.sims.wechat.faults(error_5xx_rate=1.0)
    unknown = await hq.pay(sale, code=wechat_support.auth_code())
    hq.sims.wechat.reset_faults()
    assert unknown.json()["state"] == "unknown", unknown.text
    order_id = unknown.json()["order_id"]
    void = await hq.client.post(
        f"/v1/stations/S001/payments/{order_id}/void", json={}, headers=hq.manager
    )
    # WeChat has no such trade yet: believed only once a late charge could no longer land.
    assert void.status_code == 202, void.text
    assert void.json()["state"] == "reversing"
    await hq.recover(after_s=120)
    assert (await hq.order(order_id)).state is OrderState.CANCELLED
