"""Payments decisions at their edges, against a provider whose answers the test scripts: the
recovery worker's deadlines and back-off, "no such trade" believed only after its grace, a
reverse refused handed to an operator, a key never charged twice, refunds never above what
was paid, voids on the business day only, notifications believed only for their own order.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
import sqlalchemy as sa
from fastapi import Response

from forecourt.infra.db import Database
from forecourt.infra.idempotency import IdempotencyKey
from forecourt.payments import store
from forecourt.payments.domain import (
    Event,
    IllegalTransition,
    OrderState,
    PaymentOrder,
    RefundState,
    Tender,
    out_trade_no,
    transition,
)
from forecourt.payments.handlers import (
    CashItem,
    ChargeRequest,
    KeyConflict,
    PaymentsConfig,
    PaymentsService,
    RefundNotAllowed,
    VoidRefused,
    charge_outcome,
)
from forecourt.payments.providers.base import (
    ChargeResult,
    ChargeStatus,
    Notification,
    NotificationKind,
    RefundResult,
    RefundStatus,
    ReverseResult,
    ReverseStatus,
)
from forecourt.payments.recovery import drive, recover_once

from . import wechat_support
from .hq_payments import PaymentsHq, Sims, payments_hq, running_sims
from .test_order_machine import T0
from .test_order_machine import order as domain_order

AMOUNT = 30200
#: the same key met again once its reservation is gone (expired, purged)
AGAIN = "payments.charge/S001/again"


@dataclass
class ScriptedProvider:
    """A provider answering each call with the next scripted answer (the last one repeats),
    recording the calls."""

    name: str = "wechat"
    charges: list[ChargeResult] = field(default_factory=lambda: [ChargeResult()])
    queries: list[ChargeResult] = field(default_factory=lambda: [ChargeResult()])
    reverses: list[ReverseResult] = field(default_factory=lambda: [ReverseResult()])
    refunds: list[RefundResult] = field(default_factory=lambda: [RefundResult()])
    refund_queries: list[RefundResult] = field(default_factory=lambda: [RefundResult()])
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @staticmethod
    def _next(script: list[Any]) -> Any:
        return script.pop(0) if len(script) > 1 else script[0]

    def count(self, method: str) -> int:
        return sum(1 for m, _ in self.calls if m == method)

    async def charge_by_code(self, **kw: Any) -> ChargeResult:
        self.calls.append(("charge", kw))
        return replace(self._next(self.charges), out_trade_no=kw["out_trade_no"])

    async def query(self, out_trade_no: str) -> ChargeResult:
        self.calls.append(("query", {"out_trade_no": out_trade_no}))
        return replace(self._next(self.queries), out_trade_no=out_trade_no)

    async def reverse(self, out_trade_no: str) -> ReverseResult:
        self.calls.append(("reverse", {"out_trade_no": out_trade_no}))
        return replace(self._next(self.reverses), out_trade_no=out_trade_no)

    async def refund(self, **kw: Any) -> RefundResult:
        self.calls.append(("refund", kw))
        return replace(self._next(self.refunds), out_refund_no=kw["out_refund_no"])

    async def query_refund(self, *, out_trade_no: str, out_refund_no: str) -> RefundResult:
        self.calls.append(("query_refund", {"out_refund_no": out_refund_no}))
        return replace(self._next(self.refund_queries), out_refund_no=out_refund_no)

    async def aclose(self) -> None:
        return None


class FixedClock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def now(self) -> datetime:
        return self.at


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    return sqlite_url


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sims]:
    with running_sims(tmp_path_factory.mktemp("sims")) as running:
        yield running


@pytest.fixture
async def hq(db_url: str, sims: Sims, tmp_path: Path) -> AsyncIterator[PaymentsHq]:
    # HQ without its background work: the test drives the recovery itself.
    async with payments_hq(db_url, sims, tmp_path) as running:
        yield running


@dataclass
class Rig:
    hq: PaymentsHq
    provider: ScriptedProvider
    service: PaymentsService

    @property
    def db(self) -> Database:
        return self.hq.office.db

    async def sale(self) -> uuid.UUID:
        return uuid.UUID((await self.hq.upload_sale(amount_minor=AMOUNT))["sale_id"])

    async def charge(
        self,
        sale_id: uuid.UUID,
        key: str | None = None,
        *,
        taken_over: bool = False,
        scope: str = "payments.charge/S001",
    ) -> Response:
        idem = IdempotencyKey(self.db, scope, key or uuid.uuid4().hex, "h" * 64)
        await idem.acquire(None)
        idem.taken_over = taken_over
        request = ChargeRequest(
            "S001", sale_id, AMOUNT, "CNY", "code", wechat_support.auth_code(), "user:c1"
        )
        return await self.service.charge(request, idem)

    async def orders(self, sale_id: uuid.UUID) -> list[PaymentOrder]:
        async with self.db.connection() as conn:
            return await store.orders_of_sale(conn, "S001", sale_id)

    async def only(self, sale_id: uuid.UUID) -> PaymentOrder:
        (found,) = await self.orders(sale_id)
        return found

    async def order_with(self, sale_id: uuid.UUID, first: ChargeStatus) -> PaymentOrder:
        """The sale's order after a charge the provider first answered ``first``."""
        self.provider.charges = [ChargeResult(status=first)]
        await self.charge(sale_id)
        return await self.only(sale_id)

    async def reversing(self, sale_id: uuid.UUID) -> PaymentOrder:
        unknown = await self.order_with(sale_id, ChargeStatus.UNKNOWN)
        async with self.db.begin() as uow:
            return await self.service.move(uow, unknown, Event.REVERSE, actor="user:c1")

    async def schedule(self, order: PaymentOrder) -> tuple[datetime | None, int]:
        async with self.db.connection() as conn:
            row = (
                await conn.execute(
                    sa.select(store.order_t.c.next_check_at, store.order_t.c.checks).where(
                        store.order_t.c.order_id == order.order_id
                    )
                )
            ).one()
        return row.next_check_at, int(row.checks)

    async def refund(self, order: PaymentOrder, amount: int | None) -> Response:
        idem = IdempotencyKey(
            self.db, f"payments.refund/S001/{order.order_id}", uuid.uuid4().hex, "h" * 64
        )
        await idem.acquire(None)
        return await self.service.refund(
            "S001", order.order_id, amount_fen=amount, reason="r", actor="user:m1", key=idem
        )


