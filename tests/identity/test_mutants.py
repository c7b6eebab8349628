"""What the mutation pass over identity found unguarded: the ``iat`` clock skew, a retired
key in another process, a live refresh token of a disabled account, a rotated token's
lifetime, the lockout count and its end, rehashing a client secret, locked-account attempts
counted per source, roles a service account may hold, disabling revoking every token,
grants over two stations of one role, the minimum password length. On SQLite (the store's
SQL on both databases)."""

from __future__ import annotations

import json
from typing import Any

import jwt
import pytest

from forecourt.identity.domain import (
    AccountDisabled,
    AccountLocked,
    InvalidCredentials,
    InvalidToken,
    ScopeNotAllowed,
    TokenExpired,
    TooManyFailures,
    WeakPassword,
    check_password,
)
from forecourt.identity.handlers import IdentityService
from forecourt.identity.store import hash_token, reading, writing
from forecourt.infra.db import Database
from forecourt.kernel.access import Scope
from tests.identity.conftest import (
    PASSWORD,
    audit_rows,
    clock_of,
    open_db,
    service_on,
    user_with,
)


@pytest.fixture
def identity(sqlite_db: Database) -> IdentityService:
    return service_on(sqlite_db)


def _claims(now: int, **changes: Any) -> dict[str, Any]:
    return {
        "iss": "forecourt",
        "aud": "forecourt",
        "sub": "mallory",
        "kind": "user",
        "grants": [["hq_admin", "chain"]],
        "iat": now,
        "exp": now + 300,
        "jti": "x",
        **changes,
    }


# --- access tokens --------------------------------------------------------------------------


async def test_an_iat_ahead_by_more_than_the_clock_skew_is_refused(
    sqlite_db: Database, identity: IdentityService
) -> None:
    kid, key = await identity.keys.signing_key()
    now = int(clock_of(sqlite_db).now().timestamp())

    def token(iat: int) -> str:
        claims = _claims(now, iat=iat, exp=now + 3600)
        return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": kid})

    # Within the skew (another HQ process's clock a little ahead): taken
    assert (await identity.verifier.verify(token(now + 30))).subject == "mallory"
    # Past it, by a second or by an hour: refused
    for ahead in (31, 3600):
        with pytest.raises(InvalidToken) as refused:
            await identity.verifier.verify(token(now + ahead))
        assert "future" in refused.value.message


async def test_a_retired_key_stops_verifying_in_another_process_once_its_cache_is_old(
    sqlite_db: Database, identity: IdentityService
) -> None:
    second_db = await open_db(sqlite_db.url, clock_of(sqlite_db))
    try:
        second = service_on(second_db)
        await user_with(identity, "alice", ("finance", "chain"))
        old = await identity.sign_in("alice", PASSWORD, source=None)
        # The second process knows the key (it verified a token of it)
        assert (await second.verifier.verify(old.access_token)).subject == "alice"
        # When the first process rotates and retires it
        await identity.rotate_signing_key(actor="cli")
        clock_of(sqlite_db).advance(60)
        assert len(await identity.retire_keys(clock_of(sqlite_db).now(), actor="cli")) == 1
        # Then once the second's key cache is older than its limit, it refuses the token too
        second.keys.max_age_s = 0.0
        with pytest.raises(InvalidToken):
            await second.verifier.verify(old.access_token)
    finally:
        await second_db.dispose()


# --- refresh tokens -------------------------------------------------------------------------


async def test_a_live_refresh_token_of_a_disabled_account_is_refused_and_its_family_ended(
    sqlite_db: Database, identity: IdentityService
) -> None:
    # Given a refresh token still live when its account is disabled (a sign-in that raced
    # the disabling wrote it after the disable's revocation)
    await user_with(identity, "alice", ("finance", "chain"))
    pair = await identity.sign_in("alice", PASSWORD, source=None)
    async with writing(sqlite_db) as (_, store):
        user = await store.user_by_name("alice")
        assert user is not None
        assert await store.disable(user.id, clock_of(sqlite_db).now())
    # When it is presented, it is refused for the disabled account
    with pytest.raises(AccountDisabled):
        await identity.refresh(pair.refresh_token, source=None)
    # And its family is ended
    async with reading(sqlite_db) as store:
        row = await store.refresh_token(hash_token(pair.refresh_token))
    assert row is not None
    assert row.revoked_at is not None


async def test_a_rotated_refresh_token_lives_the_refresh_lifetime_from_its_rotation(
    sqlite_db: Database, identity: IdentityService
) -> None:
    await user_with(identity, "alice")
    first = await identity.sign_in("alice", PASSWORD, source=None)
    clock_of(sqlite_db).advance(3600)
    second = await identity.refresh(first.refresh_token, source=None)
    assert second.refresh_expires_in == 12 * 3600
    # Twelve hours after the rotation (thirteen after the sign-in) it has expired
    clock_of(sqlite_db).advance(12 * 3600)
    with pytest.raises(TokenExpired):
        await identity.refresh(second.refresh_token, source=None)


