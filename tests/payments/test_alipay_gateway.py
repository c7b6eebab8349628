"""The Alipay adapter against the simulator run as a real process, over real HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest

from forecourt.payments.providers.alipay import SHANGHAI, AlipayProvider, BillUnavailable
from forecourt.payments.providers.base import (
    BillKind,
    ChargeStatus,
    NotificationKind,
    RefundStatus,
    ReverseStatus,
)
from tests.payments.alipay_support import (
    APP_ID,
    AlipaySimProcess,
    NotifyReceiver,
    auth_code,
    keys,
    out_no,
    provider_config,
    signed_form,
    sim_config,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AlipaySimProcess]:
    process = AlipaySimProcess(sim_config(), Path(tmp_path_factory.mktemp("alipay_sim")))
    with process:
        yield process


@pytest.fixture(autouse=True)
def _clean_faults(sim: AlipaySimProcess) -> Iterator[None]:
    yield
    sim.reset_faults()


@pytest.fixture
async def provider(sim: AlipaySimProcess) -> AsyncIterator[AlipayProvider]:
    adapter = AlipayProvider(provider_config(sim.gateway_url))
    try:
        yield adapter
    finally:
        await adapter.aclose()


async def _pay(
    provider: AlipayProvider, suffix: str = "9999", amount: int = 1234
) -> tuple[str, str]:
    out_trade_no = out_no()
    code = auth_code(suffix)
    result = await provider.charge_by_code(
        out_trade_no=out_trade_no,
        amount_fen=amount,
        auth_code=code,
        description="92号汽油 30.00L",
        store_id="ST001",
    )
    assert result.status is ChargeStatus.PAID, result
    return out_trade_no, code


# ---------------------------------------------------------------------------- payments


async def test_happy_pay(provider: AlipayProvider, sim: AlipaySimProcess) -> None:
    out_trade_no = out_no()
    result = await provider.charge_by_code(
        out_trade_no=out_trade_no,
        amount_fen=25_001,
        auth_code=auth_code(),
        description="95号汽油",
        store_id="ST001",
    )
    assert result.status is ChargeStatus.PAID
    assert result.amount_fen == 25_001
    assert result.provider_trade_no
    assert result.paid_at is not None
    assert result.paid_at.tzinfo is not None
    assert result.payer
    assert result.payer.startswith("2088")
    trade = sim.trade(out_trade_no)
    assert trade is not None
    assert trade["state"] == "TRADE_SUCCESS"
    assert trade["charged_times"] == 1
    assert trade["amount_fen"] == 25_001
    query = await provider.query(out_trade_no)
    assert query.status is ChargeStatus.PAID
    assert query.amount_fen == 25_001


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (auth_code("0001"), "40004/ACQ.BUYER_BALANCE_NOT_ENOUGH"),
        (auth_code("0005"), "40004/ACQ.PAYMENT_AUTH_CODE_INVALID"),
        (auth_code("0006"), "40004/ACQ.PAYMENT_REQUEST_HAS_RISK"),
        ("134567890123456789", "40004/ACQ.PAYMENT_AUTH_CODE_INVALID"),  # a WeChat code
        ("281234", "40004/ACQ.PAYMENT_AUTH_CODE_INVALID"),  # too short
    ],
    ids=["balance", "code-invalid", "risk", "wechat-code", "too-short"],
)
async def test_refusals(
    provider: AlipayProvider, sim: AlipaySimProcess, code: str, expected: str
) -> None:
    out_trade_no = out_no()
    result = await provider.charge_by_code(
        out_trade_no=out_trade_no,
        amount_fen=500,
        auth_code=code,
        description="diesel",
        store_id="ST001",
    )
    assert result.status is ChargeStatus.REFUSED
    assert result.code == expected
    assert result.message
    assert sim.trade(out_trade_no) is None
    assert (await provider.query(out_trade_no)).status is ChargeStatus.NOT_FOUND


async def test_same_out_trade_no_again(provider: AlipayProvider, sim: AlipaySimProcess) -> None:
    out_trade_no, code = await _pay(provider)
    again = await provider.charge_by_code(
        out_trade_no=out_trade_no,
        amount_fen=1234,
        auth_code=code,
        description="92号汽油 30.00L",
        store_id="ST001",
    )
    # Already paid: never a refusal (it is charged) - the handler queries.
    assert again.status is ChargeStatus.UNKNOWN
    assert again.code == "40004/ACQ.TRADE_HAS_SUCCESS"
    assert sim.trade(out_trade_no)["charged_times"] == 1  # type: ignore[index]
    # A spent payment code cannot pay another trade.
    other = await provider.charge_by_code(
        out_trade_no=out_no(), amount_fen=1234, auth_code=code, description="x", store_id="S"
    )
    assert other.status is ChargeStatus.REFUSED
    assert other.code == "40004/ACQ.PAYMENT_AUTH_CODE_INVALID"
    # A waiting trade sent again with other parameters.
    waiting = out_no()
    code = auth_code("0003")
    first = await provider.charge_by_code(
        out_trade_no=waiting, amount_fen=700, auth_code=code, description="x", store_id="S"
    )
    assert first.status is ChargeStatus.USER_PAYING
    same = await provider.charge_by_code(
        out_trade_no=waiting, amount_fen=700, auth_code=code, description="x", store_id="S"
    )
    assert same.status is ChargeStatus.USER_PAYING
    changed = await provider.charge_by_code(
        out_trade_no=waiting, amount_fen=701, auth_code=code, description="x", store_id="S"
    )
    assert changed.status is ChargeStatus.REFUSED
    assert changed.code == "40004/ACQ.CONTEXT_INCONSISTENT"
    assert (await provider.reverse(waiting)).status is ReverseStatus.REVERSED


async def test_user_paying_then_query_paid(provider: AlipayProvider, sim: AlipaySimProcess) -> None:
    out_trade_no = out_no()
    result = await provider.charge_by_code(
        out_trade_no=out_trade_no,
        amount_fen=8_800,
        auth_code=auth_code("0002"),
        description="92号汽油",
        store_id="ST001",
    )
    assert result.status is ChargeStatus.USER_PAYING
    assert result.code == "10003"
    assert result.paid_at is None
    first = await provider.query(out_trade_no)
    assert first.status is ChargeStatus.USER_PAYING
    second = await provider.query(out_trade_no)  # confirm_after_queries = 2
    assert second.status is ChargeStatus.PAID
    assert second.amount_fen == 8_800
    assert second.paid_at is not None
    assert sim.trade(out_trade_no)["charged_times"] == 1  # type: ignore[index]


async def test_never_confirmed_then_cancel_closes(
    provider: AlipayProvider, sim: AlipaySimProcess
) -> None:
    out_trade_no = out_no()
    result = await provider.charge_by_code(
        out_trade_no=out_trade_no,
        amount_fen=300,
        auth_code=auth_code("0003"),
        description="x",
        store_id="ST001",
    )
    assert result.status is ChargeStatus.USER_PAYING
    for _ in range(3):
        assert (await provider.query(out_trade_no)).status is ChargeStatus.USER_PAYING
    reverse = await provider.reverse(out_trade_no)
    assert reverse.status is ReverseStatus.REVERSED
    assert reverse.message
    assert "action=close" in reverse.message
    assert (await provider.query(out_trade_no)).status is ChargeStatus.CLOSED
    trade = sim.trade(out_trade_no)
    assert trade is not None
    assert trade["charged_times"] == 0
    assert trade["cancel_action"] == "close"
    # Cancelling again is answered the same.
    assert (await provider.reverse(out_trade_no)).status is ReverseStatus.REVERSED
    # The payer gives up (0004): the trade closes by itself.
    gave_up = out_no()
    await provider.charge_by_code(
        out_trade_no=gave_up,
        amount_fen=300,
        auth_code=auth_code("0004"),
        description="x",
        store_id="S",
    )
    await provider.query(gave_up)
    assert (await provider.query(gave_up)).status is ChargeStatus.CLOSED


async def test_system_error_is_unknown_then_query(
    provider: AlipayProvider, sim: AlipaySimProcess
) -> None:
    sim.faults(system_error_rate=1.0)
    out_trade_no = out_no()
    result = await provider.charge_by_code(
        out_trade_no=out_trade_no,
        amount_fen=1000,
        auth_code=auth_code(),
        description="x",
        store_id="ST001",
    )
    assert result.status is ChargeStatus.UNKNOWN
    assert result.code in {"20000/isp.unknow-error", "40004/ACQ.SYSTEM_ERROR"}
    assert (await provider.query(out_trade_no)).status is ChargeStatus.UNKNOWN
    sim.reset_faults()
    assert (await provider.query(out_trade_no)).status is ChargeStatus.NOT_FOUND
    assert sim.trade(out_trade_no) is None  # nobody charged


async def test_charge_without_answer_then_query_and_cancel_refunds(
    provider: AlipayProvider, sim: AlipaySimProcess
) -> None:
    sim.faults(charge_no_answer_rate=1.0)
    out_trade_no = out_no()
    code = auth_code()
    result = await provider.charge_by_code(
        out_trade_no=out_trade_no,
        amount_fen=4_321,
        auth_code=code,
        description="x",
        store_id="ST001",
    )
    assert result.status is ChargeStatus.UNKNOWN
    assert result.code == "network"
    sim.reset_faults()
    query = await provider.query(out_trade_no)
    assert query.status is ChargeStatus.PAID
    assert query.amount_fen == 4_321
    reverse = await provider.reverse(out_trade_no)
    assert reverse.status is ReverseStatus.REVERSED
    assert reverse.message
    assert "action=refund" in reverse.message
    assert (await provider.query(out_trade_no)).status is ChargeStatus.CLOSED
    view = sim.trades()
    trade = next(t for t in view["trades"] if t["out_trade_no"] == out_trade_no)
    assert trade["charged_times"] == 1
    assert trade["returned_fen"] == 4_321
    payer = view["payers"][code]
    assert payer["charged_fen"] == payer["returned_fen"] == 4_321
    assert out_trade_no not in view["charged_twice"]


async def test_timeout_is_unknown(sim: AlipaySimProcess) -> None:
    sim.faults(timeout=True, timeout_hold_ms=3000)
    adapter = AlipayProvider(provider_config(sim.gateway_url, timeout_s=0.3))
    try:
        out_trade_no = out_no()
        result = await adapter.charge_by_code(
            out_trade_no=out_trade_no,
            amount_fen=100,
            auth_code=auth_code(),
            description="x",
            store_id="ST001",
        )
        assert result.status is ChargeStatus.UNKNOWN
        assert result.code == "timeout"
        sim.reset_faults()
        assert (await adapter.query(out_trade_no)).status is ChargeStatus.NOT_FOUND
    finally:
        await adapter.aclose()


async def test_5xx_is_unknown(provider: AlipayProvider, sim: AlipaySimProcess) -> None:
    sim.faults(error_5xx_rate=1.0)
    result = await provider.query(out_no())
    assert result.status is ChargeStatus.UNKNOWN
    assert result.code == "http_5xx"


async def test_tampered_answer_is_bad_signature(
    provider: AlipayProvider, sim: AlipaySimProcess
) -> None:
    out_trade_no, _ = await _pay(provider)
    sim.faults(tamper_answer_rate=1.0)
    result = await provider.query(out_trade_no)
    assert result.status is ChargeStatus.UNKNOWN
    assert result.code == "bad_signature"
    refund = await provider.refund(
        out_trade_no=out_trade_no, out_refund_no=out_no("R"), refund_fen=100, total_fen=1234
    )
    assert refund.status is RefundStatus.UNKNOWN
    assert refund.code == "bad_signature"
    sim.reset_faults()
    # An adapter holding another "Alipay" key believes nothing.
    wrong = AlipayProvider(
        provider_config(sim.gateway_url, alipay_public_pem=keys().stranger_public_pem)
    )
    try:
        assert (await wrong.query(out_trade_no)).code == "bad_signature"
    finally:
        await wrong.aclose()


async def test_bad_request_signature_refused(sim: AlipaySimProcess) -> None:
    biz = {"out_trade_no": out_no()}
    async with httpx.AsyncClient() as client:
        forged = signed_form("alipay.trade.query", biz, private_pem=keys().stranger_private_pem)
        answer = (await client.post(sim.gateway_url, data=forged)).json()
        assert answer["alipay_trade_query_response"]["code"] == "40002"
        assert answer["alipay_trade_query_response"]["sub_code"] == "isv.invalid-signature"
        assert "sign" not in answer
        stale = signed_form(
            "alipay.trade.query",
            biz,
            timestamp=(datetime.now(SHANGHAI) - timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S"),
        )
        answer = (await client.post(sim.gateway_url, data=stale)).json()
        assert answer["alipay_trade_query_response"]["sub_code"] == "isv.invalid-timestamp"
        changed = signed_form("alipay.trade.query", biz)
        changed["biz_content"] = changed["biz_content"].replace("T", "U", 1)
        answer = (await client.post(sim.gateway_url, data=changed)).json()
        assert answer["alipay_trade_query_response"]["sub_code"] == "isv.invalid-signature"
        good = signed_form("alipay.trade.query", biz)
        answer = (await client.post(sim.gateway_url, data=good)).json()
        assert answer["alipay_trade_query_response"]["sub_code"] == "ACQ.TRADE_NOT_EXIST"
        assert answer["sign"]
    # Through the adapter: an app key Alipay does not know charges nobody.
    stranger = AlipayProvider(
        provider_config(sim.gateway_url, app_private_pem=keys().stranger_private_pem)
    )
    try:
        out_trade_no = out_no()
        result = await stranger.charge_by_code(
            out_trade_no=out_trade_no,
            amount_fen=100,
            auth_code=auth_code(),
            description="x",
            store_id="S",
        )
        assert result.status is ChargeStatus.UNKNOWN
        assert result.code == "bad_signature"
        assert result.message
        assert "isv.invalid-signature" in result.message
        assert sim.trade(out_trade_no) is None
    finally:
        await stranger.aclose()


# ---------------------------------------------------------------------------- refunds


async def test_refunds(provider: AlipayProvider, sim: AlipaySimProcess) -> None:
    out_trade_no, code = await _pay(provider, amount=1000)
    partial = await provider.refund(
        out_trade_no=out_trade_no,
        out_refund_no="RF-1-abc",
        refund_fen=300,
        total_fen=1000,
        reason="多收",
    )
    assert partial.status is RefundStatus.SUCCEEDED
    assert partial.refund_fen == 300
    assert partial.refunded_at is not None
    duplicate = await provider.refund(
        out_trade_no=out_trade_no, out_refund_no="RF-1-abc", refund_fen=300, total_fen=1000
    )
    assert duplicate.status is RefundStatus.SUCCEEDED
    assert duplicate.refund_fen == 300
    discordant = await provider.refund(
        out_trade_no=out_trade_no, out_refund_no="RF-1-abc", refund_fen=200, total_fen=1000
    )
    assert discordant.status is RefundStatus.REFUSED
    assert discordant.code == "40004/ACQ.DISCORDANT_REPEAT_REQUEST"
    over = await provider.refund(
        out_trade_no=out_trade_no, out_refund_no="RF-2-abc", refund_fen=701, total_fen=1000
    )
    assert over.status is RefundStatus.REFUSED
    assert over.code == "40004/ACQ.REFUND_AMT_NOT_EQUAL_TOTAL"
    rest = await provider.refund(
        out_trade_no=out_trade_no, out_refund_no="RF-3-abc", refund_fen=700, total_fen=1000
    )
    assert rest.status is RefundStatus.SUCCEEDED
    assert sim.trade(out_trade_no)["refunded_fen"] == 1000  # type: ignore[index]
    assert sim.trades()["payers"][code]["refunded_fen"] == 1000
    assert (await provider.query(out_trade_no)).status is ChargeStatus.CLOSED  # fully refunded
    # Refund queries.
    found = await provider.query_refund(out_trade_no=out_trade_no, out_refund_no="RF-1-abc")
    assert found.status is RefundStatus.SUCCEEDED
    assert found.refund_fen == 300
    assert found.refunded_at is not None
    missing = await provider.query_refund(out_trade_no=out_trade_no, out_refund_no="RF-9-abc")
    assert missing.status is RefundStatus.NOT_FOUND
    no_trade = await provider.query_refund(out_trade_no=out_no(), out_refund_no="RF-9-abc")
    assert no_trade.status is RefundStatus.NOT_FOUND
    # A full refund at once, and a refund of an unpaid trade.
    whole, _ = await _pay(provider, amount=555)
    full = await provider.refund(
        out_trade_no=whole, out_refund_no=out_no("R"), refund_fen=555, total_fen=555
    )
    assert full.status is RefundStatus.SUCCEEDED
    unpaid = out_no()
    await provider.charge_by_code(
        out_trade_no=unpaid,
        amount_fen=555,
        auth_code=auth_code("0003"),
        description="x",
        store_id="S",
    )
    refused = await provider.refund(
        out_trade_no=unpaid, out_refund_no=out_no("R"), refund_fen=100, total_fen=555
    )
    assert refused.status is RefundStatus.REFUSED
    assert refused.code == "40004/ACQ.TRADE_STATUS_ERROR"


# ---------------------------------------------------------------------------- notifications


async def test_notifications(sim: AlipaySimProcess) -> None:
    plain = AlipayProvider(provider_config(sim.gateway_url))
    async with NotifyReceiver(plain, fail_first=1) as receiver:
        adapter = AlipayProvider(provider_config(sim.gateway_url, notify_url=receiver.url))
        try:
            out_trade_no, _ = await _pay(adapter, amount=2000)
            [paid] = await receiver.wait_for(1)
            assert paid.kind is NotificationKind.PAYMENT
            assert paid.out_trade_no == out_trade_no
            assert paid.charge is not None
            assert paid.charge.status is ChargeStatus.PAID
            assert paid.charge.amount_fen == 2000
            # Answered "fail" first: re-sent with the same notify_id (a replay is detectable).
            assert len(receiver.received) == 2
            record = next(n for n in sim.notifications() if n["out_trade_no"] == out_trade_no)
            assert record["notify_id"] == paid.notification_id
            assert record["attempts"] == 2
            assert record["deliveries"] == 1

            sim.faults(notify_duplicate_rate=1.0)
            refund = await adapter.refund(
                out_trade_no=out_trade_no, out_refund_no="RF-n-1", refund_fen=500, total_fen=2000
            )
            assert refund.status is RefundStatus.SUCCEEDED
            notes = await receiver.wait_for(3)
            first, second = notes[1], notes[2]
            assert first.kind is second.kind is NotificationKind.REFUND
            assert first.notification_id == second.notification_id  # the same one, twice
            assert first.refund is not None
            assert first.refund.out_refund_no == "RF-n-1"
            assert first.charge is not None
            assert first.charge.refunded_fen == 500
            assert receiver.rejected == []
        finally:
            await adapter.aclose()
            await plain.aclose()


async def test_notification_faults(sim: AlipaySimProcess) -> None:
    plain = AlipayProvider(provider_config(sim.gateway_url))
    async with NotifyReceiver(plain) as receiver:
        adapter = AlipayProvider(provider_config(sim.gateway_url, notify_url=receiver.url))
        try:
            sim.faults(notify_drop_rate=1.0)
            dropped, _ = await _pay(adapter)
            record = next(n for n in sim.notifications() if n["out_trade_no"] == dropped)
            assert record["dropped"] is True
            assert record["attempts"] == 0
            sim.faults(notify_drop_rate=None, notify_delay_ms=100, notify_reorder=True)
            late = [(await _pay(adapter))[0] for _ in range(3)]
            notes = await receiver.wait_for(3)
            assert {note.out_trade_no for note in notes} == set(late)
            assert dropped not in {note.out_trade_no for note in notes}
        finally:
            await adapter.aclose()
            await plain.aclose()


def test_bad_config_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"app_id": APP_ID}), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "forecourt.sim.alipay", "--config", str(config), "--port", "0"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2


# ---------------------------------------------------------------------------- bill


async def test_trade_bill(provider: AlipayProvider) -> None:
    paid, _ = await _pay(provider, amount=12_345)
    other, _ = await _pay(provider, amount=100)
    refund = await provider.refund(
        out_trade_no=paid, out_refund_no="RF-bill-1", refund_fen=2_345, total_fen=12_345
    )
    assert refund.status is RefundStatus.SUCCEEDED
    cancelled, _ = await _pay(provider, amount=999)
    assert (await provider.reverse(cancelled)).status is ReverseStatus.REVERSED
    today = datetime.now(SHANGHAI).date()
    lines = await provider.trade_bill(today)
    mine = {(line.kind, line.out_trade_no): line for line in lines}
    payment = mine[(BillKind.PAYMENT, paid)]
    assert payment.amount_fen == 12_345
    assert payment.provider_trade_no
    assert payment.at.tzinfo is not None
    assert payment.status == "交易"
    assert mine[(BillKind.PAYMENT, other)].amount_fen == 100
    refund_line = mine[(BillKind.REFUND, paid)]
    assert refund_line.amount_fen == 2_345
    assert refund_line.out_refund_no == "RF-bill-1"
    assert refund_line.extra["商品名称"] == "92号汽油 30.00L"
    assert (BillKind.PAYMENT, cancelled) not in mine
    with pytest.raises(BillUnavailable) as raised:
        await provider.trade_bill(today + timedelta(days=1))
    assert raised.value.code == "40004/isp.bill_not_exist"
