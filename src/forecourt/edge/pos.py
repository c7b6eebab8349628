"""Counter payments at the edge (the POS API of the cashier's terminal).

A finished sale in the journal is paid at the counter by the payer's payment code (sent to
HQ, which charges WeChat Pay or Alipay) or in cash (recorded here at once, uploaded to HQ
later). The cashier never types the amount: it is the journaled sale's.

Every payment try of a sale is an *attempt* (``pos_payment``), numbered per sale, with the
idempotency key ``edge-<sale_id>-<attempt>``. An attempt is

- ``unsent``: HQ was not reached (nothing can have been charged): a retry sends it again
  under the same key, or the cashier takes cash instead;
- ``unknown``: sent, no answer (a timeout, an HQ failure): a retry sends the same request
  under the same key (HQ replays its answer); nothing else is taken meanwhile;
- ``pending``: HQ answered 202 (the payer is confirming, or the provider did not answer):
  HQ's order is polled; nothing else is taken meanwhile;
- ``paid``; ``declined`` (402, or reversed) and ``failed`` (HQ refused the request): the
  next payment of the sale is a new attempt with a new key; ``abandoned``: an unsent code
  attempt given up for cash.

A sale is paid when one of its attempts is; a paid sale whose pump still holds it (the
controller does not close sales by itself, ``auto_settle`` off) is closed at the pump, which
frees it for the next customer. Cash is uploaded to HQ (``POST .../payments/cash``, the
station's credential) by :class:`CashUploader`, each record once (HQ takes a repeated key
as a duplicate), after the sale itself reached HQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import httpx
import sqlalchemy as sa
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from forecourt.edge.cashiers import CHARGE
from forecourt.edge.controller import ForecourtController
from forecourt.edge.journal import Journal, journal_t, outbox_t
from forecourt.infra.access import require
from forecourt.infra.background import BackgroundService
from forecourt.infra.db import UTCDateTime
from forecourt.infra.http import error_responses
from forecourt.infra.logging import get_logger
from forecourt.infra.tracing import annotate, client_span, current_trace_id, request_span
from forecourt.infra.tracing import trace_headers as current_trace_headers
from forecourt.kernel.access import Principal
from forecourt.kernel.clock import Clock
from forecourt.kernel.errors import Conflict, ForecourtError, InvalidValue, NotFound

log = get_logger("forecourt.edge.pos")
TRACER_NAME = "forecourt.edge"

md = sa.MetaData()
pos_payment_t = sa.Table(
    "pos_payment",
    md,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("sale_id", sa.String(36), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("method", sa.String(10), nullable=False),
    sa.Column("idempotency_key", sa.String(80), nullable=False, unique=True),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("amount_minor", sa.Integer, nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("tendered_minor", sa.Integer),
    sa.Column("change_minor", sa.Integer),
    sa.Column("cashier", sa.String(200), nullable=False),
    sa.Column("order_id", sa.String(80)),
    sa.Column("auth_code", sa.String(64)),
    sa.Column("reason", sa.Text),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Column("paid_at", UTCDateTime()),
    sa.Column("uploaded_at", UTCDateTime()),
    sa.Column("upload_attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("upload_rejected", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("upload_error", sa.Text),
)

#: attempts whose outcome is still open: the sale takes no other payment meanwhile
OPEN_STATES = frozenset({"unsent", "unknown", "pending"})
#: an attempt in these may be sent again under its key
RESEND_STATES = frozenset({"unsent", "unknown"})
#: HQ's order states (PaymentOut.state) by what they mean here
_HQ_PAID = frozenset({"paid", "partially_refunded", "refunded", "refunding"})
_HQ_DECLINED = frozenset({"failed", "cancelled"})
#: HQ's verdicts on an uploaded sale after which it holds the sale (as forecourt.edge.sync)
_HQ_HOLDS_SALE = frozenset({"created", "duplicate", "quarantined", "conflict"})
HQ_HINT = "HQ cannot be reached: take the payment in cash (it works offline), or try again"


# --- errors ---------------------------------------------------------------------------------


class SaleUnknown(NotFound):
    code = "pos.sale_unknown"


class SaleAlreadyPaid(Conflict):
    code = "pos.sale_paid"


class PaymentInProgress(Conflict):
    code = "pos.payment_in_progress"


class TenderShort(InvalidValue):
    code = "pos.tender_short"


class SaleNotPayable(Conflict):
    code = "pos.sale_not_payable"


class HqUnreachable(ForecourtError):
    code = "pos.hq_unreachable"
    http_status = 503


class SaleNotUploaded(ForecourtError):
    code = "pos.sale_not_uploaded"
    http_status = 503


class OutcomeUnknown(ForecourtError):
    code = "pos.payment_outcome_unknown"
    http_status = 503


class ProviderUnreachable(ForecourtError):
    code = "pos.provider_unreachable"
    http_status = 503


class PaymentDeclined(ForecourtError):
    code = "pos.payment_declined"
    http_status = 402


class PaymentRefused(ForecourtError):
    """HQ refused the payment request (its code and message in the details)."""

    code = "pos.payment_refused"
    http_status = 409


# --- requests and answers -------------------------------------------------------------------


class CodePay(BaseModel):
    """The payer's payment code, scanned at the counter."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["code"]
    auth_code: Annotated[str, Field(pattern=r"^[0-9]{16,24}$")]


