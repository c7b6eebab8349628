"""Provider notifications at HQ (open routes, believed only when signed) and the cash an edge
took while HQ was away, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from forecourt.payments.domain import OrderState

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


async def _pending(hq: PaymentsHq, code: str) -> dict[str, Any]:
    """An order whose payer never confirms (the counter is answered 202 pending)."""
    sale = await hq.upload_sale(amount_minor=500)
    response = await hq.pay(sale, code=code)
    assert response.status_code == 202, response.text
    return dict(response.json())


async def _wechat(hq: PaymentsHq, headers: dict[str, str], body: bytes) -> Any:
    return await hq.client.post(
        "/v1/payments/notify/wechat",
        content=body,
        headers={**headers, "content-type": "application/json"},
    )


async def _alipay(hq: PaymentsHq, headers: dict[str, str], body: bytes) -> Any:
    return await hq.client.post("/v1/payments/notify/alipay", content=body, headers=headers)


# --- refused and ignored -------------------------------------------------------------------------


async def test_a_wechat_notification_with_a_bad_signature_is_refused_changes_nothing_and_is_audited(
    hq: PaymentsHq,
) -> None:
    order = await _pending(hq, wechat_support.auth_code("0003"))
    headers, body = wechat_support.make_notification(
        wechat_support.paid_transaction(order["out_trade_no"], 500),
        signing_key_pem=wechat_support.keys().stranger_private_pem,
    )
    response = await _wechat(hq, headers, body)
    assert response.status_code == 500  # WeChat's "not accepted": it sends it again
    assert response.json()["code"] == "FAIL"
    assert (await hq.order(order["order_id"])).state is OrderState.PENDING
    refused = await hq.audit("payments.notification.refused")
    assert refused
    assert '"security": true' in refused[-1]["details"]


async def test_an_alipay_notification_with_a_bad_signature_is_answered_fail(
    hq: PaymentsHq,
) -> None:
    order = await _pending(hq, alipay_support.auth_code("0003"))
    headers, body = alipay_support.signed_notification(
        alipay_support.paid_notification_params(order["out_trade_no"], total_amount="5.00"),
        private_pem=alipay_support.keys().stranger_private_pem,
    )
    response = await _alipay(hq, headers, body)
    assert (response.status_code, response.text) == (200, "fail")
    assert (await hq.order(order["order_id"])).state is OrderState.PENDING
    assert await hq.audit("payments.notification.refused")


async def test_a_replayed_notification_is_acknowledged_and_changes_nothing(
    hq: PaymentsHq,
) -> None:
    order = await _pending(hq, wechat_support.auth_code("0003"))
    note_id = str(uuid.uuid4())
    headers, body = wechat_support.make_notification(
        wechat_support.paid_transaction(order["out_trade_no"], 500), notification_id=note_id
    )
    first = await _wechat(hq, headers, body)
    assert first.status_code == 204, first.text
    paid = await hq.order(order["order_id"])
    assert paid.state is OrderState.PAID
    again = await _wechat(hq, headers, body)
    assert again.status_code == 204
    assert (await hq.order(order["order_id"])).version == paid.version
    # the same id, signed anew (a re-send): still once
    headers2, body2 = wechat_support.make_notification(
        wechat_support.paid_transaction(order["out_trade_no"], 500), notification_id=note_id
    )
    assert (await _wechat(hq, headers2, body2)).status_code == 204
    assert (await hq.order(order["order_id"])).version == paid.version


async def test_a_notification_for_an_order_hq_does_not_have_is_acknowledged_and_audited(
    hq: PaymentsHq,
) -> None:
    headers, body = wechat_support.make_notification(
        wechat_support.paid_transaction("FC" + "0" * 30, 500)
    )
    response = await _wechat(hq, headers, body)
    assert response.status_code == 204  # acknowledged: WeChat stops re-sending
    unknown = await hq.audit("payments.notification.unknown_order")
    assert unknown
    assert "FC" + "0" * 30 in unknown[-1]["details"]


async def test_a_notification_of_another_amount_does_not_pay_the_order(hq: PaymentsHq) -> None:
    order = await _pending(hq, wechat_support.auth_code("0003"))
    headers, body = wechat_support.make_notification(
        wechat_support.paid_transaction(order["out_trade_no"], 1)
    )
    assert (await _wechat(hq, headers, body)).status_code == 204
    assert (await hq.order(order["order_id"])).state is OrderState.PENDING
    assert await hq.audit("payments.notification.amount_mismatch")


# --- believed -----------------------------------------------------------------------------------


async def test_an_alipay_paid_notification_pays_a_pending_order(hq: PaymentsHq) -> None:
    order = await _pending(hq, alipay_support.auth_code("0003"))
    headers, body = alipay_support.signed_notification(
        alipay_support.paid_notification_params(order["out_trade_no"], total_amount="5.00")
    )
    response = await _alipay(hq, headers, body)
    assert (response.status_code, response.text) == (200, "success")
    paid = await hq.order(order["order_id"])
    assert paid.state is OrderState.PAID
    assert paid.provider_trade_no == "2026120222001400000000000001"


async def test_the_notify_routes_need_no_credential_but_others_do(hq: PaymentsHq) -> None:
    response = await hq.client.get("/v1/stations/S001/payments")
    assert response.status_code == 401


# --- offline cash ---------------------------------------------------------------------------------


def _cash(sale: dict[str, Any], key: str) -> dict[str, Any]:
    return {
        "idempotency_key": key,
        "sale_id": sale["sale_id"],
        "amount_fen": sale["amount_minor"],
        "currency": "CNY",
        "recorded_at": datetime(2026, 12, 1, 2, 30, tzinfo=UTC).isoformat(),
        "cashier": "lin",
    }


async def test_offline_cash_is_applied_once_each_and_a_replay_is_answered_duplicate(
    hq: PaymentsHq,
) -> None:
    sales = [await hq.upload_sale(), await hq.upload_sale()]
    batch = {
        "payments": [
            _cash(sales[0], "edge/cash/1"),
            _cash(sales[1], "edge/cash/2"),
            _cash({"sale_id": str(uuid.uuid4()), "amount_minor": 100}, "edge/cash/3"),
        ]
    }
    first = await hq.client.post(
        "/v1/stations/S001/payments/cash", json=batch, headers=hq.station("S001")
    )
    assert first.status_code == 200, first.text
    results = first.json()["results"]
    assert [r["status"] for r in results] == ["created", "created", "refused"]
    assert results[2]["error"]["code"] == "payments.sale_unknown"
    again = await hq.client.post(
        "/v1/stations/S001/payments/cash", json=batch, headers=hq.station("S001")
    )
    assert [r["status"] for r in again.json()["results"]] == ["duplicate", "duplicate", "refused"]
    assert [r["order_id"] for r in again.json()["results"][:2]] == [
        r["order_id"] for r in results[:2]
    ]
    order = await hq.order(results[0]["order_id"])
    assert (order.state, order.tender.value, order.actor) == (OrderState.PAID, "cash", "user:lin")
    assert order.paid_at == datetime(2026, 12, 1, 2, 30, tzinfo=UTC)
    # the sale is paid: a counter payment of it is refused
    assert (await hq.pay(sales[0])).status_code == 409


async def test_offline_cash_takes_the_stations_own_credential_only(hq: PaymentsHq) -> None:
    sale = await hq.upload_sale()
    batch = {"payments": [_cash(sale, "edge/cash/x")]}
    by_staff = await hq.client.post("/v1/stations/S001/payments/cash", json=batch, headers=hq.admin)
    assert by_staff.status_code == 403
    other = await hq.client.post(
        "/v1/stations/S001/payments/cash", json=batch, headers=hq.station("S002")
    )
    assert other.status_code == 403
    assert other.json()["error"]["code"] == "auth.wrong_station"


async def test_a_wechat_refund_notification_finishes_a_refund_in_processing(
    hq: PaymentsHq,
) -> None:
    sale = await hq.upload_sale(amount_minor=1000)
    paid = await hq.pay(sale, code=wechat_support.auth_code())
    assert paid.status_code == 201, paid.text
    order = paid.json()
    refund = await hq.client.post(
        f"/v1/stations/S001/payments/{order['order_id']}/refunds",
        json={"amount_fen": 400},
        headers={**hq.manager, "Idempotency-Key": uuid.uuid4().hex},
    )
    assert refund.status_code == 202, refund.text
    assert refund.json()["state"] == "processing"
    resource = {
        "mchid": wechat_support.MCHID,
        "out_trade_no": order["out_trade_no"],
        "transaction_id": order["provider_trade_no"],
        "out_refund_no": refund.json()["out_refund_no"],
        "refund_id": "50000000382019052709732678859",
        "refund_status": "SUCCESS",
        "success_time": "2026-12-02T10:00:05+08:00",
        "user_received_account": "支付用户零钱",
        "amount": {"total": 1000, "refund": 400, "payer_total": 1000, "payer_refund": 400},
    }
    headers, body = wechat_support.make_notification(
        resource, event_type="REFUND.SUCCESS", original_type="refund"
    )
    assert (await _wechat(hq, headers, body)).status_code == 204
    after = await hq.order(order["order_id"])
    assert (after.state, after.refunded_fen, after.refund_pending_fen) == (
        OrderState.PARTIALLY_REFUNDED,
        400,
        0,
    )
    refunds = await hq.client.get(
        f"/v1/stations/S001/payments/{order['order_id']}/refunds", headers=hq.manager
    )
    assert refunds.json()[0]["state"] == "succeeded"
    assert refunds.json()[0]["provider_refund_no"] == "50000000382019052709732678859"
