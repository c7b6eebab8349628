"""The payments recovery worker and the charge route's idempotency recovery: a charge whose
HQ process died after it was sent is settled by querying the provider, never charged again."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from forecourt.infra.idempotency import IdempotencyKey, request_hash
from forecourt.payments.domain import OrderState
from forecourt.payments.handlers import ChargeRequest, PaymentsService
from forecourt.payments.providers.base import ChargeResult, PaymentProvider
from forecourt.payments.recovery import drive, recover_once, run_recovery

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


class OffsetClock:
    """The system's time, moved on by the test."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset


class Died(Exception):
    """The HQ process went away right after the provider was called."""


class DiesAfterCharging:
    """A provider whose charge reaches the provider, and then HQ dies."""

    def __init__(self, real: PaymentProvider) -> None:
        self.real = real
        self.name = real.name

    async def charge_by_code(self, **kw: Any) -> ChargeResult:
        await self.real.charge_by_code(**kw)
        raise Died

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


async def test_a_charge_whose_process_died_after_sending_is_recovered_on_retry_not_charged_again(
    hq: PaymentsHq,
) -> None:
    service = hq.office.payments
    assert service is not None
    clock = OffsetClock()
    hq.office.db.clock = clock
    sale = await hq.upload_sale()
    code = wechat_support.auth_code()
    body = {
        "sale_id": sale["sale_id"],
        "amount_fen": sale["amount_minor"],
        "currency": "CNY",
        "method": "code",
        "auth_code": code,
    }
    key_text = f"died-{uuid.uuid4().hex}"
    # The first request, as the route would run it, in a process that dies after charging.
    key = IdempotencyKey(
        hq.office.db,
        "payments.charge/S001",
        key_text,
        request_hash("POST", "/v1/stations/S001/payments", json.dumps(body).encode()),
    )
    await key.acquire(service.recover_charge)
    dying: Mapping[str, PaymentProvider] = {
        "wechat": DiesAfterCharging(service.providers["wechat"])
    }
    doomed = PaymentsService(hq.office.db, dying, service.config)
    with pytest.raises(Died):
        await doomed.charge(
            ChargeRequest("S001", uuid.UUID(sale["sale_id"]), 30200, "CNY", "code", code, "user:x"),
            key,
        )
    # A retry while its lease holds: in progress.
    busy = await hq.pay(sale, code=code, key=key_text)
    assert busy.status_code == 409, busy.text
    assert busy.json()["error"]["code"] == "idempotency.in_progress"
    # Its lease expired: the retry is answered from the provider's word, not a new charge.
    clock.offset = timedelta(seconds=60)
    retry = await hq.pay(sale, code=code, key=key_text)
    assert retry.status_code == 201, retry.text
    assert retry.json()["state"] == "paid"
    assert retry.headers["Idempotency-Replayed"] == "true"
    trade = hq.sims.wechat.trade(retry.json()["out_trade_no"])
    assert trade["charged_times"] == 1
    assert hq.sims.wechat.trades()["payers"][code]["charged_times"] == 1
    # and from then on the stored answer
    again = await hq.pay(sale, code=code, key=key_text)
    assert (again.status_code, again.json()["order_id"]) == (201, retry.json()["order_id"])


async def test_the_worker_finishes_an_order_left_pending_by_a_dead_process(hq: PaymentsHq) -> None:
    """The order was submitted (committed) and the provider charged, but nobody heard."""
    service = hq.office.payments
    assert service is not None
    sale = await hq.upload_sale()
    code = wechat_support.auth_code()
    key = IdempotencyKey(hq.office.db, "payments.charge/S001", uuid.uuid4().hex, "h" * 64)
    await key.acquire(None)
    dying = {"wechat": DiesAfterCharging(service.providers["wechat"])}
    with pytest.raises(Died):
        await PaymentsService(hq.office.db, dying, service.config).charge(
            ChargeRequest("S001", uuid.UUID(sale["sale_id"]), 30200, "CNY", "code", code, "user:x"),
            key,
        )
    assert await hq.recover(after_s=0) == 0  # not due yet
    assert await hq.recover(after_s=30) == 1
    listed = await hq.client.get(
        "/v1/stations/S001/payments", params={"sale_id": sale["sale_id"]}, headers=hq.admin
    )
    (order,) = listed.json()["items"]
    assert order["state"] == "paid"
    assert await hq.recover(after_s=3600) == 0  # settled: nothing owed


async def test_the_recovery_loop_runs_until_told_to_stop(hq: PaymentsHq) -> None:
    service = hq.office.payments
    assert service is not None
    sale = await hq.upload_sale()
    hq.sims.wechat.faults(charge_no_answer_rate=1.0)
    response = await hq.pay(sale, code=wechat_support.auth_code())
    assert response.json()["state"] == "unknown"
    hq.sims.wechat.reset_faults()
    stop = asyncio.Event()
    fast = type(service.config)(recheck_s=0.05, recheck_max_s=0.1)
    async with hq.office.db.begin() as uow:  # due now
        from forecourt.payments import store

        order = await store.get_order(uow.conn, uuid.UUID(response.json()["order_id"]))
        assert order is not None
        await store.save_transition(uow.conn, order, order, next_check_at=order.created_at)
    task = asyncio.create_task(
        run_recovery(hq.office.db, service.providers, 0.02, stop, config=fast)
    )
    try:

        async def paid() -> bool:
            return (await hq.order(response.json()["order_id"])).state is OrderState.PAID

        from tests.support import eventually

        await eventually(paid, 10, interval=0.05, what="the worker to settle the order")
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert await recover_once(hq.office.db, service.providers) == 0


async def test_a_refund_settled_after_the_worker_read_its_order_is_left_alone(
    hq: PaymentsHq,
) -> None:
    """The worker reads the due orders, then looks at them one by one (each look may wait
    seconds for a provider): meanwhile the request that sent a refund settles it. The
    worker's look at the order it read as refunding finds nothing in flight and nothing
    owed: no error, no write."""
    service = hq.office.payments
    assert service is not None
    sale = await hq.upload_sale(amount_minor=1000)
    paid = await hq.pay(sale, code=alipay_support.auth_code())
    assert paid.status_code == 201, paid.text
    order_id = paid.json()["order_id"]
    refunded = await hq.client.post(
        f"/v1/stations/S001/payments/{order_id}/refunds",
        json={"reason": "customer changed their mind", "amount_fen": 400},
        headers={**hq.manager, "Idempotency-Key": uuid.uuid4().hex},
    )
    assert refunded.status_code == 201, refunded.text
    settled = await hq.order(order_id)
    assert settled.state is OrderState.PARTIALLY_REFUNDED
    # The order as the worker read it among the due ones: the move before the settlement.
    seen = dataclasses.replace(settled, state=OrderState.REFUNDING, version=settled.version - 1)
    with capture_logs() as logs:
        looked = await drive(service, seen, hq.office.db.clock.now())
    assert looked == settled
    assert [e for e in logs if e["log_level"] in ("error", "critical")] == []
    assert await hq.order(order_id) == settled
    assert await hq.recover(after_s=3600) == 0  # nothing owed
