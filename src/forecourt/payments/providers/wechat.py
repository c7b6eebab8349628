"""WeChat Pay API v3 adapter: payment-code (付款码) payments at the counter.

Speaks the merchant (普通商户, direct mode) API v3 over HTTPS with httpx:

- ``POST /v3/pay/transactions/codepay`` - charge a payment code;
- ``GET /v3/pay/transactions/out-trade-no/{out_trade_no}?mchid=`` - query;
- ``POST /v3/pay/transactions/out-trade-no/{out_trade_no}/reverse`` - reverse (撤销);
- ``POST /v3/refund/domestic/refunds`` and ``GET /v3/refund/domestic/refunds/{out_refund_no}``;
- ``GET /v3/bill/tradebill?bill_date=YYYY-MM-DD&bill_type=ALL`` then the ``download_url``;
- payment and refund notifications (``parse_notification``).

Every request carries ``Authorization: WECHATPAY2-SHA256-RSA2048 mchid=..,nonce_str=..,
signature=..,timestamp=..,serial_no=..``, the signature being RSA PKCS#1 v1.5 SHA-256 with the
merchant's API key over ``METHOD\\nPATH?QUERY\\nTIMESTAMP\\nNONCE\\nBODY\\n``. Every answer (and
notification) is verified over ``TIMESTAMP\\nNONCE\\nBODY\\n`` with the platform key that
``Wechatpay-Serial`` names: a platform certificate (by its hex serial) or the platform public
key (serial ``PUB_KEY_ID_...``); both modes may be configured at once (WeChat's migration from
certificates to the public key). Timestamps further than 5 minutes from now are refused.

How answers become outcomes (see ``base``: nothing here raises for the provider's behaviour):

- codepay: ``trade_state`` SUCCESS -> PAID, USERPAYING (in a 2xx, or the error code USERPAYING)
  -> USER_PAYING; PAYERROR/NOTPAY/CLOSED/REVOKED -> as the query table; 4xx business refusals
  (NOTENOUGH, AUTH_CODE_INVALID, AUTHCODEEXPIRE, TRADE_ERROR, ORDER_CLOSED, PARAM_ERROR,
  SIGN_ERROR, NO_AUTH, ...) -> REFUSED; INVALID_REQUEST / OUT_TRADE_NO_USED / ORDERPAID (a trade
  under that number may exist and may be paid), 429 FREQUENCY_LIMITED, 5xx (SYSTEM_ERROR,
  BANK_ERROR), timeouts, network errors, bad signatures and unparsable answers -> UNKNOWN.
- query: SUCCESS/REFUND -> PAID, USERPAYING -> USER_PAYING, NOTPAY -> NOT_PAID, CLOSED/REVOKED ->
  CLOSED, PAYERROR -> REFUSED, 404 ORDER_NOT_EXIST/RESOURCE_NOT_EXISTS -> NOT_FOUND.
- reverse: 200 -> REVERSED (the v3 answer has no ``recall`` flag; v2's ``recall=Y`` "send the
  reverse again" is, in v3, a 5xx SYSTEM_ERROR / 429, mapped to RETRY; a ``recall: "Y"`` member,
  should one appear, is honoured too); 4xx (e.g. too late, already refunded) -> REFUSED;
  no answer -> UNKNOWN.
- refund: ``status`` SUCCESS -> SUCCEEDED, PROCESSING -> PROCESSING, CLOSED/ABNORMAL -> REFUSED;
  4xx (NOT_ENOUGH, INVALID_REQUEST over the refundable amount, RESOURCE_NOT_EXISTS, ...) ->
  REFUSED; 429/5xx/no answer -> UNKNOWN. Refund query 404 -> NOT_FOUND.

The trade bill has no outcome type in the contract: :meth:`WechatPayProvider.trade_bill` raises
:class:`BillUnavailable` (with ``code``) when the bill cannot be had or does not check out.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote, urlsplit
from zoneinfo import ZoneInfo

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

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

logger = logging.getLogger(__name__)

SCHEME = "WECHATPAY2-SHA256-RSA2048"
SHANGHAI = ZoneInfo("Asia/Shanghai")
PUBLIC_KEY_ID_PREFIX = "PUB_KEY_ID_"
#: How far a signed timestamp may be from our clock (WeChat's own rule for requests).
MAX_SKEW_S = 300

_AUTH_CODE = re.compile(r"^1[0-5][0-9]{16}$")  # WeChat payment codes: 18 digits, 10..15 first

# ---------------------------------------------------------------------------- signing


def load_private_key(pem: str) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("the merchant private key must be an RSA key")
    return key


def load_public_key(pem: str) -> rsa.RSAPublicKey:
    """A platform public key (PEM ``PUBLIC KEY``) or the key of a certificate (PEM)."""
    data = pem.encode()
    if b"CERTIFICATE" in data:
        key: Any = x509.load_pem_x509_certificate(data).public_key()
    else:
        key = serialization.load_pem_public_key(data)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("a WeChat Pay platform key must be an RSA key")
    return key


def certificate_serial(pem: str) -> str:
    """A certificate's serial as WeChat writes it (upper-case hex, no leading zeros)."""
    return format(x509.load_pem_x509_certificate(pem.encode()).serial_number, "X")


