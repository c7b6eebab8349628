"""Property: whatever mix of repeats and orders the edge sends, HQ stores each sale once."""

from __future__ import annotations

import random

import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forecourt.sales.store import sale_t
from tests.sales.conftest import Hq, make_sale


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
