"""Access tokens and refresh tokens: expiry on HQ's clock; forged, wrong audience or issuer,
unsigned, HMAC-with-the-public-key and unknown-kid tokens refused; refresh rotation, reuse
revoking the family, grants read again; key rotation and a second HQ process."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from forecourt.identity.domain import (
    AccountDisabled,
    InvalidToken,
    RefreshReused,
    TokenExpired,
    TooManyFailures,
)
from forecourt.identity.handlers import IdentityService, looks_like_jwt
from forecourt.identity.store import hash_token, reading
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


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"


async def real_claims(identity: IdentityService, db: Database) -> dict[str, Any]:
    now = int(clock_of(db).now().timestamp())
    return {
        "iss": "forecourt",
        "aud": "forecourt",
        "sub": "mallory",
        "kind": "user",
        "grants": [["hq_admin", "chain"]],
        "iat": now,
        "exp": now + 300,
        "jti": "x",
    }


async def test_an_access_token_expires_on_hqs_clock(
    db: Database, identity: IdentityService
) -> None:
    await user_with(identity, "alice", ("finance", "chain"))
    pair = await identity.sign_in("alice", PASSWORD, source=None)
    clock_of(db).advance(299)
    assert (await identity.verifier.verify(pair.access_token)).subject == "alice"
    clock_of(db).advance(1)
    with pytest.raises(TokenExpired) as expired:
        await identity.verifier.verify(pair.access_token)
    assert expired.value.code == "auth.token_expired"
    assert expired.value.http_status == 401


async def test_tokens_not_made_by_hq_are_refused(db: Database, identity: IdentityService) -> None:
    await user_with(identity, "alice")
    await identity.sign_in("alice", PASSWORD, source=None)  # the first key exists now
    kid, key = await identity.keys.signing_key()
    claims = await real_claims(identity, db)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = unsigned({"alg": "HS256", "typ": "JWT", "kid": kid}, claims)
    hs256 = f"{header}.{b64(hmac.new(public_pem, header.encode(), hashlib.sha256).digest())}"
    other = Ed25519PrivateKey.generate()
    forged = {
        "signed by another key": jwt.encode(claims, other, algorithm="EdDSA", headers={"kid": kid}),
        "wrong audience": jwt.encode(
            {**claims, "aud": "elsewhere"}, key, algorithm="EdDSA", headers={"kid": kid}
        ),
        "wrong issuer": jwt.encode(
            {**claims, "iss": "evil"}, key, algorithm="EdDSA", headers={"kid": kid}
        ),
        "no jti": jwt.encode(
            {k: v for k, v in claims.items() if k != "jti"},
            key,
            algorithm="EdDSA",
            headers={"kid": kid},
        ),
        "alg none": unsigned({"alg": "none", "kid": kid}, claims) + ".",
        "HS256 with the public key as secret": hs256,
        "unknown kid": jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": "nope"}),
        "no kid": jwt.encode(claims, key, algorithm="EdDSA"),
        "a station kind": jwt.encode(
            {**claims, "kind": "station"}, key, algorithm="EdDSA", headers={"kid": kid}
        ),
        "malformed": "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9.c2ln",
        "garbage": "a.b.c",
        "not a jwt": "just-some-credential",
    }
    for what, token in forged.items():
        with pytest.raises(InvalidToken) as refused:
            await identity.verifier.verify(token, "10.9.9.9")
        assert refused.value.code == "auth.invalid_token", what
        assert refused.value.http_status == 401, what
    # The real key with the real claims is taken: what was refused was the forgery
    real = jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": kid})
    assert (await identity.verifier.verify(real)).subject == "mallory"


async def test_failed_tokens_from_one_source_are_limited(sqlite_db: Database) -> None:
    identity = service_on(sqlite_db, failures_per_minute=3)
    await user_with(identity, "alice")
    good = (await identity.sign_in("alice", PASSWORD, source=None)).access_token
    for n in range(3):
        with pytest.raises(InvalidToken):
            await identity.verifier.verify(f"a.b.c{n}", "203.0.113.9")
    with pytest.raises(TooManyFailures) as refused:
        await identity.verifier.verify(good, "203.0.113.9")
    assert 0 < refused.value.details["retry_after_s"] <= 60
    assert (await identity.verifier.verify(good, "198.51.100.1")).subject == "alice"


async def test_made_up_kids_reload_the_keys_at_most_once_a_second(sqlite_db: Database) -> None:
    identity = service_on(sqlite_db)
    await user_with(identity, "alice")
    await identity.sign_in("alice", PASSWORD, source=None)
    _, key = await identity.keys.signing_key()
    claims = await real_claims(identity, sqlite_db)
    reloads = identity.keys.reloads
    for n in range(20):
        token = jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": f"made-up-{n}"})
        with pytest.raises(InvalidToken):
            await identity.verifier.verify(token, f"10.0.0.{n}")
    assert identity.keys.reloads - reloads <= 1


async def test_refresh_rotates_and_a_reused_token_revokes_the_whole_family(
    db: Database, identity: IdentityService
) -> None:
    await user_with(identity, "alice", ("finance", "chain"))
    first = await identity.sign_in("alice", PASSWORD, source="10.0.0.1", terminal="till-1")
    second = await identity.refresh(first.refresh_token, source="10.0.0.1")
    third = await identity.refresh(second.refresh_token, source="10.0.0.1")
    assert len({first.refresh_token, second.refresh_token, third.refresh_token}) == 3
    claims = await identity.verifier.claims(third.access_token)
    assert claims["sub"] == "alice"
    assert claims["term"] == "till-1"
    # Another sign-in is a family of its own
    other = await identity.sign_in("alice", PASSWORD, source="10.0.0.2")
    # When the first token is presented again (a stolen copy)
    with pytest.raises(RefreshReused) as reused:
        await identity.refresh(first.refresh_token, source="10.6.6.6")
    assert reused.value.code == "auth.refresh_reused"
    assert reused.value.http_status == 401
    # Then the newest token of the family is refused too, the other sign-in is not
    with pytest.raises(RefreshReused):
        await identity.refresh(third.refresh_token, source="10.0.0.1")
    assert (await identity.refresh(other.refresh_token, source="10.0.0.2")).access_token
    audits = await audit_rows(db, "identity.refresh.reused")  # the copy, then the newest
    assert [(a.actor, a.target) for a in audits] == [("anonymous", "user:alice")] * 2
    assert json.loads(audits[0].details)["source"] == "10.6.6.6"
    assert json.loads(audits[0].details)["revoked"] == 3  # every token of the family
    # And only hashes of refresh tokens are stored
    async with reading(db) as store:
        assert await store.refresh_token(third.refresh_token) is None
        row = await store.refresh_token(hash_token(third.refresh_token))
    assert row is not None
    assert row.revoked_at is not None


async def test_two_refreshes_racing_with_one_token_give_one_pair(
    db: Database, identity: IdentityService
) -> None:
    await user_with(identity, "alice")
    pair = await identity.sign_in("alice", PASSWORD, source=None)
    outcomes = await asyncio.gather(
        identity.refresh(pair.refresh_token, source=None),
        identity.refresh(pair.refresh_token, source=None),
        return_exceptions=True,
    )
    assert sorted(type(o).__name__ for o in outcomes) == ["RefreshReused", "TokenPair"]


async def test_an_expired_or_unknown_refresh_token_is_refused(
    db: Database, identity: IdentityService
) -> None:
    await user_with(identity, "alice")
    pair = await identity.sign_in("alice", PASSWORD, source=None)
    clock_of(db).advance(12 * 3600)
    with pytest.raises(TokenExpired):
        await identity.refresh(pair.refresh_token, source=None)
    with pytest.raises(InvalidToken):
        await identity.refresh("never-issued", source=None)


async def test_a_refresh_reads_the_grants_again(db: Database, identity: IdentityService) -> None:
    await user_with(identity, "alice", ("finance", "chain"), ("cashier", "station:S001"))
    pair = await identity.sign_in("alice", PASSWORD, source=None)
    before = await identity.verifier.verify(pair.access_token)
    assert before.allows("pumps:command", station="S001")
    await identity.revoke("alice", "cashier", Scope.station("S001"), actor="user:admin")
    await identity.grant("alice", "auditor", Scope.region("EAST"), actor="user:admin")
    after = await identity.verifier.verify(
        (await identity.refresh(pair.refresh_token, source=None)).access_token
    )
    assert not after.allows("pumps:command", station="S001")
    assert after.allows("sales:read")
    assert {(g.role, str(g.scope)) for g in after.grants} == {
        ("finance", "chain"),
        ("auditor", "region:EAST"),
    }


async def test_disabling_or_a_password_reset_ends_every_session(
    db: Database, identity: IdentityService
) -> None:
    await user_with(identity, "alice")
    await user_with(identity, "bob")
    alice = await identity.sign_in("alice", PASSWORD, source=None)
    bob = await identity.sign_in("bob", PASSWORD, source=None)
    await identity.disable("alice", actor="user:admin")
    await identity.reset_password("bob", "another long password", actor="user:admin")
    with pytest.raises((RefreshReused, AccountDisabled)):
        await identity.refresh(alice.refresh_token, source=None)
    with pytest.raises(RefreshReused):
        await identity.refresh(bob.refresh_token, source=None)
    assert [r.actor for r in await audit_rows(db, "identity.user.disable")] == ["user:admin"]
    assert [r.actor for r in await audit_rows(db, "identity.password.reset")] == ["user:admin"]


async def test_sign_out_ends_the_family_and_is_idempotent(
    db: Database, identity: IdentityService
) -> None:
    await user_with(identity, "alice")
    pair = await identity.sign_in("alice", PASSWORD, source=None)
    newer = await identity.refresh(pair.refresh_token, source=None)
    await identity.sign_out(newer.refresh_token)
    await identity.sign_out(newer.refresh_token)
    await identity.sign_out("never-issued")
    with pytest.raises(RefreshReused):
        await identity.refresh(newer.refresh_token, source=None)
    assert len(await audit_rows(db, "identity.sign_out")) == 1


async def test_after_a_key_rotation_old_tokens_verify_and_new_ones_carry_the_new_kid(
    db: Database, identity: IdentityService
) -> None:
    await user_with(identity, "alice", ("finance", "chain"))
    old = await identity.sign_in("alice", PASSWORD, source=None)
    old_kid = jwt.get_unverified_header(old.access_token)["kid"]
    new_kid = await identity.rotate_signing_key(actor="cli")
    assert new_kid != old_kid
    new = await identity.sign_in("alice", PASSWORD, source=None)
    assert jwt.get_unverified_header(new.access_token)["kid"] == new_kid
    assert (await identity.verifier.verify(old.access_token)).subject == "alice"
    assert (await identity.verifier.verify(new.access_token)).subject == "alice"
    jwks = await identity.jwks()
    assert {k["kid"] for k in jwks["keys"]} == {old_kid, new_kid}
    for k in jwks["keys"]:
        assert (k["kty"], k["crv"], k["alg"]) == ("OKP", "Ed25519", "EdDSA")
        assert "d" not in k
    (rotated,) = await audit_rows(db, "identity.key.rotate")
    assert rotated.actor == "cli"
    # Retiring the old key ends its tokens; the newest key is never retired
    clock_of(db).advance(60)
    assert await identity.retire_keys(clock_of(db).now(), actor="cli") == [old_kid]
    with pytest.raises(InvalidToken):
        await identity.verifier.verify(old.access_token)
    assert (await identity.verifier.verify(new.access_token)).subject == "alice"


async def test_a_second_hq_process_verifies_what_the_first_signed(
    db: Database, identity: IdentityService
) -> None:
    second_db = await open_db(db.url, clock_of(db))
    try:
        second = service_on(second_db)
        await user_with(identity, "alice", ("finance", "chain"))
        pair = await identity.sign_in("alice", PASSWORD, source=None)
        assert (await second.verifier.verify(pair.access_token)).subject == "alice"
        # A key the second process has not seen yet is read when a token names it
        second.keys.reload_interval_s = 0
        await identity.rotate_signing_key(actor="cli")
        newer = await identity.sign_in("alice", PASSWORD, source=None)
        assert (await second.verifier.verify(newer.access_token)).subject == "alice"
        # And it signs with the newest key, which the first verifies
        theirs = await second.sign_in("alice", PASSWORD, source=None)
        header = jwt.get_unverified_header(theirs.access_token)
        assert header["kid"] == jwt.get_unverified_header(newer.access_token)["kid"]
        assert (await identity.verifier.verify(theirs.access_token)).subject == "alice"
        assert (await identity.refresh(theirs.refresh_token, source=None)).access_token
    finally:
        await second_db.dispose()


async def test_two_processes_starting_together_make_one_first_key(db: Database) -> None:
    second_db = await open_db(db.url, clock_of(db))
    try:
        one, two = service_on(db), service_on(second_db)
        kids = await asyncio.gather(one.keys.signing_key(), two.keys.signing_key())
        assert kids[0][0] == kids[1][0]
        assert len((await one.jwks())["keys"]) == 1
    finally:
        await second_db.dispose()


async def test_service_accounts_get_tokens_by_client_credentials(
    db: Database, identity: IdentityService
) -> None:
    view, secret = await identity.create_service_account(
        "prom", grants=[("metrics_scraper", Scope.chain())], actor="user:admin"
    )
    assert view.kind == "service"
    token = await identity.client_credentials("prom", secret, source="10.0.0.5")
    principal = await identity.verifier.verify(token.access_token)
    assert principal.actor == "service:prom"
    assert principal.allows("metrics:read")
    assert not principal.allows("sales:read", station="S001")
    (issued,) = await audit_rows(db, "identity.token.issue")
    assert issued.actor == "service:prom"
    # Neither door opens the other's accounts
    with pytest.raises(Exception, match="wrong username or password"):
        await identity.sign_in("prom", secret, source=None)
    await user_with(identity, "alice")
    with pytest.raises(Exception, match="wrong username or password"):
        await identity.client_credentials("alice", PASSWORD, source=None)
    with pytest.raises(Exception, match="wrong username or password"):
        await identity.client_credentials("prom", "wrong secret", source=None)


def test_the_shape_that_routes_a_token_to_identity() -> None:
    assert looks_like_jwt("eyJh.eyJz.c2ln")
    assert looks_like_jwt("eyJh.eyJz.")  # unsigned: still ours to refuse
    assert not looks_like_jwt("k3Jd-h2_sX0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")  # a station's
    assert not looks_like_jwt("a.b")
    assert not looks_like_jwt("a.b.c.d")
    assert not looks_like_jwt("a b.c.d")
