"""Station credentials done right: a bounded cache keyed by the credential's hash, unknown
credentials never cached and unable to flush the real ones, failures limited per source (429
with Retry-After), rotation with a grace period, revocation seen at once by every HQ
process, expiry. On SQLite and PostgreSQL (``db_url``); the CLI on SQLite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from forecourt.bootstrap import HeadOffice, build_head_office
from forecourt.infra.db import Database
from forecourt.network.contracts import StationIdentity
from forecourt.network.domain import TooManyFailures, UnknownCredential
from forecourt.network.handlers import (
    SAMPLE_CHAIN,
    DbStationDirectory,
    import_chain,
    issue_credential,
    list_credentials,
    load_chain_file,
    revoke_credentials,
    rotate_credential,
)
from forecourt.network.store import hash_secret
from forecourt.settings import Settings
from tests.support import ManualClock, eventually

NOW = datetime(2026, 6, 1, 4, 0, tzinfo=UTC)
S001 = StationIdentity(code="S001", region="EAST")
FOREVER = 3600.0  # a cache lifetime no test outlives: only a change may empty the cache


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    """A migrated HQ database holding the sample chain, on a hand-moved clock."""
    hq = build_head_office(Settings(database_url=db_url, log_json=False), clock=ManualClock(NOW))
    await hq.start(relay=False)
    try:
        await import_chain(hq.db, load_chain_file(SAMPLE_CHAIN))
        yield hq.db
    finally:
        await hq.stop()


@pytest.fixture
async def directory(db: Database) -> AsyncIterator[DbStationDirectory]:
    found = DbStationDirectory(db, credential_ttl_s=FOREVER, cache_size=4, failures_per_minute=5)
    try:
        yield found
    finally:
        await found.close()


async def cached(directory: DbStationDirectory, token: str) -> bool:
    """The directory trusts ``token`` (it may now answer it from its cache)."""
    return await directory.authenticate(token) == S001 and directory.cache_trusted


def clock_of(db: Database) -> ManualClock:
    clock = db.clock
    assert isinstance(clock, ManualClock)
    return clock


async def test_the_cache_holds_hashes_never_a_credential_and_answers_without_the_database(
    db: Database, directory: DbStationDirectory
) -> None:
    _, token = await issue_credential(db, "S001")
    # When the station authenticates twice (the listener on PostgreSQL up in between)
    assert await directory.authenticate(token, "10.0.0.1") == S001
    await eventually(lambda: directory.cache_trusted, 10, what="the cache trusted")
    assert await directory.authenticate(token, "10.0.0.1") == S001
    lookups = directory.lookups
    assert await directory.authenticate(token, "10.0.0.1") == S001
    # Then the second answer came from the cache, keyed by the credential's hash
    assert directory.lookups == lookups
    assert list(directory._auth) == [hash_secret(token)]
    assert token not in repr(dict(directory._auth))


async def test_unknown_credentials_are_never_cached_and_cannot_flush_the_real_ones(
    db: Database, directory: DbStationDirectory
) -> None:
    # Given a real credential in a cache of four entries
    _, token = await issue_credential(db, "S001")
    await directory.authenticate(token)
    await eventually(lambda: directory.cache_trusted, 10, what="the cache trusted")
    await directory.authenticate(token)
    # When a hundred random tokens come, each from its own address (no limit reached)
    for n in range(100):
        assert await directory.authenticate(f"random-{n:04d}-xxxxxxxxxxxx", f"10.1.0.{n}") is None
    # Then none was cached and the real one is still answered from the cache
    assert list(directory._auth) == [hash_secret(token)]
    lookups = directory.lookups
    assert await directory.authenticate(token) == S001
    assert directory.lookups == lookups


async def test_failures_from_one_source_are_limited_and_the_others_are_not(
    db: Database, directory: DbStationDirectory
) -> None:
    _, token = await issue_credential(db, "S001")
    # Given five failed credentials from one address (the limit)
    for n in range(5):
        assert await directory.authenticate(f"guess-{n}", "203.0.113.9") is None
    # When it tries again, even with the right credential
    with pytest.raises(TooManyFailures) as refused:
        await directory.authenticate(token, "203.0.113.9")
    # Then it is refused for now, saying when to retry
    assert refused.value.http_status == 429
    assert 0 < refused.value.details["retry_after_s"] <= 60
    # And another address is not affected
    assert await directory.authenticate(token, "198.51.100.1") == S001


async def test_a_rotation_keeps_the_old_credential_for_the_grace_period_only(
    db: Database, directory: DbStationDirectory
) -> None:
    # Given a station with a credential in use
    old_key, old = await issue_credential(db, "S001")
    assert await directory.authenticate(old) == S001
    # When it is rotated with a grace period of one hour
    rotated = await rotate_credential(db, "S001", grace=timedelta(hours=1))
    # Then both work during the grace period
    assert rotated.old_keys == [old_key]
    assert rotated.old_valid_until == NOW + timedelta(hours=1)
    assert await directory.authenticate(old) == S001
    assert await directory.authenticate(rotated.token) == S001
    # And once it is over only the new one does, cache or not
    clock_of(db).advance(timedelta(hours=1))
    assert await directory.authenticate(old) is None
    assert await directory.authenticate(rotated.token) == S001
    listed = {c["key_id"]: c["valid"] for c in await list_credentials(db, "S001")}
    assert listed == {old_key: False, rotated.key_id: True}


async def test_a_credential_issued_with_an_expiry_ends_then(
    db: Database, directory: DbStationDirectory
) -> None:
    _, token = await issue_credential(db, "S001", valid_for=timedelta(days=30))
    assert await directory.authenticate(token) == S001
    clock_of(db).advance(timedelta(days=30) - timedelta(seconds=1))
    assert await directory.authenticate(token) == S001
    clock_of(db).advance(timedelta(seconds=1))
    assert await directory.authenticate(token) is None


async def test_a_revocation_is_seen_at_once_by_another_hq_process_whatever_its_cache(
    db: Database, db_url: str
) -> None:
    # Given a second HQ process (its own database pool and directory) that trusts the
    # station's credential from its cache, with a cache lifetime no test outlives
    _, token = await issue_credential(db, "S001")
    other_db = Database(db_url, clock=db.clock)
    await other_db.connect()
    other = DbStationDirectory(other_db, credential_ttl_s=FOREVER)
    try:
        await eventually(lambda: cached(other, token), 10, what="the other process trusting it")
        lookups = other.lookups
        assert await other.authenticate(token) == S001
        assert other.lookups == lookups  # from its cache
        # When the station's credentials are revoked here
        assert len(await revoke_credentials(db, "S001")) == 1
        # Then the other process refuses it at once (NOTIFY on PostgreSQL, the revision on
        # SQLite), long before its cache would have expired
        await eventually(
            lambda: _refused(other, token), 5, what="the revocation seen by the other process"
        )
        assert await other.authenticate(token) is None
    finally:
        await other.close()
        await other_db.dispose()


async def _refused(directory: DbStationDirectory, token: str) -> bool:
    return await directory.authenticate(token) is None


async def test_revoking_one_key_leaves_the_others_and_an_unknown_key_is_refused(
    db: Database, directory: DbStationDirectory
) -> None:
    first_key, first = await issue_credential(db, "S001")
    _, second = await issue_credential(db, "S001")
    assert await revoke_credentials(db, "S001", key_id=first_key) == [first_key]
    assert await directory.authenticate(first) is None
    assert await directory.authenticate(second) == S001
    with pytest.raises(UnknownCredential):
        await revoke_credentials(db, "S001", key_id="no-such-key")


async def test_a_negative_grace_period_is_refused(db: Database) -> None:
    with pytest.raises(Exception, match="grace period cannot be negative"):
        await rotate_credential(db, "S001", grace=timedelta(seconds=-1))


# --- over HTTP ------------------------------------------------------------------------------


async def test_the_upload_api_answers_429_with_retry_after_past_the_failure_limit(
    sqlite_url: str,
) -> None:
    hq: HeadOffice = build_head_office(
        Settings(database_url=sqlite_url, log_json=False, station_auth_failures_per_minute=3)
    )
    await hq.start(relay=False)
    try:
        await import_chain(hq.db, load_chain_file(SAMPLE_CHAIN))
        transport = httpx.ASGITransport(app=hq.app, client=("192.0.2.7", 5555))
        async with httpx.AsyncClient(transport=transport, base_url="http://hq") as client:

            async def snapshot(secret: str) -> httpx.Response:
                return await client.get(
                    "/v1/stations/S001/snapshot", headers={"Authorization": f"Bearer {secret}"}
                )

            statuses = [(await snapshot(f"wrong-{n}")).status_code for n in range(3)]
            assert statuses == [401, 401, 401]
            blocked = await snapshot("wrong-again")
            assert blocked.status_code == 429
            assert blocked.json()["error"]["code"] == "auth.too_many_failures"
            assert 1 <= int(blocked.headers["retry-after"]) <= 60
    finally:
        await hq.stop()


# --- the command line -----------------------------------------------------------------------


def forecourt(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forecourt.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_forecourt_credential_issues_rotates_lists_and_revokes(tmp_path: Path) -> None:
    env = {**os.environ, "FORECOURT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'hq.db'}"}
    assert forecourt("import", "--sample", env=env).returncode == 0
    # The old form still issues one
    issued = json.loads(forecourt("credential", "S001", env=env).stdout)
    assert issued["station"] == "S001"
    assert len(issued["credential"]) >= 40
    rotated = forecourt("credential", "rotate", "S001", "--grace", "30m", env=env)
    assert rotated.returncode == 0, rotated.stderr
    body = json.loads(rotated.stdout)
    assert body["old_keys"] == [issued["key_id"]]
    listed = json.loads(forecourt("credential", "list", "S001", env=env).stdout)
    assert [c["valid"] for c in listed["credentials"]] == [True, True]
    assert issued["credential"] not in json.dumps(listed)  # never a secret
    revoked = json.loads(forecourt("credential", "revoke", "S001", env=env).stdout)
    assert sorted(revoked["revoked"]) == sorted([issued["key_id"], body["key_id"]])
    listed = json.loads(forecourt("credential", "list", "S001", env=env).stdout)
    assert [c["valid"] for c in listed["credentials"]] == [False, False]


def test_forecourt_credential_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "FORECOURT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'hq.db'}"}
    assert forecourt("import", "--sample", env=env).returncode == 0
    bad_grace = forecourt("credential", "rotate", "S001", "--grace", "soon", env=env)
    assert bad_grace.returncode == 2
    assert "give a duration such as 90s, 15m, 24h or 7d" in bad_grace.stderr
    unknown = forecourt("credential", "revoke", "S999", env=env)
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("Error: unknown station 'S999'")
    assert "Traceback" not in unknown.stderr + bad_grace.stderr
    no_key = forecourt("credential", "revoke", "S001", "--key", "nope", env=env)
    assert no_key.returncode == 1
    assert "has no credential 'nope'" in no_key.stderr
