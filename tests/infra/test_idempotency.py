"""The idempotency contract for requests that move money, on SQLite and PostgreSQL.

In-process (httpx.ASGITransport on ``idempotency_app``, a clock the test moves): the first
request runs once and a retry gets the stored response (same status, body, headers, marked
``Idempotency-Replayed``) without calling out again; other parameters under the key -> 422
``idempotency.key_reused``; no key / a malformed key -> 400; a retry while the first is
inside its work -> 409 ``idempotency.in_progress`` at once, with ``Retry-After``, and no
database connection held meanwhile (the reservation is committed on its own); a failure
before ``started`` frees the key, one after is stored and replayed; a reservation whose lease
expired is taken over by exactly one retrier, and its slow owner may no longer start; a
started record whose owner died never runs again: the recovery hook completes it, or without
a hook the answer is ``idempotency.outcome_unknown``; ``purge_expired`` keeps started records.

Crash tests (real processes): the app is SIGKILLed at each crash point
(``idempotency.after_reserve``, ``after_start``, ``after_outside_call``, ``after_complete``),
restarted, and the request retried until its lease has expired: the charge is made at most
once, and the retry gets the outcome.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from forecourt.infra.consumers import ConsumerHost
from forecourt.infra.db import Database, idempotency_table
from forecourt.infra.idempotency import (
    COMPLETED,
    RESERVED,
    STARTED,
    IdempotencyKey,
    IdempotencyRecord,
    InProgress,
    LeaseLost,
    Recovering,
    StoredResponse,
    idempotent,
    purge_expired,
    request_hash,
)
from forecourt.infra.logging import trace_id_var
from tests.infra.idempotency_app import (
    SCOPE,
    ProviderError,
    build_app,
    charge_count,
    charges_table,
    prepare,
)
from tests.support import ManualClock, eventually

CHARGE = {"amount_minor": 6120, "card": "tok_visa"}
LEASE = timedelta(seconds=30)
HASH = request_hash("POST", "/charge", json.dumps(CHARGE).encode())


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2026, 11, 25, 8, 0, tzinfo=UTC))


@pytest.fixture
async def db(db_url: str, clock: ManualClock) -> AsyncIterator[Database]:
    database = Database(db_url, clock=clock)
    await database.connect()
    try:
        await prepare(database)
        yield database
    finally:
        await database.dispose()


class NoBus:
    """The consumer host's retention needs no bus."""

    transactional = False


