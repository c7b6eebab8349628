"""The payment order machine: every legal move, every illegal one refused, money invariants."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forecourt.payments.domain import (
    IN_FLIGHT,
    LIVE,
    SETTLED,
    TERMINAL,
    TRANSITIONS,
    AmountInvalid,
    AmountMismatch,
    Change,
    CurrencyRefused,
    Event,
    IllegalTransition,
    OrderState,
    PaymentCodeInvalid,
    PaymentOrder,
    RefundTooLarge,
    SaleAlreadyPaid,
    Tender,
    check_money,
    out_refund_no,
    out_trade_no,
    settle_sale_check,
    tender_of_code,
    transition,
)

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def order(tender: Tender = Tender.WECHAT, amount: int = 30_000, **kw: object) -> PaymentOrder:
    base = PaymentOrder(
        order_id=uuid4(),
        station_code="S001",
        sale_id=uuid4(),
        tender=tender,
        amount_fen=amount,
        currency="CNY",
        state=OrderState.CREATED,
        version=1,
        created_at=T0,
        updated_at=T0,
        out_trade_no="FC" + "0" * 30 if tender.provider else "",
        idempotency_key="sale/1",
        actor="user:cashier",
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_state_sets_partition_the_states() -> None:
    assert SETTLED | IN_FLIGHT == frozenset(OrderState)
    assert not SETTLED & IN_FLIGHT
    assert TERMINAL == {OrderState.FAILED, OrderState.CANCELLED, OrderState.REFUNDED}
    assert OrderState.PAID in SETTLED
    assert OrderState.UNKNOWN in IN_FLIGHT
    assert LIVE == frozenset(OrderState) - TERMINAL
    for state in TERMINAL:  # nothing leaves a terminal state
        assert not [k for k in TRANSITIONS if k[0] is state]


def test_happy_provider_path_and_version() -> None:
    o = order()
    o = transition(o, Event.SUBMIT, T0)
    assert (o.state, o.version) == (OrderState.PENDING, 2)
    o = transition(o, Event.AWAITING_PAYER, T0)
    assert o.awaiting_payer
    assert o.state is OrderState.PENDING
    paid_at = T0 + timedelta(seconds=9)
    o = transition(
        o, Event.PAID, T0 + timedelta(seconds=10), Change(provider_trade_no="42", paid_at=paid_at)
    )
    assert (o.state, o.provider_trade_no, o.paid_at, o.awaiting_payer) == (
        OrderState.PAID,
        "42",
        paid_at,
        False,
    )
    assert o.version == 4
    again = transition(o, Event.PAID, T0, Change(provider_trade_no="other"))
    assert again.provider_trade_no == "42"
    assert again.paid_at == paid_at


def test_unknown_is_resolved_by_query_or_reverse_never_by_charging() -> None:
    o = transition(order(), Event.SUBMIT, T0)
    o = transition(o, Event.NO_ANSWER, T0, Change(failure_code="timeout"))
    assert o.state is OrderState.UNKNOWN
    assert o.failure_code == "timeout"
    with pytest.raises(IllegalTransition):
        transition(o, Event.SUBMIT, T0)
    assert transition(o, Event.PAID, T0).state is OrderState.PAID
    r = transition(o, Event.REVERSE, T0)
    assert r.state is OrderState.REVERSING
    assert transition(r, Event.REVERSE, T0).state is OrderState.REVERSING
    assert transition(r, Event.REVERSED, T0).state is OrderState.CANCELLED
    with pytest.raises(IllegalTransition):
        transition(r, Event.PAID, T0)


def test_refunds_partial_then_full_and_refused_goes_back() -> None:
    o = transition(transition(order(amount=1000), Event.SUBMIT, T0), Event.PAID, T0)
    r = transition(o, Event.REFUND, T0, Change(refund_fen=300))
    assert (r.state, r.refund_pending_fen, r.refundable_fen) == (OrderState.REFUNDING, 300, 700)
    with pytest.raises(IllegalTransition):  # one refund in flight at a time
        transition(r, Event.REFUND, T0, Change(refund_fen=1))
    back = transition(r, Event.REFUND_REFUSED, T0)
    assert (back.state, back.refund_pending_fen, back.refunded_fen) == (OrderState.PAID, 0, 0)
    p = transition(r, Event.REFUND_SUCCEEDED, T0, Change(refund_fen=300))
    assert (p.state, p.refunded_fen, p.refund_pending_fen) == (
        OrderState.PARTIALLY_REFUNDED,
        300,
        0,
    )
    p2 = transition(p, Event.REFUND, T0, Change(refund_fen=700))
    assert transition(p2, Event.REFUND_REFUSED, T0).state is OrderState.PARTIALLY_REFUNDED
    with pytest.raises(IllegalTransition):  # not the refund in flight
        transition(p2, Event.REFUND_SUCCEEDED, T0, Change(refund_fen=699))
    done = transition(p2, Event.REFUND_SUCCEEDED, T0, Change(refund_fen=700))
    assert (done.state, done.refunded_fen) == (OrderState.REFUNDED, 1000)


@pytest.mark.parametrize("fen", [0, -1, 701])
def test_a_refund_above_what_is_refundable_is_refused(fen: int) -> None:
    o = transition(transition(order(amount=1000), Event.SUBMIT, T0), Event.PAID, T0)
    o = transition(
        transition(o, Event.REFUND, T0, Change(refund_fen=300)),
        Event.REFUND_SUCCEEDED,
        T0,
        Change(refund_fen=300),
    )
    with pytest.raises(RefundTooLarge):
        transition(o, Event.REFUND, T0, Change(refund_fen=fen))
    assert transition(o, Event.REFUND, T0, Change(refund_fen=700)).refund_pending_fen == 700


def test_cash_and_provider_events_do_not_mix() -> None:
    cash = order(Tender.CASH)
    with pytest.raises(IllegalTransition):
        transition(cash, Event.SUBMIT, T0)
    paid = transition(cash, Event.CASH_TAKEN, T0)
    assert paid.state is OrderState.PAID
    assert paid.paid_at == T0
    assert transition(paid, Event.VOID, T0).state is OrderState.CANCELLED
    with pytest.raises(IllegalTransition):
        transition(order(), Event.CASH_TAKEN, T0)
    wechat_paid = transition(transition(order(), Event.SUBMIT, T0), Event.PAID, T0)
    with pytest.raises(IllegalTransition):
        transition(wechat_paid, Event.VOID, T0)
    with pytest.raises(IllegalTransition):
        transition(paid, Event.REVERSE, T0)


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(st.sampled_from(list(Event)), max_size=14),
    tender=st.sampled_from(list(Tender)),
    amounts=st.lists(st.integers(min_value=-5, max_value=1200), min_size=14, max_size=14),
)
def test_any_sequence_keeps_the_money_invariants(
    events: list[Event], tender: Tender, amounts: list[int]
) -> None:
    """Whatever the events, a move is either in TRANSITIONS or refused and changes nothing;
    refunds never exceed the amount; the version grows by one per move."""
    o = order(tender, amount=1000)
    for event, fen in zip(events, amounts, strict=False):
        try:
            nxt = transition(o, event, T0, Change(refund_fen=fen))
        except (IllegalTransition, RefundTooLarge):
            continue
        assert (o.state, event) in TRANSITIONS
        assert nxt.version == o.version + 1
        assert 0 <= nxt.refunded_fen + nxt.refund_pending_fen <= nxt.amount_fen
        assert (nxt.refund_pending_fen > 0) == (nxt.state is OrderState.REFUNDING)
        assert nxt.refunded_fen >= o.refunded_fen
        if nxt.state is OrderState.REFUNDED:
            assert nxt.refunded_fen == nxt.amount_fen
        if o.state in TERMINAL:
            raise AssertionError("a terminal order moved")
        o = nxt


def test_money_checks() -> None:
    check_money(1, "CNY")
    check_money(10_000_000, "CNY")
    for bad in (0, -1, 10_000_001, True, 1.5):
        with pytest.raises(AmountInvalid):
            check_money(bad, "CNY")  # type: ignore[arg-type]
    with pytest.raises(CurrencyRefused):
        check_money(100, "USD")


def test_a_sale_is_paid_once() -> None:
    settle_sale_check(1000, 0, 1000)
    with pytest.raises(AmountMismatch):
        settle_sale_check(1000, 0, 999)
    with pytest.raises(AmountMismatch):
        settle_sale_check(1000, 0, 1001)
    with pytest.raises(SaleAlreadyPaid):
        settle_sale_check(1000, 1000, 1000)
    settle_sale_check(1000, 400, 600)
    settle_sale_check(1000, 400, 100, exact=False)
    with pytest.raises(AmountMismatch):
        settle_sale_check(1000, 400, 601, exact=False)


def test_payment_codes_by_provider_prefix() -> None:
    assert tender_of_code("134567890123456789") is Tender.WECHAT
    assert tender_of_code("101234567890123456") is Tender.WECHAT
    assert tender_of_code("2812345678901234") is Tender.ALIPAY
    assert tender_of_code("301234567890123456789012") is Tender.ALIPAY
    for bad in (
        "161234567890123456",
        "13456789012345678",
        "3112345678901234",
        "",
        "28123456789012a4",
        "3012345678901234567890123",
    ):
        with pytest.raises(PaymentCodeInvalid):
            tender_of_code(bad)


def test_out_numbers_are_derived_stable_and_distinct() -> None:
    a = out_trade_no("sale-1/1", "S001")
    assert a == out_trade_no("sale-1/1", "S001")
    assert len(a) == 32
    assert a.startswith("FC")
    assert len({a, out_trade_no("sale-1/2", "S001"), out_trade_no("sale-1/1", "S002")}) == 3
    oid = uuid4()
    r = out_refund_no(oid, "k1")
    assert r == out_refund_no(oid, "k1")
    assert len(r) == 32
    assert r != out_refund_no(oid, "k2")
    assert r != out_refund_no(uuid4(), "k1")