@pytest.fixture
def rig(hq: PaymentsHq) -> Rig:
    provider = ScriptedProvider()
    assert hq.office.payments is not None
    config = replace(hq.office.payments.config, confirm_wait_s=0.05, poll_interval_s=0.01)
    return Rig(hq, provider, PaymentsService(hq.office.db, {"wechat": provider}, config))


# --- pure decisions ---------------------------------------------------------------------------


def test_the_recovery_looks_again_doubling_its_wait_up_to_the_ceiling() -> None:
    service = PaymentsService(
        cast(Database, None), {}, PaymentsConfig(recheck_s=2.0, recheck_max_s=60.0)
    )
    waits = [(service.recheck_at(T0, n) - T0).total_seconds() for n in (0, 1, 2, 4, 5, 40)]
    assert waits == [2.0, 4.0, 8.0, 32.0, 60.0, 60.0]


def test_a_reversing_order_answers_202_still_open() -> None:
    reversing = domain_order(state=OrderState.REVERSING)
    assert charge_outcome(reversing).status_code == 202


def test_a_cash_order_is_never_reversed_at_a_provider() -> None:
    for state in (OrderState.PENDING, OrderState.UNKNOWN, OrderState.REVERSING):
        with pytest.raises(IllegalTransition):
            transition(domain_order(Tender.CASH, state=state), Event.REVERSE, T0)


# --- the charge -------------------------------------------------------------------------------