def client_of(app: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


@pytest.fixture
async def app(db: Database) -> FastAPI:
    return build_app(db, lease=LEASE)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_of(app) as made:
        yield made


async def charge(
    client: httpx.AsyncClient, key: str | bytes | None = "k-1", body: Any = CHARGE
) -> httpx.Response:
    if key is None:
        return await client.post("/charge", json=body)
    if isinstance(key, bytes):
        return await client.post("/charge", json=body, headers={b"Idempotency-Key": key})
    return await client.post("/charge", json=body, headers={"Idempotency-Key": key})


TRACE_ID = re.compile(r"[0-9a-f]{32}")
ENVELOPE_FIELDS = {"code", "message", "details", "trace_id"}


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The error an answer carries, checked to be the one envelope: ``{"error": {code,
    message, [details], trace_id}}`` as JSON; a fresh answer's trace id is its own
    ``traceparent``'s (a replay's is the first request's, stored with it)."""
    assert response.headers["content-type"] == "application/json", response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert {"code", "message", "trace_id"} <= set(error) <= ENVELOPE_FIELDS, error
    assert isinstance(error["code"], str), error
    assert isinstance(error["message"], str), error
    assert TRACE_ID.fullmatch(error["trace_id"]), error
    traceparent = response.headers.get("traceparent")
    if traceparent and "idempotency-replayed" not in response.headers:
        assert error["trace_id"] == traceparent.split("-")[1], (error, traceparent)
    return error


def code_of(response: httpx.Response) -> str:
    return str(error_of(response)["code"])


async def record(db: Database, key: str = "k-1") -> Any:
    t = idempotency_table
    async with db.connection() as conn:
        return (await conn.execute(sa.select(t).where(t.c.key == key))).first()


async def seed(
    db: Database,
    *,
    state: str,
    key: str = "k-1",
    lease_until: datetime | None,
    owner: str = "dead-host/1/cafe",
) -> None:
    """A record left by another process (its owner dead once the lease has expired)."""
    now = db.clock.now()
    async with db.begin() as uow:
        await uow.conn.execute(
            idempotency_table.insert().values(
                scope=SCOPE,
                key=key,
                request_hash=HASH,
                owner=owner,
                state=state,
                lease_until=lease_until,
                recovery_point=f"provider reference {key}",
                created_at=now,
                expires_at=None if state == STARTED else now + timedelta(hours=24),
            )
        )


async def charge_by_provider(db: Database, key: str = "k-1") -> int:
    """A charge the provider made for ``key`` (its process died before completing)."""
    async with db.begin() as uow:
        result = await uow.conn.execute(
            charges_table.insert().values(reference=key, charged_at=db.clock.now(), **CHARGE)
        )
        return int(result.inserted_primary_key[0])  # type: ignore[index]


# --- the contract, in process -------------------------------------------------------------------


async def test_the_first_request_runs_once_and_a_retry_replays_it(
    client: httpx.AsyncClient, app: FastAPI, db: Database, clock: ManualClock
) -> None:
    first = await charge(client)
    assert first.status_code == 201
    assert first.json() == {"charge_id": 1, **CHARGE}
    assert "idempotency-replayed" not in first.headers

    reordered = {"card": CHARGE["card"], "amount_minor": CHARGE["amount_minor"]}
    for body in (CHARGE, reordered):  # the request is compared canonically
        again = await charge(client, body=body)
        assert again.status_code == 201
        assert again.content == first.content
        assert again.headers["location"] == first.headers["location"] == "/charges/1"
        assert again.headers["idempotency-replayed"] == "true"

    assert app.state.knobs.runs == 1
    assert await charge_count(db) == 1
    row = await record(db)
    assert row.state == COMPLETED
    assert row.lease_until is None
    assert row.expires_at >= row.created_at + timedelta(hours=24)

    assert (await charge(client, key='"k-1"')).headers["idempotency-replayed"] == "true"
    assert (await charge(client, key="k-2")).json()["charge_id"] == 2  # another key: another


async def test_the_same_key_with_other_parameters_is_refused(
    client: httpx.AsyncClient, db: Database
) -> None:
    assert (await charge(client)).status_code == 201
    other = await charge(client, body={**CHARGE, "amount_minor": 9999})
    assert other.status_code == 422
    assert code_of(other) == "idempotency.key_reused"
    assert await charge_count(db) == 1


@pytest.mark.parametrize(
    ("key", "code"),
    [
        (None, "idempotency.key_missing"),
        ("", "idempotency.key_invalid"),
        ("k" * 256, "idempotency.key_invalid"),
        ("tab\there", "idempotency.key_invalid"),
        ("caf\xe9".encode(), "idempotency.key_invalid"),
    ],
)
async def test_a_missing_or_malformed_key_is_refused(
    client: httpx.AsyncClient, db: Database, key: str | bytes | None, code: str
) -> None:
    refused = await charge(client, key=key)
    assert refused.status_code == 400
    assert code_of(refused) == code
    assert await charge_count(db) == 0
    assert (await charge(client, key="k" * 255)).status_code == 201  # the longest key


@pytest.mark.parametrize("common", [True, False], ids=["app", "bare_app"])
async def test_every_idempotency_error_answers_the_one_envelope_with_a_trace_id(
    db: Database, clock: ManualClock, common: bool
) -> None:
    # With install_common's handlers or without them: install_idempotency renders its own
    # errors with the one envelope (error_of checks code, message, trace_id).
    app = build_app(db, lease=LEASE, common=common)
    knobs = app.state.knobs
    async with client_of(app) as client:
        for key, code in ((None, "idempotency.key_missing"), ("", "idempotency.key_invalid")):
            refused = await charge(client, key=key)
            assert (refused.status_code, code_of(refused)) == (400, code)

        knobs.hold_at = "before_start"
        slow = asyncio.create_task(charge(client))
        await asyncio.wait_for(knobs.entered.wait(), 5)
        busy = await charge(client)
        assert (busy.status_code, code_of(busy)) == (409, "idempotency.in_progress")
        assert error_of(busy)["details"]["retry_after"] == int(busy.headers["retry-after"])
        reused = await charge(client, body={**CHARGE, "card": "tok_amex"})
        assert (reused.status_code, code_of(reused)) == (422, "idempotency.key_reused")
        clock.advance(LEASE + timedelta(seconds=1))
        assert (await charge(client)).status_code == 201  # taken over
        knobs.release.set()
        late = await asyncio.wait_for(slow, 5)
        assert (late.status_code, code_of(late)) == (409, "idempotency.lease_lost")

        await seed(db, key="k-2", state=STARTED, lease_until=clock.now())
        knobs.provider_down = True
        waiting = await charge(client, key="k-2")
        assert (waiting.status_code, code_of(waiting)) == (409, "idempotency.recovering")
        assert int(waiting.headers["retry-after"]) >= 1
        knobs.provider_down = False
        not_made = await charge(client, key="k-2")  # the hook's outcome, in the envelope
        assert (not_made.status_code, code_of(not_made)) == (502, "charge.not_made")
        replayed = await charge(client, key="k-2")
        assert replayed.headers["idempotency-replayed"] == "true"
        assert replayed.content == not_made.content  # byte for byte, its first trace id
        assert error_of(replayed)["trace_id"] == error_of(not_made)["trace_id"]

    await seed(db, key="k-3", state=STARTED, lease_until=clock.now())
    async with client_of(build_app(db, lease=LEASE, recovery=False, common=common)) as client:
        unknown = await charge(client, key="k-3")
        assert (unknown.status_code, code_of(unknown)) == (409, "idempotency.outcome_unknown")


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (ProviderError("the provider answered 500"), 502, "charge.provider_error"),
        (RuntimeError("a bug"), 500, "internal.error"),
    ],
)
async def test_a_failure_stored_without_the_apps_answer_is_the_envelope_too(
    db: Database, error: Exception, status: int, code: str
) -> None:
    # finish_after_error without the rendered answer stores what the handlers would answer:
    # the envelope with the trace id of the request it failed in.
    key = IdempotencyKey(db, SCOPE, "k-1", HASH, lease=LEASE)
    await key.acquire()
    await key.mark_started()
    token = trace_id_var.set("ab" * 16)
    try:
        await key.finish_after_error(error)
    finally:
        trace_id_var.reset(token)
    row = await record(db)
    assert (row.state, row.status_code) == (COMPLETED, status)
    stored = json.loads(row.response)
    assert set(stored) == {"error"}
    assert stored["error"]["code"] == code
    assert stored["error"]["trace_id"] == "ab" * 16
    assert {"code", "message", "trace_id"} <= set(stored["error"]) <= ENVELOPE_FIELDS


