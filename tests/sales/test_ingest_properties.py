"""Properties: whatever mix of repeats and orders the edge sends, HQ stores each sale once;
whatever mix of valid and invalid items a batch holds, each valid one is stored once and
each invalid one refused, in order."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forecourt.sales.store import sale_t
from tests.sales.conftest import Hq, make_sale, make_sale_v2


@settings(max_examples=8, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 25), st.integers(0, 2**32), st.integers(1, 6))
async def test_any_interleaving_of_uploads_stores_each_sale_exactly_once(
    hq: Hq, n: int, seed: int, uploads: int
) -> None:
    rng = random.Random(seed)
    station = "S002"
    async with hq.office.db.connection() as conn:
        before = int(
            await conn.scalar(
                sa.select(sa.func.count())
                .select_from(sale_t)
                .where(sale_t.c.station_code == station)
            )
            or 0
        )
    sales = [make_sale() for _ in range(n)]
    statuses: dict[str, set[str]] = {s["sale_id"]: set() for s in sales}
    for _ in range(uploads):
        batch = rng.sample(sales, rng.randint(1, n))
        batch += rng.sample(batch, rng.randint(0, len(batch)))  # repeats inside the batch
        rng.shuffle(batch)
        response = await hq.upload(station, batch)
        assert response.status_code == 200
        for r in response.json()["results"]:
            statuses[r["sale_id"]].add(r["status"])
    for s in sales:  # and a final complete upload, as an edge catching up would send
        response = await hq.upload(station, [s])
        statuses[s["sale_id"]].add(response.json()["results"][0]["status"])
    async with hq.office.db.connection() as conn:
        after = int(
            await conn.scalar(
                sa.select(sa.func.count())
                .select_from(sale_t)
                .where(sale_t.c.station_code == station)
            )
            or 0
        )
    assert after - before == n
    assert all(seen <= {"created", "duplicate"} and "created" in seen for seen in statuses.values())


# Ways an item breaks the upload schema (each leaves the item unusable as a sale).
BREAKAGES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "negative_volume": lambda s: {**s, "volume_ml": -1},
    "volume_as_text": lambda s: {**s, "volume_ml": str(s["volume_ml"])},
    "naive_time": lambda s: {**s, "ended_at": "2026-11-25T01:02:00"},
    "unknown_field": lambda s: {**s, "surprise": True},
    "missing_grade": lambda s: {k: v for k, v in s.items() if k != "grade"},
    "bad_sale_id": lambda s: {**s, "sale_id": "not-a-uuid"},
    "bad_device_flag": lambda s: {**s, "device_flags": ["Bad Flag"], "schema_version": 2},
    "v2_without_device": lambda s: {**s, "schema_version": 2},
    "unknown_item_version": lambda s: {**s, "schema_version": 7},
    "not_an_object": lambda s: [s],
}


@settings(max_examples=12, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.one_of(
            st.just("v1"), st.just("v2"), st.sampled_from(sorted(BREAKAGES)).map("bad:".__add__)
        ),
        min_size=1,
        max_size=30,
    )
)
async def test_any_mix_of_valid_and_invalid_items_stores_each_valid_once_and_refuses_the_rest(
    hq: Hq, kinds: list[str]
) -> None:
    items: list[Any] = []
    for kind in kinds:
        if kind == "v1":
            items.append(make_sale())
        elif kind == "v2":
            items.append(make_sale_v2())
        else:
            items.append(BREAKAGES[kind.removeprefix("bad:")](make_sale()))
    response = await hq.upload("S001", items, schema_version=2)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(items)
    assert [r["index"] for r in results] == list(range(len(items)))
    valid_ids: list[UUID] = []
    refused_ids: list[UUID] = []  # those whose sale_id is still readable
    for kind, item, result in zip(kinds, items, results, strict=True):
        if kind.startswith("bad:"):
            assert result["status"] == "refused", (kind, result)
            assert result["errors"], kind
            if result["sale_id"] is not None:
                refused_ids.append(UUID(result["sale_id"]))
        else:
            assert result["status"] == "created", (kind, result)
            assert result["sale_id"] == item["sale_id"]
            valid_ids.append(UUID(item["sale_id"]))
    async with hq.office.db.connection() as conn:
        stored = list(
            await conn.scalars(
                sa.select(sale_t.c.sale_id).where(sale_t.c.sale_id.in_(valid_ids + refused_ids))
            )
        )
    assert sorted(stored) == sorted(valid_ids)  # each valid item exactly once, no refused one
