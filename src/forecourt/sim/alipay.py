"""A strict simulator of the Alipay open platform gateway (当面付 payment codes), run as its own
process.

Run it::

    python -m forecourt.sim.alipay --config CONFIG.json --port 0 [--host 127.0.0.1] \\
        [--port-file PATH] [--log-level INFO]

``--port 0`` picks a free port; it is logged and, with ``--port-file``, written to that file
(atomically, once the socket listens). :func:`build_app` gives the ASGI app for in-process use.

It is as strict as Alipay, so an adapter that passes here needs only a change of gateway URL and
keys for production. ``POST /gateway.do`` (parameters from the query string and the form body,
merged; a name twice is refused) is checked in this order, each failure answered at once:

- ``method`` missing: 40001 ``isv.missing-method``; unknown: 40002 ``isv.invalid-method``
  (both under ``error_response``); ``app_id`` missing / not the configured app: 40001
  ``isv.missing-app-id`` / 40002 ``isv.invalid-app-id``; ``sign`` missing: 40001
  ``isv.missing-signature``; ``sign_type`` missing / not RSA2: 40001
  ``isv.missing-signature-type`` / 40002 ``isv.invalid-signature-type``; ``charset`` missing or
  not utf-8: 40002 ``isv.invalid-charset``; ``format`` (optional) not JSON: 40002
  ``isv.invalid-format``; ``timestamp`` missing: 40001 ``isv.missing-timestamp``, not
  ``yyyy-MM-dd HH:mm:ss`` or more than ``max_skew_s`` (default 900) from Beijing time: 40002
  ``isv.invalid-timestamp``; ``version`` missing: 40001 ``isv.missing-version``, not 1.0: 40002
  ``isv.invalid-parameter``; then the RSA2 signature (the app public key, over every non-empty
  parameter but ``sign``, sorted, ``k=v&...``): 40002 ``isv.invalid-signature``. These answers,
  given before the caller is authenticated, are **not signed** [I].
- Every later answer is signed with Alipay's key: ``{"<method>_response": {...}, "sign":
  "..."}``, the signature over the exact JSON text of the ``..._response`` value.
- ``biz_content`` missing or not a JSON object, or a business field missing or malformed:
  40004 ``ACQ.INVALID_PARAMETER`` "参数无效: <field>" [I: which of 40002/40004 Alipay uses].

Methods answered:

- ``alipay.trade.pay`` - biz ``out_trade_no`` (1-64 of ``[0-9A-Za-z_]``, ``-`` accepted),
  ``scene`` (``bar_code``), ``auth_code`` (Alipay payment codes: 16-24 digits starting 25-30,
  else 40004 ``ACQ.PAYMENT_AUTH_CODE_INVALID``), ``subject`` (1-256), ``total_amount`` (yuan
  with at most two decimals, 0.01-100000000.00; else ``ACQ.INVALID_PARAMETER``),
  ``store_id?``, ``seller_id?`` (must be the configured one), ``product_code?``. The same
  ``out_trade_no`` again: a paid trade is 40004 ``ACQ.TRADE_HAS_SUCCESS``, a closed one
  ``ACQ.TRADE_HAS_CLOSE``; a waiting one with the same parameters is answered 10003 again
  (nothing is charged twice), with other parameters ``ACQ.CONTEXT_INCONSISTENT``. An auth code
  that already paid a trade is spent: ``ACQ.PAYMENT_AUTH_CODE_INVALID`` (unless
  ``payer.single_use_codes`` is false). Success: 10000 with ``trade_no, out_trade_no,
  buyer_logon_id, buyer_user_id, total_amount, receipt_amount, buyer_pay_amount, invoice_amount,
  point_amount, gmt_payment, fund_bill_list``; waiting: 10003 "Order success pay inprocess".
- ``alipay.trade.query`` - biz ``out_trade_no`` (or ``trade_no``): 10000 with
  ``trade_status`` WAIT_BUYER_PAY / TRADE_SUCCESS / TRADE_CLOSED, ``total_amount``,
  ``send_pay_date`` ...; 40004 ``ACQ.TRADE_NOT_EXIST``.
- ``alipay.trade.cancel`` - 10000 ``{retry_flag: "N", action: "close"|"refund"}`` (a waiting
  trade is closed, a paid one closed and its money returned to the payer - ``returned_fen``);
  cancelling again answers the same; a trade with refunds: 40004 ``ACQ.TRADE_STATUS_ERROR``
  [I]; unknown: 40004 ``ACQ.TRADE_NOT_EXIST`` [I].
- ``alipay.trade.refund`` - biz ``out_trade_no, refund_amount, out_request_no?`` (without it
  the refund must be the whole trade: ``ACQ.REFUND_AMT_NOT_EQUAL_TOTAL`` otherwise),
  ``refund_reason?``. Answers 10000 ``{trade_no, out_trade_no, buyer_logon_id, fund_change,
  refund_fee (the trade's refunded total), gmt_refund_pay}``: ``fund_change`` Y the first time,
  N when the same ``out_request_no`` comes again with the same amount (nothing moves); another
  amount under a used ``out_request_no``: ``ACQ.DISCORDANT_REPEAT_REQUEST``; more than the trade
  still has: ``ACQ.REFUND_AMT_NOT_EQUAL_TOTAL``; a trade not paid: ``ACQ.TRADE_STATUS_ERROR``;
  unknown: ``ACQ.TRADE_NOT_EXIST``. A fully refunded trade becomes TRADE_CLOSED.
- ``alipay.trade.fastpay.refund.query`` - biz ``out_trade_no, out_request_no`` (for a refund
  sent without one: the ``out_trade_no``), ``query_options?``: 10000 with ``out_request_no,
  refund_amount, total_amount, refund_status: REFUND_SUCCESS[, gmt_refund_pay]``, or 10000 with
  none of them when there is no such refund; unknown trade: ``ACQ.TRADE_NOT_EXIST``.
- ``alipay.data.dataservice.bill.downloadurl.query`` - biz ``bill_type`` (``trade``),
  ``bill_date`` (yyyy-MM-dd); today (unless ``bill_allow_today``) or later: 40004
  ``isp.bill_not_exist``. 10000 ``{bill_download_url}``: this server's
  ``/downloadBillFile.resource?...&token=``, valid 30 s, serving a zip of two GBK CSV files,
  ``<seller_id>_<yyyymmdd>_业务明细.csv`` and ``..._业务明细(汇总).csv`` (names in GBK, no
  UTF-8 flag) [I: the names]. The
  detail file: ``#`` comment lines, the documented header (支付宝交易号, 商户订单号, 业务类型,
  商品名称, 创建时间, 完成时间, 门店编号, 门店名称, 操作员, 终端号, 对方账户, 订单金额（元）,
  商家实收（元）, ... 退款批次号/请求号, 服务费（元）, 分润（元）, 备注), one ``交易`` line per
  payment completed that day and one ``退款`` line per refund (its amounts negative), identifiers
  followed by a tab as Alipay writes them; a cancelled trade is left out [I].

Payer behaviour by the auth code's last four digits:

- ``0001`` - balance short: 40004 ``ACQ.BUYER_BALANCE_NOT_ENOUGH`` (no trade is kept);
- ``0002`` - 10003; the payer confirms (TRADE_SUCCESS) at the ``payer.confirm_after_queries``-th
  query (default 2) or after ``payer.confirm_after_ms`` (when set), whichever comes first;
- ``0003`` - 10003, never confirmed: stays WAIT_BUYER_PAY until cancelled;
- ``0004`` - 10003, then the payer gives up (TRADE_CLOSED) as ``0002`` would confirm;
- ``0005`` - an expired code: ``ACQ.PAYMENT_AUTH_CODE_INVALID`` (no trade);
- ``0006`` - refused by risk control: ``ACQ.PAYMENT_REQUEST_HAS_RISK`` (no trade);
- any other - paid at once.

Notifications: a trade paid, refunded or closed whose pay request had a ``notify_url`` is
notified there as Alipay does: a form POST (``notify_time, notify_type=trade_status_sync,
notify_id, app_id, charset, version, sign_type, sign, trade_no, out_trade_no, out_biz_no?,
buyer_id, buyer_logon_id, seller_id, trade_status, total_amount, receipt_amount,
buyer_pay_amount, refund_fee?, subject, gmt_create, gmt_payment, gmt_refund?, gmt_close?``)
signed over every non-empty parameter but ``sign`` and ``sign_type``. Until the answer body is
exactly ``success`` it is re-sent, after each of ``notify_retry_ms`` (default 100, 200, 400,
800, 1600 ms; Alipay's own schedule runs over 25 hours), then given up.

Simulator-only endpoints (no signature): ``GET /sim/health``; ``GET /sim/trades`` - every
trade (state, ``charged_times``: how often the payer was charged for it, ``returned_fen``,
``refunded_fen``), every refund, per payer (auth code) ``charged_times``, ``charged_fen``,
``returned_fen``, ``refunded_fen``, and ``charged_twice`` (trades charged more than once);
``GET /sim/notifications`` (each with what each send was answered, ``answers``);
``GET /sim/requests`` (the newest gateway requests received, each ``{method, traceparent,
tracestate}``: the W3C trace context they carried, or null);
``POST /sim/control {"faults": {...}}`` merges faults (``null``
puts one back to its default), checked before anything changes (400 otherwise).

Faults (config ``faults`` and ``/sim/control``; a seeded RNG, ``seed`` in the config; all off by
default) on every gateway request:

- ``timeout_rate`` (0-1; ``timeout: true`` is 1) - nothing is processed: the request is held
  ``timeout_hold_ms`` (default 30000) or until the client gives up, then the connection drops;
- ``error_5xx_rate`` - HTTP 502, nothing processed;
- ``system_error_rate`` - a signed 20000 ``isp.unknow-error`` or 40004 ``ACQ.SYSTEM_ERROR``
  (half each), nothing processed (nobody charged);
- ``charge_no_answer_rate`` - ``alipay.trade.pay`` only: processed (the payer may be charged),
  then the connection drops without an answer;
- ``slow_ms`` - every answer waits that long;
- ``tamper_answer_rate`` - the answer is changed after it was signed;
- ``notify_drop_rate`` (never sent), ``notify_duplicate_rate`` (sent twice, same notify_id),
  ``notify_delay_ms`` (each sent that late), ``notify_reorder: bool`` (each delayed a further
  random 0..max(notify_delay_ms, 200) ms, so they arrive out of order);
- ``notify_wrong_key_rate`` - a notification is signed with a key that is not the simulator's
  "Alipay" key, every copy and re-send of it alike: a forged notification.

[I] marks behaviour inferred where no Alipay text was found. Times are Beijing time
(Asia/Shanghai), ``yyyy-MM-dd HH:mm:ss``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import csv
import io
import json
import logging
import random
import re
import secrets
import sys
import time
import zipfile
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode
from zoneinfo import ZoneInfo

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from forecourt.infra.logging import announce
from forecourt.sim.serve import run_simulator

logger = logging.getLogger("forecourt.sim.alipay")

SHANGHAI = ZoneInfo("Asia/Shanghai")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
BILL_TOKEN_S = 30
MAX_TOTAL_FEN = 100_000_000_00

OUT_TRADE_NO = re.compile(r"^[0-9A-Za-z_\-]{1,64}$")
OUT_REQUEST_NO = re.compile(r"^[0-9A-Za-z_\-]{1,64}$")
AUTH_CODE = re.compile(r"^(2[5-9]|30)[0-9]{14,22}$")
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
YUAN = re.compile(r"^(0|[1-9][0-9]{0,8})(\.[0-9]{1,2})?$")
BILL_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

METHODS = (
    "alipay.trade.pay",
    "alipay.trade.query",
    "alipay.trade.cancel",
    "alipay.trade.refund",
    "alipay.trade.fastpay.refund.query",
    "alipay.data.dataservice.bill.downloadurl.query",
)

BILL_HEADER = (
    "支付宝交易号,商户订单号,业务类型,商品名称,创建时间,完成时间,门店编号,门店名称,操作员,终端号,"
    "对方账户,订单金额（元）,商家实收（元）,支付宝红包（元）,集分宝（元）,支付宝优惠（元）,"
    "商家优惠（元）,券核销金额（元）,券名称,商家红包消费金额（元）,卡消费金额（元）,"
    "退款批次号/请求号,服务费（元）,分润（元）,备注"
).split(",")
SUMMARY_HEADER = (
    "门店编号,门店名称,交易订单总笔数,退款订单总笔数,订单金额（元）,商家实收（元）,"
    "支付宝优惠（元）,商家优惠（元）,卡消费金额（元）,服务费（元）,分润（元）,实收净额（元）"
).split(",")
FEE_RATE_PPM = 6000  # 0.60 %


class SimConfigError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --------------------------------------------------------------------------- crypto


def sign_content(params: Mapping[str, str], exclude: tuple[str, ...] = ("sign",)) -> str:
    return "&".join(
        f"{key}={params[key]}" for key in sorted(params) if key not in exclude and params[key]
    )


def rsa_sign(key: rsa.RSAPrivateKey, message: bytes) -> str:
    return base64.b64encode(key.sign(message, padding.PKCS1v15(), hashes.SHA256())).decode()


def rsa_verify(key: rsa.RSAPublicKey, message: bytes, signature_b64: str) -> bool:
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


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
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError) as exc:
        raise SimConfigError(f"{what}: not a PEM public key") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise SimConfigError(f"{what}: not an RSA key")
    return key


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Faults:
    timeout_rate: float = 0.0
    timeout_hold_ms: int = 30_000
    error_5xx_rate: float = 0.0
    system_error_rate: float = 0.0
    charge_no_answer_rate: float = 0.0
    slow_ms: int = 0
    tamper_answer_rate: float = 0.0
    notify_drop_rate: float = 0.0
    notify_duplicate_rate: float = 0.0
    notify_delay_ms: int = 0
    notify_reorder: bool = False
    notify_wrong_key_rate: float = 0.0


_RATES = {
    "timeout_rate",
    "error_5xx_rate",
    "system_error_rate",
    "charge_no_answer_rate",
    "tamper_answer_rate",
    "notify_drop_rate",
    "notify_duplicate_rate",
    "notify_wrong_key_rate",
}
_MILLIS = {"timeout_hold_ms", "slow_ms", "notify_delay_ms"}


def merge_faults(current: Faults, changes: Mapping[str, Any]) -> Faults:
    """``current`` with ``changes`` applied (``None`` = the default); raises SimConfigError."""
    if not isinstance(changes, Mapping):
        raise SimConfigError("faults must be an object")
    defaults = Faults()
    known = {f.name for f in fields(Faults)}
    updates: dict[str, Any] = {}
    for name, value in changes.items():
        if name == "timeout":
            if value is not None and not isinstance(value, bool):
                raise SimConfigError("faults.timeout must be a boolean")
            updates["timeout_rate"] = 1.0 if value else 0.0
            continue
        if name not in known:
            raise SimConfigError(f"unknown fault {name!r}")
        if value is None:
            updates[name] = getattr(defaults, name)
        elif name in _RATES:
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise SimConfigError(f"faults.{name} must be a number in 0..1")
            updates[name] = float(value)
        elif name in _MILLIS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SimConfigError(f"faults.{name} must be a non-negative integer")
            updates[name] = value
        else:  # notify_reorder
            if not isinstance(value, bool):
                raise SimConfigError(f"faults.{name} must be a boolean")
            updates[name] = value
    return replace(current, **updates)


@dataclass(frozen=True)
class SimConfig:
    app_id: str
    app_public_key: rsa.RSAPublicKey
    alipay_private_key: rsa.RSAPrivateKey
    seller_id: str = "2088102146225135"
    seed: int = 1
    max_skew_s: int = 900
    confirm_after_queries: int = 2
    confirm_after_ms: int | None = None
    single_use_codes: bool = True
    notify_retry_ms: tuple[int, ...] = (100, 200, 400, 800, 1600)
    bill_allow_today: bool = False
    faults: Faults = field(default_factory=Faults)


def config_from_mapping(raw: Mapping[str, Any]) -> SimConfig:
    if not isinstance(raw, Mapping):
        raise SimConfigError("the config must be a JSON object")
    app_id = raw.get("app_id")
    if not isinstance(app_id, str) or not app_id:
        raise SimConfigError("app_id is required")
    app_pem = raw.get("app_public_key_pem")
    alipay_pem = raw.get("alipay_private_key_pem")
    if not isinstance(app_pem, str) or not isinstance(alipay_pem, str):
        raise SimConfigError("app_public_key_pem and alipay_private_key_pem are required")
    payer = raw.get("payer") or {}
    if not isinstance(payer, Mapping):
        raise SimConfigError("payer must be an object")
    confirm_q = payer.get("confirm_after_queries", 2)
    confirm_ms = payer.get("confirm_after_ms")
    single_use = payer.get("single_use_codes", True)
    if isinstance(confirm_q, bool) or not isinstance(confirm_q, int) or confirm_q < 1:
        raise SimConfigError("payer.confirm_after_queries must be a positive integer")
    if confirm_ms is not None and (
        isinstance(confirm_ms, bool) or not isinstance(confirm_ms, int) or confirm_ms < 0
    ):
        raise SimConfigError("payer.confirm_after_ms must be a non-negative integer")
    if not isinstance(single_use, bool):
        raise SimConfigError("payer.single_use_codes must be a boolean")
    retry = raw.get("notify_retry_ms", [100, 200, 400, 800, 1600])
    if not isinstance(retry, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in retry
    ):
        raise SimConfigError("notify_retry_ms must be a list of non-negative integers")
    seller_id = raw.get("seller_id", "2088102146225135")
    if not isinstance(seller_id, str) or not re.fullmatch(r"2088\d{12}", seller_id):
        raise SimConfigError("seller_id must be 2088 and 12 digits")
    seed = raw.get("seed", 1)
    skew = raw.get("max_skew_s", 900)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SimConfigError("seed must be an integer")
    if isinstance(skew, bool) or not isinstance(skew, int) or skew < 0:
        raise SimConfigError("max_skew_s must be a non-negative integer")
    allow_today = raw.get("bill_allow_today", False)
    if not isinstance(allow_today, bool):
        raise SimConfigError("bill_allow_today must be a boolean")
    return SimConfig(
        app_id=app_id,
        app_public_key=_load_public(app_pem, "app_public_key_pem"),
        alipay_private_key=_load_private(alipay_pem, "alipay_private_key_pem"),
        seller_id=seller_id,
        seed=seed,
        max_skew_s=skew,
        confirm_after_queries=confirm_q,
        confirm_after_ms=confirm_ms,
        single_use_codes=single_use,
        notify_retry_ms=tuple(retry),
        bill_allow_today=allow_today,
        faults=merge_faults(Faults(), raw.get("faults") or {}),
    )


def load_config(path: str | Path) -> SimConfig:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SimConfigError(f"cannot read config {path}: {exc}") from exc
    except ValueError as exc:
        raise SimConfigError(f"config {path} is not JSON: {exc}") from exc
    return config_from_mapping(raw)


# --------------------------------------------------------------------------- model


def now_local() -> datetime:
    return datetime.now(SHANGHAI)


def fmt(moment: datetime | None) -> str:
    return moment.astimezone(SHANGHAI).strftime(TIME_FORMAT) if moment else ""


def yuan(fen: int) -> str:
    sign = "-" if fen < 0 else ""
    fen = abs(fen)
    return f"{sign}{fen // 100}.{fen % 100:02d}"


def parse_yuan(text: Any) -> int | None:
    """Alipay's Price: yuan with at most two decimals; None when malformed."""
    if not isinstance(text, str | int) or isinstance(text, bool):
        return None
    text = str(text)
    if not YUAN.match(text):
        return None
    try:
        return int(Decimal(text) * 100)
    except InvalidOperation:  # pragma: no cover - the pattern admits decimals only
        return None


