"""The edge's staff keys on a kid it does not know: fetched from HQ at once when the last
refresh got no keys (HQ makes its first signing key when it first signs), and never a flood of
fetches for made-up kids."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm

from forecourt.edge.cashiers import InvalidStaffToken, StaffKeys, StaffTokens
from forecourt.edge.journal import Journal
from tests.support import ManualClock


class Hq:
    """HQ's ``GET /v1/auth/keys`` as the edge sees it: a key set that may be empty, or no
    answer at all; every fetch counted."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.down = False
        self.fetches = 0

    async def fetch(self) -> Any:
        self.fetches += 1
        if self.down:
            raise ConnectionError("HQ is away")
        return {"keys": list(self.keys)}

    def publish(self) -> tuple[str, Ed25519PrivateKey]:
        """A new signing key, published in the key set."""
        kid, private = str(uuid.uuid4()), Ed25519PrivateKey.generate()
        jwk = json.loads(OKPAlgorithm.to_jwk(private.public_key()))
        self.keys.append({**jwk, "kid": kid, "alg": "EdDSA", "use": "sig"})
        return kid, private


class Monotonic:
    """A monotonic clock that moves only when the test moves it."""

    def __init__(self) -> None:
        self.at = 1000.0

    def __call__(self) -> float:
        return self.at


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    found = Journal(tmp_path / "edge.db", ManualClock())
    await found.open()
    yield found
    await found.close()


def token(clock: ManualClock, kid: str, private: Ed25519PrivateKey | None = None) -> str:
    now = int(clock.now().timestamp())
    claims = {
        "iss": "forecourt",
        "aud": "forecourt",
        "sub": "cashier-1",
        "kind": "user",
        "grants": [["cashier", "station:S001"]],
        "iat": now,
        "exp": now + 300,
        "jti": str(uuid.uuid4()),
    }
    key = private or Ed25519PrivateKey.generate()
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": kid})


def tokens_of(keys: StaffKeys, clock: ManualClock) -> StaffTokens:
    return StaffTokens(
        keys, clock, issuer="forecourt", audience="forecourt", charge_roles=["cashier"]
    )


@pytest.mark.parametrize("hq_state", ["no keys yet", "away"])
async def test_a_kid_published_after_a_refresh_that_got_no_keys_is_taken_at_once(
    journal: Journal, hq_state: str
) -> None:
    hq = Hq()
    hq.down = hq_state == "away"
    clock, monotonic = ManualClock(), Monotonic()
    keys = StaffKeys(journal, clock, hq.fetch, miss_interval_s=5.0, monotonic=monotonic)
    staff = tokens_of(keys, clock)
    assert not await keys.refresh()  # the edge's refresh at start: nothing to hold

    # HQ comes back (or makes its first key as it signs the cashier's token) a moment later.
    monotonic.at += 0.01
    hq.down = False
    kid, private = hq.publish()
    started = time.monotonic()
    principal = await staff.principal(token(clock, kid, private))

    assert principal.subject == "cashier-1"
    assert kid in keys.kids
    assert hq.fetches == 2
    assert time.monotonic() - started < 1.0


async def test_a_kid_unknown_at_first_is_taken_on_the_next_request_once_published(
    journal: Journal,
) -> None:
    hq = Hq()
    clock, monotonic = ManualClock(), Monotonic()
    keys = StaffKeys(journal, clock, hq.fetch, miss_interval_s=5.0, monotonic=monotonic)
    staff = tokens_of(keys, clock)
    kid, private = str(uuid.uuid4()), Ed25519PrivateKey.generate()

    with pytest.raises(InvalidStaffToken, match="unknown key"):
        await staff.claims(token(clock, kid, private))  # HQ has no key at all yet

    # HQ publishes it a moment later: the next request takes it, well within the 5 s.
    jwk = json.loads(OKPAlgorithm.to_jwk(private.public_key()))
    hq.keys.append({**jwk, "kid": kid, "alg": "EdDSA"})
    monotonic.at += keys.miss_retry_s
    claims = await staff.claims(token(clock, kid, private))
    assert claims["sub"] == "cashier-1"


async def test_once_hq_answered_with_its_keys_a_new_kid_waits_for_the_miss_interval(
    journal: Journal,
) -> None:
    hq = Hq()
    hq.publish()
    clock, monotonic = ManualClock(), Monotonic()
    keys = StaffKeys(journal, clock, hq.fetch, miss_interval_s=5.0, monotonic=monotonic)
    staff = tokens_of(keys, clock)
    assert await keys.refresh()
    kid, private = str(uuid.uuid4()), Ed25519PrivateKey.generate()

    with pytest.raises(InvalidStaffToken, match="unknown key"):
        await staff.claims(token(clock, kid, private))
    assert hq.fetches == 2  # the first miss asks HQ
    jwk = json.loads(OKPAlgorithm.to_jwk(private.public_key()))
    hq.keys.append({**jwk, "kid": kid, "alg": "EdDSA"})
    monotonic.at += 1.0
    with pytest.raises(InvalidStaffToken, match="unknown key"):
        await staff.claims(token(clock, kid, private))
    assert hq.fetches == 2  # within the miss interval: not again
    monotonic.at += 4.0
    assert (await staff.claims(token(clock, kid, private)))["sub"] == "cashier-1"
    assert hq.fetches == 3


@pytest.mark.parametrize("hq_state", ["answers", "no keys yet", "away"])
async def test_a_flood_of_made_up_kids_makes_a_bounded_number_of_fetches(
    journal: Journal, hq_state: str
) -> None:
    hq = Hq()
    if hq_state == "answers":
        hq.publish()
    hq.down = hq_state == "away"
    clock, monotonic = ManualClock(), Monotonic()
    keys = StaffKeys(
        journal, clock, hq.fetch, miss_interval_s=5.0, miss_retry_s=0.1, monotonic=monotonic
    )
    staff = tokens_of(keys, clock)
    await keys.refresh()
    before = hq.fetches

    # 100 forged tokens, one every 10 ms of the edge's clock: one second of a flood.
    for _ in range(100):
        with pytest.raises(InvalidStaffToken, match="unknown key"):
            await staff.claims(token(clock, str(uuid.uuid4())))
        monotonic.at += 0.01

    fetched = hq.fetches - before
    if hq_state == "answers":
        assert fetched == 1  # once per miss interval
    else:
        # At once, then after 0.1, 0.2 and 0.4 s (doubling up to the miss interval).
        assert 1 <= fetched <= 4, fetched


async def test_a_flood_of_made_up_kids_against_a_failing_hq_over_real_time_stays_bounded(
    journal: Journal,
) -> None:
    hq = Hq()
    hq.down = True
    clock = ManualClock()
    keys = StaffKeys(journal, clock, hq.fetch, miss_interval_s=5.0, miss_retry_s=0.1)
    staff = tokens_of(keys, clock)
    await keys.refresh()
    before = hq.fetches
    started = time.monotonic()
    for _ in range(100):
        with pytest.raises(InvalidStaffToken, match="unknown key"):
            await staff.claims(token(clock, str(uuid.uuid4())))
    elapsed = time.monotonic() - started
    # The gaps double from 0.1 s: within `elapsed` seconds at most 1 + log2(elapsed / 0.1) + 1.
    bound = 2 + max(0, int(elapsed / 0.1).bit_length())
    assert hq.fetches - before <= min(bound, 10), (hq.fetches - before, elapsed)
