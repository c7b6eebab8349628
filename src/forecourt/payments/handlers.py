"""Use cases of ``payments``: take a payment at the counter, refund it, void it, believe a
provider's notification, apply the cash an edge took while HQ was away.

Every state move goes through :func:`~forecourt.payments.domain.transition` and
:func:`~forecourt.payments.store.save_transition` with an audit record, in one transaction.
A provider is called only after the order (or refund) it concerns is committed and the
request's idempotency record is marked started: whatever dies where, the order says what may
have happened and the recovery worker (``payments.recovery``) finishes it by querying the
provider, never by charging again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

from fastapi import Response
from opentelemetry.trace import Span, SpanKind
from sqlalchemy.exc import IntegrityError

from forecourt.infra.crash import crash_point
from forecourt.infra.db import Database, UnitOfWork
from forecourt.infra.http import error_envelope
from forecourt.infra.idempotency import IdempotencyKey, IdempotencyRecord, StoredResponse
from forecourt.infra.logging import get_logger
from forecourt.kernel.errors import Conflict, ForecourtError, InvalidValue, NotFound
from forecourt.kernel.ids import new_id
from forecourt.payments import metrics, store
from forecourt.payments.domain import (
    Change,
    Event,
    OrderState,
    PaymentCodeInvalid,
    PaymentOrder,
    Refund,
    RefundState,
    Tender,
    check_money,
    out_refund_no,
    out_trade_no,
    tender_of_code,
    transition,
)
from forecourt.payments.providers.base import (
    ChargeResult,
    ChargeStatus,
    Notification,
    NotificationKind,
    NotificationRejected,
    PaymentProvider,
    RefundResult,
    RefundStatus,
    ReverseStatus,
)
from forecourt.payments.tracing import (
    TRACER_NAME,
    annotate,
    current_traceparent,
    span_from_traceparent,
)
from forecourt.sales.contracts import SaleDue, sale_due

log = get_logger("forecourt.payments")

#: Where a business day is counted (a void of a paid order: the same day only).
BUSINESS_TZ = ZoneInfo("Asia/Shanghai")
SYSTEM_ACTOR = "service:payments"


# --- errors -----------------------------------------------------------------------------------


class SaleUnknown(NotFound):
    code = "payments.sale_unknown"


class SaleNotPayable(Conflict):
    code = "payments.sale_not_payable"


class OrderUnknown(NotFound):
    code = "payments.order_unknown"


class ProviderUnavailable(ForecourtError):
    code = "payments.provider_unavailable"
    http_status = 503


class VoidRefused(Conflict):
    code = "payments.void_refused"


class KeyConflict(Conflict):
    code = "payments.key_conflict"


# --- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PaymentsConfig:
    """How long the counter waits for a payer, how the recovery worker paces itself."""

    confirm_wait_s: float = 5.0  # polling a confirming payer before answering 202
    poll_interval_s: float = 1.0
    pending_deadline_s: float = 120.0  # a payer still confirming after this: reversed
    unknown_deadline_s: float = 300.0  # no trustworthy answer after this: reversed
    recheck_s: float = 2.0  # the recovery worker's first look, doubled each time
    recheck_max_s: float = 60.0
    operator_after_checks: int = 50  # a reverse refused this often: left to an operator
    not_found_grace_s: float = 60.0  # "no such trade" is believed only this long after

    @classmethod
    def from_settings(cls, settings: Any) -> PaymentsConfig:
        return cls(
            confirm_wait_s=settings.payments_confirm_wait_s,
            poll_interval_s=settings.payments_poll_interval_s,
            pending_deadline_s=settings.payments_pending_deadline_s,
            unknown_deadline_s=settings.payments_unknown_deadline_s,
            recheck_s=settings.payments_recheck_s,
            recheck_max_s=settings.payments_recheck_max_s,
            not_found_grace_s=settings.payments_not_found_grace_s,
        )


# --- requests and answers ---------------------------------------------------------------------


@dataclass(frozen=True)
class ChargeRequest:
    station: str
    sale_id: UUID
    amount_fen: int
    currency: str
    method: str  # "code" | "cash"
    auth_code: str | None
    actor: str


@dataclass(frozen=True)
class CashItem:
    """One cash payment an edge recorded while HQ was away."""

    idempotency_key: str
    sale_id: UUID
    amount_fen: int
    currency: str
    recorded_at: datetime
    cashier: str


@dataclass(frozen=True)
class CashVerdict:
    index: int
    idempotency_key: str
    status: str  # "created" | "duplicate" | "refused"
    order_id: UUID | None = None
    error: dict[str, Any] | None = None


def order_json(order: PaymentOrder) -> dict[str, Any]:
    """An order as the API answers it."""
    return {
        "order_id": str(order.order_id),
        "station": order.station_code,
        "sale_id": str(order.sale_id),
        "tender": order.tender.value,
        "method": "code" if order.tender.provider else "cash",
        "amount_fen": order.amount_fen,
        "currency": order.currency,
        "state": order.state.value,
        "awaiting_payer": order.awaiting_payer,
        "out_trade_no": order.out_trade_no or None,
        "provider_trade_no": order.provider_trade_no,
        "paid_at": _iso(order.paid_at) if order.paid_at else None,
        "refunded_fen": order.refunded_fen,
        "refund_pending_fen": order.refund_pending_fen,
        "refundable_fen": order.refundable_fen if order.state in _REFUNDABLE else 0,
        "failure_code": order.failure_code,
        "failure_message": order.failure_message,
        "actor": order.actor,
        "created_at": _iso(order.created_at),
        "updated_at": _iso(order.updated_at),
    }


def refund_json(refund: Refund, order: PaymentOrder) -> dict[str, Any]:
    return {
        "refund_id": str(refund.refund_id),
        "order_id": str(refund.order_id),
        "out_refund_no": refund.out_refund_no,
        "amount_fen": refund.amount_fen,
        "state": refund.state.value,
        "reason": refund.reason,
        "actor": refund.actor,
        "provider_refund_no": refund.provider_refund_no,
        "failure_code": refund.failure_code,
        "created_at": _iso(refund.created_at),
        "updated_at": _iso(refund.updated_at),
        "order": order_json(order),
    }


_REFUNDABLE = frozenset({OrderState.PAID, OrderState.PARTIALLY_REFUNDED})


def _iso(moment: datetime) -> str:
    """A time in UTC as the API answers every time (``...Z``)."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def charge_outcome(order: PaymentOrder) -> StoredResponse:
    """What a charge request is answered for ``order`` in its current state: 201 paid,
    402 refused by the provider, 409 reversed, 202 still open (the worker finishes it)."""
    body = order_json(order)
    location = {"Location": f"/v1/stations/{order.station_code}/payments/{order.order_id}"}
    if order.state is OrderState.FAILED:
        return StoredResponse(
            402,
            error_envelope(
                {
                    "code": "payments.declined",
                    "message": "the provider refused the payment: "
                    f"{order.failure_message or order.failure_code or 'declined'}",
                    "details": {"provider_code": order.failure_code, "order": body},
                }
            ),
            location,
        )
    if order.state is OrderState.CANCELLED:
        return StoredResponse(
            409,
            error_envelope(
                {
                    "code": "payments.reversed",
                    "message": "the payment was reversed: nothing was kept from the payer",
                    "details": {"order": body},
                }
            ),
            location,
        )
    if order.state in (OrderState.CREATED, OrderState.PENDING, OrderState.UNKNOWN):
        return StoredResponse(202, body, location)
    if order.state is OrderState.REVERSING:
        return StoredResponse(202, body, location)
    return StoredResponse(201, body, location)


