"""The edge's audit records join HQ's one chain: uploaded by the sync agent with the
station's credential, each exactly once (a lost answer, an upload raced by the chainer),
a bad record kept at the edge and audited at HQ, HQ down for longer than the back-off."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from alembic import command

from forecourt.audit.handlers import (
    AuditChainer,
    chain_waiting,
    station_actor,
    station_record_id,
    verify,
)
from forecourt.audit.store import record_t
from forecourt.bootstrap import HeadOffice, build_head_office
from forecourt.edge.journal import Journal, audit_t
from forecourt.edge.sync import HqClient, SyncAgent
from forecourt.infra.db import audit_outbox_table
from forecourt.infra.migrate import _config
from forecourt.kernel.clock import SystemClock
from forecourt.network.handlers import SAMPLE_CHAIN, import_chain, issue_credential, load_chain_file
from forecourt.settings import Settings
from tests.support import staff_headers

PUMP_COMMAND = {"pump": 3, "preset_amount_minor": 20000, "accepted": True}


@pytest.fixture
async def office(db_url: str) -> AsyncIterator[tuple[HeadOffice, dict[str, str]]]:
    hq = build_head_office(Settings(database_url=db_url, log_json=False))
    await hq.start(relay=False)
    await import_chain(hq.db, load_chain_file(SAMPLE_CHAIN))
    tokens = {code: (await issue_credential(hq.db, code))[1] for code in ("S001", "S002")}
    yield hq, tokens
    await hq.stop()


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    j = Journal(tmp_path / "edge.db", SystemClock())
    await j.open()
    yield j
    await j.close()


def _client(hq: HeadOffice, token: str, station: str = "S001") -> HqClient:
    return HqClient("http://hq", station, token, transport=httpx.ASGITransport(app=hq.app))


async def _audit_some(journal: Journal, n: int, actor: str = "terminal:pos-1") -> None:
    for i in range(n):
        await journal.record_audit(
            actor=actor, action="pump.authorize", target=f"pump:{i + 1}", details=PUMP_COMMAND
        )


async def _station_records(hq: HeadOffice, station: str = "S001") -> list[dict[str, Any]]:
    """The chained records whose actor is the station's edge, oldest first."""
    await chain_waiting(hq.db)
    async with hq.db.connection() as conn:
        rows = await conn.execute(
            sa.select(record_t)
            .where(record_t.c.actor.like(f"station:{station}/%"))
            .order_by(record_t.c.seq)
        )
        return [dict(r._mapping) for r in rows]


async def _waiting_at_hq(hq: HeadOffice, actor_like: str = "station:S001/%") -> int:
    """Records queued at HQ, not chained yet (by default the S001 edge's)."""
    async with hq.db.connection() as conn:
        got = await conn.execute(
            sa.select(sa.func.count())
            .select_from(audit_outbox_table)
            .where(audit_outbox_table.c.actor.like(actor_like))
        )
        return int(got.scalar_one())


async def test_the_edges_records_join_the_chain_as_the_station(
    office: tuple[HeadOffice, dict[str, str]], journal: Journal
) -> None:
    hq, tokens = office
    await _audit_some(journal, 5)
    await journal.record_audit(actor="edge", action="pump.prices", target="S001", details={})
    pending = await journal.pending_audit(100)
    client = _client(hq, tokens["S001"])
    try:
        agent = SyncAgent(journal, client)
        assert await agent.upload_audit_once() == 6
        assert await agent.upload_audit_once() == 0  # nothing left
    finally:
        await client.close()
    assert await journal.pending_audit(100) == []
    assert await journal.audit_usage() == (0, 0)
    assert (agent.audit_stats.uploaded, agent.audit_stats.duplicates) == (6, 0)

    records = await _station_records(hq)
    assert [r["actor"] for r in records] == ["station:S001/terminal:pos-1"] * 5 + [
        "station:S001/edge"
    ]
    assert [r["target"] for r in records][:5] == [f"pump:{i}" for i in range(1, 6)]
    assert [r["record_id"] for r in records] == [
        station_record_id("S001", p.record_id) for p in pending
    ]
    assert json.loads(records[0]["details"]) == PUMP_COMMAND
    assert records[0]["at"] == datetime.fromisoformat(pending[0].payload["at"])
    assert (await verify(hq.db)).ok

    # An auditor reads them through the API like any other record.
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=hq.app),
        base_url="http://hq",
        headers=await staff_headers(hq.identity, ("auditor", "chain")),
    ) as staff:
        page = await staff.get("/v1/audit/records", params={"actor": "station:S001/terminal:pos-1"})
    assert page.status_code == 200, page.text
    assert len(page.json()["items"]) == 5


