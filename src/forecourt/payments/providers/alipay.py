"""Alipay open platform adapter (当面付, payment codes: scene ``bar_code``), over the gateway.

Every call is one form POST to the gateway (``https://openapi.alipay.com/gateway.do``) with the
common parameters ``app_id, method, format=JSON, charset=utf-8, sign_type=RSA2, timestamp
(yyyy-MM-dd HH:mm:ss, Asia/Shanghai), version=1.0, [notify_url], biz_content (JSON), sign``.

Signing (RSA2): the parameters other than ``sign`` whose value is not empty, sorted by name,
joined as ``k=v&k=v`` (raw values, not URL-encoded), signed with the app's private key (RSA
PKCS#1 v1.5 over SHA-256) and base64-encoded. The answer is ``{"<method>_response": {...},
"sign": "..."}`` (``error_response`` for some gateway errors); its signature is over the exact
raw JSON text of the ``..._response`` value as it stands in the body, verified with the Alipay
public key. Asynchronous notifications are forms signed the same way over every parameter but
``sign`` and ``sign_type``.

Outcomes (see :mod:`.base`): an answer that is not signed, or whose signature does not verify,
is ``UNKNOWN`` with ``code="bad_signature"`` whatever it claims (Alipay does not sign some
gateway refusals, e.g. ``isv.invalid-signature``; ``message`` then carries its codes). Codes
are reported as ``"<code>"`` or ``"<code>/<sub_code>"`` (e.g. ``"40004/ACQ.TRADE_NOT_EXIST"``).

- ``alipay.trade.pay``: 10000 -> PAID; 10003 -> USER_PAYING (the handler polls
  :meth:`AlipayProvider.query`, then :meth:`AlipayProvider.reverse`); 20000, 40004
  ``ACQ.SYSTEM_ERROR`` and ``ACQ.TRADE_HAS_SUCCESS`` (this ``out_trade_no`` is already paid,
  perhaps by our own earlier unanswered try) -> UNKNOWN (query it); other 40004 and the
  gateway's 20001/40001/40002/40006 -> REFUSED (not charged).
- ``alipay.trade.query``: ``TRADE_SUCCESS``/``TRADE_FINISHED`` -> PAID, ``WAIT_BUYER_PAY`` ->
  USER_PAYING, ``TRADE_CLOSED`` -> CLOSED (unpaid and closed, cancelled, or fully refunded),
  40004 ``ACQ.TRADE_NOT_EXIST`` -> NOT_FOUND.
- ``alipay.trade.cancel``: 10000 with ``retry_flag=Y`` or 40004 ``ACQ.SYSTEM_ERROR`` -> RETRY,
  10000 ``retry_flag=N`` -> REVERSED (``message`` has ``action`` close/refund), 40004
  ``ACQ.TRADE_NOT_EXIST`` -> REVERSED (nothing to cancel), other 40004 (too late: refund
  instead, seller balance short, frozen) -> REFUSED.
- ``alipay.trade.refund`` (``out_request_no`` = our ``out_refund_no``: Alipay de-duplicates by
  it): 10000 ``fund_change=Y`` -> SUCCEEDED; ``fund_change=N`` (a repeat) -> the refund is
  looked up with ``alipay.trade.fastpay.refund.query``; 20000 / ``ACQ.SYSTEM_ERROR`` ->
  UNKNOWN; other 40004 (``ACQ.REFUND_AMT_NOT_EQUAL_TOTAL``: more than is left,
  ``ACQ.DISCORDANT_REPEAT_REQUEST``, ``ACQ.TRADE_STATUS_ERROR`` ...) -> REFUSED.
- ``alipay.trade.fastpay.refund.query``: data with ``refund_status`` ``REFUND_SUCCESS`` (or no
  status) -> SUCCEEDED; 10000 without data or ``ACQ.TRADE_NOT_EXIST`` -> NOT_FOUND.

The trade bill has no outcome type in the contract: :meth:`AlipayProvider.trade_bill` raises
:class:`BillUnavailable` (with ``code``) when the bill cannot be had or read.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import logging
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl, urlsplit
from zoneinfo import ZoneInfo

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from forecourt.payments.providers.base import (
    OUT_NO,
    BillKind,
    BillLine,
    ChargeResult,
    ChargeStatus,
    HttpAnswer,
    Notification,
    NotificationKind,
    NotificationRejected,
    RefundResult,
    RefundStatus,
    ReverseResult,
    ReverseStatus,
)
from forecourt.payments.tracing import provider_call
from forecourt.payments.tracing import trace_headers as current_trace_headers

logger = logging.getLogger("forecourt.payments.alipay")

SHANGHAI = ZoneInfo("Asia/Shanghai")
PRODUCTION_GATEWAY = "https://openapi.alipay.com/gateway.do"
SANDBOX_GATEWAY = "https://openapi-sandbox.dl.alipaydev.com/gateway.do"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"

#: The highest amount Alipay accepts for one trade (total_amount in [0.01, 100000000]).
MAX_AMOUNT_FEN = 100_000_000_00
_YUAN = re.compile(r"^(0|[1-9][0-9]*)\.([0-9]{2})$")
_TIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")

#: The detail file of the trade bill (业务明细), its columns as Alipay documents them.
BILL_COLUMNS = (
    "支付宝交易号,商户订单号,业务类型,商品名称,创建时间,完成时间,门店编号,门店名称,操作员,终端号,"
    "对方账户,订单金额（元）,商家实收（元）,支付宝红包（元）,集分宝（元）,支付宝优惠（元）,"
    "商家优惠（元）,券核销金额（元）,券名称,商家红包消费金额（元）,卡消费金额（元）,"
    "退款批次号/请求号,服务费（元）,分润（元）,备注"
).split(",")


# ---------------------------------------------------------------------------- amounts


def fen_to_yuan(fen: int) -> str:
    """Integer fen -> Alipay's yuan text with exactly two decimals (``1234`` -> ``"12.34"``)."""
    if isinstance(fen, bool) or not isinstance(fen, int) or fen < 0:
        raise ValueError(f"not a fen amount: {fen!r}")
    return f"{fen // 100}.{fen % 100:02d}"


