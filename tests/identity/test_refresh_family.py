"""The refresh-token family as a state machine, against the real service on SQLite: random
sequences of refreshes (of any token issued so far), sign-outs and time passing, checked
against a model of what each should answer, and after every step against the family's rows
(never more than one live token)."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forecourt.identity.domain import RefreshReused, TokenExpired
from forecourt.identity.store import hash_token, reading
from forecourt.infra.db import Database
from tests.identity.conftest import PASSWORD, open_db, service_on, user_with
from tests.support import ManualClock

REFRESH_S = 12 * 3600
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("refresh"), st.integers(0, 20)),
        st.tuples(st.just("advance"), st.sampled_from([60, REFRESH_S // 3, REFRESH_S])),
        st.tuples(st.just("sign_out"), st.integers(0, 20)),
    ),
    min_size=1,
    max_size=12,
)
_names = itertools.count()


@dataclass
class Model:
    tokens: list[str]
    issued_at: list[float]
    live: int | None = 0  # the index of the one token not used up, if any
    revoked: bool = False
    now: float = 0.0
    answers: list[str] = field(default_factory=list)

    def expect_refresh(self, i: int) -> str:
        if self.revoked or i != self.live:
            return "reused"
        if self.now >= self.issued_at[i] + REFRESH_S:
            return "expired"
        return "ok"


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('family') / 'hq.db'}"

    async def make() -> None:
        db = await open_db(url)
        await db.dispose()

    asyncio.run(make())
    return url


async def _live_tokens(db: Database, token: str) -> int:
    async with reading(db) as store:
        row = await store.refresh_token(hash_token(token))
        assert row is not None
        family = await store.family(row.family_id)
    return sum(1 for r in family if r.used_at is None and r.revoked_at is None)


async def _run(url: str, steps: list[tuple[str, int]]) -> None:
    clock = ManualClock()
    db = await open_db(url, clock)
    try:
        identity = service_on(db)
        name = f"u{next(_names)}"
        await user_with(identity, name)
        pair = await identity.sign_in(name, PASSWORD, source=None)
        model = Model(tokens=[pair.refresh_token], issued_at=[0.0])
        for what, n in steps:
            if what == "advance":
                clock.advance(n)
                model.now += n
                continue
            i = n % len(model.tokens)
            if what == "sign_out":
                await identity.sign_out(model.tokens[i])
                model.revoked = True
                model.live = None
            else:
                expected = model.expect_refresh(i)
                try:
                    fresh = await identity.refresh(model.tokens[i], source=None)
                    got = "ok"
                except RefreshReused:
                    got = "reused"
                except TokenExpired:
                    got = "expired"
                assert got == expected, (steps, what, i, model)
                if got == "ok":
                    model.tokens.append(fresh.refresh_token)
                    model.issued_at.append(model.now)
                    model.live = len(model.tokens) - 1
                    principal = await identity.verifier.verify(fresh.access_token)
                    assert principal.subject == name
                elif got == "reused":
                    model.revoked = True
                    model.live = None
            live = await _live_tokens(db, model.tokens[0])
            assert live <= 1
            if model.revoked:
                assert live == 0
    finally:
        await db.dispose()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=STEPS)
def test_the_family_answers_as_the_model_says(migrated: str, steps: list[tuple[str, int]]) -> None:
    asyncio.run(_run(migrated, steps))


def test_the_model_runs_on_a_real_file(migrated: str, tmp_path: Path) -> None:
    # One known sequence: rotate twice, replay the first, then nothing of the family is live
    asyncio.run(_run(migrated, [("refresh", 0), ("refresh", 1), ("refresh", 0), ("refresh", 2)]))
