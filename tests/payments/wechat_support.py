"""Helpers for the WeChat Pay tests: keys, the simulator's config, the simulator as a real
process, a notification receiver, and hand-made notifications."""

from __future__ import annotations

import functools
import json
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from forecourt.payments.providers.base import Notification, NotificationRejected
from forecourt.payments.providers.wechat import (
    WechatPayConfig,
    WechatPayProvider,
    answer_message,
    certificate_serial,
    sign,
)
from forecourt.sim.wechatpay import aead_encrypt, make_platform_certificate

from .sim_process import LoopServer, SimProcess, wait_until

MCHID = "1900000109"
APPID = "wxd678efh567hg6787"
MERCHANT_SERIAL = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1"
PUBLIC_KEY_ID = "PUB_KEY_ID_0119000001092026120200000001"


@dataclass(frozen=True)
class Keys:
    merchant_private_pem: str
    merchant_public_pem: str
    platform_private_pem: str
    platform_public_pem: str
    platform_certificate_pem: str
    platform_serial: str
    apiv3_key: str
    stranger_private_pem: str  # a key nobody trusts


def _pem_private(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _pem_public(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@functools.cache
def keys() -> Keys:
    """One set of keys for the whole test session (RSA generation is slow)."""
    merchant = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    platform = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    certificate = make_platform_certificate(platform)
    return Keys(
        merchant_private_pem=_pem_private(merchant),
        merchant_public_pem=_pem_public(merchant),
        platform_private_pem=_pem_private(platform),
        platform_public_pem=_pem_public(platform),
        platform_certificate_pem=certificate,
        platform_serial=certificate_serial(certificate),
        apiv3_key=secrets.token_hex(16),
        stranger_private_pem=_pem_private(stranger),
    )


def sim_config(
    *,
    mode: str = "certificate",
    notify_url: str | None = None,
    faults: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The simulator's config for the test merchant; ``mode`` certificate/public_key/both."""
    k = keys()
    platform: dict[str, Any] = {"private_key_pem": k.platform_private_pem, "mode": mode}
    if mode in {"certificate", "both"}:
        platform["certificate_pem"] = k.platform_certificate_pem
    if mode in {"public_key", "both"}:
        platform["public_key_id"] = PUBLIC_KEY_ID
    config: dict[str, Any] = {
        "mchid": MCHID,
        "appid": APPID,
        "merchant": {"serial_no": MERCHANT_SERIAL, "public_key_pem": k.merchant_public_pem},
        "platform": platform,
        "apiv3_key": k.apiv3_key,
        "notify_url": notify_url,
        "seed": 7,
        "refund_delay_ms": 50,
        "bill_allow_today": True,
        "notify_retry_ms": [50, 100, 200],
        "faults": dict(faults or {}),
    }
    config.update(extra)
    return config


def provider_config(
    base_url: str,
    *,
    mode: str = "certificate",
    timeout_s: float = 2.0,
    notify_url: str | None = None,
    apiv3_key: str | None = None,
) -> WechatPayConfig:
    k = keys()
    certificates = (
        {k.platform_serial: k.platform_certificate_pem} if mode in {"certificate", "both"} else {}
    )
    public = mode in {"public_key", "both"}
    return WechatPayConfig(
        mchid=MCHID,
        appid=APPID,
        merchant_serial_no=MERCHANT_SERIAL,
        merchant_private_key_pem=k.merchant_private_pem,
        apiv3_key=apiv3_key or k.apiv3_key,
        platform_certificates=certificates,
        platform_public_key_id=PUBLIC_KEY_ID if public else None,
        platform_public_key_pem=k.platform_public_pem if public else None,
        base_url=base_url,
        timeout_s=timeout_s,
        notify_url=notify_url,
    )


def out_no(prefix: str = "T") -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def auth_code(suffix: str = "9999") -> str:
    """An 18-digit WeChat payment code ending in ``suffix`` (the simulator's payer behaviour)."""
    middle = "".join(secrets.choice("0123456789") for _ in range(16 - len(suffix)))
    return f"13{middle}{suffix}"


class WechatSimProcess(SimProcess):
    """``python -m forecourt.sim.wechatpay`` as a child process (always ``stop()`` it)."""

    def __init__(self, config: Mapping[str, Any], workdir: Path) -> None:
        super().__init__("forecourt.sim.wechatpay", "wechatpay", config, workdir)

    def reset_faults(self) -> None:
        self.control(faults=dict.fromkeys(self.current_faults()), notify_url=None)

    def trade(self, out_trade_no: str) -> dict[str, Any]:
        return next(t for t in self.trades()["trades"] if t["out_trade_no"] == out_trade_no)

    def notifications(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get("/sim/notifications")["notifications"]
        return result


class NotifyReceiver:
    """Our notification endpoint, served in the test's event loop: every POST is parsed by the
    provider and answered with ``notification_answer``; ``fail_first`` answers fail first."""

    def __init__(self, provider: WechatPayProvider, *, fail_first: int = 0) -> None:
        self.provider = provider
        self.fail_first = fail_first
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.accepted: list[Notification] = []
        self.rejected: list[str] = []
        self.url = ""
        routes = [Route("/notify", self._handle, methods=["POST"])]
        self._server = LoopServer(Starlette(routes=routes))

    async def _handle(self, request: Request) -> Response:
        body = await request.body()
        headers = dict(request.headers)
        self.received.append((headers, body))
        if self.fail_first > 0:
            self.fail_first -= 1
            answer = self.provider.notification_answer(False, "busy")
        else:
            try:
                self.accepted.append(self.provider.parse_notification(headers, body))
                answer = self.provider.notification_answer(True)
            except NotificationRejected as exc:
                self.rejected.append(exc.code)
                answer = self.provider.notification_answer(False, exc.message)
        return Response(
            answer.body, status_code=answer.status, media_type=answer.content_type or None
        )

    async def __aenter__(self) -> NotifyReceiver:
        self.url = f"{await self._server.start()}/notify"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._server.stop()

    async def wait_for(self, accepted: int, timeout_s: float = 5.0) -> list[Notification]:
        await wait_until(
            lambda: len(self.accepted) >= accepted,
            timeout_s,
            lambda: (
                f"{len(self.accepted)} of {accepted} notifications accepted;"
                f" rejected {self.rejected}"
            ),
        )
        return list(self.accepted)


def make_notification(
    resource: Mapping[str, Any],
    *,
    event_type: str = "TRANSACTION.SUCCESS",
    original_type: str = "transaction",
    timestamp: int | None = None,
    serial: str | None = None,
    signing_key_pem: str | None = None,
    apiv3_key: str | None = None,
    notification_id: str | None = None,
) -> tuple[dict[str, str], bytes]:
    """A notification as WeChat sends it (headers, body), each part overridable."""
    k = keys()
    encrypted = aead_encrypt(
        apiv3_key or k.apiv3_key,
        json.dumps(resource, ensure_ascii=False).encode(),
        original_type,
    )
    encrypted["original_type"] = original_type
    body = json.dumps(
        {
            "id": notification_id or str(uuid.uuid4()),
            "create_time": "2026-12-02T10:00:00+08:00",
            "resource_type": "encrypt-resource",
            "event_type": event_type,
            "summary": "支付成功",
            "resource": encrypted,
        },
        ensure_ascii=False,
    ).encode()
    stamp = str(timestamp if timestamp is not None else int(time.time()))
    nonce = secrets.token_hex(16)
    private = serialization.load_pem_private_key(
        (signing_key_pem or k.platform_private_pem).encode(), password=None
    )
    assert isinstance(private, rsa.RSAPrivateKey)
    headers = {
        "Wechatpay-Timestamp": stamp,
        "Wechatpay-Nonce": nonce,
        "Wechatpay-Signature": sign(private, answer_message(stamp, nonce, body)),
        "Wechatpay-Serial": serial or k.platform_serial,
        "Wechatpay-Signature-Type": "WECHATPAY2-SHA256-RSA2048",
    }
    return headers, body


def paid_transaction(out_trade_no: str, total: int = 500) -> dict[str, Any]:
    return {
        "appid": APPID,
        "mchid": MCHID,
        "out_trade_no": out_trade_no,
        "transaction_id": "4200000001202612020000000001",
        "trade_type": "MICROPAY",
        "trade_state": "SUCCESS",
        "trade_state_desc": "支付成功",
        "bank_type": "OTHERS",
        "success_time": "2026-12-02T10:00:00+08:00",
        "payer": {"openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"},
        "amount": {"total": total, "payer_total": total, "currency": "CNY"},
    }