async def test_an_upload_whose_answer_was_lost_adds_nothing(
    office: tuple[HeadOffice, dict[str, str]], journal: Journal
) -> None:
    hq, tokens = office
    await _audit_some(journal, 4)
    pending = await journal.pending_audit(100)
    client = _client(hq, tokens["S001"])
    try:
        # HQ took the batch but its answer never reached the edge: the records are still
        # pending there, and go again. Once while HQ still holds them unchained ...
        first = await client.upload_audit([p.payload for p in pending[:2]])
        assert [r["status"] for r in first.json()["results"]] == ["created", "created"]
        again = await client.upload_audit([p.payload for p in pending[:2]])
        assert [r["status"] for r in again.json()["results"]] == ["duplicate", "duplicate"]
        assert await _waiting_at_hq(hq) == 2
        # ... and once after they are chained.
        await chain_waiting(hq.db)
        agent = SyncAgent(journal, client)
        assert await agent.upload_audit_once() == 4
    finally:
        await client.close()
    assert (agent.audit_stats.uploaded, agent.audit_stats.duplicates) == (4, 2)
    assert await journal.pending_audit(100) == []
    records = await _station_records(hq)
    assert len(records) == 4  # each once
    assert len({r["record_id"] for r in records}) == 4
    assert (await verify(hq.db)).ok


async def test_one_record_twice_in_a_batch_is_kept_once(
    office: tuple[HeadOffice, dict[str, str]], journal: Journal
) -> None:
    hq, tokens = office
    await _audit_some(journal, 1)
    (one,) = await journal.pending_audit(10)
    client = _client(hq, tokens["S001"])
    try:
        answer = await client.upload_audit([one.payload, one.payload])
    finally:
        await client.close()
    assert [r["status"] for r in answer.json()["results"]] == ["created", "duplicate"]
    assert len(await _station_records(hq)) == 1


async def test_two_stations_records_with_one_edge_id_are_both_kept(
    office: tuple[HeadOffice, dict[str, str]], journal: Journal
) -> None:
    hq, tokens = office
    await _audit_some(journal, 1)
    (one,) = await journal.pending_audit(10)
    for code in ("S001", "S002"):
        client = _client(hq, tokens[code], code)
        try:
            answer = await client.upload_audit([one.payload])
        finally:
            await client.close()
        assert answer.json()["results"][0]["status"] == "created"
    assert len(await _station_records(hq, "S001")) == 1
    assert len(await _station_records(hq, "S002")) == 1


async def test_a_record_hq_refuses_stays_at_the_edge_and_is_audited(
    office: tuple[HeadOffice, dict[str, str]], journal: Journal
) -> None:
    hq, tokens = office
    await _audit_some(journal, 3)
    pending = await journal.pending_audit(10)
    bad = pending[1]

    def corrupt() -> None:  # an actor no HQ record may hold (an older or broken edge)
        with journal.engine.begin() as conn:
            conn.execute(audit_t.update().where(audit_t.c.id == bad.id).values(actor="x" * 190))

    await journal._run(corrupt)
    client = _client(hq, tokens["S001"])
    try:
        agent = SyncAgent(journal, client)
        assert await agent.upload_audit_once() == 3
        assert await agent.upload_audit_once() == 0  # the refused one is not sent again
    finally:
        await client.close()
    assert (agent.audit_stats.uploaded, agent.audit_stats.refused) == (2, 1)
    assert agent.audit_stats.alarm is None  # one bad record is not a failed upload
    assert await journal.audit_usage() == (0, 1)

    def kept() -> Any:
        with journal.engine.connect() as conn:
            return conn.execute(sa.select(audit_t).where(audit_t.c.id == bad.id)).one()

    row = await journal._run(kept)
    assert row.rejected
    assert "actor" in row.last_error
    records = await _station_records(hq)
    assert [r["target"] for r in records] == ["pump:1", "pump:3"]
    async with hq.db.connection() as conn:
        refusal = (
            await conn.execute(
                sa.select(record_t).where(record_t.c.action == "audit.upload_refused")
            )
        ).one()
    assert refusal.actor == "station:S001"
    assert json.loads(refusal.details)["record_id"] == bad.record_id


