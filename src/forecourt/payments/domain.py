"""Payments domain: payment orders, their state machine, refunds. Pure Python.

A **payment order** is one tender's payment of (part of) one sale: a WeChat Pay or Alipay
payment code scanned at the counter, or cash. It is linked to exactly one sale (``sale_id``);
a sale may have several orders over time (a declined code, then cash) but the amounts of its
live orders (not failed, not cancelled) never exceed what the sale is due, so a sale is never
paid twice. Split payments (a fuel card plus WeChat) are two live orders of one sale.

An order changes state only through :func:`transition`, which knows every legal move
(:data:`TRANSITIONS`) and refuses any other with :class:`IllegalTransition`; the store writes
each move with the order's ``version`` compared and an audit record, in one transaction.

States (see docs/payments.md for the picture)::

    created ──submit──▶ pending ──paid──▶ paid ──refund──▶ refunding ──▶ partially_refunded
       │                 │  │                                  │               │
       │ cash            │  └─refused──▶ failed                └─refused──▶ (back)   ... refunded
       ▼                 └─no answer──▶ unknown ──query paid──▶ paid
      paid                                 │
                                           └─reverse──▶ reversing ──▶ cancelled

- ``pending``: the charge may be at the provider (the payer may still be confirming: the
  order's ``awaiting_payer``). Committed before the provider is called.
- ``unknown``: the provider did not answer (timeout, 5xx, an answer that failed its
  signature). Resolved only by querying the provider and, failing a final answer, by
  reversing — never by charging again.
- ``reversing``: a reverse (WeChat) / cancel (Alipay) was sent; the trade ends closed and any
  money charged goes back. ``cancelled`` is that end, or a cash order voided.
- ``failed``: the provider refused the charge for good (bad code, no balance): nothing was
  charged.
- ``refunding``: one refund is in flight (a second one waits: 409); its end moves the order to
  ``partially_refunded`` or ``refunded``, or, refused, back to where it was.

Terminal: ``failed``, ``cancelled``, ``refunded``. Settled (no provider call owed):
those and ``paid``, ``partially_refunded``. The recovery worker drives every order that is
neither (``created``, ``pending``, ``unknown``, ``reversing``, ``refunding``) to a settled
state.

Money is integer fen with its currency; CNY only for now (:data:`CURRENCIES`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from uuid import UUID

from forecourt.kernel.errors import Conflict, ForecourtError, InvalidValue
from forecourt.kernel.ids import uuid5_str

CURRENCIES = frozenset({"CNY"})
#: The most one order can be: ¥100 000.00 (both providers' code payments stop well below).
MAX_ORDER_FEN = 10_000_000
#: Our order numbers at the providers: "FC" + 30 hex digits (32: both providers accept it).
OUT_NO_PREFIX = "FC"
_OUT_NO_NAMESPACE = bytes.fromhex("5f0c2b1e8a3d4c6e9b7a1f2d3c4b5a69")
_REFUND_NAMESPACE = bytes.fromhex("7a2e4d9c1b3f4e8a9c6d2b1a0f3e5d47")
#: WeChat payment codes: 18 digits starting 10-15; Alipay: 16-24 digits starting 25-30.
WECHAT_CODE = re.compile(r"^1[0-5]\d{16}$")
ALIPAY_CODE = re.compile(r"^(2[5-9]|30)\d{14,22}$")


class PaymentsError(ForecourtError):
    code = "payments.error"


class IllegalTransition(Conflict):
    code = "payments.illegal_transition"
    http_status = 409


class Tender(enum.StrEnum):
    WECHAT = "wechat"
    ALIPAY = "alipay"
    CASH = "cash"

    @property
    def provider(self) -> bool:
        return self is not Tender.CASH


class OrderState(enum.StrEnum):
    CREATED = "created"
    PENDING = "pending"
    UNKNOWN = "unknown"
    PAID = "paid"
    FAILED = "failed"
    REVERSING = "reversing"
    CANCELLED = "cancelled"
    REFUNDING = "refunding"
    PARTIALLY_REFUNDED = "partially_refunded"
    REFUNDED = "refunded"


TERMINAL = frozenset({OrderState.FAILED, OrderState.CANCELLED, OrderState.REFUNDED})
SETTLED = TERMINAL | {OrderState.PAID, OrderState.PARTIALLY_REFUNDED}
#: States the recovery worker drives on (an outside call is or may be owed).
IN_FLIGHT = frozenset(OrderState) - SETTLED
#: States whose amount counts against the sale's due amount (the order holds or took money).
LIVE = frozenset(OrderState) - {OrderState.FAILED, OrderState.CANCELLED, OrderState.REFUNDED}


class Event(enum.StrEnum):
    SUBMIT = "submit"  # the charge is about to be sent to the provider
    CASH_TAKEN = "cash_taken"
    PAID = "paid"  # the provider says charged (answer, query or notification)
    AWAITING_PAYER = "awaiting_payer"  # the payer must still confirm (USERPAYING / 10003)
    REFUSED = "refused"  # the provider refused the charge for good
    NO_ANSWER = "no_answer"  # the provider's outcome is unknown
    REVERSE = "reverse"  # a reverse / cancel is about to be sent
    REVERSED = "reversed"  # the trade is closed at the provider (nothing kept)
    VOID = "void"  # a cash order voided by staff: the cash handed back
    REFUND = "refund"  # a refund is about to be sent
    REFUND_SUCCEEDED = "refund_succeeded"
    REFUND_REFUSED = "refund_refused"


_S = OrderState
_E = Event
#: Every legal move: (from, event) -> to. ``REFUND_SUCCEEDED`` lands on partially_refunded or
#: refunded by the amounts (see :func:`transition`); ``REFUND_REFUSED`` goes back to where the
#: refund started from (``paid`` or ``partially_refunded``).
TRANSITIONS: Mapping[tuple[OrderState, Event], OrderState] = {
    (_S.CREATED, _E.SUBMIT): _S.PENDING,
    (_S.CREATED, _E.CASH_TAKEN): _S.PAID,
    (_S.CREATED, _E.REFUSED): _S.FAILED,  # refused before anything was sent (e.g. no provider)
    (_S.PENDING, _E.PAID): _S.PAID,
    (_S.PENDING, _E.AWAITING_PAYER): _S.PENDING,
    (_S.PENDING, _E.REFUSED): _S.FAILED,
    (_S.PENDING, _E.NO_ANSWER): _S.UNKNOWN,
    (_S.PENDING, _E.REVERSE): _S.REVERSING,
    (_S.UNKNOWN, _E.PAID): _S.PAID,
    (_S.UNKNOWN, _E.AWAITING_PAYER): _S.PENDING,
    (_S.UNKNOWN, _E.NO_ANSWER): _S.UNKNOWN,
    (_S.UNKNOWN, _E.REVERSE): _S.REVERSING,
    # A refusal after an unknown answer is believed only from a query that saw the trade
    # closed or failed; the handlers reverse instead of trusting NOT_FOUND.
    (_S.UNKNOWN, _E.REFUSED): _S.FAILED,
    (_S.REVERSING, _E.REVERSE): _S.REVERSING,  # sent again (recall / retry)
    (_S.REVERSING, _E.REVERSED): _S.CANCELLED,
    (_S.PAID, _E.VOID): _S.CANCELLED,
    (_S.PAID, _E.REFUND): _S.REFUNDING,
    (_S.PARTIALLY_REFUNDED, _E.REFUND): _S.REFUNDING,
    (_S.REFUNDING, _E.REFUND_SUCCEEDED): _S.PARTIALLY_REFUNDED,  # or REFUNDED (by amounts)
    (_S.REFUNDING, _E.REFUND_REFUSED): _S.PAID,  # or PARTIALLY_REFUNDED (by amounts)
    # A late "paid" (a notification, a query) for an order already there changes nothing.
    (_S.PAID, _E.PAID): _S.PAID,
}


@dataclass(frozen=True, slots=True)
class PaymentOrder:
    order_id: UUID
    station_code: str
    sale_id: UUID
    tender: Tender
    amount_fen: int
    currency: str
    state: OrderState
    version: int  # compared on every write: concurrent commands on one order are serialised
    created_at: datetime
    updated_at: datetime
    out_trade_no: str  # ours at the provider ("" for cash)
    idempotency_key: str  # the edge's key: derived from the sale and the attempt
    actor: str  # who took the payment (the cashier)
    provider_trade_no: str | None = None
    paid_at: datetime | None = None
    refunded_fen: int = 0
    refund_pending_fen: int = 0  # the refund in flight (state refunding)
    awaiting_payer: bool = False
    failure_code: str | None = None
    failure_message: str | None = None

    @property
    def refundable_fen(self) -> int:
        return self.amount_fen - self.refunded_fen - self.refund_pending_fen


@dataclass(frozen=True, slots=True)
class Change:
    """What a move may set besides the state."""

    provider_trade_no: str | None = None
    paid_at: datetime | None = None
    refund_fen: int = 0  # REFUND (the amount now in flight) and REFUND_SUCCEEDED/REFUSED
    failure_code: str | None = None
    failure_message: str | None = None


def transition(
    order: PaymentOrder, event: Event, at: datetime, change: Change | None = None
) -> PaymentOrder:
    """The order after ``event``, or :class:`IllegalTransition`. Pure: the store persists it."""
    c = change or Change()
    target = TRANSITIONS.get((order.state, event))
    if target is None:
        raise IllegalTransition(
            f"a {order.state.value} order cannot take {event.value}",
            order_id=str(order.order_id),
            state=order.state.value,
            event=event.value,
        )
    if event in (Event.CASH_TAKEN, Event.VOID) and order.tender.provider:
        raise IllegalTransition(f"{event.value} is for cash orders", event=event.value)
    if event in (Event.SUBMIT, Event.REVERSE) and not order.tender.provider:
        raise IllegalTransition(f"{event.value} is for provider orders", event=event.value)
    fields: dict[str, object] = {"state": target, "version": order.version + 1, "updated_at": at}
    if event is Event.AWAITING_PAYER:
        fields["awaiting_payer"] = True
    elif event in (Event.PAID, Event.CASH_TAKEN):
        fields["awaiting_payer"] = False
        if order.paid_at is None:
            fields["paid_at"] = c.paid_at or at
        if c.provider_trade_no and order.provider_trade_no is None:
            fields["provider_trade_no"] = c.provider_trade_no
    elif event in (Event.REFUSED, Event.NO_ANSWER):
        fields["awaiting_payer"] = False
        fields["failure_code"] = c.failure_code
        fields["failure_message"] = c.failure_message
    elif event is Event.REFUND:
        if not 0 < c.refund_fen <= order.refundable_fen:
            raise RefundTooLarge(
                f"a refund of {c.refund_fen} fen exceeds the {order.refundable_fen} fen "
                "still refundable on this order",
                refundable_fen=order.refundable_fen,
            )
        fields["refund_pending_fen"] = c.refund_fen
    elif event is Event.REFUND_SUCCEEDED:
        if c.refund_fen != order.refund_pending_fen:
            raise IllegalTransition(
                "the refund that succeeded is not the one in flight",
                in_flight_fen=order.refund_pending_fen,
                succeeded_fen=c.refund_fen,
            )
        refunded = order.refunded_fen + c.refund_fen
        fields["refunded_fen"] = refunded
        fields["refund_pending_fen"] = 0
        fields["state"] = (
            OrderState.REFUNDED if refunded == order.amount_fen else OrderState.PARTIALLY_REFUNDED
        )
    elif event is Event.REFUND_REFUSED:
        fields["refund_pending_fen"] = 0
        fields["state"] = (
            OrderState.PARTIALLY_REFUNDED if order.refunded_fen > 0 else OrderState.PAID
        )
    return replace(order, **fields)  # type: ignore[arg-type]


class RefundTooLarge(InvalidValue):
    code = "payments.refund_too_large"
    http_status = 422


class CurrencyRefused(InvalidValue):
    code = "payments.currency_refused"
    http_status = 422


class AmountInvalid(InvalidValue):
    code = "payments.amount_invalid"
    http_status = 422


class PaymentCodeInvalid(InvalidValue):
    code = "payments.payment_code_invalid"
    http_status = 422


def check_money(amount_fen: int, currency: str) -> None:
    """An order's amount: a positive integer of fen up to :data:`MAX_ORDER_FEN`, in CNY."""
    if currency not in CURRENCIES:
        raise CurrencyRefused(
            f"currency {currency!r} is not accepted: payments are in CNY only",
            currency=currency,
        )
    if isinstance(amount_fen, bool) or not isinstance(amount_fen, int):
        raise AmountInvalid("an amount is an integer number of fen")
    if not 0 < amount_fen <= MAX_ORDER_FEN:
        raise AmountInvalid(
            f"an amount of {amount_fen} fen is outside 1..{MAX_ORDER_FEN}", amount_fen=amount_fen
        )


