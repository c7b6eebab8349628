"""A charge whose order another process moved between the charge's read and its write (a
notification or the recovery worker settling it first): the answer is applied to the order as
it is now, never lost, and the cashier is not told 409."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from forecourt.payments import store
from forecourt.payments.domain import OrderState, PaymentOrder
from forecourt.payments.handlers import SYSTEM_ACTOR

from . import wechat_support
from .hq_payments import PaymentsHq, Sims, payments_hq, running_sims


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sims]:
    with running_sims(tmp_path_factory.mktemp("sims")) as running:
        yield running


@pytest.fixture
async def hq(pg_url: str, sims: Sims, tmp_path: Path) -> AsyncIterator[PaymentsHq]:
    # PostgreSQL: two writers at once (on SQLite the charge's transaction holds the one lock).
    async with payments_hq(pg_url, sims, tmp_path) as running:
        yield running


async def test_an_order_paid_by_another_process_meanwhile_is_answered_paid_not_409(
    hq: PaymentsHq, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = hq.office.payments
    assert service is not None
    original = store.save_transition
    raced: list[str] = []

    async def racing(conn: Any, before: PaymentOrder, after: PaymentOrder, **kw: Any) -> Any:
        if after.state is OrderState.PAID and not raced:
            # Another process settles the order first, from the provider's own word.
            raced.append(str(before.order_id))
            result = await service.query(service.provider(before.tender), before.out_trade_no)
            async with hq.office.db.begin() as other:
                await service.apply_charge(other, before.order_id, result, actor=SYSTEM_ACTOR)
        return await original(conn, before, after, **kw)

    monkeypatch.setattr(store, "save_transition", racing)
    sale = await hq.upload_sale()
    response = await hq.pay(sale, code=wechat_support.auth_code())
    assert raced, "the race was not staged"
    assert response.status_code == 201, response.text
    assert response.json()["state"] == "paid"
    order = await hq.order(response.json()["order_id"])
    assert order.state is OrderState.PAID
    # Paid once: one move to paid, by the process that won.
    paid = [r for r in await hq.audit("payments.order.paid") if raced[0] in r["target"]]
    assert len(paid) == 1, paid
    assert hq.sims.wechat.trade(order.out_trade_no)["charged_times"] == 1
