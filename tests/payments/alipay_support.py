"""Helpers for the Alipay tests: keys, the simulator's config, the simulator as a real process,
a notification receiver, and hand-made signed requests and notifications."""

from __future__ import annotations

import functools
import json
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from forecourt.payments.providers.alipay import (
    SHANGHAI,
    AlipayConfig,
    AlipayProvider,
    load_private_key,
    rsa2_sign,
    sign_content,
)
from forecourt.payments.providers.base import Notification, NotificationRejected
from tests.payments.sim_process import LoopServer, SimProcess, wait_until

APP_ID = "2021000122600001"
SELLER_ID = "2088102146225135"


@dataclass(frozen=True)
class Keys:
    app_private_pem: str
    app_public_pem: str
    alipay_private_pem: str
    alipay_public_pem: str
    stranger_private_pem: str  # a key nobody trusts
    stranger_public_pem: str


def _pem_private(key: rsa.RSAPrivateKey, fmt: serialization.PrivateFormat) -> str:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()).decode()


def _pem_public(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@functools.cache
def keys() -> Keys:
    """One set of keys for the whole test session (RSA generation is slow)."""
    app = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    alipay = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return Keys(
        app_private_pem=_pem_private(app, serialization.PrivateFormat.PKCS8),
        app_public_pem=_pem_public(app),
        alipay_private_pem=_pem_private(alipay, serialization.PrivateFormat.TraditionalOpenSSL),
        alipay_public_pem=_pem_public(alipay),
        stranger_private_pem=_pem_private(stranger, serialization.PrivateFormat.PKCS8),
        stranger_public_pem=_pem_public(stranger),
    )


def sim_config(*, faults: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The simulator's config for the test app."""
    k = keys()
    config: dict[str, Any] = {
        "app_id": APP_ID,
        "app_public_key_pem": k.app_public_pem,
        "alipay_private_key_pem": k.alipay_private_pem,
        "seller_id": SELLER_ID,
        "seed": 7,
        "bill_allow_today": True,
        "notify_retry_ms": [50, 100, 200],
        "payer": {"confirm_after_queries": 2},
        "faults": dict(faults or {}),
    }
    config.update(extra)
    return config


def provider_config(
    gateway_url: str,
    *,
    timeout_s: float = 3.0,
    notify_url: str | None = None,
    app_private_pem: str | None = None,
    alipay_public_pem: str | None = None,
    seller_id: str | None = SELLER_ID,
) -> AlipayConfig:
    k = keys()
    return AlipayConfig(
        app_id=APP_ID,
        app_private_key_pem=app_private_pem or k.app_private_pem,
        alipay_public_key_pem=alipay_public_pem or k.alipay_public_pem,
        gateway_url=gateway_url,
        notify_url=notify_url,
        timeout_s=timeout_s,
        seller_id=seller_id,
    )


def out_no(prefix: str = "T") -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def auth_code(suffix: str = "9999") -> str:
    """An 18-digit Alipay payment code ending in ``suffix`` (the simulator's payer behaviour)."""
    middle = "".join(secrets.choice("0123456789") for _ in range(16 - len(suffix)))
    return f"28{middle}{suffix}"


def signed_form(
    method: str,
    biz: Mapping[str, Any],
    *,
    private_pem: str | None = None,
    app_id: str = APP_ID,
    timestamp: str | None = None,
    **overrides: str,
) -> dict[str, str]:
    """A gateway request signed by hand (``private_pem`` defaults to the app's key)."""
    params = {
        "app_id": app_id,
        "method": method,
        "format": "JSON",
        "charset": "utf-8",
        "sign_type": "RSA2",
        "timestamp": timestamp or datetime.now(SHANGHAI).strftime("%Y-%m-%d %H:%M:%S"),
        "version": "1.0",
        "biz_content": json.dumps(biz, ensure_ascii=False),
    }
    params.update(overrides)
    key = load_private_key(private_pem or keys().app_private_pem)
    params["sign"] = rsa2_sign(key, sign_content(params))
    return params


def signed_notification(
    params: Mapping[str, str], *, private_pem: str | None = None
) -> tuple[dict[str, str], bytes]:
    """A notification form as Alipay sends it, signed with Alipay's key (or ``private_pem``)."""
    form = dict(params)
    form.setdefault("sign_type", "RSA2")
    key = load_private_key(private_pem or keys().alipay_private_pem)
    form["sign"] = rsa2_sign(key, sign_content(form, exclude=("sign", "sign_type")))
    headers = {"content-type": "application/x-www-form-urlencoded; charset=utf-8"}
    return headers, urlencode(form).encode("ascii")


def paid_notification_params(out_trade_no: str, **extra: str) -> dict[str, str]:
    params = {
        "notify_time": "2026-12-02 10:00:05",
        "notify_type": "trade_status_sync",
        "notify_id": secrets.token_hex(16),
        "app_id": APP_ID,
        "charset": "utf-8",
        "version": "1.0",
        "trade_no": "2026120222001400000000000001",
        "out_trade_no": out_trade_no,
        "buyer_id": "2088000000000001",
        "buyer_logon_id": "abc***@example.com",
        "seller_id": SELLER_ID,
        "trade_status": "TRADE_SUCCESS",
        "total_amount": "12.34",
        "receipt_amount": "12.34",
        "subject": "92号汽油",
        "gmt_create": "2026-12-02 10:00:00",
        "gmt_payment": "2026-12-02 10:00:01",
    }
    params.update(extra)
    return params


class AlipaySimProcess(SimProcess):
    """``python -m forecourt.sim.alipay`` as a child process (always ``stop()`` it)."""

    def __init__(self, config: Mapping[str, Any], workdir: Path) -> None:
        super().__init__("forecourt.sim.alipay", "alipay", config, workdir)

    @property
    def gateway_url(self) -> str:
        return f"{self.base_url}/gateway.do"

    def reset_faults(self) -> None:
        self.faults(**dict.fromkeys(self.current_faults()))

    def trade(self, out_trade_no: str) -> dict[str, Any] | None:
        return next((t for t in self.trades()["trades"] if t["out_trade_no"] == out_trade_no), None)

    def notifications(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get("/sim/notifications")
        return result


class NotifyReceiver:
    """Our notification endpoint in the test's event loop: each POST is parsed by the provider
    and answered with ``notification_answer``; the first ``fail_first`` are answered fail."""

    def __init__(self, provider: AlipayProvider, *, fail_first: int = 0) -> None:
        self.provider = provider
        self.fail_first = fail_first
        self.received: list[bytes] = []
        self.accepted: list[Notification] = []
        self.rejected: list[str] = []
        self.url = ""
        routes = [Route("/alipay/notify", self._handle, methods=["POST"])]
        self._server = LoopServer(Starlette(routes=routes))

    async def _handle(self, request: Request) -> Response:
        body = await request.body()
        self.received.append(body)
        if self.fail_first > 0:
            self.fail_first -= 1
            answer = self.provider.notification_answer(False, "busy")
        else:
            try:
                self.accepted.append(self.provider.parse_notification(dict(request.headers), body))
                answer = self.provider.notification_answer(True)
            except NotificationRejected as exc:
                self.rejected.append(exc.code)
                answer = self.provider.notification_answer(False, exc.message)
        return Response(answer.body, status_code=answer.status, media_type=answer.content_type)

    async def __aenter__(self) -> NotifyReceiver:
        self.url = f"{await self._server.start()}/alipay/notify"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._server.stop()

    async def wait_for(self, accepted: int, timeout_s: float = 5.0) -> list[Notification]:
        await wait_until(lambda: len(self.accepted) >= accepted, timeout_s)
        return list(self.accepted)