def tender_of_code(auth_code: str) -> Tender:
    """Which provider a scanned payment code belongs to (by its published prefixes)."""
    if WECHAT_CODE.fullmatch(auth_code):
        return Tender.WECHAT
    if ALIPAY_CODE.fullmatch(auth_code):
        return Tender.ALIPAY
    raise PaymentCodeInvalid(
        "not a WeChat Pay (18 digits from 10-15) or Alipay (16-24 digits from 25-30) "
        "payment code: scan it again"
    )


def out_trade_no(idempotency_key: str, station_code: str) -> str:
    """Our order number at the provider, derived from the edge's key (sale and attempt): a
    retry under the same key is the same trade at the provider, never a second charge."""
    return (
        OUT_NO_PREFIX
        + uuid5_str(_OUT_NO_NAMESPACE, f"{station_code}/{idempotency_key}").replace("-", "")[:30]
    )


def out_refund_no(order_id: UUID, refund_key: str) -> str:
    """Our refund number at the provider, derived from the order and the caller's key."""
    return "RF" + uuid5_str(_REFUND_NAMESPACE, f"{order_id}/{refund_key}").replace("-", "")[:30]


class RefundState(enum.StrEnum):
    REQUESTED = "requested"  # committed before the provider is called
    PROCESSING = "processing"  # the provider accepted it, not finished
    UNKNOWN = "unknown"  # no trustworthy answer: query
    SUCCEEDED = "succeeded"
    REFUSED = "refused"


