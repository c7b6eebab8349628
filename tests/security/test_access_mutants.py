"""What the mutation pass over route access and station credentials found unguarded: the
credential cache's lifetime, its bound, and a second rotation extending the grace of a
credential a first one ended. On SQLite (the rotation's SQL on both databases)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from forecourt.bootstrap import build_head_office
from forecourt.infra.db import Database
from forecourt.network.contracts import StationIdentity
from forecourt.network.handlers import (
    SAMPLE_CHAIN,
    DbStationDirectory,
    import_chain,
    issue_credential,
    list_credentials,
    load_chain_file,
    rotate_credential,
)
from forecourt.settings import Settings
from tests.support import ManualClock

NOW = datetime(2026, 6, 1, 4, 0, tzinfo=UTC)
S001 = StationIdentity(code="S001", region="EAST")


async def _hq_db(url: str) -> AsyncIterator[Database]:
    """A migrated HQ database holding the sample chain, on a hand-moved clock."""
    hq = build_head_office(Settings(database_url=url, log_json=False), clock=ManualClock(NOW))
    await hq.start(relay=False)
    try:
        await import_chain(hq.db, load_chain_file(SAMPLE_CHAIN))
        yield hq.db
    finally:
        await hq.stop()


@pytest.fixture
async def sqlite_hq(sqlite_url: str) -> AsyncIterator[Database]:
    async for db in _hq_db(sqlite_url):
        yield db


@pytest.fixture
async def hq_db(db_url: str) -> AsyncIterator[Database]:
    async for db in _hq_db(db_url):
        yield db


def clock_of(db: Database) -> ManualClock:
    clock = db.clock
    assert isinstance(clock, ManualClock)
    return clock


async def test_a_cached_credential_is_looked_up_again_once_its_cache_lifetime_is_over(
    sqlite_hq: Database,
) -> None:
    _, token = await issue_credential(sqlite_hq, "S001")
    directory = DbStationDirectory(sqlite_hq, credential_ttl_s=0.2)
    try:
        assert await directory.authenticate(token) == S001  # trusted, cached
        lookups = directory.lookups
        await asyncio.sleep(0.3)  # past the lifetime: no change, yet looked up again
        assert await directory.authenticate(token) == S001
        assert directory.lookups == lookups + 1
    finally:
        await directory.close()


async def test_the_credential_cache_holds_at_most_its_size(sqlite_hq: Database) -> None:
    tokens = [(await issue_credential(sqlite_hq, "S001"))[1] for _ in range(6)]
    directory = DbStationDirectory(sqlite_hq, credential_ttl_s=3600.0, cache_size=4)
    try:
        for token in tokens:
            assert await directory.authenticate(token) == S001
        assert len(directory._auth) == 4
        # The least recently used went first; the newest are still answered from the cache
        lookups = directory.lookups
        assert await directory.authenticate(tokens[-1]) == S001
        assert directory.lookups == lookups
    finally:
        await directory.close()


async def test_a_second_rotation_never_extends_the_grace_a_first_one_gave(
    hq_db: Database,
) -> None:
    # Given a credential rotated with an hour's grace, then rotated again with a day's
    first_key, first = await issue_credential(hq_db, "S001")
    one = await rotate_credential(hq_db, "S001", grace=timedelta(hours=1))
    two = await rotate_credential(hq_db, "S001", grace=timedelta(days=1))
    # Then the second ends only the credential the first rotation issued
    assert two.old_keys == [one.key_id]
    directory = DbStationDirectory(hq_db, credential_ttl_s=3600.0)
    try:
        # And an hour on, the first credential has ended as the first rotation said
        clock_of(hq_db).advance(timedelta(hours=1))
        assert await directory.authenticate(first) is None
        assert await directory.authenticate(one.token) == S001
        assert await directory.authenticate(two.token) == S001
        valid = {c["key_id"]: c["valid"] for c in await list_credentials(hq_db, "S001")}
        assert valid == {first_key: False, one.key_id: True, two.key_id: True}
    finally:
        await directory.close()
