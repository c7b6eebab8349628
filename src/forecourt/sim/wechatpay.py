"""A strict simulator of WeChat Pay API v3 (direct merchant, payment-code payments), run as its
own process.

Run it::

    python -m forecourt.sim.wechatpay --config CONFIG.json --port 0 [--host 127.0.0.1] \\
        [--port-file PATH] [--log-level INFO]

``--port 0`` picks a free port; it is logged and, with ``--port-file``, written to that file
(atomically, once the socket listens). :func:`build_app` gives the ASGI app for in-process use.

It is as strict as WeChat, so an adapter that passes here needs only a change of base URL and
keys for production:

- **Every request is authenticated**: ``Authorization: WECHATPAY2-SHA256-RSA2048 mchid="..",
  nonce_str="..",signature="..",timestamp="..",serial_no=".."``; the signature (RSA PKCS#1 v1.5
  SHA-256, merchant key) must verify over ``METHOD\\nPATH?QUERY\\nTIMESTAMP\\nNONCE\\nBODY\\n``
  (the path exactly as sent), ``mchid`` and ``serial_no`` must be the configured merchant's, the
  timestamp within 5 minutes, the nonce unused in that window. Otherwise HTTP 401
  ``SIGN_ERROR``. A body ``mchid`` other than the signer's is 400 ``INVALID_REQUEST``, an
  ``appid`` not bound to the merchant 400 ``APPID_MCHID_NOT_MATCH``.
- **Every answer is signed** with the platform key: headers ``Request-ID``,
  ``Wechatpay-Timestamp``, ``Wechatpay-Nonce``, ``Wechatpay-Signature``, ``Wechatpay-Serial``,
  ``Wechatpay-Signature-Type``, over ``TIMESTAMP\\nNONCE\\nBODY\\n``. Platform modes: a
  certificate (its serial, upper-case hex; the simulator makes a self-signed one when the config
  has none) or the platform public key (serial ``PUB_KEY_ID_...``), or both (a request carrying
  ``Wechatpay-Serial: PUB_KEY_ID_...`` is answered with the public key, others with the
  certificate). Only the bill download is not signed (as at WeChat: its hash vouches for it).
- Errors are ``{"code", "message"[, "detail": {"field", "value", "issue", "location"}]}`` with
  WeChat's HTTP statuses: 400 ``PARAM_ERROR`` / ``INVALID_REQUEST`` / ``APPID_MCHID_NOT_MATCH``,
  401 ``SIGN_ERROR``, 403 ``NOTENOUGH`` / ``TRADE_ERROR`` / ``NOT_ENOUGH``, 404
  ``ORDER_NOT_EXIST`` / ``RESOURCE_NOT_EXISTS``, 429 ``FREQUENCY_LIMITED``, 500 ``SYSTEM_ERROR``.

API answered:

- ``POST /v3/pay/transactions/codepay`` - body ``appid, mchid, description (1-127),
  out_trade_no ([0-9A-Za-z_-*]{6,32}), attach? (<=128), payer.auth_code, amount.total (integer
  > 0), amount.currency? ("CNY" only), scene_info.store_info.out_id, scene_info.device_ip``.
  The same ``out_trade_no`` with the same parameters is the same trade (its current state is
  answered again, nothing is charged twice); with other parameters 400 ``INVALID_REQUEST``
  "201 商户订单号重复"; a closed or reversed one 400 ``ORDER_CLOSED``. Answers: 200 the
  transaction (``trade_state`` SUCCESS, ``transaction_id``, ``success_time``, ``payer.openid``,
  ``amount``), 202 ``{"trade_state": "USERPAYING"}`` while the payer must confirm, or an error.
- ``GET /v3/pay/transactions/out-trade-no/{out_trade_no}?mchid=`` - the transaction
  (``trade_state`` SUCCESS / REFUND / USERPAYING / PAYERROR / REVOKED), 404 ``ORDER_NOT_EXIST``.
- ``POST /v3/pay/transactions/out-trade-no/{out_trade_no}/reverse`` - body ``appid, mchid``;
  200 ``{appid, mchid, out_trade_no}``: the trade becomes REVOKED and, if the payer had been
  charged, the money goes back (``returned_fen``). Reversing again is answered the same. A
  trade with refunds: 403 ``TRADE_ERROR``; older than 7 days: 403 ``REVERSE_EXPIRED``.
- ``POST /v3/refund/domestic/refunds`` - body ``out_trade_no, out_refund_no, reason?,
  notify_url?, amount {refund, total, currency}``; answers the refund (``status`` PROCESSING,
  SUCCESS after ``refund_delay_ms``, then a ``REFUND.SUCCESS`` notification). The same
  ``out_refund_no`` with the same parameters is the same refund; with others 400
  ``INVALID_REQUEST``. No such trade: 404 ``RESOURCE_NOT_EXISTS``; not paid: 400
  ``INVALID_REQUEST``; ``amount.total`` other than the trade's: 400 ``PARAM_ERROR``; more than
  the trade still has: 400 ``INVALID_REQUEST`` "退款金额超过订单可退金额".
- ``GET /v3/refund/domestic/refunds/{out_refund_no}`` - the refund, 404 ``RESOURCE_NOT_EXISTS``.
- ``GET /v3/bill/tradebill?bill_date=YYYY-MM-DD[&bill_type=ALL|SUCCESS|REFUND][&tar_type=GZIP]``
  - ``{hash_type: "SHA1", hash_value, download_url}``; the URL (this server's
  ``/v3/billdownload/file?token=``, valid 30 s, signed GET like any request) serves the bill:
  a CSV whose detail and summary fields each start with a backtick, header ``交易时间,公众账号ID,
  商户号,特约商户号,设备号,微信订单号,商户订单号,用户标识,交易类型,交易状态,付款银行,货币种类,
  应结订单金额,代金券金额,微信退款单号,商户退款单号,退款金额,充值券退款金额,退款类型,退款状态,
  商品名称,商户数据包,手续费,费率,订单金额,申请退款金额,费率备注``, then ``总交易单数,
  应结订单总金额,退款总金额,充值券退款总金额,手续费总金额,订单总金额,申请退款总金额`` and its
  line. Payment lines are dated by their success time, refund lines by acceptance; a payment
  later reversed shows ``REVOKED`` [I]. A day with no lines: 400 ``NO_STATEMENT_EXIST``; today
  (unless ``bill_allow_today``): 400 ``STATEMENT_CREATING``; a future day: 400 ``PARAM_ERROR``.
- ``GET /v3/certificates`` - the platform certificate (when there is one), encrypted with the
  APIv3 key as WeChat serves it.

Payer behaviour by the auth code (WeChat codes are 18 digits starting 10-15; any other is 400
``AUTH_CODE_INVALID`` and no trade is made); by its last four digits:

- ``0001`` - the payer's balance is short: 403 ``NOTENOUGH`` (trade PAYERROR);
- ``0002`` - USERPAYING; the payer confirms (SUCCESS) at the ``payer.confirm_after_queries``-th
  query (default 2) or after ``payer.confirm_after_ms`` (when set), whichever comes first;
- ``0003`` - USERPAYING, never confirmed (until reversed);
- ``0004`` - USERPAYING, then the payer cancels (PAYERROR) as ``0002`` would confirm;
- ``0005`` - an expired code: 400 ``AUTHCODEEXPIRE`` (trade PAYERROR);
- ``0006`` - refused by risk control: 403 ``TRADE_ERROR`` (trade PAYERROR);
- any other - paid at once (SUCCESS).

Notifications: a payment's success (to the config's ``notify_url``: the v3 codepay request has
no ``notify_url`` of its own) and a refund's end (to the refund's ``notify_url``, else the
config's) are POSTed as WeChat does: ``{id, create_time, resource_type: "encrypt-resource",
event_type: TRANSACTION.SUCCESS | REFUND.SUCCESS | REFUND.CLOSED | REFUND.ABNORMAL, summary,
resource: {original_type, algorithm: "AEAD_AES_256_GCM", ciphertext, associated_data, nonce}}``
signed like an answer. Any answer but 2xx (or no answer) is retried after each of
``notify_retry_ms`` (default 100, 200, 400, 800, 1600 ms), then given up.

Simulator-only endpoints (no authentication): ``GET /sim/health``; ``GET /sim/trades`` - every
trade (state, ``charged_times``: how often the payer was charged for it, ``returned_fen``,
``refunded_fen``), every refund, and per payer (auth code) ``charged_times``, ``charged_fen``,
``returned_fen``, ``refunded_fen``; ``GET /sim/notifications`` - each notification's id, event,
copies, attempts, deliveries and what each send was answered (``answers``);
``GET /sim/requests`` - the newest API requests received, each ``{method, path, traceparent,
tracestate}`` (the W3C trace context they carried, or null);
``POST /sim/control {"faults": {...}, "notify_url": URL|null}`` merges faults (``null`` puts
one back to its default) and sets where payment notifications go, everything checked before
anything changes (400 otherwise).

Faults (config ``faults`` and ``/sim/control``; a seeded RNG, ``seed`` in the config; all off by
default) on every ``/v3`` request:

- ``timeout_rate`` (0-1; ``timeout: true`` is 1) - the request is not processed: held
  ``timeout_hold_ms`` (default 30000) or until the client gives up, then the connection drops;
- ``error_5xx_rate`` - 500 ``SYSTEM_ERROR``, nothing processed (nobody charged);
- ``charge_no_answer_rate`` - codepay only: the charge is processed, then the connection drops
  without an answer (after ``slow_ms``);
- ``slow_ms`` - every answer waits that long;
- ``tamper_answer_rate`` - the answer body is changed after it was signed;
- ``answer_skew_s`` - answer and notification timestamps are off by that many seconds;
- ``notify_drop_rate`` (never sent), ``notify_duplicate_rate`` (sent twice, same id),
  ``notify_delay_ms`` (each sent that late), ``notify_reorder: bool`` (each delayed a further
  random 0..max(notify_delay_ms, 200) ms, so they arrive out of order);
- ``notify_wrong_key_rate`` - a notification is signed with a key that is not the platform's
  (under the platform's serial), every copy and re-send of it alike: a forged notification.

[I] marks behaviour inferred where no WeChat text was found: the 202 status of a USERPAYING
codepay answer (WeChat documents only ``{"trade_state": "USERPAYING"}``), the payment-code
error names (``AUTH_CODE_INVALID``, ``AUTHCODEEXPIRE`` come from the v2 API), the messages of
refund refusals, the bill's REVOKED line. Times are RFC 3339 in Asia/Shanghai.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import csv
import gzip
import hashlib
import io
import json
import logging
import random
import re
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from forecourt.infra.logging import announce
from forecourt.sim.serve import run_simulator

logger = logging.getLogger("forecourt.sim.wechatpay")

SHANGHAI = ZoneInfo("Asia/Shanghai")
SCHEME = "WECHATPAY2-SHA256-RSA2048"
MAX_SKEW_S = 300
REVERSE_DAYS = 7
BILL_TOKEN_S = 30

OUT_TRADE_NO = re.compile(r"^[0-9A-Za-z_\-*]{6,32}$")
OUT_REFUND_NO = re.compile(r"^[0-9A-Za-z_\-|*@]{1,64}$")
AUTH_CODE = re.compile(r"^1[0-5][0-9]{16}$")
BILL_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_AUTH_PARAM = re.compile(r'(\w+)="([^"]*)"')

BILL_HEADER = (
    "交易时间,公众账号ID,商户号,特约商户号,设备号,微信订单号,商户订单号,用户标识,交易类型,交易状态,"
    "付款银行,货币种类,应结订单金额,代金券金额,微信退款单号,商户退款单号,退款金额,充值券退款金额,"
    "退款类型,退款状态,商品名称,商户数据包,手续费,费率,订单金额,申请退款金额,费率备注"
).split(",")
BILL_SUMMARY_HEADER = (
    "总交易单数,应结订单总金额,退款总金额,充值券退款总金额,手续费总金额,订单总金额,申请退款总金额"
).split(",")
FEE_RATE_PPM = 6000  # 0.60%


class SimConfigError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --------------------------------------------------------------------------- crypto


def rsa_sign(key: rsa.RSAPrivateKey, message: bytes) -> str:
    return base64.b64encode(key.sign(message, padding.PKCS1v15(), hashes.SHA256())).decode()


def rsa_verify(key: rsa.RSAPublicKey, message: bytes, signature_b64: str) -> bool:
    try:
        key.verify(
            base64.b64decode(signature_b64, validate=True),
            message,
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
    except (InvalidSignature, ValueError):
        return False
    return True


def aead_encrypt(apiv3_key: str, plaintext: bytes, associated_data: str) -> dict[str, str]:
    """WeChat's encrypted resource: AES-256-GCM, a 12-character nonce, base64 ciphertext+tag."""
    nonce = secrets.token_urlsafe(9)[:12]
    data = AESGCM(apiv3_key.encode()).encrypt(
        nonce.encode(), plaintext, associated_data.encode() if associated_data else None
    )
    return {
        "algorithm": "AEAD_AES_256_GCM",
        "ciphertext": base64.b64encode(data).decode(),
        "associated_data": associated_data,
        "nonce": nonce,
    }