async def test_a_key_whose_order_is_still_open_is_never_charged_again(rig: Rig) -> None:
    sale_id = await rig.sale()
    rig.provider.charges = [ChargeResult(status=ChargeStatus.USER_PAYING)]
    rig.provider.queries = [ChargeResult(status=ChargeStatus.USER_PAYING)]
    first = await rig.charge(sale_id, "k-open")
    assert first.status_code == 202
    with pytest.raises(KeyConflict):
        await rig.charge(sale_id, "k-open", scope=AGAIN)
    unknown_sale = await rig.sale()
    await rig.order_with(unknown_sale, ChargeStatus.UNKNOWN)
    (_, sent), *_ = [c for c in rig.provider.calls if c[0] == "charge"][-1:]
    # a reservation taken over after its owner died goes on only with an order never sent
    with pytest.raises(KeyConflict):
        await rig.charge(
            unknown_sale, _key_of(await rig.only(unknown_sale)), taken_over=True, scope=AGAIN
        )
    assert rig.provider.count("charge") == 2
    assert sent["out_trade_no"] == (await rig.only(unknown_sale)).out_trade_no


def _key_of(order: PaymentOrder) -> str:
    return order.idempotency_key


async def test_a_charge_answered_closed_is_declined_at_once(rig: Rig) -> None:
    sale_id = await rig.sale()
    order = await rig.order_with(sale_id, ChargeStatus.CLOSED)
    assert order.state is OrderState.FAILED
    assert rig.provider.count("query") == 0
    refused = await rig.order_with(await rig.sale(), ChargeStatus.REFUSED)
    assert refused.state is OrderState.FAILED
    assert rig.provider.count("query") == 0  # a refusal is final: nobody is polled


async def test_a_late_answer_never_moves_an_order_already_settled(rig: Rig) -> None:
    failed = await rig.order_with(await rig.sale(), ChargeStatus.REFUSED)
    paid = await rig.order_with(await rig.sale(), ChargeStatus.PAID)
    async with rig.db.begin() as uow:
        late = ChargeResult(status=ChargeStatus.PAID, amount_fen=AMOUNT)
        assert (await rig.service.apply_charge(uow, failed.order_id, late, actor="t")) == failed
        lost = ChargeResult(status=ChargeStatus.UNKNOWN)
        assert (await rig.service.apply_charge(uow, paid.order_id, lost, actor="t")) == paid


# --- the recovery worker ----------------------------------------------------------------------


async def test_an_order_never_sent_is_failed_and_frees_its_sale(rig: Rig) -> None:
    sale_id = await rig.sale()
    now = rig.db.clock.now()
    created = PaymentOrder(
        order_id=uuid.uuid4(),
        station_code="S001",
        sale_id=sale_id,
        tender=Tender.WECHAT,
        amount_fen=AMOUNT,
        currency="CNY",
        state=OrderState.CREATED,
        version=1,
        created_at=now,
        updated_at=now,
        out_trade_no=out_trade_no("never-sent", "S001"),
        idempotency_key="never-sent",
        actor="user:c1",
    )
    async with rig.db.begin() as uow:
        await store.insert_order(uow.conn, created, due_fen=AMOUNT, next_check_at=now)
    providers = {"wechat": rig.provider}
    assert await recover_once(rig.db, providers, now, config=rig.service.config) == 1
    assert (await rig.only(sale_id)).state is OrderState.FAILED
    assert rig.provider.calls == []
    paid = await rig.hq.pay(str(sale_id), amount=AMOUNT)  # cash may follow
    assert paid.status_code == 201, paid.text


async def test_a_query_that_finds_the_trade_closed_fails_the_order(rig: Rig) -> None:
    order = await rig.order_with(await rig.sale(), ChargeStatus.UNKNOWN)
    rig.provider.queries = [ChargeResult(status=ChargeStatus.CLOSED)]
    after = await drive(rig.service, order, order.created_at + timedelta(seconds=5))
    assert after.state is OrderState.FAILED
    assert rig.provider.count("reverse") == 0