@pytest.mark.parametrize("hold_at", ["before_start", "after_start"])
async def test_a_concurrent_retry_is_refused_at_once_without_holding_a_connection(
    client: httpx.AsyncClient, app: FastAPI, db: Database, hold_at: str
) -> None:
    knobs = app.state.knobs
    knobs.hold_at = hold_at
    first = asyncio.create_task(charge(client))
    await asyncio.wait_for(knobs.entered.wait(), 5)
    # The first request is inside its work: its reservation is committed (another
    # connection sees it) and it holds no database connection.
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    row = await record(db)
    assert row.state == (RESERVED if hold_at == "before_start" else STARTED)
    assert row.expires_at is (None if hold_at == "after_start" else row.expires_at)

    retry = await asyncio.wait_for(charge(client), 1.0)
    assert retry.status_code == 409
    assert code_of(retry) == "idempotency.in_progress"
    assert 1 <= int(retry.headers["retry-after"]) <= LEASE.total_seconds()
    assert retry.json()["error"]["details"]["retry_after"] == int(retry.headers["retry-after"])
    other = await asyncio.wait_for(charge(client, body={**CHARGE, "card": "tok_amex"}), 1.0)
    assert code_of(other) == "idempotency.key_reused"
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]

    knobs.release.set()
    done = await asyncio.wait_for(first, 5)
    assert done.status_code == 201
    assert (await charge(client)).content == done.content
    assert knobs.runs == 1
    assert await charge_count(db) == 1


