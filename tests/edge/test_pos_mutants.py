"""The counter's payment attempts at the edge, against an HQ whose answers the test scripts.

Each attempt of a sale is sent under the key ``edge-<sale>-<attempt>``; an attempt whose
outcome is unknown is sent again under the same key with the same code and the journal's
amount, and the sale takes no cash while any attempt of it may still have charged the payer.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from forecourt.edge.journal import Journal
from forecourt.edge.pos import (
    CashPay,
    CodePay,
    HqUnreachable,
    OutcomeUnknown,
    PaymentDeclined,
    PaymentInProgress,
    PaymentRefused,
    PosHq,
    PosService,
    PosStore,
    ProviderUnreachable,
    SaleAlreadyPaid,
    TenderShort,
    idempotency_key,
)
from forecourt.kernel.access import Principal, PrincipalKind
from forecourt.kernel.clock import SystemClock
from tests.edge.test_journal import DRAFT

CODE_1 = "134567890123456789"
CODE_2 = "134567890123450000"
CASHIER = Principal(PrincipalKind.USER, "alice")

Answer = Callable[[httpx.Request], httpx.Response]


def order_body(state: str, amount: int = DRAFT.amount_minor) -> dict[str, Any]:
    return {"order_id": str(uuid.uuid4()), "state": state, "amount_fen": amount}


def error_body(code: str, **details: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": code, "details": details}}


@dataclass
class ScriptedHq:
    """HQ's payments routes: each charge (POST) and order read (GET) answered by the next
    scripted answer; the last one repeats."""

    charges: list[Answer] = field(default_factory=list)
    orders: list[Answer] = field(default_factory=list)
    posted: list[httpx.Request] = field(default_factory=list)
    read: list[httpx.Request] = field(default_factory=list)

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            self.posted.append(request)
            script = self.charges
        else:
            self.read.append(request)
            script = self.orders
        answer = script.pop(0) if len(script) > 1 else script[0]
        return answer(request)

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.posted]

    def keys(self) -> list[str]:
        return [r.headers["idempotency-key"] for r in self.posted]


def answer(status: int, body: dict[str, Any]) -> Answer:
    return lambda request: httpx.Response(status, json=body)


def raises(exc: type[httpx.HTTPError]) -> Answer:
    def fail(request: httpx.Request) -> httpx.Response:
        raise exc("scripted", request=request)

    return fail


@dataclass
class Counter:
    service: PosService
    store: PosStore
    hq: ScriptedHq
    sale_id: str

    async def code(self, auth_code: str = CODE_1) -> tuple[int, dict[str, Any]]:
        return await self.service.pay(
            CASHIER, "token", self.sale_id, CodePay(method="code", auth_code=auth_code), None
        )

    async def cash(self, tendered: int = DRAFT.amount_minor) -> tuple[int, dict[str, Any]]:
        return await self.service.pay(
            CASHIER, "token", self.sale_id, CashPay(method="cash", tendered_fen=tendered), None
        )

    async def statuses(self) -> list[tuple[int, str, str]]:
        return [(a.attempt, a.method, a.status) for a in await self.store.attempts(self.sale_id)]


@pytest.fixture
async def counter(tmp_path: Path) -> AsyncIterator[Counter]:
    journal = Journal(tmp_path / "edge.db", SystemClock())
    await journal.open()
    scripted = ScriptedHq()
    hq = PosHq(
        "http://hq", "S001", "credential", 1.0, transport=httpx.MockTransport(scripted.handle)
    )
    store = PosStore(journal)
    service = PosService(
        store,
        hq,
        list,
        wake_sync=lambda: None,
        wake_upload=lambda: None,
        payment_wait_s=0.05,
        flush_timeout_s=1.0,
        poll_interval_s=0.01,
    )
    sale = await journal.record_sale(DRAFT)
    try:
        yield Counter(service, store, scripted, sale.sale_id)
    finally:
        await hq.close()
        await journal.close()


def test_an_attempts_key_names_its_sale_and_its_number() -> None:
    assert idempotency_key("s-1", 1) == "edge-s-1-1"
    assert idempotency_key("s-1", 2) == "edge-s-1-2"


async def test_a_charge_whose_answer_timed_out_blocks_cash_until_its_outcome_is_known(
    counter: Counter,
) -> None:
    counter.hq.charges = [raises(httpx.ReadTimeout)]
    with pytest.raises(OutcomeUnknown):
        await counter.code()
    assert await counter.statuses() == [(1, "code", "unknown")]
    with pytest.raises(PaymentInProgress):
        await counter.cash()
    assert await counter.statuses() == [(1, "code", "unknown")]


async def test_an_unknown_attempt_is_sent_again_with_its_key_code_and_the_journals_amount(
    counter: Counter,
) -> None:
    counter.hq.charges = [raises(httpx.ReadTimeout), answer(201, order_body("paid"))]
    with pytest.raises(OutcomeUnknown):
        await counter.code(CODE_1)
    status, body = await counter.code(CODE_2)  # the cashier scans again
    assert status == 200, body
    first, second = counter.hq.bodies()
    assert first == second
    assert second["auth_code"] == CODE_1
    assert second["amount_fen"] == DRAFT.amount_minor
    key = idempotency_key(counter.sale_id, 1)
    assert counter.hq.keys() == [key, key]
    assert await counter.statuses() == [(1, "code", "paid")]


async def test_a_declined_attempt_is_followed_by_a_new_attempt_under_a_new_key(
    counter: Counter,
) -> None:
    counter.hq.charges = [
        answer(402, error_body("payments.declined", provider_code="NOTENOUGH")),
        answer(201, order_body("paid")),
    ]
    with pytest.raises(PaymentDeclined):
        await counter.code(CODE_1)
    status, _ = await counter.code(CODE_2)
    assert status == 200
    assert counter.hq.keys() == [
        idempotency_key(counter.sale_id, 1),
        idempotency_key(counter.sale_id, 2),
    ]
    assert [b["auth_code"] for b in counter.hq.bodies()] == [CODE_1, CODE_2]


async def test_cash_after_hq_was_not_reached_is_a_new_attempt_with_its_own_key(
    counter: Counter,
) -> None:
    counter.hq.charges = [raises(httpx.ConnectError)]
    with pytest.raises(HqUnreachable):
        await counter.code()
    status, body = await counter.cash(DRAFT.amount_minor + 800)
    assert status == 200
    assert body["change_fen"] == 800
    assert await counter.statuses() == [(1, "code", "abandoned"), (2, "cash", "paid")]
    (cash,) = [a for a in await counter.store.attempts(counter.sale_id) if a.method == "cash"]
    assert cash.idempotency_key == idempotency_key(counter.sale_id, 2)


async def test_a_sale_paid_by_code_takes_no_cash(counter: Counter) -> None:
    counter.hq.charges = [answer(201, order_body("paid"))]
    assert (await counter.code())[0] == 200
    with pytest.raises(SaleAlreadyPaid):
        await counter.cash()
    assert await counter.statuses() == [(1, "code", "paid")]


async def test_cash_short_of_the_journals_amount_is_refused(counter: Counter) -> None:
    with pytest.raises(TenderShort):
        await counter.cash(DRAFT.amount_minor - 1)
    assert await counter.statuses() == []
    status, body = await counter.cash(DRAFT.amount_minor)
    assert (status, body["change_fen"]) == (200, 0)


async def test_hq_still_at_the_charge_leaves_the_attempt_unknown_and_cash_blocked(
    counter: Counter,
) -> None:
    counter.hq.charges = [answer(409, error_body("idempotency.in_progress"))]
    status, body = await counter.code()
    assert status == 202
    assert body["payment"]["status"] == "unknown"
    with pytest.raises(PaymentInProgress):
        await counter.cash()


@pytest.mark.parametrize("state", ["pending", "unknown", "created", "reversing"])
async def test_an_open_hq_order_keeps_the_attempt_pending_and_cash_blocked(
    counter: Counter, state: str
) -> None:
    order = order_body(state)
    counter.hq.charges = [answer(202, order)]
    counter.hq.orders = [answer(200, order)]
    status, body = await counter.code()
    assert status == 202
    assert body["payment"]["status"] == "pending"
    with pytest.raises(PaymentInProgress):
        await counter.cash()
    # asked again: HQ's order is read, the charge is not sent again
    status, _ = await counter.code()
    assert status == 202
    assert len(counter.hq.posted) == 1
    assert counter.hq.read


@pytest.mark.parametrize("status", [500, 503])
async def test_an_hq_failure_leaves_the_attempt_unknown_and_cash_blocked(
    counter: Counter, status: int
) -> None:
    counter.hq.charges = [answer(status, error_body("internal"))]
    with pytest.raises(ProviderUnreachable):
        await counter.code()
    assert await counter.statuses() == [(1, "code", "unknown")]
    with pytest.raises(PaymentInProgress):
        await counter.cash()


async def test_a_charge_hq_refuses_for_good_closes_the_attempt(counter: Counter) -> None:
    counter.hq.charges = [answer(422, error_body("payments.amount_mismatch"))]
    with pytest.raises(PaymentRefused):
        await counter.code()
    assert await counter.statuses() == [(1, "code", "failed")]
    assert (await counter.cash())[0] == 200