@pytest.mark.parametrize("word", [ChargeStatus.NOT_FOUND, ChargeStatus.UNKNOWN])
async def test_no_final_word_is_reversed_exactly_at_the_unknown_deadline(
    rig: Rig, word: ChargeStatus
) -> None:
    sale_id = await rig.sale()
    order = await rig.order_with(sale_id, ChargeStatus.UNKNOWN)
    rig.provider.queries = [ChargeResult(status=word)]
    rig.provider.reverses = [ReverseResult(status=ReverseStatus.REVERSED)]
    deadline = timedelta(seconds=rig.service.config.unknown_deadline_s)
    pending_deadline = timedelta(seconds=rig.service.config.pending_deadline_s)
    assert pending_deadline < deadline
    for age in (pending_deadline, deadline - timedelta(milliseconds=1)):
        order = await drive(rig.service, await rig.only(sale_id), order.created_at + age)
        assert order.state is OrderState.UNKNOWN
    assert rig.provider.count("reverse") == 0
    order = await drive(rig.service, await rig.only(sale_id), order.created_at + deadline)
    assert rig.provider.count("reverse") == 1
    assert order.state is OrderState.CANCELLED
    assert (await rig.schedule(order))[0] is None


async def test_a_payer_still_confirming_is_reversed_exactly_at_the_pending_deadline(
    rig: Rig,
) -> None:
    sale_id = await rig.sale()
    rig.provider.queries = [ChargeResult(status=ChargeStatus.USER_PAYING)]
    order = await rig.order_with(sale_id, ChargeStatus.USER_PAYING)
    assert order.state is OrderState.PENDING
    rig.provider.reverses = [ReverseResult(status=ReverseStatus.REVERSED)]
    deadline = timedelta(seconds=rig.service.config.pending_deadline_s)
    early = await drive(rig.service, order, order.created_at + deadline - timedelta(seconds=1))
    assert (early.state, early.awaiting_payer) == (OrderState.PENDING, True)
    assert rig.provider.count("reverse") == 0
    late = await drive(rig.service, await rig.only(sale_id), order.created_at + deadline)
    assert late.state is OrderState.CANCELLED
    assert rig.provider.count("reverse") == 1


async def test_a_pending_order_without_a_final_word_stays_pending_and_backs_off(
    rig: Rig,
) -> None:
    sale_id = await rig.sale()
    rig.provider.queries = [ChargeResult(status=ChargeStatus.USER_PAYING)]
    order = await rig.order_with(sale_id, ChargeStatus.USER_PAYING)
    rig.provider.queries = [ChargeResult(status=ChargeStatus.NOT_FOUND)]
    recheck = rig.service.config.recheck_s
    at = order.created_at + timedelta(seconds=10)
    looked = await drive(rig.service, order, at)
    assert looked.state is OrderState.PENDING
    first_at, checks = await rig.schedule(looked)
    assert first_at is not None
    waits = [first_at.replace(tzinfo=first_at.tzinfo or UTC) - at]
    for _ in range(2):
        looked = await drive(rig.service, await rig.only(sale_id), at)
        next_at, checks = await rig.schedule(looked)
        assert next_at is not None
        waits.append(next_at.replace(tzinfo=next_at.tzinfo or UTC) - at)
    assert looked.state is OrderState.PENDING
    assert checks == 3
    assert [w.total_seconds() for w in waits] == [recheck, 2 * recheck, 4 * recheck]


async def test_an_unknown_order_backs_off_doubling_between_looks(rig: Rig) -> None:
    sale_id = await rig.sale()
    order = await rig.order_with(sale_id, ChargeStatus.UNKNOWN)
    rig.provider.queries = [ChargeResult(status=ChargeStatus.UNKNOWN)]
    recheck = rig.service.config.recheck_s
    at = order.created_at + timedelta(seconds=10)
    waits = []
    for _ in range(3):
        looked = await drive(rig.service, await rig.only(sale_id), at)
        next_at, _ = await rig.schedule(looked)
        assert next_at is not None
        waits.append((next_at.replace(tzinfo=next_at.tzinfo or UTC) - at).total_seconds())
    assert waits == [recheck, 2 * recheck, 4 * recheck]


async def test_a_reversing_order_has_its_reverse_sent_again_until_closed(rig: Rig) -> None:
    sale_id = await rig.sale()
    reversing = await rig.reversing(sale_id)
    rig.provider.reverses = [ReverseResult(status=ReverseStatus.REVERSED)]
    after = await drive(rig.service, reversing, reversing.created_at + timedelta(seconds=5))
    assert after.state is OrderState.CANCELLED
    assert rig.provider.count("reverse") == 1