async def test_a_failure_before_start_frees_the_key(
    client: httpx.AsyncClient, app: FastAPI, db: Database
) -> None:
    app.state.knobs.fail_at = "before_start"
    failed = await charge(client)
    assert failed.status_code == 503
    assert code_of(failed) == "charge.card_check_unavailable"
    assert await record(db) is None

    invalid = await charge(client, body={**CHARGE, "amount_minor": 0})  # refused by the model
    assert code_of(invalid) == "request.invalid"
    assert await record(db) is None

    retried = await charge(client)
    assert retried.status_code == 201
    assert "idempotency-replayed" not in retried.headers
    assert app.state.knobs.runs == 2
    assert await charge_count(db) == 1


@pytest.mark.parametrize(
    ("fail_at", "status", "code"),
    [("after_start", 502, "charge.provider_error"), ("bug_after_start", 500, "internal.error")],
)
async def test_a_failure_after_start_is_stored_and_replayed(
    client: httpx.AsyncClient,
    app: FastAPI,
    db: Database,
    fail_at: str,
    status: int,
    code: str,
) -> None:
    app.state.knobs.fail_at = fail_at
    failed = await charge(client)
    assert failed.status_code == status
    assert code_of(failed) == code

    replayed = await charge(client)
    assert replayed.status_code == status
    assert replayed.json() == failed.json()
    assert replayed.headers["idempotency-replayed"] == "true"
    assert app.state.knobs.runs == 1
    assert (await record(db)).state == COMPLETED
    assert await charge_count(db) == 0


async def test_an_expired_reservation_is_taken_over_and_its_slow_owner_may_not_start(
    client: httpx.AsyncClient, app: FastAPI, db: Database, clock: ManualClock
) -> None:
    knobs = app.state.knobs
    knobs.hold_at = "before_start"
    slow = asyncio.create_task(charge(client))
    await asyncio.wait_for(knobs.entered.wait(), 5)
    assert code_of(await charge(client)) == "idempotency.in_progress"

    clock.advance(LEASE + timedelta(seconds=1))  # the owner looks dead: nothing outside yet
    taken = await charge(client)
    assert taken.status_code == 201

    knobs.release.set()
    late = await asyncio.wait_for(slow, 5)
    assert late.status_code == 409
    assert code_of(late) == "idempotency.lease_lost"
    assert knobs.runs == 2
    assert await charge_count(db) == 1
    assert (await charge(client)).content == taken.content


async def test_two_retriers_cannot_both_take_over_a_dead_reservation(
    db: Database, clock: ManualClock
) -> None:
    await seed(db, state=RESERVED, lease_until=clock.now() - timedelta(seconds=1))
    keys = [IdempotencyKey(db, SCOPE, "k-1", HASH, lease=LEASE) for _ in range(4)]
    outcomes = await asyncio.gather(*(k.acquire() for k in keys), return_exceptions=True)
    assert sum(o is None for o in outcomes) == 1, outcomes
    assert all(isinstance(o, InProgress) for o in outcomes if o is not None)
    winner = next(k for k, o in zip(keys, outcomes, strict=True) if o is None)
    assert winner.taken_over
    assert (await record(db)).owner == winner.owner


