"""The one contract every payment provider adapter keeps.

An adapter speaks a provider's published API over HTTP (httpx) and translates its answers into
the few outcomes the payment order machine acts on. Its rules:

- **It never raises for the provider's behaviour.** A timeout, a refused connection, a 5xx, an
  answer whose signature does not verify, or one it cannot parse, is an outcome (``UNKNOWN``,
  with ``code`` saying which) and never an exception: an unknown outcome is resolved by
  :meth:`PaymentProvider.query` (then :meth:`PaymentProvider.reverse`), never by charging again.
  Only our own mistakes (bad configuration, a call the contract forbids) raise.
- **It retries nothing that moves money.** ``charge_by_code`` and ``refund`` are sent once per
  call; the caller decides what follows. Queries may be repeated freely.
- **Amounts are integer fen** (CNY only); identifiers are ours (``out_trade_no``,
  ``out_refund_no``: 6-32 characters of ``[0-9A-Za-z_-]``) and the provider's.
- **Every request is signed and every answer verified** with the keys in the adapter's
  configuration, exactly as production needs: production is a change of base URL and keys.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Protocol, runtime_checkable

#: Our identifiers as both providers accept them (WeChat: 6-32 of [0-9A-Za-z_-|*]; Alipay: 64).
OUT_NO = re.compile(r"^[0-9A-Za-z_-]{6,32}$")


class ChargeStatus(enum.StrEnum):
    """What the provider says of one trade (a charge answer or a query)."""

    # the payer was charged (WeChat SUCCESS/REFUND, Alipay TRADE_SUCCESS/FINISHED)
    PAID = "paid"
    # the payer must still confirm (USERPAYING, Alipay 10003/WAIT_BUYER_PAY)
    USER_PAYING = "user_paying"
    REFUSED = "refused"  # definitively not charged (bad code, no balance, PAYERROR, 40004 ...)
    NOT_PAID = "not_paid"  # query: the trade exists and nothing was charged (WeChat NOTPAY)
    CLOSED = "closed"  # query/reverse: reversed, revoked, closed or cancelled; nothing charged
    # query: the provider has no such trade (ORDER_NOT_EXIST, ACQ.TRADE_NOT_EXIST)
    NOT_FOUND = "not_found"
    UNKNOWN = "unknown"  # no trustworthy answer: query again later


class RefundStatus(enum.StrEnum):
    SUCCEEDED = "succeeded"  # the money is back with the payer (SUCCESS / fund_change Y)
    PROCESSING = "processing"  # accepted, not finished: query again
    REFUSED = "refused"  # definitively not refunded (NOT_ENOUGH, over the paid amount, ...)
    NOT_FOUND = "not_found"  # query: no such refund
    UNKNOWN = "unknown"  # no trustworthy answer: query again later


class ReverseStatus(enum.StrEnum):
    REVERSED = "reversed"  # the trade is closed; if it had been charged the money went back
    RETRY = "retry"  # the provider asks for the reverse to be sent again (recall=Y / SYSTEMERROR)
    REFUSED = "refused"  # cannot be reversed (e.g. too late: refund instead)
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class ProviderAnswer:
    """Common fields: the provider's own code and message (verbatim) and our reason."""

    # the provider's code (e.g. "USERPAYING", "40004/ACQ.TRADE_HAS_SUCCESS"), or ours for no
    # answer: "timeout", "network", "http_5xx", "bad_signature", "malformed"
    code: str | None = None
    message: str | None = None  # one line, for logs and the cashier


@dataclass(frozen=True, slots=True)
class ChargeResult(ProviderAnswer):
    status: ChargeStatus = ChargeStatus.UNKNOWN
    out_trade_no: str = ""
    provider_trade_no: str | None = None  # WeChat transaction_id / Alipay trade_no
    amount_fen: int | None = None  # what the provider says was charged (total)
    refunded_fen: int | None = None  # query only, where the provider reports it
    paid_at: datetime | None = None  # timezone-aware
    payer: str | None = None  # WeChat openid / Alipay buyer_user_id or buyer_logon_id