async def test_disabling_revokes_every_refresh_token_of_the_account(
    db: Database,
) -> None:
    identity = service_on(db)
    await user_with(identity, "alice")
    one = await identity.sign_in("alice", PASSWORD, source=None)
    await identity.refresh(one.refresh_token, source=None)  # one used, one live
    two = await identity.sign_in("alice", PASSWORD, source=None)  # another family
    await identity.disable("alice", actor="user:admin")
    (disabled,) = await audit_rows(db, "identity.user.disable")
    assert json.loads(disabled.details)["refresh_tokens_revoked"] == 3
    async with reading(db) as store:
        for token in (one.refresh_token, two.refresh_token):
            row = await store.refresh_token(hash_token(token))
            assert row is not None
            assert row.revoked_at is not None


# --- sign-in and lockout --------------------------------------------------------------------


async def _lock(identity: IdentityService, username: str) -> None:
    for n in range(3):  # lockout_failures
        with pytest.raises(InvalidCredentials):
            await identity.sign_in(username, "not the password", source=f"10.0.0.{n}")


async def test_a_lock_ends_at_its_instant(sqlite_db: Database, identity: IdentityService) -> None:
    await user_with(identity, "alice")
    await _lock(identity, "alice")
    clock_of(sqlite_db).advance(600)  # lockout_s, exactly
    assert (await identity.sign_in("alice", PASSWORD, source=None)).access_token


async def test_after_a_lockout_the_failure_count_starts_again(
    sqlite_db: Database, identity: IdentityService
) -> None:
    await user_with(identity, "alice")
    await _lock(identity, "alice")
    clock_of(sqlite_db).advance(601)
    # Two failures after the lock are two, not five: no new lock
    for _ in range(2):
        with pytest.raises(InvalidCredentials):
            await identity.sign_in("alice", "not the password", source=None)
    assert (await identity.get_user("alice")).locked_until is None
    assert (await identity.sign_in("alice", PASSWORD, source=None)).access_token


async def test_tries_on_a_locked_account_count_against_their_source(
    sqlite_db: Database,
) -> None:
    identity = service_on(sqlite_db, failures_per_minute=4)
    await user_with(identity, "alice")
    await user_with(identity, "bob")
    await _lock(identity, "alice")  # from three other sources
    for _ in range(4):
        with pytest.raises(AccountLocked):
            await identity.sign_in("alice", PASSWORD, source="203.0.113.9")
    # That source is now held back, whichever account it tries next
    with pytest.raises(TooManyFailures):
        await identity.sign_in("bob", PASSWORD, source="203.0.113.9")
    assert (await identity.sign_in("bob", PASSWORD, source="198.51.100.1")).access_token


async def test_a_client_secret_hashed_with_other_parameters_is_replaced(
    sqlite_db: Database, identity: IdentityService
) -> None:
    _, secret = await identity.create_service_account(
        "prom", grants=[("metrics_scraper", Scope.chain())], actor="cli"
    )
    dearer = service_on(sqlite_db, argon2_time_cost=2, argon2_memory_kib=16)
    assert (await dearer.client_credentials("prom", secret, source=None)).access_token
    async with reading(sqlite_db) as store:
        row = await store.user_by_name("prom")
    assert row is not None
    assert "m=16,t=2" in row.password_hash
    assert (await dearer.client_credentials("prom", secret, source=None)).access_token


# --- accounts and grants --------------------------------------------------------------------


async def test_a_service_account_is_never_granted_a_staff_role_nor_a_user_a_service_one(
    identity: IdentityService,
) -> None:
    await identity.create_service_account("bi-export", grants=[], actor="cli")
    for role, scope in (("hq_admin", Scope.chain()), ("cashier", Scope.station("S001"))):
        with pytest.raises(ScopeNotAllowed):
            await identity.grant("bi-export", role, scope, actor="cli")
    await user_with(identity, "alice")
    with pytest.raises(ScopeNotAllowed):
        await identity.grant("alice", "metrics_scraper", Scope.chain(), actor="cli")
    assert (await identity.get_user("bi-export")).grants == ()
    assert (await identity.get_user("alice")).grants == ()


async def test_one_role_over_two_stations_is_two_grants_granted_and_revoked_apart(
    db: Database,
) -> None:
    identity = service_on(db)
    await user_with(identity, "alice", ("cashier", "station:S001"))
    view = await identity.grant("alice", "cashier", Scope.station("S002"), actor="cli")
    assert set(view.grants) == {("cashier", "station:S001"), ("cashier", "station:S002")}
    view = await identity.revoke("alice", "cashier", Scope.station("S001"), actor="cli")
    assert view.grants == (("cashier", "station:S002"),)
    principal = await identity.verifier.verify(
        (await identity.sign_in("alice", PASSWORD, source=None)).access_token
    )
    assert principal.allows("pumps:command", station="S002")
    assert not principal.allows("pumps:command", station="S001")


def test_a_password_one_short_of_the_minimum_is_refused() -> None:
    with pytest.raises(WeakPassword):
        check_password("abcdefghijk", 12)  # 11
    check_password("abcdefghijkl", 12)  # 12
