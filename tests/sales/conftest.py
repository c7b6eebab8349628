"""Fixtures for the sales tests: a head office on each database with the sample chain."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import count
from typing import Any

import httpx
import pytest

from forecourt.bootstrap import HeadOffice, build_head_office
from forecourt.kernel.ids import new_id
from forecourt.network.handlers import SAMPLE_CHAIN, import_chain, issue_credential, load_chain_file
from forecourt.settings import Settings
from tests.support import staff_headers


@dataclass
class Hq:
    office: HeadOffice
    client: httpx.AsyncClient  # signed in as an HQ admin
    tokens: dict[str, str]
    anonymous: httpx.AsyncClient  # no credential at all

    def auth(self, station: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.tokens[station]}"}

    async def upload(self, station: str, sales: list[dict[str, Any]], **kw: Any) -> httpx.Response:
        body = {"schema_version": 1, "sales": sales, **kw}
        return await self.client.post(
            f"/v1/stations/{station}/sales:batch", json=body, headers=self.auth(station)
        )


@pytest.fixture
async def hq(db_url: str) -> AsyncIterator[Hq]:
    office = build_head_office(Settings(database_url=db_url, log_json=False))
    await office.start(relay=False)
    await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
    tokens = {code: (await issue_credential(office.db, code))[1] for code in ("S001", "S002")}
    transport = httpx.ASGITransport(app=office.app)
    # Staff reads go as an HQ admin; uploads send their station's credential instead.
    staff = await staff_headers(office.identity)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://hq", headers=staff) as client,
        httpx.AsyncClient(transport=transport, base_url="http://hq") as anonymous,
    ):
        yield Hq(office, client, tokens, anonymous)
    await office.stop()


_seq = count(1)


def make_sale(**overrides: Any) -> dict[str, Any]:
    """A valid v1 sale: 40.00 L of 92# at 7.55 CNY/L on FP1 nozzle 1 (S001 layout)."""
    seq = next(_seq)
    sale = {
        "sale_id": str(new_id()),
        "station_seq": seq,
        "fuelling_point": 1,
        "nozzle": 1,
        "grade": "92",
        "volume_ml": 40000,
        "unit_price_mmu": 755000,
        "amount_minor": 30200,
        "currency": "CNY",
        "price_version": "p-92",
        "snapshot_version": 1,
        "totalizer_start_ml": 1_000_000 + seq * 40000,
        "totalizer_end_ml": 1_040_000 + seq * 40000,
        "device_txn": seq,
        "dispense_type": "sale",
        "started_at": datetime(2026, 11, 25, 1, 0, tzinfo=UTC).isoformat(),
        "ended_at": datetime(2026, 11, 25, 1, 2, tzinfo=UTC).isoformat(),
        "business_date": "2026-11-25",
        "shift_id": "2026-11-25/1",
    }
    sale.update(overrides)
    return sale


def make_sale_v2(**overrides: Any) -> dict[str, Any]:
    """A valid v2 sale: :func:`make_sale` plus the controller's identity and epoch."""
    sale = make_sale()
    sale.update(
        device_id="pts-S001-1",
        device_epoch=0,
        device_flags=[],
        device_raw=None,
        schema_version=2,
    )
    sale.update(overrides)
    return sale
