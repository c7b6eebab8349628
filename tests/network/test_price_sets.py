"""Price sets published at head office: stored as one set, shipped in station snapshots,
and refused with every problem named when they are in the past, leave a gap or make no sense.

Everything that touches the database runs twice, on SQLite and on PostgreSQL (``db_url``).
The head office runs on a fixed clock, 2026-06-01 12:00 in Shanghai, with the sample chain
imported (its January prices in force, a price change on 2026-11-13 scheduled).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import yaml
from hypothesis import given
from hypothesis import strategies as st

from forecourt.bootstrap import HeadOffice, build_head_office
from forecourt.infra.db import Database, audit_outbox_table, outbox_table
from forecourt.infra.migrate import downgrade, upgrade
from forecourt.kernel.money import CURRENCY_EXPONENTS, UnitPrice
from forecourt.network.contracts import SnapshotPrice, StationSnapshot
from forecourt.network.domain import (
    MAX_MINOR_PER_LITRE,
    PriceScope,
    PriceSet,
    PriceSetExists,
    parse_unit_price,
)
from forecourt.network.handlers import SAMPLE_CHAIN, build_snapshot, import_chain, load_chain_file
from forecourt.network.store import NetworkStore, price_t
from forecourt.settings import Settings
from tests.cli import support as cli
from tests.network.support import StaffAuth

CST = timezone(timedelta(hours=8))
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=CST)
CHRISTMAS_EVE = datetime(2026, 12, 24, tzinfo=CST)
JULY = datetime(2026, 7, 1, 6, 0, tzinfo=CST)
US = timedelta(microseconds=1)
ALL_GRADES = {"92": "7.89", "95": "8.41", "98": "9.20", "0": "7.35"}


class FixedClock:
    def __init__(self, now: datetime) -> None:
        self.at = now

    def now(self) -> datetime:
        return self.at


@dataclass
class Office:
    hq: HeadOffice
    clock: FixedClock
    client: httpx.AsyncClient  # signed in as an HQ admin

    @property
    def db(self) -> Database:
        return self.hq.db

    async def publish(self, **body: Any) -> httpx.Response:
        body.setdefault("effective_from", CHRISTMAS_EVE.isoformat())
        body.setdefault("scope", "chain")
        body.setdefault("prices", dict(ALL_GRADES))
        return await self.client.post("/v1/network/price-sets", json=body)


@pytest.fixture
async def office(db_url: str) -> AsyncIterator[Office]:
    """A migrated head office with the sample chain imported, on SQLite or PostgreSQL."""
    clock = FixedClock(NOW)
    hq = build_head_office(Settings(database_url=db_url, log_json=False), clock=clock)
    await hq.start(relay=False)
    await import_chain(hq.db, load_chain_file(SAMPLE_CHAIN))
    transport = httpx.ASGITransport(app=hq.app)
    try:
        # As an HQ admin, signed in again as the clock moves (months ahead, and back).
        async with httpx.AsyncClient(
            transport=transport, base_url="http://hq", auth=StaffAuth(hq.identity)
        ) as client:
            yield Office(hq, clock, client)
    finally:
        await hq.stop()


def refusal(response: httpx.Response, status: int, code: str) -> list[str]:
    """The problems of a refusal in the error envelope, after checking its status and code."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert "\n" not in error["message"]
    problems: list[str] = error["details"]["problems"]
    assert problems
    return problems


async def revision(db: Database) -> int:
    async with db.connection() as conn:
        return await NetworkStore(conn).revision()


# --- publishing, and the snapshot an edge receives ----------------------------------------


async def test_a_published_set_reaches_every_station_snapshot_in_its_scope(office: Office) -> None:
    # Given the sample chain at revision 1
    assert await revision(office.db) == 1
    # When a chain-wide set for Christmas Eve is published
    response = await office.publish()
    # Then it is stored as one set with exact milli-minor prices
    assert response.status_code == 201, response.text
    published = response.json()
    set_id = published["price_set_id"]
    assert published["status"] == "upcoming"
    assert published["scope"] == "chain"
    assert published["scope_code"] == "DEMO"
    assert published["prices"]["92"] == {"price": "7.89", "milli_minor_per_litre": 789_000}
    assert datetime.fromisoformat(published["effective_from"]) == CHRISTMAS_EVE
    # And a new network revision is announced and audited
    assert await revision(office.db) == 2
    async with office.db.connection() as conn:
        events = list(await conn.scalars(sa.select(outbox_table.c.data)))
        actions = list(await conn.scalars(sa.select(audit_outbox_table.c.action)))
    assert set_id in events[-1]
    assert actions[-1] == "network.price_set.publish"
    # And every station's snapshot ships its prices with the instant and the set id
    for station in ("S001", "S002", "S003"):
        snapshot = await build_snapshot(office.db, station, NOW)
        tagged = [p for p in snapshot.prices if p.price_set_id == set_id]
        assert {p.grade for p in tagged} == set(ALL_GRADES), station
        assert all(p.effective_from == CHRISTMAS_EVE for p in tagged)
        assert snapshot.version == 2


