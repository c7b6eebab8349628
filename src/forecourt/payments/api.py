"""HTTP routes of ``payments``: counter payments, refunds, voids, provider notifications and
the cash an edge took while HQ was away."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Path, Query, Request, Response
from opentelemetry.trace import Span
from opentelemetry.util.types import AttributeValue
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt

from forecourt.infra.access import require, source_of
from forecourt.infra.http import error_responses
from forecourt.infra.idempotency import IdempotencyKey, KeyInvalid, idempotent
from forecourt.kernel.access import Permission, Policy, PrincipalKind
from forecourt.payments.domain import MAX_ORDER_FEN, OrderState
from forecourt.payments.handlers import (
    CashItem,
    ChargeRequest,
    PaymentsService,
    order_json,
    refund_json,
)
from forecourt.payments.tracing import TRACER_NAME, request_span

USERS = frozenset({PrincipalKind.USER})
STATION = "path:station_code"
# The edge forwards the cashier's own staff token: the cashier, not the station, pays.
CHARGE = Policy(Permission.PAYMENTS_CHARGE, station=STATION, kinds=USERS)
READ = Policy(Permission.PAYMENTS_READ, station=STATION)
REFUND = Policy(Permission.PAYMENTS_REFUND, station=STATION, kinds=USERS)
VOID = Policy(Permission.PAYMENTS_VOID, station=STATION, kinds=USERS)
UPLOAD = Policy(
    Permission.PAYMENTS_UPLOAD, station=STATION, kinds=frozenset({PrincipalKind.STATION})
)
OPEN = Policy.open()

#: An order's key is kept in 200 characters (the idempotency record takes 255).
MAX_ORDER_KEY = 200
CODE_LENGTH = 40
StationCode = Annotated[str, Path(min_length=1, max_length=CODE_LENGTH, pattern=r"^[^\x00-\x1f]+$")]
Text = Annotated[str, Field(pattern=r"^[^\x00-\x1f]*$")]
Amount = Annotated[StrictInt, Field(ge=1, le=MAX_ORDER_FEN)]
READ_ERRORS = error_responses(401, 403, 404, 422, 429)
MONEY_ERRORS = error_responses(400, 401, 403, 404, 409, 413, 422, 429, 503)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChargeIn(_Body):
    """A counter payment of one sale: the sale's whole due amount, in fen."""

    sale_id: UUID
    amount_fen: Amount
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$", description="CNY only")]
    method: Literal["code", "cash"]
    auth_code: Annotated[
        str | None,
        Field(
            pattern=r"^[0-9]{16,24}$",
            description="the payer's scanned payment code (method code): WeChat Pay 18 "
            "digits from 10-15, Alipay 16-24 digits from 25-30",
        ),
    ] = None


class RefundIn(_Body):
    amount_fen: Annotated[
        Amount | None, Field(description="part of the order; left out: all still refundable")
    ] = None
    reason: Annotated[Text, Field(max_length=200)] = ""


class VoidIn(_Body):
    reason: Annotated[Text, Field(max_length=200)] = ""


class CashPaymentIn(_Body):
    idempotency_key: Annotated[str, Field(pattern=r"^[ -~]{1,200}$")]
    sale_id: UUID
    amount_fen: Amount
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")]
    recorded_at: AwareDatetime
    cashier: Annotated[Text, Field(min_length=1, max_length=64)]


class CashUploadIn(_Body):
    payments: Annotated[list[CashPaymentIn], Field(min_length=1, max_length=500)]


class PaymentOut(BaseModel):
    order_id: UUID
    station: str
    sale_id: UUID
    tender: Literal["wechat", "alipay", "cash"]
    method: Literal["code", "cash"]
    amount_fen: int
    currency: str
    state: OrderState
    awaiting_payer: bool
    out_trade_no: str | None
    provider_trade_no: str | None
    paid_at: datetime | None
    refunded_fen: int
    refund_pending_fen: int
    refundable_fen: int
    failure_code: str | None
    failure_message: str | None
    actor: str
    created_at: datetime
    updated_at: datetime


class PaymentList(BaseModel):
    items: list[PaymentOut]
    next_after: UUID | None


class RefundOut(BaseModel):
    refund_id: UUID
    order_id: UUID
    out_refund_no: str
    amount_fen: int
    state: Literal["requested", "processing", "unknown", "succeeded", "refused"]
    reason: str
    actor: str
    provider_refund_no: str | None
    failure_code: str | None
    created_at: datetime
    updated_at: datetime
    order: PaymentOut


class CashResult(BaseModel):
    index: int
    idempotency_key: str
    status: Literal["created", "duplicate", "refused"]
    order_id: UUID | None
    error: dict[str, Any] | None


