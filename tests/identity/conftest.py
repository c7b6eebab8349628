"""Fixtures of the identity tests: a migrated HQ database on a hand-moved clock (SQLite and
PostgreSQL), the identity service over it at argon2's cheapest, and an HTTP app of its
routes alone."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from forecourt.identity.api import build_router
from forecourt.identity.handlers import IdentityConfig, IdentityService
from forecourt.infra.access import install_access
from forecourt.infra.db import Database, audit_outbox_table
from forecourt.infra.http import install_common
from forecourt.infra.migrate import upgrade
from forecourt.kernel.access import Principal, Scope
from tests.support import ManualClock

TREES = ("platform", "identity")
CONFIG = IdentityConfig(
    argon2_time_cost=1,
    argon2_memory_kib=8,
    lockout_failures=3,
    lockout_s=600.0,
    failures_per_minute=1000,
    min_password_length=12,
)
PASSWORD = "correct horse battery"


async def open_db(url: str, clock: ManualClock | None = None) -> Database:
    db = Database(url, clock=clock or ManualClock())
    await db.connect()
    await upgrade(db, TREES)
    return db


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = await open_db(db_url)
    try:
        yield database
    finally:
        await database.dispose()


@pytest.fixture
async def sqlite_db(sqlite_url: str) -> AsyncIterator[Database]:
    database = await open_db(sqlite_url)
    try:
        yield database
    finally:
        await database.dispose()


def service_on(db: Database, **changes: Any) -> IdentityService:
    return IdentityService(db, replace(CONFIG, **changes))


@pytest.fixture
def identity(db: Database) -> IdentityService:
    return service_on(db)


def clock_of(db: Database) -> ManualClock:
    clock = db.clock
    assert isinstance(clock, ManualClock)
    return clock


async def user_with(
    identity: IdentityService, username: str, *grants: tuple[str, str], password: str = PASSWORD
) -> None:
    await identity.create_user(username, password=password, actor="cli")
    for role, scope in grants:
        await identity.grant(username, role, Scope.parse(scope), actor="cli")


async def audit_rows(db: Database, action: str | None = None) -> list[sa.Row]:
    a = audit_outbox_table.c
    query = sa.select(audit_outbox_table).order_by(a.id)
    if action is not None:
        query = query.where(a.action == action)
    async with db.connection() as conn:
        return list(await conn.execute(query))


class VerifierAuthenticator:
    """The app's authenticator: every bearer token is the identity context's to verify."""

    def __init__(self, identity: IdentityService) -> None:
        self.identity = identity

    async def principal(self, token: str, source: str | None) -> Principal:
        return await self.identity.verifier.verify(token, source)


def build_app(identity: IdentityService) -> FastAPI:
    async def ready() -> dict[str, bool]:
        return {"database": True}

    app = FastAPI()
    install_common(app, CollectorRegistry(), ready)
    install_access(app, VerifierAuthenticator(identity))
    app.include_router(build_router(identity))
    return app


def client_for(identity: IdentityService, address: str = "192.0.2.10") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=build_app(identity), client=(address, 4321))
    return httpx.AsyncClient(transport=transport, base_url="http://hq")
