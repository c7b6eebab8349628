"""Payment orders on SQLite and PostgreSQL: a sale paid once whatever the interleaving, every
move compared by version, the sale's live and paid amounts following the orders."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from uuid import UUID, uuid4

import pytest
import sqlalchemy as sa

from forecourt.infra.db import Database
from forecourt.infra.migrate import upgrade
from forecourt.payments import store
from forecourt.payments.domain import (
    AmountMismatch,
    Change,
    Event,
    OrderState,
    PaymentOrder,
    SaleAlreadyPaid,
    Tender,
    out_trade_no,
    transition,
)

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
pytestmark = pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = Database(db_url)
    await database.connect()
    await upgrade(database, ("platform", "payments"))
    yield database
    await database.dispose()


def new_order(
    sale_id: UUID, key: str, amount: int = 1000, tender: Tender = Tender.WECHAT
) -> PaymentOrder:
    return PaymentOrder(
        order_id=uuid4(),
        station_code="S001",
        sale_id=sale_id,
        tender=tender,
        amount_fen=amount,
        currency="CNY",
        state=OrderState.CREATED,
        version=1,
        created_at=T0,
        updated_at=T0,
        out_trade_no=out_trade_no(key, "S001") if tender.provider else "",
        idempotency_key=key,
        actor="user:c1",
    )


async def sale_row(db: Database, sale_id: UUID) -> tuple[int, int]:
    async with db.connection() as conn:
        row = (
            await conn.execute(
                sa.select(store.sale_t.c.live_fen, store.sale_t.c.paid_fen).where(
                    store.sale_t.c.sale_id == sale_id
                )
            )
        ).one()
    return int(row.live_fen), int(row.paid_fen)


async def move(
    db: Database, o: PaymentOrder, event: Event, change: Change | None = None
) -> PaymentOrder:
    after = transition(o, event, T0, change)
    async with db.begin() as uow:
        await store.save_transition(uow.conn, o, after)
    return after


async def test_a_sale_takes_one_live_order_and_follows_its_state(db: Database) -> None:
    sale = uuid4()
    first = new_order(sale, "k/1")
    async with db.begin() as uow:
        await store.insert_order(uow.conn, first, due_fen=1000)
    assert await sale_row(db, sale) == (1000, 0)
    with pytest.raises(SaleAlreadyPaid):
        async with db.begin() as uow:
            await store.insert_order(uow.conn, new_order(sale, "k/2"), due_fen=1000)
    pending = await move(db, first, Event.SUBMIT)
    failed = await move(db, pending, Event.REFUSED, Change(failure_code="NOTENOUGH"))
    assert await sale_row(db, sale) == (0, 0)  # a refused order frees the sale
    assert failed.state is OrderState.FAILED
    cash = new_order(sale, "k/2", tender=Tender.CASH)
    async with db.begin() as uow:
        await store.insert_order(uow.conn, cash, due_fen=1000)
    paid = await move(db, cash, Event.CASH_TAKEN)
    assert await sale_row(db, sale) == (1000, 1000)
    async with db.connection() as conn:
        orders = await store.orders_of_sale(conn, "S001", sale)
        assert {o.order_id: o.state for o in orders} == {
            first.order_id: OrderState.FAILED,
            cash.order_id: OrderState.PAID,
        }
        assert await store.order_by_key(conn, "S001", "k/2") == paid
        assert (await store.get_order(conn, first.order_id)) == failed
    refunding = await move(db, paid, Event.REFUND, Change(refund_fen=1000))
    assert await sale_row(db, sale) == (1000, 1000)
    await move(db, refunding, Event.REFUND_SUCCEEDED, Change(refund_fen=1000))
    assert await sale_row(db, sale) == (0, 0)  # fully refunded: the sale is due again


async def test_wrong_amount_writes_nothing(db: Database) -> None:
    sale = uuid4()
    with pytest.raises(AmountMismatch):
        async with db.begin() as uow:
            await store.insert_order(uow.conn, new_order(sale, "k/1", amount=999), due_fen=1000)
    async with db.connection() as conn:
        assert await store.orders_of_sale(conn, "S001", sale) == []
        assert (
            await conn.execute(sa.select(sa.func.count()).select_from(store.sale_t))
        ).scalar() == 0


async def test_concurrent_orders_for_one_sale_one_wins(db: Database) -> None:
    sale = uuid4()

    async def attempt(i: int) -> str:
        try:
            async with db.begin() as uow:
                await store.insert_order(uow.conn, new_order(sale, f"k/{i}"), due_fen=1000)
                await asyncio.sleep(0.01)  # hold the transaction open while the others try
        except SaleAlreadyPaid:
            return "refused"
        return "created"

    results = await asyncio.gather(*(attempt(i) for i in range(6)))
    assert sorted(results) == ["created"] + ["refused"] * 5
    assert await sale_row(db, sale) == (1000, 0)


async def test_a_stale_version_changes_nothing(db: Database) -> None:
    o = new_order(uuid4(), "k/1")
    async with db.begin() as uow:
        await store.insert_order(uow.conn, o, due_fen=1000)
    pending = await move(db, o, Event.SUBMIT)
    with pytest.raises(store.ConcurrentUpdate):  # a second command that read the order before
        await move(db, o, Event.SUBMIT)
    paid = await move(db, pending, Event.PAID, Change(provider_trade_no="4200"))
    with pytest.raises(store.ConcurrentUpdate):
        await move(db, pending, Event.NO_ANSWER)
    async with db.connection() as conn:
        assert await store.get_order(conn, o.order_id) == paid
        assert await store.order_by_out_trade_no(conn, o.out_trade_no) == paid


async def test_due_orders_and_notifications_seen_once(db: Database) -> None:
    o = new_order(uuid4(), "k/1")
    async with db.begin() as uow:
        await store.insert_order(uow.conn, o, due_fen=1000, next_check_at=T0)
        assert await store.seen_notification(uow.conn, "wechat", "n-1", o.out_trade_no, T0)
        assert not await store.seen_notification(uow.conn, "wechat", "n-1", o.out_trade_no, T0)
        assert await store.seen_notification(uow.conn, "alipay", "n-1", o.out_trade_no, T0)
    async with db.connection() as conn:
        assert [d.order_id for d in await store.due_orders(conn, T0)] == [o.order_id]
        assert await store.overdue_count(conn, T0) == 1
    pending = transition(o, Event.SUBMIT, T0)
    async with db.begin() as uow:
        await store.save_transition(uow.conn, o, pending, next_check_at=None, checked=True)
    async with db.connection() as conn:
        assert await store.due_orders(conn, T0) == []
        assert (await store.checks_of(conn, o.order_id))[0] == 1
        assert await store.counts_by_state(conn) == {("wechat", "pending"): 1}
        assert replace(pending) == await store.get_order(conn, o.order_id)