class CashPay(BaseModel):
    """Cash handed over: what the payer gave, in fen; the change is computed."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["cash"]
    tendered_fen: Annotated[StrictInt, Field(ge=0, le=100_000_000)]


PayRequest = Annotated[CodePay | CashPay, Field(discriminator="method")]


class AttemptOut(BaseModel):
    attempt: int
    method: Literal["code", "cash"]
    status: Literal["unsent", "unknown", "pending", "paid", "declined", "failed", "abandoned"]
    idempotency_key: str
    amount_fen: int
    currency: str
    tendered_fen: int | None
    change_fen: int | None
    cashier: str
    order_id: str | None
    reason: str | None
    created_at: datetime
    paid_at: datetime | None
    uploaded_at: datetime | None


class SaleOut(BaseModel):
    sale_id: str
    pump: int
    nozzle: int | None
    grade: str
    volume_ml: int
    amount_fen: int
    currency: str
    ended_at: datetime | None
    payment_status: Literal["unpaid", "in_progress", "paid"]
    attempts: list[AttemptOut]


class PayOut(BaseModel):
    sale: SaleOut
    payment: AttemptOut
    change_fen: int | None
    pump_released: bool
    trace_id: str | None = Field(
        None, description="the payment's trace id (W3C), from the edge to HQ and the provider"
    )


@dataclass(frozen=True)
class PosSale:
    sale_id: str
    pump: int
    nozzle: int | None
    grade: str
    volume_ml: int
    amount_minor: int
    currency: str
    dispense_type: str
    ended_at: datetime | None


@dataclass(frozen=True)
class Attempt:
    id: int
    sale_id: str
    attempt: int
    method: str
    idempotency_key: str
    status: str
    amount_minor: int
    currency: str
    tendered_minor: int | None
    change_minor: int | None
    cashier: str
    order_id: str | None
    auth_code: str | None
    reason: str | None
    created_at: datetime
    paid_at: datetime | None
    uploaded_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "method": self.method,
            "status": self.status,
            "idempotency_key": self.idempotency_key,
            "amount_fen": self.amount_minor,
            "currency": self.currency,
            "tendered_fen": self.tendered_minor,
            "change_fen": self.change_minor,
            "cashier": self.cashier,
            "order_id": self.order_id,
            "reason": self.reason,
            "created_at": self.created_at.isoformat(),
            "paid_at": self.paid_at.isoformat() if self.paid_at else None,
            "uploaded_at": self.uploaded_at.isoformat() if self.uploaded_at else None,
        }


def idempotency_key(sale_id: str, attempt: int) -> str:
    """The key of a sale's payment attempt: the same for every retry of that attempt."""
    return f"edge-{sale_id}-{attempt}"


def _attempt(row: Any) -> Attempt:
    return Attempt(
        id=row.id,
        sale_id=row.sale_id,
        attempt=row.attempt,
        method=row.method,
        idempotency_key=row.idempotency_key,
        status=row.status,
        amount_minor=row.amount_minor,
        currency=row.currency,
        tendered_minor=row.tendered_minor,
        change_minor=row.change_minor,
        cashier=row.cashier,
        order_id=row.order_id,
        auth_code=row.auth_code,
        reason=row.reason,
        created_at=row.created_at,
        paid_at=row.paid_at,
        uploaded_at=row.uploaded_at,
    )


def _currency(payload: str) -> str:
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        value = json.loads(payload).get("currency")
        if isinstance(value, str):
            return value
    return "CNY"


def _pos_sale(row: Any) -> PosSale:
    return PosSale(
        sale_id=row.sale_id,
        pump=int(row.fuelling_point),
        nozzle=row.nozzle,
        grade=row.grade,
        volume_ml=int(row.volume_ml),
        amount_minor=int(row.amount_minor),
        currency=_currency(row.payload),
        dispense_type=row.dispense_type,
        ended_at=row.ended_at,
    )


# --- the store (the journal's database, on the journal's one writer thread) -----------------


