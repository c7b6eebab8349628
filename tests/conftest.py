"""Shared fixtures: per-test databases on SQLite and PostgreSQL, NATS, and service checks.

Integration tests need PostgreSQL and NATS JetStream on localhost. Without them they are
skipped with a message saying what is missing; with ``FORECOURT_REQUIRE_SERVICES=1`` (CI)
a missing service fails the test instead.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile(
    os.environ.get("FORECOURT_HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
)

# Staff passwords are hashed with argon2id at its cheapest in the suite (and in the
# processes it starts): the cost is a deployment's setting; what is tested is the logic.
os.environ.setdefault("FORECOURT_IDENTITY_ARGON2_TIME_COST", "1")
os.environ.setdefault("FORECOURT_IDENTITY_ARGON2_MEMORY_KIB", "8")

PG_ADMIN_URL = os.environ.get(
    "FORECOURT_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
NATS_URL = os.environ.get("FORECOURT_TEST_NATS_URL", "nats://127.0.0.1:4222")
REQUIRE_SERVICES = os.environ.get("FORECOURT_REQUIRE_SERVICES") == "1"


def service_missing(what: str) -> None:
    message = (
        f"{what}; integration test skipped (CI sets FORECOURT_REQUIRE_SERVICES=1 to fail instead)"
    )
    if REQUIRE_SERVICES:
        pytest.fail(f"required service unavailable: {message}", pytrace=False)
    pytest.skip(message)


def _port_open(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection(
            (parsed.hostname or "127.0.0.1", parsed.port or default_port), 1.0
        ):
            return True
    except OSError:
        return False


async def _admin_execute(sql: str) -> None:
    import asyncpg

    parsed = urlparse(PG_ADMIN_URL)
    conn = await asyncpg.connect(
        host=parsed.hostname,
        port=parsed.port or 5432,
        user=parsed.username or "postgres",
        database=(parsed.path or "/postgres").lstrip("/"),
    )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _db_url(name: str) -> str:
    parsed = urlparse(PG_ADMIN_URL)
    return parsed._replace(path=f"/{name}").geturl()


@contextlib.asynccontextmanager
async def fresh_pg_database() -> AsyncIterator[str]:
    """A new PostgreSQL database (its URL) for one test, dropped afterwards."""
    if not _port_open(PG_ADMIN_URL, 5432):
        service_missing(f"PostgreSQL not reachable at {PG_ADMIN_URL}")
    name = f"forecourt_t_{uuid.uuid4().hex[:12]}"
    await _admin_execute(f'CREATE DATABASE "{name}"')
    try:
        yield _db_url(name)
    finally:
        await _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with fresh_pg_database() as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'hq.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Both databases: every test using it runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'hq.db'}"
        return
    async with fresh_pg_database() as url:
        yield url


@pytest.fixture
async def nats_url() -> str:
    """A NATS server with JetStream (checked with an account-info call)."""
    if not _port_open(NATS_URL, 4222):
        service_missing(f"NATS not reachable at {NATS_URL}")
    import nats

    try:
        nc = await nats.connect(NATS_URL, connect_timeout=2, allow_reconnect=False)
    except Exception as exc:  # noqa: BLE001
        service_missing(f"NATS at {NATS_URL} refused a connection: {exc}")
    try:
        await nc.jetstream().account_info()
    except Exception as exc:  # noqa: BLE001
        await nc.close()
        service_missing(f"NATS at {NATS_URL} has no JetStream: {exc}")
    await nc.close()
    return NATS_URL


@pytest.fixture
async def unique_stream() -> AsyncIterator[str]:
    """A JetStream stream name of the test's own; the stream is deleted afterwards."""
    name = f"FCT_{uuid.uuid4().hex[:10].upper()}"
    yield name
    if _port_open(NATS_URL, 4222):
        import nats

        try:
            nc = await nats.connect(NATS_URL, connect_timeout=2, allow_reconnect=False)
        except Exception:  # noqa: BLE001 - nothing to clean up without a server
            return
        try:
            await nc.jetstream().delete_stream(name)
        except Exception:  # noqa: BLE001 - the test may not have created it
            pass
        finally:
            await nc.close()