def refund_outcome(refund: Refund, order: PaymentOrder) -> StoredResponse:
    body = refund_json(refund, order)
    if refund.state is RefundState.SUCCEEDED:
        return StoredResponse(201, body)
    if refund.state is RefundState.REFUSED:
        return StoredResponse(
            422,
            error_envelope(
                {
                    "code": "payments.refund_refused",
                    "message": f"the provider refused the refund ({refund.failure_code})",
                    "details": {"provider_code": refund.failure_code, "refund": body},
                }
            ),
        )
    return StoredResponse(202, body)


def _response(stored: StoredResponse) -> Response:
    import json

    from fastapi.encoders import jsonable_encoder

    return Response(
        json.dumps(jsonable_encoder(stored.body), ensure_ascii=False),
        status_code=stored.status_code,
        headers=dict(stored.headers),
        media_type="application/json",
    )


# --- the service ------------------------------------------------------------------------------


class PaymentsService:
    """The payments context over one database and the providers configured (by tender)."""

    def __init__(
        self,
        db: Database,
        providers: Mapping[str, PaymentProvider],
        config: PaymentsConfig | None = None,
    ) -> None:
        self.db = db
        self.providers = dict(providers)
        self.config = config or PaymentsConfig()

    def now(self) -> datetime:
        return self.db.clock.now()

    def provider(self, tender: Tender) -> PaymentProvider:
        found = self.providers.get(tender.value)
        if found is None:
            raise ProviderUnavailable(
                f"{tender.value} payments are not configured at HQ: take another tender",
                tender=tender.value,
            )
        return found

    async def query(self, provider: PaymentProvider, out_no: str) -> ChargeResult:
        """The provider's word on a trade (timed and counted)."""
        with metrics.timed(provider.name, "query"):
            result = await provider.query(out_no)
        _observe(
            provider.name,
            "query",
            "unknown" if result.status is ChargeStatus.UNKNOWN else "success",
        )
        return result

    async def send_refund(
        self, provider: PaymentProvider, order: PaymentOrder, refund: Refund, reason: str | None
    ) -> RefundResult:
        """Send (or send again: the same ``out_refund_no`` is the same refund) a refund."""
        with metrics.timed(provider.name, "refund"):
            result = await provider.refund(
                out_trade_no=order.out_trade_no,
                out_refund_no=refund.out_refund_no,
                refund_fen=refund.amount_fen,
                total_fen=order.amount_fen,
                reason=reason,
            )
        _observe(provider.name, "refund", _REFUND_OUTCOMES.get(result.status, "unknown"))
        return result

    def recheck_at(self, now: datetime, checks: int = 0) -> datetime:
        delay = min(self.config.recheck_s * (2 ** min(checks, 16)), self.config.recheck_max_s)
        return now + timedelta(seconds=delay)

    # -- moves --

    async def move(
        self,
        uow: UnitOfWork,
        before: PaymentOrder,
        event: Event,
        *,
        actor: str,
        change: Change | None = None,
        next_check_at: datetime | None = None,
        checked: bool = False,
        details: Mapping[str, Any] | None = None,
    ) -> PaymentOrder:
        """One state move, written over ``before`` (by version) with its audit record."""
        after = transition(before, event, self.now(), change)
        await store.save_transition(
            uow.conn, before, after, next_check_at=next_check_at, checked=checked
        )
        await uow.record_audit(
            actor=actor,
            action=f"payments.order.{event.value}",
            target=f"payment_order:{after.order_id}",
            details={
                "station": after.station_code,
                "sale_id": str(after.sale_id),
                "tender": after.tender.value,
                "amount_fen": after.amount_fen,
                "from": before.state.value,
                "to": after.state.value,
                **(details or {}),
            },
        )
        return after

    async def apply_charge(
        self, uow: UnitOfWork, order_id: UUID, result: ChargeResult, *, actor: str
    ) -> PaymentOrder:
        """Apply what the provider says of a charge to the order as it is now (read again:
        a notification or the worker may have moved it meanwhile). Unknown and unconfirmed
        outcomes leave it for the recovery worker.

        An order moved by another process between that read and the write (the version
        compare) is read and applied once more in the same transaction (the failed write
        changed nothing): a charge answer is never lost to a race, nor answered 409."""
        try:
            return await self._apply_charge_once(uow, order_id, result, actor=actor)
        except store.ConcurrentUpdate:
            log.info("payments.charge_reapplied", order_id=str(order_id))
            return await self._apply_charge_once(uow, order_id, result, actor=actor)

    async def _apply_charge_once(
        self, uow: UnitOfWork, order_id: UUID, result: ChargeResult, *, actor: str
    ) -> PaymentOrder:
        order = await self._get(uow, order_id)
        now = self.now()
        open_states = (OrderState.PENDING, OrderState.UNKNOWN)
        if order.state not in open_states:
            return order
        provider = {"provider_code": result.code}
        if result.status is ChargeStatus.PAID:
            if result.amount_fen is not None and result.amount_fen != order.amount_fen:
                log.error(
                    "payments.amount_differs",
                    order_id=str(order.order_id),
                    ours=order.amount_fen,
                    provider=result.amount_fen,
                )
            return await self.move(
                uow,
                order,
                Event.PAID,
                actor=actor,
                change=Change(provider_trade_no=result.provider_trade_no, paid_at=result.paid_at),
                details=provider,
            )
        if result.status in (ChargeStatus.REFUSED, ChargeStatus.CLOSED):
            return await self.move(
                uow,
                order,
                Event.REFUSED,
                actor=actor,
                change=Change(
                    failure_code=result.code or result.status.value,
                    failure_message=result.message,
                ),
                details=provider,
            )
        if result.status is ChargeStatus.USER_PAYING:
            return await self.move(
                uow,
                order,
                Event.AWAITING_PAYER,
                actor=actor,
                next_check_at=now + timedelta(seconds=self.config.poll_interval_s),
                details=provider,
            )
        # No trustworthy answer (or one a charge never gives): unknown, queried later.
        return await self.move(
            uow,
            order,
            Event.NO_ANSWER,
            actor=actor,
            change=Change(
                failure_code=result.code or result.status.value, failure_message=result.message
            ),
            next_check_at=self.recheck_at(now),
            details=provider,
        )

    async def _get(self, uow: UnitOfWork, order_id: UUID) -> PaymentOrder:
        order = await store.get_order(uow.conn, order_id)
        if order is None:
            raise OrderUnknown(f"no payment order {order_id}", order_id=str(order_id))
        return order

    # -- charge --

    async def charge(self, request: ChargeRequest, key: IdempotencyKey) -> Response:
        """Take a payment of one sale at the counter (see the API's description)."""
        check_money(request.amount_fen, request.currency)
        provider: PaymentProvider | None = None
        if request.method == "code":
            if not request.auth_code:
                raise PaymentCodeInvalid("a code payment needs the scanned auth_code")
            tender = tender_of_code(request.auth_code)
            provider = self.provider(tender)
        else:
            if request.auth_code:
                raise InvalidValue("a cash payment has no auth_code", code="payments.cash_code")
            tender = Tender.CASH
        station = request.station
        now = self.now()
        out_no = out_trade_no(key.key, station) if tender.provider else ""
        async with self.db.begin() as uow:
            order = await store.order_by_key(uow.conn, station, key.key)
            if order is not None:
                # A reservation whose owner died before any outside call: go on with it.
                if not (key.taken_over and order.state is OrderState.PENDING and provider):
                    raise KeyConflict(
                        "an order already exists under this Idempotency-Key",
                        order_id=str(order.order_id),
                        state=order.state.value,
                    )
            else:
                sale = await sale_due(uow.conn, station, request.sale_id)
                _check_sale(sale, request)
                assert sale is not None
                order = PaymentOrder(
                    order_id=new_id(),
                    station_code=station,
                    sale_id=request.sale_id,
                    tender=tender,
                    amount_fen=request.amount_fen,
                    currency=request.currency,
                    state=OrderState.CREATED,
                    version=1,
                    created_at=now,
                    updated_at=now,
                    out_trade_no=out_no,
                    idempotency_key=key.key,
                    actor=request.actor,
                )
                # The order keeps the trace of the command that made it: whoever drives
                # it later (the recovery worker) joins that trace.
                await store.insert_order(
                    uow.conn, order, due_fen=sale.amount_minor, traceparent=current_traceparent()
                )
                await uow.record_audit(
                    actor=request.actor,
                    action="payments.order.created",
                    target=f"payment_order:{order.order_id}",
                    details={
                        "station": station,
                        "sale_id": str(request.sale_id),
                        "tender": tender.value,
                        "amount_fen": request.amount_fen,
                        "quarantined_sale": sale.quarantined,
                    },
                )
                if provider is None:
                    order = await self.move(uow, order, Event.CASH_TAKEN, actor=request.actor)
                    _annotate_order(order)
                    _observe("cash", "cash", "success")
                    outcome = charge_outcome(order)
                    return await key.complete(
                        outcome.status_code, outcome.body, outcome.headers, uow=uow
                    )
                # Committed before the provider is called; the worker looks if nobody does.
                order = await self.move(
                    uow,
                    order,
                    Event.SUBMIT,
                    actor=request.actor,
                    next_check_at=self.recheck_at(now),
                )
        _annotate_order(order)
        assert provider is not None
        assert request.auth_code is not None
        crash_point("payments.after_order_insert")
        await key.mark_started(recovery_point=order.out_trade_no)
        with metrics.timed(provider.name, "charge"):
            result = await provider.charge_by_code(
                out_trade_no=order.out_trade_no,
                amount_fen=order.amount_fen,
                auth_code=request.auth_code,
                description=f"Forecourt {station} fuel",
                store_id=station,
            )
        crash_point("payments.after_provider_charge")
        _observe(provider.name, "code", _CHARGE_OUTCOMES.get(result.status, "unknown"))
        log.info(
            "payments.charge_answered",
            order_id=str(order.order_id),
            provider=provider.name,
            status=result.status.value,
            code=result.code,
        )
        answer: Response | None = None
        async with self.db.begin() as uow:
            order = await self.apply_charge(uow, order.order_id, result, actor=request.actor)
            _annotate_order(order)
            if order.state is not OrderState.PENDING:
                outcome = charge_outcome(order)
                answer = await key.complete(
                    outcome.status_code, outcome.body, outcome.headers, uow=uow
                )
        if answer is not None:
            crash_point("payments.after_paid_commit")
            return answer
        order = await self._await_payer(order, provider, request.actor)
        async with self.db.begin() as uow:
            order = await self._get(uow, order.order_id)
            _annotate_order(order)
            outcome = charge_outcome(order)
            return await key.complete(outcome.status_code, outcome.body, outcome.headers, uow=uow)

    async def _await_payer(
        self, order: PaymentOrder, provider: PaymentProvider, actor: str
    ) -> PaymentOrder:
        """Poll a payer who must still confirm, for ``confirm_wait_s`` at most."""
        deadline = time.monotonic() + self.config.confirm_wait_s
        while time.monotonic() < deadline:
            await asyncio.sleep(
                min(self.config.poll_interval_s, max(0.0, deadline - time.monotonic()))
            )
            result = await self.query(provider, order.out_trade_no)
            if result.status in (ChargeStatus.PAID, ChargeStatus.REFUSED, ChargeStatus.CLOSED):
                async with self.db.begin() as uow:
                    return await self.apply_charge(uow, order.order_id, result, actor=actor)
            async with self.db.connection() as conn:
                current = await store.get_order(conn, order.order_id)
            if current is not None and current.state is not OrderState.PENDING:
                return current  # a notification settled it meanwhile
        return order

    async def recover_charge(self, record: IdempotencyRecord) -> StoredResponse | None:
        """The idempotency recovery hook of the charge route: a charge started by a process
        that died. Query the provider, settle the order, answer what it now is."""
        station = record.scope.partition("/")[2]
        async with self.db.connection() as conn:
            order = await store.order_by_key(conn, station, record.key)
        if order is None:
            return None
        async with self.traced(order, "payments.charge.recover"):
            return await self._recover_charge(order)

    async def _recover_charge(self, order: PaymentOrder) -> StoredResponse:
        if order.state in (OrderState.PENDING, OrderState.UNKNOWN) and order.tender.provider:
            provider = self.providers.get(order.tender.value)
            if provider is not None:
                result = await self.query(provider, order.out_trade_no)
                if result.status in (
                    ChargeStatus.PAID,
                    ChargeStatus.REFUSED,
                    ChargeStatus.USER_PAYING,
                ):
                    async with self.db.begin() as uow:
                        order = await self.apply_charge(
                            uow, order.order_id, result, actor=SYSTEM_ACTOR
                        )
        return charge_outcome(order)

    async def recover_refund(self, record: IdempotencyRecord) -> StoredResponse | None:
        """The idempotency recovery hook of the refund route: a refund started by a process
        that died. Ask the provider, settle the refund, answer what it now is."""
        _, station, order_text = record.scope.split("/", 2)
        try:
            order_id = UUID(order_text)
        except ValueError:
            return None
        async with self.db.connection() as conn:
            refund = await store.refund_by_key(conn, order_id, record.key)
            order = await store.get_order(conn, order_id)
        if refund is None or order is None or order.station_code != station:
            return None
        async with self.traced(order, "payments.refund.recover"):
            return await self._recover_refund(refund, order)

    async def _recover_refund(self, refund: Refund, order: PaymentOrder) -> StoredResponse:
        if refund.state not in (RefundState.SUCCEEDED, RefundState.REFUSED):
            provider = self.providers.get(order.tender.value)
            if provider is not None:
                result = await provider.query_refund(
                    out_trade_no=order.out_trade_no, out_refund_no=refund.out_refund_no
                )
                if result.status is RefundStatus.NOT_FOUND:
                    result = await self.send_refund(provider, order, refund, refund.reason or None)
                async with self.db.begin() as uow:
                    refund, order = await self.settle_refund(
                        uow, refund, result, actor=SYSTEM_ACTOR
                    )
        return refund_outcome(refund, order)

    @contextlib.asynccontextmanager
    async def traced(
        self, order: PaymentOrder, name: str = "payments.recovery"
    ) -> AsyncIterator[Span]:
        """A span of work on ``order`` outside a request (the recovery worker's look at it),
        in the trace the order was made in (the traceparent stored with it; a new trace for
        an order that has none). Its provider calls are children of this span."""
        async with self.db.connection() as conn:
            traceparent = await store.traceparent_of(conn, order.order_id)
        with span_from_traceparent(
            name,
            traceparent,
            kind=SpanKind.INTERNAL,
            attributes={
                "payment.order_id": str(order.order_id),
                "payment.station": order.station_code,
                "payment.tender": order.tender.value,
                "payment.state": order.state.value,
            },
            tracer_name=TRACER_NAME,
        ) as span:
            yield span

    # -- reads --

    async def get(self, station: str, order_id: UUID) -> PaymentOrder:
        async with self.db.connection() as conn:
            order = await store.get_order(conn, order_id)
        if order is None or order.station_code != station:
            raise OrderUnknown(f"no payment order {order_id} at {station}", order_id=str(order_id))
        return order

    async def orders(
        self,
        station: str,
        *,
        sale_id: UUID | None = None,
        states: Sequence[OrderState] = (),
        limit: int = 100,
        after: UUID | None = None,
    ) -> list[PaymentOrder]:
        async with self.db.connection() as conn:
            if sale_id is not None:
                orders = await store.orders_of_sale(conn, station, sale_id)
                return [o for o in orders if not states or o.state in states][:limit]
            return await store.list_orders(
                conn, station=station, states=states, limit=limit, after=after
            )

    async def refunds(self, station: str, order_id: UUID) -> list[Refund]:
        await self.get(station, order_id)
        async with self.db.connection() as conn:
            return await store.refunds_of(conn, order_id)

    # -- refunds --

    async def refund(
        self,
        station: str,
        order_id: UUID,
        *,
        amount_fen: int | None,
        reason: str,
        actor: str,
        key: IdempotencyKey,
    ) -> Response:
        """Refund all (``amount_fen`` None) or part of a paid order."""
        now = self.now()
        async with self.db.begin() as uow:
            order = await store.get_order(uow.conn, order_id)
            if order is None or order.station_code != station:
                raise OrderUnknown(f"no payment order {order_id} at {station}")
            existing = await store.refund_by_key(uow.conn, order_id, key.key)
            if existing is not None:
                if not (key.taken_over and existing.state is RefundState.REQUESTED):
                    raise KeyConflict(
                        "a refund already exists under this Idempotency-Key",
                        refund_id=str(existing.refund_id),
                    )
                refund = existing
            else:
                if order.state not in _REFUNDABLE and order.state is not OrderState.REFUNDING:
                    raise RefundNotAllowed(
                        f"a {order.state.value} order cannot be refunded",
                        state=order.state.value,
                    )
                amount = order.refundable_fen if amount_fen is None else amount_fen
                refund = Refund(
                    refund_id=new_id(),
                    order_id=order_id,
                    out_refund_no=out_refund_no(order_id, key.key),
                    amount_fen=amount,
                    state=RefundState.REQUESTED,
                    reason=reason,
                    actor=actor,
                    created_at=now,
                    updated_at=now,
                )
                order = await self.move(
                    uow,
                    order,
                    Event.REFUND,
                    actor=actor,
                    change=Change(refund_fen=amount),
                    next_check_at=None if order.tender is Tender.CASH else self.recheck_at(now),
                    details={"refund_fen": amount, "reason": reason},
                )
                await store.insert_refund(uow.conn, refund, key.key)
                if order.tender is Tender.CASH:
                    # The cash is handed back at the counter: done at once.
                    refund, order = await self.settle_refund(
                        uow, refund, RefundResult(status=RefundStatus.SUCCEEDED), actor=actor
                    )
                    outcome = refund_outcome(refund, order)
                    return await key.complete(outcome.status_code, outcome.body, uow=uow)
        annotate({"payment.refund_id": str(refund.refund_id), "payment.tender": order.tender.value})
        provider = self.provider(order.tender)
        await key.mark_started(recovery_point=refund.out_refund_no)
        result = await self.send_refund(provider, order, refund, reason or None)
        crash_point("payments.refund.after_provider")
        async with self.db.begin() as uow:
            refund, order = await self.settle_refund(uow, refund, result, actor=actor)
            outcome = refund_outcome(refund, order)
            return await key.complete(outcome.status_code, outcome.body, uow=uow)

    async def settle_refund(
        self, uow: UnitOfWork, refund: Refund, result: RefundResult, *, actor: str
    ) -> tuple[Refund, PaymentOrder]:
        """Apply the provider's word on a refund to it and its order (both read again)."""
        current = await store.refund_by_key_id(uow.conn, refund.refund_id)
        order = await self._get(uow, refund.order_id)
        if current is None:
            return refund, order
        now = self.now()
        if current.state in (RefundState.SUCCEEDED, RefundState.REFUSED):
            return current, order
        final = _FINAL_REFUNDS.get(result.status)
        if final is not None:
            state, event = final
            succeeded = state is RefundState.SUCCEEDED
            # A success keeps the provider's refund number, a refusal its code.
            after = replace(
                current,
                state=state,
                provider_refund_no=(result.provider_refund_no or current.provider_refund_no)
                if succeeded
                else current.provider_refund_no,
                failure_code=current.failure_code if succeeded else result.code,
                updated_at=now,
            )
            await store.update_refund(uow.conn, current, after)
            if order.state is OrderState.REFUNDING:
                order = await self.move(
                    uow,
                    order,
                    event,
                    actor=actor,
                    change=Change(refund_fen=current.amount_fen),
                    details={"refund_id": str(current.refund_id), "provider_code": result.code},
                )
            return after, order
        state = (
            RefundState.PROCESSING
            if result.status is RefundStatus.PROCESSING
            else RefundState.UNKNOWN
        )
        if state is not current.state or result.provider_refund_no:
            after = replace(
                current,
                state=state,
                provider_refund_no=result.provider_refund_no or current.provider_refund_no,
                failure_code=result.code if state is RefundState.UNKNOWN else None,
                updated_at=now,
            )
            await store.update_refund(uow.conn, current, after)
            current = after
        return current, order

    # -- void --

    async def void(self, station: str, order_id: UUID, *, actor: str, reason: str) -> Response:
        """Void an order: reverse one not yet settled (pending, unknown), hand back the cash
        of a cash order, or refund in full a code payment paid the same business day."""
        async with self.db.begin() as uow:
            order = await store.get_order(uow.conn, order_id)
            if order is None or order.station_code != station:
                raise OrderUnknown(f"no payment order {order_id} at {station}")
            if order.state in (OrderState.CANCELLED, OrderState.REVERSING):
                return _response(StoredResponse(200, order_json(order)))
            if order.state is OrderState.PAID:
                _check_same_day(order, self.now())
                if order.tender is Tender.CASH:
                    order = await self.move(
                        uow, order, Event.VOID, actor=actor, details={"reason": reason}
                    )
                    return _response(StoredResponse(200, order_json(order)))
            elif order.state not in (OrderState.PENDING, OrderState.UNKNOWN):
                raise VoidRefused(
                    f"a {order.state.value} order cannot be voided (refund it instead)",
                    state=order.state.value,
                )
            else:
                order = await self.move(
                    uow,
                    order,
                    Event.REVERSE,
                    actor=actor,
                    next_check_at=self.recheck_at(self.now()),
                    details={"reason": reason},
                )
        if order.state is OrderState.PAID:
            # Both providers reverse only unsettled trades; a paid one is refunded in full.
            return await self._void_by_refund(order, actor=actor, reason=reason)
        order = await self.reverse(order, actor=actor)
        return _response(
            StoredResponse(200 if order.state is OrderState.CANCELLED else 202, order_json(order))
        )

    async def _void_by_refund(self, order: PaymentOrder, *, actor: str, reason: str) -> Response:
        now = self.now()
        refund_key = f"void:{new_id()}"
        refund = Refund(
            refund_id=new_id(),
            order_id=order.order_id,
            out_refund_no=out_refund_no(order.order_id, refund_key),
            amount_fen=order.refundable_fen,
            state=RefundState.REQUESTED,
            reason=f"void: {reason}"[:200],
            actor=actor,
            created_at=now,
            updated_at=now,
        )
        async with self.db.begin() as uow:
            order = await self.move(
                uow,
                order,
                Event.REFUND,
                actor=actor,
                change=Change(refund_fen=refund.amount_fen),
                next_check_at=self.recheck_at(now),
                details={"refund_fen": refund.amount_fen, "reason": refund.reason, "void": True},
            )
            await store.insert_refund(uow.conn, refund, refund_key)
        provider = self.provider(order.tender)
        result = await self.send_refund(provider, order, refund, "void")
        async with self.db.begin() as uow:
            refund, order = await self.settle_refund(uow, refund, result, actor=actor)
        stored = refund_outcome(refund, order)
        if stored.status_code == 201:
            stored = StoredResponse(200, order_json(order))
        elif stored.status_code == 202:
            stored = StoredResponse(202, order_json(order))
        return _response(stored)

    async def reverse(
        self, order: PaymentOrder, *, actor: str, now: datetime | None = None
    ) -> PaymentOrder:
        """Send the reverse of a ``reversing`` order and apply the answer. A reverse refused
        because the provider has no such trade is believed only ``not_found_grace_s`` after
        the order was made (a charge may still be landing before that)."""
        at = now or self.now()
        provider = self.provider(order.tender)
        with metrics.timed(provider.name, "reverse"):
            result = await provider.reverse(order.out_trade_no)
        crash_point("payments.after_reverse")
        _observe(provider.name, "reverse", _REVERSE_OUTCOMES[result.status])
        if result.status is ReverseStatus.REFUSED:
            # Refused: believed closed only if the provider says nothing was or can be charged.
            seen = await self.query(provider, order.out_trade_no)
            settled = seen.status in (ChargeStatus.CLOSED, ChargeStatus.REFUSED) or (
                seen.status is ChargeStatus.NOT_FOUND
                and at - order.created_at >= timedelta(seconds=self.config.not_found_grace_s)
            )
            if settled:
                result = replace(result, status=ReverseStatus.REVERSED, code=seen.code)
            elif seen.status is ChargeStatus.NOT_FOUND:
                result = replace(result, status=ReverseStatus.RETRY, code=seen.code)
        async with self.db.begin() as uow:
            current = await self._get(uow, order.order_id)
            if current.state is not OrderState.REVERSING:
                return current
            if result.status is ReverseStatus.REVERSED:
                return await self.move(
                    uow,
                    current,
                    Event.REVERSED,
                    actor=actor,
                    details={"provider_code": result.code},
                )
            checks, _ = await store.checks_of(uow.conn, current.order_id)
            next_at: datetime | None = self.recheck_at(at, checks)
            if result.status is ReverseStatus.REFUSED:
                log.error(
                    "payments.reverse_refused",
                    order_id=str(current.order_id),
                    code=result.code,
                    message=result.message,
                )
                if checks + 1 >= self.config.operator_after_checks:
                    next_at = None
                    await uow.record_audit(
                        actor=actor,
                        action="payments.order.needs_operator",
                        target=f"payment_order:{current.order_id}",
                        details={"reason": "reverse refused", "provider_code": result.code},
                    )
            # Sent again later (the provider asked for it, or did not answer).
            await store.save_transition(
                uow.conn, current, current, next_check_at=next_at, checked=True
            )
            return current

    # -- notifications --

    async def notification(
        self, provider_name: str, headers: Mapping[str, str], body: bytes, source: str | None
    ) -> Response:
        """A provider's notification: believed only once its signature verifies."""
        provider = self.providers.get(provider_name)
        if provider is None:
            raise NotFound(
                f"{provider_name} payments are not configured here",
                code="payments.provider_unknown",
            )
        try:
            note = provider.parse_notification(headers, body)
        except NotificationRejected as refused:
            log.warning(
                "payments.notification_refused",
                provider=provider_name,
                code=refused.code,
                source=source,
            )
            async with self.db.begin() as uow:
                await uow.record_audit(
                    actor="anonymous",
                    action="payments.notification.refused",
                    target=f"payments:notify/{provider_name}",
                    details={
                        "code": refused.code,
                        "reason": refused.message[:200],
                        "security": True,
                    },
                )
            answer = provider.notification_answer(False, refused.message)
            return Response(
                answer.body, status_code=answer.status, media_type=answer.content_type or None
            )
        await self.apply_notification(provider_name, note)
        answer = provider.notification_answer(True)
        return Response(
            answer.body, status_code=answer.status, media_type=answer.content_type or None
        )

    async def apply_notification(self, provider_name: str, note: Notification) -> str:
        """Apply a verified notification once; what became of it (for logs and tests)."""
        actor = f"service:{provider_name}"
        async with self.db.begin() as uow:
            first = await store.seen_notification(
                uow.conn, provider_name, note.notification_id, note.out_trade_no, self.now()
            )
            if not first:
                log.info(
                    "payments.notification_replayed",
                    provider=provider_name,
                    notification_id=note.notification_id,
                )
                return "replayed"
            order = await store.order_by_out_trade_no(uow.conn, note.out_trade_no)
            if order is None:
                # Genuine (signed) but for no order of ours: acknowledged so that the provider
                # stops re-sending; recorded for reconciliation.
                log.error(
                    "payments.notification_unknown_order",
                    provider=provider_name,
                    out_trade_no=note.out_trade_no,
                )
                await uow.record_audit(
                    actor=actor,
                    action="payments.notification.unknown_order",
                    target=f"payments:notify/{provider_name}",
                    details={
                        "out_trade_no": note.out_trade_no,
                        "kind": note.kind.value,
                        "notification_id": note.notification_id,
                    },
                )
                return "unknown_order"
            if note.kind is NotificationKind.PAYMENT and note.charge is not None:
                if order.state in (OrderState.PENDING, OrderState.UNKNOWN):
                    if note.charge.status is ChargeStatus.PAID:
                        if (
                            note.charge.amount_fen is not None
                            and note.charge.amount_fen != order.amount_fen
                        ):
                            await uow.record_audit(
                                actor=actor,
                                action="payments.notification.amount_mismatch",
                                target=f"payment_order:{order.order_id}",
                                details={
                                    "ours": order.amount_fen,
                                    "notified": note.charge.amount_fen,
                                    "security": True,
                                },
                            )
                            return "amount_mismatch"
                        await self.apply_charge(uow, order.order_id, note.charge, actor=actor)
                        return "applied"
                elif (
                    order.state in (OrderState.REVERSING, OrderState.CANCELLED, OrderState.FAILED)
                    and note.charge.status is ChargeStatus.PAID
                ):
                    log.error(
                        "payments.paid_after_close",
                        order_id=str(order.order_id),
                        state=order.state.value,
                    )
                    await uow.record_audit(
                        actor=actor,
                        action="payments.notification.paid_after_close",
                        target=f"payment_order:{order.order_id}",
                        details={"state": order.state.value},
                    )
                return "ignored"
            if note.kind is NotificationKind.REFUND and note.refund is not None:
                refund = await store.refund_by_out_no(uow.conn, note.refund.out_refund_no)
                if refund is None or refund.order_id != order.order_id:
                    log.error(
                        "payments.notification_unknown_refund",
                        out_refund_no=note.refund.out_refund_no,
                    )
                    return "unknown_refund"
                if note.refund.status in (RefundStatus.SUCCEEDED, RefundStatus.REFUSED):
                    await self.settle_refund(uow, refund, note.refund, actor=actor)
                    return "applied"
            return "ignored"

    # -- offline cash --

    async def upload_cash(
        self, station: str, items: Sequence[CashItem], *, actor: str
    ) -> list[CashVerdict]:
        """Apply the cash payments an edge took while HQ was away, each once (by its key)."""
        verdicts: list[CashVerdict] = []
        for index, item in enumerate(items):
            try:
                verdicts.append(await self._upload_one(station, index, item, actor))
            except ForecourtError as refused:
                verdicts.append(
                    CashVerdict(index, item.idempotency_key, "refused", error=refused.to_dict())
                )
        return verdicts

    async def _upload_one(
        self, station: str, index: int, item: CashItem, actor: str
    ) -> CashVerdict:
        check_money(item.amount_fen, item.currency)
        for attempt in range(2):
            try:
                async with self.db.begin() as uow:
                    existing = await store.order_by_key(uow.conn, station, item.idempotency_key)
                    if existing is not None:
                        return CashVerdict(
                            index, item.idempotency_key, "duplicate", existing.order_id
                        )
                    sale = await sale_due(uow.conn, station, item.sale_id)
                    _check_sale(sale, item)
                    assert sale is not None
                    now = self.now()
                    order = PaymentOrder(
                        order_id=new_id(),
                        station_code=station,
                        sale_id=item.sale_id,
                        tender=Tender.CASH,
                        amount_fen=item.amount_fen,
                        currency=item.currency,
                        state=OrderState.CREATED,
                        version=1,
                        created_at=now,
                        updated_at=now,
                        out_trade_no="",
                        idempotency_key=item.idempotency_key,
                        actor=f"user:{item.cashier}",
                    )
                    await store.insert_order(
                        uow.conn,
                        order,
                        due_fen=sale.amount_minor,
                        traceparent=current_traceparent(),
                    )
                    details = {
                        "cashier": item.cashier,
                        "recorded_at": item.recorded_at.isoformat(),
                        "offline": True,
                    }
                    await uow.record_audit(
                        actor=actor,
                        action="payments.order.created",
                        target=f"payment_order:{order.order_id}",
                        details={
                            "station": station,
                            "sale_id": str(item.sale_id),
                            "tender": "cash",
                            "amount_fen": item.amount_fen,
                            **details,
                        },
                    )
                    order = await self.move(
                        uow,
                        order,
                        Event.CASH_TAKEN,
                        actor=actor,
                        change=Change(paid_at=item.recorded_at),
                        details=details,
                    )
                    return CashVerdict(index, item.idempotency_key, "created", order.order_id)
            except IntegrityError:
                if attempt:
                    raise
                # Another upload of the same key won the race: answered as its duplicate.
        raise AssertionError("unreachable")