async def test_a_refund_the_provider_never_received_is_sent_again_under_its_number(
    rig: Rig,
) -> None:
    order = await rig.order_with(await rig.sale(), ChargeStatus.PAID)
    rig.provider.refunds = [RefundResult(status=RefundStatus.UNKNOWN)]
    assert (await rig.refund(order, 1000)).status_code == 202
    refunding = await rig.only(order.sale_id)
    assert refunding.state is OrderState.REFUNDING
    rig.provider.refund_queries = [RefundResult(status=RefundStatus.NOT_FOUND)]
    rig.provider.refunds = [RefundResult(status=RefundStatus.SUCCEEDED)]
    after = await drive(rig.service, refunding, refunding.created_at + timedelta(seconds=5))
    assert (after.state, after.refunded_fen) == (OrderState.PARTIALLY_REFUNDED, 1000)
    first, again = [kw for m, kw in rig.provider.calls if m == "refund"]
    assert first["out_refund_no"] == again["out_refund_no"]
    assert again["refund_fen"] == 1000


# --- reverse ----------------------------------------------------------------------------------


async def test_no_such_trade_is_believed_only_once_its_grace_has_passed(rig: Rig) -> None:
    sale_id = await rig.sale()
    reversing = await rig.reversing(sale_id)
    rig.provider.reverses = [ReverseResult(status=ReverseStatus.REFUSED, code="ORDERNOTEXIST")]
    rig.provider.queries = [ChargeResult(status=ChargeStatus.NOT_FOUND)]
    grace = timedelta(seconds=rig.service.config.not_found_grace_s)
    early = reversing.created_at + grace - timedelta(milliseconds=1)
    kept = await rig.service.reverse(reversing, actor="t", now=early)
    assert kept.state is OrderState.REVERSING
    next_at, _ = await rig.schedule(kept)
    assert next_at is not None  # looked at again, not handed to an operator
    closed = await rig.service.reverse(
        await rig.only(sale_id), actor="t", now=reversing.created_at + grace
    )
    assert closed.state is OrderState.CANCELLED


async def test_a_reverse_refused_of_a_paid_trade_is_handed_to_an_operator_after_n_tries(
    rig: Rig,
) -> None:
    sale_id = await rig.sale()
    reversing = await rig.reversing(sale_id)
    service = PaymentsService(
        rig.db, {"wechat": rig.provider}, replace(rig.service.config, operator_after_checks=3)
    )
    rig.provider.reverses = [ReverseResult(status=ReverseStatus.REFUSED, code="TOO_LATE")]
    rig.provider.queries = [ChargeResult(status=ChargeStatus.PAID, amount_fen=AMOUNT)]
    at = reversing.created_at + timedelta(hours=1)
    for tries in (1, 2):
        kept = await service.reverse(await rig.only(sale_id), actor="t", now=at)
        assert kept.state is OrderState.REVERSING  # the payer's money is not believed back
        next_at, checks = await rig.schedule(kept)
        assert (next_at is not None, checks) == (True, tries)
        assert await rig.hq.audit("payments.order.needs_operator") == []
    kept = await service.reverse(await rig.only(sale_id), actor="t", now=at)
    assert kept.state is OrderState.REVERSING
    assert await rig.schedule(kept) == (None, 3)
    (handed,) = await rig.hq.audit("payments.order.needs_operator")
    assert handed["target"] == f"payment_order:{kept.order_id}"
    details = handed["details"]
    assert (json.loads(details) if isinstance(details, str) else details)["provider_code"] == (
        "TOO_LATE"
    )


async def test_a_reverse_answered_for_an_order_closed_meanwhile_changes_nothing(
    rig: Rig,
) -> None:
    sale_id = await rig.sale()
    reversing = await rig.reversing(sale_id)
    rig.provider.reverses = [ReverseResult(status=ReverseStatus.REVERSED)]
    assert (await rig.service.reverse(reversing, actor="t")).state is OrderState.CANCELLED
    again = await rig.service.reverse(reversing, actor="t")  # the stale copy, sent again
    assert again.state is OrderState.CANCELLED
    assert again.version == (await rig.only(sale_id)).version


# --- refunds and voids ------------------------------------------------------------------------


