"""WeChat Pay adapter against the simulator running as a real process, over real HTTP."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from forecourt.payments.providers.base import (
    BillKind,
    ChargeResult,
    ChargeStatus,
    NotificationKind,
    RefundStatus,
    ReverseStatus,
)
from forecourt.payments.providers.wechat import (
    SHANGHAI,
    WechatPayProvider,
    authorization,
    load_private_key,
)

from .wechat_support import (
    APPID,
    MCHID,
    MERCHANT_SERIAL,
    NotifyReceiver,
    WechatSimProcess,
    auth_code,
    keys,
    out_no,
    provider_config,
    sim_config,
    wait_until,
)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WechatSimProcess]:
    process = WechatSimProcess(sim_config(), tmp_path_factory.mktemp("wechat_cert"))
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def sim_public_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WechatSimProcess]:
    process = WechatSimProcess(
        sim_config(mode="public_key"), tmp_path_factory.mktemp("wechat_pubkey")
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
async def wechat(sim: WechatSimProcess) -> AsyncIterator[WechatPayProvider]:
    sim.reset_faults()
    provider = WechatPayProvider(provider_config(sim.base_url, timeout_s=1.0))
    yield provider
    await provider.aclose()
    sim.reset_faults()


async def _charge(
    provider: WechatPayProvider, no: str, code: str, amount: int = 500
) -> ChargeResult:
    return await provider.charge_by_code(
        out_trade_no=no, amount_fen=amount, auth_code=code, description="92# 汽油", store_id="S001"
    )


async def test_happy_charge(wechat: WechatPayProvider, sim: WechatSimProcess) -> None:
    no = out_no()
    result = await _charge(wechat, no, auth_code(), 6789)
    assert result.status is ChargeStatus.PAID
    assert (result.amount_fen, result.code) == (6789, "SUCCESS")
    assert result.provider_trade_no
    assert result.payer
    assert result.paid_at is not None
    assert result.paid_at.utcoffset() == timedelta(hours=8)
    assert (await wechat.query(no)).status is ChargeStatus.PAID
    assert sim.trade(no)["charged_times"] == 1


@pytest.mark.parametrize(
    ("code", "provider_code"),
    [
        (auth_code("0001"), "NOTENOUGH"),
        (auth_code("0005"), "AUTHCODEEXPIRE"),
        (auth_code("0006"), "TRADE_ERROR"),
        ("280000000000000001", "AUTH_CODE_INVALID"),  # an Alipay code
        ("13000000000000001", "AUTH_CODE_INVALID"),  # 17 digits
    ],
    ids=["not-enough", "code-expired", "trade-error", "alipay-code", "17-digits"],
)
async def test_refusals(wechat: WechatPayProvider, code: str, provider_code: str) -> None:
    no = out_no()
    result = await _charge(wechat, no, code)
    assert (result.status, result.code) == (ChargeStatus.REFUSED, provider_code)
    queried = await wechat.query(no)
    assert queried.status in {ChargeStatus.REFUSED, ChargeStatus.NOT_FOUND}


async def test_userpaying_then_paid(wechat: WechatPayProvider, sim: WechatSimProcess) -> None:
    no = out_no()
    assert (await _charge(wechat, no, auth_code("0002"))).status is ChargeStatus.USER_PAYING
    assert (await wechat.query(no)).status is ChargeStatus.USER_PAYING
    paid = await wechat.query(no)  # the payer confirms at the 2nd query
    assert (paid.status, paid.amount_fen) == (ChargeStatus.PAID, 500)
    assert sim.trade(no)["charged_times"] == 1


async def test_userpaying_cancelled_and_never(wechat: WechatPayProvider) -> None:
    cancelled = out_no()
    assert (await _charge(wechat, cancelled, auth_code("0004"))).status is ChargeStatus.USER_PAYING
    await wechat.query(cancelled)
    assert (await wechat.query(cancelled)).status is ChargeStatus.REFUSED  # PAYERROR
    never = out_no()
    assert (await _charge(wechat, never, auth_code("0003"))).status is ChargeStatus.USER_PAYING
    for _ in range(3):
        assert (await wechat.query(never)).status is ChargeStatus.USER_PAYING
    assert (await wechat.reverse(never)).status is ReverseStatus.REVERSED
    assert (await wechat.query(never)).status is ChargeStatus.CLOSED


async def test_same_out_trade_no(wechat: WechatPayProvider, sim: WechatSimProcess) -> None:
    no, code = out_no(), auth_code()
    first = await _charge(wechat, no, code)
    again = await _charge(wechat, no, code)
    assert again.status is ChargeStatus.PAID
    assert again.provider_trade_no == first.provider_trade_no
    other = await _charge(wechat, no, code, amount=501)
    assert (other.status, other.code) == (ChargeStatus.UNKNOWN, "INVALID_REQUEST")
    assert sim.trade(no)["charged_times"] == 1


async def test_5xx_is_unknown_then_query(wechat: WechatPayProvider, sim: WechatSimProcess) -> None:
    sim.faults(error_5xx_rate=1.0)
    no = out_no()
    result = await _charge(wechat, no, auth_code())
    assert (result.status, result.code) == (ChargeStatus.UNKNOWN, "http_5xx")
    assert "SYSTEM_ERROR" in (result.message or "")
    assert (await wechat.reverse(no)).status is ReverseStatus.RETRY
    sim.faults(error_5xx_rate=None)
    assert (await wechat.query(no)).status is ChargeStatus.NOT_FOUND


async def test_charged_but_no_answer_then_reverse(
    wechat: WechatPayProvider, sim: WechatSimProcess
) -> None:
    sim.faults(charge_no_answer_rate=1.0)
    no, code = out_no(), auth_code()
    result = await _charge(wechat, no, code, amount=3000)
    assert (result.status, result.code) == (ChargeStatus.UNKNOWN, "network")
    sim.faults(charge_no_answer_rate=None)
    assert (await wechat.query(no)).status is ChargeStatus.PAID
    assert (await wechat.reverse(no)).status is ReverseStatus.REVERSED
    assert (await wechat.reverse(no)).status is ReverseStatus.REVERSED  # again: same answer
    assert (await wechat.query(no)).status is ChargeStatus.CLOSED
    trade = sim.trade(no)
    assert (trade["state"], trade["charged_times"], trade["returned_fen"]) == ("REVOKED", 1, 3000)
    payer = sim.trades()["payers"][code]
    assert payer["charged_fen"] == payer["returned_fen"] == 3000


async def test_timeout(wechat: WechatPayProvider, sim: WechatSimProcess) -> None:
    sim.faults(timeout=True, timeout_hold_ms=3000)
    no = out_no()
    started = time.monotonic()
    result = await _charge(wechat, no, auth_code())
    assert (result.status, result.code) == (ChargeStatus.UNKNOWN, "timeout")
    assert time.monotonic() - started < 2.5
    sim.faults(timeout=False)
    assert (await wechat.query(no)).status is ChargeStatus.NOT_FOUND


@pytest.mark.parametrize("fault", [{"tamper_answer_rate": 1.0}, {"answer_skew_s": -600}])
async def test_untrustworthy_answer(
    wechat: WechatPayProvider, sim: WechatSimProcess, fault: dict[str, float]
) -> None:
    sim.faults(**fault)
    no = out_no()
    result = await _charge(wechat, no, auth_code())
    assert (result.status, result.code) == (ChargeStatus.UNKNOWN, "bad_signature")
    sim.reset_faults()
    assert (await wechat.query(no)).status is ChargeStatus.PAID  # it did happen


def test_simulator_refuses_bad_requests(sim: WechatSimProcess) -> None:
    sim.reset_faults()
    body = json.dumps({"appid": APPID, "mchid": MCHID}).encode()
    path = f"/v3/pay/transactions/out-trade-no/{out_no()}/reverse"

    def post(private_pem: str, content: bytes, mchid: str = MCHID) -> httpx.Response:
        header = authorization(
            method="POST",
            url_path=path,
            body=content,
            mchid=mchid,
            serial_no=MERCHANT_SERIAL,
            private_key=load_private_key(private_pem),
            timestamp=str(int(time.time())),
            nonce=out_no("N"),
        )
        return httpx.post(
            sim.base_url + path,
            content=content,
            timeout=5,
            headers={
                "Authorization": header,
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
        )

    stranger = post(keys().stranger_private_pem, body)
    assert (stranger.status_code, stranger.json()["code"]) == (401, "SIGN_ERROR")
    assert stranger.headers["Wechatpay-Signature"]  # refusals are signed too
    missing = httpx.post(sim.base_url + path, content=body, timeout=5)
    assert (missing.status_code, missing.json()["code"]) == (401, "SIGN_ERROR")
    other_mchid = json.dumps({"appid": APPID, "mchid": "1900000999"}).encode()
    mismatch = post(keys().merchant_private_pem, other_mchid)
    assert (mismatch.status_code, mismatch.json()["code"]) == (400, "INVALID_REQUEST")
    not_found = post(keys().merchant_private_pem, body)
    assert (not_found.status_code, not_found.json()["code"]) == (404, "ORDER_NOT_EXIST")


async def test_refunds(wechat: WechatPayProvider, sim: WechatSimProcess) -> None:
    no = out_no()
    await _charge(wechat, no, auth_code(), amount=1000)
    first_no = out_no("R")
    first = await wechat.refund(
        out_trade_no=no, out_refund_no=first_no, refund_fen=300, total_fen=1000, reason="多收"
    )
    assert first.status in {RefundStatus.PROCESSING, RefundStatus.SUCCEEDED}
    assert first.refund_fen == 300
    duplicate = await wechat.refund(
        out_trade_no=no, out_refund_no=first_no, refund_fen=300, total_fen=1000
    )
    assert duplicate.provider_refund_no == first.provider_refund_no
    over = await wechat.refund(
        out_trade_no=no, out_refund_no=out_no("R"), refund_fen=701, total_fen=1000
    )
    assert (over.status, over.code) == (RefundStatus.REFUSED, "INVALID_REQUEST")
    rest = await wechat.refund(
        out_trade_no=no, out_refund_no=out_no("R"), refund_fen=700, total_fen=1000
    )
    assert rest.status is not RefundStatus.REFUSED
    await wait_until(
        lambda: all(
            r["status"] == "SUCCESS" for r in sim.trades()["refunds"] if r["out_trade_no"] == no
        )
    )
    queried = await wechat.query_refund(out_trade_no=no, out_refund_no=first_no)
    assert queried.status is RefundStatus.SUCCEEDED
    assert queried.refunded_at is not None
    missing = await wechat.query_refund(out_trade_no=no, out_refund_no=out_no("R"))
    assert missing.status is RefundStatus.NOT_FOUND
    assert (await wechat.query(no)).code == "REFUND"
    assert (await wechat.reverse(no)).status is ReverseStatus.REFUSED  # refund instead
    assert sim.trade(no)["refunded_fen"] == 1000


async def test_refund_of_unpaid_or_unknown_trade(wechat: WechatPayProvider) -> None:
    unpaid = out_no()
    await _charge(wechat, unpaid, auth_code("0003"))
    refused = await wechat.refund(
        out_trade_no=unpaid, out_refund_no=out_no("R"), refund_fen=100, total_fen=500
    )
    assert refused.status is RefundStatus.REFUSED
    unknown = await wechat.refund(
        out_trade_no=out_no(), out_refund_no=out_no("R"), refund_fen=100, total_fen=500
    )
    assert (unknown.status, unknown.code) == (RefundStatus.REFUSED, "RESOURCE_NOT_EXISTS")


async def test_trade_bill(wechat: WechatPayProvider) -> None:
    paid, reversed_ = out_no(), out_no()
    await _charge(wechat, paid, auth_code(), amount=1234)
    await _charge(wechat, reversed_, auth_code(), amount=999)
    refund_no = out_no("R")
    await wechat.refund(out_trade_no=paid, out_refund_no=refund_no, refund_fen=234, total_fen=1234)
    await wechat.reverse(reversed_)
    today = datetime.now(UTC).astimezone(SHANGHAI).date()
    lines = await wechat.trade_bill(today)
    mine = {
        (ln.kind, ln.out_trade_no, ln.amount_fen, ln.out_refund_no, ln.status)
        for ln in lines
        if ln.out_trade_no in {paid, reversed_}
    }
    assert mine == {
        (BillKind.PAYMENT, paid, 1234, None, "SUCCESS"),
        (BillKind.REFUND, paid, 234, refund_no, "PROCESSING"),
        (BillKind.PAYMENT, reversed_, 999, None, "REVOKED"),
    } or mine == {
        (BillKind.PAYMENT, paid, 1234, None, "SUCCESS"),
        (BillKind.REFUND, paid, 234, refund_no, "SUCCESS"),
        (BillKind.PAYMENT, reversed_, 999, None, "REVOKED"),
    }
    assert await wechat.trade_bill(today - timedelta(days=1)) == []  # no trades that day


async def test_notifications(wechat: WechatPayProvider, sim: WechatSimProcess) -> None:
    async with NotifyReceiver(wechat, fail_first=1) as receiver:
        sim.control(notify_url=receiver.url, faults={"notify_duplicate_rate": 1.0})
        refunds = WechatPayProvider(provider_config(sim.base_url, notify_url=receiver.url))
        no = out_no()
        await _charge(wechat, no, auth_code(), amount=800)
        notes = await receiver.wait_for(2)
        assert {n.notification_id for n in notes} == {notes[0].notification_id}  # a replay
        assert notes[0].kind is NotificationKind.PAYMENT
        assert notes[0].charge is not None
        assert notes[0].charge.amount_fen == 800
        assert len(receiver.received) == 3  # the first answer failed: re-sent
        sim.faults(notify_duplicate_rate=None)
        refund_no = out_no("R")
        await refunds.refund(
            out_trade_no=no, out_refund_no=refund_no, refund_fen=800, total_fen=800
        )
        notes = await receiver.wait_for(3)
        assert notes[-1].kind is NotificationKind.REFUND
        assert notes[-1].refund is not None
        assert notes[-1].refund.status is RefundStatus.SUCCEEDED
        assert notes[-1].refund.out_refund_no == refund_no
        assert receiver.rejected == []
        await refunds.aclose()
    records = [n for n in sim.notifications() if n["out_trade_no"] == no]
    assert [r["event_type"] for r in records] == ["TRANSACTION.SUCCESS", "REFUND.SUCCESS"]


async def test_public_key_mode(sim_public_key: WechatSimProcess) -> None:
    provider = WechatPayProvider(provider_config(sim_public_key.base_url, mode="public_key"))
    no = out_no()
    assert (await _charge(provider, no, auth_code())).status is ChargeStatus.PAID
    assert (await provider.query(no)).status is ChargeStatus.PAID
    async with NotifyReceiver(provider) as receiver:
        refunds = WechatPayProvider(
            provider_config(sim_public_key.base_url, mode="public_key", notify_url=receiver.url)
        )
        await refunds.refund(
            out_trade_no=no, out_refund_no=out_no("R"), refund_fen=500, total_fen=500
        )
        notes = await receiver.wait_for(1)
        assert notes[0].kind is NotificationKind.REFUND
        await refunds.aclose()
    certificate_only = WechatPayProvider(provider_config(sim_public_key.base_url))
    assert (await certificate_only.query(no)).code == "bad_signature"
    await certificate_only.aclose()
    await provider.aclose()
