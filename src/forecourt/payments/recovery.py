"""The recovery worker: drives every order an outside call is or may be owed on (pending,
unknown, reversing, refunding) to a settled state, by asking the provider.

- pending / unknown: query. Paid -> paid; refused or closed -> failed; the payer still
  confirming -> looked at again until ``pending_deadline_s`` after the order was made, then
  reversed; no trustworthy answer, no such trade, or a trade not paid -> looked at again with
  backoff, and reversed after ``unknown_deadline_s``. Never charged again.
- reversing: the reverse is sent again (both providers take it more than once) until the
  trade is closed.
- refunding: the refund in flight is queried; a refund the provider never received is sent
  again under its own ``out_refund_no`` (the same refund at the provider).

An order two workers look at once is moved by one of them (the version compare); the other
skips it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from datetime import datetime, timedelta

from forecourt.infra.crash import crash_point
from forecourt.infra.db import Database
from forecourt.infra.logging import get_logger
from forecourt.kernel.errors import ForecourtError
from forecourt.payments import store
from forecourt.payments.domain import Event, OrderState, PaymentOrder, RefundState
from forecourt.payments.handlers import SYSTEM_ACTOR, PaymentsConfig, PaymentsService
from forecourt.payments.providers.base import (
    ChargeStatus,
    PaymentProvider,
    RefundResult,
    RefundStatus,
)

log = get_logger("forecourt.payments.recovery")


async def recover_once(
    db: Database,
    providers: Mapping[str, PaymentProvider],
    now: datetime | None = None,
    *,
    config: PaymentsConfig | None = None,
    limit: int = 100,
) -> int:
    """Look at every order due a look at ``now`` (default: the database's clock); how many
    were looked at."""
    service = PaymentsService(db, providers, config)
    at = now or db.clock.now()
    async with db.connection() as conn:
        due = await store.due_orders(conn, at, limit)
    looked = 0
    for order in due:
        try:
            async with service.traced(order):  # the provider calls join the order's trace
                await drive(service, order, at)
        except ForecourtError as exc:  # a concurrent move, a provider not configured
            log.info("payments.recovery_skipped", order_id=str(order.order_id), code=exc.code)
        except Exception:  # noqa: BLE001 - one order's trouble never stops the others
            log.exception("payments.recovery_failed", order_id=str(order.order_id))
        looked += 1
    return looked


async def drive(service: PaymentsService, order: PaymentOrder, now: datetime) -> PaymentOrder:
    """One look at one order."""
    provider = service.provider(order.tender)
    config = service.config
    if order.state is OrderState.CREATED:
        # Never sent (a charge commits its submit before any call): nothing was charged.
        async with service.db.begin() as uow:
            return await service.move(
                uow,
                order,
                Event.REFUSED,
                actor=SYSTEM_ACTOR,
                details={"reason": "never sent"},
            )
    if order.state in (OrderState.PENDING, OrderState.UNKNOWN):
        result = await service.query(provider, order.out_trade_no)
        crash_point("payments.recovery.after_query")
        age = now - order.created_at
        if result.status in (ChargeStatus.PAID, ChargeStatus.REFUSED, ChargeStatus.CLOSED):
            async with service.db.begin() as uow:
                return await service.apply_charge(uow, order.order_id, result, actor=SYSTEM_ACTOR)
        confirming = result.status is ChargeStatus.USER_PAYING
        deadline = timedelta(
            seconds=config.pending_deadline_s if confirming else config.unknown_deadline_s
        )
        async with service.db.begin() as uow:
            current = await store.get_order(uow.conn, order.order_id)
            if current is None or current.version != order.version:
                return current or order  # moved meanwhile: looked at next time
            checks, _ = await store.checks_of(uow.conn, order.order_id)
            if age >= deadline:
                log.warning(
                    "payments.reversing",
                    order_id=str(order.order_id),
                    status=result.status.value,
                    age_s=age.total_seconds(),
                )
                current = await service.move(
                    uow,
                    current,
                    Event.REVERSE,
                    actor=SYSTEM_ACTOR,
                    next_check_at=service.recheck_at(now),
                    details={"reason": f"{result.status.value} past its deadline"},
                )
            else:
                event = (
                    Event.AWAITING_PAYER
                    if confirming
                    else (Event.NO_ANSWER if current.state is OrderState.UNKNOWN else None)
                )
                next_at = (
                    now + timedelta(seconds=config.poll_interval_s)
                    if confirming
                    else service.recheck_at(now, checks)
                )
                if event is None:
                    # Pending, and the provider has no (final) word yet: look again later.
                    await store.save_transition(
                        uow.conn, current, current, next_check_at=next_at, checked=True
                    )
                    return current
                return await service.move(
                    uow,
                    current,
                    event,
                    actor=SYSTEM_ACTOR,
                    next_check_at=next_at,
                    checked=True,
                    details={"provider_status": result.status.value, "provider_code": result.code},
                )
        return await service.reverse(current, actor=SYSTEM_ACTOR, now=now)
    if order.state is OrderState.REVERSING:
        return await service.reverse(order, actor=SYSTEM_ACTOR, now=now)
    if order.state is OrderState.REFUNDING:
        return await _drive_refund(service, provider, order, now)
    # Settled meanwhile: nothing owed.
    async with service.db.begin() as uow:
        await store.save_transition(uow.conn, order, order, next_check_at=None)
    return order


async def _drive_refund(
    service: PaymentsService, provider: PaymentProvider, order: PaymentOrder, now: datetime
) -> PaymentOrder:
    async with service.db.connection() as conn:
        refund = await store.refund_in_flight(conn, order.order_id)
        # Read after the refund: a refund settles in the same transaction as its order's
        # move, so an order still at the version looked at here has its refund in flight.
        latest = await store.get_order(conn, order.order_id) if refund is None else order
    if latest is None or latest.version != order.version:
        # Its refund settled after the due orders were read (by the request that sent it,
        # or another worker): nothing owed.
        return latest or order
    if refund is None:
        log.error("payments.refunding_without_refund", order_id=str(order.order_id))
        async with service.db.begin() as uow:
            await store.save_transition(uow.conn, order, order, next_check_at=None)
        return order
    result: RefundResult = await provider.query_refund(
        out_trade_no=order.out_trade_no, out_refund_no=refund.out_refund_no
    )
    if result.status is RefundStatus.NOT_FOUND:
        # Never received: sent again under its own number (the same refund at the provider).
        result = await service.send_refund(provider, order, refund, refund.reason or None)
    async with service.db.begin() as uow:
        refund, current = await service.settle_refund(uow, refund, result, actor=SYSTEM_ACTOR)
        if current.state is OrderState.REFUNDING and refund.state not in (
            RefundState.SUCCEEDED,
            RefundState.REFUSED,
        ):
            checks, _ = await store.checks_of(uow.conn, current.order_id)
            await store.save_transition(
                uow.conn,
                current,
                current,
                next_check_at=service.recheck_at(now, checks),
                checked=True,
            )
        return current


async def run_recovery(
    db: Database,
    providers: Mapping[str, PaymentProvider],
    interval: float,
    stop_event: asyncio.Event,
    *,
    config: PaymentsConfig | None = None,
) -> None:
    """Look for due orders every ``interval`` seconds until ``stop_event`` is set."""
    while not stop_event.is_set():
        try:
            await recover_once(db, providers, config=config)
        except Exception:  # noqa: BLE001 - the loop outlives a database hiccup
            log.exception("payments.recovery_round_failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop_event.wait(), interval)