@pytest.mark.parametrize(
    "item",
    [
        5,
        None,
        {"record_id": "r-1"},
        {
            "record_id": "r-1",
            "at": "2026-12-01T10:00:00",
            "actor": "a",
            "action": "b",
            "target": "c",
        },  # naive time
        {
            "record_id": "../../x",
            "at": "2026-12-01T10:00:00Z",
            "actor": "a",
            "action": "b",
            "target": "c",
        },
        {
            "record_id": "r-1",
            "at": "2026-12-01T10:00:00Z",
            "actor": "",
            "action": "b",
            "target": "c",
        },
        {
            "record_id": "r-1",
            "at": "2026-12-01T10:00:00Z",
            "actor": "a",
            "action": "b",
            "target": "c",
            "details": [1, 2],
        },
        {
            "record_id": "r-1",
            "at": "2026-12-01T10:00:00Z",
            "actor": "a",
            "action": "b",
            "target": "c",
            "seq": 1,
        },
    ],
)
async def test_each_bad_item_is_refused_alone(
    office: tuple[HeadOffice, dict[str, str]], item: Any
) -> None:
    hq, tokens = office
    good = {
        "record_id": "0193a7c2-0000-7000-8000-000000000001",
        "at": "2026-12-01T10:00:00+08:00",
        "actor": "terminal:pos-1",
        "action": "pump.stop",
        "target": "pump:2",
        "details": {},
    }
    client = _client(hq, tokens["S001"])
    try:
        answer = await client.upload_audit([item, good])
    finally:
        await client.close()
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["status"] for r in results] == ["refused", "created"]
    assert results[0]["errors"]
    assert [r["target"] for r in await _station_records(hq)] == ["pump:2"]


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"records": "nope"},
        {"records": [{}] * 501},
        {"records": [], "station": "S002"},
        {},
    ],
)
async def test_a_malformed_batch_is_a_422_envelope(
    office: tuple[HeadOffice, dict[str, str]], body: Any
) -> None:
    hq, tokens = office
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=hq.app), base_url="http://hq"
    ) as http:
        answer = await http.post(
            "/v1/stations/S001/audit:batch",
            json=body,
            headers={"authorization": f"Bearer {tokens['S001']}"},
        )
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["code"]
    assert await _waiting_at_hq(hq) == 0


async def test_only_the_stations_own_credential_uploads_its_records(
    office: tuple[HeadOffice, dict[str, str]],
) -> None:
    hq, tokens = office
    body = {"records": []}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=hq.app), base_url="http://hq"
    ) as http:
        url = "/v1/stations/S001/audit:batch"
        none = await http.post(url, json=body)
        other = await http.post(
            url, json=body, headers={"authorization": f"Bearer {tokens['S002']}"}
        )
        staff = await http.post(url, json=body, headers=await staff_headers(hq.identity))
        own = await http.post(url, json=body, headers={"authorization": f"Bearer {tokens['S001']}"})
    assert none.status_code == 401
    assert (other.status_code, other.json()["error"]["code"]) == (403, "auth.wrong_station")
    assert (staff.status_code, staff.json()["error"]["code"]) == (403, "auth.wrong_principal")
    assert own.status_code == 200
    assert own.json() == {"results": []}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_hq_down_keeps_every_record_and_backs_off(
    office: tuple[HeadOffice, dict[str, str]], journal: Journal
) -> None:
    hq, tokens = office
    await _audit_some(journal, 3)
    down = HqClient(f"http://127.0.0.1:{_closed_port()}", "S001", tokens["S001"], timeout=2.0)
    agent = SyncAgent(journal, down, backoff_initial_s=30.0, backoff_max_s=60.0)
    try:
        assert await agent.upload_audit_once() == 0
    finally:
        await down.close()
    assert agent.audit_stats.failures == 1
    assert agent.audit_stats.alarm == "HQ unreachable"
    assert await journal.audit_usage() == (3, 0)  # nothing lost, nothing marked

    # Backing off: no new attempt (the back-off is drawn from [0, 30 s], so wait out the
    # draw only if it came out very short).
    if agent._audit_not_before - time.monotonic() > 0.5:
        assert await agent.upload_audit_once() == 0
        assert agent.audit_stats.failures == 1

    agent.hq = _client(hq, tokens["S001"])
    agent._audit_not_before = 0.0  # the back-off is over
    try:
        assert await agent.upload_audit_once() == 3
    finally:
        await agent.hq.close()
    assert agent.audit_stats.alarm is None
    assert agent.audit_stats.last_error is None
    assert len(await _station_records(hq)) == 3


