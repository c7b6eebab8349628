"""The identity routes over HTTP: sign-in, refresh, sign-out, client credentials (RFC 6749
§4.4, the password grant refused), keys, me; managing accounts and grants; absurd input is
a 422 (or a plain refusal), never a 500."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from forecourt.identity.handlers import IdentityService
from forecourt.infra.db import Database
from forecourt.kernel.access import Scope
from tests.identity.conftest import (
    PASSWORD,
    audit_rows,
    client_for,
    clock_of,
    service_on,
    user_with,
)


@pytest.fixture
async def client(identity: IdentityService) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(identity) as found:
        yield found


async def bearer(client: httpx.AsyncClient, username: str, password: str = PASSWORD) -> dict:
    answer = await client.post(
        "/v1/auth/sign-in", json={"username": username, "password": password}
    )
    assert answer.status_code == 200, answer.text
    return {"authorization": f"Bearer {answer.json()['access_token']}"}


@pytest.fixture
async def admin(identity: IdentityService, client: httpx.AsyncClient) -> dict:
    await user_with(identity, "admin", ("hq_admin", "chain"))
    return await bearer(client, "admin")


def error(answer: httpx.Response) -> str:
    return str(answer.json()["error"]["code"])


async def test_sign_in_refresh_me_and_sign_out(
    identity: IdentityService, client: httpx.AsyncClient
) -> None:
    await user_with(identity, "alice", ("cashier", "station:S001"))
    answer = await client.post(
        "/v1/auth/sign-in",
        json={"username": "alice", "password": PASSWORD, "terminal": "till-2"},
    )
    assert answer.status_code == 200
    assert answer.headers["cache-control"] == "no-store"
    pair = answer.json()
    assert set(pair) == {
        "access_token",
        "token_type",
        "expires_in",
        "refresh_token",
        "refresh_expires_in",
    }
    assert pair["token_type"] == "Bearer"
    me = await client.get(
        "/v1/auth/me", headers={"authorization": f"Bearer {pair['access_token']}"}
    )
    assert me.status_code == 200
    body = me.json()
    assert body["username"] == "alice"
    assert body["kind"] == "user"
    assert body["grants"] == [{"role": "cashier", "scope": "station:S001"}]
    assert body["terminal"] == "till-2"
    assert body["expires"].startswith("2026-11-25T02:05:00")
    fresh = await client.post("/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]})
    assert fresh.status_code == 200
    reused = await client.post("/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]})
    assert reused.status_code == 401
    assert error(reused) == "auth.refresh_reused"
    out = await client.post(
        "/v1/auth/sign-out", json={"refresh_token": fresh.json()["refresh_token"]}
    )
    assert out.status_code == 204
    assert out.content == b""
    again = await client.post("/v1/auth/sign-out", json={"refresh_token": "never-issued"})
    assert again.status_code == 204


async def test_wrong_password_and_unknown_user_read_the_same(
    identity: IdentityService, client: httpx.AsyncClient
) -> None:
    await user_with(identity, "alice")
    wrong = await client.post(
        "/v1/auth/sign-in", json={"username": "alice", "password": "not the password"}
    )
    unknown = await client.post(
        "/v1/auth/sign-in", json={"username": "nobody", "password": PASSWORD}
    )
    assert wrong.status_code == unknown.status_code == 401
    answers = [
        {k: v for k, v in a.json()["error"].items() if k != "trace_id"} for a in (wrong, unknown)
    ]
    assert (
        answers[0]
        == answers[1]
        == {
            "code": "auth.invalid_credentials",
            "message": "wrong username or password",
        }
    )
    assert set(wrong.headers) == set(unknown.headers)


async def test_a_locked_account_answers_429_with_retry_after(
    db: Database, identity: IdentityService, client: httpx.AsyncClient
) -> None:
    await user_with(identity, "alice")
    for _ in range(3):
        await client.post(
            "/v1/auth/sign-in", json={"username": "alice", "password": "not the password"}
        )
    locked = await client.post("/v1/auth/sign-in", json={"username": "alice", "password": PASSWORD})
    assert locked.status_code == 429
    assert error(locked) == "auth.account_locked"
    assert 590 <= int(locked.headers["retry-after"]) <= 600
    clock_of(db).advance(601)
    assert (await bearer(client, "alice"))["authorization"].startswith("Bearer ")


async def test_one_source_past_its_failures_is_429_and_others_are_not(
    sqlite_db: Database,
) -> None:
    identity = service_on(sqlite_db, failures_per_minute=2, lockout_failures=100)
    await user_with(identity, "alice")
    async with client_for(identity, "203.0.113.9") as bad, client_for(identity) as good:
        for _ in range(2):
            await bad.post("/v1/auth/sign-in", json={"username": "x", "password": "y"})
        refused = await bad.post(
            "/v1/auth/sign-in", json={"username": "alice", "password": PASSWORD}
        )
        assert refused.status_code == 429
        assert error(refused) == "auth.too_many_failures"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert (await bearer(good, "alice"))["authorization"]


async def test_guarded_routes_refuse_missing_expired_and_forged_tokens(
    db: Database, identity: IdentityService, client: httpx.AsyncClient, admin: dict
) -> None:
    assert error(await client.get("/v1/identity/users")) == "auth.missing_credential"
    forged = {"authorization": "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9."}
    answer = await client.get("/v1/identity/users", headers=forged)
    assert answer.status_code == 401
    assert error(answer) == "auth.invalid_token"
    assert (await client.get("/v1/identity/users", headers=admin)).status_code == 200
    clock_of(db).advance(301)
    expired = await client.get("/v1/identity/users", headers=admin)
    assert expired.status_code == 401
    assert error(expired) == "auth.token_expired"


async def test_client_credentials_in_the_form_or_as_basic(
    identity: IdentityService, client: httpx.AsyncClient
) -> None:
    _, secret = await identity.create_service_account(
        "prom", grants=[("metrics_scraper", Scope.chain())], actor="cli"
    )
    form = {"grant_type": "client_credentials", "client_id": "prom", "client_secret": secret}
    by_form = await client.post("/v1/auth/token", data=form)
    assert by_form.status_code == 200, by_form.text
    assert set(by_form.json()) == {"access_token", "token_type", "expires_in"}
    assert by_form.headers["cache-control"] == "no-store"
    basic = base64.b64encode(f"prom:{secret}".encode()).decode()
    by_basic = await client.post(
        "/v1/auth/token",
        data={"grant_type": "client_credentials"},
        headers={"authorization": f"Basic {basic}"},
    )
    assert by_basic.status_code == 200, by_basic.text
    me = await client.get(
        "/v1/auth/me", headers={"authorization": f"Bearer {by_basic.json()['access_token']}"}
    )
    assert me.json()["kind"] == "service"
    assert me.json()["grants"] == [{"role": "metrics_scraper", "scope": "chain"}]
    wrong = await client.post("/v1/auth/token", data={**form, "client_secret": "nope"})
    assert wrong.status_code == 401
    assert error(wrong) == "auth.invalid_credentials"


@pytest.mark.parametrize(
    ("body", "headers", "code"),
    [
        ({"grant_type": "password", "username": "admin", "password": PASSWORD}, {}, "unsupported"),
        ({"grant_type": "refresh_token", "refresh_token": "x"}, {}, "unsupported"),
        ({"client_id": "prom", "client_secret": "x"}, {}, "invalid_request"),
        (None, {"content-type": "application/json"}, "invalid_request"),
        ("grant_type=client_credentials&grant_type=password", {}, "invalid_request"),
    ],
)
async def test_token_requests_outside_client_credentials_are_400(
    sqlite_db: Database, body: object, headers: dict, code: str
) -> None:
    identity = service_on(sqlite_db)
    await user_with(identity, "admin", ("hq_admin", "chain"))
    async with client_for(identity) as client:
        if body is None:
            answer = await client.post("/v1/auth/token", content=b"{}", headers=headers)
        elif isinstance(body, str):
            answer = await client.post(
                "/v1/auth/token",
                content=body.encode(),
                headers={"content-type": "application/x-www-form-urlencoded"},
            )
        else:
            answer = await client.post("/v1/auth/token", data=body, headers=headers)
    assert answer.status_code == 400, answer.text
    expected = "auth.unsupported_grant_type" if code == "unsupported" else "auth.invalid_request"
    assert error(answer) == expected


async def test_the_keys_are_a_jwk_set(identity: IdentityService, client: httpx.AsyncClient) -> None:
    await user_with(identity, "alice")
    await bearer(client, "alice")
    keys = (await client.get("/v1/auth/keys")).json()["keys"]
    assert len(keys) == 1
    assert {"kid", "kty", "crv", "x"} <= set(keys[0])
    assert "d" not in keys[0]


async def test_managing_accounts_and_grants(
    db: Database, identity: IdentityService, client: httpx.AsyncClient, admin: dict
) -> None:
    created = await client.post(
        "/v1/identity/users",
        json={
            "username": "carol",
            "display_name": "Carol C.",
            "grants": [{"role": "cashier", "scope": "station:S001"}],
        },
        headers=admin,
    )
    assert created.status_code == 201, created.text
    password = created.json()["password"]
    assert created.json()["user"]["grants"] == [{"role": "cashier", "scope": "station:S001"}]
    assert "hash" not in created.text
    assert (await bearer(client, "carol", password))["authorization"]
    taken = await client.post("/v1/identity/users", json={"username": "carol"}, headers=admin)
    assert taken.status_code == 409
    assert error(taken) == "identity.username_taken"
    # Grants: given, given twice, taken back, taken back twice
    url = "/v1/identity/users/carol/grants"
    more = await client.post(url, json={"role": "auditor", "scope": "region:EAST"}, headers=admin)
    assert more.status_code == 200
    assert {"role": "auditor", "scope": "region:EAST"} in more.json()["grants"]
    twice = await client.post(url, json={"role": "auditor", "scope": "region:EAST"}, headers=admin)
    assert twice.status_code == 409
    assert error(twice) == "identity.grant_exists"
    chain = await client.post(url, json={"role": "cashier", "scope": "chain"}, headers=admin)
    assert chain.status_code == 422
    assert error(chain) == "identity.scope_not_allowed"
    assert "cashier is granted per station: --station CODE" in chain.json()["error"]["message"]
    body = {"role": "auditor", "scope": "region:EAST"}
    gone = await client.request("DELETE", url, json=body, headers=admin)
    assert gone.status_code == 200
    assert gone.json()["grants"] == [{"role": "cashier", "scope": "station:S001"}]
    lacking = await client.request("DELETE", url, json=body, headers=admin)
    assert lacking.status_code == 404
    assert error(lacking) == "identity.unknown_grant"
    # Reading
    listed = await client.get("/v1/identity/users", headers=admin)
    assert [u["username"] for u in listed.json()["items"]] == ["admin", "carol"]
    one = await client.get("/v1/identity/users/carol", headers=admin)
    assert one.json()["display_name"] == "Carol C."
    missing = await client.get("/v1/identity/users/nobody", headers=admin)
    assert missing.status_code == 404
    assert error(missing) == "identity.unknown_user"
    # A password reset (generated), then disabling
    reset = await client.post("/v1/identity/users/carol/password", headers=admin)
    assert reset.status_code == 200
    assert reset.json()["password"]
    chosen = await client.post(
        "/v1/identity/users/carol/password", json={"password": "a chosen password"}, headers=admin
    )
    assert chosen.status_code == 200
    assert chosen.json()["password"] is None
    assert (await bearer(client, "carol", "a chosen password"))["authorization"]
    disabled = await client.post("/v1/identity/users/carol/disable", headers=admin)
    assert disabled.status_code == 200
    assert disabled.json()["disabled"] is True
    refused = await client.post(
        "/v1/auth/sign-in", json={"username": "carol", "password": "a chosen password"}
    )
    assert refused.status_code == 401
    assert error(refused) == "auth.account_disabled"
    # Every change is audited with the admin as its actor
    actions = {r.action for r in await audit_rows(db) if r.actor == "user:admin"}
    assert {
        "identity.user.create",
        "identity.grant",
        "identity.revoke",
        "identity.password.reset",
        "identity.user.disable",
    } <= actions


async def test_service_accounts_over_http(
    identity: IdentityService, client: httpx.AsyncClient, admin: dict
) -> None:
    made = await client.post(
        "/v1/identity/service-accounts",
        json={"name": "bi-export", "grants": [{"role": "integration", "scope": "region:EAST"}]},
        headers=admin,
    )
    assert made.status_code == 201, made.text
    secret = made.json()["client_secret"]
    assert made.json()["client_id"] == "bi-export"
    token = await client.post(
        "/v1/auth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": "bi-export",
            "client_secret": secret,
        },
    )
    assert token.status_code == 200
    human = await client.post(
        "/v1/identity/service-accounts",
        json={"name": "till", "grants": [{"role": "cashier", "scope": "station:S001"}]},
        headers=admin,
    )
    assert human.status_code == 422
    assert error(human) == "identity.scope_not_allowed"


async def test_a_cashier_cannot_manage_or_read_accounts(
    identity: IdentityService, client: httpx.AsyncClient
) -> None:
    await user_with(identity, "alice", ("cashier", "station:S001"))
    cashier = await bearer(client, "alice")
    assert (await client.get("/v1/identity/users", headers=cashier)).status_code == 403
    made = await client.post("/v1/identity/users", json={"username": "eve"}, headers=cashier)
    assert made.status_code == 403
    assert error(made) == "auth.forbidden"
    assert (await client.get("/v1/auth/me", headers=cashier)).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"username": "x" * 65, "password": "p"},
        {"username": "alice", "password": "p" * 1025},
        {"username": "alice"},
        {"username": "alice", "password": PASSWORD, "extra": 1},
        {"username": 7, "password": PASSWORD},
        {"username": "alice", "password": PASSWORD, "terminal": "t" * 65},
        {"username": "alice", "password": PASSWORD, "terminal": "till\n1"},
    ],
)
async def test_absurd_sign_ins_are_422(sqlite_db: Database, body: dict) -> None:
    identity = service_on(sqlite_db)
    async with client_for(identity) as client:
        answer = await client.post("/v1/auth/sign-in", json=body)
    assert answer.status_code == 422, answer.text


ODD_USERNAMES = ["al\x00ce", "ALICE", "../../etc", "a" * 64, "Ä", "alice'; drop table --"]


async def test_odd_usernames_are_just_wrong_credentials(db: Database) -> None:
    identity = service_on(db)
    async with client_for(identity) as client:
        for username in ODD_USERNAMES:
            answer = await client.post(
                "/v1/auth/sign-in",
                content=json.dumps({"username": username, "password": "p\x00ss"}).encode(),
                headers={"content-type": "application/json"},
            )
            assert answer.status_code == 401, (username, answer.text)
            assert error(answer) == "auth.invalid_credentials"
    failed = await audit_rows(db, "identity.sign_in.failed")
    assert [r.actor for r in failed] == ["anonymous"] * len(ODD_USERNAMES)
    assert failed[0].target == "user:(invalid)"


@pytest.mark.parametrize(
    "body",
    [
        {"username": "Bad Name"},
        {"username": "eve", "password": "short"},
        {"username": "eve", "grants": [{"role": "root", "scope": "chain"}]},
        {"username": "eve", "grants": [{"role": "cashier", "scope": "planet:MARS"}]},
        {"username": "eve", "grants": [{"role": "cashier", "scope": "station:S\x00"}]},
        {"username": "eve", "display_name": "x" * 201},
        {"username": "eve", "display_name": "nul\x00"},
    ],
)
async def test_absurd_accounts_are_422_and_nothing_is_created(
    sqlite_db: Database, body: dict
) -> None:
    identity = service_on(sqlite_db)
    await user_with(identity, "admin", ("hq_admin", "chain"))
    async with client_for(identity) as client:
        admin = await bearer(client, "admin")
        answer = await client.post("/v1/identity/users", json=body, headers=admin)
    assert answer.status_code == 422, answer.text
    assert [u.username for u in await identity.list_users()] == ["admin"]


async def test_a_lone_surrogate_is_a_422_not_an_error(sqlite_db: Database) -> None:
    identity = service_on(sqlite_db)
    async with client_for(identity) as client:
        answer = await client.post(
            "/v1/auth/sign-in",
            content=b'{"username": "alice", "password": "\\ud800"}',
            headers={"content-type": "application/json"},
        )
    assert answer.status_code == 422
