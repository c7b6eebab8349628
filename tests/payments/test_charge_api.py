"""Counter payments through HQ's API against the WeChat Pay and Alipay simulators (real
processes), on SQLite and PostgreSQL: bad input and faults first, then the paths that pay."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from forecourt.payments.domain import OrderState

from . import alipay_support, wechat_support
from .hq_payments import PaymentsHq, Sims, payments_hq, running_sims


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sims]:
    with running_sims(tmp_path_factory.mktemp("sims")) as running:
        yield running


@pytest.fixture
async def hq(db_url: str, sims: Sims, tmp_path: Path) -> AsyncIterator[PaymentsHq]:
    async with payments_hq(db_url, sims, tmp_path) as running:
        yield running


def _error(response: object) -> str:
    body = response.json()  # type: ignore[attr-defined]
    return str(body["error"]["code"])


# --- bad input ---------------------------------------------------------------------------------


async def test_a_sale_hq_does_not_know_is_404_with_a_hint_and_charges_nobody(
    hq: PaymentsHq,
) -> None:
    before = len(hq.sims.wechat.trades()["trades"])
    response = await hq.pay(str(uuid.uuid4()), amount=500, code=wechat_support.auth_code())
    assert response.status_code == 404, response.text
    assert _error(response) == "payments.sale_unknown"
    assert "upload" in response.json()["error"]["details"]["hint"]
    assert len(hq.sims.wechat.trades()["trades"]) == before


async def test_an_amount_other_than_the_sale_is_due_is_422(hq: PaymentsHq) -> None:
    sale = await hq.upload_sale(amount_minor=30200)
    response = await hq.pay(sale, amount=30100, code=wechat_support.auth_code())
    assert response.status_code == 422, response.text
    assert _error(response) == "payments.amount_mismatch"
    # nothing was kept: the right amount then goes through
    assert (await hq.pay(sale)).status_code == 201


async def test_a_currency_other_than_cny_is_refused(hq: PaymentsHq) -> None:
    sale = await hq.upload_sale()
    response = await hq.pay(sale, currency="USD")
    assert response.status_code == 422, response.text
    assert _error(response) == "payments.currency_refused"


async def test_an_amount_that_is_not_integer_fen_is_refused(hq: PaymentsHq) -> None:
    sale = await hq.upload_sale()
    response = await hq.client.post(
        "/v1/stations/S001/payments",
        json={"sale_id": sale["sale_id"], "amount_fen": 302.0, "currency": "CNY", "method": "cash"},
        headers={**hq.cashier, "Idempotency-Key": "k-float"},
    )
    assert response.status_code == 422, response.text


async def test_a_body_that_is_not_json_is_400_or_422_in_the_envelope(hq: PaymentsHq) -> None:
    response = await hq.client.post(
        "/v1/stations/S001/payments",
        content=b"{not json",
        headers={**hq.cashier, "Idempotency-Key": "k-bad", "content-type": "application/json"},
    )
    assert response.status_code in (400, 422), response.text
    assert "error" in response.json()


async def test_without_an_idempotency_key_nothing_is_charged(hq: PaymentsHq) -> None:
    sale = await hq.upload_sale()
    response = await hq.client.post(
        "/v1/stations/S001/payments",
        json={"sale_id": sale["sale_id"], "amount_fen": 30200, "currency": "CNY", "method": "cash"},
        headers=hq.cashier,
    )
    assert response.status_code == 400
    assert _error(response) == "idempotency.key_missing"


async def test_a_second_payment_of_a_paid_sale_is_409(hq: PaymentsHq) -> None:
    sale = await hq.upload_sale()
    first = await hq.pay(sale, code=wechat_support.auth_code())
    assert first.status_code == 201, first.text
    second = await hq.pay(sale, code=alipay_support.auth_code())
    assert second.status_code == 409, second.text
    assert _error(second) == "payments.sale_already_paid"
    cash = await hq.pay(sale)
    assert cash.status_code == 409
    # the second code was never sent to its provider
    assert not [t for t in hq.sims.alipay.trades()["trades"] if t.get("total_amount") == "302.00"]


async def test_two_cashiers_paying_one_sale_at_once_pay_it_once(hq: PaymentsHq) -> None:
    sale = await hq.upload_sale()
    answers = await asyncio.gather(
        hq.pay(sale, code=wechat_support.auth_code()),
        hq.pay(sale, code=wechat_support.auth_code()),
    )
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [201, 409], [a.text for a in answers]


async def test_a_cashier_of_another_station_is_403_and_audited(hq: PaymentsHq) -> None:
    sale = await hq.upload_sale()
    response = await hq.pay(sale, station="S001", headers=await _cashier_of(hq, "S002"))
    assert response.status_code == 403, response.text
    assert _error(response) == "auth.out_of_scope"
    refusals = await hq.audit("auth.refused")
    assert any("/v1/stations/S001/payments" in r["target"] for r in refusals)


async def test_a_station_credential_cannot_charge(hq: PaymentsHq) -> None:
    sale = await hq.upload_sale()
    response = await hq.pay(sale, headers=hq.station("S001"))
    assert response.status_code == 403
    assert _error(response) == "auth.wrong_principal"


async def test_a_code_of_no_provider_is_422(hq: PaymentsHq) -> None:
    sale = await hq.upload_sale()
    response = await hq.pay(sale, code="9" * 18)
    assert response.status_code == 422
    assert _error(response) == "payments.payment_code_invalid"


# --- the provider refuses, or does not answer -------------------------------------------------


@pytest.mark.parametrize(
    ("make_code", "provider_code"),
    [
        (lambda: wechat_support.auth_code("0001"), "NOTENOUGH"),
        (lambda: alipay_support.auth_code("0001"), "ACQ.BUYER_BALANCE_NOT_ENOUGH"),
    ],
)
async def test_a_declined_code_is_402_failed_with_the_providers_code_and_cash_may_follow(
    hq: PaymentsHq, make_code: object, provider_code: str
) -> None:
    sale = await hq.upload_sale()
    response = await hq.pay(sale, code=make_code())  # type: ignore[operator]
    assert response.status_code == 402, response.text
    error = response.json()["error"]
    assert error["code"] == "payments.declined"
    assert provider_code in error["details"]["provider_code"]
    assert error["details"]["order"]["state"] == "failed"
    # the sale is still due: cash pays it
    assert (await hq.pay(sale)).status_code == 201


async def test_a_charge_never_answered_is_unknown_then_resolved_by_query_never_charged_twice(
    hq: PaymentsHq,
) -> None:
    sale = await hq.upload_sale()
    code = wechat_support.auth_code()
    attempt = f"sale-{sale['sale_id']}/attempt"
    hq.sims.wechat.faults(charge_no_answer_rate=1.0)
    first = await hq.pay(sale, code=code, key=f"{attempt}-1")
    assert first.status_code == 202, first.text
    body = first.json()
    assert body["state"] == "unknown"
    hq.sims.wechat.reset_faults()
    # The same key again: the same answer, nothing sent to WeChat again.
    again = await hq.pay(sale, code=code, key=f"{attempt}-1")
    assert again.status_code == 202
    assert again.headers["Idempotency-Replayed"] == "true"
    trade = hq.sims.wechat.trade(body["out_trade_no"])
    assert trade["charged_times"] == 1
    # The worker queries: paid.
    assert await hq.recover(after_s=5) >= 1
    order = await hq.order(body["order_id"])
    assert order.state is OrderState.PAID
    assert order.provider_trade_no
    assert hq.sims.wechat.trade(body["out_trade_no"])["charged_times"] == 1
    payer = hq.sims.wechat.trades()["payers"][code]
    assert payer["charged_times"] == 1
    # and a new attempt for the sale is refused: it is paid
    assert (await hq.pay(sale, code=code, key=f"{attempt}-2")).status_code == 409


async def test_a_provider_5xx_is_unknown_and_the_worker_reverses_a_trade_that_never_was(
    hq: PaymentsHq,
) -> None:
    sale = await hq.upload_sale()
    hq.sims.wechat.faults(error_5xx_rate=1.0)
    response = await hq.pay(sale, code=wechat_support.auth_code())
    assert response.status_code == 202, response.text
    assert response.json()["state"] == "unknown"
    hq.sims.wechat.reset_faults()
    order_id = response.json()["order_id"]
    await hq.recover(after_s=5)  # not found, too early to give up
    assert (await hq.order(order_id)).state is OrderState.UNKNOWN
    await hq.recover(after_s=3600)  # past the deadline: reversed
    order = await hq.order(order_id)
    assert order.state is OrderState.CANCELLED
    # the sale is due again: cash pays it
    assert (await hq.pay(sale)).status_code == 201


async def test_alipay_no_answer_is_resolved_by_query(hq: PaymentsHq) -> None:
    sale = await hq.upload_sale()
    hq.sims.alipay.faults(charge_no_answer_rate=1.0)
    response = await hq.pay(sale, code=alipay_support.auth_code())
    assert response.status_code == 202, response.text
    hq.sims.alipay.reset_faults()
    await hq.recover(after_s=5)
    order = await hq.order(response.json()["order_id"])
    assert order.state is OrderState.PAID
    trade = hq.sims.alipay.trade(order.out_trade_no)
    assert trade is not None
    assert trade["charged_times"] == 1


# --- the payer confirms -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_code",
    [lambda: wechat_support.auth_code("0002"), lambda: alipay_support.auth_code("0002")],
)
async def test_userpaying_then_the_payer_confirms_within_the_wait_is_201(
    hq: PaymentsHq, make_code: object
) -> None:
    sale = await hq.upload_sale()
    response = await hq.pay(sale, code=make_code())  # type: ignore[operator]
    assert response.status_code == 201, response.text
    assert response.json()["state"] == "paid"
    assert response.json()["awaiting_payer"] is False


@pytest.mark.parametrize(
    ("make_code", "sim"),
    [
        (lambda: wechat_support.auth_code("0003"), "wechat"),
        (lambda: alipay_support.auth_code("0003"), "alipay"),
    ],
)
async def test_userpaying_never_confirmed_is_202_pending_then_reversed_by_the_worker(
    hq: PaymentsHq, make_code: object, sim: str
) -> None:
    sale = await hq.upload_sale()
    response = await hq.pay(sale, code=make_code())  # type: ignore[operator]
    assert response.status_code == 202, response.text
    body = response.json()
    assert (body["state"], body["awaiting_payer"]) == ("pending", True)
    await hq.recover(after_s=5)  # still confirming, before the deadline
    assert (await hq.order(body["order_id"])).state is OrderState.PENDING
    await hq.recover(after_s=600)
    order = await hq.order(body["order_id"])
    assert order.state is OrderState.CANCELLED
    trade = getattr(hq.sims, sim).trade(body["out_trade_no"])
    assert trade is not None
    assert trade["charged_times"] == 0
    reversals = await hq.audit("payments.order.reverse")
    assert any(body["order_id"] in r["target"] for r in reversals)


# --- paid ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_code", "tender"),
    [(wechat_support.auth_code, "wechat"), (alipay_support.auth_code, "alipay")],
)
async def test_a_code_payment_is_201_paid_audited_and_readable(
    hq: PaymentsHq, make_code: object, tender: str
) -> None:
    sale = await hq.upload_sale()
    response = await hq.pay(sale, code=make_code())  # type: ignore[operator]
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["state"], body["tender"], body["amount_fen"]) == ("paid", tender, 30200)
    assert body["actor"].startswith("user:")
    assert response.headers["Location"].endswith(body["order_id"])
    read = await hq.client.get(response.headers["Location"], headers=hq.cashier)
    assert read.status_code == 200
    assert read.json() == body
    listed = await hq.client.get(
        "/v1/stations/S001/payments", params={"sale_id": sale["sale_id"]}, headers=hq.manager
    )
    assert [o["order_id"] for o in listed.json()["items"]] == [body["order_id"]]
    paid = await hq.audit("payments.order.paid")
    assert any(body["order_id"] in r["target"] for r in paid)


async def test_cash_is_paid_at_once(hq: PaymentsHq) -> None:
    sale = await hq.upload_sale()
    response = await hq.pay(sale)
    assert response.status_code == 201, response.text
    assert response.json()["tender"] == "cash"
    assert response.json()["state"] == "paid"


async def test_an_order_of_another_station_is_not_found_there(hq: PaymentsHq) -> None:
    sale = await hq.upload_sale()
    order_id = (await hq.pay(sale)).json()["order_id"]
    response = await hq.client.get(f"/v1/stations/S002/payments/{order_id}", headers=hq.admin)
    assert response.status_code == 404
    assert _error(response) == "payments.order_unknown"


async def _cashier_of(hq: PaymentsHq, station: str) -> dict[str, str]:
    from tests.support import staff_headers

    return await staff_headers(hq.office.identity, ("cashier", f"station:{station}"))


def test_the_payment_routes_document_every_status_they_answer_errors_as_the_envelope() -> None:
    from forecourt.bootstrap import build_head_office
    from forecourt.settings import Settings

    office = build_head_office(
        Settings(database_url="sqlite+aiosqlite://", services=["payments"], log_json=False)
    )
    paths = office.app.openapi()["paths"]
    charge = paths["/v1/stations/{station_code}/payments"]["post"]["responses"]
    assert set(charge) == {
        "201",
        "202",
        "400",
        "401",
        "402",
        "403",
        "404",
        "409",
        "413",
        "422",
        "429",
        "503",
    }
    for status, response in charge.items():
        if not status.startswith("2"):
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorEnvelope"}, status
    # without a provider configured there is no notification route to answer it
    assert not [p for p in paths if p.startswith("/v1/payments/notify")]