_CHARGE_OUTCOMES = {
    ChargeStatus.PAID: "success",
    ChargeStatus.USER_PAYING: "success",
    ChargeStatus.REFUSED: "declined",
    ChargeStatus.CLOSED: "declined",
}
_REFUND_OUTCOMES = {
    RefundStatus.SUCCEEDED: "success",
    RefundStatus.PROCESSING: "success",
    RefundStatus.REFUSED: "declined",
}
#: A provider's final word on a refund: the refund's state and its order's move.
_FINAL_REFUNDS = {
    RefundStatus.SUCCEEDED: (RefundState.SUCCEEDED, Event.REFUND_SUCCEEDED),
    RefundStatus.REFUSED: (RefundState.REFUSED, Event.REFUND_REFUSED),
}
_REVERSE_OUTCOMES = {
    ReverseStatus.REVERSED: "success",
    ReverseStatus.RETRY: "unknown",
    ReverseStatus.REFUSED: "declined",
    ReverseStatus.UNKNOWN: "unknown",
}


def _annotate_order(order: PaymentOrder) -> None:
    """The order on the current span (a payment command's)."""
    annotate(
        {
            "payment.order_id": str(order.order_id),
            "payment.tender": order.tender.value,
            "payment.out_trade_no": order.out_trade_no or None,
            "payment.state": order.state.value,
        }
    )