async def test_a_revoked_station_uploads_nothing_and_keeps_its_records(
    office: tuple[HeadOffice, dict[str, str]], journal: Journal
) -> None:
    from forecourt.network.handlers import revoke_credentials

    hq, tokens = office
    await _audit_some(journal, 2)
    await revoke_credentials(hq.db, "S001")
    client = _client(hq, tokens["S001"])
    try:
        agent = SyncAgent(journal, client)
        assert await agent.upload_audit_once() == 0
    finally:
        await client.close()
    assert agent.audit_stats.alarm is not None
    assert agent.audit_stats.alarm.startswith("audit upload refused by HQ: auth.")
    assert await journal.audit_usage() == (2, 0)
    assert await _station_records(hq) == []


async def test_the_chainer_never_chains_one_record_twice(db_url: str) -> None:
    """A station's upload can queue a record again just as the chainer moves the first copy
    (the unique index lets the second in once the first left the outbox): the chainer drops
    it, and the chain stays whole."""
    hq = build_head_office(Settings(database_url=db_url, log_json=False))
    await hq.start(relay=False)
    try:
        async with hq.db.begin() as uow:
            await uow.record_audit(actor="user:a", action="x", target="t", details={})
        await chain_waiting(hq.db)
        async with hq.db.connection() as conn:
            first = (await conn.execute(sa.select(record_t))).one()
        async with hq.db.begin() as uow:
            await uow.conn.execute(
                audit_outbox_table.insert().values(
                    record_id=first.record_id,
                    at=first.at,
                    actor=first.actor,
                    action=first.action,
                    target=first.target,
                    details=first.details,
                )
            )
            await uow.record_audit(actor="user:a", action="y", target="t", details={})
        chainer = AuditChainer(hq.db)
        assert await chainer.run_once() == 2
        assert chainer.chained == 1
        async with hq.db.connection() as conn:
            actions = [
                r.action for r in await conn.execute(sa.select(record_t).order_by(record_t.c.seq))
            ]
        assert actions == ["x", "y"]
        assert await _waiting_at_hq(hq, "%") == 0
        assert (await verify(hq.db)).ok
    finally:
        await hq.stop()


def test_an_older_journal_gives_its_audit_rows_ids(tmp_path: Path) -> None:
    """A station upgraded with audit rows from before the upload existed: each gets its own
    id and goes up like any other."""
    path = tmp_path / "old.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        command.upgrade(_config("edge", conn, None), "edge_0004")
        for i in range(3):
            conn.execute(
                sa.text(
                    "INSERT INTO audit_outbox (at, actor, action, target, details) "
                    "VALUES ('2026-11-30 10:00:00.000000', 'edge', 'pump.prices', :t, '{}')"
                ),
                {"t": f"S001-{i}"},
            )
        command.upgrade(_config("edge", conn, None), "heads")
        rows = conn.execute(sa.text("SELECT record_id, rejected FROM audit_outbox")).all()
    engine.dispose()
    assert len({r.record_id for r in rows}) == 3
    assert all(r.record_id and not r.rejected for r in rows)


def test_station_ids_and_actors_are_namespaced() -> None:
    assert station_record_id("S001", "a") != station_record_id("S002", "a")
    assert station_record_id("S001", "a") == station_record_id("S001", "a")
    assert station_record_id("S001", "ab") != station_record_id("S001a", "b")
    assert station_actor("S001", "terminal:pos-1") == "station:S001/terminal:pos-1"


async def test_the_edge_keeps_uploaded_records_for_its_retention_and_never_prunes_one_hq_lacks(
    office: tuple[HeadOffice, dict[str, str]], journal: Journal
) -> None:
    hq, tokens = office
    await _audit_some(journal, 3)
    client = _client(hq, tokens["S001"])
    try:
        assert await SyncAgent(journal, client).upload_audit_once() == 3
    finally:
        await client.close()
    await _audit_some(journal, 2)  # not uploaded yet
    pending = await journal.pending_audit(10)
    refused = pending[0]
    await journal.audit_answered([], {refused.id: "refused by HQ: test"})

    def count() -> int:
        with journal.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(audit_t)).scalar_one())

    assert await journal._run(count) == 5  # uploaded ones stay readable at the station
    now = SystemClock().now()
    assert await journal.prune_uploaded_audit(now - timedelta(days=1)) == 0  # too recent
    assert await journal.prune_uploaded_audit(now + timedelta(seconds=1)) == 3
    assert await journal._run(count) == 2
    assert await journal.audit_usage() == (1, 1)  # the waiting one and the refused one