async def test_prices_at_picks_the_old_price_before_the_instant_and_the_set_from_it(
    office: Office,
) -> None:
    # Given a station set for S001 from 1 July 06:00 Shanghai time
    response = await office.publish(
        scope="station", scope_code="S001", effective_from=JULY.isoformat()
    )
    set_id = response.json()["price_set_id"]
    # When S001's snapshot is built now
    snapshot = await build_snapshot(office.db, "S001", NOW)
    # Then a microsecond before the instant the chain file's price holds, without a set
    before = snapshot.prices_at(JULY - US)["92"]
    assert (before.milli_minor_per_litre, before.price_set_id) == (762_000, None)
    # And from the instant on the set's price holds, carrying the set id
    at = snapshot.prices_at(JULY)["92"]
    assert (at.milli_minor_per_litre, at.price_set_id) == (789_000, set_id)
    assert snapshot.next_price_change_after(NOW) == JULY
    # And when the clock passes the instant, the snapshot built then has it in force
    office.clock.at = JULY + timedelta(hours=1)
    later = await build_snapshot(office.db, "S001", office.clock.now())
    assert later.prices_at(office.clock.now())["95"].price_set_id == set_id
    # And another station's snapshot knows nothing of it
    s002 = await build_snapshot(office.db, "S002", NOW)
    assert all(p.price_set_id != set_id for p in s002.prices)


async def test_a_snapshot_without_price_sets_reads_and_writes_as_before(office: Office) -> None:
    # Given a snapshot holding only chain-file prices
    snapshot = await build_snapshot(office.db, "S001", NOW)
    # When it is written as JSON, its prices have no price_set_id field (older edges read it)
    written = snapshot.model_dump_json()
    assert "price_set_id" not in written
    # And a snapshot written before price sets existed still parses, with no set
    assert StationSnapshot.model_validate_json(written) == snapshot
    price = SnapshotPrice.model_validate_json(snapshot.prices[0].model_dump_json())
    assert price.price_set_id is None


async def test_the_same_set_published_again_is_answered_without_a_change(office: Office) -> None:
    # Given a published set
    first = await office.publish()
    # When the same request is sent again (a retry)
    again = await office.publish()
    # Then it answers 200 with the same set, and no new revision
    assert again.status_code == 200, again.text
    assert again.json()["price_set_id"] == first.json()["price_set_id"]
    assert await revision(office.db) == 2


async def test_a_different_set_for_the_same_scope_and_instant_is_a_conflict_unless_replaced(
    office: Office,
) -> None:
    # Given a published chain set for Christmas Eve
    first = (await office.publish()).json()["price_set_id"]
    # When another one for the same scope and instant is published
    other = {**ALL_GRADES, "92": "7.99"}
    conflict = await office.publish(prices=other)
    # Then it is refused with 409, naming the set in the way
    problems = refusal(conflict, 409, "network.price_set_exists")
    assert "92=789000" in problems[0]
    assert conflict.json()["error"]["details"]["price_set_id"] == first
    # When it is sent with replace
    replaced = await office.publish(prices=other, replace=True)
    # Then the new set takes the first one's place, which is kept on record as withdrawn
    assert replaced.status_code == 201, replaced.text
    second = replaced.json()["price_set_id"]
    gone = (await office.client.get(f"/v1/network/price-sets/{first}")).json()
    assert gone["status"] == "withdrawn"
    snapshot = await build_snapshot(office.db, "S001", NOW)
    assert snapshot.prices_at(CHRISTMAS_EVE)["92"].price_set_id == second
    assert snapshot.prices_at(CHRISTMAS_EVE)["92"].milli_minor_per_litre == 799_000


# --- refusals -------------------------------------------------------------------------------