REFUND_SETTLED = frozenset({RefundState.SUCCEEDED, RefundState.REFUSED})


@dataclass(frozen=True, slots=True)
class Refund:
    refund_id: UUID
    order_id: UUID
    out_refund_no: str
    amount_fen: int
    state: RefundState
    reason: str
    actor: str
    created_at: datetime
    updated_at: datetime
    provider_refund_no: str | None = None
    failure_code: str | None = None


def settle_sale_check(due_fen: int, live_fen: int, amount_fen: int, *, exact: bool = True) -> None:
    """A new order for a sale: its amount plus the sale's live orders must not exceed what the
    sale is due (one sale, paid once); ``exact`` (a counter payment in one tender): it must be
    exactly what is still due. A split payment's legs pass ``exact=False``."""
    if live_fen >= due_fen:
        raise SaleAlreadyPaid(
            "this sale is already paid (or a payment of it is in progress)",
            due_fen=due_fen,
            live_fen=live_fen,
        )
    if amount_fen + live_fen > due_fen or (exact and amount_fen + live_fen != due_fen):
        raise AmountMismatch(
            f"the amount {amount_fen} fen differs from the {due_fen - live_fen} fen the sale "
            "is still due",
            due_fen=due_fen - live_fen,
            amount_fen=amount_fen,
        )


class SaleAlreadyPaid(Conflict):
    code = "payments.sale_already_paid"
    http_status = 409


class AmountMismatch(InvalidValue):
    code = "payments.amount_mismatch"
    http_status = 422
