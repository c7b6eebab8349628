"""GET /v1/audit/records and /v1/audit/verify: audit:read on every route."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from forecourt.audit.api import build_router
from forecourt.audit.handlers import AuditChainer
from forecourt.infra.access import install_access, route_policy
from forecourt.infra.db import Database
from forecourt.infra.http import install_common
from forecourt.infra.migrate import upgrade
from forecourt.kernel.access import Grant, Permission, Principal, PrincipalKind, Scope
from forecourt.kernel.errors import Unauthorized

PRINCIPALS = {
    "auditor": Principal(
        PrincipalKind.USER,
        "auditor",
        (Grant("auditor", Scope.chain(), frozenset({Permission.AUDIT_READ})),),
    ),
    "cashier": Principal(
        PrincipalKind.USER,
        "cashier",
        (Grant("cashier", Scope.station("S001"), frozenset({Permission.AUDIT_READ})),),
    ),
    "station": Principal(
        PrincipalKind.STATION,
        "S001",
        (Grant("station", Scope.chain(), frozenset({Permission.AUDIT_READ})),),
    ),
}


class Tokens:
    async def principal(self, token: str, source: str | None) -> Principal:
        if token not in PRINCIPALS:
            raise Unauthorized("unknown token", code="auth.invalid_token")
        return PRINCIPALS[token]


@pytest.fixture
async def client(db_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, Database]]:
    db = Database(db_url)
    await db.connect()
    await upgrade(db, ("platform", "audit"))
    for i in range(30):
        async with db.begin() as uow:
            await uow.record_audit(
                actor=f"user:u{i % 3}",
                action="test.even" if i % 2 == 0 else "test.odd",
                target=f"t{i % 5}",
                details={"i": i},
            )
    await AuditChainer(db, checkpoint_every=10).run_once()

    async def ready() -> dict[str, bool]:
        return {"database": True}

    app = FastAPI()
    install_common(app, CollectorRegistry(), ready)
    install_access(app, Tokens())
    app.include_router(build_router(db))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://hq") as http:
        yield http, db
    await db.dispose()


def auth(who: str) -> dict[str, str]:
    return {"authorization": f"Bearer {who}"}


async def test_records_newest_first_filtered_and_paged(
    client: tuple[httpx.AsyncClient, Database],
) -> None:
    http, _ = client
    got = await http.get("/v1/audit/records", headers=auth("auditor"))
    assert got.status_code == 200, got.text
    body = got.json()
    assert [r["seq"] for r in body["items"]] == list(range(30, 0, -1))
    assert body["items"][0]["details"] == {"i": 29}
    assert body["next_before_seq"] is None

    got = await http.get(
        "/v1/audit/records",
        params={"actor": "user:u0", "action": "test.even", "limit": 2},
        headers=auth("auditor"),
    )
    page = got.json()
    assert [r["seq"] for r in page["items"]] == [25, 19]
    got = await http.get(
        "/v1/audit/records",
        params={"actor": "user:u0", "action": "test.even", "before_seq": 19},
        headers=auth("auditor"),
    )
    assert [r["seq"] for r in got.json()["items"]] == [13, 7, 1]

    got = await http.get(
        "/v1/audit/records",
        params={"order": "seq", "after_seq": 20, "target": "t1", "limit": 1},
        headers=auth("auditor"),
    )
    assert [r["seq"] for r in got.json()["items"]] == [22]
    assert got.json()["next_after_seq"] == 22


async def test_verify_route(client: tuple[httpx.AsyncClient, Database]) -> None:
    http, _ = client
    got = await http.get("/v1/audit/verify", headers=auth("auditor"))
    assert got.status_code == 200, got.text
    assert got.json() == {
        "ok": True,
        "records_checked": 30,
        "checkpoints_checked": 1,
        "first_bad_seq": None,
        "problem": None,
        "last_seq": 30,
    }
    got = await http.get("/v1/audit/verify", params={"from_seq": 25}, headers=auth("auditor"))
    assert got.json()["records_checked"] == 6


async def test_every_route_needs_audit_read(client: tuple[httpx.AsyncClient, Database]) -> None:
    http, db = client
    for route in build_router(db).routes:
        policy = route_policy(route)
        assert policy is not None
        path = getattr(route, "path", "")
        if path.startswith("/v1/stations/"):  # a station's own upload (test_station_upload)
            assert policy.permission == Permission.AUDIT_UPLOAD
            assert policy.kinds == {PrincipalKind.STATION}
        else:
            assert policy.permission == Permission.AUDIT_READ
    for path in ("/v1/audit/records", "/v1/audit/verify"):
        assert (await http.get(path)).status_code == 401
        assert (await http.get(path, headers=auth("nobody"))).status_code == 401
        assert (await http.get(path, headers=auth("cashier"))).status_code == 403
        assert (await http.get(path, headers=auth("station"))).status_code == 403
    got = await http.get("/v1/audit/records", params={"limit": 1001}, headers=auth("auditor"))
    assert got.status_code == 422