def _observe(provider: str, method: str, outcome: str) -> None:
    try:
        metrics.observe_attempt(provider, method, outcome)
    except ValueError:  # a label the metrics do not know: never fails a payment
        log.warning("payments.metric_refused", provider=provider, method=method)


class RefundNotAllowed(Conflict):
    code = "payments.refund_not_allowed"


def _check_sale(sale: SaleDue | None, request: ChargeRequest | CashItem) -> None:
    if sale is None:
        raise SaleUnknown(
            f"sale {request.sale_id} is not known at HQ yet",
            hint="the edge uploads the sale first (sales:batch), then asks for its payment",
            sale_id=str(request.sale_id),
        )
    if sale.dispense_type != "sale" or sale.amount_minor <= 0:
        raise SaleNotPayable(
            f"sale {request.sale_id} is a {sale.dispense_type} of {sale.amount_minor}: "
            "nothing to pay",
            dispense_type=sale.dispense_type,
        )
    if sale.currency != request.currency:
        raise InvalidValue(
            f"the sale is in {sale.currency}, not {request.currency}",
            code="payments.currency_refused",
        )


def _check_same_day(order: PaymentOrder, now: datetime) -> None:
    paid = (order.paid_at or order.created_at).astimezone(BUSINESS_TZ).date()
    if paid != now.astimezone(BUSINESS_TZ).date():
        raise VoidRefused(
            "a payment is voided on its business day only: refund it instead",
            paid_on=paid.isoformat(),
        )
