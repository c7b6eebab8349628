"""WeChat Pay adapter, in process: signatures (against the wechatpayv3 SDK as an oracle and
against the simulator's verifier), notifications, the bill codec, configuration, and a few
calls through the simulator's ASGI app."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any
from unittest import mock

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wechatpayv3 import utils as sdk_utils

from forecourt.payments.providers.base import (
    BillKind,
    ChargeStatus,
    NotificationKind,
    NotificationRejected,
    PaymentProvider,
    RefundStatus,
)
from forecourt.payments.providers.wechat import (
    SHANGHAI,
    WechatPayConfig,
    WechatPayProvider,
    aead_decrypt,
    authorization,
    load_private_key,
    parse_trade_bill,
    yuan_to_fen,
)
from forecourt.sim.wechatpay import (
    ApiError,
    WechatPaySimulator,
    aead_encrypt,
    build_app,
    config_from_mapping,
)

from .wechat_support import (
    APPID,
    MCHID,
    MERCHANT_SERIAL,
    PUBLIC_KEY_ID,
    auth_code,
    keys,
    make_notification,
    out_no,
    paid_transaction,
    provider_config,
    sim_config,
)

# ---------------------------------------------------------------- request signatures


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v3/pay/transactions/codepay", '{"appid":"wx1","amount":{"total":1}}'),
        ("GET", "/v3/pay/transactions/out-trade-no/T123456?mchid=1900000109", ""),
        ("POST", "/v3/refund/domestic/refunds", '{"reason":"油品退款","out_refund_no":"R1"}'),
    ],
)
def test_authorization_equals_the_sdk_signer(method: str, path: str, body: str) -> None:
    k = keys()
    private = load_private_key(k.merchant_private_pem)
    nonce = "5K8264ILTKCH16CQ2502SI8ZNMTM67VS"
    with mock.patch.object(sdk_utils.time, "time", return_value=1_764_700_000.4):
        expected = sdk_utils.build_authorization(
            path, method, MCHID, MERCHANT_SERIAL, private, data=body or None, nonce_str=nonce
        )
    ours = authorization(
        method=method,
        url_path=path,
        body=body.encode(),
        mchid=MCHID,
        serial_no=MERCHANT_SERIAL,
        private_key=private,
        timestamp="1764700000",
        nonce=nonce,
    )
    assert ours == expected


def test_sdk_verifies_and_decrypts_what_the_simulator_sends() -> None:
    """The simulator's answer signatures and encrypted resources, checked by the SDK."""
    k = keys()
    sim = WechatPaySimulator(config_from_mapping(sim_config()))
    body = json.dumps({"trade_state": "SUCCESS"}).encode()
    headers = sim.signed_headers(body)
    public = serialization.load_pem_public_key(k.platform_public_pem.encode())
    assert sdk_utils.rsa_verify(
        headers["Wechatpay-Timestamp"],
        headers["Wechatpay-Nonce"],
        body.decode(),
        headers["Wechatpay-Signature"],
        public,
    )
    resource = aead_encrypt(k.apiv3_key, "明文 resource".encode(), "transaction")
    plain = sdk_utils.aes_decrypt(
        resource["nonce"], resource["ciphertext"], resource["associated_data"], k.apiv3_key
    )
    assert plain == "明文 resource"
    assert (
        aead_decrypt(
            k.apiv3_key, resource["nonce"], resource["ciphertext"], resource["associated_data"]
        )
        == "明文 resource".encode()
    )


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(["GET", "POST"]),
    path=st.from_regex(r"\A/v3/[a-z\-/]{1,30}(\?[a-z_]{1,8}=[0-9A-Za-z]{1,12})?\Z"),
    body=st.text(max_size=200),
    flip=st.booleans(),
)
def test_round_trip_adapter_signature_simulator_verifier(
    method: str, path: str, body: str, flip: bool
) -> None:
    """Whatever we sign, the strict simulator accepts; one changed byte and it refuses."""
    sim = WechatPaySimulator(config_from_mapping(sim_config()))
    provider = WechatPayProvider(provider_config("http://sim.invalid"))
    payload = body.encode()
    headers = provider._headers(method, path, payload)
    sent = payload + b"x" if flip else payload
    if flip:
        with pytest.raises(ApiError) as refused:
            sim.authenticate(method, path, {k.lower(): v for k, v in headers.items()}, sent)
        assert (refused.value.status, refused.value.code) == (401, "SIGN_ERROR")
    else:
        sim.authenticate(method, path, {k.lower(): v for k, v in headers.items()}, sent)


