"""Counter payments through the edge's POS API, against a real HQ served over HTTP (that can
go down and come back) and a simulated PTS-2 controller process selling fuel.

A cashier's staff token is checked at the edge offline (HQ's keys, cached across a restart);
a sale is paid by code through HQ, or in cash recorded at the edge and uploaded to HQ once.
The failure paths come first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from forecourt.bootstrap import build_head_office
from forecourt.edge.node import EdgeNode
from forecourt.edge.pos import idempotency_key
from forecourt.kernel.clock import SimulatedClock
from forecourt.network.handlers import (
    SAMPLE_CHAIN,
    import_chain,
    load_chain_file,
)
from forecourt.settings import Settings
from tests.edge.conftest import HqServer, Station
from tests.support import eventually, staff_headers

CASHIER = ("cashier", "station:S001")
# The simulated clock runs SPEED times faster than real time: a day-long access token lasts
# minutes of the test, long enough for every step of one.
TOKEN_S = 86_400


@pytest.fixture
async def hq(tmp_path: Path, clock: SimulatedClock) -> AsyncIterator[HqServer]:
    office = build_head_office(
        Settings(
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'hq.db'}",
            log_json=False,
            identity_access_token_s=TOKEN_S,
        ),
        clock=clock,
    )
    await office.start()
    await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
    server = HqServer(office)
    await server.up()
    yield server
    await server.down()
    await office.stop()


@dataclass
class Counter:
    station: Station
    node: EdgeNode
    api: httpx.AsyncClient

    @property
    def hq(self) -> HqServer:
        return self.station.hq

    async def cashier(self, *grants: tuple[str, str]) -> dict[str, str]:
        """A staff token's headers (signed by HQ: the edge fetches the key on its first use)."""
        return await staff_headers(self.hq.office.identity, *(grants or (CASHIER,)))

    async def a_sale(self, headers: dict[str, str]) -> dict[str, Any]:
        """An unpaid sale of the journal, once the forecourt has sold one."""

        async def found() -> dict[str, Any] | None:
            answer = await self.api.get("/v1/pos/sales?unpaid=true", headers=headers)
            assert answer.status_code == 200, answer.text
            sales = answer.json()
            return sales[-1] if sales else None

        return await eventually(found, 60, interval=0.05, what="a journaled sale")

    async def pay(self, sale_id: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
        return await self.api.post(f"/v1/pos/sales/{sale_id}/pay", json=body, headers=headers)

    def audits(self, action: str) -> list[dict[str, Any]]:
        path = self.station.journal
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            rows = db.execute(
                "SELECT actor, target, details FROM audit_outbox WHERE action = ? ORDER BY id",
                (action,),
            ).fetchall()
        return [{"actor": a, "target": t, "details": json.loads(d)} for a, t, d in rows]

    async def hq_orders(self, sale_id: str) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=self.hq.url, timeout=10) as client:
            answer = await client.get(
                f"/v1/stations/S001/payments?sale_id={sale_id}",
                headers=await self.hq.staff_headers(),
            )
        assert answer.status_code == 200, answer.text
        return list(answer.json()["items"])


@contextlib.asynccontextmanager
async def running(station: Station, **overrides: Any) -> AsyncIterator[Counter]:
    overrides.setdefault("pos_hq_timeout_s", 1.0)
    overrides.setdefault("pos_payment_wait_s", 3.0)
    overrides.setdefault("pos_upload_backoff_initial_s", 0.05)
    overrides.setdefault("pos_upload_backoff_max_s", 0.3)
    node = station.node(**overrides)
    await node.start()
    transport = httpx.ASGITransport(app=node.app)
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://edge", timeout=30
        ) as api:
            yield Counter(station, node, api)
    finally:
        await node.stop()


@pytest.fixture
async def counter(station: Station) -> AsyncIterator[Counter]:
    async with running(station) as found:
        yield found


