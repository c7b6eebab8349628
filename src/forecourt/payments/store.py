"""Persistence of payment orders and refunds (SQLAlchemy Core on SQLite and PostgreSQL).

Every state change is one ``UPDATE ... WHERE order_id = :id AND version = :seen``: of two
concurrent commands on one order, one writes and the other gets :class:`ConcurrentUpdate`
(409) and changes nothing. A sale's ``payment_sale`` row holds what it is due and the amount
of its live orders; a new order raises ``live_fen`` with a guarded ``UPDATE`` (the database's
row lock serialises two cashiers paying one sale), and the table's check keeps it at most the
due amount, so a sale is never paid twice, whatever the interleaving.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from forecourt.infra.db import UTCDateTime
from forecourt.kernel.errors import Conflict
from forecourt.payments.domain import (
    LIVE,
    OrderState,
    PaymentOrder,
    Refund,
    RefundState,
    Tender,
    settle_sale_check,
)

SCHEMA = "payments"
md = sa.MetaData(schema=SCHEMA)

order_t = sa.Table(
    "payment_order",
    md,
    sa.Column("order_id", sa.Uuid, primary_key=True),
    sa.Column("station_code", sa.String(40), nullable=False),
    sa.Column("sale_id", sa.Uuid, nullable=False),
    sa.Column("tender", sa.String(16), nullable=False),
    sa.Column("amount_fen", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("state", sa.String(24), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("out_trade_no", sa.String(32)),
    sa.Column("idempotency_key", sa.String(200), nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("provider_trade_no", sa.String(64)),
    sa.Column("paid_at", UTCDateTime()),
    sa.Column("refunded_fen", sa.BigInteger, nullable=False),
    sa.Column("refund_pending_fen", sa.BigInteger, nullable=False),
    sa.Column("awaiting_payer", sa.Boolean, nullable=False),
    sa.Column("failure_code", sa.String(80)),
    sa.Column("failure_message", sa.String(400)),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Column("next_check_at", UTCDateTime()),
    sa.Column("checks", sa.Integer, nullable=False),
    sa.Column("traceparent", sa.String(80)),
)
refund_t = sa.Table(
    "payment_refund",
    md,
    sa.Column("refund_id", sa.Uuid, primary_key=True),
    sa.Column("order_id", sa.Uuid, nullable=False),
    sa.Column("refund_key", sa.String(200), nullable=False),
    sa.Column("out_refund_no", sa.String(32), nullable=False),
    sa.Column("amount_fen", sa.BigInteger, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(200), nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("provider_refund_no", sa.String(64)),
    sa.Column("failure_code", sa.String(80)),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)
sale_t = sa.Table(
    "payment_sale",
    md,
    sa.Column("station_code", sa.String(40), primary_key=True),
    sa.Column("sale_id", sa.Uuid, primary_key=True),
    sa.Column("due_fen", sa.BigInteger, nullable=False),
    sa.Column("live_fen", sa.BigInteger, nullable=False),
    sa.Column("paid_fen", sa.BigInteger, nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)
notification_t = sa.Table(
    "payment_notification",
    md,
    sa.Column("provider", sa.String(16), primary_key=True),
    sa.Column("notification_id", sa.String(128), primary_key=True),
    sa.Column("out_trade_no", sa.String(32), nullable=False),
    sa.Column("received_at", UTCDateTime(), nullable=False),
)

#: States whose amount counts as paid on the sale (the money is with us).
PAID_STATES = frozenset({OrderState.PAID, OrderState.REFUNDING, OrderState.PARTIALLY_REFUNDED})


class ConcurrentUpdate(Conflict):
    code = "payments.concurrent_update"
    http_status = 409


def _insert(conn: AsyncConnection) -> Any:
    return postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert


def order_from_row(row: Any) -> PaymentOrder:
    m = row._mapping
    return PaymentOrder(
        order_id=m["order_id"],
        station_code=m["station_code"],
        sale_id=m["sale_id"],
        tender=Tender(m["tender"]),
        amount_fen=int(m["amount_fen"]),
        currency=m["currency"],
        state=OrderState(m["state"]),
        version=int(m["version"]),
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        out_trade_no=m["out_trade_no"] or "",
        idempotency_key=m["idempotency_key"],
        actor=m["actor"],
        provider_trade_no=m["provider_trade_no"],
        paid_at=m["paid_at"],
        refunded_fen=int(m["refunded_fen"]),
        refund_pending_fen=int(m["refund_pending_fen"]),
        awaiting_payer=bool(m["awaiting_payer"]),
        failure_code=m["failure_code"],
        failure_message=m["failure_message"],
    )


def _order_values(order: PaymentOrder) -> dict[str, Any]:
    return {
        "order_id": order.order_id,
        "station_code": order.station_code,
        "sale_id": order.sale_id,
        "tender": order.tender.value,
        "amount_fen": order.amount_fen,
        "currency": order.currency,
        "state": order.state.value,
        "version": order.version,
        "out_trade_no": order.out_trade_no or None,
        "idempotency_key": order.idempotency_key,
        "actor": order.actor,
        "provider_trade_no": order.provider_trade_no,
        "paid_at": order.paid_at,
        "refunded_fen": order.refunded_fen,
        "refund_pending_fen": order.refund_pending_fen,
        "awaiting_payer": order.awaiting_payer,
        "failure_code": order.failure_code,
        "failure_message": (order.failure_message or "")[:400] or None,
        "created_at": order.created_at,
        "updated_at": order.updated_at,
    }


async def insert_order(
    conn: AsyncConnection,
    order: PaymentOrder,
    *,
    due_fen: int,
    exact: bool = True,
    next_check_at: datetime | None = None,
    traceparent: str | None = None,
) -> None:
    """Insert a new order and count its amount against its sale's due amount, in the
    caller's transaction; :class:`~forecourt.payments.domain.SaleAlreadyPaid` or
    :class:`~forecourt.payments.domain.AmountMismatch` (nothing written) when it does not fit."""
    key = {"station_code": order.station_code, "sale_id": order.sale_id}
    await conn.execute(
        _insert(conn)(sale_t)
        .values(**key, due_fen=due_fen, live_fen=0, paid_fen=0, updated_at=order.created_at)
        .on_conflict_do_nothing()
    )
    # The row lock taken here serialises orders for one sale until the transaction ends.
    row = (
        await conn.execute(
            sale_t.update()
            .where(sale_t.c.station_code == order.station_code, sale_t.c.sale_id == order.sale_id)
            .values(updated_at=order.created_at)
            .returning(sale_t.c.due_fen, sale_t.c.live_fen)
        )
    ).one()
    settle_sale_check(int(row.due_fen), int(row.live_fen), order.amount_fen, exact=exact)
    live = int(row.live_fen) + order.amount_fen
    paid = order.amount_fen if order.state in PAID_STATES else 0
    await conn.execute(
        sale_t.update()
        .where(sale_t.c.station_code == order.station_code, sale_t.c.sale_id == order.sale_id)
        .values(live_fen=live, paid_fen=sale_t.c.paid_fen + paid)
    )
    await conn.execute(
        order_t.insert().values(
            **_order_values(order), next_check_at=next_check_at, checks=0, traceparent=traceparent
        )
    )


async def save_transition(
    conn: AsyncConnection,
    before: PaymentOrder,
    after: PaymentOrder,
    *,
    next_check_at: datetime | None = None,
    checked: bool = False,
) -> None:
    """Write ``after`` over ``before`` (compared by version) and move the sale's live and paid
    amounts with it. ``next_check_at``: when the recovery worker looks at it next (None:
    settled, nothing owed)."""
    values = _order_values(after)
    for fixed in (
        "order_id",
        "station_code",
        "sale_id",
        "tender",
        "amount_fen",
        "currency",
        "idempotency_key",
        "created_at",
        "actor",
        "out_trade_no",
    ):
        values.pop(fixed)
    values["next_check_at"] = next_check_at
    if checked:
        values["checks"] = order_t.c.checks + 1
    result = await conn.execute(
        order_t.update()
        .where(order_t.c.order_id == before.order_id, order_t.c.version == before.version)
        .values(**values)
    )
    if result.rowcount != 1:
        raise ConcurrentUpdate(
            "the order changed meanwhile (another command on it): read it again",
            order_id=str(before.order_id),
        )
    live_delta = _live(after) - _live(before)
    paid_delta = _paid(after) - _paid(before)
    if live_delta or paid_delta:
        await conn.execute(
            sale_t.update()
            .where(sale_t.c.station_code == before.station_code, sale_t.c.sale_id == before.sale_id)
            .values(
                live_fen=sale_t.c.live_fen + live_delta,
                paid_fen=sale_t.c.paid_fen + paid_delta,
                updated_at=after.updated_at,
            )
        )


def _live(order: PaymentOrder) -> int:
    return order.amount_fen if order.state in LIVE else 0


def _paid(order: PaymentOrder) -> int:
    return order.amount_fen if order.state in PAID_STATES else 0


async def get_order(conn: AsyncConnection, order_id: UUID) -> PaymentOrder | None:
    row = (await conn.execute(order_t.select().where(order_t.c.order_id == order_id))).first()
    return order_from_row(row) if row else None


async def order_by_key(conn: AsyncConnection, station: str, key: str) -> PaymentOrder | None:
    row = (
        await conn.execute(
            order_t.select().where(
                order_t.c.station_code == station, order_t.c.idempotency_key == key
            )
        )
    ).first()
    return order_from_row(row) if row else None


async def order_by_out_trade_no(conn: AsyncConnection, out_no: str) -> PaymentOrder | None:
    row = (await conn.execute(order_t.select().where(order_t.c.out_trade_no == out_no))).first()
    return order_from_row(row) if row else None


async def orders_of_sale(conn: AsyncConnection, station: str, sale_id: UUID) -> list[PaymentOrder]:
    rows = await conn.execute(
        order_t.select()
        .where(order_t.c.station_code == station, order_t.c.sale_id == sale_id)
        .order_by(order_t.c.created_at, order_t.c.order_id)
    )
    return [order_from_row(r) for r in rows]


async def list_orders(
    conn: AsyncConnection,
    *,
    station: str | None = None,
    states: Sequence[OrderState] = (),
    limit: int = 100,
    after: UUID | None = None,
) -> list[PaymentOrder]:
    q = order_t.select().order_by(order_t.c.order_id).limit(limit)
    if station is not None:
        q = q.where(order_t.c.station_code == station)
    if states:
        q = q.where(order_t.c.state.in_([s.value for s in states]))
    if after is not None:
        q = q.where(order_t.c.order_id > after)
    return [order_from_row(r) for r in await conn.execute(q)]


async def due_orders(conn: AsyncConnection, now: datetime, limit: int = 100) -> list[PaymentOrder]:
    """Orders the recovery worker owes a look (``next_check_at`` passed), oldest first."""
    rows = await conn.execute(
        order_t.select()
        .where(order_t.c.next_check_at.is_not(None), order_t.c.next_check_at <= now)
        .order_by(order_t.c.next_check_at)
        .limit(limit)
    )
    return [order_from_row(r) for r in rows]


async def checks_of(conn: AsyncConnection, order_id: UUID) -> tuple[int, str | None]:
    row = (
        await conn.execute(
            sa.select(order_t.c.checks, order_t.c.traceparent).where(order_t.c.order_id == order_id)
        )
    ).one()
    return int(row.checks), row.traceparent


async def traceparent_of(conn: AsyncConnection, order_id: UUID) -> str | None:
    """The traceparent stored with an order (the trace it was made in), None if none."""
    return (
        await conn.execute(sa.select(order_t.c.traceparent).where(order_t.c.order_id == order_id))
    ).scalar_one_or_none()


async def counts_by_state(conn: AsyncConnection) -> dict[tuple[str, str], int]:
    rows = await conn.execute(
        sa.select(order_t.c.tender, order_t.c.state, sa.func.count()).group_by(
            order_t.c.tender, order_t.c.state
        )
    )
    return {(r[0], r[1]): int(r[2]) for r in rows}


async def overdue_count(conn: AsyncConnection, now: datetime) -> int:
    return int(
        (
            await conn.execute(
                sa.select(sa.func.count()).where(
                    order_t.c.next_check_at.is_not(None), order_t.c.next_check_at <= now
                )
            )
        ).scalar_one()
    )


# ------------------------------------------------------------------------------ refunds


def refund_from_row(row: Any) -> Refund:
    m = row._mapping
    return Refund(
        refund_id=m["refund_id"],
        order_id=m["order_id"],
        out_refund_no=m["out_refund_no"],
        amount_fen=int(m["amount_fen"]),
        state=RefundState(m["state"]),
        reason=m["reason"],
        actor=m["actor"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        provider_refund_no=m["provider_refund_no"],
        failure_code=m["failure_code"],
    )


async def insert_refund(conn: AsyncConnection, refund: Refund, refund_key: str) -> None:
    await conn.execute(
        refund_t.insert().values(
            refund_id=refund.refund_id,
            order_id=refund.order_id,
            refund_key=refund_key,
            out_refund_no=refund.out_refund_no,
            amount_fen=refund.amount_fen,
            state=refund.state.value,
            reason=refund.reason[:200],
            actor=refund.actor,
            provider_refund_no=refund.provider_refund_no,
            failure_code=refund.failure_code,
            created_at=refund.created_at,
            updated_at=refund.updated_at,
        )
    )


async def update_refund(conn: AsyncConnection, before: Refund, after: Refund) -> None:
    result = await conn.execute(
        refund_t.update()
        .where(refund_t.c.refund_id == before.refund_id, refund_t.c.state == before.state.value)
        .values(
            state=after.state.value,
            provider_refund_no=after.provider_refund_no,
            failure_code=after.failure_code,
            updated_at=after.updated_at,
        )
    )
    if result.rowcount != 1:
        raise ConcurrentUpdate("the refund changed meanwhile: read it again")


async def refund_by_key(conn: AsyncConnection, order_id: UUID, key: str) -> Refund | None:
    row = (
        await conn.execute(
            refund_t.select().where(refund_t.c.order_id == order_id, refund_t.c.refund_key == key)
        )
    ).first()
    return refund_from_row(row) if row else None


async def refund_by_key_id(conn: AsyncConnection, refund_id: UUID) -> Refund | None:
    row = (await conn.execute(refund_t.select().where(refund_t.c.refund_id == refund_id))).first()
    return refund_from_row(row) if row else None


async def refund_by_out_no(conn: AsyncConnection, out_refund_no: str) -> Refund | None:
    row = (
        await conn.execute(refund_t.select().where(refund_t.c.out_refund_no == out_refund_no))
    ).first()
    return refund_from_row(row) if row else None


async def refund_in_flight(conn: AsyncConnection, order_id: UUID) -> Refund | None:
    row = (
        await conn.execute(
            refund_t.select().where(
                refund_t.c.order_id == order_id,
                refund_t.c.state.in_(
                    [RefundState.REQUESTED, RefundState.PROCESSING, RefundState.UNKNOWN]
                ),
            )
        )
    ).first()
    return refund_from_row(row) if row else None


async def refunds_of(conn: AsyncConnection, order_id: UUID) -> list[Refund]:
    rows = await conn.execute(
        refund_t.select().where(refund_t.c.order_id == order_id).order_by(refund_t.c.created_at)
    )
    return [refund_from_row(r) for r in rows]


async def seen_notification(
    conn: AsyncConnection, provider: str, notification_id: str, out_trade_no: str, at: datetime
) -> bool:
    """Record a notification; False when it was seen before (a replay or a re-send)."""
    result = await conn.execute(
        _insert(conn)(notification_t)
        .values(
            provider=provider,
            notification_id=notification_id[:128],
            out_trade_no=out_trade_no[:32],
            received_at=at,
        )
        .on_conflict_do_nothing()
    )
    return result.rowcount == 1


async def sale_totals(conn: AsyncConnection, station: str | None = None) -> list[dict[str, Any]]:
    """Per station: the sales with a payment, what they are due and what is paid on them."""
    q = sa.select(
        sale_t.c.station_code,
        sa.func.count().label("sales"),
        sa.func.sum(sale_t.c.due_fen).label("due_fen"),
        sa.func.sum(sale_t.c.paid_fen).label("paid_fen"),
    ).group_by(sale_t.c.station_code)
    if station is not None:
        q = q.where(sale_t.c.station_code == station)
    return [dict(r._mapping) for r in await conn.execute(q)]