def test_simulator_refuses_stale_timestamp_and_replayed_nonce() -> None:
    sim = WechatPaySimulator(config_from_mapping(sim_config()))
    stale = WechatPayProvider(provider_config("http://x"), now=lambda: time.time() - 301)
    headers = {k.lower(): v for k, v in stale._headers("GET", "/v3/x", b"").items()}
    with pytest.raises(ApiError, match="过期"):
        sim.authenticate("GET", "/v3/x", headers, b"")
    fresh = WechatPayProvider(provider_config("http://x"))
    headers = {k.lower(): v for k, v in fresh._headers("GET", "/v3/x", b"").items()}
    sim.authenticate("GET", "/v3/x", headers, b"")
    with pytest.raises(ApiError, match="随机串重复"):
        sim.authenticate("GET", "/v3/x", headers, b"")


# ---------------------------------------------------------------- notifications


def _provider(mode: str = "certificate", **kwargs: Any) -> WechatPayProvider:
    return WechatPayProvider(provider_config("http://sim.invalid", mode=mode), **kwargs)


def test_payment_notification_is_verified_and_decrypted() -> None:
    provider = _provider()
    headers, body = make_notification(paid_transaction("T20261202001", 1234))
    note = provider.parse_notification(headers, body)
    assert note.kind is NotificationKind.PAYMENT
    assert note.out_trade_no == "T20261202001"
    assert note.charge is not None
    assert note.charge.status is ChargeStatus.PAID
    assert note.charge.amount_fen == 1234
    assert note.charge.paid_at == datetime(2026, 12, 2, 2, 0, tzinfo=UTC)
    # A re-sent notification is the same notification: the caller de-duplicates by its id.
    again = provider.parse_notification({k.lower(): v for k, v in headers.items()}, body)
    assert again.notification_id == note.notification_id


def test_refund_notification() -> None:
    resource = {
        "mchid": MCHID,
        "out_trade_no": "T20261202001",
        "transaction_id": "4200000001",
        "out_refund_no": "R20261202001",
        "refund_id": "50000001",
        "refund_status": "SUCCESS",
        "success_time": "2026-12-02T10:05:00+08:00",
        "amount": {"total": 1234, "refund": 234, "payer_total": 1234, "payer_refund": 234},
    }
    headers, body = make_notification(resource, event_type="REFUND.SUCCESS", original_type="refund")
    note = _provider().parse_notification(headers, body)
    assert note.kind is NotificationKind.REFUND
    assert note.refund is not None
    assert note.refund.status is RefundStatus.SUCCEEDED
    assert (note.refund.out_refund_no, note.refund.refund_fen) == ("R20261202001", 234)


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"signing_key_pem": "stranger"}, "bad_signature"),
        ({"timestamp": -400}, "stale_timestamp"),  # seconds from now, taken as the test runs
        ({"timestamp": +400}, "stale_timestamp"),
        ({"serial": "0123ABCD"}, "unknown_serial"),
        ({"apiv3_key": "k" * 32}, "undecryptable"),
    ],
)
def test_notification_rejected(change: dict[str, Any], code: str) -> None:
    if change.get("signing_key_pem") == "stranger":
        change = {"signing_key_pem": keys().stranger_private_pem}
    if "timestamp" in change:
        change = {"timestamp": int(time.time()) + change["timestamp"]}
    headers, body = make_notification(paid_transaction("T20261202001"), **change)
    with pytest.raises(NotificationRejected) as rejected:
        _provider().parse_notification(headers, body)
    assert rejected.value.code == code


def test_notification_tampered_body_and_missing_headers() -> None:
    provider = _provider()
    headers, body = make_notification(paid_transaction("T20261202001"))
    with pytest.raises(NotificationRejected) as rejected:
        provider.parse_notification(headers, body.replace(b"TRANSACTION", b"TRANSACTIOM"))
    assert rejected.value.code == "bad_signature"
    with pytest.raises(NotificationRejected) as rejected:
        provider.parse_notification({"Wechatpay-Nonce": "x"}, body)
    assert rejected.value.code == "missing_header"