class ApiError(Exception):
    """An answer other than success: gateway ``code`` and ``sub_code``."""

    MESSAGES = {
        "20000": "Service Currently Unavailable",
        "20001": "Insufficient Token Permissions",
        "40001": "Missing Required Arguments",
        "40002": "Invalid Arguments",
        "40004": "Business Failed",
        "40006": "Insufficient Permissions",
    }

    def __init__(
        self,
        code: str,
        sub_code: str,
        sub_msg: str,
        *,
        signed: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{code} {sub_code}")
        self.code = code
        self.sub_code = sub_code
        self.sub_msg = sub_msg
        self.signed = signed
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "msg": self.MESSAGES.get(self.code, "Business Failed"),
            "sub_code": self.sub_code,
            "sub_msg": self.sub_msg,
            **self.extra,
        }


def invalid(field_name: str) -> ApiError:
    return ApiError("40004", "ACQ.INVALID_PARAMETER", f"参数无效: {field_name}")


@dataclass
class Trade:
    out_trade_no: str
    trade_no: str
    auth_code: str
    amount_fen: int
    subject: str
    store_id: str
    notify_url: str | None
    behaviour: str  # "pay" | "confirm" | "never" | "give_up"
    fingerprint: tuple[str, ...]
    buyer_user_id: str
    buyer_logon_id: str
    created_at: datetime
    state: str = "WAIT_BUYER_PAY"  # | TRADE_SUCCESS | TRADE_CLOSED
    paid_at: datetime | None = None
    closed_at: datetime | None = None
    cancel_action: str | None = None
    queries: int = 0
    charged_times: int = 0
    returned_fen: int = 0
    refunded_fen: int = 0
    created_mono: float = field(default_factory=time.monotonic)