async def test_a_started_record_of_a_dead_owner_is_recovered_never_run_again(
    client: httpx.AsyncClient, app: FastAPI, db: Database, clock: ManualClock
) -> None:
    await seed(db, state=STARTED, lease_until=clock.now() + LEASE)
    assert code_of(await charge(client)) == "idempotency.in_progress"  # its lease is live

    charge_id = await charge_by_provider(db)  # the provider did charge before the death
    clock.advance(LEASE)
    recovered = await charge(client)
    assert recovered.status_code == 201
    assert recovered.json() == {"charge_id": charge_id, **CHARGE}
    assert recovered.headers["idempotency-replayed"] == "true"
    assert (await charge(client)).content == recovered.content
    assert app.state.knobs.recoveries == ["k-1"]  # asked once; then the stored outcome
    assert app.state.knobs.runs == 0
    assert await charge_count(db) == 1

    await seed(db, key="k-2", state=STARTED, lease_until=clock.now())  # never charged
    not_made = await charge(client, key="k-2")
    assert not_made.status_code == 502
    assert code_of(not_made) == "charge.not_made"
    assert (await record(db, "k-2")).state == COMPLETED
    assert app.state.knobs.runs == 0
    assert await charge_count(db) == 1


async def test_without_a_recovery_hook_the_outcome_is_unknown_until_resolved(
    db: Database, clock: ManualClock
) -> None:
    await seed(db, state=STARTED, lease_until=clock.now() - timedelta(seconds=1))
    app = build_app(db, lease=LEASE, recovery=False)
    async with client_of(app) as client:
        for _ in range(2):
            unknown = await charge(client)
            assert unknown.status_code == 409
            assert code_of(unknown) == "idempotency.outcome_unknown"
            assert "operator" in unknown.json()["error"]["message"]
    row = await record(db)
    assert (row.state, row.owner, row.expires_at) == (STARTED, "dead-host/1/cafe", None)
    assert app.state.knobs.runs == 0
    assert await charge_count(db) == 0


async def test_a_recovery_without_an_answer_leaves_the_record_to_the_next_retry(
    db: Database, clock: ManualClock
) -> None:
    await seed(db, state=STARTED, lease_until=clock.now())
    answers: list[StoredResponse | None | Exception] = [None, RuntimeError("provider down")]
    asked: list[IdempotencyRecord] = []

    async def hook(rec: IdempotencyRecord) -> StoredResponse | None:
        asked.append(rec)
        answer = answers.pop(0) if answers else StoredResponse(201, {"charge_id": 7})
        if isinstance(answer, Exception):
            raise answer
        return answer

    for _ in range(2):
        key = IdempotencyKey(db, SCOPE, "k-1", HASH, lease=LEASE)
        with pytest.raises(Recovering) as waiting:
            await key.acquire(hook)
        assert waiting.value.code == "idempotency.recovering"
        assert (await record(db)).state == STARTED
    assert asked[0].owner == "dead-host/1/cafe"
    assert asked[0].recovery_point == "provider reference k-1"

    key = IdempotencyKey(db, SCOPE, "k-1", HASH, lease=LEASE)
    with pytest.raises(Exception, match="replay 201"):
        await key.acquire(hook)
    row = await record(db)
    assert (row.state, row.status_code, json.loads(row.response)) == (
        COMPLETED,
        201,
        {"charge_id": 7},
    )


