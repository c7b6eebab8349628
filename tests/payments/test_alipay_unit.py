"""Fast Alipay tests: amounts, signing, answer verification, notifications, the bill parser,
and a few gateway rules through the simulator's ASGI app (no process, no socket)."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from collections.abc import AsyncIterator
from datetime import date

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from forecourt.payments.providers.alipay import (
    MAX_AMOUNT_FEN,
    AlipayConfig,
    AlipayProvider,
    fen_to_yuan,
    load_private_key,
    load_public_key,
    parse_bill_zip,
    rsa2_sign,
    rsa2_verify,
    sign_content,
    top_level_spans,
    yuan_to_fen,
)
from forecourt.payments.providers.base import (
    ChargeStatus,
    NotificationKind,
    NotificationRejected,
    PaymentProvider,
    RefundStatus,
    ReverseStatus,
)
from forecourt.sim.alipay import AlipaySimulator, build_app, config_from_mapping
from tests.payments.alipay_support import (
    APP_ID,
    auth_code,
    keys,
    out_no,
    paid_notification_params,
    provider_config,
    signed_form,
    signed_notification,
    sim_config,
)

GATEWAY = "http://alipay.test/gateway.do"


# ---------------------------------------------------------------------------- amounts


@given(st.integers(min_value=0, max_value=MAX_AMOUNT_FEN))
def test_fen_yuan_round_trip(fen: int) -> None:
    text = fen_to_yuan(fen)
    assert yuan_to_fen(text) == fen
    whole, _, cents = text.partition(".")
    assert len(cents) == 2
    assert int(whole) * 100 + int(cents) == fen


@given(st.decimals(min_value=0, max_value=10**8, places=2, allow_nan=False))
def test_yuan_text_is_read_exactly(value: object) -> None:
    text = f"{value:.2f}"
    assert fen_to_yuan(yuan_to_fen(text)) == text


@pytest.mark.parametrize(
    "text", ["1", "1.5", "1.234", "-1.00", "1e2", " 1.00", "01.00", "1,00", "", "NaN", "+1.00"]
)
def test_yuan_refuses_other_shapes(text: str) -> None:
    with pytest.raises(ValueError, match="yuan"):
        yuan_to_fen(text)


@pytest.mark.parametrize("fen", [-1, 1.5, True, "100"])
def test_fen_refuses_non_integers(fen: object) -> None:
    with pytest.raises(ValueError, match="fen"):
        fen_to_yuan(fen)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- signing


def test_sign_content_sorts_and_skips() -> None:
    params = {"b": "2", "a": "1", "sign": "x", "empty": "", "sign_type": "RSA2"}
    assert sign_content(params) == "a=1&b=2&sign_type=RSA2"
    assert sign_content(params, exclude=("sign", "sign_type")) == "a=1&b=2"


def test_keys_load_as_pem_or_bare_base64() -> None:
    k = keys()
    private = load_private_key(k.app_private_pem)
    bare = "".join(k.app_private_pem.strip().splitlines()[1:-1])
    assert load_private_key(bare).private_numbers() == private.private_numbers()
    public_bare = "".join(k.app_public_pem.strip().splitlines()[1:-1])
    signature = rsa2_sign(private, "a=1")
    assert rsa2_verify(load_public_key(public_bare), "a=1", signature)
    assert not rsa2_verify(load_public_key(public_bare), "a=2", signature)
    assert not rsa2_verify(load_public_key(public_bare), "a=1", "not base64!")


def test_top_level_spans_are_the_raw_text() -> None:
    body = '{ "x_response" : {"b": "中文", "a":[1, 2]} ,\n"sign":"abc"}'
    spans = top_level_spans(body)
    start, end = spans["x_response"]
    assert body[start:end] == '{"b": "中文", "a":[1, 2]}'
    start, end = spans["sign"]
    assert body[start:end] == '"abc"'
    for bad in ["[1]", '{"a":1', '{"a":1}x', '{"a":1,"a":2}', "{a:1}"]:
        with pytest.raises(ValueError, match=r"."):
            top_level_spans(bad)


def test_config_hides_keys() -> None:
    config = provider_config(GATEWAY)
    assert "PRIVATE" not in repr(config)
    with pytest.raises(ValueError, match="app_id"):
        AlipayConfig(app_id="", app_private_key_pem="", alipay_public_key_pem="")


def test_provider_is_a_payment_provider() -> None:
    assert isinstance(AlipayProvider(provider_config(GATEWAY)), PaymentProvider)


def test_sdk_signatures_agree() -> None:
    """The official SDK (alipay-sdk-python) signs and verifies as we do."""
    utils = pytest.importorskip("alipay.aop.api.util.SignatureUtils")
    k = keys()
    adapter = AlipayProvider(provider_config(GATEWAY))
    params = adapter.signed_params(
        "alipay.trade.pay",
        {"out_trade_no": "T0001", "total_amount": "12.34", "subject": "92号汽油"},
        notify_url="https://example.test/alipay/notify",
    )
    unsigned = {key: value for key, value in params.items() if key != "sign"}
    assert utils.get_sign_content(unsigned) == sign_content(params)
    # The SDK takes the bare base64 body of a PKCS#1 key.
    pkcs1 = (
        load_private_key(k.app_private_pem)
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        .decode()
    )
    body = "".join(pkcs1.strip().splitlines()[1:-1])
    assert utils.sign_with_rsa2(body, sign_content(params), "utf-8") == params["sign"]
    # The SDK verifies what Alipay (here: the simulator's key) signs, over the raw JSON text.
    alipay_private = load_private_key(k.alipay_private_pem)
    raw = '{"code":"10000","msg":"Success","total_amount":"12.34","subject":"92号汽油"}'
    signature = rsa2_sign(alipay_private, raw)
    public_body = "".join(k.alipay_public_pem.strip().splitlines()[1:-1])
    assert utils.verify_with_rsa(public_body, raw.encode("utf-8"), signature)


# ---------------------------------------------------------------------------- notifications


@pytest.fixture
def adapter() -> AlipayProvider:
    return AlipayProvider(provider_config(GATEWAY))


def test_notification_payment(adapter: AlipayProvider) -> None:
    headers, body = signed_notification(paid_notification_params("T123456"))
    note = adapter.parse_notification(headers, body)
    assert note.kind is NotificationKind.PAYMENT
    assert note.out_trade_no == "T123456"
    assert note.charge is not None
    assert note.charge.status is ChargeStatus.PAID
    assert note.charge.amount_fen == 1234
    assert note.charge.paid_at is not None
    assert note.charge.paid_at.utcoffset() is not None


def test_notification_refund(adapter: AlipayProvider) -> None:
    params = paid_notification_params(
        "T123456", out_biz_no="RF-1-abc", refund_fee="2.00", gmt_refund="2026-12-02 11:00:00"
    )
    note = adapter.parse_notification(*signed_notification(params))
    assert note.kind is NotificationKind.REFUND
    assert note.refund is not None
    assert note.refund.status is RefundStatus.SUCCEEDED
    assert note.refund.out_refund_no == "RF-1-abc"
    assert note.charge is not None
    assert note.charge.refunded_fen == 200


def test_a_cancel_that_refunded_a_paid_trade_is_the_trade_closing_not_a_refund(
    adapter: AlipayProvider,
) -> None:
    # trade.cancel of a paid trade refunds it: the notification has gmt_refund and the
    # refunded total but no out_biz_no, since HQ asked for no refund.
    params = paid_notification_params(
        "T123456", trade_status="TRADE_CLOSED", refund_fee="12.34", gmt_refund="2026-12-02 11:00:00"
    )
    note = adapter.parse_notification(*signed_notification(params))
    assert note.kind is NotificationKind.PAYMENT
    assert note.refund is None
    assert note.charge is not None
    assert note.charge.status is ChargeStatus.CLOSED


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"total_amount": "1.00"}, "bad_signature"),  # changed after signing
        ({"sign": ""}, "bad_signature"),
        ({"sign_type": "RSA"}, "bad_signature"),
    ],
)
def test_notification_tampered(adapter: AlipayProvider, change: dict[str, str], code: str) -> None:
    headers, body = signed_notification(paid_notification_params("T123456"))
    form = dict(httpx.QueryParams(body.decode()))
    form.update(change)
    with pytest.raises(NotificationRejected) as raised:
        adapter.parse_notification(headers, str(httpx.QueryParams(form)).encode())
    assert raised.value.code == code


def test_notification_rejections(adapter: AlipayProvider) -> None:
    k = keys()
    cases = [
        (
            signed_notification(
                paid_notification_params("T123456"), private_pem=k.stranger_private_pem
            ),
            "bad_signature",
        ),
        (
            signed_notification(paid_notification_params("T123456", app_id="2021000000000000")),
            "wrong_app",
        ),
        (
            signed_notification(paid_notification_params("T123456", seller_id="2088000000000009")),
            "wrong_seller",
        ),
        (
            signed_notification(paid_notification_params("T123456", trade_status="WHATEVER")),
            "malformed",
        ),
        (signed_notification(paid_notification_params("T123456", total_amount="1.5")), "malformed"),
        (({"content-type": "application/json"}, b"{}"), "malformed"),
    ]
    for (headers, body), code in cases:
        with pytest.raises(NotificationRejected) as raised:
            adapter.parse_notification(headers, body)
        assert raised.value.code == code


def test_notification_signed_with_sign_type_is_rejected(adapter: AlipayProvider) -> None:
    """Notifications leave ``sign_type`` out of the signed text (unlike requests)."""
    params = paid_notification_params("T123456")
    params["sign_type"] = "RSA2"
    key = load_private_key(keys().alipay_private_pem)
    params["sign"] = rsa2_sign(key, sign_content(params))  # sign_type included: wrong
    body = str(httpx.QueryParams(params)).encode()
    with pytest.raises(NotificationRejected):
        adapter.parse_notification({"content-type": "application/x-www-form-urlencoded"}, body)


def test_notification_answer(adapter: AlipayProvider) -> None:
    ok = adapter.notification_answer(True)
    assert (ok.status, ok.body) == (200, b"success")
    assert ok.content_type.startswith("text/plain")
    assert adapter.notification_answer(False, "nope").body == b"fail"


# ---------------------------------------------------------------------------- bill


def test_bill_zip_with_gbk_names_and_content() -> None:
    header = (
        "支付宝交易号,商户订单号,业务类型,商品名称,创建时间,完成时间,门店编号,门店名称,操作员,"
        "终端号,对方账户,订单金额（元）,商家实收（元）,支付宝红包（元）,集分宝（元）,"
        "支付宝优惠（元）,商家优惠（元）,券核销金额（元）,券名称,商家红包消费金额（元）,"
        "卡消费金额（元）,退款批次号/请求号,服务费（元）,分润（元）,备注"
    )
    zeros = ["0.00"] * 5 + [""] + ["0.00"] * 2
    pay = [
        "2026120222001\t",
        "T0001\t",
        "交易",
        "92号",
        "2026-12-01 10:00:00",
        "2026-12-01 10:00:02",
        "",
        "",
        "",
        "",
        "a***@x",
        "12.30",
        "12.30",
        *zeros,
        "",
        "-0.07",
        "0.00",
        "",
    ]
    ref = [
        "2026120222001\t",
        "T0001\t",
        "退款",
        "92号",
        "2026-12-01 10:00:00",
        "2026-12-01 12:00:00",
        "",
        "",
        "",
        "",
        "a***@x",
        "12.30",
        "-2.30",
        *zeros,
        "RF-1\t",
        "0.01",
        "0.00",
        "",
    ]
    text = "\r\n".join(
        [
            "#支付宝业务明细查询",
            "#账号：[2088]",
            header,
            ",".join(pay),
            ",".join(ref),
            "#交易合计：1笔",
        ]
    )
    # Names in GBK without the UTF-8 flag, as Alipay's files come: written under ASCII
    # placeholders of the same length, then the name bytes swapped (the CRC covers content only).
    detail_name = "2088_20261201_业务明细.csv".encode("gbk")
    summary_name = "2088_20261201_业务明细(汇总).csv".encode("gbk")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("D" * len(detail_name), text.encode("gbk"))
        archive.writestr("S" * len(summary_name), "#支付宝业务汇总查询".encode("gbk"))
    raw = buffer.getvalue()
    raw = raw.replace(b"D" * len(detail_name), detail_name)
    raw = raw.replace(b"S" * len(summary_name), summary_name)
    buffer = io.BytesIO(raw)
    lines = parse_bill_zip(buffer.getvalue())
    assert [(line.kind.value, line.amount_fen, line.out_refund_no) for line in lines] == [
        ("payment", 1230, None),
        ("refund", 230, "RF-1"),
    ]
    assert lines[0].out_trade_no == "T0001"
    assert lines[0].provider_trade_no == "2026120222001"


# ---------------------------------------------------------------------------- via ASGI


@pytest.fixture
async def asgi() -> AsyncIterator[tuple[httpx.AsyncClient, AlipaySimulator]]:
    app = build_app(sim_config())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://alipay.test") as client:
        yield client, app.state.sim


async def test_asgi_pay_and_query(asgi: tuple[httpx.AsyncClient, AlipaySimulator]) -> None:
    client, sim = asgi
    adapter = AlipayProvider(provider_config(GATEWAY), client=client)
    out_trade_no = out_no()
    result = await adapter.charge_by_code(
        out_trade_no=out_trade_no,
        amount_fen=1,
        auth_code=auth_code(),
        description="x",
        store_id="S",
    )
    assert result.status is ChargeStatus.PAID
    assert result.amount_fen == 1
    assert sim.trades[out_trade_no].charged_times == 1


async def test_asgi_cancel_of_nothing_and_subject(
    asgi: tuple[httpx.AsyncClient, AlipaySimulator],
) -> None:
    client, sim = asgi
    adapter = AlipayProvider(provider_config(GATEWAY), client=client)
    nothing = await adapter.reverse(out_no())
    assert nothing.status is ReverseStatus.REVERSED
    assert nothing.code == "40004/ACQ.TRADE_NOT_EXIST"
    out_trade_no = out_no()
    await adapter.charge_by_code(
        out_trade_no=out_trade_no,
        amount_fen=100,
        auth_code=auth_code(),
        description="92#/95# a=b & c",
        store_id="S",
    )
    assert sim.trades[out_trade_no].subject == "92# 95# a b c"


@pytest.mark.parametrize(
    ("change", "sub_code"),
    [
        ({"method": ""}, "isv.missing-method"),
        ({"method": "alipay.trade.nothing"}, "isv.invalid-method"),
        ({"app_id": "2021000000000000"}, "isv.invalid-app-id"),
        ({"sign": ""}, "isv.missing-signature"),
        ({"sign_type": "RSA"}, "isv.invalid-signature-type"),
        ({"charset": "latin-1"}, "isv.invalid-charset"),
        ({"timestamp": "2026/12/02 10:00:00"}, "isv.invalid-timestamp"),
        ({"version": "2.0"}, "isv.invalid-parameter"),
    ],
)
async def test_asgi_gateway_refusals(
    asgi: tuple[httpx.AsyncClient, AlipaySimulator], change: dict[str, str], sub_code: str
) -> None:
    client, _ = asgi
    form = signed_form("alipay.trade.query", {"out_trade_no": out_no()})
    form.update(change)
    answer = (await client.post("/gateway.do", data=form)).json()
    [(key, inner)] = answer.items()
    assert key.endswith("_response")
    assert inner["sub_code"] == sub_code
    assert inner["code"] in {"40001", "40002"}


async def test_asgi_business_checks(asgi: tuple[httpx.AsyncClient, AlipaySimulator]) -> None:
    client, _ = asgi

    async def pay(**biz: str) -> dict[str, str]:
        base = {
            "out_trade_no": out_no(),
            "scene": "bar_code",
            "auth_code": auth_code(),
            "subject": "x",
            "total_amount": "1.00",
        }
        base.update(biz)
        body = (await client.post("/gateway.do", data=signed_form("alipay.trade.pay", base))).json()
        result: dict[str, str] = body["alipay_trade_pay_response"]
        return result

    for amount in ["0.00", "0.001", "100000000.01", "-1.00", "abc"]:
        answer = await pay(total_amount=amount)
        assert answer["sub_code"] == "ACQ.INVALID_PARAMETER", amount
    assert (await pay(total_amount="100000000.00"))["code"] == "10000"
    assert (await pay(total_amount="12.3"))["code"] == "10000"
    assert (await pay(scene="wave_code"))["sub_code"] == "ACQ.INVALID_PARAMETER"
    assert (await pay(auth_code="3112345678901234"))["sub_code"] == "ACQ.PAYMENT_AUTH_CODE_INVALID"
    # A parameter sent twice (query string and body).
    form = signed_form("alipay.trade.query", {"out_trade_no": out_no()})
    answer = (await client.post(f"/gateway.do?app_id={APP_ID}", data=form)).json()
    assert answer["error_response"]["sub_code"] == "isv.invalid-parameter"


async def test_asgi_control_validates(asgi: tuple[httpx.AsyncClient, AlipaySimulator]) -> None:
    client, sim = asgi
    bad = await client.post("/sim/control", json={"faults": {"error_5xx_rate": 2}})
    assert bad.status_code == 400
    bad = await client.post("/sim/control", json={"faults": {"nope": 1}})
    assert bad.status_code == 400
    good = await client.post("/sim/control", json={"faults": {"slow_ms": 5, "timeout": False}})
    assert good.status_code == 200
    assert sim.faults.slow_ms == 5
    await client.post("/sim/control", json={"faults": {"slow_ms": None}})
    assert sim.faults.slow_ms == 0


def test_sim_config_is_checked() -> None:
    with pytest.raises(Exception, match="app_id"):
        config_from_mapping({})
    with pytest.raises(Exception, match="seller_id"):
        config_from_mapping(sim_config(seller_id="123"))


def test_bill_of_a_quiet_day_is_empty() -> None:
    sim = AlipaySimulator(config_from_mapping(sim_config()))
    assert parse_bill_zip(sim.bill_zip(date(2026, 1, 1))) == []


def test_answer_signature_covers_raw_text() -> None:
    """The sim signs the raw ``..._response`` text; a re-spaced body fails verification."""
    from forecourt.sim.alipay import encode_answer

    sim = AlipaySimulator(config_from_mapping(sim_config()))
    body = encode_answer(
        sim, "alipay.trade.query", {"code": "10000", "msg": "Success"}, signed=True
    )
    decoded = json.loads(body)
    public = load_public_key(keys().alipay_public_pem)
    inner = '{"code":"10000","msg":"Success"}'
    assert rsa2_verify(public, inner, decoded["sign"])
    assert not rsa2_verify(public, '{"code": "10000", "msg": "Success"}', decoded["sign"])
    assert base64.b64decode(decoded["sign"])