def test_notification_of_another_merchant_rejected() -> None:
    resource = paid_transaction("T20261202001") | {"mchid": "1900000999"}
    headers, body = make_notification(resource)
    with pytest.raises(NotificationRejected) as rejected:
        _provider().parse_notification(headers, body)
    assert rejected.value.code == "wrong_merchant"


def test_public_key_mode_verifies_by_key_id() -> None:
    headers, body = make_notification(paid_transaction("T20261202001"), serial=PUBLIC_KEY_ID)
    assert _provider("public_key").parse_notification(headers, body).charge is not None
    # A certificate-only merchant does not know that key id, and the other way round.
    with pytest.raises(NotificationRejected):
        _provider("certificate").parse_notification(headers, body)
    headers, body = make_notification(paid_transaction("T20261202001"))
    with pytest.raises(NotificationRejected):
        _provider("public_key").parse_notification(headers, body)
    assert _provider("both").parse_notification(headers, body).charge is not None


def test_notification_answers() -> None:
    provider = _provider()
    ok = provider.notification_answer(True)
    assert (ok.status, ok.body) == (204, b"")
    fail = provider.notification_answer(False, "签名错误")
    assert fail.status == 500
    assert json.loads(fail.body) == {"code": "FAIL", "message": "签名错误"}


# ---------------------------------------------------------------- configuration


def test_config_rules_and_no_secrets_in_repr() -> None:
    config = provider_config("http://x")
    assert keys().apiv3_key not in repr(config)
    assert "PRIVATE" not in repr(config)
    base: dict[str, Any] = {
        "mchid": MCHID,
        "appid": APPID,
        "merchant_serial_no": MERCHANT_SERIAL,
        "merchant_private_key_pem": keys().merchant_private_pem,
    }
    with pytest.raises(ValueError, match="32 bytes"):
        WechatPayConfig(
            **base,
            apiv3_key="short",
            platform_public_key_id=PUBLIC_KEY_ID,
            platform_public_key_pem=keys().platform_public_pem,
        )
    with pytest.raises(ValueError, match="platform"):
        WechatPayConfig(**base, apiv3_key=keys().apiv3_key)
    with pytest.raises(ValueError, match="PUB_KEY_ID_"):
        WechatPayConfig(
            **base,
            apiv3_key=keys().apiv3_key,
            platform_public_key_id="KEY1",
            platform_public_key_pem=keys().platform_public_pem,
        )
    assert isinstance(WechatPayProvider(config), PaymentProvider)


async def test_our_own_mistakes_raise() -> None:
    provider = _provider()
    with pytest.raises(ValueError, match="out_trade_no"):
        await provider.charge_by_code(
            out_trade_no="bad no!", amount_fen=1, auth_code="1", description="x", store_id="S1"
        )
    with pytest.raises(ValueError, match="positive"):
        await provider.charge_by_code(
            out_trade_no="T1234567", amount_fen=0, auth_code="1", description="x", store_id="S1"
        )
    bad_amount: Any = 1.5
    with pytest.raises(ValueError, match="positive"):
        await provider.refund(
            out_trade_no="T1234567", out_refund_no="R1234567", refund_fen=bad_amount, total_fen=2
        )


# ---------------------------------------------------------------- the bill codec