def yuan_to_fen(text: str) -> int:
    """Alipay's yuan text (two decimals exactly, no sign, no exponent) -> integer fen."""
    if not isinstance(text, str):
        raise ValueError(f"not a yuan amount: {text!r}")
    match = _YUAN.match(text)
    if match is None:
        raise ValueError(f"not a yuan amount with two decimals: {text!r}")
    return int(match.group(1)) * 100 + int(match.group(2))


def _bill_yuan_to_fen(text: str) -> int:
    """A bill amount (``-5.50``, ``12.3``, ``0``): exact, signed, at most two decimals."""
    cleaned = text.strip().strip("\t")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        raise ValueError(f"not an amount: {text!r}") from None
    if not value.is_finite():
        raise ValueError(f"not an amount: {text!r}")
    fen = value * 100
    if fen != fen.to_integral_value():
        raise ValueError(f"amount below a fen: {text!r}")
    return int(fen)


# ---------------------------------------------------------------------------- signatures


def load_private_key(pem: str) -> rsa.RSAPrivateKey:
    """An RSA private key as PEM (PKCS#1 or PKCS#8), or the bare base64 body Alipay's key tool
    gives (PKCS#8 or PKCS#1)."""
    text = pem.strip()
    data = text.encode()
    try:
        if text.startswith("-----"):
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(base64.b64decode(text), password=None)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise ValueError("the app private key does not load") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("the app private key must be an RSA key")
    return key


def load_public_key(pem: str) -> rsa.RSAPublicKey:
    """An RSA public key as PEM (SubjectPublicKeyInfo) or its bare base64 body."""
    text = pem.strip()
    try:
        if text.startswith("-----"):
            key = serialization.load_pem_public_key(text.encode())
        else:
            key = serialization.load_der_public_key(base64.b64decode(text))
    except (ValueError, TypeError, binascii.Error) as exc:
        raise ValueError("the public key does not load") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("the public key must be an RSA key")
    return key


def sign_content(params: Mapping[str, str], exclude: tuple[str, ...] = ("sign",)) -> str:
    """The text Alipay signs: non-empty parameters but ``exclude``, sorted, ``k=v&k=v``."""
    return "&".join(
        f"{key}={params[key]}" for key in sorted(params) if key not in exclude and params[key]
    )


def rsa2_sign(key: rsa.RSAPrivateKey, content: str | bytes) -> str:
    data = content.encode("utf-8") if isinstance(content, str) else content
    return base64.b64encode(key.sign(data, padding.PKCS1v15(), hashes.SHA256())).decode()


def rsa2_verify(key: rsa.RSAPublicKey, content: str | bytes, signature_b64: str) -> bool:
    data = content.encode("utf-8") if isinstance(content, str) else content
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


def top_level_spans(body: str) -> dict[str, tuple[int, int]]:
    """The exact text span of each top-level member's value in a JSON object (raises
    ``ValueError`` on anything else): Alipay signs the raw text, not a re-serialisation."""
    decoder = json.JSONDecoder()
    whitespace = " \t\n\r"
    i = 0
    n = len(body)

    def skip(k: int) -> int:
        while k < n and body[k] in whitespace:
            k += 1
        return k

    i = skip(i)
    if i >= n or body[i] != "{":
        raise ValueError("the answer is not a JSON object")
    spans: dict[str, tuple[int, int]] = {}
    i = skip(i + 1)
    if i < n and body[i] == "}":
        return spans
    while True:
        if i >= n or body[i] != '"':
            raise ValueError("a member name was expected")
        name, i = json.decoder.scanstring(body, i + 1)  # type: ignore[attr-defined]
        i = skip(i)
        if i >= n or body[i] != ":":
            raise ValueError("':' was expected")
        i = skip(i + 1)
        _, end = decoder.raw_decode(body, i)
        if name in spans:
            raise ValueError(f"member {name!r} twice")
        spans[name] = (i, end)
        i = skip(end)
        if i < n and body[i] == ",":
            i = skip(i + 1)
            continue
        if i < n and body[i] == "}":
            break
        raise ValueError("',' or '}' was expected")
    if skip(i + 1) != n:
        raise ValueError("text after the JSON object")
    return spans