def envelope(answer: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    error: dict[str, Any] = answer.json()["error"]
    assert error["code"] == code, error
    return error


def _claims(clock: SimulatedClock, **changes: Any) -> dict[str, Any]:
    now = int(clock.now().timestamp())
    claims = {
        "iss": "forecourt",
        "aud": "forecourt",
        "sub": "mallory",
        "kind": "user",
        "grants": [list(CASHIER)],
        "iat": now,
        "exp": now + 3600,
        "jti": str(uuid.uuid4()),
    }
    claims.update(changes)
    return claims


# --- who may take payments --------------------------------------------------------------------


async def test_without_a_token_or_with_an_expired_or_forged_one_a_cashier_is_401(
    counter: Counter, clock: SimulatedClock
) -> None:
    headers = await counter.cashier()
    sale = await counter.a_sale(headers)
    path = f"/v1/pos/sales/{sale['sale_id']}"
    kid, key = await counter.hq.office.identity.keys.signing_key()
    expired = jwt.encode(
        _claims(
            clock, iat=int(clock.now().timestamp()) - 7200, exp=int(clock.now().timestamp()) - 60
        ),
        key,
        algorithm="EdDSA",
        headers={"kid": kid},
    )
    forged = jwt.encode(
        _claims(clock), Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": kid}
    )
    unknown_kid = jwt.encode(
        _claims(clock), Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": "nope"}
    )
    hs256 = jwt.encode(_claims(clock), "s" * 32, algorithm="HS256", headers={"kid": kid})
    envelope(await counter.api.get(path), 401, "auth.terminal_credential")
    cases = [
        (expired, "auth.token_expired"),
        (forged, "auth.invalid_token"),
        (unknown_kid, "auth.invalid_token"),
        (hs256, "auth.invalid_token"),
    ]
    for token, code in cases:
        bearer = {"authorization": f"Bearer {token}"}
        envelope(await counter.api.get(path, headers=bearer), 401, code)
        answer = await counter.pay(
            sale["sale_id"], {"method": "cash", "tendered_fen": 10**6}, bearer
        )
        envelope(answer, 401, code)
    # Nothing was paid, and every refusal is in the edge's audit trail.
    assert (await counter.api.get(path, headers=headers)).json()["payment_status"] == "unpaid"
    assert len(counter.audits("pos.refused")) == 1 + 2 * len(cases)


async def test_a_cashier_of_another_station_or_a_terminal_is_403_and_audited(
    counter: Counter,
) -> None:
    headers = await counter.cashier()
    sale = await counter.a_sale(headers)
    elsewhere = await counter.cashier(("cashier", "station:S002"))
    reader = await counter.cashier(("region_manager", "chain"))  # reads, never charges
    terminal = {"authorization": "Bearer edge-tests-reader-secret"}
    body = {"method": "cash", "tendered_fen": sale["amount_fen"]}
    error = envelope(await counter.pay(sale["sale_id"], body, elsewhere), 403, "auth.out_of_scope")
    assert error["details"]["station"] == "S001"
    envelope(await counter.pay(sale["sale_id"], body, reader), 403, "auth.forbidden")
    envelope(await counter.pay(sale["sale_id"], body, terminal), 403, "auth.wrong_principal")
    envelope(await counter.api.get("/v1/pos/sales", headers=elsewhere), 403, "auth.out_of_scope")
    refused = counter.audits("pos.refused")
    assert [r["details"]["refused"] for r in refused] == [
        "auth.out_of_scope",
        "auth.forbidden",
        "auth.wrong_principal",
        "auth.out_of_scope",
    ]
    assert refused[0]["actor"].startswith("user:")
    assert (await counter.api.get(f"/v1/pos/sales/{sale['sale_id']}", headers=headers)).json()[
        "payment_status"
    ] == "unpaid"


async def test_terminal_tokens_still_command_and_read_the_existing_routes(
    counter: Counter,
) -> None:
    staff = await counter.cashier()
    answer = await counter.api.get(
        "/v1/status", headers={"authorization": "Bearer edge-tests-reader-secret"}
    )
    assert answer.status_code == 200, answer.text
    envelope(await counter.api.get("/v1/status", headers=staff), 403, "auth.wrong_principal")


# --- which sale ---------------------------------------------------------------------------------


async def test_an_unknown_sale_is_404_and_a_paid_one_409(counter: Counter) -> None:
    headers = await counter.cashier()
    unknown = str(uuid.uuid4())
    envelope(
        await counter.api.get(f"/v1/pos/sales/{unknown}", headers=headers), 404, "pos.sale_unknown"
    )
    cash = {"method": "cash", "tendered_fen": 10**7}
    envelope(await counter.pay(unknown, cash, headers), 404, "pos.sale_unknown")
    sale = await counter.a_sale(headers)
    envelope(
        await counter.pay(
            sale["sale_id"], {"method": "cash", "tendered_fen": sale["amount_fen"] - 1}, headers
        ),
        422,
        "pos.tender_short",
    )
    paid = await counter.pay(sale["sale_id"], cash, headers)
    assert paid.status_code == 200, paid.text
    assert paid.json()["change_fen"] == 10**7 - sale["amount_fen"]
    envelope(await counter.pay(sale["sale_id"], cash, headers), 409, "pos.sale_paid")
    code = {"method": "code", "auth_code": "134567890123459999"}
    envelope(await counter.pay(sale["sale_id"], code, headers), 409, "pos.sale_paid")
    unpaid = (await counter.api.get("/v1/pos/sales?unpaid=true", headers=headers)).json()
    assert sale["sale_id"] not in {s["sale_id"] for s in unpaid}
    # The amount is the journal's: the cashier cannot give one.
    extra = {"method": "cash", "tendered_fen": 10**7, "amount_fen": 1}
    envelope(await counter.pay(sale["sale_id"], extra, headers), 422, "request.invalid")


async def test_the_unpaid_sales_of_one_pump_are_listed(counter: Counter) -> None:
    headers = await counter.cashier()
    sale = await counter.a_sale(headers)
    answer = await counter.api.get(
        f"/v1/pos/sales?unpaid=true&pump={sale['pump']}", headers=headers
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()
    assert {s["pump"] for s in answer.json()} == {sale["pump"]}
    assert all(s["payment_status"] == "unpaid" for s in answer.json())


# --- HQ away ------------------------------------------------------------------------------------


async def test_cash_while_hq_is_down_is_recorded_and_uploaded_exactly_once_when_it_is_back(
    counter: Counter,
) -> None:
    headers = await counter.cashier()
    sale = await counter.a_sale(headers)
    store = counter.node.app.state.pos.store

    async def at_hq() -> bool:
        return await store.upload_state(sale["sale_id"]) == "sent"

    await eventually(at_hq, 20, what="the sale at HQ")
    await counter.hq.down()
    started = time.monotonic()
    answer = await counter.pay(sale["sale_id"], {"method": "cash", "tendered_fen": 10**6}, headers)
    assert time.monotonic() - started < 1.0
    assert answer.status_code == 200, answer.text
    payment = answer.json()["payment"]
    assert payment["status"] == "paid"
    assert payment["uploaded_at"] is None
    assert payment["idempotency_key"] == idempotency_key(sale["sale_id"], 1)
    uploader = counter.node.cash_upload
    assert uploader is not None
    await eventually(lambda: uploader.stats.failures >= 2, 20, what="failed uploads")
    assert await store.cash_usage() == (1, 0)
    await counter.hq.up()

    async def uploaded() -> bool:
        found = await counter.api.get(f"/v1/pos/sales/{sale['sale_id']}", headers=headers)
        return found.json()["attempts"][0]["uploaded_at"] is not None

    await eventually(uploaded, 30, interval=0.05, what="the cash at HQ")
    orders = await counter.hq_orders(sale["sale_id"])
    assert [(o["tender"], o["state"], o["amount_fen"]) for o in orders] == [
        ("cash", "paid", sale["amount_fen"])
    ]
    assert uploader.stats.uploaded == 1
    assert uploader.stats.duplicates == 0
    # Nothing is sent again: the uploader is idle, HQ still holds one order.
    assert await store.pending_cash(10) == []
    assert await store.cash_usage() == (0, 0)
    assert len(await counter.hq_orders(sale["sale_id"])) == 1


async def test_a_code_payment_while_hq_is_down_is_503_at_once_and_a_retry_reuses_its_key(
    counter: Counter,
) -> None:
    headers = await counter.cashier()
    sale = await counter.a_sale(headers)
    await counter.hq.down()
    body = {"method": "code", "auth_code": "134567890123459999"}
    for _ in range(2):
        started = time.monotonic()
        error = envelope(
            await counter.pay(sale["sale_id"], body, headers), 503, "pos.hq_unreachable"
        )
        assert time.monotonic() - started < 1.5
        assert "cash" in error["details"]["hint"]
    view = (await counter.api.get(f"/v1/pos/sales/{sale['sale_id']}", headers=headers)).json()
    assert [(a["attempt"], a["status"], a["idempotency_key"]) for a in view["attempts"]] == [
        (1, "unsent", idempotency_key(sale["sale_id"], 1))
    ]
    assert view["payment_status"] == "in_progress"
    # The code never reached HQ: cash is taken instead, the code attempt abandoned.
    cash = await counter.pay(sale["sale_id"], {"method": "cash", "tendered_fen": 10**6}, headers)
    assert cash.status_code == 200, cash.text
    attempts = cash.json()["sale"]["attempts"]
    assert [(a["attempt"], a["method"], a["status"]) for a in attempts] == [
        (1, "code", "abandoned"),
        (2, "cash", "paid"),
    ]


async def test_hq_staff_keys_are_cached_so_a_restarted_edge_checks_tokens_without_hq(
    station: Station,
) -> None:
    async with running(station) as counter:
        headers = await counter.cashier()
        keys = counter.node.staff_keys
        assert keys is not None
        await eventually(lambda: keys.source == "hq", 10, what="HQ's keys")
        sale = await counter.a_sale(headers)
    await station.hq.down()
    async with running(station) as again:
        keys = again.node.staff_keys
        assert keys is not None
        assert keys.source == "cache"
        assert keys.kids
        answer = await again.api.get(f"/v1/pos/sales/{sale['sale_id']}", headers=headers)
        assert answer.status_code == 200, answer.text
        paid = await again.pay(sale["sale_id"], {"method": "cash", "tendered_fen": 10**6}, headers)
        assert paid.status_code == 200, paid.text
        forged = jwt.encode(
            _claims(station.clock),
            Ed25519PrivateKey.generate(),
            algorithm="EdDSA",
            headers={"kid": keys.kids[0]},
        )
        bearer = {"authorization": f"Bearer {forged}"}
        envelope(await again.api.get("/v1/pos/sales", headers=bearer), 401, "auth.invalid_token")
    await station.hq.up()


async def test_the_pos_routes_are_documented_with_every_answer(counter: Counter) -> None:
    spec = (await counter.api.get("/openapi.json")).json()
    pay = spec["paths"]["/v1/pos/sales/{sale_id}/pay"]["post"]
    assert {"200", "202", "401", "402", "403", "404", "409", "422", "503"} <= set(pay["responses"])
    assert {"401", "403", "404"} <= set(
        spec["paths"]["/v1/pos/sales/{sale_id}"]["get"]["responses"]
    )
    assert {"401", "403"} <= set(spec["paths"]["/v1/pos/sales"]["get"]["responses"])


async def test_a_sale_the_pump_still_holds_is_closed_at_the_pump_once_paid(
    station: Station,
) -> None:
    async with running(station, auto_settle=False) as counter:
        headers = await counter.cashier()
        sale = await counter.a_sale(headers)
        controllers = counter.node.controllers
        assert any(
            held.sale_id == sale["sale_id"] for c in controllers for held in c._open.values()
        )
        answer = await counter.pay(
            sale["sale_id"], {"method": "cash", "tendered_fen": sale["amount_fen"]}, headers
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["pump_released"] is True
        settled = await counter.node.journal.sale(sale["sale_id"])
        assert settled is not None
        assert settled["settled_at"] is not None
        assert [a["details"]["sale_id"] for a in counter.audits("pos.payment")] == [sale["sale_id"]]


async def test_two_payments_of_one_sale_at_once_take_it_once(counter: Counter) -> None:
    headers = await counter.cashier()
    sale = await counter.a_sale(headers)
    body = {"method": "cash", "tendered_fen": sale["amount_fen"]}
    answers = await asyncio.gather(*(counter.pay(sale["sale_id"], body, headers) for _ in range(3)))
    assert sorted(a.status_code for a in answers) == [200, 409, 409]