class CashUploadOut(BaseModel):
    station: str
    results: list[CashResult]


def _model(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"model": model, "description": description}


def _station_key(prefix: str) -> Any:
    def scope(request: Request) -> str:
        params = request.path_params
        parts = [prefix, str(params.get("station_code", ""))]
        if "order_id" in params:
            parts.append(str(params["order_id"]))
        return "/".join(parts)

    return scope


def _order_key(key: IdempotencyKey) -> None:
    if len(key.key) > MAX_ORDER_KEY:
        raise KeyInvalid(f"a payment's Idempotency-Key is at most {MAX_ORDER_KEY} characters")


@contextmanager
def _command_span(
    request: Request, name: str, station: str, **attributes: AttributeValue
) -> Iterator[Span]:
    """The server span of one payment command, continuing the caller's trace."""
    with request_span(
        request,
        name,
        attributes={"payment.station": station, **attributes},
        tracer_name=TRACER_NAME,
    ) as span:
        yield span


def _answered(span: Span, response: Response) -> Response:
    span.set_attribute("http.response.status_code", response.status_code)
    return response


def build_router(service: PaymentsService) -> APIRouter:
    router = APIRouter(tags=["payments"])
    charge_key = idempotent(
        _station_key("payments.charge"),
        lambda _request: service.db,
        recovery=service.recover_charge,
    )
    refund_key = idempotent(
        _station_key("payments.refund"),
        lambda _request: service.db,
        recovery=service.recover_refund,
    )

    @router.post(
        "/v1/stations/{station_code}/payments",
        status_code=201,
        response_model=None,
        dependencies=[require(CHARGE)],
        responses={
            201: _model(PaymentOut, "Paid"),
            202: _model(
                PaymentOut,
                "Not settled yet (pending: the payer is confirming; unknown: the provider "
                "did not answer): HQ finishes it; read the order (Location) again",
            ),
            **error_responses(402),
            **MONEY_ERRORS,
        },
    )
    async def charge(
        station_code: StationCode,
        body: ChargeIn,
        request: Request,
        key: IdempotencyKey = charge_key,
    ) -> Response:
        """Take the payment of one sale at the counter, by the payer's payment code (WeChat
        Pay or Alipay, by the code's prefix) or in cash. The sale must be known at HQ (404
        ``payments.sale_unknown``: the edge uploads it first) and the amount be what it is
        due (422 ``payments.amount_mismatch``); a sale already paid is 409. Answers 201
        paid, 202 pending or unknown (never charge again under a new key: a retry with the
        same key replays the answer), 402 ``payments.declined`` with the provider's code."""
        _order_key(key)
        with _command_span(
            request,
            "payments.charge",
            station_code,
            **{"payment.sale_id": str(body.sale_id), "payment.method": body.method},
        ) as span:
            return _answered(
                span,
                await service.charge(
                    ChargeRequest(
                        station=station_code,
                        sale_id=body.sale_id,
                        amount_fen=body.amount_fen,
                        currency=body.currency,
                        method=body.method,
                        auth_code=body.auth_code,
                        actor=request.state.principal.actor,
                    ),
                    key,
                ),
            )

    @router.get(
        "/v1/stations/{station_code}/payments",
        response_model=PaymentList,
        dependencies=[require(READ)],
        responses=error_responses(401, 403, 422, 429),
    )
    async def list_payments(
        station_code: StationCode,
        sale_id: UUID | None = None,
        state: Annotated[list[OrderState] | None, Query()] = None,
        after: UUID | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
    ) -> dict[str, Any]:
        """The station's payment orders (of one sale, in some states), by order id."""
        orders = await service.orders(
            station_code, sale_id=sale_id, states=state or (), limit=limit, after=after
        )
        items = [order_json(o) for o in orders]
        more = len(items) == limit and sale_id is None
        return {"items": items, "next_after": items[-1]["order_id"] if more else None}

    @router.get(
        "/v1/stations/{station_code}/payments/{order_id}",
        response_model=PaymentOut,
        dependencies=[require(READ)],
        responses=READ_ERRORS,
    )
    async def get_payment(station_code: StationCode, order_id: UUID) -> dict[str, Any]:
        return order_json(await service.get(station_code, order_id))

    @router.get(
        "/v1/stations/{station_code}/payments/{order_id}/refunds",
        response_model=list[RefundOut],
        dependencies=[require(READ)],
        responses=READ_ERRORS,
    )
    async def list_refunds(station_code: StationCode, order_id: UUID) -> list[dict[str, Any]]:
        order = await service.get(station_code, order_id)
        return [refund_json(r, order) for r in await service.refunds(station_code, order_id)]

    @router.post(
        "/v1/stations/{station_code}/payments/{order_id}/refunds",
        status_code=201,
        response_model=None,
        dependencies=[require(REFUND)],
        responses={
            201: _model(RefundOut, "Refunded"),
            202: _model(RefundOut, "Accepted by the provider, not finished: HQ finishes it"),
            **MONEY_ERRORS,
        },
    )
    async def refund(
        station_code: StationCode,
        order_id: UUID,
        body: RefundIn,
        request: Request,
        key: IdempotencyKey = refund_key,
    ) -> Response:
        """Refund all or part of a paid order (not above what is still refundable: 422
        ``payments.refund_too_large``; one refund at a time, none on a failed or cancelled
        order: 409). A provider's refusal is 422 ``payments.refund_refused``."""
        _order_key(key)
        with _command_span(
            request, "payments.refund", station_code, **{"payment.order_id": str(order_id)}
        ) as span:
            return _answered(
                span,
                await service.refund(
                    station_code,
                    order_id,
                    amount_fen=body.amount_fen,
                    reason=body.reason,
                    actor=request.state.principal.actor,
                    key=key,
                ),
            )

    @router.post(
        "/v1/stations/{station_code}/payments/{order_id}/void",
        response_model=None,
        dependencies=[require(VOID)],
        responses={
            200: _model(PaymentOut, "Voided: cancelled (or being reversed already)"),
            202: _model(PaymentOut, "Being reversed at the provider: HQ finishes it"),
            **error_responses(400, 401, 403, 404, 409, 413, 422, 429, 503),
        },
    )
    async def void(
        station_code: StationCode, order_id: UUID, body: VoidIn, request: Request
    ) -> Response:
        """Void an order: a payment not settled yet (pending, unknown) is reversed at the
        provider; a payment of the same business day is handed back (cash) or refunded in
        full. Voiding a voided order answers it as it is."""
        with _command_span(
            request, "payments.void", station_code, **{"payment.order_id": str(order_id)}
        ) as span:
            return _answered(
                span,
                await service.void(
                    station_code, order_id, actor=request.state.principal.actor, reason=body.reason
                ),
            )

    @router.post(
        "/v1/stations/{station_code}/payments/cash",
        response_model=CashUploadOut,
        dependencies=[require(UPLOAD)],
        responses=error_responses(400, 401, 403, 413, 422, 429),
    )
    async def upload_cash(
        station_code: StationCode, body: CashUploadIn, request: Request
    ) -> dict[str, Any]:
        """The cash payments the station's edge took while HQ was away, each applied once
        (by its own idempotency key: a batch sent again answers ``duplicate``)."""
        items = [
            CashItem(
                idempotency_key=p.idempotency_key,
                sale_id=p.sale_id,
                amount_fen=p.amount_fen,
                currency=p.currency,
                recorded_at=p.recorded_at,
                cashier=p.cashier,
            )
            for p in body.payments
        ]
        with _command_span(
            request, "payments.cash_upload", station_code, **{"payment.count": len(items)}
        ):
            verdicts = await service.upload_cash(
                station_code, items, actor=request.state.principal.actor
            )
        return {
            "station": station_code,
            "results": [
                {
                    "index": v.index,
                    "idempotency_key": v.idempotency_key,
                    "status": v.status,
                    "order_id": str(v.order_id) if v.order_id else None,
                    "error": v.error,
                }
                for v in verdicts
            ],
        }

    for name in sorted(service.providers):
        _notify_route(router, service, name)
    return router


def _notify_route(router: APIRouter, service: PaymentsService, name: str) -> None:
    @router.post(
        f"/v1/payments/notify/{name}",
        dependencies=[require(OPEN)],
        response_model=None,
        responses={
            200: {"description": "Answered in the provider's own form"},
            204: {"description": "Accepted (WeChat Pay)"},
            404: {"description": "The provider is not configured"},
            500: {"description": "Refused (WeChat Pay's form: it sends it again)"},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"type": "object"}},
                    "application/x-www-form-urlencoded": {"schema": {"type": "object"}},
                },
            }
        },
        name=f"notify_{name}",
    )
    async def notify(request: Request) -> Response:
        """A payment or refund notification from the provider: believed only when its
        signature verifies (otherwise refused in the provider's form, and audited)."""
        body = await request.body()
        with request_span(
            request,
            "payments.notification",
            attributes={"payment.provider": name},
            tracer_name=TRACER_NAME,
        ) as span:
            return _answered(
                span,
                await service.notification(name, dict(request.headers), body, source_of(request)),
            )
