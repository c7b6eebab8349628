"""A head office with the payments context wired to the WeChat Pay and Alipay simulators (real
processes), the sample chain, and helpers to upload a sale and take its payment."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from itertools import count
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from forecourt.bootstrap import HeadOffice, build_head_office
from forecourt.infra.db import audit_outbox_table
from forecourt.network.handlers import SAMPLE_CHAIN, import_chain, issue_credential, load_chain_file
from forecourt.payments import store
from forecourt.payments.domain import PaymentOrder
from forecourt.payments.recovery import recover_once
from forecourt.settings import Settings
from tests.sales.conftest import make_sale as sales_sale
from tests.support import staff_headers

from . import alipay_support, wechat_support
from .alipay_support import AlipaySimProcess
from .wechat_support import WechatSimProcess

CONFIRM_WAIT_S = 1.0


@dataclass
class Sims:
    wechat: WechatSimProcess
    alipay: AlipaySimProcess

    def reset(self) -> None:
        self.wechat.reset_faults()
        self.alipay.reset_faults()


@contextlib.contextmanager
def running_sims(tmp: Path) -> Iterator[Sims]:
    wechat = WechatSimProcess(wechat_support.sim_config(), tmp / "wechat")
    alipay = AlipaySimProcess(alipay_support.sim_config(), tmp / "alipay")
    wechat.start()
    try:
        alipay.start()
        try:
            yield Sims(wechat, alipay)
        finally:
            alipay.stop()
    finally:
        wechat.stop()


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="ascii")
    return path


def payments_settings(database_url: str, sims: Sims, tmp: Path) -> Settings:
    wk = wechat_support.keys()
    ak = alipay_support.keys()
    return Settings(
        database_url=database_url,
        log_json=False,
        payments_wechat_mchid=wechat_support.MCHID,
        payments_wechat_appid=wechat_support.APPID,
        payments_wechat_base_url=sims.wechat.base_url,
        payments_wechat_merchant_serial_no=wechat_support.MERCHANT_SERIAL,
        payments_wechat_merchant_key_file=_write(tmp / "wx_key.pem", wk.merchant_private_pem),
        payments_wechat_apiv3_key=wk.apiv3_key,
        payments_wechat_platform_certificate_file=_write(
            tmp / "wx_platform.pem", wk.platform_certificate_pem
        ),
        payments_wechat_timeout_s=5.0,
        payments_alipay_app_id=alipay_support.APP_ID,
        payments_alipay_gateway_url=sims.alipay.gateway_url,
        payments_alipay_app_key_file=_write(tmp / "ali_key.pem", ak.app_private_pem),
        payments_alipay_public_key_file=_write(tmp / "ali_public.pem", ak.alipay_public_pem),
        payments_alipay_seller_id=alipay_support.SELLER_ID,
        payments_alipay_timeout_s=5.0,
        payments_confirm_wait_s=CONFIRM_WAIT_S,
        payments_poll_interval_s=0.1,
        payments_pending_deadline_s=60.0,
        payments_unknown_deadline_s=120.0,
        payments_recheck_s=1.0,
    )


_seq = count(1)


def make_sale(amount_minor: int = 30200, **overrides: Any) -> dict[str, Any]:
    """A valid v1 sale of S001's layout (FP1 nozzle 1, 92#), ``amount_minor`` fen; its
    station_seq spread so that sales of several tests never meet."""
    seq = next(_seq) + 10_000 * (uuid.uuid4().int % 1000)
    return sales_sale(**{"station_seq": seq, "amount_minor": amount_minor, **overrides})


@dataclass
class PaymentsHq:
    office: HeadOffice
    sims: Sims
    client: httpx.AsyncClient  # no credential by default: each call names its own
    station_tokens: dict[str, str]
    cashier: dict[str, str]  # a cashier of S001
    manager: dict[str, str]  # a station manager of S001
    admin: dict[str, str]

    def station(self, code: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.station_tokens[code]}"}

    async def upload_sale(self, station: str = "S001", **kw: Any) -> dict[str, Any]:
        sale = make_sale(**kw)
        response = await self.client.post(
            f"/v1/stations/{station}/sales:batch",
            json={"schema_version": 1, "sales": [sale]},
            headers=self.station(station),
        )
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["status"] in ("created", "quarantined")
        return sale

    async def pay(
        self,
        sale: dict[str, Any] | str,
        *,
        station: str = "S001",
        amount: int | None = None,
        code: str | None = None,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        currency: str = "CNY",
    ) -> httpx.Response:
        sale_id = sale if isinstance(sale, str) else sale["sale_id"]
        due = (
            amount
            if amount is not None
            else (sale["amount_minor"] if isinstance(sale, dict) else 100)
        )
        body: dict[str, Any] = {
            "sale_id": sale_id,
            "amount_fen": due,
            "currency": currency,
            "method": "code" if code else "cash",
        }
        if code:
            body["auth_code"] = code
        return await self.client.post(
            f"/v1/stations/{station}/payments",
            json=body,
            headers={**(headers or self.cashier), "Idempotency-Key": key or uuid.uuid4().hex},
        )

    async def order(self, order_id: str) -> PaymentOrder:
        async with self.office.db.connection() as conn:
            found = await store.get_order(conn, uuid.UUID(order_id))
        assert found is not None
        return found

    async def recover(self, after_s: float = 0.0) -> int:
        """One round of the recovery worker, ``after_s`` seconds from now."""
        assert self.office.payments is not None
        now = self.office.db.clock.now() + timedelta(seconds=after_s)
        return await recover_once(
            self.office.db, self.office.payments.providers, now, config=self.office.payments.config
        )

    async def audit(self, action: str) -> list[dict[str, Any]]:
        async with self.office.db.connection() as conn:
            rows = await conn.execute(
                sa.select(audit_outbox_table).where(audit_outbox_table.c.action == action)
            )
            return [dict(r._mapping) for r in rows]


@contextlib.asynccontextmanager
async def payments_hq(database_url: str, sims: Sims, tmp: Path) -> AsyncIterator[PaymentsHq]:
    sims.reset()
    office = build_head_office(payments_settings(database_url, sims, tmp))
    await office.start(relay=False)
    try:
        await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
        tokens = {c: (await issue_credential(office.db, c))[1] for c in ("S001", "S002")}
        cashier = await staff_headers(office.identity, ("cashier", "station:S001"))
        manager = await staff_headers(office.identity, ("station_manager", "station:S001"))
        admin = await staff_headers(office.identity)
        transport = httpx.ASGITransport(app=office.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://hq") as client:
            yield PaymentsHq(office, sims, client, tokens, cashier, manager, admin)
    finally:
        await office.stop()
        sims.reset()