async def test_a_full_refund_after_a_partial_one_refunds_what_is_left(rig: Rig) -> None:
    order = await rig.order_with(await rig.sale(), ChargeStatus.PAID)
    rig.provider.refunds = [RefundResult(status=RefundStatus.SUCCEEDED)]
    assert (await rig.refund(order, 1000)).status_code == 201
    rest = await rig.refund(await rig.only(order.sale_id), None)
    assert rest.status_code == 201
    after = await rig.only(order.sale_id)
    assert (after.state, after.refunded_fen, after.refundable_fen) == (
        OrderState.REFUNDED,
        AMOUNT,
        0,
    )
    assert [kw["refund_fen"] for m, kw in rig.provider.calls if m == "refund"] == [
        1000,
        AMOUNT - 1000,
    ]


async def test_an_order_not_paid_cannot_be_refunded(rig: Rig) -> None:
    order = await rig.order_with(await rig.sale(), ChargeStatus.UNKNOWN)
    with pytest.raises(RefundNotAllowed):
        await rig.refund(order, 100)
    assert rig.provider.count("refund") == 0


async def test_a_settled_refund_keeps_its_outcome_whatever_arrives_later(rig: Rig) -> None:
    order = await rig.order_with(await rig.sale(), ChargeStatus.PAID)
    rig.provider.refunds = [RefundResult(status=RefundStatus.SUCCEEDED)]
    assert (await rig.refund(order, 1000)).status_code == 201
    async with rig.db.connection() as conn:
        (refund,) = await store.refunds_of(conn, order.order_id)
    async with rig.db.begin() as uow:
        kept, after = await rig.service.settle_refund(
            uow, refund, RefundResult(status=RefundStatus.REFUSED, code="LATE"), actor="t"
        )
    assert kept.state is RefundState.SUCCEEDED
    assert kept.failure_code is None
    assert (after.state, after.refunded_fen) == (OrderState.PARTIALLY_REFUNDED, 1000)


async def _cash_paid_at(rig: Rig, recorded_at: datetime) -> PaymentOrder:
    sale_id = await rig.sale()
    item = CashItem(uuid.uuid4().hex, sale_id, AMOUNT, "CNY", recorded_at, "c1")
    (verdict,) = await rig.service.upload_cash("S001", [item], actor="station:S001")
    assert verdict.status == "created", verdict
    return await rig.only(sale_id)


async def test_a_payment_is_voided_on_its_business_day_in_shanghai_only(rig: Rig) -> None:
    clock = rig.db.clock
    # 23:30 in Shanghai on 1 December, voided 00:30 on the 2nd (the same day in UTC)
    late = await _cash_paid_at(rig, datetime(2026, 12, 1, 15, 30, tzinfo=UTC))
    # 07:30 in Shanghai on 2 December, voided 08:30 (the next day in UTC)
    early = await _cash_paid_at(rig, datetime(2026, 12, 1, 23, 30, tzinfo=UTC))
    try:
        rig.db.clock = FixedClock(datetime(2026, 12, 1, 16, 30, tzinfo=UTC))
        with pytest.raises(VoidRefused):
            await rig.service.void("S001", late.order_id, actor="user:m1", reason="r")
        rig.db.clock = FixedClock(datetime(2026, 12, 2, 0, 30, tzinfo=UTC))
        voided = await rig.service.void("S001", early.order_id, actor="user:m1", reason="r")
    finally:
        rig.db.clock = clock
    assert voided.status_code == 200
    assert (await rig.only(early.sale_id)).state is OrderState.CANCELLED
    assert (await rig.only(late.sale_id)).state is OrderState.PAID


async def test_voiding_an_order_already_reversing_sends_no_second_reverse(rig: Rig) -> None:
    sale_id = await rig.sale()
    await rig.order_with(sale_id, ChargeStatus.UNKNOWN)
    rig.provider.reverses = [ReverseResult(status=ReverseStatus.RETRY)]
    order = await rig.only(sale_id)
    first = await rig.service.void("S001", order.order_id, actor="user:m1", reason="r")
    assert first.status_code == 202
    again = await rig.service.void("S001", order.order_id, actor="user:m1", reason="r")
    assert again.status_code == 200
    assert (await rig.only(sale_id)).state is OrderState.REVERSING
    assert rig.provider.count("reverse") == 1


