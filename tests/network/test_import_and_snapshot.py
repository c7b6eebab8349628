"""Importing the chain file, station snapshots and the network's HTTP API.

Everything that touches the database runs twice, on SQLite and on PostgreSQL (``db_url``).
The head office runs on a fixed clock: 2026-06-01 12:00 in Shanghai, between the sample
chain's January prices and its price change of 2026-11-13.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import yaml

from forecourt.bootstrap import HeadOffice, build_head_office
from forecourt.infra.db import Database, audit_outbox_table, outbox_table
from forecourt.network.contracts import StationIdentity, StationSnapshot
from forecourt.network.domain import NetworkError, PriceScope, UnknownStation
from forecourt.network.handlers import (
    SAMPLE_CHAIN,
    ImportResult,
    build_snapshot,
    import_chain,
    issue_credential,
    load_chain_file,
    parse_chain,
)
from forecourt.network.store import NetworkStore, price_t
from forecourt.settings import Settings
from tests.network.support import StaffAuth

CST = timezone(timedelta(hours=8))
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=CST)
NOVEMBER_SWITCH = datetime(2026, 11, 13, tzinfo=CST)
US = timedelta(microseconds=1)


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
    anonymous: httpx.AsyncClient  # no credential at all

    @property
    def db(self) -> Database:
        return self.hq.db


@pytest.fixture
async def office(db_url: str) -> AsyncIterator[Office]:
    """A migrated head office with an empty network, on SQLite or PostgreSQL."""
    clock = FixedClock(NOW)
    hq = build_head_office(Settings(database_url=db_url, log_json=False), clock=clock)
    await hq.start(relay=False)
    transport = httpx.ASGITransport(app=hq.app)
    try:
        # Staff reads go as an HQ admin (signed in again as the clock moves); the snapshot
        # sends its station's credential, or none (``anonymous``).
        async with (
            httpx.AsyncClient(
                transport=transport, base_url="http://hq", auth=StaffAuth(hq.identity)
            ) as client,
            httpx.AsyncClient(transport=transport, base_url="http://hq") as anonymous,
        ):
            yield Office(hq, clock, client, anonymous)
    finally:
        await hq.stop()


def sample_document() -> dict[str, Any]:
    document = yaml.safe_load(SAMPLE_CHAIN.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return copy.deepcopy(document)


def station_doc(document: dict[str, Any], code: str) -> dict[str, Any]:
    for region in document["chain"]["regions"]:
        for station in region["stations"]:
            if station["code"] == code:
                return station  # type: ignore[no-any-return]
    raise KeyError(code)


async def stored_prices(db: Database) -> list[tuple[str, str, str, int, datetime, str]]:
    async with db.connection() as conn:
        return [
            (
                p.grade,
                p.scope.value,
                p.scope_code,
                p.milli_minor_per_litre,
                p.effective_from,
                p.price_id,
            )
            for p in await NetworkStore(conn).prices()
        ]


# --- the chain file ------------------------------------------------------------------------


def test_the_sample_chain_file_parses_into_three_stations_in_two_regions() -> None:
    chain = load_chain_file(SAMPLE_CHAIN)
    assert chain.code == "DEMO"
    assert chain.currency == "CNY"
    assert [code for code, _ in chain.regions] == ["EAST", "WEST"]
    assert [(s.code, s.region) for s in chain.stations] == [
        ("S001", "EAST"),
        ("S002", "EAST"),
        ("S003", "WEST"),
    ]
    assert len(chain.prices) == 7
    west_diesel = [p for p in chain.prices if p.scope is PriceScope.REGION]
    assert [(p.grade, p.scope_code, p.milli_minor_per_litre) for p in west_diesel] == [
        ("0", "WEST", 718_000)
    ]


def test_every_problem_in_a_chain_file_is_reported_together() -> None:
    # Given a chain file with five independent mistakes
    document = sample_document()
    s001, s002 = station_doc(document, "S001"), station_doc(document, "S002")
    s001["dispensers"][0]["fuelling_points"][0]["nozzles"][0]["grade"] = "91"
    s001["dispensers"][0]["fuelling_points"][1]["nozzles"][0]["tank"] = 2  # tank 2 holds 95
    s002["dispensers"][1]["model"] = "WAYNE-HELIX"
    station_doc(document, "S003")["timezone"] = "Asia/Chengdu"
    document["chain"]["prices"].append(
        {
            "grade": "95",
            "price": "8.20",
            "region": "NORTH",
            "effective_from": "2026-12-01T00:00:00+08:00",
        }
    )
    # When it is parsed
    with pytest.raises(NetworkError) as caught:
        parse_chain(document)
    # Then one error lists each of them
    problems = caught.value.details["problems"]
    assert caught.value.code == "network.invalid"
    assert len(problems) == 5
    expected = [
        ("S001 FP1 N1", "unknown grade 91"),
        ("S001 FP2 N1", "tank 2 does not hold 92"),
        ("S002 dispenser 2", "unknown model WAYNE-HELIX"),
        ("S003", "unknown timezone 'Asia/Chengdu'"),
        ("price for 95", "unknown region NORTH"),
    ]
    for where, what in expected:
        assert any(where in p and what in p for p in problems), (where, what, problems)


def test_a_chain_file_missing_required_fields_reports_each_of_them() -> None:
    document = sample_document()
    del document["chain"]["currency"]
    del document["chain"]["regions"][0]["stations"][0]["timezone"]
    with pytest.raises(NetworkError) as caught:
        parse_chain(document)
    problems = caught.value.details["problems"]
    assert any(p.startswith("currency") for p in problems)
    assert any("timezone" in p and p.startswith("regions.0.stations.0") for p in problems)


@pytest.mark.parametrize("text", ["- a\n- list\n", "just a string\n", "42\n", ""])
def test_a_chain_file_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str) -> None:
    # Given a YAML file whose top level is not a mapping
    path = tmp_path / "chain.yaml"
    path.write_text(text, encoding="utf-8")
    document = yaml.safe_load(text)
    # When it is loaded, or its parsed document validated, it is refused as the one problem
    for attempt in (lambda: load_chain_file(path), lambda: parse_chain(document)):
        with pytest.raises(NetworkError) as caught:
            attempt()
        assert caught.value.details["problems"] == ["expected a mapping at the top level"]


def test_a_chain_entry_that_is_not_a_mapping_is_reported_as_a_problem() -> None:
    with pytest.raises(NetworkError) as caught:
        parse_chain({"chain": ["DEMO"]})
    assert len(caught.value.details["problems"]) == 1


def test_a_chain_file_that_is_not_yaml_or_not_there_is_refused(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("chain: {code: [unclosed\n", encoding="utf-8")
    with pytest.raises(NetworkError, match="cannot read"):
        load_chain_file(broken)
    with pytest.raises(NetworkError, match="cannot read"):
        load_chain_file(tmp_path / "missing.yaml")


# --- import --------------------------------------------------------------------------------


async def test_importing_the_sample_chain_publishes_revision_one_with_three_stations(
    office: Office,
) -> None:
    # When the sample chain is imported into an empty head office
    result = await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
    # Then it is revision 1 with its three stations and seven prices
    assert result == ImportResult(revision=1, stations=3, prices_added=7, changed=True)
    async with office.db.connection() as conn:
        store = NetworkStore(conn)
        assert await store.revision() == 1
        assert await store.station_codes() == ["S001", "S002", "S003"]
        assert [g.code for g in await store.grades()] == ["0", "92", "95", "98"]
        events = (await conn.execute(sa.select(outbox_table.c.type, outbox_table.c.data))).all()
    assert len(await stored_prices(office.db)) == 7
    # And the new revision is announced through the outbox
    assert [e.type for e in events] == ["com.forecourt.network.revision.published.v1"]
    assert '"revision":1' in events[0].data


async def outbox_types(db: Database) -> list[str]:
    async with db.connection() as conn:
        return list(await conn.scalars(sa.select(outbox_table.c.type).order_by(outbox_table.c.id)))


async def audited_actions(db: Database) -> list[str]:
    async with db.connection() as conn:
        return list(
            await conn.scalars(
                sa.select(audit_outbox_table.c.action).order_by(audit_outbox_table.c.id)
            )
        )


async def test_importing_the_same_chain_again_changes_nothing_and_keeps_the_revision(
    office: Office,
) -> None:
    # Given the sample chain imported once
    await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
    before = await stored_prices(office.db)
    # When the same file is imported again (`forecourt import --sample` run twice)
    again = await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
    # Then it is answered "unchanged": revision 1 is kept and no price is added
    assert again == ImportResult(revision=1, stations=3, prices_added=0, changed=False)
    assert await stored_prices(office.db) == before
    async with office.db.connection() as conn:
        assert await NetworkStore(conn).revision() == 1
        count = await conn.scalar(sa.select(sa.func.count()).select_from(price_t))
    assert count == 7
    # And nothing new is announced or audited, so edges keep the snapshot they have
    assert await outbox_types(office.db) == ["com.forecourt.network.revision.published.v1"]
    assert await audited_actions(office.db) == ["network.import"]
    assert (await build_snapshot(office.db, "S001", NOW)).version == 1


def reorder_everything(document: dict[str, Any]) -> None:
    """The same chain written in another order: every list reversed (shift starts aside,
    whose order is part of the station's definition)."""
    chain = document["chain"]
    for key in ("grades", "dispenser_models", "regions", "prices"):
        chain[key].reverse()
    for region in chain["regions"]:
        region["stations"].reverse()
        for station in region["stations"]:
            station["tanks"].reverse()
            station["dispensers"].reverse()
            for dispenser in station["dispensers"]:
                dispenser["fuelling_points"].reverse()
                for fp in dispenser["fuelling_points"]:
                    fp["nozzles"].reverse()


async def test_the_same_chain_written_in_another_order_is_unchanged(office: Office) -> None:
    await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
    document = sample_document()
    reorder_everything(document)
    again = await import_chain(office.db, parse_chain(document))
    assert (again.revision, again.changed) == (1, False)


def _new_price(document: dict[str, Any]) -> None:
    document["chain"]["prices"].append(
        {
            "grade": "92",
            "price": "7.40",
            "station": "S001",
            "effective_from": "2026-07-01T06:00+08:00",
        }
    )


def _model_rounding(document: dict[str, Any]) -> None:
    document["chain"]["dispenser_models"][0]["rounding"] = "half_even"


def _nozzle_tank(document: dict[str, Any]) -> None:
    s001 = station_doc(document, "S001")
    s001["tanks"].append({"number": 5, "grade": "92", "capacity_l": 10000})
    s001["dispensers"][0]["fuelling_points"][0]["nozzles"][0]["tank"] = 5


def _removed_fuelling_point(document: dict[str, Any]) -> None:
    station_doc(document, "S002")["dispensers"][3]["fuelling_points"].pop()


CHANGES = {
    "a new price": _new_price,
    "a renamed chain": lambda d: d["chain"].update(name="Demo Petroleum Ltd"),
    "a renamed region": lambda d: d["chain"]["regions"][1].update(name="Sichuan"),
    "a renamed grade": lambda d: d["chain"]["grades"][0].update(name="92 RON"),
    "a model's rounding": _model_rounding,
    "a renamed station": lambda d: station_doc(d, "S003").update(name="Chengdu Tianfu Ave"),
    "a new shift": lambda d: station_doc(d, "S001").update(shift_starts=["00:00", "12:00"]),
    "a tank's capacity": lambda d: station_doc(d, "S002")["tanks"][0].update(capacity_l=35000),
    "a nozzle on another tank": _nozzle_tank,
    "a fuelling point less": _removed_fuelling_point,
}


@pytest.mark.parametrize("change", list(CHANGES), ids=list(CHANGES))
async def test_a_real_change_to_the_chain_publishes_a_new_revision(
    office: Office, change: str
) -> None:
    # Given the sample chain imported once
    await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
    # When a file with one change is imported
    document = sample_document()
    CHANGES[change](document)
    changed = await import_chain(office.db, parse_chain(document))
    # Then it is revision 2, announced and audited
    assert (changed.revision, changed.changed) == (2, True)
    assert (await build_snapshot(office.db, "S001", NOW)).version == 2
    assert (await outbox_types(office.db))[-1] == "com.forecourt.network.revision.published.v1"
    assert await audited_actions(office.db) == ["network.import", "network.import"]
    # And importing that changed file again keeps revision 2
    again = await import_chain(office.db, parse_chain(copy.deepcopy(document)))
    assert (again.revision, again.changed, again.prices_added) == (2, False, 0)


# --- snapshots -----------------------------------------------------------------------------


async def test_a_station_snapshot_holds_its_fuelling_points_with_models_and_nozzles(
    office: Office,
) -> None:
    # Given the sample chain
    await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
    # When station S001's snapshot is built
    snapshot = await build_snapshot(office.db, "S001", NOW)
    # Then it describes the station, its tanks and all eight fuelling points
    assert (snapshot.version, snapshot.chain, snapshot.currency) == (1, "DEMO", "CNY")
    assert snapshot.station.code == "S001"
    assert snapshot.station.region == "EAST"
    assert snapshot.station.timezone == "Asia/Shanghai"
    assert [s.isoformat() for s in snapshot.station.shift_starts] == [
        "00:00:00",
        "08:00:00",
        "16:00:00",
    ]
    assert [(t.number, t.grade, t.capacity_ml) for t in snapshot.tanks] == [
        (1, "92", 30_000_000),
        (2, "95", 30_000_000),
        (3, "0", 40_000_000),
        (4, "98", 20_000_000),
    ]
    assert [fp.number for fp in snapshot.fuelling_points] == list(range(1, 9))
    assert [fp.dispenser for fp in snapshot.fuelling_points] == [1, 1, 2, 2, 3, 3, 4, 4]
    models = {
        fp.number: (fp.model.code, fp.model.rounding.value) for fp in snapshot.fuelling_points
    }
    assert models[1] == ("TATSUNO-SUNNY", "half_up")
    assert models[3] == ("CENSTAR-CS46", "half_even")
    fp7 = snapshot.fuelling_point(7)
    assert fp7 is not None
    assert [(n.number, n.grade, n.tank) for n in fp7.nozzles] == [
        (1, "92", 1),
        (2, "95", 2),
        (3, "98", 4),
    ]
    assert snapshot.fuelling_point(9) is None
    # And it reads back from its JSON unchanged (it is what edges persist)
    assert StationSnapshot.model_validate_json(snapshot.model_dump_json()) == snapshot


async def test_a_snapshot_carries_the_price_in_force_and_switches_at_each_scheduled_price(
    office: Office,
) -> None:
    # Given the sample chain plus a station price for S001 from 1 July 06:00 Shanghai time
    july = datetime(2026, 7, 1, 6, 0, tzinfo=CST)
    document = sample_document()
    document["chain"]["prices"].append(
        {"grade": "92", "price": "7.40", "station": "S001", "effective_from": july.isoformat()}
    )
    await import_chain(office.db, parse_chain(document))
    # When S001's snapshot is built now
    snapshot = await build_snapshot(office.db, "S001", NOW)

    def mmu(at: datetime, grade: str) -> int:
        return snapshot.prices_at(at)[grade].milli_minor_per_litre

    # Then it has the price in force now and every later one
    assert mmu(NOW, "92") == 762_000
    assert mmu(july - US, "92") == 762_000
    assert mmu(july, "92") == 740_000  # the station price, exactly at its instant
    assert mmu(NOVEMBER_SWITCH, "92") == 740_000  # and it outranks the chain's November price
    assert mmu(NOVEMBER_SWITCH - US, "95") == 811_000
    assert mmu(NOVEMBER_SWITCH, "95") == 803_000
    assert snapshot.next_price_change_after(NOW) == july
    assert snapshot.next_price_change_after(july) == NOVEMBER_SWITCH
    assert snapshot.next_price_change_after(NOVEMBER_SWITCH) is None
    # And the other stations know nothing of S001's price
    s002 = await build_snapshot(office.db, "S002", NOW)
    assert all(p.scope_code != "S001" for p in s002.prices)
    assert s002.prices_at(july)["92"].milli_minor_per_litre == 762_000


async def test_a_snapshot_ships_the_region_price_of_its_own_region_only(office: Office) -> None:
    await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
    west = await build_snapshot(office.db, "S003", NOW)
    east = await build_snapshot(office.db, "S001", NOW)
    assert west.prices_at(NOW)["0"].milli_minor_per_litre == 718_000
    assert west.prices_at(NOW)["0"].scope is PriceScope.REGION
    assert east.prices_at(NOW)["0"].milli_minor_per_litre == 730_000
    assert all(p.scope is not PriceScope.REGION for p in east.prices)


async def test_a_snapshot_leaves_out_prices_that_have_been_superseded(office: Office) -> None:
    # Given the sample chain, looked at after its November price change
    await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
    december = datetime(2026, 12, 1, tzinfo=CST)
    # When a snapshot is built then
    snapshot = await build_snapshot(office.db, "S001", december)
    # Then only the prices in force are shipped; January's 92 and 95 are gone
    shipped = sorted((p.grade, p.milli_minor_per_litre) for p in snapshot.prices)
    assert shipped == [("0", 730_000), ("92", 755_000), ("95", 803_000), ("98", 908_000)]
    assert snapshot.next_price_change_after(december) is None


async def test_a_snapshot_for_an_unknown_station_is_refused(office: Office) -> None:
    await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
    with pytest.raises(UnknownStation):
        await build_snapshot(office.db, "S999", NOW)
    with pytest.raises(UnknownStation):
        await issue_credential(office.db, "S999")


# --- credentials and the HTTP API ----------------------------------------------------------


async def test_the_snapshot_endpoint_serves_a_station_only_its_own_snapshot(
    office: Office,
) -> None:
    # Given the sample chain and credentials for S001 and S002
    await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
    _, s001_token = await issue_credential(office.db, "S001")
    _, s002_token = await issue_credential(office.db, "S002")
    url = "/v1/stations/S001/snapshot"

    def bearer(token: str) -> dict[str, str]:
        return {"authorization": f"Bearer {token}"}

    # When S001's snapshot is asked for without a credential, it is 401
    missing = await office.anonymous.get(url)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "auth.missing_credential"
    # With an unknown credential, it is 401
    unknown = await office.client.get(url, headers=bearer("x" * 43))
    assert unknown.status_code == 401
    assert unknown.json()["error"]["code"] == "auth.unknown_credential"
    # With another station's credential, it is 403
    other = await office.client.get(url, headers=bearer(s002_token))
    assert other.status_code == 403
    assert other.json()["error"]["code"] == "auth.wrong_station"
    # With its own credential, it is 200 and the snapshot of S001 at the head office's time
    own = await office.client.get(url, headers=bearer(s001_token))
    assert own.status_code == 200
    snapshot = StationSnapshot.model_validate(own.json())
    assert snapshot.station.code == "S001"
    assert snapshot.generated_at == NOW
    assert len(snapshot.fuelling_points) == 8
    assert snapshot.prices_at(NOW)["92"].milli_minor_per_litre == 762_000


async def test_the_station_directory_knows_issued_credentials_and_nothing_else(
    office: Office,
) -> None:
    await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
    key_id, token = await issue_credential(office.db, "S003")
    directory = office.hq.directory
    assert await directory.authenticate(token) == StationIdentity(code="S003", region="WEST")
    assert await directory.authenticate("not-a-credential") is None
    assert await directory.authenticate(key_id) is None  # the key id is not the secret
    assert await directory.authenticate("") is None


async def test_the_read_api_lists_the_stations_and_describes_one(office: Office) -> None:
    # Given the sample chain
    await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
    # When the stations are listed
    listing = await office.client.get("/v1/network/stations")
    # Then each is there with its equipment counts
    assert listing.status_code == 200
    assert [
        (s["code"], s["region"], s["dispensers"], s["fuelling_points"]) for s in listing.json()
    ] == [
        ("S001", "EAST", 4, 8),
        ("S002", "EAST", 4, 8),
        ("S003", "WEST", 4, 8),
    ]
    # When one station is described
    detail = await office.client.get("/v1/network/stations/S003")
    # Then its equipment and the prices in force at the head office's time are shown
    assert detail.status_code == 200
    body = detail.json()
    assert body["code"] == "S003"
    assert body["timezone"] == "Asia/Shanghai"
    assert body["shift_starts"] == ["00:00:00", "08:00:00", "16:00:00"]
    assert len(body["tanks"]) == 4
    assert sum(len(d["fuelling_points"]) for d in body["dispensers"]) == 8
    assert body["prices_now"]["0"]["milli_minor_per_litre"] == 718_000
    assert body["prices_now"]["0"]["scope"] == "region"
    assert body["prices_now"]["92"]["milli_minor_per_litre"] == 762_000
    # And after the November change the head office shows the new price
    office.clock.at = NOVEMBER_SWITCH
    later = await office.client.get("/v1/network/stations/S003")
    assert later.json()["prices_now"]["92"]["milli_minor_per_litre"] == 755_000


async def test_an_unknown_station_is_a_404_with_a_stable_code(office: Office) -> None:
    await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
    response = await office.client.get("/v1/network/stations/S999")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "network.unknown_station"


async def test_an_empty_network_lists_no_stations(office: Office) -> None:
    response = await office.client.get("/v1/network/stations")
    assert response.status_code == 200
    assert response.json() == []