@dataclass
class Refund:
    out_trade_no: str
    out_request_no: str
    amount_fen: int
    reason: str
    at: datetime


@dataclass
class Payer:
    charged_times: int = 0
    charged_fen: int = 0
    returned_fen: int = 0
    refunded_fen: int = 0


@dataclass
class NotificationRecord:
    notify_id: str
    out_trade_no: str
    trade_status: str
    url: str
    params: dict[str, str]
    copies: int = 1
    attempts: int = 0
    deliveries: int = 0
    dropped: bool = False
    given_up: int = 0
    answers: list[str] = field(default_factory=list)  # what each send was answered


def _note_answer(
    record: NotificationRecord, response: httpx.Response | None, error: Exception | None = None
) -> None:
    """Keep what a send of ``record`` was answered: ``"<status> <body>"``, or the failure."""
    if response is None:
        record.answers.append(f"no answer: {type(error).__name__}")
    else:
        record.answers.append(f"{response.status_code} {response.text[:200]}")


class _Drop(Exception):
    """Answer nothing: the connection is dropped."""


class AlipaySimulator:
    """The state and the rules; the ASGI layer is :func:`build_app`."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.faults = config.faults
        self.rng = random.Random(config.seed)
        self.trades: dict[str, Trade] = {}
        self.refunds: dict[tuple[str, str], Refund] = {}
        self.payers: dict[str, Payer] = {}
        self.spent_codes: set[str] = set()
        self.notifications: list[NotificationRecord] = []
        self.bill_tokens: dict[str, tuple[date, float]] = {}
        self.started = time.monotonic()
        self.stats: dict[str, int] = {
            "requests": 0,
            "timeouts": 0,
            "errors_5xx": 0,
            "system_errors": 0,
            "charges_unanswered": 0,
            "tampered": 0,
            "bad_signatures": 0,
        }
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None
        self._sequence = 0

    # ------------------------------------------------------------------ helpers

    def _trade_no(self) -> str:
        self._sequence += 1
        return f"{now_local():%Y%m%d}22001{self.rng.randrange(10**8):08d}{self._sequence:010d}"

    def _payer(self, code: str) -> Payer:
        return self.payers.setdefault(code, Payer())

    def _charge(self, trade: Trade, at: datetime | None = None) -> None:
        trade.state = "TRADE_SUCCESS"
        trade.paid_at = at or now_local()
        trade.charged_times += 1
        payer = self._payer(trade.auth_code)
        payer.charged_times += 1
        payer.charged_fen += trade.amount_fen
        self.spent_codes.add(trade.auth_code)
        self._notify(trade)

    def _advance(self, trade: Trade, *, queried: bool) -> None:
        """The payer's side of a waiting trade."""
        if trade.state != "WAIT_BUYER_PAY" or trade.behaviour not in {"confirm", "give_up"}:
            return
        if queried:
            trade.queries += 1
        elapsed_ms = (time.monotonic() - trade.created_mono) * 1000
        due = trade.queries >= self.config.confirm_after_queries or (
            self.config.confirm_after_ms is not None and elapsed_ms >= self.config.confirm_after_ms
        )
        if not due:
            return
        if trade.behaviour == "confirm":
            self._charge(trade)
        else:
            trade.state = "TRADE_CLOSED"
            trade.closed_at = now_local()
            self._notify(trade)

    def _trade_fields(self, trade: Trade) -> dict[str, Any]:
        paid = trade.state == "TRADE_SUCCESS" or trade.paid_at is not None
        amount = yuan(trade.amount_fen)
        return {
            "trade_no": trade.trade_no,
            "out_trade_no": trade.out_trade_no,
            "buyer_logon_id": trade.buyer_logon_id,
            "buyer_user_id": trade.buyer_user_id,
            "total_amount": amount,
            "receipt_amount": amount if paid else "0.00",
            "buyer_pay_amount": amount if paid else "0.00",
            "invoice_amount": amount if paid else "0.00",
            "point_amount": "0.00",
        }

    # ------------------------------------------------------------------ gateway

    def authenticate(self, params: Mapping[str, str]) -> str:
        """Check the common parameters and the signature; returns the method."""
        method = params.get("method")
        if not method:
            raise ApiError("40001", "isv.missing-method", "缺少方法名参数", signed=False)
        if method not in METHODS:
            raise ApiError("40002", "isv.invalid-method", "不存在的方法名", signed=False)
        app_id = params.get("app_id")
        if not app_id:
            raise ApiError("40001", "isv.missing-app-id", "缺少AppID参数", signed=False)
        if app_id != self.config.app_id:
            raise ApiError("40002", "isv.invalid-app-id", "无效的AppID参数", signed=False)
        if not params.get("sign"):
            raise ApiError("40001", "isv.missing-signature", "缺少签名参数", signed=False)
        sign_type = params.get("sign_type")
        if not sign_type:
            raise ApiError("40001", "isv.missing-signature-type", "缺少签名类型参数", signed=False)
        if sign_type != "RSA2":
            raise ApiError("40002", "isv.invalid-signature-type", "无效的签名类型", signed=False)
        if (params.get("charset") or "").lower() not in {"utf-8", "utf8"}:
            raise ApiError("40002", "isv.invalid-charset", "字符集错误", signed=False)
        if params.get("format", "JSON").upper() != "JSON":
            raise ApiError("40002", "isv.invalid-format", "无效的数据格式", signed=False)
        stamp = params.get("timestamp")
        if not stamp:
            raise ApiError("40001", "isv.missing-timestamp", "缺少时间戳参数", signed=False)
        try:
            if not TIMESTAMP.match(stamp):
                raise ValueError(stamp)
            moment = datetime.strptime(stamp, TIME_FORMAT).replace(tzinfo=SHANGHAI)
        except ValueError:
            raise ApiError(
                "40002", "isv.invalid-timestamp", "非法的时间戳参数", signed=False
            ) from None
        if abs((now_local() - moment).total_seconds()) > self.config.max_skew_s:
            raise ApiError("40002", "isv.invalid-timestamp", "非法的时间戳参数", signed=False)
        version = params.get("version")
        if not version:
            raise ApiError("40001", "isv.missing-version", "缺少版本参数", signed=False)
        if version != "1.0":
            raise ApiError("40002", "isv.invalid-parameter", "参数无效: version", signed=False)
        content = sign_content(params).encode("utf-8")
        if not rsa_verify(self.config.app_public_key, content, params["sign"]):
            self.stats["bad_signatures"] += 1
            raise ApiError(
                "40002",
                "isv.invalid-signature",
                "验签出错，建议检查签名字符串或签名私钥与应用公钥是否匹配",
                signed=False,
            )
        return method

    def handle(self, method: str, params: Mapping[str, str], base_url: str) -> dict[str, Any]:
        raw = params.get("biz_content")
        if not raw:
            raise invalid("biz_content")
        try:
            biz = json.loads(raw)
        except ValueError:
            raise invalid("biz_content") from None
        if not isinstance(biz, dict):
            raise invalid("biz_content")
        if method == "alipay.trade.pay":
            return self.pay(biz, params.get("notify_url") or None)
        if method == "alipay.trade.query":
            return self.query(biz)
        if method == "alipay.trade.cancel":
            return self.cancel(biz)
        if method == "alipay.trade.refund":
            return self.refund(biz)
        if method == "alipay.trade.fastpay.refund.query":
            return self.refund_query(biz)
        return self.bill_url(biz, base_url)

    def _find(self, biz: Mapping[str, Any]) -> Trade:
        out_trade_no = biz.get("out_trade_no")
        trade_no = biz.get("trade_no")
        if not out_trade_no and not trade_no:
            raise invalid("out_trade_no")
        if out_trade_no is not None and not isinstance(out_trade_no, str):
            raise invalid("out_trade_no")
        trade = self.trades.get(out_trade_no) if out_trade_no else None
        if trade is None and isinstance(trade_no, str):
            trade = next((t for t in self.trades.values() if t.trade_no == trade_no), None)
        if trade is None:
            raise ApiError("40004", "ACQ.TRADE_NOT_EXIST", "交易不存在")
        return trade

    def pay(self, biz: Mapping[str, Any], notify_url: str | None) -> dict[str, Any]:
        out_trade_no = biz.get("out_trade_no")
        if not isinstance(out_trade_no, str) or not OUT_TRADE_NO.match(out_trade_no):
            raise invalid("out_trade_no")
        if biz.get("scene") != "bar_code":
            raise invalid("scene")
        subject = biz.get("subject")
        if not isinstance(subject, str) or not 1 <= len(subject) <= 256:
            raise invalid("subject")
        amount = parse_yuan(biz.get("total_amount"))
        if amount is None or not 1 <= amount <= MAX_TOTAL_FEN:
            raise ApiError("40004", "ACQ.INVALID_PARAMETER", "参数无效: total_amount")
        product = biz.get("product_code", "FACE_TO_FACE_PAYMENT")
        if product not in {"FACE_TO_FACE_PAYMENT", "OFFLINE_PAYMENT"}:
            raise invalid("product_code")
        seller = biz.get("seller_id")
        if seller is not None and seller != self.config.seller_id:
            raise ApiError("40004", "ACQ.PARTNER_ERROR", "应用APP_ID填写错误")
        store_id = biz.get("store_id", "")
        if not isinstance(store_id, str) or len(store_id) > 32:
            raise invalid("store_id")
        auth_code = biz.get("auth_code")
        if not isinstance(auth_code, str):
            raise invalid("auth_code")
        fingerprint = (auth_code, yuan(amount), subject, store_id)
        existing = self.trades.get(out_trade_no)
        if existing is not None:
            self._advance(existing, queried=False)
            if existing.state == "TRADE_SUCCESS":
                raise ApiError(
                    "40004",
                    "ACQ.TRADE_HAS_SUCCESS",
                    "交易已被支付",
                    extra=self._trade_fields(existing),
                )
            if existing.state == "TRADE_CLOSED":
                raise ApiError("40004", "ACQ.TRADE_HAS_CLOSE", "交易已经关闭")
            if existing.fingerprint != fingerprint:
                raise ApiError("40004", "ACQ.CONTEXT_INCONSISTENT", "交易信息被篡改")
            return {
                "code": "10003",
                "msg": "Order success pay inprocess",
                **self._trade_fields(existing),
            }
        refused = {"out_trade_no": out_trade_no, **_zero_amounts()}
        if not AUTH_CODE.match(auth_code) or (
            self.config.single_use_codes and auth_code in self.spent_codes
        ):
            raise ApiError(
                "40004",
                "ACQ.PAYMENT_AUTH_CODE_INVALID",
                "支付失败，获取顾客账户信息失败，请顾客刷新付款码后重新收款",
                extra=refused,
            )
        suffix = auth_code[-4:]
        if suffix == "0001":
            raise ApiError(
                "40004",
                "ACQ.BUYER_BALANCE_NOT_ENOUGH",
                "买家余额不足，请顾客更换付款方式",
                extra=refused,
            )
        if suffix == "0005":
            raise ApiError(
                "40004",
                "ACQ.PAYMENT_AUTH_CODE_INVALID",
                "支付失败，获取顾客账户信息失败，请顾客刷新付款码后重新收款",
                extra=refused,
            )
        if suffix == "0006":
            raise ApiError("40004", "ACQ.PAYMENT_REQUEST_HAS_RISK", "支付有风险", extra=refused)
        behaviour = {"0002": "confirm", "0003": "never", "0004": "give_up"}.get(suffix, "pay")
        trade = Trade(
            out_trade_no=out_trade_no,
            trade_no=self._trade_no(),
            auth_code=auth_code,
            amount_fen=amount,
            subject=subject,
            store_id=store_id,
            notify_url=notify_url,
            behaviour=behaviour,
            fingerprint=fingerprint,
            buyer_user_id=f"2088{int(auth_code[-12:]) % 10**12:012d}",
            buyer_logon_id=f"{auth_code[-3:]}***@example.com",
            created_at=now_local(),
        )
        self.trades[out_trade_no] = trade
        if behaviour in {"confirm", "give_up"} and self.config.confirm_after_ms is not None:
            self._spawn(self._payer_acts_later(trade, self.config.confirm_after_ms / 1000))
        if behaviour == "pay":
            self._charge(trade)
            return {
                "code": "10000",
                "msg": "Success",
                **self._trade_fields(trade),
                "gmt_payment": fmt(trade.paid_at),
                "fund_bill_list": [{"fund_channel": "ALIPAYACCOUNT", "amount": yuan(amount)}],
            }
        return {"code": "10003", "msg": "Order success pay inprocess", **self._trade_fields(trade)}

    def query(self, biz: Mapping[str, Any]) -> dict[str, Any]:
        trade = self._find(biz)
        self._advance(trade, queried=True)
        answer: dict[str, Any] = {
            "code": "10000",
            "msg": "Success",
            **self._trade_fields(trade),
            "trade_status": trade.state,
        }
        if trade.paid_at:
            answer["send_pay_date"] = fmt(trade.paid_at)
        if trade.store_id:
            answer["store_id"] = trade.store_id
        return answer

    def cancel(self, biz: Mapping[str, Any]) -> dict[str, Any]:
        trade = self._find(biz)
        self._advance(trade, queried=False)
        if trade.cancel_action is None:
            if trade.refunded_fen:
                raise ApiError("40004", "ACQ.TRADE_STATUS_ERROR", "交易状态不合法")
            if trade.state == "TRADE_SUCCESS":
                trade.cancel_action = "refund"
                trade.returned_fen = trade.amount_fen
                self._payer(trade.auth_code).returned_fen += trade.amount_fen
            else:
                trade.cancel_action = "close"
            was_open = trade.state != "TRADE_CLOSED"
            trade.state = "TRADE_CLOSED"
            trade.closed_at = trade.closed_at or now_local()
            if was_open:
                self._notify(trade)
        return {
            "code": "10000",
            "msg": "Success",
            "trade_no": trade.trade_no,
            "out_trade_no": trade.out_trade_no,
            "retry_flag": "N",
            "action": trade.cancel_action,
        }

    def refund(self, biz: Mapping[str, Any]) -> dict[str, Any]:
        amount = parse_yuan(biz.get("refund_amount"))
        if amount is None or amount < 1:
            raise invalid("refund_amount")
        request_no = biz.get("out_request_no")
        if request_no is not None and (
            not isinstance(request_no, str) or not OUT_REQUEST_NO.match(request_no)
        ):
            raise invalid("out_request_no")
        reason = biz.get("refund_reason", "")
        if not isinstance(reason, str) or len(reason) > 256:
            raise invalid("refund_reason")
        trade = self._find(biz)
        self._advance(trade, queried=False)
        failed = {"out_trade_no": trade.out_trade_no, "refund_fee": "0.00", "send_back_fee": "0.00"}
        key_no = request_no or trade.out_trade_no
        earlier = self.refunds.get((trade.out_trade_no, key_no))
        if earlier is not None:
            if earlier.amount_fen != amount:
                raise ApiError(
                    "40004", "ACQ.DISCORDANT_REPEAT_REQUEST", "不一致的请求", extra=failed
                )
            return self._refund_answer(trade, earlier, fund_change="N")
        if trade.paid_at is None or trade.cancel_action is not None:
            raise ApiError("40004", "ACQ.TRADE_STATUS_ERROR", "交易状态不合法", extra=failed)
        if request_no is None and amount != trade.amount_fen:
            raise ApiError("40004", "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL", "退款金额超限", extra=failed)
        if amount > trade.amount_fen - trade.refunded_fen:
            raise ApiError("40004", "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL", "退款金额超限", extra=failed)
        refund = Refund(trade.out_trade_no, key_no, amount, reason, now_local())
        self.refunds[(trade.out_trade_no, key_no)] = refund
        trade.refunded_fen += amount
        self._payer(trade.auth_code).refunded_fen += amount
        if trade.refunded_fen == trade.amount_fen:
            trade.state = "TRADE_CLOSED"
            trade.closed_at = refund.at
        self._notify(trade, refund)
        return self._refund_answer(trade, refund, fund_change="Y")

    def _refund_answer(self, trade: Trade, refund: Refund, *, fund_change: str) -> dict[str, Any]:
        return {
            "code": "10000",
            "msg": "Success",
            "trade_no": trade.trade_no,
            "out_trade_no": trade.out_trade_no,
            "buyer_logon_id": trade.buyer_logon_id,
            "buyer_user_id": trade.buyer_user_id,
            "fund_change": fund_change,
            "refund_fee": yuan(trade.refunded_fen),
            "send_back_fee": yuan(refund.amount_fen) if fund_change == "Y" else "0.00",
            "gmt_refund_pay": fmt(refund.at),
        }

    def refund_query(self, biz: Mapping[str, Any]) -> dict[str, Any]:
        request_no = biz.get("out_request_no")
        if not isinstance(request_no, str) or not OUT_REQUEST_NO.match(request_no):
            raise invalid("out_request_no")
        options = biz.get("query_options", [])
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise invalid("query_options")
        trade = self._find(biz)
        answer: dict[str, Any] = {"code": "10000", "msg": "Success"}
        refund = self.refunds.get((trade.out_trade_no, request_no))
        if refund is None:
            return answer
        answer.update(
            {
                "trade_no": trade.trade_no,
                "out_trade_no": trade.out_trade_no,
                "out_request_no": refund.out_request_no,
                "total_amount": yuan(trade.amount_fen),
                "refund_amount": yuan(refund.amount_fen),
                "refund_status": "REFUND_SUCCESS",
            }
        )
        if refund.reason:
            answer["refund_reason"] = refund.reason
        if "gmt_refund_pay" in options:
            answer["gmt_refund_pay"] = fmt(refund.at)
        return answer

    def bill_url(self, biz: Mapping[str, Any], base_url: str) -> dict[str, Any]:
        if biz.get("bill_type") != "trade":
            raise invalid("bill_type")
        text = biz.get("bill_date")
        if not isinstance(text, str) or not BILL_DATE.match(text):
            raise invalid("bill_date")
        try:
            day = date.fromisoformat(text)
        except ValueError:
            raise invalid("bill_date") from None
        today = now_local().date()
        if day > today or (day == today and not self.config.bill_allow_today):
            raise ApiError("40004", "isp.bill_not_exist", "账单不存在")
        token = secrets.token_urlsafe(16)
        self.bill_tokens[token] = (day, time.monotonic() + BILL_TOKEN_S)
        query = urlencode(
            {
                "bizType": "trade",
                "userId": self.config.seller_id,
                "fileType": "csv.zip",
                "bizDates": day.strftime("%Y%m%d"),
                "downloadFileName": f"{self.config.seller_id}_{day:%Y%m%d}.csv.zip",
                "timestamp": str(int(time.time() * 1000)),
                "token": token,
            }
        )
        return {
            "code": "10000",
            "msg": "Success",
            "bill_download_url": f"{base_url.rstrip('/')}/downloadBillFile.resource?{query}",
        }

    # ------------------------------------------------------------------ bill

    def bill_zip(self, day: date) -> bytes:
        rows: list[list[str]] = []
        payments = refunds = 0
        paid_total = refund_total = fee_total = 0
        for trade in self.trades.values():
            if (
                trade.paid_at is None
                or trade.cancel_action is not None
                or trade.paid_at.astimezone(SHANGHAI).date() != day
            ):
                continue
            payments += 1
            paid_total += trade.amount_fen
            fee = -((trade.amount_fen * FEE_RATE_PPM + 500_000) // 1_000_000)
            fee_total += fee
            rows.append(
                _bill_row(trade, "交易", trade.amount_fen, trade.amount_fen, "", fee, trade)
            )
        for refund in self.refunds.values():
            if refund.at.astimezone(SHANGHAI).date() != day:
                continue
            trade = self.trades[refund.out_trade_no]
            refunds += 1
            refund_total += refund.amount_fen
            fee = (refund.amount_fen * FEE_RATE_PPM + 500_000) // 1_000_000
            fee_total += fee
            rows.append(
                _bill_row(
                    trade,
                    "退款",
                    trade.amount_fen,
                    -refund.amount_fen,
                    refund.out_request_no,
                    fee,
                    refund,
                )
            )
        detail = io.StringIO()
        writer = csv.writer(detail, lineterminator="\r\n")
        detail.write("#支付宝业务明细查询\r\n")
        detail.write(f"#账号：[{self.config.seller_id}0156]\r\n")
        end = day + timedelta(days=1)
        detail.write(
            f"#起始日期：[{day:%Y年%m月%d日} 00:00:00]   "
            f"终止日期：[{end:%Y年%m月%d日} 00:00:00]\r\n"
        )
        detail.write(
            "#-----------------------------------------业务明细列表----------------------------------------\r\n"
        )
        writer.writerow(BILL_HEADER)
        writer.writerows(rows)
        detail.write(
            "#-----------------------------------------业务明细列表结束------------------------------------\r\n"
        )
        detail.write(f"#交易合计：{payments}笔，商家实收共：{yuan(paid_total)}元\r\n")
        detail.write(f"#退款合计：{refunds}笔，商家实收退款共：{yuan(-refund_total)}元\r\n")
        detail.write(f"#导出时间：[{now_local():%Y年%m月%d日 %H:%M:%S}]\r\n")
        summary = io.StringIO()
        summary_writer = csv.writer(summary, lineterminator="\r\n")
        summary.write("#支付宝业务汇总查询\r\n")
        summary_writer.writerow(SUMMARY_HEADER)
        net = paid_total - refund_total
        summary_writer.writerow(
            [
                "",
                "",
                str(payments),
                str(refunds),
                yuan(paid_total - refund_total),
                yuan(net),
                "0.00",
                "0.00",
                "0.00",
                yuan(fee_total),
                "0.00",
                yuan(net + fee_total),
            ]
        )
        summary.write(
            "#-----------------------------------------业务汇总列表结束------------------------------------\r\n"
        )
        stem = f"{self.config.seller_id}_{day:%Y%m%d}"
        return gbk_named_zip(
            [
                (f"{stem}_业务明细.csv", detail.getvalue().encode("gbk")),
                (f"{stem}_业务明细(汇总).csv", summary.getvalue().encode("gbk")),
            ]
        )

    # ------------------------------------------------------------------ notifications

    def _notify(self, trade: Trade, refund: Refund | None = None) -> None:
        if not trade.notify_url:
            return
        params: dict[str, str] = {
            "notify_time": fmt(now_local()),
            "notify_type": "trade_status_sync",
            "notify_id": secrets.token_hex(16),
            "app_id": self.config.app_id,
            "charset": "utf-8",
            "version": "1.0",
            "sign_type": "RSA2",
            "trade_no": trade.trade_no,
            "out_trade_no": trade.out_trade_no,
            "buyer_id": trade.buyer_user_id,
            "buyer_logon_id": trade.buyer_logon_id,
            "seller_id": self.config.seller_id,
            "trade_status": trade.state,
            "total_amount": yuan(trade.amount_fen),
            "subject": trade.subject,
            "gmt_create": fmt(trade.created_at),
        }
        if trade.paid_at:
            amount = yuan(trade.amount_fen)
            params.update(
                {
                    "receipt_amount": amount,
                    "invoice_amount": amount,
                    "buyer_pay_amount": amount,
                    "point_amount": "0.00",
                    "gmt_payment": fmt(trade.paid_at),
                }
            )
        if refund is not None:
            params["out_biz_no"] = refund.out_request_no
            params["refund_fee"] = yuan(trade.refunded_fen)
            params["gmt_refund"] = fmt(refund.at)
        elif trade.cancel_action == "refund":
            params["refund_fee"] = yuan(trade.amount_fen)
            params["gmt_refund"] = fmt(trade.closed_at)
        if trade.state == "TRADE_CLOSED" and trade.closed_at:
            params["gmt_close"] = fmt(trade.closed_at)
        content = sign_content(params, exclude=("sign", "sign_type")).encode("utf-8")
        params["sign"] = self._notification_sign(content)
        record = NotificationRecord(
            params["notify_id"], trade.out_trade_no, trade.state, trade.notify_url, params
        )
        self.notifications.append(record)
        faults = self.faults
        if self.rng.random() < faults.notify_drop_rate:
            record.dropped = True
            return
        if self.rng.random() < faults.notify_duplicate_rate:
            record.copies = 2
        for _ in range(record.copies):
            delay = faults.notify_delay_ms
            if faults.notify_reorder:
                delay += self.rng.randint(0, max(faults.notify_delay_ms, 200))
            self._spawn(self._deliver(record, delay / 1000))

    def _spawn(self, coroutine: Any) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coroutine)
        except RuntimeError:  # no loop (a direct call in a test): nothing is sent
            coroutine.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _payer_acts_later(self, trade: Trade, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        self._advance(trade, queried=False)

    async def _deliver(self, record: NotificationRecord, delay_s: float) -> None:
        if delay_s:
            await asyncio.sleep(delay_s)
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=5.0)
        body = urlencode(record.params).encode("ascii")
        headers = {"content-type": "application/x-www-form-urlencoded; charset=utf-8"}
        for wait_ms in (*self.config.notify_retry_ms, None):
            record.attempts += 1
            try:
                response = await self._client.post(record.url, content=body, headers=headers)
                _note_answer(record, response)
                if response.status_code == 200 and response.content.strip() == b"success":
                    record.deliveries += 1
                    return
            except httpx.HTTPError as exc:
                _note_answer(record, None, exc)
            if wait_ms is None:
                break
            await asyncio.sleep(wait_ms / 1000)
        record.given_up += 1

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._client is not None:
            await self._client.aclose()

    def _notification_sign(self, content: bytes) -> str:
        """A notification's signature: by the "Alipay" key, or with the fault
        ``notify_wrong_key_rate`` by a stranger's."""
        rate = self.faults.notify_wrong_key_rate
        if rate > 0 and self.rng.random() < rate:
            return rsa_sign(self._stranger_key(), content)
        return rsa_sign(self.config.alipay_private_key, content)

    def _stranger_key(self) -> rsa.RSAPrivateKey:
        """A key that is not the simulator's "Alipay" key (made once, on first use)."""
        key: rsa.RSAPrivateKey | None = getattr(self, "_stranger", None)
        if key is None:
            key = self._stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return key

    # ------------------------------------------------------------------ views

    def trades_view(self) -> dict[str, Any]:
        trades = [
            {
                "out_trade_no": t.out_trade_no,
                "trade_no": t.trade_no,
                "auth_code": t.auth_code,
                "amount_fen": t.amount_fen,
                "state": t.state,
                "behaviour": t.behaviour,
                "cancel_action": t.cancel_action,
                "charged_times": t.charged_times,
                "returned_fen": t.returned_fen,
                "refunded_fen": t.refunded_fen,
                "queries": t.queries,
                "paid_at": fmt(t.paid_at) or None,
                "closed_at": fmt(t.closed_at) or None,
            }
            for t in self.trades.values()
        ]
        refunds = [
            {
                "out_trade_no": r.out_trade_no,
                "out_request_no": r.out_request_no,
                "amount_fen": r.amount_fen,
                "at": fmt(r.at),
            }
            for r in self.refunds.values()
        ]
        payers = {code: vars(payer) for code, payer in self.payers.items()}
        return {
            "trades": trades,
            "refunds": refunds,
            "payers": payers,
            "charged_twice": [t.out_trade_no for t in self.trades.values() if t.charged_times > 1],
        }

    def notifications_view(self) -> list[dict[str, Any]]:
        return [
            {
                "notify_id": n.notify_id,
                "out_trade_no": n.out_trade_no,
                "trade_status": n.trade_status,
                "copies": n.copies,
                "attempts": n.attempts,
                "deliveries": n.deliveries,
                "dropped": n.dropped,
                "given_up": n.given_up,
                "answers": list(n.answers),
            }
            for n in self.notifications
        ]

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "app_id": self.config.app_id,
            "uptime_ms": int((time.monotonic() - self.started) * 1000),
            "trades": len(self.trades),
            "refunds": len(self.refunds),
            "notifications": len(self.notifications),
            "faults": {f.name: getattr(self.faults, f.name) for f in fields(Faults)},
            "stats": dict(self.stats),
        }