# ---------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class AlipayConfig:
    """One Alipay app: its id, its private key (we sign), Alipay's public key (we verify)."""

    app_id: str
    app_private_key_pem: str
    alipay_public_key_pem: str
    gateway_url: str = PRODUCTION_GATEWAY
    notify_url: str | None = None
    timeout_s: float = 10.0
    seller_id: str | None = None  # the merchant's 2088... PID: notifications must name it

    def __post_init__(self) -> None:
        if not self.app_id:
            raise ValueError("app_id is required")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if urlsplit(self.gateway_url).scheme not in {"http", "https"}:
            raise ValueError("gateway_url must be an http(s) URL")
        if self.notify_url is not None and urlsplit(self.notify_url).scheme not in {
            "http",
            "https",
        }:
            raise ValueError("notify_url must be an http(s) URL")

    def __repr__(self) -> str:  # keys stay out of logs and tracebacks
        return (
            f"AlipayConfig(app_id={self.app_id!r}, gateway_url={self.gateway_url!r}, "
            f"notify_url={self.notify_url!r}, timeout_s={self.timeout_s!r}, "
            f"seller_id={self.seller_id!r})"
        )


class BillUnavailable(Exception):
    """The trade bill could not be had or read (``code``: ``timeout``, ``network``,
    ``http_5xx``, ``bad_signature``, ``malformed``, or Alipay's ``<code>/<sub_code>``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class _Answer:
    """A verified ``..._response`` object."""

    data: Mapping[str, Any]

    @property
    def code(self) -> str:
        return _s(self.data.get("code")) or ""

    @property
    def sub_code(self) -> str:
        return _s(self.data.get("sub_code")) or ""

    @property
    def full_code(self) -> str:
        return f"{self.code}/{self.sub_code}" if self.sub_code else self.code

    @property
    def message(self) -> str:
        parts = [_s(self.data.get("msg")) or "", _s(self.data.get("sub_msg")) or ""]
        return _one_line(" - ".join(part for part in parts if part))


@dataclass(frozen=True, slots=True)
class _NoAnswer:
    """No trustworthy answer: ``code`` is ours (timeout, network, http_5xx, bad_signature,
    malformed)."""

    code: str
    message: str


_GATEWAY_REFUSALS = {"20001", "40001", "40002", "40006"}


# ---------------------------------------------------------------------------- provider


class AlipayProvider:
    """:class:`~forecourt.payments.providers.base.PaymentProvider` for Alipay."""

    name = "alipay"

    def __init__(self, config: AlipayConfig, client: httpx.AsyncClient | None = None) -> None:
        self.config = config
        self._private = load_private_key(config.app_private_key_pem)
        self._alipay_public = load_public_key(config.alipay_public_key_pem)
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(timeout=config.timeout_s)

    # ------------------------------------------------------------------ transport

    def signed_params(
        self, method: str, biz: Mapping[str, Any], *, notify_url: str | None = None
    ) -> dict[str, str]:
        """The complete signed form of one gateway call."""
        params = {
            "app_id": self.config.app_id,
            "method": method,
            "format": "JSON",
            "charset": "utf-8",
            "sign_type": "RSA2",
            "timestamp": datetime.now(SHANGHAI).strftime(TIME_FORMAT),
            "version": "1.0",
            "biz_content": json.dumps(biz, ensure_ascii=False, separators=(",", ":")),
        }
        if notify_url:
            params["notify_url"] = notify_url
        params["sign"] = rsa2_sign(self._private, sign_content(params))
        return params

    async def _call(
        self,
        method: str,
        biz: Mapping[str, Any],
        *,
        notify_url: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> _Answer | _NoAnswer:
        params = self.signed_params(method, biz, notify_url=notify_url)
        # The trace context of the current call's span (or the one given): headers, not
        # parameters, so the signature (over the parameters) is as it was.
        sent_headers = _trace_only(headers or current_trace_headers())
        sent_headers["content-type"] = "application/x-www-form-urlencoded;charset=utf-8"
        try:
            response = await self._client.post(
                self.config.gateway_url,
                data=params,
                headers=sent_headers,
                timeout=self.config.timeout_s,
            )
        except httpx.TimeoutException:
            return _NoAnswer("timeout", f"{method}: no answer in {self.config.timeout_s} s")
        except httpx.HTTPError as exc:
            return _NoAnswer("network", f"{method}: {type(exc).__name__}")
        if response.status_code >= 500:
            return _NoAnswer("http_5xx", f"{method}: HTTP {response.status_code}")
        if response.status_code != 200:
            return _NoAnswer("malformed", f"{method}: HTTP {response.status_code}")
        return self._verify_answer(method, response.content)

    def _verify_answer(self, method: str, content: bytes) -> _Answer | _NoAnswer:
        try:
            body = content.decode("utf-8")
            spans = top_level_spans(body)
        except (UnicodeDecodeError, ValueError) as exc:
            return _NoAnswer("malformed", f"{method}: {exc}")
        key = method.replace(".", "_") + "_response"
        if key not in spans:
            key = "error_response"
        if key not in spans:
            return _NoAnswer("malformed", f"{method}: no {method.replace('.', '_')}_response")
        start, end = spans[key]
        raw = body[start:end]
        try:
            data = json.loads(raw)
        except ValueError:  # pragma: no cover - top_level_spans decoded it already
            return _NoAnswer("malformed", f"{method}: answer unreadable")
        if not isinstance(data, dict):
            return _NoAnswer("malformed", f"{method}: {key} is not an object")
        said = _Answer(data)
        sign = None
        if "sign" in spans:
            sign_start, sign_end = spans["sign"]
            sign = json.loads(body[sign_start:sign_end])
        if not isinstance(sign, str) or not sign:
            return _NoAnswer(
                "bad_signature",
                _one_line(f"{method}: unsigned answer {said.full_code} {said.message}"),
            )
        if not rsa2_verify(self._alipay_public, raw.encode("utf-8"), sign):
            logger.warning("alipay answer signature does not verify", extra={"method": method})
            return _NoAnswer("bad_signature", f"{method}: the answer's signature does not verify")
        return said

    # ------------------------------------------------------------------ payments

    @provider_call("charge")
    async def charge_by_code(
        self,
        *,
        out_trade_no: str,
        amount_fen: int,
        auth_code: str,
        description: str,
        store_id: str,
        payer_ip: str | None = None,
        trace_headers: Mapping[str, str] | None = None,
    ) -> ChargeResult:
        del payer_ip  # alipay.trade.pay has no payer IP parameter
        _check_out_no(out_trade_no, "out_trade_no")
        if isinstance(amount_fen, bool) or not isinstance(amount_fen, int):
            raise ValueError("amount_fen must be an integer")
        if not 1 <= amount_fen <= MAX_AMOUNT_FEN:
            raise ValueError("amount_fen must be within 1 .. 10^10 fen")
        if not auth_code or not auth_code.isascii():
            raise ValueError("auth_code is required")
        # Alipay refuses "/", "=" and "&" in a subject.
        subject = " ".join(re.sub(r"[/=&]", " ", description).split()) or store_id
        biz: dict[str, Any] = {
            "out_trade_no": out_trade_no,
            "scene": "bar_code",
            "auth_code": auth_code,
            "product_code": "FACE_TO_FACE_PAYMENT",
            "subject": subject[:256],
            "total_amount": fen_to_yuan(amount_fen),
            "store_id": store_id,
        }
        if self.config.seller_id:
            biz["seller_id"] = self.config.seller_id
        answer = await self._call(
            "alipay.trade.pay", biz, notify_url=self.config.notify_url, headers=trace_headers
        )
        if isinstance(answer, _NoAnswer):
            return ChargeResult(
                status=ChargeStatus.UNKNOWN,
                out_trade_no=out_trade_no,
                code=answer.code,
                message=answer.message,
            )
        code = answer.code
        if code in {"10000", "10003"}:
            if _s(answer.data.get("out_trade_no")) not in {None, out_trade_no}:
                return _unknown_charge(out_trade_no, "malformed", "answer for another trade")
            try:
                result = self._charge_from(answer, out_trade_no)
            except ValueError as exc:
                return _unknown_charge(out_trade_no, "malformed", str(exc))
            status = ChargeStatus.PAID if code == "10000" else ChargeStatus.USER_PAYING
            return _replace_status(result, status)
        if code == "20000" or (
            code == "40004" and answer.sub_code in {"ACQ.SYSTEM_ERROR", "ACQ.TRADE_HAS_SUCCESS"}
        ):
            return ChargeResult(
                status=ChargeStatus.UNKNOWN,
                out_trade_no=out_trade_no,
                code=answer.full_code,
                message=answer.message,
            )
        if code == "40004" or code in _GATEWAY_REFUSALS:
            return ChargeResult(
                status=ChargeStatus.REFUSED,
                out_trade_no=out_trade_no,
                code=answer.full_code,
                message=answer.message,
            )
        return _unknown_charge(out_trade_no, "malformed", f"unexpected code {answer.full_code}")

    def _charge_from(self, answer: _Answer, out_trade_no: str) -> ChargeResult:
        data = answer.data
        total = _s(data.get("total_amount"))
        paid_at = _s(data.get("gmt_payment")) or _s(data.get("send_pay_date"))
        return ChargeResult(
            status=ChargeStatus.UNKNOWN,
            out_trade_no=out_trade_no,
            provider_trade_no=_s(data.get("trade_no")),
            amount_fen=yuan_to_fen(total) if total else None,
            paid_at=parse_time(paid_at) if paid_at else None,
            payer=_s(data.get("buyer_user_id")) or _s(data.get("buyer_logon_id")),
            code=answer.full_code,
            message=answer.message,
        )

    @provider_call("query")
    async def query(self, out_trade_no: str) -> ChargeResult:
        _check_out_no(out_trade_no, "out_trade_no")
        answer = await self._call("alipay.trade.query", {"out_trade_no": out_trade_no})
        if isinstance(answer, _NoAnswer):
            return _unknown_charge(out_trade_no, answer.code, answer.message)
        if answer.code == "10000":
            if _s(answer.data.get("out_trade_no")) not in {None, out_trade_no}:
                return _unknown_charge(out_trade_no, "malformed", "answer for another trade")
            trade_status = _s(answer.data.get("trade_status")) or ""
            status = {
                "TRADE_SUCCESS": ChargeStatus.PAID,
                "TRADE_FINISHED": ChargeStatus.PAID,
                "WAIT_BUYER_PAY": ChargeStatus.USER_PAYING,
                "TRADE_CLOSED": ChargeStatus.CLOSED,
            }.get(trade_status)
            if status is None:
                return _unknown_charge(out_trade_no, "malformed", f"trade_status {trade_status!r}")
            try:
                result = self._charge_from(answer, out_trade_no)
            except ValueError as exc:
                return _unknown_charge(out_trade_no, "malformed", str(exc))
            return ChargeResult(
                status=status,
                out_trade_no=out_trade_no,
                provider_trade_no=result.provider_trade_no,
                amount_fen=result.amount_fen,
                paid_at=result.paid_at if status is ChargeStatus.PAID else None,
                payer=result.payer,
                code=trade_status,
                message=answer.message,
            )
        if answer.code == "40004" and answer.sub_code == "ACQ.TRADE_NOT_EXIST":
            return ChargeResult(
                status=ChargeStatus.NOT_FOUND,
                out_trade_no=out_trade_no,
                code=answer.full_code,
                message=answer.message,
            )
        return _unknown_charge(out_trade_no, answer.full_code, answer.message)

    @provider_call("reverse")
    async def reverse(self, out_trade_no: str) -> ReverseResult:
        _check_out_no(out_trade_no, "out_trade_no")
        answer = await self._call("alipay.trade.cancel", {"out_trade_no": out_trade_no})
        if isinstance(answer, _NoAnswer):
            return ReverseResult(
                status=ReverseStatus.UNKNOWN,
                out_trade_no=out_trade_no,
                code=answer.code,
                message=answer.message,
            )
        if answer.code == "10000":
            retry = (_s(answer.data.get("retry_flag")) or "N").upper()
            action = _s(answer.data.get("action")) or ""
            return ReverseResult(
                status=ReverseStatus.RETRY if retry == "Y" else ReverseStatus.REVERSED,
                out_trade_no=out_trade_no,
                code=answer.full_code,
                message=_one_line(f"action={action} retry_flag={retry}"),
            )
        if answer.code == "40004":
            if answer.sub_code == "ACQ.SYSTEM_ERROR":
                status = ReverseStatus.RETRY
            elif answer.sub_code == "ACQ.TRADE_NOT_EXIST":
                status = ReverseStatus.REVERSED
            else:
                status = ReverseStatus.REFUSED
            return ReverseResult(
                status=status,
                out_trade_no=out_trade_no,
                code=answer.full_code,
                message=answer.message,
            )
        return ReverseResult(
            status=ReverseStatus.UNKNOWN,
            out_trade_no=out_trade_no,
            code=answer.full_code,
            message=answer.message,
        )

    @provider_call("refund")
    async def refund(
        self,
        *,
        out_trade_no: str,
        out_refund_no: str,
        refund_fen: int,
        total_fen: int,
        reason: str | None = None,
    ) -> RefundResult:
        _check_out_no(out_trade_no, "out_trade_no")
        _check_out_no(out_refund_no, "out_refund_no")
        for value in (refund_fen, total_fen):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError("refund_fen and total_fen must be positive integers")
        if refund_fen > total_fen or total_fen > MAX_AMOUNT_FEN:
            raise ValueError("refund_fen must not exceed total_fen")
        biz: dict[str, Any] = {
            "out_trade_no": out_trade_no,
            "refund_amount": fen_to_yuan(refund_fen),
            "out_request_no": out_refund_no,
        }
        if reason:
            biz["refund_reason"] = _one_line(reason)[:256]
        answer = await self._call("alipay.trade.refund", biz)
        if isinstance(answer, _NoAnswer):
            return RefundResult(
                status=RefundStatus.UNKNOWN,
                out_refund_no=out_refund_no,
                code=answer.code,
                message=answer.message,
            )
        if answer.code == "10000":
            if _s(answer.data.get("out_trade_no")) not in {None, out_trade_no}:
                return RefundResult(
                    status=RefundStatus.UNKNOWN,
                    out_refund_no=out_refund_no,
                    code="malformed",
                    message="answer for another trade",
                )
            if (_s(answer.data.get("fund_change")) or "").upper() != "Y":
                # A repeat of an earlier request (or not yet moved): ask what it became.
                return await self.query_refund(
                    out_trade_no=out_trade_no, out_refund_no=out_refund_no
                )
            refunded_at = _s(answer.data.get("gmt_refund_pay"))
            try:
                at = parse_time(refunded_at) if refunded_at else None
            except ValueError:
                at = None
            return RefundResult(
                status=RefundStatus.SUCCEEDED,
                out_refund_no=out_refund_no,
                provider_refund_no=_s(answer.data.get("trade_no")),
                refund_fen=refund_fen,
                refunded_at=at,
                code=answer.full_code,
                message=answer.message,
            )
        if answer.code == "20000" or answer.sub_code == "ACQ.SYSTEM_ERROR":
            status = RefundStatus.UNKNOWN
        elif answer.code == "40004" or answer.code in _GATEWAY_REFUSALS:
            status = RefundStatus.REFUSED
        else:
            status = RefundStatus.UNKNOWN
        return RefundResult(
            status=status,
            out_refund_no=out_refund_no,
            code=answer.full_code,
            message=answer.message,
        )

    @provider_call("query_refund")
    async def query_refund(self, *, out_trade_no: str, out_refund_no: str) -> RefundResult:
        _check_out_no(out_trade_no, "out_trade_no")
        _check_out_no(out_refund_no, "out_refund_no")
        answer = await self._call(
            "alipay.trade.fastpay.refund.query",
            {
                "out_trade_no": out_trade_no,
                "out_request_no": out_refund_no,
                "query_options": ["gmt_refund_pay"],
            },
        )
        if isinstance(answer, _NoAnswer):
            return RefundResult(
                status=RefundStatus.UNKNOWN,
                out_refund_no=out_refund_no,
                code=answer.code,
                message=answer.message,
            )
        if answer.code == "10000":
            data = answer.data
            amount = _s(data.get("refund_amount"))
            request_no = _s(data.get("out_request_no"))
            if not amount or request_no not in {None, out_refund_no}:
                return RefundResult(
                    status=RefundStatus.NOT_FOUND,
                    out_refund_no=out_refund_no,
                    code=answer.full_code,
                    message="no such refund",
                )
            refund_status = _s(data.get("refund_status")) or "REFUND_SUCCESS"
            try:
                refund_fen = yuan_to_fen(amount)
                at_text = _s(data.get("gmt_refund_pay"))
                at = parse_time(at_text) if at_text else None
            except ValueError as exc:
                return RefundResult(
                    status=RefundStatus.UNKNOWN,
                    out_refund_no=out_refund_no,
                    code="malformed",
                    message=str(exc),
                )
            return RefundResult(
                status=(
                    RefundStatus.SUCCEEDED
                    if refund_status == "REFUND_SUCCESS"
                    else RefundStatus.PROCESSING
                ),
                out_refund_no=out_refund_no,
                provider_refund_no=_s(data.get("trade_no")),
                refund_fen=refund_fen,
                refunded_at=at,
                code=refund_status,
                message=answer.message,
            )
        if answer.code == "40004" and answer.sub_code == "ACQ.TRADE_NOT_EXIST":
            return RefundResult(
                status=RefundStatus.NOT_FOUND,
                out_refund_no=out_refund_no,
                code=answer.full_code,
                message=answer.message,
            )
        return RefundResult(
            status=RefundStatus.UNKNOWN,
            out_refund_no=out_refund_no,
            code=answer.full_code,
            message=answer.message,
        )

    # ------------------------------------------------------------------ notifications

    def parse_notification(self, headers: Mapping[str, str], body: bytes) -> Notification:
        """Verify one asynchronous notification (a form POST); raise
        :class:`NotificationRejected` (codes ``malformed``, ``bad_signature``, ``wrong_app``,
        ``wrong_seller``). De-duplicating by ``notification_id`` (``notify_id``; a re-sent
        notification keeps it) is the caller's."""
        params = _parse_form(headers, body)
        sign = params.get("sign")
        if not sign:
            raise NotificationRejected("bad_signature", "notification without sign")
        if params.get("sign_type", "RSA2") != "RSA2":
            raise NotificationRejected("bad_signature", "sign_type is not RSA2")
        content = sign_content(params, exclude=("sign", "sign_type"))
        if not rsa2_verify(self._alipay_public, content, sign):
            raise NotificationRejected("bad_signature", "the notification's signature fails")
        if params.get("app_id") != self.config.app_id:
            raise NotificationRejected("wrong_app", "notification for another app_id")
        seller = params.get("seller_id")
        if self.config.seller_id and seller != self.config.seller_id:
            raise NotificationRejected("wrong_seller", "notification for another seller_id")
        notify_id = params.get("notify_id")
        out_trade_no = params.get("out_trade_no")
        trade_status = params.get("trade_status", "")
        if not notify_id or not out_trade_no:
            raise NotificationRejected("malformed", "notify_id / out_trade_no missing")
        status = {
            "TRADE_SUCCESS": ChargeStatus.PAID,
            "TRADE_FINISHED": ChargeStatus.PAID,
            "WAIT_BUYER_PAY": ChargeStatus.USER_PAYING,
            "TRADE_CLOSED": ChargeStatus.CLOSED,
        }.get(trade_status)
        if status is None:
            raise NotificationRejected("malformed", f"trade_status {trade_status!r}")
        try:
            total = params.get("total_amount")
            refund_fee = params.get("refund_fee")
            paid_text = params.get("gmt_payment")
            refund_text = params.get("gmt_refund")
            charge = ChargeResult(
                status=status,
                out_trade_no=out_trade_no,
                provider_trade_no=params.get("trade_no"),
                amount_fen=yuan_to_fen(total) if total else None,
                refunded_fen=yuan_to_fen(refund_fee) if refund_fee else None,
                paid_at=parse_time(paid_text) if paid_text else None,
                payer=params.get("buyer_id") or params.get("buyer_logon_id"),
                code=trade_status,
            )
            refunded_at = parse_time(refund_text) if refund_text else None
        except ValueError as exc:
            raise NotificationRejected("malformed", str(exc)) from None
        out_biz_no = params.get("out_biz_no")
        # A refund of ours names its out_request_no (out_biz_no); gmt_refund without one is
        # a trade.cancel that had to refund a paid trade: the trade closing (TRADE_CLOSED),
        # told as a payment notification, not a refund HQ asked for.
        if out_biz_no:
            refund = RefundResult(
                status=RefundStatus.SUCCEEDED,
                out_refund_no=out_biz_no,
                provider_refund_no=params.get("trade_no"),
                refund_fen=None,  # Alipay tells the trade's refunded total (charge.refunded_fen)
                refunded_at=refunded_at,
                code=trade_status,
            )
            return Notification(
                kind=NotificationKind.REFUND,
                notification_id=notify_id,
                out_trade_no=out_trade_no,
                charge=charge,
                refund=refund,
            )
        return Notification(
            kind=NotificationKind.PAYMENT,
            notification_id=notify_id,
            out_trade_no=out_trade_no,
            charge=charge,
        )

    def notification_answer(self, ok: bool, message: str = "") -> HttpAnswer:
        """Alipay stops re-sending on the exact text ``success``; anything else is a re-send."""
        del message  # Alipay reads nothing but the word
        return HttpAnswer(
            status=200,
            content_type="text/plain; charset=utf-8",
            body=b"success" if ok else b"fail",
        )

    # ------------------------------------------------------------------ bill

    @provider_call("trade_bill")
    async def trade_bill(self, day: date) -> list[BillLine]:
        answer = await self._call(
            "alipay.data.dataservice.bill.downloadurl.query",
            {"bill_type": "trade", "bill_date": day.isoformat()},
        )
        if isinstance(answer, _NoAnswer):
            raise BillUnavailable(answer.code, answer.message)
        if answer.code != "10000":
            raise BillUnavailable(answer.full_code, answer.message)
        url = _s(answer.data.get("bill_download_url"))
        if not url or urlsplit(url).scheme not in {"http", "https"}:
            raise BillUnavailable("malformed", "no bill_download_url")
        try:
            # The URL carries its own token: nothing of ours is sent with it.
            response = await self._client.get(url, timeout=self.config.timeout_s)
        except httpx.TimeoutException:
            raise BillUnavailable("timeout", "bill download timed out") from None
        except httpx.HTTPError as exc:
            raise BillUnavailable("network", type(exc).__name__) from None
        if response.status_code >= 500:
            raise BillUnavailable("http_5xx", f"HTTP {response.status_code}")
        if response.status_code != 200:
            raise BillUnavailable("malformed", f"bill download HTTP {response.status_code}")
        try:
            return parse_bill_zip(response.content)
        except (ValueError, KeyError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
            raise BillUnavailable("malformed", str(exc)) from None

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()


# ---------------------------------------------------------------------------- bill parsing


def _zip_name(info: zipfile.ZipInfo) -> str:
    if info.flag_bits & 0x800:
        return info.filename
    try:  # names without the UTF-8 flag: Alipay's tools write them in GBK
        return info.filename.encode("cp437").decode("gbk")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return info.filename


def parse_bill_zip(content: bytes) -> list[BillLine]:
    """The detail file (``..._业务明细.csv``, GBK) of a downloaded bill zip, as lines."""
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        details = [
            info
            for info in archive.infolist()
            if _zip_name(info).endswith("业务明细.csv") and "汇总" not in _zip_name(info)
        ]
        if len(details) != 1:
            raise ValueError("the bill zip has no single 业务明细 file")
        text = archive.read(details[0]).decode("gbk")
    return parse_bill_detail(text)


def parse_bill_detail(text: str) -> list[BillLine]:
    """Parse the detail CSV: ``#`` comment lines around one header and the data rows."""
    rows = [
        row
        for row in csv.reader(io.StringIO(text))
        if row and not row[0].startswith("#") and any(cell.strip() for cell in row)
    ]
    if not rows:
        raise ValueError("the bill has no header")
    header = [cell.strip() for cell in rows[0]]
    missing = [
        name
        for name in ("支付宝交易号", "商户订单号", "业务类型", "完成时间")
        if name not in header
    ]
    if missing:
        raise ValueError(f"bill header lacks {missing}")
    lines: list[BillLine] = []
    for row in rows[1:]:
        if len(row) != len(header):
            raise ValueError(f"bill line has {len(row)} fields, header {len(header)}")
        cells = {
            name: value.strip().strip("\t").strip() for name, value in zip(header, row, strict=True)
        }
        kind_text = cells["业务类型"]
        if kind_text == "交易":
            kind = BillKind.PAYMENT
            amount = _bill_yuan_to_fen(cells.get("订单金额（元）", ""))
        elif kind_text == "退款":
            kind = BillKind.REFUND
            amount = abs(_bill_yuan_to_fen(cells.get("商家实收（元）", "")))
        else:
            raise ValueError(f"unknown 业务类型 {kind_text!r}")
        at = parse_time(cells["完成时间"] or cells.get("创建时间", ""))
        known = {"支付宝交易号", "商户订单号", "业务类型", "完成时间", "退款批次号/请求号"}
        lines.append(
            BillLine(
                kind=kind,
                out_trade_no=cells["商户订单号"],
                provider_trade_no=cells["支付宝交易号"],
                amount_fen=amount,
                at=at,
                out_refund_no=(cells.get("退款批次号/请求号") or None)
                if kind is BillKind.REFUND
                else None,
                provider_refund_no=None,
                status=kind_text,
                extra={name: value for name, value in cells.items() if name not in known},
            )
        )
    return lines


# ---------------------------------------------------------------------------- helpers


def parse_time(text: str) -> datetime:
    """Alipay's ``yyyy-MM-dd HH:mm:ss`` (Beijing time) -> an aware datetime."""
    if not _TIME.match(text):
        raise ValueError(f"not an Alipay time: {text!r}")
    return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=SHANGHAI)