async def test_a_set_without_a_utc_offset_is_refused(office: Office) -> None:
    # When a set's instant is a local time without an offset
    response = await office.publish(effective_from="2026-12-24T00:00:00")
    # Then it is refused, saying so
    problems = refusal(response, 422, "network.price_set_invalid")
    assert problems == [
        "effective_from: has no UTC offset (give one, e.g. 2026-12-24T00:00:00+08:00)"
    ]
    assert await revision(office.db) == 1


async def test_a_set_in_the_past_is_refused_and_one_at_the_current_instant_is_taken(
    office: Office,
) -> None:
    # When a set starts a microsecond before head office's now
    past = await office.publish(effective_from=(NOW - US).isoformat())
    # Then it is refused, naming the instant and head office's time
    problems = refusal(past, 422, "network.price_set_invalid")
    assert "in the past" in problems[0]
    assert NOW.isoformat() in problems[0]
    # And one starting exactly now is taken (no grace either way)
    assert (await office.publish(effective_from=NOW.isoformat())).status_code == 201


async def test_a_set_more_than_a_year_ahead_is_refused(office: Office) -> None:
    response = await office.publish(effective_from=(NOW + timedelta(days=367)).isoformat())
    assert "more than 366 days ahead" in refusal(response, 422, "network.price_set_invalid")[0]


async def test_a_set_that_leaves_a_sold_grade_unpriced_names_each_station_and_grade(
    office: Office,
) -> None:
    # Given 98 is sold at S001 and S002 (EAST) and diesel everywhere
    # When a chain set prices neither
    response = await office.publish(prices={"92": "7.89", "95": "8.41"})
    # Then it is refused: a gap at every station, naming the grades missing there
    problems = refusal(response, 422, "network.price_set_invalid")
    gaps = [p for p in problems if p.startswith("gap:")]
    assert len(gaps) == 3
    assert any("S001" in p and "0, 98" in p for p in gaps), gaps
    assert any("S002" in p and "0, 98" in p for p in gaps), gaps
    assert any("S003" in p and "0" in p for p in gaps), gaps
    message = response.json()["error"]["message"]
    assert message.startswith("price set refused: gap: station S001")
    assert "(and 2 more, see details)" in message
    # And a region set is checked against its own stations only
    west = await office.publish(scope="region", scope_code="WEST", prices={"92": "7.89"})
    west_gaps = refusal(west, 422, "network.price_set_invalid")
    assert all("S003" in p for p in west_gaps)
    assert len(west_gaps) == 1


async def test_unknown_grades_regions_and_stations_are_refused(office: Office) -> None:
    unknown_grade = await office.publish(prices={**ALL_GRADES, "91": "7.00"})
    assert refusal(unknown_grade, 422, "network.price_set_invalid") == [
        "prices.91: unknown grade '91'"
    ]
    unknown_region = await office.publish(scope="region", scope_code="NORTH")
    assert refusal(unknown_region, 422, "network.price_set_invalid") == [
        "scope_code: unknown region 'NORTH'"
    ]
    unknown_station = await office.publish(scope="station", scope_code="S999")
    assert refusal(unknown_station, 422, "network.price_set_invalid") == [
        "scope_code: unknown station 'S999'"
    ]
    unnamed = await office.publish(scope="station")
    assert refusal(unnamed, 422, "network.price_set_invalid") == [
        "scope_code: a station set names its station"
    ]
    other_chain = await office.publish(scope_code="ACME")
    assert "unknown chain 'ACME'" in refusal(other_chain, 422, "network.price_set_invalid")[0]
    assert await revision(office.db) == 1


async def test_every_bad_price_in_a_set_is_listed_together(office: Office) -> None:
    # When one set has a zero, a negative, a too precise, an absurd and a non-decimal price
    response = await office.publish(
        prices={"92": "0", "95": "-8.41", "98": "9.000001", "0": "735"},
        effective_from="2026-12-24T00:00:00",
    )
    # Then all of them, and the missing offset, are refused in one answer
    problems = refusal(response, 422, "network.price_set_invalid")
    assert problems == [
        "effective_from: has no UTC offset (give one, e.g. 2026-12-24T00:00:00+08:00)",
        "prices.0: 735 is above the ceiling of 100.00 CNY/L",
        "prices.92: 0 is not positive",
        "prices.95: -8.41 is not positive",
        "prices.98: 9.000001 is finer than 1/1000 of a CNY minor unit",
    ]
    nan = await office.publish(prices={**ALL_GRADES, "92": "NaN"})
    assert refusal(nan, 422, "network.price_set_invalid") == [
        "prices.92: 'NaN' is not a decimal number"
    ]
    huge = await office.publish(prices={**ALL_GRADES, "92": "1E+999999999"})
    assert "above the ceiling" in refusal(huge, 422, "network.price_set_invalid")[0]