def gbk_named_zip(files: list[tuple[str, bytes]]) -> bytes:
    """A zip whose member names are GBK bytes without the UTF-8 flag, as Alipay's bill zips
    come [I] (Python's zipfile writes non-ASCII names as flagged UTF-8 only): each member is
    written under an ASCII placeholder of the same byte length, then the name bytes are swapped
    in the local and central headers (the CRC covers the content, not the name)."""
    buffer = io.BytesIO()
    names: list[tuple[bytes, bytes]] = []
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for index, (name, content) in enumerate(files):
            encoded = name.encode("gbk")
            placeholder = f"{index:03d}".encode().ljust(len(encoded), b"~")
            names.append((placeholder, encoded))
            archive.writestr(placeholder.decode(), content)
    raw = buffer.getvalue()
    for placeholder, encoded in names:
        if raw.count(placeholder) != 2:  # pragma: no cover - compressed data hit the pattern
            raise RuntimeError("placeholder name is not unique in the zip")
        raw = raw.replace(placeholder, encoded)
    return raw


def _zero_amounts() -> dict[str, str]:
    return {
        "buyer_pay_amount": "0.00",
        "invoice_amount": "0.00",
        "point_amount": "0.00",
        "receipt_amount": "0.00",
    }


def _bill_row(
    trade: Trade,
    kind: str,
    order_fen: int,
    received_fen: int,
    request_no: str,
    fee_fen: int,
    event: Trade | Refund,
) -> list[str]:
    finished = event.paid_at if isinstance(event, Trade) else event.at
    return [
        f"{trade.trade_no}\t",
        f"{trade.out_trade_no}\t",
        kind,
        trade.subject,
        fmt(trade.created_at),
        fmt(finished),
        trade.store_id,
        "",
        "",
        "",
        trade.buyer_logon_id,
        yuan(order_fen),
        yuan(received_fen),
        "0.00",
        "0.00",
        "0.00",
        "0.00",
        "0.00",
        "",
        "0.00",
        "0.00",
        f"{request_no}\t" if request_no else "",
        yuan(fee_fen),
        "0.00",
        "",
    ]


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
                "headers": [
                    (b"content-type", b"text/html;charset=utf-8"),
                    (b"content-length", b"4096"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b'{"', "more_body": True})