class PosStore:
    """The payment attempts of the journal's sales."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    @property
    def clock(self) -> Clock:
        return self.journal.clock

    async def sale(self, sale_id: str) -> PosSale | None:
        return await self.journal._run(self._sale, sale_id)

    def _sale(self, sale_id: str) -> PosSale | None:
        with self.journal.engine.connect() as conn:
            row = conn.execute(sa.select(journal_t).where(journal_t.c.sale_id == sale_id)).first()
        return _pos_sale(row) if row else None

    async def attempts(self, sale_id: str) -> list[Attempt]:
        return await self.journal._run(self._attempts, sale_id)

    def _attempts(self, sale_id: str) -> list[Attempt]:
        with self.journal.engine.connect() as conn:
            return self._of_sale(conn, sale_id)

    @staticmethod
    def _of_sale(conn: sa.Connection, sale_id: str) -> list[Attempt]:
        rows = conn.execute(
            sa.select(pos_payment_t)
            .where(pos_payment_t.c.sale_id == sale_id)
            .order_by(pos_payment_t.c.attempt)
        )
        return [_attempt(r) for r in rows]

    async def unpaid(self, pump: int | None, limit: int) -> list[tuple[PosSale, list[Attempt]]]:
        """Finished sales (not pump tests, own use …) no attempt paid, newest first."""
        return await self.journal._run(self._unpaid, pump, limit)

    def _unpaid(self, pump: int | None, limit: int) -> list[tuple[PosSale, list[Attempt]]]:
        paid = (
            sa.exists()
            .where(pos_payment_t.c.sale_id == journal_t.c.sale_id, pos_payment_t.c.status == "paid")
            .correlate(journal_t)
        )
        query = sa.select(journal_t).where(journal_t.c.dispense_type == "sale", ~paid)
        if pump is not None:
            query = query.where(journal_t.c.fuelling_point == pump)
        with self.journal.engine.connect() as conn:
            rows = conn.execute(query.order_by(journal_t.c.seq.desc()).limit(limit)).fetchall()
            return [(_pos_sale(r), self._of_sale(conn, r.sale_id)) for r in rows]

    async def new_attempt(
        self,
        sale: PosSale,
        method: str,
        *,
        status: str,
        cashier: str,
        auth_code: str | None = None,
        tendered_minor: int | None = None,
    ) -> Attempt:
        """A new attempt of ``sale``, in the one transaction that checks the sale takes one:
        not paid (:class:`SaleAlreadyPaid`), no attempt open — an ``unsent`` code attempt is
        abandoned for cash; another open one is :class:`PaymentInProgress`."""
        return await self.journal._run(
            self._new_attempt, sale, method, status, cashier, auth_code, tendered_minor
        )

    def _new_attempt(
        self,
        sale: PosSale,
        method: str,
        status: str,
        cashier: str,
        auth_code: str | None,
        tendered_minor: int | None,
    ) -> Attempt:
        now = self.clock.now()
        with self.journal.engine.begin() as conn:
            known = self._of_sale(conn, sale.sale_id)
            if any(a.status == "paid" for a in known):
                raise SaleAlreadyPaid(f"sale {sale.sale_id} is paid", sale_id=sale.sale_id)
            for open_ in (a for a in known if a.status in OPEN_STATES):
                if open_.status == "unsent" and method == "cash":
                    conn.execute(
                        pos_payment_t.update()
                        .where(pos_payment_t.c.id == open_.id)
                        .values(
                            status="abandoned",
                            auth_code=None,
                            reason="HQ was not reached; paid in cash instead",
                            updated_at=now,
                        )
                    )
                    continue
                raise PaymentInProgress(
                    f"attempt {open_.attempt} of sale {sale.sale_id} is {open_.status}: its "
                    "outcome is not known yet (ask for the code payment again to learn it)",
                    sale_id=sale.sale_id,
                    attempt=open_.attempt,
                    status=open_.status,
                )
            number = max((a.attempt for a in known), default=0) + 1
            change = None if tendered_minor is None else tendered_minor - sale.amount_minor
            row_id = conn.execute(
                pos_payment_t.insert().values(
                    sale_id=sale.sale_id,
                    attempt=number,
                    method=method,
                    idempotency_key=idempotency_key(sale.sale_id, number),
                    status=status,
                    amount_minor=sale.amount_minor,
                    currency=sale.currency,
                    tendered_minor=tendered_minor,
                    change_minor=change,
                    cashier=cashier[:200],
                    auth_code=auth_code,
                    created_at=now,
                    updated_at=now,
                    paid_at=now if status == "paid" else None,
                )
            ).inserted_primary_key
            assert row_id is not None
            row = conn.execute(sa.select(pos_payment_t).where(pos_payment_t.c.id == row_id[0]))
            return _attempt(row.one())

    async def update(self, attempt_id: int, **values: Any) -> Attempt:
        return await self.journal._run(self._update, attempt_id, values)

    def _update(self, attempt_id: int, values: dict[str, Any]) -> Attempt:
        now = self.clock.now()
        if values.get("status") == "paid":
            values.setdefault("paid_at", now)
        if values.get("status") in ("paid", "declined", "failed", "abandoned"):
            values["auth_code"] = None  # a settled attempt keeps no payment code
        with self.journal.engine.begin() as conn:
            conn.execute(
                pos_payment_t.update()
                .where(pos_payment_t.c.id == attempt_id)
                .values(**values, updated_at=now)
            )
            row = conn.execute(sa.select(pos_payment_t).where(pos_payment_t.c.id == attempt_id))
            return _attempt(row.one())

    async def upload_state(self, sale_id: str) -> str:
        """``sent`` (HQ answered the sale's upload), ``pending`` or ``refused`` (by HQ)."""
        return await self.journal._run(self._upload_state, sale_id)

    def _upload_state(self, sale_id: str) -> str:
        with self.journal.engine.connect() as conn:
            rejected = conn.scalar(
                sa.select(outbox_t.c.rejected).where(outbox_t.c.sale_id == sale_id).limit(1)
            )
        if rejected is None:
            return "sent"
        return "refused" if rejected else "pending"

    async def outbox_payload(self, sale_id: str) -> dict[str, Any] | None:
        """The sale as its upload waiting in the outbox carries it (None: not waiting)."""
        return await self.journal._run(self._outbox_payload, sale_id)

    def _outbox_payload(self, sale_id: str) -> dict[str, Any] | None:
        with self.journal.engine.connect() as conn:
            text = conn.scalar(
                sa.select(outbox_t.c.payload).where(outbox_t.c.sale_id == sale_id).limit(1)
            )
        return json.loads(text) if text else None

    async def pending_cash(self, limit: int) -> list[Attempt]:
        """Cash not yet taken by HQ (refused ones apart) whose sale HQ holds, oldest first."""
        return await self.journal._run(self._pending_cash, limit)

    def _pending_cash(self, limit: int) -> list[Attempt]:
        in_outbox = (
            sa.exists()
            .where(outbox_t.c.sale_id == pos_payment_t.c.sale_id)
            .correlate(pos_payment_t)
        )
        with self.journal.engine.connect() as conn:
            rows = conn.execute(
                sa.select(pos_payment_t)
                .where(
                    pos_payment_t.c.method == "cash",
                    pos_payment_t.c.status == "paid",
                    pos_payment_t.c.uploaded_at.is_(None),
                    pos_payment_t.c.upload_rejected.is_(False),
                    ~in_outbox,
                )
                .order_by(pos_payment_t.c.id)
                .limit(limit)
            )
            return [_attempt(r) for r in rows]

    async def cash_answered(
        self, uploaded: Sequence[int], refused: dict[int, str], tried: Sequence[int]
    ) -> None:
        """HQ's answer to a cash upload: ``uploaded`` are never sent again, ``refused`` (id →
        HQ's reason) stay, marked, for a person to look at; every one ``tried`` counts."""
        await self.journal._run(self._cash_answered, list(uploaded), refused, list(tried))

    def _cash_answered(
        self, uploaded: list[int], refused: dict[int, str], tried: list[int]
    ) -> None:
        now = self.clock.now()
        with self.journal.engine.begin() as conn:
            if tried:
                conn.execute(
                    pos_payment_t.update()
                    .where(pos_payment_t.c.id.in_(tried))
                    .values(upload_attempts=pos_payment_t.c.upload_attempts + 1)
                )
            if uploaded:
                conn.execute(
                    pos_payment_t.update()
                    .where(pos_payment_t.c.id.in_(uploaded))
                    .values(uploaded_at=now, upload_error=None)
                )
            for row_id, reason in refused.items():
                conn.execute(
                    pos_payment_t.update()
                    .where(pos_payment_t.c.id == row_id)
                    .values(upload_rejected=True, upload_error=reason[:2000])
                )

    async def cash_usage(self) -> tuple[int, int]:
        """(cash records waiting for HQ, cash records HQ refused)."""
        return await self.journal._run(self._cash_usage)

    def _cash_usage(self) -> tuple[int, int]:
        with self.journal.engine.connect() as conn:
            row = conn.execute(
                sa.select(
                    sa.func.count(),
                    sa.func.coalesce(
                        sa.func.sum(sa.case((pos_payment_t.c.upload_rejected, 1), else_=0)), 0
                    ),
                ).where(
                    pos_payment_t.c.method == "cash",
                    pos_payment_t.c.status == "paid",
                    pos_payment_t.c.uploaded_at.is_(None),
                )
            ).one()
        total, rejected = int(row[0]), int(row[1])
        return total - rejected, rejected


# --- HQ -------------------------------------------------------------------------------------


class PosHq:
    """HQ's payments API as the edge calls it: a payment with the cashier's own token, its
    order read back, the cash batch and the staff-token keys with the station's credential."""

    def __init__(
        self,
        base_url: str,
        station: str,
        credential: str,
        timeout_s: float,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.station = station
        self._credential = credential
        self._client = httpx.AsyncClient(
            base_url=base_url,
            timeout=timeout_s,
            transport=transport
            or httpx.AsyncHTTPTransport(
                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
            ),
        )

    async def close(self) -> None:
        await self._client.aclose()

    @property
    def _station(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self._credential}"}

    async def _traced(
        self,
        name: str,
        method: str,
        path: str,
        headers: dict[str, str],
        *,
        traceparent: str | None = None,
        json_body: Any = None,
        attributes: dict[str, str | int] | None = None,
    ) -> httpx.Response:
        """One call of HQ in a client span (a child of the current span, else of
        ``traceparent``), which the request's ``traceparent`` names."""
        with client_span(
            name,
            traceparent=traceparent,
            attributes={"http.request.method": method, "url.path": path, **(attributes or {})},
            tracer_name=TRACER_NAME,
        ) as span:
            response = await self._client.request(
                method, path, json=json_body, headers={**headers, **current_trace_headers()}
            )
            span.set_attribute("http.response.status_code", response.status_code)
            return response

    async def charge(
        self, token: str, key: str, body: dict[str, Any], traceparent: str | None
    ) -> httpx.Response:
        return await self._traced(
            "edge.hq.charge",
            "POST",
            f"/v1/stations/{self.station}/payments",
            {"authorization": f"Bearer {token}", "idempotency-key": key},
            traceparent=traceparent,
            json_body=body,
            attributes={"payment.idempotency_key": key},
        )

    async def order(self, token: str, order_id: str, traceparent: str | None) -> httpx.Response:
        return await self._traced(
            "edge.hq.order",
            "GET",
            f"/v1/stations/{self.station}/payments/{order_id}",
            {"authorization": f"Bearer {token}"},
            traceparent=traceparent,
            attributes={"payment.order_id": order_id},
        )

    async def upload_cash(self, payments: list[dict[str, Any]]) -> httpx.Response:
        return await self._traced(
            "edge.hq.cash_upload",
            "POST",
            f"/v1/stations/{self.station}/payments/cash",
            self._station,
            json_body={"payments": payments},
            attributes={"payment.count": len(payments)},
        )

    async def staff_keys(self) -> Any:
        response = await self._client.get("/v1/auth/keys", headers=self._station)
        response.raise_for_status()
        return response.json()


def _not_sent(exc: httpx.HTTPError) -> bool:
    """The request never reached HQ: nothing can have been charged."""
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


def _error(response: httpx.Response) -> tuple[str, str, dict[str, Any]]:
    """(code, message, details) of HQ's error envelope (the bare status otherwise)."""
    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
        error = response.json()["error"]
        return (
            str(error["code"]),
            str(error.get("message", "")),
            dict(error.get("details") or {}),
        )
    return f"http_{response.status_code}", response.text[:200], {}


def _order(response: httpx.Response) -> dict[str, Any]:
    with contextlib.suppress(ValueError, TypeError):
        body = response.json()
        if isinstance(body, dict):
            return body
    return {}


# --- the service ----------------------------------------------------------------------------


class PosService:
    """What the POS routes do: the unpaid sales, a sale's payments, a payment."""

    def __init__(
        self,
        store: PosStore,
        hq: PosHq,
        controllers: Callable[[], Sequence[ForecourtController]],
        *,
        wake_sync: Callable[[], None],
        wake_upload: Callable[[], None],
        upload_sales: Callable[[list[dict[str, Any]]], Awaitable[httpx.Response]] | None = None,
        payment_wait_s: float,
        flush_timeout_s: float,
        poll_interval_s: float = 0.5,
    ) -> None:
        self.store = store
        self.hq = hq
        self.controllers = controllers
        self.wake_sync = wake_sync
        self.wake_upload = wake_upload
        self.upload_sales = upload_sales
        self.payment_wait_s = payment_wait_s
        self.flush_timeout_s = flush_timeout_s
        self.poll_interval_s = poll_interval_s
        self._locks: dict[str, asyncio.Lock] = {}
        self._waiting: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def _sale_lock(self, sale_id: str) -> AsyncIterator[None]:
        """One payment of a sale at a time (two terminals, a double tap)."""
        lock = self._locks.setdefault(sale_id, asyncio.Lock())
        self._waiting[sale_id] = self._waiting.get(sale_id, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._waiting[sale_id] -= 1
            if not self._waiting[sale_id]:
                del self._waiting[sale_id]
                self._locks.pop(sale_id, None)

    async def _sale(self, sale_id: str) -> PosSale:
        sale = await self.store.sale(sale_id)
        if sale is None:
            raise SaleUnknown(f"no sale {sale_id} in this station's journal", sale_id=sale_id)
        return sale

    @staticmethod
    def sale_json(sale: PosSale, attempts: Sequence[Attempt]) -> dict[str, Any]:
        if any(a.status == "paid" for a in attempts):
            status = "paid"
        elif any(a.status in OPEN_STATES for a in attempts):
            status = "in_progress"
        else:
            status = "unpaid"
        return {
            "sale_id": sale.sale_id,
            "pump": sale.pump,
            "nozzle": sale.nozzle,
            "grade": sale.grade,
            "volume_ml": sale.volume_ml,
            "amount_fen": sale.amount_minor,
            "currency": sale.currency,
            "ended_at": sale.ended_at.isoformat() if sale.ended_at else None,
            "payment_status": status,
            "attempts": [a.as_json() for a in attempts],
        }

    async def unpaid(self, pump: int | None, limit: int) -> list[dict[str, Any]]:
        return [self.sale_json(s, a) for s, a in await self.store.unpaid(pump, limit)]

    async def sale_view(self, sale_id: str) -> dict[str, Any]:
        sale = await self._sale(sale_id)
        return self.sale_json(sale, await self.store.attempts(sale_id))

    async def pay(
        self,
        principal: Principal,
        token: str,
        sale_id: str,
        request: CodePay | CashPay,
        traceparent: str | None,
    ) -> tuple[int, dict[str, Any]]:
        """(HTTP status, answer) of a payment of the sale: 200 paid, 202 still open."""
        async with self._sale_lock(sale_id):
            sale = await self._sale(sale_id)
            if sale.dispense_type != "sale":
                raise SaleNotPayable(
                    f"sale {sale_id} is a {sale.dispense_type}, not a sale to pay",
                    sale_id=sale_id,
                )
            if isinstance(request, CashPay):
                attempt = await self._cash(principal, sale, request.tendered_fen)
            else:
                attempt = await self._code(principal, token, sale, request, traceparent)
            released = False
            if attempt.status == "paid":
                await self.store.journal.record_audit(
                    actor=principal.actor,
                    action="pos.payment",
                    target=f"fp:{sale.pump}",
                    details={
                        "sale_id": sale.sale_id,
                        "method": attempt.method,
                        "attempt": attempt.attempt,
                        "amount_fen": attempt.amount_minor,
                        "order_id": attempt.order_id,
                    },
                )
                released = await self._release(sale)
            attempts = await self.store.attempts(sale_id)
        annotate(
            {
                "pos.payment.attempt": attempt.attempt,
                "pos.payment.status": attempt.status,
                "payment.order_id": attempt.order_id,
            }
        )
        body = {
            "sale": self.sale_json(sale, attempts),
            "payment": attempt.as_json(),
            "change_fen": attempt.change_minor,
            "pump_released": released,
            "trace_id": current_trace_id(),
        }
        return (200 if attempt.status == "paid" else 202), body

    async def _cash(self, principal: Principal, sale: PosSale, tendered: int) -> Attempt:
        if tendered < sale.amount_minor:
            raise TenderShort(
                f"{tendered} fen tendered for a sale of {sale.amount_minor} fen",
                sale_id=sale.sale_id,
                amount_fen=sale.amount_minor,
                tendered_fen=tendered,
            )
        attempt = await self.store.new_attempt(
            sale, "cash", status="paid", cashier=principal.subject, tendered_minor=tendered
        )
        log.info(
            "edge.pos_cash_recorded",
            sale_id=sale.sale_id,
            attempt=attempt.attempt,
            amount_fen=sale.amount_minor,
            change_fen=attempt.change_minor,
            cashier=principal.subject,
        )
        self.wake_upload()
        return attempt

    async def _code(
        self,
        principal: Principal,
        token: str,
        sale: PosSale,
        request: CodePay,
        traceparent: str | None,
    ) -> Attempt:
        attempts = await self.store.attempts(sale.sale_id)
        if any(a.status == "paid" for a in attempts):
            raise SaleAlreadyPaid(f"sale {sale.sale_id} is paid", sale_id=sale.sale_id)
        current = next((a for a in attempts if a.status in OPEN_STATES), None)
        if current is not None and current.method != "code":  # never: cash is paid at once
            raise PaymentInProgress(f"sale {sale.sale_id} has a payment in progress")
        if current is None:
            current = await self.store.new_attempt(
                sale, "code", status="unsent", cashier=principal.subject, auth_code=None
            )
        if current.status == "pending" and current.order_id:
            return await self._poll(token, current, traceparent)
        await self._flush(sale.sale_id)
        # An attempt that may have reached HQ is sent again exactly as it was (HQ replays
        # its answer under the key); one that never did takes the code scanned now.
        code = current.auth_code if current.status == "unknown" and current.auth_code else None
        attempt = await self._submit(token, sale, current, code or request.auth_code, traceparent)
        log.info(
            "edge.pos_code_payment",
            sale_id=sale.sale_id,
            attempt=attempt.attempt,
            status=attempt.status,
            order_id=attempt.order_id,
        )
        return attempt

    async def _flush(self, sale_id: str) -> None:
        """The sale's upload has reached HQ (HQ takes no payment of a sale it lacks): a sale
        still in the outbox is uploaded now, on its own, and HQ's verdict recorded as the
        upload agent records it (HQ takes a sale uploaded twice as a duplicate)."""
        state = await self.store.upload_state(sale_id)
        if state == "sent":
            return
        if state == "refused":
            raise SaleNotPayable(
                f"HQ refused the upload of sale {sale_id}: it cannot be paid by code there",
                sale_id=sale_id,
                hint="take the payment in cash",
            )
        self.wake_sync()
        payload = await self.store.outbox_payload(sale_id)
        if payload is None or self.upload_sales is None:
            return  # uploaded meanwhile (or HQ says so when asked to charge)
        try:
            response = await asyncio.wait_for(self.upload_sales([payload]), self.flush_timeout_s)
        except (httpx.HTTPError, TimeoutError) as exc:
            log.warning("edge.pos_flush_failed", sale_id=sale_id, error=repr(exc))
            raise HqUnreachable(
                "HQ cannot be reached: the sale cannot be uploaded for a code payment",
                sale_id=sale_id,
                hint=HQ_HINT,
            ) from None
        verdict: dict[str, Any] = {}
        with contextlib.suppress(ValueError, KeyError, TypeError, IndexError):
            verdict = dict(response.json()["results"][0])
        status = str(verdict.get("status", f"http_{response.status_code}"))
        if response.status_code == 200 and status in _HQ_HOLDS_SALE:
            flags = [str(f) for f in verdict.get("flags") or []]
            await self.store.journal.record_answers([(sale_id, status, flags)])
            return
        if status == "refused":
            raise SaleNotPayable(f"HQ refused the upload of sale {sale_id}", sale_id=sale_id)
        raise SaleNotUploaded(
            f"the upload of sale {sale_id} to HQ did not go through ({status})",
            sale_id=sale_id,
            hint=HQ_HINT,
        )

    async def _submit(
        self,
        token: str,
        sale: PosSale,
        attempt: Attempt,
        auth_code: str,
        traceparent: str | None,
    ) -> Attempt:
        # Committed before the call: an edge that dies in it finds the attempt unknown.
        attempt = await self.store.update(attempt.id, status="unknown", auth_code=auth_code)
        body = {
            "sale_id": sale.sale_id,
            "amount_fen": sale.amount_minor,
            "currency": sale.currency,
            "method": "code",
            "auth_code": auth_code,
        }
        try:
            response = await self.hq.charge(token, attempt.idempotency_key, body, traceparent)
        except httpx.HTTPError as exc:
            if _not_sent(exc):
                await self.store.update(attempt.id, status="unsent", reason=f"{type(exc).__name__}")
                log.warning("edge.pos_hq_unreachable", sale_id=sale.sale_id, error=str(exc))
                raise HqUnreachable(
                    "HQ cannot be reached: nothing was charged",
                    sale_id=sale.sale_id,
                    attempt=attempt.attempt,
                    hint=HQ_HINT,
                ) from None
            await self.store.update(attempt.id, reason=f"no answer: {type(exc).__name__}")
            log.warning("edge.pos_payment_outcome_unknown", sale_id=sale.sale_id, error=str(exc))
            raise OutcomeUnknown(
                "HQ did not answer in time: the payment may have gone through; ask for it "
                "again to learn its outcome (the same attempt, never charged twice)",
                sale_id=sale.sale_id,
                attempt=attempt.attempt,
            ) from None
        return await self._answered(token, sale, attempt, response, traceparent)

    async def _answered(
        self,
        token: str,
        sale: PosSale,
        attempt: Attempt,
        response: httpx.Response,
        traceparent: str | None,
    ) -> Attempt:
        status = response.status_code
        if status in (200, 201, 202):
            order = _order(response)
            attempt = await self._apply_order(attempt, order)
            if attempt.status == "pending":
                return await self._poll(token, attempt, traceparent)
            return self._settled(attempt, order)
        code, message, details = _error(response)
        if status == 402:
            await self.store.update(attempt.id, status="declined", reason=f"{code}: {message}")
            raise PaymentDeclined(
                message or "the payment was declined",
                sale_id=sale.sale_id,
                attempt=attempt.attempt,
                hq_code=code,
                provider_code=details.get("provider_code"),
            )
        if code in ("idempotency.in_progress", "idempotency.recovering"):
            await self.store.update(attempt.id, reason=f"{code}: {message}")
            return attempt  # HQ is still at it: the attempt stays unknown (202)
        if code == "payments.key_conflict" and details.get("order_id"):
            attempt = await self.store.update(
                attempt.id, status="pending", order_id=str(details["order_id"])
            )
            return await self._poll(token, attempt, traceparent)
        if status >= 500 or status in (408, 429):
            await self.store.update(attempt.id, reason=f"{code}: {message}")
            raise ProviderUnreachable(
                f"HQ could not take the payment now ({code}): {message}",
                sale_id=sale.sale_id,
                attempt=attempt.attempt,
                hq_code=code,
                hint="take the payment in cash, or try again (the same attempt)",
            )
        await self.store.update(attempt.id, status="failed", reason=f"{code}: {message}")
        raise PaymentRefused(
            f"HQ refused the payment ({code}): {message}",
            sale_id=sale.sale_id,
            attempt=attempt.attempt,
            hq_status=status,
            hq_code=code,
            hq_details=details,
        )

    async def _apply_order(self, attempt: Attempt, order: dict[str, Any]) -> Attempt:
        """HQ's order as the attempt's status."""
        state = str(order.get("state", ""))
        order_id = order.get("order_id")
        values: dict[str, Any] = {"order_id": str(order_id) if order_id else attempt.order_id}
        if state in _HQ_PAID:
            values["status"] = "paid"
        elif state in _HQ_DECLINED:
            values["status"] = "declined"
            values["reason"] = (
                f"{state}: {order.get('failure_message') or order.get('failure_code')}"
            )
        elif values["order_id"]:
            values["status"] = "pending"
        return await self.store.update(attempt.id, **values)

    def _settled(self, attempt: Attempt, order: dict[str, Any]) -> Attempt:
        if attempt.status == "declined":
            raise PaymentDeclined(
                f"the payment was not taken ({attempt.reason})",
                sale_id=attempt.sale_id,
                attempt=attempt.attempt,
                provider_code=order.get("failure_code"),
            )
        return attempt

    async def _poll(self, token: str, attempt: Attempt, traceparent: str | None) -> Attempt:
        """Read HQ's order until it settles or ``payment_wait_s`` passes (then it stays
        pending: 202, ask again)."""
        assert attempt.order_id is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.payment_wait_s
        while True:
            try:
                response = await self.hq.order(token, attempt.order_id, traceparent)
            except httpx.HTTPError as exc:
                raise HqUnreachable(
                    "HQ cannot be reached to learn the payment's outcome: ask again",
                    sale_id=attempt.sale_id,
                    attempt=attempt.attempt,
                    hint="the payment is still open: cash is refused until its outcome is known",
                ) from exc
            if response.status_code == 200:
                order = _order(response)
                attempt = await self._apply_order(attempt, order)
                if attempt.status != "pending":
                    return self._settled(attempt, order)
            if loop.time() + self.poll_interval_s > deadline:
                return attempt
            await asyncio.sleep(self.poll_interval_s)

    async def _release(self, sale: PosSale) -> bool:
        """Close the paid sale at its pump when the pump still holds it (True then)."""
        for controller in self.controllers():
            held = controller._open.get(sale.pump)
            if held is None or held.sale_id != sale.sale_id:
                continue
            async with controller.lock:
                if controller._open.get(sale.pump) is not held:
                    return False
                await controller._close(held)
                released = controller._open.get(sale.pump) is not held
            log.info("edge.pos_pump_released", pump=sale.pump, sale_id=sale.sale_id, ok=released)
            return released
        return False


# --- the cash upload ------------------------------------------------------------------------


@dataclass
class CashUploadStats:
    uploaded: int = 0
    duplicates: int = 0
    refused: int = 0
    failures: int = 0
    last_error: str | None = None


class CashUploader(BackgroundService):
    """Uploads the cash taken at the counter to HQ, each record once, backing off (full
    jitter) while HQ fails."""

    task_name = "edge-pos-cash"

    def __init__(
        self,
        store: PosStore,
        hq: PosHq,
        *,
        batch_size: int = 100,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 60.0,
        idle_s: float = 0.5,
    ) -> None:
        self.store = store
        self.hq = hq
        self.batch_size = batch_size
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.idle_s = idle_s
        self.wake = asyncio.Event()
        self.stats = CashUploadStats()
        self._failed = 0

    async def upload_once(self) -> int:
        """One batch; how many records HQ gave its verdict on (0: idle, or it failed)."""
        items = await self.store.pending_cash(self.batch_size)
        if not items:
            return 0
        payload = [
            {
                "idempotency_key": a.idempotency_key,
                "sale_id": a.sale_id,
                "amount_fen": a.amount_minor,
                "currency": a.currency,
                "recorded_at": (a.paid_at or a.created_at).isoformat(),
                "cashier": a.cashier[:64],
            }
            for a in items
        ]
        tried = [a.id for a in items]
        try:
            response = await self.hq.upload_cash(payload)
        except httpx.HTTPError as exc:
            return await self._failure(tried, f"HQ unreachable: {type(exc).__name__}: {exc}")
        if response.status_code != 200:
            code, message, _ = _error(response)
            return await self._failure(tried, f"HTTP {response.status_code} {code}: {message}")
        results = _order(response).get("results")
        if not isinstance(results, list) or len(results) != len(items):
            return await self._failure(tried, "HQ's answer has no result per record")
        by_key = {a.idempotency_key: a for a in items}
        uploaded: list[int] = []
        refused: dict[int, str] = {}
        for result in results:
            item = (
                by_key.get(str(result.get("idempotency_key"))) if isinstance(result, dict) else None
            )
            if item is None:
                return await self._failure(tried, "HQ's answer names a record not sent")
            status = result.get("status")
            if status in ("created", "duplicate"):
                uploaded.append(item.id)
                self.stats.duplicates += status == "duplicate"
            elif status == "refused":
                error = result.get("error") or {}
                if isinstance(error, dict) and error.get("code") == "payments.sale_unknown":
                    continue  # not at HQ yet: sent again later
                refused[item.id] = f"refused by HQ: {json.dumps(error, default=str)}"
                log.error("edge.pos_cash_refused", sale_id=item.sale_id, error=error)
        await self.store.cash_answered(uploaded, refused, tried)
        self.stats.uploaded += len(uploaded)
        self.stats.refused += len(refused)
        self._failed = 0
        self.stats.last_error = None
        return len(uploaded) + len(refused)

    async def _failure(self, tried: list[int], error: str) -> int:
        await self.store.cash_answered([], {}, tried)
        self.stats.failures += 1
        self.stats.last_error = error
        self._failed += 1
        log.warning("edge.pos_cash_upload_failed", error=error, attempt=self._failed)
        return 0

    def backoff(self) -> float:
        cap = min(self.backoff_max_s, self.backoff_initial_s * 2 ** min(self._failed, 20))
        return random.uniform(0, cap)

    async def run(self) -> None:
        while True:
            try:
                done = await self.upload_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any one failure
                log.exception("edge.pos_cash_error", error=str(exc))
                self._failed += 1
                done = 0
            if done:
                continue
            if self._failed:
                await asyncio.sleep(self.backoff())
            else:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=self.idle_s)


# --- the routes -----------------------------------------------------------------------------

SaleId = Annotated[str, Path(pattern=r"^[0-9a-fA-F-]{36}$", description="the journal's sale_id")]


def build_router(service: PosService) -> APIRouter:
    """``/v1/pos``: a cashier's staff token holding ``payments:charge`` over this station."""
    router = APIRouter(tags=["pos"])
    charge = [require(CHARGE)]

    def cashier(request: Request) -> tuple[Principal, str]:
        principal: Principal = request.state.principal
        _, _, token = request.headers.get("authorization", "").partition(" ")
        return principal, token.strip()

    @router.get(
        "/v1/pos/sales",
        response_model=list[SaleOut],
        dependencies=charge,
        responses=error_responses(401, 403, 422),
    )
    async def sales(
        unpaid: Annotated[bool, Query(description="only sales not paid (the only list)")] = True,
        pump: Annotated[int | None, Query(ge=1, le=999)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
    ) -> list[dict[str, Any]]:
        """The finished sales of the journal not paid yet, newest first (``pump``: of one
        pump), each with its payment attempts."""
        if not unpaid:
            raise InvalidValue("only the unpaid sales are listed here: unpaid=true")
        return await service.unpaid(pump, limit)

    @router.get(
        "/v1/pos/sales/{sale_id}",
        response_model=SaleOut,
        dependencies=charge,
        responses=error_responses(401, 403, 404, 422),
    )
    async def sale(sale_id: SaleId) -> dict[str, Any]:
        """A sale with its payment status and every payment attempt."""
        return await service.sale_view(sale_id.lower())

    @router.post(
        "/v1/pos/sales/{sale_id}/pay",
        response_model=PayOut,
        dependencies=charge,
        responses={
            200: {"model": PayOut, "description": "Paid (cash: with the change to hand back)"},
            202: {
                "model": PayOut,
                "description": "Not settled yet (the payer is confirming, or HQ is still at "
                "it): ask again, the same attempt is polled, never charged twice",
            },
            **error_responses(401, 402, 403, 404, 409, 422, 503),
        },
    )
    async def pay(sale_id: SaleId, body: PayRequest, request: Request) -> Any:
        """Pay the sale, of the amount journaled: ``{"method": "code", "auth_code": ...}``
        (sent to HQ: 402 ``pos.payment_declined``, 503 ``pos.hq_unreachable`` at once when
        HQ cannot be reached — cash still works) or ``{"method": "cash", "tendered_fen":
        N}`` (recorded here, offline too; uploaded to HQ later). 409 ``pos.sale_paid`` for a
        paid sale, ``pos.payment_in_progress`` while a code payment's outcome is open."""
        principal, token = cashier(request)
        # The payment's server span: the terminal's trace continued (or the one this answer
        # announces started); every line logged meanwhile carries its trace id.
        with request_span(
            request,
            "edge.pos.pay",
            attributes={
                "pos.sale_id": sale_id.lower(),
                "pos.payment.method": body.method,
                "payment.station": service.hq.station,
            },
            tracer_name=TRACER_NAME,
        ) as span:
            status, answer = await service.pay(
                principal, token, sale_id.lower(), body, request.headers.get("traceparent")
            )
            span.set_attribute("http.response.status_code", status)
        return JSONResponse(answer, status_code=status)

    return router