def sign(private_key: rsa.RSAPrivateKey, message: bytes) -> str:
    """RSA PKCS#1 v1.5 SHA-256 signature, base64."""
    return base64.b64encode(private_key.sign(message, padding.PKCS1v15(), hashes.SHA256())).decode()


def verify(public_key: rsa.RSAPublicKey, message: bytes, signature_b64: str) -> bool:
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except ValueError:
        return False
    try:
        public_key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


def request_message(method: str, url_path: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    """What a request signature covers: ``url_path`` is the path with its query string."""
    return f"{method.upper()}\n{url_path}\n{timestamp}\n{nonce}\n".encode() + body + b"\n"


def answer_message(timestamp: str, nonce: str, body: bytes) -> bytes:
    """What an answer's or a notification's signature covers."""
    return f"{timestamp}\n{nonce}\n".encode() + body + b"\n"


def authorization(
    *,
    method: str,
    url_path: str,
    body: bytes,
    mchid: str,
    serial_no: str,
    private_key: rsa.RSAPrivateKey,
    timestamp: str,
    nonce: str,
) -> str:
    """The ``Authorization`` header value for one request."""
    signature = sign(private_key, request_message(method, url_path, timestamp, nonce, body))
    return (
        f'{SCHEME} mchid="{mchid}",nonce_str="{nonce}",signature="{signature}",'
        f'timestamp="{timestamp}",serial_no="{serial_no}"'
    )


def new_nonce() -> str:
    return secrets.token_hex(16).upper()


def aead_decrypt(apiv3_key: str, nonce: str, ciphertext_b64: str, associated_data: str) -> bytes:
    """AEAD_AES_256_GCM as WeChat uses it (key = the APIv3 key's 32 bytes); raises
    ``ValueError`` when it does not decrypt."""
    try:
        data = base64.b64decode(ciphertext_b64, validate=True)
        return AESGCM(apiv3_key.encode()).decrypt(
            nonce.encode(), data, associated_data.encode() if associated_data else None
        )
    except (InvalidTag, ValueError) as exc:
        raise ValueError("resource does not decrypt") from exc


# ---------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class WechatPayConfig:
    """One merchant (直连商户) and how to trust WeChat's answers.

    - ``mchid`` / ``appid``: the merchant number and the AppID bound to it;
    - ``merchant_serial_no`` + ``merchant_private_key_pem``: the merchant API certificate's
      serial and its private key (``apiclient_key.pem``), which sign every request;
    - ``apiv3_key``: the 32-character APIv3 key, which decrypts notifications;
    - platform verification: ``platform_certificates`` (hex serial -> certificate PEM) and/or
      ``platform_public_key_id`` (``PUB_KEY_ID_...``) + ``platform_public_key_pem``;
    - ``notify_url``: where WeChat sends refund notifications (omitted when ``None``);
    - ``device_ip``: the counter terminal's address for ``scene_info.device_ip`` (a call's
      ``payer_ip`` overrides it).
    """

    mchid: str
    appid: str
    merchant_serial_no: str
    merchant_private_key_pem: str = field(repr=False)
    apiv3_key: str = field(repr=False)
    platform_certificates: Mapping[str, str] = field(default_factory=dict)
    platform_public_key_id: str | None = None
    platform_public_key_pem: str | None = None
    base_url: str = "https://api.mch.weixin.qq.com"
    timeout_s: float = 10.0
    notify_url: str | None = None
    device_ip: str = "127.0.0.1"
    max_skew_s: int = MAX_SKEW_S

    def __post_init__(self) -> None:
        if len(self.apiv3_key.encode()) != 32:
            raise ValueError("apiv3_key must be 32 bytes")
        if not self.platform_certificates and not self.platform_public_key_id:
            raise ValueError("configure platform_certificates and/or platform_public_key_id")
        if self.platform_public_key_id is not None:
            if not self.platform_public_key_id.startswith(PUBLIC_KEY_ID_PREFIX):
                raise ValueError("platform_public_key_id must start with PUB_KEY_ID_")
            if not self.platform_public_key_pem:
                raise ValueError("platform_public_key_id needs platform_public_key_pem")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be positive")


class BillUnavailable(Exception):
    """The trade bill could not be had or did not check out (``code``: ``timeout``,
    ``network``, ``http_5xx``, ``bad_signature``, ``malformed``, ``hash_mismatch``, ``refused``,
    or WeChat's own code)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# ---------------------------------------------------------------------------- mappings

TRADE_STATES: Mapping[str, ChargeStatus] = {
    "SUCCESS": ChargeStatus.PAID,
    "REFUND": ChargeStatus.PAID,
    "USERPAYING": ChargeStatus.USER_PAYING,
    "NOTPAY": ChargeStatus.NOT_PAID,
    "CLOSED": ChargeStatus.CLOSED,
    "REVOKED": ChargeStatus.CLOSED,
    "PAYERROR": ChargeStatus.REFUSED,
    "ACCEPT": ChargeStatus.USER_PAYING,  # received, waiting to be debited
}

#: Charge error codes that do not prove the payer was not charged for this out_trade_no.
_CHARGE_UNSURE_CODES = frozenset(
    {"INVALID_REQUEST", "OUT_TRADE_NO_USED", "ORDERPAID", "ORDER_PAID", "FREQUENCY_LIMITED"}
)

REFUND_STATES: Mapping[str, RefundStatus] = {
    "SUCCESS": RefundStatus.SUCCEEDED,
    "PROCESSING": RefundStatus.PROCESSING,
    "CLOSED": RefundStatus.REFUSED,
    "ABNORMAL": RefundStatus.REFUSED,
}

_NOT_FOUND_CODES = frozenset({"ORDER_NOT_EXIST", "ORDERNOTEXIST", "RESOURCE_NOT_EXISTS"})


def fen_to_yuan(fen: int) -> str:
    sign_ = "-" if fen < 0 else ""
    fen = abs(fen)
    return f"{sign_}{fen // 100}.{fen % 100:02d}"


def yuan_to_fen(text: str) -> int:
    """``"12.34"`` -> 1234, exactly (more than 2 decimals is an error)."""
    try:
        value = Decimal(text)
    except InvalidOperation as exc:
        raise ValueError(f"not an amount: {text!r}") from exc
    fen = value * 100
    if fen != fen.to_integral_value():
        raise ValueError(f"amount below a fen: {text!r}")
    return int(fen)


def parse_time(text: str | None) -> datetime | None:
    """An RFC 3339 time from the API (``2026-12-02T10:00:00+08:00``), timezone-aware."""
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo is not None else None


# ---------------------------------------------------------------------------- trade bill codec

BILL_SUMMARY_FIRST = "总交易单数"


def parse_trade_bill(text: str) -> list[BillLine]:
    """Parse a trade bill (type ALL): a header line, detail lines, a summary header and a
    summary line; every field of the detail and summary lines starts with a backtick. The
    summary must match the details (count, settlement and refund totals)."""
    rows = list(csv.reader(io.StringIO(text.lstrip("\ufeff"))))
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if len(rows) < 3:
        raise ValueError("a bill has a header, a summary header and a summary")
    header = [cell.strip() for cell in rows[0]]
    summary_at = next(
        (i for i, row in enumerate(rows) if row and row[0].strip() == BILL_SUMMARY_FIRST), None
    )
    if summary_at is None or summary_at + 1 >= len(rows):
        raise ValueError("bill summary missing")
    summary_header = [cell.strip() for cell in rows[summary_at]]
    summary = dict(
        zip(summary_header, (_unquote(cell) for cell in rows[summary_at + 1]), strict=False)
    )
    lines: list[BillLine] = []
    paid_total = 0
    refund_total = 0
    for row in rows[1:summary_at]:
        if len(row) != len(header):
            raise ValueError(f"bill line has {len(row)} fields, header {len(header)}")
        cells = {name: _unquote(cell) for name, cell in zip(header, row, strict=True)}
        at = datetime.strptime(cells["交易时间"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=SHANGHAI)
        state = cells["交易状态"]
        extra = {
            name: value
            for name, value in cells.items()
            if name not in {"交易时间", "微信订单号", "商户订单号", "交易状态"}
        }
        if state == "REFUND":
            amount = yuan_to_fen(cells.get("申请退款金额") or cells["退款金额"])
            refund_total += yuan_to_fen(cells["退款金额"])
            lines.append(
                BillLine(
                    kind=BillKind.REFUND,
                    out_trade_no=cells["商户订单号"],
                    provider_trade_no=cells["微信订单号"],
                    amount_fen=amount,
                    at=at,
                    out_refund_no=cells["商户退款单号"] or None,
                    provider_refund_no=cells["微信退款单号"] or None,
                    status=cells.get("退款状态") or state,
                    extra=extra,
                )
            )
        else:
            paid_total += yuan_to_fen(cells["应结订单金额"])
            lines.append(
                BillLine(
                    kind=BillKind.PAYMENT,
                    out_trade_no=cells["商户订单号"],
                    provider_trade_no=cells["微信订单号"],
                    amount_fen=yuan_to_fen(cells.get("订单金额") or cells["应结订单金额"]),
                    at=at,
                    status=state,
                    extra=extra,
                )
            )
    try:
        count = int(summary[BILL_SUMMARY_FIRST])
        summary_paid = yuan_to_fen(summary["应结订单总金额"])
        summary_refund = yuan_to_fen(summary["退款总金额"])
    except (KeyError, ValueError) as exc:
        raise ValueError("bill summary unreadable") from exc
    if count != len(lines) or summary_paid != paid_total or summary_refund != refund_total:
        raise ValueError("bill summary does not match its lines")
    return lines


def _unquote(cell: str) -> str:
    cell = cell.strip()
    return cell[1:] if cell.startswith("`") else cell


# ---------------------------------------------------------------------------- the adapter


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes
    data: Any  # parsed JSON, or None for an empty body


@dataclass(frozen=True, slots=True)
class _NoAnswer:
    code: str  # timeout / network / http_5xx / bad_signature / malformed
    message: str
    status: int | None = None
    provider_code: str | None = None


class WechatPayProvider:
    """The WeChat Pay adapter (see the module docstring for its mapping of answers)."""

    name = "wechat"

    def __init__(
        self,
        config: WechatPayConfig,
        client: httpx.AsyncClient | None = None,
        *,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._private_key = load_private_key(config.merchant_private_key_pem)
        self._platform_keys: dict[str, rsa.RSAPublicKey] = {
            serial.upper(): load_public_key(pem)
            for serial, pem in config.platform_certificates.items()
        }
        if config.platform_public_key_id and config.platform_public_key_pem:
            self._platform_keys[config.platform_public_key_id] = load_public_key(
                config.platform_public_key_pem
            )
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(timeout=config.timeout_s)
        self._now = now
        self._base = config.base_url.rstrip("/")

    # ------------------------------------------------------------------ HTTP

    def _headers(self, method: str, url_path: str, body: bytes) -> dict[str, str]:
        headers = {
            "Authorization": authorization(
                method=method,
                url_path=url_path,
                body=body,
                mchid=self.config.mchid,
                serial_no=self.config.merchant_serial_no,
                private_key=self._private_key,
                timestamp=str(int(self._now())),
                nonce=new_nonce(),
            ),
            "Accept": "application/json",
            "User-Agent": "forecourt-wechatpay/1",
        }
        if body:
            headers["Content-Type"] = "application/json"
        # A platform public-key merchant tells WeChat which key it verifies answers with.
        if self.config.platform_public_key_id and not self.config.platform_certificates:
            headers["Wechatpay-Serial"] = self.config.platform_public_key_id
        return headers

    async def _call(
        self,
        method: str,
        url_path: str,
        payload: Mapping[str, Any] | None = None,
        *,
        trace_headers: Mapping[str, str] | None = None,
    ) -> _Answer | _NoAnswer:
        body = (
            json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
            if payload is not None
            else b""
        )
        headers = self._headers(method, url_path, body)
        # The trace context of the current call's span (or the one given): headers the
        # signature does not cover (it covers method, path, timestamp, nonce and body), and
        # never anything but ``traceparent``/``tracestate``: the signed headers stay as built.
        headers.update(_trace_only(trace_headers or current_trace_headers()))
        try:
            response = await self._client.request(
                method,
                self._base + url_path,
                content=body or None,
                headers=headers,
                timeout=self.config.timeout_s,
            )
        except httpx.TimeoutException as exc:
            return _NoAnswer(
                "timeout", f"no answer in {self.config.timeout_s} s ({type(exc).__name__})"
            )
        except httpx.HTTPError as exc:
            return _NoAnswer("network", f"{type(exc).__name__}: {exc}"[:200])
        return self._check(response)

    def _check(self, response: httpx.Response) -> _Answer | _NoAnswer:
        body = response.content
        status = response.status_code
        if status >= 500:
            code = _error_code(body)
            return _NoAnswer(
                "http_5xx", _error_message(body) or f"HTTP {status}", status, provider_code=code
            )
        problem = self._verify_headers(response.headers, body)
        if problem is not None:
            return _NoAnswer("bad_signature", problem, status)
        if not body:
            return _Answer(status, body, None)
        try:
            data = json.loads(body)
        except ValueError:
            return _NoAnswer("malformed", "answer is not JSON", status)
        if not isinstance(data, dict):
            return _NoAnswer("malformed", "answer is not a JSON object", status)
        return _Answer(status, body, data)

    def _verify_headers(self, headers: Mapping[str, str], body: bytes) -> str | None:
        """None when the signature headers verify ``body``; else why not."""
        lower = {k.lower(): v for k, v in headers.items()}
        signature = lower.get("wechatpay-signature")
        timestamp = lower.get("wechatpay-timestamp")
        nonce = lower.get("wechatpay-nonce")
        serial = lower.get("wechatpay-serial")
        if not (signature and timestamp and nonce and serial):
            return "answer not signed"
        kind = lower.get("wechatpay-signature-type")
        if kind is not None and kind != SCHEME:
            return f"unsupported signature type {kind}"
        key = self._platform_keys.get(
            serial if serial.startswith(PUBLIC_KEY_ID_PREFIX) else serial.upper()
        )
        if key is None:
            return f"unknown platform serial {serial}"
        try:
            stamp = int(timestamp)
        except ValueError:
            return "timestamp not an integer"
        if abs(self._now() - stamp) > self.config.max_skew_s:
            return "stale timestamp"
        if not verify(key, answer_message(timestamp, nonce, body), signature):
            return "signature does not verify"
        return None

    # ------------------------------------------------------------------ charges

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
        _check_out_no(out_trade_no)
        if isinstance(amount_fen, bool) or not isinstance(amount_fen, int) or amount_fen <= 0:
            raise ValueError("amount_fen must be a positive integer")
        payload = {
            "appid": self.config.appid,
            "mchid": self.config.mchid,
            "description": description[:127],
            "out_trade_no": out_trade_no,
            "payer": {"auth_code": auth_code},
            "amount": {"total": amount_fen, "currency": "CNY"},
            "scene_info": {
                "store_info": {"out_id": store_id},
                "device_ip": payer_ip or self.config.device_ip,
            },
        }
        answer = await self._call(
            "POST", "/v3/pay/transactions/codepay", payload, trace_headers=trace_headers
        )
        if isinstance(answer, _NoAnswer):
            return _charge_unknown(out_trade_no, answer)
        data = answer.data or {}
        if 200 <= answer.status < 300:
            state = data.get("trade_state")
            if not isinstance(state, str):
                return ChargeResult(
                    code="malformed", message="no trade_state", out_trade_no=out_trade_no
                )
            return self._trade_result(out_trade_no, data)
        code = _str(data.get("code"))
        message = _str(data.get("message"))
        if code == "USERPAYING":
            return ChargeResult(
                code=code,
                message=message,
                status=ChargeStatus.USER_PAYING,
                out_trade_no=out_trade_no,
            )
        if answer.status == 429 or code in _CHARGE_UNSURE_CODES:
            return ChargeResult(code=code, message=message, out_trade_no=out_trade_no)
        if 400 <= answer.status < 500:
            return ChargeResult(
                code=code or f"http_{answer.status}",
                message=message,
                status=ChargeStatus.REFUSED,
                out_trade_no=out_trade_no,
            )
        return ChargeResult(
            code="malformed", message=f"HTTP {answer.status}", out_trade_no=out_trade_no
        )

    def _trade_result(self, out_trade_no: str, data: Mapping[str, Any]) -> ChargeResult:
        state = _str(data.get("trade_state")) or ""
        status = TRADE_STATES.get(state)
        if status is None:
            return ChargeResult(
                code="malformed", message=f"unknown trade_state {state}", out_trade_no=out_trade_no
            )
        if data.get("out_trade_no") not in (None, out_trade_no):
            return ChargeResult(
                code="malformed", message="answer is for another trade", out_trade_no=out_trade_no
            )
        if data.get("mchid") not in (None, self.config.mchid):
            return ChargeResult(
                code="malformed",
                message="answer is for another merchant",
                out_trade_no=out_trade_no,
            )
        amount = _obj(data.get("amount"))
        total = amount.get("total")
        payer = _obj(data.get("payer"))
        if status is ChargeStatus.PAID and (not isinstance(total, int) or isinstance(total, bool)):
            return ChargeResult(
                code="malformed", message="paid without amount.total", out_trade_no=out_trade_no
            )
        return ChargeResult(
            code=state,
            message=_str(data.get("trade_state_desc")),
            status=status,
            out_trade_no=out_trade_no,
            provider_trade_no=_str(data.get("transaction_id")),
            amount_fen=total if isinstance(total, int) and not isinstance(total, bool) else None,
            paid_at=parse_time(_str(data.get("success_time"))),
            payer=_str(payer.get("openid")),
        )

    @provider_call("query")
    async def query(self, out_trade_no: str) -> ChargeResult:
        _check_out_no(out_trade_no)
        answer = await self._call(
            "GET",
            f"/v3/pay/transactions/out-trade-no/{quote(out_trade_no)}?mchid={quote(self.config.mchid)}",
        )
        if isinstance(answer, _NoAnswer):
            return _charge_unknown(out_trade_no, answer)
        data = answer.data or {}
        if answer.status == 200:
            return self._trade_result(out_trade_no, data)
        code = _str(data.get("code"))
        if answer.status == 404 or code in _NOT_FOUND_CODES:
            return ChargeResult(
                code=code,
                message=_str(data.get("message")),
                status=ChargeStatus.NOT_FOUND,
                out_trade_no=out_trade_no,
            )
        return ChargeResult(
            code=code or f"http_{answer.status}",
            message=_str(data.get("message")),
            out_trade_no=out_trade_no,
        )

    @provider_call("reverse")
    async def reverse(self, out_trade_no: str) -> ReverseResult:
        _check_out_no(out_trade_no)
        answer = await self._call(
            "POST",
            f"/v3/pay/transactions/out-trade-no/{quote(out_trade_no)}/reverse",
            {"appid": self.config.appid, "mchid": self.config.mchid},
        )
        if isinstance(answer, _NoAnswer):
            if answer.code == "http_5xx":
                return ReverseResult(
                    code=answer.provider_code or "http_5xx",
                    message=answer.message,
                    status=ReverseStatus.RETRY,
                    out_trade_no=out_trade_no,
                )
            return ReverseResult(
                code=answer.code, message=answer.message, out_trade_no=out_trade_no
            )
        data = answer.data or {}
        if 200 <= answer.status < 300:
            if str(data.get("recall", "N")).upper() == "Y":
                return ReverseResult(
                    code="recall", status=ReverseStatus.RETRY, out_trade_no=out_trade_no
                )
            return ReverseResult(status=ReverseStatus.REVERSED, out_trade_no=out_trade_no)
        code = _str(data.get("code"))
        message = _str(data.get("message"))
        if answer.status == 429 or code in {"SYSTEM_ERROR", "SYSTEMERROR", "FREQUENCY_LIMITED"}:
            return ReverseResult(
                code=code, message=message, status=ReverseStatus.RETRY, out_trade_no=out_trade_no
            )
        return ReverseResult(
            code=code or f"http_{answer.status}",
            message=message,
            status=ReverseStatus.REFUSED,
            out_trade_no=out_trade_no,
        )

    # ------------------------------------------------------------------ refunds

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
        _check_out_no(out_trade_no)
        _check_out_no(out_refund_no)
        for value in (refund_fen, total_fen):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError("refund_fen and total_fen must be positive integers")
        payload: dict[str, Any] = {
            "out_trade_no": out_trade_no,
            "out_refund_no": out_refund_no,
            "amount": {"refund": refund_fen, "total": total_fen, "currency": "CNY"},
        }
        if reason:
            payload["reason"] = reason[:80]
        if self.config.notify_url:
            payload["notify_url"] = self.config.notify_url
        answer = await self._call("POST", "/v3/refund/domestic/refunds", payload)
        return self._refund_result(out_trade_no, out_refund_no, answer, query=False)

    @provider_call("query_refund")
    async def query_refund(self, *, out_trade_no: str, out_refund_no: str) -> RefundResult:
        _check_out_no(out_refund_no)
        answer = await self._call("GET", f"/v3/refund/domestic/refunds/{quote(out_refund_no)}")
        return self._refund_result(out_trade_no, out_refund_no, answer, query=True)

    def _refund_result(
        self, out_trade_no: str, out_refund_no: str, answer: _Answer | _NoAnswer, *, query: bool
    ) -> RefundResult:
        if isinstance(answer, _NoAnswer):
            return RefundResult(
                code=answer.provider_code
                if answer.code == "http_5xx" and answer.provider_code
                else answer.code,
                message=answer.message,
                out_refund_no=out_refund_no,
            )
        data = answer.data or {}
        if answer.status == 200:
            return refund_from_resource(data, out_trade_no, out_refund_no)
        code = _str(data.get("code"))
        message = _str(data.get("message"))
        if query and (answer.status == 404 or code in _NOT_FOUND_CODES):
            return RefundResult(
                code=code,
                message=message,
                status=RefundStatus.NOT_FOUND,
                out_refund_no=out_refund_no,
            )
        if answer.status == 429 or code == "FREQUENCY_LIMITED":
            return RefundResult(code=code, message=message, out_refund_no=out_refund_no)
        if 400 <= answer.status < 500:
            return RefundResult(
                code=code or f"http_{answer.status}",
                message=message,
                status=RefundStatus.REFUSED,
                out_refund_no=out_refund_no,
            )
        return RefundResult(
            code="malformed", message=f"HTTP {answer.status}", out_refund_no=out_refund_no
        )

    # ------------------------------------------------------------------ notifications

    def parse_notification(self, headers: Mapping[str, str], body: bytes) -> Notification:
        lower = {k.lower(): v for k, v in headers.items()}
        for name in (
            "wechatpay-signature",
            "wechatpay-timestamp",
            "wechatpay-nonce",
            "wechatpay-serial",
        ):
            if not lower.get(name):
                raise NotificationRejected("missing_header", f"no {name} header")
        serial = lower["wechatpay-serial"]
        key_serial = serial if serial.startswith(PUBLIC_KEY_ID_PREFIX) else serial.upper()
        if key_serial not in self._platform_keys:
            raise NotificationRejected("unknown_serial", f"unknown platform serial {serial}")
        kind = lower.get("wechatpay-signature-type")
        if kind is not None and kind != SCHEME:
            raise NotificationRejected("bad_signature", f"unsupported signature type {kind}")
        try:
            stamp = int(lower["wechatpay-timestamp"])
        except ValueError:
            raise NotificationRejected("bad_signature", "timestamp not an integer") from None
        if abs(self._now() - stamp) > self.config.max_skew_s:
            raise NotificationRejected("stale_timestamp", "timestamp more than 5 minutes off")
        message = answer_message(lower["wechatpay-timestamp"], lower["wechatpay-nonce"], body)
        if not verify(self._platform_keys[key_serial], message, lower["wechatpay-signature"]):
            raise NotificationRejected("bad_signature", "signature does not verify")
        try:
            envelope = json.loads(body)
            notification_id = envelope["id"]
            event_type = envelope["event_type"]
            resource = envelope["resource"]
            if envelope.get("resource_type") != "encrypt-resource":
                raise ValueError("resource_type")
            if resource.get("algorithm") != "AEAD_AES_256_GCM":
                raise ValueError("algorithm")
            nonce = resource["nonce"]
            ciphertext = resource["ciphertext"]
            associated = resource.get("associated_data") or ""
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise NotificationRejected("malformed", f"notification envelope: {exc}") from None
        try:
            plain = aead_decrypt(self.config.apiv3_key, nonce, ciphertext, associated)
            data = json.loads(plain)
            if not isinstance(data, dict):
                raise ValueError("resource is not an object")
        except ValueError as exc:
            raise NotificationRejected("undecryptable", str(exc)) from None
        if data.get("mchid") not in (None, self.config.mchid) or data.get("appid") not in (
            None,
            self.config.appid,
        ):
            raise NotificationRejected("wrong_merchant", "notification for another merchant")
        out_trade_no = _str(data.get("out_trade_no")) or ""
        if event_type.startswith("TRANSACTION."):
            charge = self._trade_result(out_trade_no, data)
            if charge.status is ChargeStatus.UNKNOWN:
                raise NotificationRejected("malformed", charge.message or "bad transaction")
            return Notification(
                kind=NotificationKind.PAYMENT,
                notification_id=str(notification_id),
                out_trade_no=out_trade_no,
                charge=charge,
            )
        if event_type.startswith("REFUND."):
            refund = refund_from_resource(data, out_trade_no, _str(data.get("out_refund_no")) or "")
            if refund.status is RefundStatus.UNKNOWN:
                raise NotificationRejected("malformed", refund.message or "bad refund")
            return Notification(
                kind=NotificationKind.REFUND,
                notification_id=str(notification_id),
                out_trade_no=out_trade_no,
                refund=refund,
            )
        raise NotificationRejected("unsupported_event", f"event_type {event_type}")

    def notification_answer(self, ok: bool, message: str = "") -> HttpAnswer:
        if ok:
            return HttpAnswer(status=204, content_type="", body=b"")
        body = json.dumps({"code": "FAIL", "message": message or "失败"}, ensure_ascii=False)
        return HttpAnswer(status=500, content_type="application/json", body=body.encode())

    # ------------------------------------------------------------------ bill

    @provider_call("trade_bill")
    async def trade_bill(self, day: date) -> list[BillLine]:
        answer = await self._call(
            "GET", f"/v3/bill/tradebill?bill_date={day.isoformat()}&bill_type=ALL"
        )
        if isinstance(answer, _NoAnswer):
            raise BillUnavailable(answer.provider_code or answer.code, answer.message)
        data = answer.data or {}
        if answer.status != 200:
            code = _str(data.get("code")) or f"http_{answer.status}"
            if code == "NO_STATEMENT_EXIST":
                return []  # WeChat has no bill for a day without trades
            raise BillUnavailable(code, _str(data.get("message")) or "")
        url = _str(data.get("download_url"))
        hash_type = (_str(data.get("hash_type")) or "").upper()
        hash_value = (_str(data.get("hash_value")) or "").lower()
        if not url or hash_type not in {"SHA1", "SHA256", "SM3"} or not hash_value:
            raise BillUnavailable("malformed", "no download_url / hash")
        target = urlsplit(url)
        origin = urlsplit(self._base)
        if (target.scheme, target.netloc) != (origin.scheme, origin.netloc):
            # Never send our signature to another host.
            raise BillUnavailable("malformed", "download_url is not on the API host")
        url_path = target.path + (f"?{target.query}" if target.query else "")
        try:
            response = await self._client.get(
                self._base + url_path,
                headers=self._headers("GET", url_path, b""),
                timeout=self.config.timeout_s,
            )
        except httpx.TimeoutException:
            raise BillUnavailable("timeout", "bill download timed out") from None
        except httpx.HTTPError as exc:
            raise BillUnavailable("network", f"{type(exc).__name__}") from None
        if response.status_code >= 500:
            raise BillUnavailable("http_5xx", f"HTTP {response.status_code}")
        if response.status_code != 200:
            raise BillUnavailable(
                _error_code(response.content) or "refused", f"HTTP {response.status_code}"
            )
        content = response.content  # the download is not signed: the hash vouches for it
        if hash_type == "SM3":
            digest = hashes.Hash(hashes.SM3())
            digest.update(content)
            actual = digest.finalize().hex()
        else:
            actual = hashlib.new(hash_type.lower(), content).hexdigest()
        if actual != hash_value:
            raise BillUnavailable("hash_mismatch", "bill does not match its hash")
        try:
            return parse_trade_bill(content.decode("utf-8"))
        except (ValueError, KeyError, UnicodeDecodeError) as exc:
            raise BillUnavailable("malformed", str(exc)) from None

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()


# ---------------------------------------------------------------------------- helpers


def refund_from_resource(
    data: Mapping[str, Any], out_trade_no: str, out_refund_no: str
) -> RefundResult:
    """A refund answer, refund query answer or refund notification resource."""
    state = _str(data.get("status")) or _str(data.get("refund_status")) or ""
    status = REFUND_STATES.get(state)
    if status is None:
        return RefundResult(
            code="malformed", message=f"unknown refund status {state}", out_refund_no=out_refund_no
        )
    if data.get("out_refund_no") not in (None, out_refund_no):
        return RefundResult(
            code="malformed", message="answer is for another refund", out_refund_no=out_refund_no
        )
    if out_trade_no and data.get("out_trade_no") not in (None, out_trade_no):
        return RefundResult(
            code="malformed", message="refund of another trade", out_refund_no=out_refund_no
        )
    amount = _obj(data.get("amount"))
    refund = amount.get("refund")
    return RefundResult(
        code=state,
        message=_str(data.get("user_received_account")),
        status=status,
        out_refund_no=out_refund_no,
        provider_refund_no=_str(data.get("refund_id")),
        refund_fen=refund if isinstance(refund, int) and not isinstance(refund, bool) else None,
        refunded_at=parse_time(_str(data.get("success_time"))),
    )


def _charge_unknown(out_trade_no: str, answer: _NoAnswer) -> ChargeResult:
    code = answer.code
    if code == "http_5xx" and answer.provider_code:
        message = f"{answer.provider_code}: {answer.message}"
    else:
        message = answer.message
    return ChargeResult(code=code, message=message, out_trade_no=out_trade_no)


def _check_out_no(value: str) -> None:
    if not OUT_NO.match(value):
        raise ValueError(f"not an acceptable out_trade_no/out_refund_no: {value!r}")


def _obj(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _error_code(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return _str(data.get("code")) if isinstance(data, dict) else None


def _error_message(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return _str(data.get("message")) if isinstance(data, dict) else None


def is_wechat_auth_code(code: str) -> bool:
    """18 digits starting 10..15: a WeChat payment code (others belong to other wallets)."""
    return bool(_AUTH_CODE.match(code))


def shanghai_now() -> datetime:
    return datetime.now(UTC).astimezone(SHANGHAI)


__all__ = [
    "BillUnavailable",
    "WechatPayConfig",
    "WechatPayProvider",
    "aead_decrypt",
    "answer_message",
    "authorization",
    "certificate_serial",
    "fen_to_yuan",
    "is_wechat_auth_code",
    "parse_trade_bill",
    "request_message",
    "sign",
    "verify",
    "yuan_to_fen",
]


_TRACE_HEADERS = frozenset({"traceparent", "tracestate"})


def _trace_only(headers: Mapping[str, str]) -> dict[str, str]:
    """The W3C trace context headers of ``headers``, nothing else."""
    return {k.lower(): v for k, v in headers.items() if k.lower() in _TRACE_HEADERS}
