"""Helpers for the Alipay tests: keys, the simulator's config, the simulator as a real process,
a notification receiver, and hand-made signed requests and notifications."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import uvicorn
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


class AlipaySimProcess:
    """``python -m forecourt.sim.alipay`` as a child process (always ``stop()`` it)."""

    def __init__(self, config: Mapping[str, Any], workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "alipay_config.json"
        self.config_path.write_text(json.dumps(dict(config)), encoding="utf-8")
        self.port_file = self.workdir / "alipay_port"
        self.log_path = self.workdir / "alipay.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.base_url = ""

    @property
    def gateway_url(self) -> str:
        return f"{self.base_url}/gateway.do"

    def start(self, timeout_s: float = 20.0) -> str:
        self.port_file.unlink(missing_ok=True)
        command = [
            sys.executable,
            "-m",
            "forecourt.sim.alipay",
            "--config",
            str(self.config_path),
            "--port",
            "0",
            "--host",
            "127.0.0.1",
            "--port-file",
            str(self.port_file),
            "--log-level",
            "WARNING",
        ]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"simulator exited early:\n{self.log_tail()}")
                text = self.port_file.read_text().strip() if self.port_file.exists() else ""
                if text:
                    self.base_url = f"http://127.0.0.1:{int(text)}"
                    with contextlib.suppress(httpx.HTTPError):
                        if httpx.get(f"{self.base_url}/sim/health", timeout=1).status_code == 200:
                            return self.base_url
                time.sleep(0.02)
            raise TimeoutError(f"simulator not ready in {timeout_s} s:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def faults(self, **faults: Any) -> dict[str, Any]:
        response = httpx.post(f"{self.base_url}/sim/control", json={"faults": faults}, timeout=5)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def reset_faults(self) -> None:
        current = httpx.get(f"{self.base_url}/sim/health", timeout=5).json()["faults"]
        self.faults(**dict.fromkeys(current))

    def trades(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx.get(f"{self.base_url}/sim/trades", timeout=5).json()
        return result

    def trade(self, out_trade_no: str) -> dict[str, Any] | None:
        return next((t for t in self.trades()["trades"] if t["out_trade_no"] == out_trade_no), None)

    def notifications(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = httpx.get(
            f"{self.base_url}/sim/notifications", timeout=5
        ).json()
        return result

    def __enter__(self) -> AlipaySimProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _InLoopServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # leave the test runner's signals alone
        yield


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
        self._server: _InLoopServer | None = None
        self._task: asyncio.Task[None] | None = None

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
        app = Starlette(routes=[Route("/alipay/notify", self._handle, methods=["POST"])])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/alipay/notify"
        self._server = _InLoopServer(
            uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        )
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        await wait_until(lambda: self._server is not None and self._server.started, 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        assert self._task is not None
        self._server.should_exit = True
        await asyncio.wait_for(self._task, 10)

    async def wait_for(self, accepted: int, timeout_s: float = 5.0) -> list[Notification]:
        await wait_until(lambda: len(self.accepted) >= accepted, timeout_s)
        return list(self.accepted)


async def wait_until(predicate: Any, timeout_s: float = 5.0) -> None:
    """Poll ``predicate`` until true, failing after ``timeout_s`` (no fixed sleeps)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)