def _parse_form(headers: Mapping[str, str], body: bytes) -> dict[str, str]:
    lowered = {key.lower(): value for key, value in headers.items()}
    content_type = lowered.get("content-type", "application/x-www-form-urlencoded")
    if "application/x-www-form-urlencoded" not in content_type.lower():
        raise NotificationRejected("malformed", "notification is not a form")
    try:
        text = body.decode("ascii")
        first = parse_qsl(text, keep_blank_values=True, strict_parsing=True, encoding="utf-8")
    except (UnicodeDecodeError, ValueError):
        raise NotificationRejected("malformed", "notification body is not a form") from None
    charset = dict(first).get("charset", "utf-8").lower()
    if charset not in {"utf-8", "utf8", "gbk"}:
        raise NotificationRejected("malformed", f"unsupported charset {charset}")
    pairs = (
        first
        if charset in {"utf-8", "utf8"}
        else parse_qsl(text, keep_blank_values=True, strict_parsing=True, encoding="gbk")
    )
    params: dict[str, str] = {}
    for key, value in pairs:
        if key in params:
            raise NotificationRejected("malformed", f"parameter {key} twice")
        params[key] = value
    return params


def _check_out_no(value: str, what: str) -> None:
    if not isinstance(value, str) or not OUT_NO.match(value):
        raise ValueError(f"{what} must be 6-32 characters of [0-9A-Za-z_-]")


def _unknown_charge(out_trade_no: str, code: str, message: str) -> ChargeResult:
    return ChargeResult(
        status=ChargeStatus.UNKNOWN, out_trade_no=out_trade_no, code=code, message=message
    )


def _replace_status(result: ChargeResult, status: ChargeStatus) -> ChargeResult:
    return ChargeResult(
        status=status,
        out_trade_no=result.out_trade_no,
        provider_trade_no=result.provider_trade_no,
        amount_fen=result.amount_fen,
        refunded_fen=result.refunded_fen,
        paid_at=result.paid_at if status is ChargeStatus.PAID else None,
        payer=result.payer,
        code=result.code,
        message=result.message,
    )


def _s(value: Any) -> str | None:
    return value if isinstance(value, str) and value != "" else None


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


_TRACE_HEADERS = frozenset({"traceparent", "tracestate"})


def _trace_only(headers: Mapping[str, str]) -> dict[str, str]:
    """The W3C trace context headers of ``headers``, nothing else."""
    return {k.lower(): v for k, v in headers.items() if k.lower() in _TRACE_HEADERS}