_descriptions = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=40
).filter(lambda text: text == text.strip())  # a description as WeChat keeps it: no edge blanks


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    trades=st.lists(
        st.tuples(
            st.integers(min_value=1, max_value=10_000_000),
            _descriptions,
            st.lists(st.integers(min_value=1, max_value=100), max_size=3),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_bill_codec_round_trip(trades: list[tuple[int, str, list[int]]]) -> None:
    """What the simulator writes as WeChat's bill, our parser reads back line for line."""
    sim = WechatPaySimulator(config_from_mapping(sim_config(refund_delay_ms=0)))
    expected: list[tuple[BillKind, str, int, str | None]] = []
    for total, description, refund_parts in trades:
        no = out_no()
        sim.codepay(
            {
                "appid": APPID,
                "mchid": MCHID,
                "description": description,
                "out_trade_no": no,
                "payer": {"auth_code": auth_code()},
                "amount": {"total": total, "currency": "CNY"},
                "scene_info": {"store_info": {"out_id": "S1"}, "device_ip": "10.0.0.2"},
            }
        )
        expected.append((BillKind.PAYMENT, no, total, None))
        remaining = total
        for part in refund_parts:
            amount = min(part, remaining)
            if amount <= 0:
                break
            remaining -= amount
            refund_no = out_no("R")
            sim.refund(
                {
                    "out_trade_no": no,
                    "out_refund_no": refund_no,
                    "amount": {"refund": amount, "total": total, "currency": "CNY"},
                }
            )
            expected.append((BillKind.REFUND, no, amount, refund_no))
    day = datetime.now(UTC).astimezone(SHANGHAI).date()
    content = sim.bill_csv(day)
    assert content is not None
    lines = parse_trade_bill(content.decode())
    got = sorted(
        ((ln.kind, ln.out_trade_no, ln.amount_fen, ln.out_refund_no) for ln in lines), key=repr
    )
    assert got == sorted(expected, key=repr)
    assert all(line.at.tzinfo is not None for line in lines)
    by_no = {line.out_trade_no: line for line in lines if line.kind is BillKind.PAYMENT}
    for total, description, _ in trades:
        assert any(line.extra["商品名称"] == description for line in by_no.values())
        assert any(line.amount_fen == total for line in by_no.values())


def test_bill_summary_must_match() -> None:
    sim = WechatPaySimulator(config_from_mapping(sim_config()))
    sim.codepay(
        {
            "appid": APPID,
            "mchid": MCHID,
            "description": "92#",
            "out_trade_no": out_no(),
            "payer": {"auth_code": auth_code()},
            "amount": {"total": 700},
            "scene_info": {"store_info": {"out_id": "S1"}, "device_ip": "10.0.0.2"},
        }
    )
    content = sim.bill_csv(datetime.now(UTC).astimezone(SHANGHAI).date())
    assert content is not None
    text = content.decode()
    assert len(parse_trade_bill(text)) == 1
    with pytest.raises(ValueError, match="summary"):
        parse_trade_bill(text.replace("`7.00,`0.00,`0.00", "`7.01,`0.00,`0.00"))


@pytest.mark.parametrize(("text", "fen"), [("0.01", 1), ("12.34", 1234), ("100", 10000)])
def test_yuan_to_fen(text: str, fen: int) -> None:
    assert yuan_to_fen(text) == fen


def test_yuan_below_a_fen_is_refused() -> None:
    with pytest.raises(ValueError, match="below a fen"):
        yuan_to_fen("0.001")


# ---------------------------------------------------------------- through the ASGI app


@pytest.mark.parametrize("mode", ["certificate", "public_key", "both"])
async def test_charge_and_query_in_process(mode: str) -> None:
    app = build_app(sim_config(mode=mode))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
    provider = WechatPayProvider(provider_config("http://wechat.sim", mode=mode), client)
    no = out_no()
    charged = await provider.charge_by_code(
        out_trade_no=no,
        amount_fen=2599,
        auth_code=auth_code(),
        description="95# 3.2L",
        store_id="S042",
    )
    assert charged.status is ChargeStatus.PAID, charged
    assert charged.amount_fen == 2599
    assert charged.paid_at is not None
    assert charged.paid_at.utcoffset() is not None
    queried = await provider.query(no)
    assert queried.status is ChargeStatus.PAID
    assert queried.provider_trade_no == charged.provider_trade_no
    assert (await provider.query(out_no())).status is ChargeStatus.NOT_FOUND
    await client.aclose()


async def test_answer_signed_by_an_unknown_key_is_unknown() -> None:
    """A merchant configured with another platform key trusts none of the answers."""
    app = build_app(sim_config(mode="public_key"))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
    provider = WechatPayProvider(provider_config("http://wechat.sim", mode="certificate"), client)
    result = await provider.charge_by_code(
        out_trade_no=out_no(),
        amount_fen=100,
        auth_code=auth_code(),
        description="x",
        store_id="S1",
    )
    assert (result.status, result.code) == (ChargeStatus.UNKNOWN, "bad_signature")
    await client.aclose()