@dataclass(frozen=True, slots=True)
class RefundResult(ProviderAnswer):
    status: RefundStatus = RefundStatus.UNKNOWN
    out_refund_no: str = ""
    provider_refund_no: str | None = None
    refund_fen: int | None = None
    refunded_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ReverseResult(ProviderAnswer):
    status: ReverseStatus = ReverseStatus.UNKNOWN
    out_trade_no: str = ""


class NotificationKind(enum.StrEnum):
    PAYMENT = "payment"
    REFUND = "refund"


@dataclass(frozen=True, slots=True)
class Notification:
    """A provider's asynchronous notification, signature verified and (WeChat) decrypted."""

    kind: NotificationKind
    notification_id: str  # the provider's id of this notification (WeChat id / Alipay notify_id)
    out_trade_no: str
    charge: ChargeResult | None = None  # kind PAYMENT
    refund: RefundResult | None = None  # kind REFUND


class NotificationRejected(Exception):
    """A notification that must not be believed: bad or missing signature, stale timestamp,
    undecryptable resource, wrong merchant/app. ``code`` is ours; the HTTP answer to the
    provider is :meth:`PaymentProvider.notification_answer` with ``ok=False``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """What our notification endpoint answers the provider (status, content type, body)."""

    status: int
    content_type: str
    body: bytes


class BillKind(enum.StrEnum):
    PAYMENT = "payment"
    REFUND = "refund"


@dataclass(frozen=True, slots=True)
class BillLine:
    """One line of a provider's daily trade bill."""

    kind: BillKind
    out_trade_no: str
    provider_trade_no: str
    amount_fen: int  # the payment's total, or the refund's amount
    at: datetime  # timezone-aware
    out_refund_no: str | None = None
    provider_refund_no: str | None = None
    status: str | None = None  # the provider's own status text on that line
    extra: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class PaymentProvider(Protocol):
    """A provider adapter (see the module's rules)."""

    name: str  # "wechat" | "alipay"

    async def charge_by_code(
        self,
        *,
        out_trade_no: str,
        amount_fen: int,
        auth_code: str,
        description: str,
        store_id: str,
        payer_ip: str | None = None,
        trace_headers: Mapping[str, str] | None = None,
    ) -> ChargeResult:
        """Charge a payment code (付款码) once. Never retried here."""
        ...

    async def query(self, out_trade_no: str) -> ChargeResult:
        """The trade's state at the provider (NOT_FOUND when it has none)."""
        ...

    async def reverse(self, out_trade_no: str) -> ReverseResult:
        """WeChat reverse / Alipay trade.cancel: the remedy for an unknown or unconfirmed
        charge (charged or not, the trade ends closed and any money goes back)."""
        ...

    async def refund(
        self,
        *,
        out_trade_no: str,
        out_refund_no: str,
        refund_fen: int,
        total_fen: int,
        reason: str | None = None,
    ) -> RefundResult:
        """Refund part or all of a paid trade once; the same ``out_refund_no`` again is the
        same refund at the provider (both providers de-duplicate by it)."""
        ...

    async def query_refund(self, *, out_trade_no: str, out_refund_no: str) -> RefundResult: ...

    def parse_notification(self, headers: Mapping[str, str], body: bytes) -> Notification:
        """Verify (and decrypt) one notification; raise :class:`NotificationRejected`."""
        ...

    def notification_answer(self, ok: bool, message: str = "") -> HttpAnswer:
        """What to answer the provider: accepted (it stops re-sending) or not (it re-sends)."""
        ...

    async def trade_bill(self, day: date) -> list[BillLine]:
        """The provider's trade bill for one day (payments and refunds)."""
        ...

    async def aclose(self) -> None: ...