def encode_answer(
    sim: AlipaySimulator, method: str | None, body: Mapping[str, Any], *, signed: bool
) -> bytes:
    key = f"{method.replace('.', '_')}_response" if method in METHODS and method else None
    key = key or "error_response"
    inner = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    if not signed:
        return f'{{"{key}":{inner}}}'.encode()
    sign = rsa_sign(sim.config.alipay_private_key, inner.encode("utf-8"))
    return f'{{"{key}":{inner},"sign":"{sign}"}}'.encode()


def _tamper(body: bytes) -> bytes:
    text = body.decode("utf-8")
    if '"code":"10000"' in text:
        return text.replace('"code":"10000"', '"code":"10000","hacked":"1"', 1).encode()
    return text.replace('"code":"', '"code":"1', 1).encode()


def _parse_params(query: str, body: bytes) -> dict[str, str]:
    pairs = parse_qsl(query, keep_blank_values=True)
    if body:
        try:
            pairs += parse_qsl(body.decode("ascii"), keep_blank_values=True, strict_parsing=True)
        except (UnicodeDecodeError, ValueError):
            raise ApiError(
                "40002", "isv.invalid-parameter", "参数无效: 请求体", signed=False
            ) from None
    params: dict[str, str] = {}
    for key, value in pairs:
        if key in params:
            raise ApiError("40002", "isv.invalid-parameter", f"参数重复: {key}", signed=False)
        params[key] = value
    return params