def make_platform_certificate(
    private_key: rsa.RSAPrivateKey, *, serial: int | None = None, days: int = 3650
) -> str:
    """A self-signed certificate for the platform key, PEM (its serial is what answers name)."""
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "CN"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tenpay.com (simulated)"),
            x509.NameAttribute(NameOID.COMMON_NAME, "Tenpay.com Root CA (simulated)"),
        ]
    )
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=days))
        .sign(private_key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def _load_private(pem: str, what: str) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise SimConfigError(f"{what}: not a PEM private key") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SimConfigError(f"{what}: not an RSA key")
    return key


def _load_public(pem: str, what: str) -> rsa.RSAPublicKey:
    try:
        if "CERTIFICATE" in pem:
            key: Any = x509.load_pem_x509_certificate(pem.encode()).public_key()
        else:
            key = serialization.load_pem_public_key(pem.encode())
    except ValueError as exc:
        raise SimConfigError(f"{what}: not a PEM public key or certificate") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise SimConfigError(f"{what}: not an RSA key")
    return key


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Faults:
    timeout_rate: float = 0.0
    timeout_hold_ms: int = 30_000
    error_5xx_rate: float = 0.0
    charge_no_answer_rate: float = 0.0
    slow_ms: int = 0
    tamper_answer_rate: float = 0.0
    answer_skew_s: int = 0
    notify_drop_rate: float = 0.0
    notify_duplicate_rate: float = 0.0
    notify_delay_ms: int = 0
    notify_reorder: bool = False
    notify_wrong_key_rate: float = 0.0

    def merged(self, changes: Mapping[str, Any]) -> Faults:
        """These faults with ``changes`` applied (``None`` = default); raises SimConfigError."""
        defaults = Faults()
        known = {f.name: f for f in fields(Faults)}
        values: dict[str, Any] = {}
        for name, value in changes.items():
            if name == "timeout":
                if not isinstance(value, bool) and value is not None:
                    raise SimConfigError("faults.timeout must be true or false")
                values["timeout_rate"] = 1.0 if value else 0.0
                continue
            if name not in known:
                raise SimConfigError(f"unknown fault {name!r}")
            if value is None:
                values[name] = getattr(defaults, name)
                continue
            default = getattr(defaults, name)
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise SimConfigError(f"faults.{name} must be true or false")
            elif isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise SimConfigError(f"faults.{name} must be a number")
                if not 0.0 <= float(value) <= 1.0:
                    raise SimConfigError(f"faults.{name} must be within 0..1")
                value = float(value)
            else:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise SimConfigError(f"faults.{name} must be an integer")
                if name != "answer_skew_s" and value < 0:
                    raise SimConfigError(f"faults.{name} must not be negative")
            values[name] = value
        return replace(self, **values)


@dataclass(frozen=True)
class SimConfig:
    mchid: str
    appid: str
    merchant_serial_no: str
    merchant_public_key: rsa.RSAPublicKey
    apiv3_key: str
    platform_private_key: rsa.RSAPrivateKey
    platform_certificate_pem: str | None
    platform_certificate_serial: str | None
    platform_public_key_id: str | None
    notify_url: str | None = None
    seed: int = 1
    confirm_after_queries: int = 2
    confirm_after_ms: int | None = None
    refund_delay_ms: int = 100
    bill_allow_today: bool = False
    notify_retry_ms: tuple[int, ...] = (100, 200, 400, 800, 1600)
    faults: Faults = field(default_factory=Faults)


def config_from_mapping(raw: Mapping[str, Any]) -> SimConfig:
    """Read a simulator config (see the module docstring); raises SimConfigError."""
    try:
        mchid = _text(raw, "mchid")
        appid = _text(raw, "appid")
        merchant = raw["merchant"]
        platform = raw["platform"]
        apiv3_key = _text(raw, "apiv3_key")
    except (KeyError, TypeError) as exc:
        raise SimConfigError(f"config: missing {exc}") from exc
    if len(apiv3_key.encode()) != 32:
        raise SimConfigError("apiv3_key must be 32 bytes")
    merchant_pem = merchant.get("certificate_pem") or merchant.get("public_key_pem")
    if not isinstance(merchant_pem, str):
        raise SimConfigError("merchant: give public_key_pem or certificate_pem")
    merchant_key = _load_public(merchant_pem, "merchant key")
    serial = merchant.get("serial_no")
    if serial is None and merchant.get("certificate_pem"):
        serial = format(x509.load_pem_x509_certificate(merchant_pem.encode()).serial_number, "X")
    if not isinstance(serial, str) or not serial:
        raise SimConfigError("merchant.serial_no missing")
    private = _load_private(_text(platform, "private_key_pem"), "platform.private_key_pem")
    mode = platform.get("mode")
    public_key_id = platform.get("public_key_id")
    certificate = platform.get("certificate_pem")
    if mode is None:
        mode = (
            "both"
            if public_key_id and certificate
            else ("public_key" if public_key_id else "certificate")
        )
    if mode not in {"certificate", "public_key", "both"}:
        raise SimConfigError("platform.mode must be certificate, public_key or both")
    if mode in {"public_key", "both"}:
        if not isinstance(public_key_id, str) or not public_key_id.startswith("PUB_KEY_ID_"):
            raise SimConfigError("platform.public_key_id must start with PUB_KEY_ID_")
    else:
        public_key_id = None
    cert_serial: str | None = None
    if mode in {"certificate", "both"}:
        if certificate is None:
            certificate = make_platform_certificate(private)
        cert = x509.load_pem_x509_certificate(certificate.encode())
        cert_key = cert.public_key()
        if (
            not isinstance(cert_key, rsa.RSAPublicKey)
            or cert_key.public_numbers() != private.public_key().public_numbers()
        ):
            raise SimConfigError("platform.certificate_pem is not the platform key's")
        cert_serial = format(cert.serial_number, "X")
    else:
        certificate = None
    payer = raw.get("payer") or {}
    confirm_ms = payer.get("confirm_after_ms")
    retry = raw.get("notify_retry_ms", SimConfig.notify_retry_ms)
    try:
        config = SimConfig(
            mchid=mchid,
            appid=appid,
            merchant_serial_no=serial.upper(),
            merchant_public_key=merchant_key,
            apiv3_key=apiv3_key,
            platform_private_key=private,
            platform_certificate_pem=certificate,
            platform_certificate_serial=cert_serial,
            platform_public_key_id=public_key_id,
            notify_url=raw.get("notify_url"),
            seed=int(raw.get("seed", 1)),
            confirm_after_queries=int(payer.get("confirm_after_queries", 2)),
            confirm_after_ms=int(confirm_ms) if confirm_ms is not None else None,
            refund_delay_ms=int(raw.get("refund_delay_ms", 100)),
            bill_allow_today=bool(raw.get("bill_allow_today", False)),
            notify_retry_ms=tuple(int(ms) for ms in retry),
        )
    except (TypeError, ValueError) as exc:
        raise SimConfigError(f"config: {exc}") from exc
    return replace(config, faults=Faults().merged(raw.get("faults") or {}))


def load_config(path: str | Path) -> SimConfig:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SimConfigError(f"cannot read config {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise SimConfigError("config must be a JSON object")
    return config_from_mapping(raw)


def _text(obj: Mapping[str, Any], name: str) -> str:
    value = obj[name]
    if not isinstance(value, str) or not value:
        raise SimConfigError(f"config: {name} must be a non-empty string")
    return value


# --------------------------------------------------------------------------- model


def now_local() -> datetime:
    return datetime.now(UTC).astimezone(SHANGHAI).replace(microsecond=0)


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(SHANGHAI).isoformat(timespec="seconds")


def yuan(fen: int) -> str:
    return f"{fen // 100}.{fen % 100:02d}"


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, detail: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            body["detail"] = dict(self.detail)
        return body


def param_error(path: str, issue: str, value: Any = None) -> ApiError:
    return ApiError(
        400,
        "PARAM_ERROR",
        f"参数错误: {path} {issue}",
        {"field": path, "value": value, "issue": issue, "location": "body"},
    )


@dataclass
class Trade:
    out_trade_no: str
    transaction_id: str
    params: tuple[Any, ...]
    description: str
    attach: str | None
    total: int
    auth_code: str
    openid: str
    behaviour: str  # pay / notenough / confirm / never / cancel / expired / risk
    created_at: datetime
    store_id: str
    state: str = "NOTPAY"
    success_time: datetime | None = None
    queries: int = 0
    charged_times: int = 0
    returned_fen: int = 0
    refunded_fen: int = 0
    refusal: ApiError | None = None
    revoked_after_charge: bool = False
    refunds: list[str] = field(default_factory=list)


@dataclass
class Refund:
    out_refund_no: str
    refund_id: str
    out_trade_no: str
    transaction_id: str
    params: tuple[Any, ...]
    refund: int
    total: int
    reason: str | None
    notify_url: str | None
    created_at: datetime
    status: str = "PROCESSING"
    success_time: datetime | None = None


@dataclass
class Payer:
    charged_times: int = 0
    charged_fen: int = 0
    returned_fen: int = 0
    refunded_fen: int = 0


@dataclass
class NotificationRecord:
    id: str
    event_type: str
    out_trade_no: str
    out_refund_no: str | None
    url: str
    copies: int = 1
    attempts: int = 0
    deliveries: int = 0
    dropped: bool = False
    wrong_key: bool | None = None  # signed with a stranger's key (decided at its first send)
    answers: list[str] = field(default_factory=list)  # what each send was answered


def _note_answer(
    record: NotificationRecord, response: httpx.Response | None, error: Exception | None = None
) -> None:
    """Keep what a send of ``record`` was answered: ``"<status> <body>"``, or the failure."""
    if response is None:
        record.answers.append(f"no answer: {type(error).__name__}")
    else:
        record.answers.append(f"{response.status_code} {response.text[:200]}")


@dataclass
class BillFile:
    content: bytes
    expires: float


class _Drop(Exception):
    """Answer nothing: the connection is dropped."""


# --------------------------------------------------------------------------- the simulator


class WechatPaySimulator:
    """All state of one simulated WeChat Pay (one merchant)."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.faults = config.faults
        self.rng = random.Random(config.seed)
        self.trades: dict[str, Trade] = {}
        self.refunds: dict[str, Refund] = {}
        self.payers: dict[str, Payer] = {}
        self.notifications: list[NotificationRecord] = []
        self.bills: dict[str, BillFile] = {}
        self._nonces: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None
        self._counter = 0
        self.notify_url = config.notify_url
        self.stats = {"requests": 0, "sign_errors": 0, "faults": 0}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=5.0)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._client is not None:
            await self._client.aclose()

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _next_id(self, prefix: str) -> str:
        self._counter += 1
        stamp = now_local().strftime("%Y%m%d")
        return f"{prefix}{stamp}{self._counter:010d}{self.rng.randrange(10**6):06d}"

    # ------------------------------------------------------------------ signing

    def _answer_key(self, request_serial: str | None) -> tuple[str, rsa.RSAPrivateKey]:
        config = self.config
        key = config.platform_private_key
        if config.platform_public_key_id and (
            request_serial == config.platform_public_key_id
            or config.platform_certificate_serial is None
        ):
            return config.platform_public_key_id, key
        assert config.platform_certificate_serial is not None
        return config.platform_certificate_serial, key

    def signed_headers(self, body: bytes, request_serial: str | None = None) -> dict[str, str]:
        serial, key = self._answer_key(request_serial)
        timestamp = str(int(time.time()) + self.faults.answer_skew_s)
        nonce = secrets.token_hex(16).upper()
        signature = rsa_sign(key, f"{timestamp}\n{nonce}\n".encode() + body + b"\n")
        return {
            "Request-ID": uuid.uuid4().hex,
            "Wechatpay-Timestamp": timestamp,
            "Wechatpay-Nonce": nonce,
            "Wechatpay-Signature": signature,
            "Wechatpay-Serial": serial,
            "Wechatpay-Signature-Type": SCHEME,
        }

    def answer(
        self, status: int, data: Mapping[str, Any] | None, request_serial: str | None = None
    ) -> Response:
        body = (
            json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
            if data is not None
            else b""
        )
        headers = self.signed_headers(body, request_serial)
        if body and self.faults.tamper_answer_rate and self._hit(self.faults.tamper_answer_rate):
            body = body[:-1] + b" }"  # still JSON, no longer what was signed
        return Response(
            body,
            status_code=status,
            headers=headers,
            media_type="application/json" if body else None,
        )

    def _hit(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    # ------------------------------------------------------------------ authentication

    def authenticate(
        self, method: str, url_path: str, headers: Mapping[str, str], body: bytes
    ) -> None:
        value = headers.get("authorization", "")
        if not value.startswith(SCHEME + " "):
            raise ApiError(401, "SIGN_ERROR", "签名错误: 缺少或不支持的认证类型")
        params = dict(_AUTH_PARAM.findall(value[len(SCHEME) + 1 :]))
        missing = {"mchid", "nonce_str", "signature", "timestamp", "serial_no"} - params.keys()
        if missing:
            raise ApiError(401, "SIGN_ERROR", f"签名错误: Authorization 缺少 {sorted(missing)}")
        if params["mchid"] != self.config.mchid:
            raise ApiError(401, "SIGN_ERROR", "签名错误: 商户号与证书不匹配")
        if params["serial_no"].upper() != self.config.merchant_serial_no:
            raise ApiError(401, "SIGN_ERROR", "签名错误: 商户证书序列号有误")
        try:
            stamp = int(params["timestamp"])
        except ValueError:
            raise ApiError(401, "SIGN_ERROR", "签名错误: 时间戳格式错误") from None
        now = time.time()
        if abs(now - stamp) > MAX_SKEW_S:
            raise ApiError(401, "SIGN_ERROR", "签名错误: 请求时间戳已过期")
        message = (
            f"{method}\n{url_path}\n{params['timestamp']}\n{params['nonce_str']}\n".encode()
            + body
            + b"\n"
        )
        if not rsa_verify(self.config.merchant_public_key, message, params["signature"]):
            raise ApiError(401, "SIGN_ERROR", "签名错误: 签名验证不通过")
        for nonce, seen in list(self._nonces.items()):
            if now - seen > 2 * MAX_SKEW_S:
                del self._nonces[nonce]
        if params["nonce_str"] in self._nonces:
            raise ApiError(401, "SIGN_ERROR", "签名错误: 随机串重复")
        self._nonces[params["nonce_str"]] = now

    def _json_body(self, body: bytes, content_type: str) -> dict[str, Any]:
        if not content_type.lower().startswith("application/json"):
            raise ApiError(
                400, "INVALID_REQUEST", "HTTP 请求不符合微信支付 APIv3 接口规则: Content-Type"
            )
        try:
            data = json.loads(body)
        except ValueError:
            raise ApiError(400, "PARAM_ERROR", "参数错误: 请求体不是合法的 JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "PARAM_ERROR", "参数错误: 请求体必须是 JSON 对象")
        return data

    def _merchant(self, data: Mapping[str, Any], *, appid_required: bool = True) -> None:
        mchid = data.get("mchid")
        if not isinstance(mchid, str) or not mchid:
            raise param_error("/mchid", "必填", mchid)
        if mchid != self.config.mchid:
            raise ApiError(400, "INVALID_REQUEST", "请求的商户号与签名商户号不一致")
        appid = data.get("appid")
        if appid is None and not appid_required:
            return
        if not isinstance(appid, str) or not appid:
            raise param_error("/appid", "必填", appid)
        if appid != self.config.appid:
            raise ApiError(400, "APPID_MCHID_NOT_MATCH", "AppID和mch_id不匹配")

    # ------------------------------------------------------------------ payments

    def codepay(self, data: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        self._merchant(data)
        description = data.get("description")
        if not isinstance(description, str) or not 1 <= len(description) <= 127:
            raise param_error("/description", "必填, 1-127 个字符", description)
        out_trade_no = data.get("out_trade_no")
        if not isinstance(out_trade_no, str) or not OUT_TRADE_NO.match(out_trade_no):
            raise param_error(
                "/out_trade_no", "6-32 个字符, 只能是数字、大小写字母_-*", out_trade_no
            )
        attach = data.get("attach")
        if attach is not None and (not isinstance(attach, str) or len(attach) > 128):
            raise param_error("/attach", "最长 128 个字符", attach)
        payer = data.get("payer")
        auth_code = payer.get("auth_code") if isinstance(payer, dict) else None
        if not isinstance(auth_code, str) or not auth_code:
            raise param_error("/payer/auth_code", "必填", auth_code)
        total, currency = self._amount(data.get("amount"), "total")
        scene = data.get("scene_info")
        store = scene.get("store_info") if isinstance(scene, dict) else None
        out_id = store.get("out_id") if isinstance(store, dict) else None
        if not isinstance(out_id, str) or not 1 <= len(out_id) <= 32:
            raise param_error("/scene_info/store_info/out_id", "必填, 1-32 个字符", out_id)
        device_ip = scene.get("device_ip") if isinstance(scene, dict) else None
        if not isinstance(device_ip, str) or not device_ip:
            raise param_error("/scene_info/device_ip", "必填", device_ip)
        params = (data["appid"], description, total, currency, auth_code, attach)
        existing = self.trades.get(out_trade_no)
        if existing is not None:
            if existing.params != params:
                raise ApiError(400, "INVALID_REQUEST", "201 商户订单号重复")
            return self._codepay_answer(existing)
        if not AUTH_CODE.match(auth_code):
            raise ApiError(400, "AUTH_CODE_INVALID", "付款码无效, 请用户刷新付款码后重新支付")
        behaviour = {
            "0001": "notenough",
            "0002": "confirm",
            "0003": "never",
            "0004": "cancel",
            "0005": "expired",
            "0006": "risk",
        }.get(auth_code[-4:], "pay")
        trade = Trade(
            out_trade_no=out_trade_no,
            transaction_id=self._next_id("42"),
            params=params,
            description=description,
            attach=attach,
            total=total,
            auth_code=auth_code,
            openid="o" + hashlib.sha256(auth_code.encode()).hexdigest()[:27],
            behaviour=behaviour,
            created_at=now_local(),
            store_id=out_id,
        )
        self.trades[out_trade_no] = trade
        if behaviour == "notenough":
            trade.state = "PAYERROR"
            trade.refusal = ApiError(
                403, "NOTENOUGH", "用户账号余额不足, 请用户充值或更换支付卡后再支付"
            )
        elif behaviour == "expired":
            trade.state = "PAYERROR"
            trade.refusal = ApiError(
                400, "AUTHCODEEXPIRE", "二维码已过期, 请用户在微信上刷新后再试"
            )
        elif behaviour == "risk":
            trade.state = "PAYERROR"
            trade.refusal = ApiError(403, "TRADE_ERROR", "交易错误: 该笔交易存在风险, 已被拦截")
        elif behaviour in {"confirm", "never", "cancel"}:
            trade.state = "USERPAYING"
            if behaviour != "never" and self.config.confirm_after_ms is not None:
                self._spawn(self._confirm_later(trade, self.config.confirm_after_ms / 1000))
        else:
            self._charge(trade)
        return self._codepay_answer(trade)

    def _amount(self, amount: Any, name: str) -> tuple[int, str]:
        if not isinstance(amount, dict):
            raise param_error("/amount", "必填")
        value = amount.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise param_error(f"/amount/{name}", "必须是整数(单位: 分)", value)
        if value <= 0:
            raise param_error(f"/amount/{name}", "必须大于 0", value)
        currency = amount.get("currency", "CNY")
        if currency != "CNY":
            raise param_error("/amount/currency", "境内商户号仅支持人民币 CNY", currency)
        return value, currency

    def _codepay_answer(self, trade: Trade) -> tuple[int, dict[str, Any]]:
        if trade.state in {"SUCCESS", "REFUND"}:
            return 200, self._transaction(trade)
        if trade.state == "USERPAYING":
            return 202, {"trade_state": "USERPAYING"}
        if trade.state in {"REVOKED", "CLOSED"}:
            raise ApiError(400, "ORDER_CLOSED", "订单已关闭或已撤销")
        if trade.refusal is not None:
            raise trade.refusal
        return 200, self._transaction(trade)

    async def _confirm_later(self, trade: Trade, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        self._settle(trade)

    def _advance(self, trade: Trade) -> None:
        if trade.state != "USERPAYING" or trade.behaviour == "never":
            return
        due = trade.queries >= self.config.confirm_after_queries
        if self.config.confirm_after_ms is not None:
            elapsed = (now_local() - trade.created_at).total_seconds() * 1000
            due = due or elapsed >= self.config.confirm_after_ms
        if due:
            self._settle(trade)

    def _settle(self, trade: Trade) -> None:
        if trade.state != "USERPAYING":
            return
        if trade.behaviour == "cancel":
            trade.state = "PAYERROR"
            trade.refusal = ApiError(403, "TRADE_ERROR", "用户取消支付")
        else:
            self._charge(trade)

    def _charge(self, trade: Trade) -> None:
        trade.state = "SUCCESS"
        trade.success_time = now_local()
        trade.charged_times += 1
        payer = self.payers.setdefault(trade.auth_code, Payer())
        payer.charged_times += 1
        payer.charged_fen += trade.total
        if self.notify_url:
            self._notify(
                self.notify_url,
                "TRANSACTION.SUCCESS",
                "支付成功",
                "transaction",
                self._transaction(trade),
                trade.out_trade_no,
            )

    def _transaction(self, trade: Trade) -> dict[str, Any]:
        data: dict[str, Any] = {
            "appid": self.config.appid,
            "mchid": self.config.mchid,
            "out_trade_no": trade.out_trade_no,
            "trade_type": "MICROPAY",
            "trade_state": trade.state,
            "trade_state_desc": {
                "SUCCESS": "支付成功",
                "REFUND": "转入退款",
                "USERPAYING": "需要用户输入支付密码",
                "PAYERROR": "支付失败",
                "REVOKED": "已撤销",
                "NOTPAY": "未支付",
                "CLOSED": "已关闭",
            }[trade.state],
            "amount": {"total": trade.total, "currency": "CNY"},
        }
        if trade.attach is not None:
            data["attach"] = trade.attach
        if trade.charged_times:
            data["transaction_id"] = trade.transaction_id
            data["bank_type"] = "OTHERS"
            data["payer"] = {"openid": trade.openid}
            data["amount"].update({"payer_total": trade.total, "payer_currency": "CNY"})
            if trade.success_time is not None:
                data["success_time"] = rfc3339(trade.success_time)
        return data

    def query(self, out_trade_no: str, mchid: str | None) -> tuple[int, dict[str, Any]]:
        if not mchid:
            raise ApiError(
                400,
                "PARAM_ERROR",
                "参数错误: 缺少 mchid",
                {"field": "mchid", "value": None, "issue": "必填", "location": "query"},
            )
        if mchid != self.config.mchid:
            raise ApiError(400, "INVALID_REQUEST", "请求的商户号与签名商户号不一致")
        trade = self.trades.get(out_trade_no)
        if trade is None:
            raise ApiError(404, "ORDER_NOT_EXIST", "订单不存在")
        trade.queries += 1
        self._advance(trade)
        return 200, self._transaction(trade)

    def reverse(self, out_trade_no: str, data: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        self._merchant(data)
        trade = self.trades.get(out_trade_no)
        if trade is None:
            raise ApiError(404, "ORDER_NOT_EXIST", "订单不存在")
        if trade.refunds:
            raise ApiError(403, "TRADE_ERROR", "订单已发生退款, 不能撤销, 请使用退款")
        if now_local() - trade.created_at > timedelta(days=REVERSE_DAYS):
            raise ApiError(403, "REVERSE_EXPIRED", "订单已超过撤销期限, 请使用退款")
        if trade.state != "REVOKED":
            if trade.state == "SUCCESS":
                trade.returned_fen += trade.total
                trade.revoked_after_charge = True
                payer = self.payers.setdefault(trade.auth_code, Payer())
                payer.returned_fen += trade.total
            trade.state = "REVOKED"
            trade.refusal = None
        return 200, {
            "appid": self.config.appid,
            "mchid": self.config.mchid,
            "out_trade_no": out_trade_no,
        }

    # ------------------------------------------------------------------ refunds

    def refund(self, data: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        out_trade_no = data.get("out_trade_no")
        transaction_id = data.get("transaction_id")
        if out_trade_no is None and transaction_id is None:
            raise param_error("/out_trade_no", "out_trade_no 与 transaction_id 二选一必填")
        out_refund_no = data.get("out_refund_no")
        if not isinstance(out_refund_no, str) or not OUT_REFUND_NO.match(out_refund_no):
            raise param_error("/out_refund_no", "必填, 1-64 个字符", out_refund_no)
        reason = data.get("reason")
        if reason is not None and (not isinstance(reason, str) or len(reason) > 80):
            raise param_error("/reason", "最长 80 个字符", reason)
        notify_url = data.get("notify_url")
        if notify_url is not None and (
            not isinstance(notify_url, str) or urlsplit(notify_url).scheme not in {"http", "https"}
        ):
            raise param_error("/notify_url", "必须是 URL", notify_url)
        amount = data.get("amount")
        refund_fen, _ = self._amount(amount, "refund")
        total_fen, _ = self._amount(amount, "total")
        trade: Trade | None
        if out_trade_no is not None:
            trade = self.trades.get(str(out_trade_no))
        else:
            trade = next(
                (t for t in self.trades.values() if t.transaction_id == transaction_id), None
            )
        params = (trade.out_trade_no if trade else out_trade_no, refund_fen, total_fen)
        existing = self.refunds.get(out_refund_no)
        if existing is not None:
            if existing.params != params:
                raise ApiError(400, "INVALID_REQUEST", "同一退款单号的请求参数与原请求不一致")
            self._advance_refund(existing)
            return 200, self._refund_view(existing)
        if trade is None:
            raise ApiError(404, "RESOURCE_NOT_EXISTS", "订单不存在")
        if trade.state not in {"SUCCESS", "REFUND"}:
            raise ApiError(400, "INVALID_REQUEST", "订单未支付成功, 不能退款")
        if total_fen != trade.total:
            raise param_error("/amount/total", "与原订单金额不一致", total_fen)
        if refund_fen > trade.total - trade.refunded_fen:
            raise ApiError(400, "INVALID_REQUEST", "退款金额超过订单可退金额")
        refund = Refund(
            out_refund_no=out_refund_no,
            refund_id=self._next_id("50"),
            out_trade_no=trade.out_trade_no,
            transaction_id=trade.transaction_id,
            params=params,
            refund=refund_fen,
            total=total_fen,
            reason=reason,
            notify_url=notify_url or self.notify_url,
            created_at=now_local(),
        )
        self.refunds[out_refund_no] = refund
        trade.refunds.append(out_refund_no)
        trade.refunded_fen += refund_fen
        trade.state = "REFUND"
        payer = self.payers.setdefault(trade.auth_code, Payer())
        payer.refunded_fen += refund_fen
        if self.config.refund_delay_ms <= 0:
            self._finish_refund(refund)
        else:
            self._spawn(self._refund_later(refund, self.config.refund_delay_ms / 1000))
        return 200, self._refund_view(refund)

    async def _refund_later(self, refund: Refund, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        self._finish_refund(refund)

    def _advance_refund(self, refund: Refund) -> None:
        elapsed = (now_local() - refund.created_at).total_seconds() * 1000
        if refund.status == "PROCESSING" and elapsed >= self.config.refund_delay_ms:
            self._finish_refund(refund)

    def _finish_refund(self, refund: Refund) -> None:
        if refund.status != "PROCESSING":
            return
        refund.status = "SUCCESS"
        refund.success_time = now_local()
        if refund.notify_url:
            resource = {
                "mchid": self.config.mchid,
                "out_trade_no": refund.out_trade_no,
                "transaction_id": refund.transaction_id,
                "out_refund_no": refund.out_refund_no,
                "refund_id": refund.refund_id,
                "refund_status": refund.status,
                "success_time": rfc3339(refund.success_time),
                "user_received_account": "支付用户零钱",
                "amount": {
                    "total": refund.total,
                    "refund": refund.refund,
                    "payer_total": refund.total,
                    "payer_refund": refund.refund,
                },
            }
            self._notify(
                refund.notify_url,
                "REFUND.SUCCESS",
                "退款成功",
                "refund",
                resource,
                refund.out_trade_no,
                refund.out_refund_no,
            )

    def _refund_view(self, refund: Refund) -> dict[str, Any]:
        data: dict[str, Any] = {
            "refund_id": refund.refund_id,
            "out_refund_no": refund.out_refund_no,
            "transaction_id": refund.transaction_id,
            "out_trade_no": refund.out_trade_no,
            "channel": "ORIGINAL",
            "user_received_account": "支付用户零钱",
            "create_time": rfc3339(refund.created_at),
            "status": refund.status,
            "funds_account": "AVAILABLE",
            "amount": {
                "total": refund.total,
                "refund": refund.refund,
                "payer_total": refund.total,
                "payer_refund": refund.refund,
                "settlement_refund": refund.refund,
                "settlement_total": refund.total,
                "discount_refund": 0,
                "currency": "CNY",
                "refund_fee": 0,
            },
        }
        if refund.success_time is not None:
            data["success_time"] = rfc3339(refund.success_time)
        return data

    def query_refund(self, out_refund_no: str) -> tuple[int, dict[str, Any]]:
        refund = self.refunds.get(out_refund_no)
        if refund is None:
            raise ApiError(404, "RESOURCE_NOT_EXISTS", "退款单不存在")
        self._advance_refund(refund)
        return 200, self._refund_view(refund)

    # ------------------------------------------------------------------ bills

    def trade_bill(self, query: Mapping[str, str], base_url: str) -> tuple[int, dict[str, Any]]:
        text = query.get("bill_date")
        if not text or not BILL_DATE.match(text):
            raise ApiError(
                400,
                "PARAM_ERROR",
                "参数错误: bill_date 格式为 YYYY-MM-DD",
                {"field": "bill_date", "value": text, "issue": "格式错误", "location": "query"},
            )
        try:
            day = date.fromisoformat(text)
        except ValueError:
            raise ApiError(400, "PARAM_ERROR", "参数错误: bill_date 不是日期") from None
        bill_type = query.get("bill_type", "ALL")
        if bill_type not in {"ALL", "SUCCESS", "REFUND"}:
            raise ApiError(400, "PARAM_ERROR", "参数错误: bill_type")
        tar_type = query.get("tar_type")
        if tar_type not in {None, "GZIP"}:
            raise ApiError(400, "PARAM_ERROR", "参数错误: tar_type")
        today = now_local().date()
        if day > today:
            raise ApiError(400, "PARAM_ERROR", "参数错误: 账单日期不能晚于今天")
        if day == today and not self.config.bill_allow_today:
            raise ApiError(400, "STATEMENT_CREATING", "账单生成中, 请次日再下载")
        content = self.bill_csv(day, bill_type)
        if content is None:
            raise ApiError(400, "NO_STATEMENT_EXIST", "账单文件不存在")
        if tar_type == "GZIP":
            content = gzip.compress(content, mtime=0)
        token = secrets.token_urlsafe(24)
        self.bills[token] = BillFile(content, time.monotonic() + BILL_TOKEN_S)
        return 200, {
            "hash_type": "SHA1",
            "hash_value": hashlib.sha1(content).hexdigest(),
            "download_url": f"{base_url}/v3/billdownload/file?token={token}",
        }

    def bill_csv(self, day: date, bill_type: str = "ALL") -> bytes | None:
        rows: list[list[str]] = []
        paid = refunded = fees = ordered = asked = 0
        if bill_type in {"ALL", "SUCCESS"}:
            for trade in self.trades.values():
                if trade.success_time is None or trade.success_time.date() != day:
                    continue
                fee = trade.total * FEE_RATE_PPM  # millionths of a fen
                state = "REVOKED" if trade.revoked_after_charge else "SUCCESS"
                rows.append(bill_payment_row(self.config, trade, state))
                paid += trade.total
                ordered += trade.total
                fees += fee
        if bill_type in {"ALL", "REFUND"}:
            for refund in self.refunds.values():
                if refund.created_at.date() != day:
                    continue
                trade = self.trades[refund.out_trade_no]
                rows.append(bill_refund_row(self.config, trade, refund))
                refunded += refund.refund
                asked += refund.refund
        if not rows:
            return None
        summary = [
            str(len(rows)),
            yuan(paid),
            yuan(refunded),
            "0.00",
            _fee_text(fees),
            yuan(ordered),
            yuan(asked),
        ]
        return encode_bill(rows, summary)

    def download(self, token: str | None) -> bytes:
        bill = self.bills.get(token or "")
        if bill is None or bill.expires < time.monotonic():
            raise ApiError(400, "INVALID_REQUEST", "下载链接已失效, 请重新申请账单")
        return bill.content

    def certificates(self) -> dict[str, Any]:
        config = self.config
        if config.platform_certificate_pem is None:
            return {"data": []}
        cert = x509.load_pem_x509_certificate(config.platform_certificate_pem.encode())
        return {
            "data": [
                {
                    "serial_no": config.platform_certificate_serial,
                    "effective_time": rfc3339(cert.not_valid_before_utc),
                    "expire_time": rfc3339(cert.not_valid_after_utc),
                    "encrypt_certificate": aead_encrypt(
                        config.apiv3_key, config.platform_certificate_pem.encode(), "certificate"
                    ),
                }
            ]
        }

    # ------------------------------------------------------------------ notifications

    def _notify(
        self,
        url: str,
        event_type: str,
        summary: str,
        original_type: str,
        resource: Mapping[str, Any],
        out_trade_no: str,
        out_refund_no: str | None = None,
    ) -> None:
        plaintext = json.dumps(resource, ensure_ascii=False, separators=(",", ":")).encode()
        encrypted = aead_encrypt(self.config.apiv3_key, plaintext, original_type)
        encrypted["original_type"] = original_type
        record = NotificationRecord(
            id=str(uuid.uuid4()),
            event_type=event_type,
            out_trade_no=out_trade_no,
            out_refund_no=out_refund_no,
            url=url,
        )
        self.notifications.append(record)
        envelope = {
            "id": record.id,
            "create_time": rfc3339(now_local()),
            "resource_type": "encrypt-resource",
            "event_type": event_type,
            "summary": summary,
            "resource": encrypted,
        }
        body = json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode()
        faults = self.faults
        if self._hit(faults.notify_drop_rate):
            record.dropped = True
            return
        record.copies = 2 if self._hit(faults.notify_duplicate_rate) else 1
        for _ in range(record.copies):
            delay_ms = float(faults.notify_delay_ms)
            if faults.notify_reorder:
                delay_ms += self.rng.uniform(0, max(faults.notify_delay_ms, 200))
            self._spawn(self._deliver(record, body, delay_ms / 1000))

    async def _deliver(self, record: NotificationRecord, body: bytes, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        assert self._client is not None
        for wait_ms in (0, *self.config.notify_retry_ms):
            if wait_ms:
                await asyncio.sleep(wait_ms / 1000)
            record.attempts += 1
            headers = self._notification_headers(record, body)
            headers["Content-Type"] = "application/json"
            try:
                response = await self._client.post(record.url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                _note_answer(record, None, exc)
                continue
            _note_answer(record, response)
            if 200 <= response.status_code < 300:
                record.deliveries += 1
                return

    def _notification_headers(self, record: NotificationRecord, body: bytes) -> dict[str, str]:
        """A notification's signed headers: the platform key's, or with the fault
        ``notify_wrong_key_rate`` a stranger's signature under the platform's serial."""
        if record.wrong_key is None:
            record.wrong_key = self._hit(self.faults.notify_wrong_key_rate)
        headers = self.signed_headers(body)
        if record.wrong_key:
            message = f"{headers['Wechatpay-Timestamp']}\n{headers['Wechatpay-Nonce']}\n"
            headers["Wechatpay-Signature"] = rsa_sign(
                self._stranger_key(), message.encode() + body + b"\n"
            )
        return headers

    def _stranger_key(self) -> rsa.RSAPrivateKey:
        """A key that is not the platform's (made once, on first use)."""
        key: rsa.RSAPrivateKey | None = getattr(self, "_stranger", None)
        if key is None:
            key = self._stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return key

    # ------------------------------------------------------------------ views

    def trades_view(self) -> dict[str, Any]:
        for trade in self.trades.values():
            if self.config.confirm_after_ms is not None:
                self._advance_time_only(trade)
        return {
            "trades": [
                {
                    "out_trade_no": t.out_trade_no,
                    "transaction_id": t.transaction_id,
                    "state": t.state,
                    "total": t.total,
                    "auth_code": t.auth_code,
                    "store_id": t.store_id,
                    "charged_times": t.charged_times,
                    "returned_fen": t.returned_fen,
                    "refunded_fen": t.refunded_fen,
                    "queries": t.queries,
                    "refunds": list(t.refunds),
                }
                for t in self.trades.values()
            ],
            "refunds": [
                {
                    "out_refund_no": r.out_refund_no,
                    "refund_id": r.refund_id,
                    "out_trade_no": r.out_trade_no,
                    "refund": r.refund,
                    "status": r.status,
                }
                for r in self.refunds.values()
            ],
            "payers": {code: vars(p) for code, p in self.payers.items()},
        }

    def _advance_time_only(self, trade: Trade) -> None:
        if trade.state == "USERPAYING" and trade.behaviour in {"confirm", "cancel"}:
            assert self.config.confirm_after_ms is not None
            elapsed = (now_local() - trade.created_at).total_seconds() * 1000
            if elapsed >= self.config.confirm_after_ms:
                self._settle(trade)

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "mchid": self.config.mchid,
            "platform_certificate_serial": self.config.platform_certificate_serial,
            "platform_public_key_id": self.config.platform_public_key_id,
            "notify_url": self.notify_url,
            "faults": vars(self.faults),
            "trades": len(self.trades),
            "refunds": len(self.refunds),
            "notifications": len(self.notifications),
            "stats": dict(self.stats),
        }


def bill_payment_row(config: SimConfig, trade: Trade, state: str) -> list[str]:
    assert trade.success_time is not None
    return [
        trade.success_time.strftime("%Y-%m-%d %H:%M:%S"),
        config.appid,
        config.mchid,
        "0",
        "",
        trade.transaction_id,
        trade.out_trade_no,
        trade.openid,
        "MICROPAY",
        state,
        "OTHERS",
        "CNY",
        yuan(trade.total),
        "0.00",
        "0",
        "0",
        "0.00",
        "0.00",
        "",
        "",
        trade.description,
        trade.attach or "",
        _fee_text(trade.total * FEE_RATE_PPM),
        "0.60%",
        yuan(trade.total),
        "0.00",
        "",
    ]


def bill_refund_row(config: SimConfig, trade: Trade, refund: Refund) -> list[str]:
    return [
        refund.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        config.appid,
        config.mchid,
        "0",
        "",
        trade.transaction_id,
        trade.out_trade_no,
        trade.openid,
        "MICROPAY",
        "REFUND",
        "OTHERS",
        "CNY",
        "0.00",
        "0.00",
        refund.refund_id,
        refund.out_refund_no,
        yuan(refund.refund),
        "0.00",
        "ORIGINAL",
        refund.status,
        trade.description,
        trade.attach or "",
        _fee_text(-refund.refund * FEE_RATE_PPM),
        "0.60%",
        yuan(trade.total),
        yuan(refund.refund),
        "",
    ]


def _fee_text(fee_micro_fen: int) -> str:
    """A fee in yuan with 5 decimals from millionths of a fen (1e-5 yuan = 1000), half up."""
    sign_ = "-" if fee_micro_fen < 0 else ""
    units = (abs(fee_micro_fen) + 500) // 1_000
    return f"{sign_}{units // 100_000}.{units % 100_000:05d}"


def encode_bill(rows: list[list[str]], summary: list[str]) -> bytes:
    """A trade bill file: header, backtick-prefixed detail lines, summary header and line."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(BILL_HEADER)
    for row in rows:
        writer.writerow(["`" + cell for cell in row])
    writer.writerow(BILL_SUMMARY_HEADER)
    writer.writerow(["`" + cell for cell in summary])
    return out.getvalue().encode("utf-8")


# --------------------------------------------------------------------------- ASGI


class _DroppedAnswer(Response):
    """Starts an answer it never finishes: the server closes the connection."""

    def __init__(self) -> None:
        super().__init__(b"")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: ARG002
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"', "more_body": True})


#: How many API requests ``GET /sim/requests`` keeps (the newest).
REQUEST_LOG_SIZE = 1000


def build_app(
    config: SimConfig | Mapping[str, Any],
    *,
    on_started: Callable[[], None] | None = None,
) -> Starlette:
    """The simulator's ASGI app (config as :class:`SimConfig` or its JSON mapping)."""
    sim_config = config if isinstance(config, SimConfig) else config_from_mapping(config)
    sim = WechatPaySimulator(sim_config)
    # The trace context of each API request received (the newest REQUEST_LOG_SIZE).
    received: collections.deque[dict[str, Any]] = collections.deque(maxlen=REQUEST_LOG_SIZE)

    async def api(request: Request) -> Response:
        sim.stats["requests"] += 1
        body = await request.body()
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        query = request.scope.get("query_string") or b""
        url_path = raw_path.decode("latin-1") + (f"?{query.decode('latin-1')}" if query else "")
        received.append(
            {
                "method": request.method,
                "path": url_path,
                "traceparent": request.headers.get("traceparent"),
                "tracestate": request.headers.get("tracestate"),
            }
        )
        request_serial = request.headers.get("wechatpay-serial")
        try:
            sim.authenticate(request.method, url_path, request.headers, body)
        except ApiError as error:
            sim.stats["sign_errors"] += 1
            return sim.answer(error.status, error.body(), request_serial)
        faults = sim.faults
        if sim._hit(faults.timeout_rate):
            sim.stats["faults"] += 1
            deadline = time.monotonic() + faults.timeout_hold_ms / 1000
            while time.monotonic() < deadline:
                if await request.is_disconnected():
                    break
                await asyncio.sleep(0.05)
            return _DroppedAnswer()
        if sim._hit(faults.error_5xx_rate):
            sim.stats["faults"] += 1
            return sim.answer(500, {"code": "SYSTEM_ERROR", "message": "系统错误"}, request_serial)
        path = request.url.path
        try:
            status, data = _dispatch(sim, request, path, body)
        except ApiError as error:
            status, data = error.status, error.body()
        except _Drop:
            return _DroppedAnswer()
        if (
            path == "/v3/pay/transactions/codepay"
            and status < 500
            and sim._hit(faults.charge_no_answer_rate)
        ):
            sim.stats["faults"] += 1
            if faults.slow_ms:
                await asyncio.sleep(faults.slow_ms / 1000)
            return _DroppedAnswer()
        if faults.slow_ms:
            await asyncio.sleep(faults.slow_ms / 1000)
        if isinstance(data, bytes):
            return Response(
                data,
                media_type="application/octet-stream",
                headers={"Request-ID": uuid.uuid4().hex},
            )
        return sim.answer(status, data, request_serial)

    async def control(request: Request) -> Response:
        try:
            payload = await request.json()
        except ValueError:
            return JSONResponse({"error": "body is not JSON"}, status_code=400)
        if not isinstance(payload, dict) or set(payload) - {"faults", "notify_url"}:
            return JSONResponse(
                {"error": 'expected {"faults": {...}, "notify_url": URL|null}'}, status_code=400
            )
        changes = payload.get("faults") or {}
        if not isinstance(changes, dict):
            return JSONResponse({"error": "faults must be an object"}, status_code=400)
        notify_url = payload.get("notify_url", sim.notify_url)
        if notify_url is not None and (
            not isinstance(notify_url, str) or urlsplit(notify_url).scheme not in {"http", "https"}
        ):
            return JSONResponse({"error": "notify_url must be an http(s) URL"}, status_code=400)
        try:
            faults = sim.faults.merged(changes)
        except SimConfigError as exc:
            return JSONResponse({"error": exc.message}, status_code=400)
        sim.faults = faults
        sim.notify_url = notify_url
        return JSONResponse(sim.health())

    async def health(_request: Request) -> Response:
        return JSONResponse(sim.health())

    async def trades(_request: Request) -> Response:
        return JSONResponse(sim.trades_view())

    async def notifications(_request: Request) -> Response:
        return JSONResponse({"notifications": [vars(n) for n in sim.notifications]})

    async def requests(_request: Request) -> Response:
        return JSONResponse({"requests": list(received)})

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await sim.start()
        if on_started is not None:
            on_started()
        try:
            yield
        finally:
            await sim.stop()

    app = Starlette(
        routes=[
            Route("/sim/control", control, methods=["POST"]),
            Route("/sim/health", health, methods=["GET"]),
            Route("/sim/trades", trades, methods=["GET"]),
            Route("/sim/notifications", notifications, methods=["GET"]),
            Route("/sim/requests", requests, methods=["GET"]),
            Route("/v3/{rest:path}", api, methods=["GET", "POST"]),
        ],
        lifespan=lifespan,
    )
    app.state.simulator = sim
    return app


_OUT_TRADE = re.compile(r"^/v3/pay/transactions/out-trade-no/([^/]+)$")
_REVERSE = re.compile(r"^/v3/pay/transactions/out-trade-no/([^/]+)/reverse$")
_REFUND = re.compile(r"^/v3/refund/domestic/refunds/([^/]+)$")


def _dispatch(sim: WechatPaySimulator, request: Request, path: str, body: bytes) -> tuple[int, Any]:
    method = request.method
    content_type = request.headers.get("content-type", "")
    if method == "POST" and path == "/v3/pay/transactions/codepay":
        return sim.codepay(sim._json_body(body, content_type))
    if method == "GET" and (match := _OUT_TRADE.match(path)):
        return sim.query(match.group(1), request.query_params.get("mchid"))
    if method == "POST" and (match := _REVERSE.match(path)):
        return sim.reverse(match.group(1), sim._json_body(body, content_type))
    if method == "POST" and path == "/v3/refund/domestic/refunds":
        return sim.refund(sim._json_body(body, content_type))
    if method == "GET" and (match := _REFUND.match(path)):
        return sim.query_refund(match.group(1))
    if method == "GET" and path == "/v3/bill/tradebill":
        base = str(request.base_url).rstrip("/")
        return sim.trade_bill(dict(request.query_params), base)
    if method == "GET" and path == "/v3/billdownload/file":
        return 200, sim.download(request.query_params.get("token"))
    if method == "GET" and path == "/v3/certificates":
        return 200, sim.certificates()
    raise ApiError(404, "RESOURCE_NOT_EXISTS", "请求的资源不存在")


# --------------------------------------------------------------------------- process


def _announce(url: str) -> None:
    announce(f"WeChat Pay simulator listening on {url}", service="wechatpay-simulator", url=url)


def _app_from_file(path: str, on_started: Callable[[], None]) -> Starlette:
    return build_app(load_config(path), on_started=on_started)


def main(argv: list[str] | None = None) -> int:
    """Run the simulator until SIGINT/SIGTERM (exit 0); 2: a bad config, 1: no port."""
    return run_simulator(
        argv,
        prog="python -m forecourt.sim.wechatpay",
        description="Simulated WeChat Pay API v3 (payment-code payments) over HTTP.",
        build_app=_app_from_file,
        config_error=SimConfigError,
        announce_listening=_announce,
        logger=logger,
    )


if __name__ == "__main__":
    sys.exit(main())