async def test_an_outcome_can_commit_with_the_handlers_own_writes(db: Database) -> None:
    key = IdempotencyKey(db, SCOPE, "k-1", HASH, lease=LEASE)
    await key.acquire()
    await key.mark_started()

    async def complete_then_fail() -> None:
        async with db.begin() as uow:
            await key.complete(201, {"charge_id": 1}, uow=uow)
            raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError, match="rolled back"):
        await complete_then_fail()
    await key.refresh()
    assert key.state == STARTED
    assert (await record(db)).state == STARTED

    async with db.begin() as uow:
        response = await key.complete(201, {"charge_id": 1}, uow=uow)
    await key.refresh()
    assert (key.state, response.status_code) == (COMPLETED, 201)
    row = await record(db)
    assert (row.state, json.loads(row.response)) == (COMPLETED, {"charge_id": 1})


async def test_purge_deletes_expired_records_and_never_a_started_one(
    client: httpx.AsyncClient, db: Database, clock: ManualClock
) -> None:
    assert (await charge(client, key="done")).status_code == 201
    await seed(db, key="abandoned", state=RESERVED, lease_until=clock.now())
    await seed(db, key="unknown", state=STARTED, lease_until=clock.now())
    clock.advance(timedelta(hours=23))
    assert await purge_expired(db) == 0
    assert (await charge(client, key="fresh")).status_code == 201

    clock.advance(timedelta(hours=2))
    assert await purge_expired(db) == 2  # "done" and "abandoned"; "fresh" is 2 h old
    async with db.connection() as conn:
        keys = (await conn.execute(sa.select(idempotency_table.c.key))).scalars().all()
    assert sorted(keys) == ["fresh", "unknown"]

    clock.advance(timedelta(days=30))
    assert await purge_expired(db) == 1
    assert (await record(db, "unknown")).state == STARTED  # kept until an operator acts

    reused = await charge(client, key="done", body={**CHARGE, "amount_minor": 1})
    assert reused.status_code == 201  # a purged key is a new key


async def test_the_hosts_hourly_retention_purges_expired_records_and_never_a_started_one(
    client: httpx.AsyncClient, db: Database, clock: ManualClock
) -> None:
    # The schedule: every running consumer host purges each retention_interval (an hour).
    running = ConsumerHost(db, NoBus(), [], registry=CollectorRegistry())  # type: ignore[arg-type]
    assert running.retention_interval == 3600.0
    assert (await charge(client, key="done")).status_code == 201
    await seed(db, key="unknown", state=STARTED, lease_until=clock.now())
    clock.advance(timedelta(hours=23, minutes=59))
    assert (await running.purge_once())["idempotency"] == 0  # kept at least 24 h
    clock.advance(timedelta(minutes=1))
    assert (await running.purge_once())["idempotency"] == 1
    clock.advance(timedelta(days=365))
    assert (await running.purge_once())["idempotency"] == 0
    assert (await record(db, "done")) is None
    assert (await record(db, "unknown")).state == STARTED


def test_records_are_kept_at_least_a_day() -> None:
    for too_short in (timedelta(hours=1), timedelta(hours=24) - timedelta(seconds=1)):
        with pytest.raises(ValueError, match="at least"):
            idempotent("s", lambda request: request.app.state.db, ttl=too_short)
    idempotent("s", lambda request: request.app.state.db, ttl=timedelta(hours=24))
    with pytest.raises(ValueError, match="positive"):
        idempotent("s", lambda request: request.app.state.db, lease=timedelta(0))


async def test_a_record_is_purged_at_its_expiry_not_a_moment_later(
    client: httpx.AsyncClient, db: Database, clock: ManualClock
) -> None:
    assert (await charge(client)).status_code == 201
    expires_at = (await record(db)).expires_at
    clock.advance(timedelta(hours=24) - timedelta(microseconds=1))
    assert await purge_expired(db) == 0
    clock.advance(timedelta(microseconds=1))
    assert clock.now() == expires_at.replace(tzinfo=UTC)
    assert await purge_expired(db) == 1