async def test_a_price_given_as_a_json_number_is_an_invalid_request(office: Office) -> None:
    response = await office.client.post(
        "/v1/network/price-sets",
        json={"effective_from": CHRISTMAS_EVE.isoformat(), "prices": {"92": 7.89}},
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "request.invalid"


# --- listing and withdrawing ------------------------------------------------------------------


async def test_the_list_shows_upcoming_and_in_force_sets_per_scope(office: Office) -> None:
    # Given a chain set in July, a later one at Christmas and a WEST region set in July
    july = (await office.publish(effective_from=JULY.isoformat())).json()["price_set_id"]
    xmas = (await office.publish()).json()["price_set_id"]
    west = await office.publish(scope="region", scope_code="WEST", effective_from=JULY.isoformat())
    west_id = west.json()["price_set_id"]
    # When the clock passes July
    office.clock.at = JULY + timedelta(days=1)
    # Then the July sets are in force and the Christmas one upcoming
    listed = (await office.client.get("/v1/network/price-sets")).json()["items"]
    assert [(s["price_set_id"], s["status"]) for s in listed] == [
        (july, "in_force"),
        (west_id, "in_force"),
        (xmas, "upcoming"),
    ]
    # And the list filters by scope
    regional = await office.client.get(
        "/v1/network/price-sets", params={"scope": "region", "scope_code": "WEST"}
    )
    assert [s["price_set_id"] for s in regional.json()["items"]] == [west_id]
    # When the clock passes Christmas, the July chain set is superseded and left out
    office.clock.at = CHRISTMAS_EVE
    chain_sets = await office.client.get("/v1/network/price-sets", params={"scope": "chain"})
    assert [s["price_set_id"] for s in chain_sets.json()["items"]] == [xmas]
    every = await office.client.get(
        "/v1/network/price-sets", params={"scope": "chain", "every": "true"}
    )
    assert [s["status"] for s in every.json()["items"]] == ["superseded", "in_force"]


async def test_an_upcoming_set_can_be_withdrawn_and_one_in_force_cannot(office: Office) -> None:
    # Given a set for July
    set_id = (await office.publish(effective_from=JULY.isoformat())).json()["price_set_id"]
    # When it is withdrawn before its instant
    withdrawn = await office.client.delete(f"/v1/network/price-sets/{set_id}")
    # Then its prices leave the snapshot, a new revision says so, and it stays on record
    assert withdrawn.status_code == 200, withdrawn.text
    assert withdrawn.json()["status"] == "withdrawn"
    assert await revision(office.db) == 3
    snapshot = await build_snapshot(office.db, "S001", NOW)
    assert all(p.price_set_id != set_id for p in snapshot.prices)
    assert (await office.client.delete(f"/v1/network/price-sets/{set_id}")).status_code == 200
    # And a set already in force cannot be withdrawn
    in_force = (await office.publish(effective_from=JULY.isoformat())).json()["price_set_id"]
    office.clock.at = JULY
    refused = await office.client.delete(f"/v1/network/price-sets/{in_force}")
    assert "in force" in refusal(refused, 409, "network.price_set_in_force")[0]
    assert (await office.client.get(f"/v1/network/price-sets/{in_force}")).json()[
        "status"
    ] == "in_force"


async def test_an_unknown_set_is_a_404_with_a_stable_code(office: Office) -> None:
    for response in (
        await office.client.get("/v1/network/price-sets/nope"),
        await office.client.delete("/v1/network/price-sets/nope"),
    ):
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "network.unknown_price_set"


async def test_the_price_list_tags_each_price_with_its_set(office: Office) -> None:
    set_id = (await office.publish()).json()["price_set_id"]
    prices = (await office.client.get("/v1/network/prices")).json()
    assert sum(1 for p in prices if p["price_set_id"] == set_id) == len(ALL_GRADES)
    assert sum(1 for p in prices if p["price_set_id"] is None) == 7
    # And a sale's price_version (a price id) leads to its set, one price at a time
    one = next(p for p in prices if p["price_set_id"] == set_id)
    found = await office.client.get(f"/v1/network/prices/{one['price_id']}")
    assert found.status_code == 200
    assert found.json() == one
    missing = await office.client.get("/v1/network/prices/no-such-price")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "network.unknown_price"


# --- exact conversion of the decimal prices -------------------------------------------------


@given(
    currency=st.sampled_from(sorted(CURRENCY_EXPONENTS)),
    minor_thousandths=st.integers(min_value=1, max_value=MAX_MINOR_PER_LITRE * 1000),
)
def test_a_decimal_price_converts_exactly_and_round_trips(
    currency: str, minor_thousandths: int
) -> None:
    # Given any price up to the ceiling, in milli-minor units, written as a decimal string
    text = f"{UnitPrice(minor_thousandths, currency).to_decimal():f}"
    # When it is parsed
    value, problem = parse_unit_price("92", text, currency)
    # Then it is the same integer, and writing it again gives the same decimal
    assert problem is None
    assert value == minor_thousandths
    assert Decimal(text) == UnitPrice(value, currency).to_decimal()


@given(
    currency=st.sampled_from(sorted(CURRENCY_EXPONENTS)),
    digits=st.integers(min_value=1, max_value=10**30),
    places=st.integers(min_value=0, max_value=30),
)
def test_a_price_finer_than_a_milli_minor_unit_is_never_rounded_into_one(
    currency: str, digits: int, places: int
) -> None:
    # Given any positive decimal
    value = Decimal(digits).scaleb(-places)
    text = f"{value:f}"
    # When it is parsed, it is either exact or refused: never rounded
    parsed, problem = parse_unit_price("92", text, currency)
    if parsed is None:
        assert problem is not None
    else:
        assert UnitPrice(parsed, currency).to_decimal() == value


# --- the command line -------------------------------------------------------------------------


def test_forecourt_publish_prices_publishes_a_file_and_lists_every_problem_of_a_bad_one(
    tmp_path: Path,
) -> None:
    # Given an HQ database with the sample chain
    database = f"sqlite:///{tmp_path / 'hq.db'}"
    assert cli.run(["import", "--sample", "--database-url", database], tmp_path).code == 0
    # When a price set file for the day after tomorrow (by the real clock) is published
    starts = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
    good = tmp_path / "prices.yaml"
    good.write_text(
        yaml.safe_dump({"effective_from": starts.isoformat(), "prices": ALL_GRADES}),
        encoding="utf-8",
    )
    done = cli.run(["publish-prices", str(good), "--database-url", database], tmp_path)
    # Then it prints the set it stored
    assert done.code == 0, done.stderr
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert printed["created"] is True
    assert printed["prices_milli_minor_per_litre"]["92"] == 789_000
    # When a file with a gap and an unknown grade is published
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"effective_from": starts.isoformat(), "prices": {"91": "7.00"}}),
        encoding="utf-8",
    )
    refused = cli.run(["publish-prices", str(bad), "--database-url", database], tmp_path)
    # Then it fails with one error line, and every problem is listed
    assert refused.code == 1
    assert refused.one_line_error().startswith("price set refused: prices.91: unknown grade")
    assert "  - gap: station S003" in refused.stdout


