"""Request idempotency records on SQLite and PostgreSQL, and properties of ``request_hash``.

What is proven: the first request reserves its key and a retry of the same request gets the
stored response; the same key with another request is refused (``KeyReused``); a retry while
the first is still running is refused (``InProgress``), also when both arrive together; a
reservation rolled back with its failed request frees the key; an expired record is replaced;
scopes are independent; ``purge_expired`` removes only expired records. ``request_hash`` is
insensitive to key order and otherwise tells payloads apart.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from forecourt.infra.db import Database, idempotency_table
from forecourt.infra.idempotency import (
    InProgress,
    KeyReused,
    StoredResponse,
    begin_request,
    complete_request,
    purge_expired,
    request_hash,
)
from forecourt.infra.migrate import upgrade


class ManualClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.current = datetime(2026, 11, 25, 8, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.current

    def advance(self, delta: timedelta) -> None:
        self.current += delta


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def db(db_url: str, clock: ManualClock) -> AsyncIterator[Database]:
    database = Database(db_url, clock=clock)
    await database.connect()
    try:
        await upgrade(database, ["platform"])
        yield database
    finally:
        await database.dispose()


PAYMENT = {"amount": "61.20", "currency": "EUR", "pump": 3}
SCOPE = "payments"


async def begin(
    db: Database, payload: Any, *, key: str = "k-1", scope: str = SCOPE, ttl_hours: int = 24
) -> StoredResponse | None:
    async with db.begin() as uow:
        return await begin_request(
            uow, scope, key, request_hash(payload), ttl=timedelta(hours=ttl_hours)
        )


async def complete(db: Database, status: int, body: Any, *, key: str = "k-1") -> None:
    async with db.begin() as uow:
        await complete_request(uow, SCOPE, key, status, body)


class RequestFailed(Exception):
    pass


async def begin_then_fail(db: Database) -> None:
    async with db.begin() as uow:
        await begin_request(uow, SCOPE, "k-1", request_hash(PAYMENT))
        raise RequestFailed


# --- on both databases --------------------------------------------------------------------


async def test_the_first_request_reserves_the_key_and_a_retry_gets_the_stored_response(
    db: Database,
) -> None:
    assert await begin(db, PAYMENT) is None
    await complete(db, 201, {"payment_id": "p-9", "amount": "61.20"})

    again = await begin(db, dict(reversed(PAYMENT.items())))  # same request, other key order

    assert again == StoredResponse(status_code=201, body={"payment_id": "p-9", "amount": "61.20"})


async def test_the_same_key_with_a_different_request_is_refused_as_key_reused(
    db: Database,
) -> None:
    assert await begin(db, PAYMENT) is None
    with pytest.raises(KeyReused) as before_completion:
        await begin(db, {**PAYMENT, "amount": "99.00"})
    await complete(db, 201, {"payment_id": "p-9"})

    with pytest.raises(KeyReused) as after_completion:
        await begin(db, {**PAYMENT, "amount": "99.00"})

    assert before_completion.value.code == after_completion.value.code == "idempotency.key_reused"
    assert KeyReused.http_status == 422


async def test_a_retry_before_the_first_request_completes_is_refused_as_in_progress(
    db: Database,
) -> None:
    assert await begin(db, PAYMENT) is None

    with pytest.raises(InProgress) as refused:
        await begin(db, PAYMENT)

    assert refused.value.code == "idempotency.in_progress"
    assert InProgress.http_status == 409


async def test_of_two_requests_arriving_together_one_reserves_and_one_is_in_progress(
    db: Database,
) -> None:
    reserved, release = asyncio.Event(), asyncio.Event()

    async def first() -> StoredResponse | None:
        async with db.begin() as uow:
            result = await begin_request(uow, SCOPE, "k-1", request_hash(PAYMENT))
            reserved.set()
            await release.wait()  # still processing, not committed
            return result

    async def second() -> StoredResponse | None:
        await reserved.wait()
        return await begin(db, PAYMENT)  # PostgreSQL: waits on the key; SQLite: on the writer

    first_task, second_task = asyncio.create_task(first()), asyncio.create_task(second())
    await reserved.wait()
    await asyncio.sleep(0.1)
    release.set()
    results = await asyncio.gather(first_task, second_task, return_exceptions=True)

    assert results[0] is None
    assert isinstance(results[1], InProgress)


async def test_a_reservation_rolled_back_with_its_failed_request_frees_the_key(
    db: Database,
) -> None:
    with pytest.raises(RequestFailed):
        await begin_then_fail(db)

    assert await begin(db, PAYMENT) is None


async def test_an_expired_record_is_replaced_by_a_new_reservation(
    db: Database, clock: ManualClock
) -> None:
    assert await begin(db, PAYMENT, ttl_hours=1) is None
    await complete(db, 201, {"payment_id": "p-old"})
    assert await begin(db, {"other": True}, key="k-stuck", ttl_hours=1) is None  # never completed
    clock.advance(timedelta(hours=1, seconds=1))

    assert await begin(db, {**PAYMENT, "amount": "5.00"}) is None  # no KeyReused: it expired
    assert await begin(db, {"other": True}, key="k-stuck") is None  # no InProgress either
    await complete(db, 200, {"payment_id": "p-new"})

    assert await begin(db, {**PAYMENT, "amount": "5.00"}) == StoredResponse(
        200, {"payment_id": "p-new"}
    )
    async with db.connection() as conn:
        row = (
            await conn.execute(sa.select(idempotency_table).where(idempotency_table.c.key == "k-1"))
        ).one()
    assert row.created_at == clock.now()
    assert row.expires_at == clock.now() + timedelta(hours=24)


async def test_a_record_is_still_valid_until_its_expiry(db: Database, clock: ManualClock) -> None:
    assert await begin(db, PAYMENT, ttl_hours=1) is None
    clock.advance(timedelta(minutes=59))

    with pytest.raises(KeyReused):
        await begin(db, {**PAYMENT, "amount": "5.00"})


async def test_the_same_key_in_another_scope_is_independent(db: Database) -> None:
    assert await begin(db, PAYMENT) is None
    await complete(db, 201, {"payment_id": "p-9"})

    assert await begin(db, {"refund": "p-9"}, scope="refunds") is None


async def test_purge_removes_only_expired_records(db: Database, clock: ManualClock) -> None:
    assert await begin(db, PAYMENT, key="short", ttl_hours=1) is None
    assert await begin(db, PAYMENT, key="long", ttl_hours=48) is None
    clock.advance(timedelta(hours=2))

    async with db.begin() as uow:
        assert await purge_expired(uow) == 1

    async with db.connection() as conn:
        keys = (await conn.execute(sa.select(idempotency_table.c.key))).scalars().all()
    assert keys == ["long"]


# --- request_hash properties --------------------------------------------------------------

# JSON documents without floats or booleans, where Python equality is JSON equality
# (1 == 1.0 == True in Python, but they are different JSON documents).
json_values = st.recursive(
    st.none() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=20,
)
payloads = st.dictionaries(st.text(max_size=6), json_values, max_size=6)


def reorder(value: Any, rng: random.Random) -> Any:
    """The same document with every object's keys in another order."""
    if isinstance(value, dict):
        keys = list(value)
        rng.shuffle(keys)
        return {k: reorder(value[k], rng) for k in keys}
    if isinstance(value, list):
        return [reorder(v, rng) for v in value]
    return value


@given(payloads, st.randoms(use_true_random=False))
def test_request_hash_ignores_key_order(payload: dict[str, Any], rng: random.Random) -> None:
    shuffled = reorder(payload, rng)

    assert shuffled == payload
    assert request_hash(shuffled) == request_hash(payload)


@given(payloads, payloads)
def test_request_hash_is_equal_exactly_for_equal_payloads(
    a: dict[str, Any], b: dict[str, Any]
) -> None:
    assert (request_hash(a) == request_hash(b)) == (a == b)


@given(payloads, st.text(max_size=6), json_values)
def test_changing_one_field_changes_the_request_hash(
    payload: dict[str, Any], key: str, value: Any
) -> None:
    changed = {**payload, key: value}

    assert (request_hash(changed) == request_hash(payload)) == (changed == payload)
    assert len(request_hash(payload)) == 64
