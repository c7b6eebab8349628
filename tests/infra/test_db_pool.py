"""The PostgreSQL pool hands out live connections without a ping per checkout.

A connection idle past ``IDLE_BEFORE_PING_S`` is pinged first, so the first request after
an outage does not fail on a dead pooled connection; one used a moment ago is not (a ping
is three round trips on asyncpg). A connection that breaks while in the idle window fails
one request, and the pool replaces it. Proven through a fault proxy that resets connections.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from forecourt.chaos.proxy import FaultProxy
from forecourt.infra.db import IDLE_BEFORE_PING_S, Database


@pytest.fixture
async def through_proxy(pg_url: str) -> AsyncIterator[tuple[Database, FaultProxy, list[bool]]]:
    url = make_url(pg_url)
    proxy = FaultProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    db = Database(url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False))
    await db.connect()
    pings: list[bool] = []  # one entry per ping: did it find the connection alive?
    dialect = db.engine.dialect
    real_ping = dialect.do_ping

    def counting_ping(dbapi_connection: Any) -> bool:
        try:
            real_ping(dbapi_connection)
        except Exception:
            pings.append(False)
            raise
        pings.append(True)
        return True

    dialect.do_ping = counting_ping  # type: ignore[method-assign]
    try:
        yield db, proxy, pings
    finally:
        await db.dispose()
        await proxy.stop()


async def _query(db: Database) -> int:
    async with db.connection() as conn:
        return int(await conn.scalar(sa.text("SELECT 1")) or 0)


async def _outage(proxy: FaultProxy) -> None:
    """Every live connection reset; new ones served again right after."""
    proxy.cut()
    await asyncio.sleep(0.05)
    proxy.pass_through()


async def test_a_connection_used_a_moment_ago_is_handed_out_without_a_ping(
    through_proxy: tuple[Database, FaultProxy, list[bool]],
) -> None:
    db, _proxy, pings = through_proxy
    for _ in range(20):
        assert await _query(db) == 1
    assert pings == []


async def test_a_pooled_connection_idle_through_an_outage_is_replaced_before_use(
    through_proxy: tuple[Database, FaultProxy, list[bool]],
) -> None:
    db, proxy, pings = through_proxy
    assert await _query(db) == 1
    await _outage(proxy)
    await asyncio.sleep(IDLE_BEFORE_PING_S + 0.1)  # the pooled connection's idle time
    # The first query after the outage succeeds: the ping found the connection dead and
    # the pool handed out a new one.
    assert await _query(db) == 1
    assert pings == [False]
    await asyncio.sleep(IDLE_BEFORE_PING_S + 0.1)
    assert await _query(db) == 1
    assert pings == [False, True]  # idle again: pinged again, alive this time


async def test_a_connection_broken_in_the_idle_window_fails_one_request_only(
    through_proxy: tuple[Database, FaultProxy, list[bool]],
) -> None:
    db, proxy, pings = through_proxy
    assert await _query(db) == 1
    await _outage(proxy)
    # Handed out unpinged (used a moment ago): this query meets the reset …
    with pytest.raises(sa.exc.DBAPIError):
        await _query(db)
    # … and the pool, having seen a disconnect, replaces it: the next one works.
    assert await _query(db) == 1
    assert pings == []