# --- the schema -------------------------------------------------------------------------------


async def test_the_price_set_migration_goes_back_keeping_the_prices_and_forward_again(
    office: Office,
) -> None:
    # Given a published set
    await office.publish()
    # When the network schema goes back to before price sets
    await downgrade(office.db, "network", "network_0001")
    # Then every price is still there (only its set membership is gone)
    async with office.db.connection() as conn:
        count = await conn.scalar(sa.select(sa.func.count()).select_from(price_t))
    assert count == 7 + len(ALL_GRADES)
    # And going forward again gives the tables back, empty of sets
    await upgrade(office.db)
    listed = await office.client.get("/v1/network/price-sets", params={"every": "true"})
    assert listed.json()["items"] == []


async def test_two_sets_racing_for_the_same_scope_and_instant_store_one_and_refuse_the_other(
    office: Office,
) -> None:
    # Given one set stored for the chain at Christmas Eve
    first = (await office.publish()).json()["price_set_id"]
    # When another one for the same scope and instant gets past the checks (a race) and is stored
    racing = PriceSet(
        price_set_id="racing",
        scope=PriceScope.CHAIN,
        scope_code="DEMO",
        effective_from=CHRISTMAS_EVE,
        currency="CNY",
        prices=(("92", 799_000),),
        created_at=NOW,
    )
    with pytest.raises(PriceSetExists):
        async with office.db.begin() as uow:
            await NetworkStore(uow.conn).add_price_set(racing)
    # Then the price table's unique key refused it, and only the first is stored
    listed = (await office.client.get("/v1/network/price-sets")).json()["items"]
    assert [s["price_set_id"] for s in listed] == [first]