async def test_renew_extends_the_lease_and_fails_once_the_record_is_lost(
    db: Database, clock: ManualClock
) -> None:
    owner = IdempotencyKey(db, SCOPE, "k-1", HASH, lease=LEASE)
    await owner.acquire()
    await owner.mark_started()
    clock.advance(timedelta(seconds=20))
    await owner.renew()  # the outside call takes long: the lease runs 30 s from now
    assert (await record(db)).lease_until.replace(tzinfo=UTC) == clock.now() + LEASE
    clock.advance(timedelta(seconds=20))  # 40 s after start, 20 s after the renewal
    retry = IdempotencyKey(db, SCOPE, "k-1", HASH, lease=LEASE)
    with pytest.raises(InProgress):  # still the owner's: not recovered, not unknown
        await retry.acquire()
    assert (await record(db)).owner == owner.owner

    # A reservation taken over after its lease expired: the slow owner may not renew it.
    slow = IdempotencyKey(db, SCOPE, "k-2", HASH, lease=LEASE)
    await slow.acquire()
    clock.advance(LEASE)
    taker = IdempotencyKey(db, SCOPE, "k-2", HASH, lease=LEASE)
    await taker.acquire()
    assert taker.taken_over
    with pytest.raises(LeaseLost):
        await slow.renew()
    assert (await record(db, "k-2")).owner == taker.owner


@pytest.mark.parametrize(("hold_at", "left"), [("before_start", None), ("after_start", STARTED)])
async def test_a_cancelled_request_frees_its_key_only_before_start(
    client: httpx.AsyncClient,
    app: FastAPI,
    db: Database,
    clock: ManualClock,
    hold_at: str,
    left: str | None,
) -> None:
    # The client went away (or the server stops) while the handler was inside its work.
    knobs = app.state.knobs
    knobs.hold_at = hold_at
    first = asyncio.create_task(charge(client))
    await asyncio.wait_for(knobs.entered.wait(), 5)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    row = await record(db)
    assert (row.state if row is not None else None) == left
    clock.advance(LEASE)
    retried = await charge(client)
    if left is None:  # nothing outside was called: the retry runs the work
        assert retried.status_code == 201
        assert knobs.runs == 2
    else:  # the outside call may have happened: never again, recovery asks the provider
        assert (retried.status_code, code_of(retried)) == (502, "charge.not_made")
        assert knobs.recoveries == ["k-1"]
        assert knobs.runs == 1


@given(
    body=st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=6),
    other=st.text(min_size=1, max_size=5),
)
def test_request_hash_is_canonical_and_tells_requests_apart(
    body: dict[str, Any], other: str
) -> None:
    raw = json.dumps(body).encode()
    shuffled = json.dumps(dict(reversed(body.items())), indent=2).encode()
    assert request_hash("POST", "/charge", raw) == request_hash("post", "/charge", shuffled)
    assert request_hash("POST", "/charge", raw) != request_hash("POST", "/refund", raw)
    assert request_hash("POST", "/charge", raw) != request_hash("PUT", "/charge", raw)
    changed = {**body, other: [body.get(other)]}
    assert request_hash("POST", "/charge", raw) != request_hash(
        "POST", "/charge", json.dumps(changed).encode()
    )


# --- crash tests: real processes, SIGKILLed at each crash point --------------------------------

APP_SCRIPT = Path(__file__).with_name("idempotency_app.py")
CRASH_LEASE_S = 1.0


class AppProcess:
    """The test app as a process of its own: it binds a port and names it in a file."""

    def __init__(self, workdir: Path, url: str) -> None:
        self.workdir = workdir
        self.url = url
        self.port_file = workdir / "app.port"
        self.marker = workdir / "crash.marker"
        self.log = workdir / "app.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, crash_at: str | None = None, recovery: bool = True) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FORECOURT_")}
        if crash_at:
            env |= {"FORECOURT_CRASH_AT": crash_at, "FORECOURT_CRASH_MARKER": str(self.marker)}
        args = ["--database-url", self.url, "--port-file", str(self.port_file)]
        args += ["--lease", str(CRASH_LEASE_S), *([] if recovery else ["--no-recovery"])]
        self.port_file.unlink(missing_ok=True)  # a SIGKILLed life leaves its file behind
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(APP_SCRIPT), *args], env=env, stdout=log, stderr=log
            )

    async def base_url(self) -> str:
        def announced() -> int:
            if self.port_file.exists():
                return int(self.port_file.read_text())
            assert self.process is not None
            assert self.process.poll() is None, f"the app exited:\n{self.log.read_text()}"
            return 0

        port = await eventually(announced, 20, interval=0.02, what="the app to listen")
        return f"http://127.0.0.1:{port}"

    async def wait_dead(self, timeout: float = 10) -> int:
        assert self.process is not None
        process = self.process
        await eventually(lambda: process.poll() is not None, timeout, what="the app to die")
        return int(process.returncode)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@pytest.fixture
