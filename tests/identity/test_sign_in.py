"""Signing in: one answer for an unknown user and a wrong password, the lockout and its end,
the per-source limit (before any hashing), rehashing, disabled accounts, and the audit
trail, failures included. On SQLite and PostgreSQL."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from forecourt.identity.domain import (
    AccountDisabled,
    AccountLocked,
    InvalidCredentials,
    TooManyFailures,
    UsernameTaken,
    WeakPassword,
)
from forecourt.identity.handlers import IdentityService
from forecourt.identity.store import reading, user_t
from forecourt.infra.db import Database
from tests.identity.conftest import PASSWORD, audit_rows, clock_of, service_on, user_with


async def test_a_user_signs_in_and_the_token_holds_their_grants(
    db: Database, identity: IdentityService
) -> None:
    await user_with(identity, "alice", ("cashier", "station:S001"))
    pair = await identity.sign_in("alice", PASSWORD, source="10.0.0.1", terminal="till-1")
    assert pair.token_type == "Bearer"
    assert pair.expires_in == 300
    assert pair.refresh_expires_in == 12 * 3600
    principal = await identity.verifier.verify(pair.access_token, "10.0.0.1")
    assert principal.actor == "user:alice"
    assert principal.allows("pumps:command", station="S001")
    assert not principal.allows("pumps:command", station="S002")
    assert not principal.allows("identity:users:manage")
    assert principal.session is not None
    claims = await identity.verifier.claims(pair.access_token)
    assert claims["term"] == "till-1"
    assert claims["grants"] == [["cashier", "station:S001"]]


async def test_a_user_without_grants_signs_in_to_a_token_that_allows_nothing(
    identity: IdentityService,
) -> None:
    await user_with(identity, "bob")
    pair = await identity.sign_in("bob", PASSWORD, source=None)
    principal = await identity.verifier.verify(pair.access_token, None)
    assert principal.grants == ()
    assert not principal.allows("signed-in")


async def test_an_unknown_user_and_a_wrong_password_get_the_same_answer_after_a_hash(
    identity: IdentityService,
) -> None:
    await user_with(identity, "alice")
    answers = []
    for username, password in (("alice", "wrong password!"), ("nobody", PASSWORD)):
        verified = identity.hashes_verified
        with pytest.raises(InvalidCredentials) as refused:
            await identity.sign_in(username, password, source="10.0.0.1")
        assert identity.hashes_verified == verified + 1  # the unknown user is hashed too
        answers.append((refused.value.code, refused.value.message, refused.value.http_status))
    assert (
        answers[0] == answers[1] == ("auth.invalid_credentials", "wrong username or password", 401)
    )


async def test_an_account_locks_after_n_failures_in_a_row_and_unlocks_after_the_period(
    db: Database, identity: IdentityService
) -> None:
    await user_with(identity, "alice")
    # A success in between starts the count again
    for _ in range(2):
        with pytest.raises(InvalidCredentials):
            await identity.sign_in("alice", "not the password", source="10.0.0.1")
    await identity.sign_in("alice", PASSWORD, source="10.0.0.1")
    for _ in range(3):  # lockout_failures
        with pytest.raises(InvalidCredentials):
            await identity.sign_in("alice", "not the password", source="10.0.0.1")
    # Locked: even the right password is refused, before any hashing, saying when to retry
    verified = identity.hashes_verified
    with pytest.raises(AccountLocked) as locked:
        await identity.sign_in("alice", PASSWORD, source="10.0.0.2")
    assert identity.hashes_verified == verified
    assert locked.value.code == "auth.account_locked"
    assert locked.value.http_status == 429
    assert 590 <= locked.value.details["retry_after_s"] <= 600
    assert (await identity.get_user("alice")).locked_until is not None
    # Nearly over: still locked; over: the right password signs in
    clock_of(db).advance(599)
    with pytest.raises(AccountLocked):
        await identity.sign_in("alice", PASSWORD, source="10.0.0.2")
    clock_of(db).advance(2)
    assert (await identity.sign_in("alice", PASSWORD, source="10.0.0.2")).access_token
    assert (await identity.get_user("alice")).locked_until is None


async def test_a_reset_password_unlocks_the_account(
    db: Database, identity: IdentityService
) -> None:
    await user_with(identity, "alice")
    for _ in range(3):
        with pytest.raises(InvalidCredentials):
            await identity.sign_in("alice", "not the password", source=None)
    generated = await identity.reset_password("alice", None, actor="user:admin")
    assert generated is not None
    assert len(generated) >= 12
    assert (await identity.sign_in("alice", generated, source=None)).access_token
    with pytest.raises(InvalidCredentials):
        await identity.sign_in("alice", PASSWORD, source=None)


async def test_failures_from_one_source_are_limited_before_any_hashing(db: Database) -> None:
    identity = service_on(db, failures_per_minute=3, lockout_failures=100)
    await user_with(identity, "alice")
    for n in range(3):
        with pytest.raises(InvalidCredentials):
            await identity.sign_in(f"guess{n}", PASSWORD, source="203.0.113.9")
    verified = identity.hashes_verified
    with pytest.raises(TooManyFailures) as refused:
        await identity.sign_in("alice", PASSWORD, source="203.0.113.9")
    assert identity.hashes_verified == verified  # refused before hashing
    assert refused.value.code == "auth.too_many_failures"
    assert refused.value.http_status == 429
    assert 0 < refused.value.details["retry_after_s"] <= 60
    # Another source is not held back
    assert (await identity.sign_in("alice", PASSWORD, source="198.51.100.1")).access_token


async def test_a_disabled_account_cannot_sign_in(identity: IdentityService) -> None:
    await user_with(identity, "alice", ("finance", "chain"))
    await identity.disable("alice", actor="user:admin")
    with pytest.raises(AccountDisabled) as refused:
        await identity.sign_in("alice", PASSWORD, source=None)
    assert refused.value.code == "auth.account_disabled"
    with pytest.raises(InvalidCredentials):  # a wrong password still says only that
        await identity.sign_in("alice", "not the password", source=None)
    assert (await identity.get_user("alice")).disabled


async def test_a_hash_made_with_other_parameters_is_replaced_at_sign_in(db: Database) -> None:
    cheap = service_on(db)
    await user_with(cheap, "alice")
    dearer = service_on(db, argon2_time_cost=2, argon2_memory_kib=16)
    await dearer.sign_in("alice", PASSWORD, source=None)
    async with reading(db) as store:
        row = await store.user_by_name("alice")
    assert row is not None
    assert "m=16,t=2" in row.password_hash
    assert not dearer.hasher.check_needs_rehash(row.password_hash)
    assert (await dearer.sign_in("alice", PASSWORD, source=None)).access_token


async def test_usernames_are_unique_and_passwords_checked(identity: IdentityService) -> None:
    await user_with(identity, "alice")
    with pytest.raises(UsernameTaken) as taken:
        await identity.create_user("alice", password=PASSWORD, actor="cli")
    assert taken.value.http_status == 409
    assert taken.value.code == "identity.username_taken"
    with pytest.raises(WeakPassword):
        await identity.create_user("carol", password="carol", actor="cli")
    view, generated = await identity.create_user("dave", password=None, actor="cli")
    assert generated is not None
    assert len(generated) >= 24
    assert view.username == "dave"
    assert view.kind == "user"
    assert (await identity.sign_in("dave", generated, source=None)).access_token


async def test_no_hash_is_ever_shown_and_passwords_are_stored_as_argon2id(
    db: Database, identity: IdentityService
) -> None:
    await user_with(identity, "alice", ("auditor", "region:EAST"))
    shown = repr(await identity.list_users()) + repr(await identity.get_user("alice"))
    assert "argon2" not in shown
    assert PASSWORD not in shown
    async with reading(db) as store:
        stored = list(await store.conn.execute(sa.select(user_t.c.password_hash)))
    assert stored[0][0].startswith("$argon2id$")


async def test_sign_ins_and_failures_are_audited_and_a_failure_commits(
    db: Database, identity: IdentityService
) -> None:
    await user_with(identity, "alice")
    await identity.sign_in("alice", PASSWORD, source="10.0.0.1", terminal="till-1")
    with pytest.raises(InvalidCredentials):
        await identity.sign_in("alice", "not the password", source="10.0.0.9")
    with pytest.raises(InvalidCredentials):
        await identity.sign_in("mallory", PASSWORD, source="10.0.0.9")
    (ok,) = await audit_rows(db, "identity.sign_in")
    assert ok.actor == "user:alice"
    assert ok.target == "user:alice"
    assert json.loads(ok.details)["source"] == "10.0.0.1"
    assert json.loads(ok.details)["terminal"] == "till-1"
    failed = await audit_rows(db, "identity.sign_in.failed")
    assert [(r.actor, r.target) for r in failed] == [
        ("anonymous", "user:alice"),
        ("anonymous", "user:mallory"),
    ]
    assert json.loads(failed[0].details) == {
        "source": "10.0.0.9",
        "reason": "wrong secret",
        "failures": 1,
    }
    assert json.loads(failed[1].details)["reason"] == "unknown"
    (created,) = await audit_rows(db, "identity.user.create")
    assert created.actor == "cli"
    assert PASSWORD not in " ".join(str(r.details) for r in await audit_rows(db))
