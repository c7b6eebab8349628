"""Fixtures shared by the infrastructure contract suites: buses of each backend (memory and
NATS JetStream, on a stream of the test's own) and platform databases (SQLite, PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from forecourt.infra.db import Database
from tests.infra.support import Buses, platform_db


@pytest.fixture(params=["memory", "nats"])
def bus_kind(request: pytest.FixtureRequest) -> tuple[str, str | None]:
    if request.param == "nats":
        return "nats", request.getfixturevalue("nats_url")
    return "memory", None


@pytest.fixture
async def buses(bus_kind: tuple[str, str | None], unique_stream: str) -> AsyncIterator[Buses]:
    made = Buses(bus_kind[0], bus_kind[1], unique_stream)
    try:
        yield made
    finally:
        await made.cleanup()


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    async with platform_db(db_url) as database:
        yield database


@pytest.fixture
async def pg_db(pg_url: str) -> AsyncIterator[Database]:
    async with platform_db(pg_url) as database:
        yield database