async def crash_db(db_url: str) -> AsyncIterator[Database]:
    database = Database(db_url)
    await database.connect()
    try:
        await prepare(database)
        yield database
    finally:
        await database.dispose()


@pytest.fixture
def app_process(crash_db: Database, tmp_path: Path) -> Iterator[AppProcess]:
    made = AppProcess(tmp_path, crash_db.url)
    yield made
    made.stop()


async def retry_until_settled(base: str, key: str) -> httpx.Response:
    """Send the request again until it is no longer in progress (the dead owner's lease
    runs out: time passing, awaited with a deadline)."""

    async def settled() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            answer = await http.post("/charge", json=CHARGE, headers={"Idempotency-Key": key})
        if answer.status_code == 409 and code_of(answer) == "idempotency.in_progress":
            return []
        return [answer]

    found: list[httpx.Response] = await eventually(
        settled, 15, interval=0.1, what="the lease to expire"
    )
    return found[0]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("point", "recovery", "left", "status", "code", "charges"),
    [
        ("after_reserve", True, RESERVED, 201, None, 1),
        ("after_start", True, STARTED, 502, "charge.not_made", 0),
        ("after_start", False, STARTED, 409, "idempotency.outcome_unknown", 0),
        ("after_outside_call", True, STARTED, 201, None, 1),
        ("after_complete", True, COMPLETED, 201, None, 1),
    ],
)
async def test_a_process_killed_at_each_step_never_charges_twice(
    app_process: AppProcess,
    crash_db: Database,
    point: str,
    recovery: bool,
    left: str,
    status: int,
    code: str | None,
    charges: int,
) -> None:
    crash_at = f"idempotency.{point}"
    key = f"crash-{point}"
    app_process.start(crash_at=crash_at, recovery=recovery)
    base = await app_process.base_url()
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        with pytest.raises(httpx.TransportError):
            await http.post("/charge", json=CHARGE, headers={"Idempotency-Key": key})
    assert await app_process.wait_dead() == -signal.SIGKILL
    assert app_process.marker.read_text().split() == [crash_at, f"pid={app_process.process.pid}"]  # type: ignore[union-attr]
    assert (await record(crash_db, key)).state == left
    made_before = await charge_count(crash_db, key)
    assert made_before == (1 if point in ("after_outside_call", "after_complete") else 0)

    app_process.start(recovery=recovery)  # the same app, without the crash
    base = await app_process.base_url()
    answer = await retry_until_settled(base, key)
    assert answer.status_code == status, answer.text
    if code is not None:
        assert code_of(answer) == code
    else:
        assert answer.json()["charge_id"] > 0
    assert await charge_count(crash_db, key) == charges

    again = await retry_until_settled(base, key)  # settled for good: the same answer
    assert await charge_count(crash_db, key) == charges
    if status == 409:  # answered afresh each time (its own trace id), never stored
        assert (again.status_code, code_of(again)) == (409, code)
        assert (await record(crash_db, key)).state == STARTED
    else:
        assert (again.status_code, again.content) == (answer.status_code, answer.content)
        assert again.headers["idempotency-replayed"] == "true"
        assert (await record(crash_db, key)).state == COMPLETED