# --- notifications ----------------------------------------------------------------------------


def _paid_note(order: PaymentOrder, amount: int = AMOUNT) -> Notification:
    return Notification(
        kind=NotificationKind.PAYMENT,
        notification_id=uuid.uuid4().hex,
        out_trade_no=order.out_trade_no,
        charge=ChargeResult(
            status=ChargeStatus.PAID, out_trade_no=order.out_trade_no, amount_fen=amount
        ),
    )


async def test_a_paid_notification_of_another_amount_or_replayed_pays_nothing(rig: Rig) -> None:
    order = await rig.order_with(await rig.sale(), ChargeStatus.UNKNOWN)
    service = rig.service
    assert await service.apply_notification("wechat", _paid_note(order, AMOUNT - 1)) == (
        "amount_mismatch"
    )
    assert (await rig.only(order.sale_id)).state is OrderState.UNKNOWN
    note = _paid_note(order)
    assert await service.apply_notification("wechat", note) == "applied"
    assert await service.apply_notification("wechat", note) == "replayed"
    assert (await rig.only(order.sale_id)).state is OrderState.PAID


@pytest.mark.parametrize("first", [ChargeStatus.REFUSED, ChargeStatus.CLOSED])
async def test_a_paid_notification_for_a_closed_order_is_audited_for_the_operator(
    rig: Rig, first: ChargeStatus
) -> None:
    order = await rig.order_with(await rig.sale(), first)
    assert order.state is OrderState.FAILED
    assert await rig.service.apply_notification("wechat", _paid_note(order)) == "ignored"
    (audited,) = await rig.hq.audit("payments.notification.paid_after_close")
    assert audited["target"] == f"payment_order:{order.order_id}"
    assert (await rig.only(order.sale_id)).state is OrderState.FAILED


async def test_a_paid_notification_for_a_cancelled_order_is_audited(rig: Rig) -> None:
    sale_id = await rig.sale()
    reversing = await rig.reversing(sale_id)
    rig.provider.reverses = [ReverseResult(status=ReverseStatus.REVERSED)]
    cancelled = await rig.service.reverse(reversing, actor="t")
    assert cancelled.state is OrderState.CANCELLED
    assert await rig.service.apply_notification("wechat", _paid_note(cancelled)) == "ignored"
    assert len(await rig.hq.audit("payments.notification.paid_after_close")) == 1


async def test_a_refund_notification_names_a_refund_of_its_own_order_only(rig: Rig) -> None:
    one = await rig.order_with(await rig.sale(), ChargeStatus.PAID)
    other = await rig.order_with(await rig.sale(), ChargeStatus.PAID)
    rig.provider.refunds = [RefundResult(status=RefundStatus.PROCESSING)]
    assert (await rig.refund(one, 1000)).status_code == 202
    async with rig.db.connection() as conn:
        (refund,) = await store.refunds_of(conn, one.order_id)
    note = Notification(
        kind=NotificationKind.REFUND,
        notification_id=uuid.uuid4().hex,
        out_trade_no=other.out_trade_no,
        refund=RefundResult(status=RefundStatus.SUCCEEDED, out_refund_no=refund.out_refund_no),
    )
    assert await rig.service.apply_notification("wechat", note) == "unknown_refund"
    assert (await rig.only(one.sale_id)).state is OrderState.REFUNDING
    assert (await rig.only(other.sale_id)).refunded_fen == 0


async def test_offline_cash_for_a_pump_test_is_refused(rig: Rig) -> None:
    sale = await rig.hq.upload_sale(amount_minor=AMOUNT, dispense_type="pump_test")
    item = CashItem(
        uuid.uuid4().hex, uuid.UUID(sale["sale_id"]), AMOUNT, "CNY", rig.db.clock.now(), "c1"
    )
    (verdict,) = await rig.service.upload_cash("S001", [item], actor="station:S001")
    assert verdict.status == "refused"
    assert verdict.error is not None
    assert verdict.error["code"] == "payments.sale_not_payable"