#: How many gateway requests ``GET /sim/requests`` keeps (the newest).
REQUEST_LOG_SIZE = 1000


def build_app(
    config: SimConfig | Mapping[str, Any],
    *,
    on_started: Callable[[], None] | None = None,
) -> Starlette:
    """The simulator as an ASGI app (``app.state.sim`` is the :class:`AlipaySimulator`)."""
    sim_config = config if isinstance(config, SimConfig) else config_from_mapping(config)
    sim = AlipaySimulator(sim_config)
    # The trace context of each gateway request received (the newest REQUEST_LOG_SIZE).
    received: collections.deque[dict[str, Any]] = collections.deque(maxlen=REQUEST_LOG_SIZE)

    async def gateway(request: Request) -> Response:
        sim.stats["requests"] += 1
        body = await request.body()
        seen: dict[str, Any] = {
            "method": None,
            "traceparent": request.headers.get("traceparent"),
            "tracestate": request.headers.get("tracestate"),
        }
        received.append(seen)
        faults = sim.faults
        rng = sim.rng
        if rng.random() < faults.timeout_rate:
            sim.stats["timeouts"] += 1
            deadline = time.monotonic() + faults.timeout_hold_ms / 1000
            while time.monotonic() < deadline:
                if await request.is_disconnected():
                    break
                await asyncio.sleep(0.05)
            return _DroppedAnswer()
        if faults.slow_ms:
            await asyncio.sleep(faults.slow_ms / 1000)
        if rng.random() < faults.error_5xx_rate:
            sim.stats["errors_5xx"] += 1
            return Response(
                b"<html><body>502 Bad Gateway</body></html>", 502, media_type="text/html"
            )
        method: str | None = None
        signed = True
        try:
            params = _parse_params(request.url.query, body)
            method = params.get("method")
            seen["method"] = method
            method = sim.authenticate(params)
            if rng.random() < faults.system_error_rate:
                sim.stats["system_errors"] += 1
                if rng.random() < 0.5:
                    raise ApiError("20000", "isp.unknow-error", "服务暂不可用（业务系统不可用）")
                raise ApiError("40004", "ACQ.SYSTEM_ERROR", "系统错误")
            answer = sim.handle(method, params, str(request.base_url))
        except ApiError as exc:
            answer = exc.body()
            signed = exc.signed
        if method == "alipay.trade.pay" and rng.random() < faults.charge_no_answer_rate:
            sim.stats["charges_unanswered"] += 1
            return _DroppedAnswer()
        content = encode_answer(sim, method, answer, signed=signed)
        if rng.random() < faults.tamper_answer_rate:
            sim.stats["tampered"] += 1
            content = _tamper(content)
        return Response(content, 200, media_type="text/html;charset=utf-8")

    async def bill_download(request: Request) -> Response:
        token = request.query_params.get("token", "")
        entry = sim.bill_tokens.get(token)
        if entry is None or entry[1] < time.monotonic():
            return Response("链接已失效".encode(), 404, media_type="text/plain;charset=utf-8")
        day, _ = entry
        return Response(
            sim.bill_zip(day),
            200,
            media_type="application/oct-stream",
            headers={"content-disposition": f'attachment; filename="{day:%Y%m%d}.csv.zip"'},
        )

    async def health(request: Request) -> Response:  # noqa: ARG001
        return JSONResponse(sim.health())

    async def trades(request: Request) -> Response:  # noqa: ARG001
        return JSONResponse(sim.trades_view())

    async def notifications(request: Request) -> Response:  # noqa: ARG001
        return JSONResponse(sim.notifications_view())

    async def requests(request: Request) -> Response:  # noqa: ARG001
        return JSONResponse({"requests": list(received)})

    async def control(request: Request) -> Response:
        try:
            payload = json.loads(await request.body() or b"{}")
            if not isinstance(payload, dict):
                raise SimConfigError("the control body must be an object")
            unknown = set(payload) - {"faults"}
            if unknown:
                raise SimConfigError(f"unknown control members {sorted(unknown)}")
            faults = merge_faults(sim.faults, payload.get("faults") or {})
        except ValueError:
            return JSONResponse({"error": "the control body is not JSON"}, 400)
        except SimConfigError as exc:
            return JSONResponse({"error": exc.message}, 400)
        sim.faults = faults
        return JSONResponse(sim.health())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:  # noqa: ARG001
        if on_started is not None:
            on_started()
        try:
            yield
        finally:
            await sim.aclose()

    app = Starlette(
        routes=[
            Route("/gateway.do", gateway, methods=["POST", "GET"]),
            Route("/downloadBillFile.resource", bill_download, methods=["GET"]),
            Route("/sim/health", health, methods=["GET"]),
            Route("/sim/trades", trades, methods=["GET"]),
            Route("/sim/notifications", notifications, methods=["GET"]),
            Route("/sim/requests", requests, methods=["GET"]),
            Route("/sim/control", control, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    app.state.sim = sim
    return app


# --------------------------------------------------------------------------- process


def _announce(url: str) -> None:
    message = f"Alipay simulator listening on {url}"
    announce(message, service="alipay-simulator", url=url, gateway=f"{url}/gateway.do")


def _app_from_file(path: str, on_started: Callable[[], None]) -> Starlette:
    return build_app(load_config(path), on_started=on_started)


def main(argv: list[str] | None = None) -> int:
    """Run the simulator until SIGINT/SIGTERM (exit 0); 2: a bad config, 1: no port."""
    return run_simulator(
        argv,
        prog="python -m forecourt.sim.alipay",
        description="Simulated Alipay open platform gateway (payment-code payments) over HTTP.",
        build_app=_app_from_file,
        config_error=SimConfigError,
        announce_listening=_announce,
        logger=logger,
    )


if __name__ == "__main__":
    sys.exit(main())
