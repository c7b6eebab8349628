"""The sync agent against a real HQ app: only HQ's verdict on an item changes that item; an
error about the whole batch changes none, backs off, raises one alarm and clears it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from starlette.types import ASGIApp, Receive, Scope, Send
from structlog.testing import capture_logs

from forecourt.bootstrap import HeadOffice, build_head_office
from forecourt.edge.journal import Journal, SaleDraft, journal_t, outbox_t
from forecourt.edge.sync import HqClient, SyncAgent
from forecourt.kernel.clock import SystemClock
from forecourt.network.handlers import SAMPLE_CHAIN, import_chain, issue_credential, load_chain_file
from forecourt.settings import Settings
from tests.edge.test_journal import DRAFT
from tests.support import eventually, staff_headers

DEVICE = "pts-S001"


def draft(n: int) -> SaleDraft:
    return replace(DRAFT, device_txn=n, device_id=DEVICE)


@pytest.fixture
async def office(tmp_path: Path) -> AsyncIterator[tuple[HeadOffice, dict[str, str]]]:
    hq = build_head_office(
        Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'hq.db'}", log_json=False)
    )
    await hq.start(relay=False)
    await import_chain(hq.db, load_chain_file(SAMPLE_CHAIN))
    tokens = {code: (await issue_credential(hq.db, code))[1] for code in ("S001", "S002")}
    yield hq, tokens
    await hq.stop()


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    journal = Journal(tmp_path / "edge.db", SystemClock())
    await journal.open()
    yield journal
    await journal.close()


class SizeLimit:
    """A reverse proxy's body-size limit in front of HQ: 413 with its own page, no HQ
    error envelope (nginx's ``client_max_body_size``)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = int(dict(scope["headers"]).get(b"content-length", b"0"))
            if length > self.max_bytes:
                await send({"type": "http.response.start", "status": 413, "headers": []})
                await send({"type": "http.response.body", "body": b"<h1>413</h1>"})
                return
        await self.app(scope, receive, send)


def client_for(app: ASGIApp, token: str, cls: type[HqClient] = HqClient) -> HqClient:
    return cls("http://hq", "S001", token, transport=httpx.ASGITransport(app=app))


async def outbox_state(journal: Journal) -> list[tuple[Any, ...]]:
    """Every outbox and journal row as stored: what 'no item changed' compares."""

    def read() -> list[tuple[Any, ...]]:
        with journal.engine.connect() as conn:
            outbox = conn.execute(sa.select(outbox_t).order_by(outbox_t.c.seq)).all()
            sales = conn.execute(
                sa.select(journal_t.c.seq, journal_t.c.hq_status, journal_t.c.hq_acked_at)
            ).all()
            return [tuple(r) for r in outbox] + [tuple(r) for r in sales]

    return await journal._run(read)


async def edit_outbox(journal: Journal, seq: int, edit: Callable[[dict[str, Any]], None]) -> None:
    def run() -> None:
        with journal.engine.begin() as conn:
            row = conn.execute(sa.select(outbox_t.c.payload).where(outbox_t.c.seq == seq)).one()
            payload = json.loads(row.payload)
            edit(payload)
            conn.execute(
                outbox_t.update().where(outbox_t.c.seq == seq).values(payload=json.dumps(payload))
            )

    await journal._run(run)


async def hq_sequence(hq: HeadOffice) -> dict[str, Any]:
    transport = httpx.ASGITransport(app=hq.app)
    headers = await staff_headers(hq.identity)
    async with httpx.AsyncClient(transport=transport, base_url="http://hq", headers=headers) as c:
        return (await c.get("/v1/stations/S001/sequence")).json()  # type: ignore[no-any-return]


async def test_an_item_hq_refuses_is_kept_marked_and_out_of_the_pending_set_in_one_upload(
    office: tuple[HeadOffice, dict[str, str]], journal: Journal
) -> None:
    hq, tokens = office
    client = client_for(hq.app, tokens["S001"])
    try:
        journaled = [await journal.record_sale(draft(n)) for n in range(1, 8)]

        def break_volume(payload: dict[str, Any]) -> None:
            payload["volume_ml"] = -1  # as a buggy older edge might have journaled it

        await edit_outbox(journal, 5, break_volume)
        agent = SyncAgent(journal, client, batch_size=100)
        with capture_logs() as logs:
            assert await agent.upload_once() == 7
        assert (agent.stats.batches, agent.stats.failures) == (1, 0)  # one request, no bisection
        assert agent.stats.uploaded == 6
        assert agent.stats.refused == 1
        assert agent.stats.statuses == {"created": 6, "refused": 1}
        assert agent.upload_alarm is None
        pending, _, rejected = await journal.outbox_usage()
        assert (pending, rejected) == (1, 1)  # kept, marked, not dropped
        assert await journal.pending_uploads(100) == []  # and never sent again
        assert await journal.sale(journaled[4].sale_id) is not None
        refused = [e for e in logs if e["event"] == "edge.sale_refused"]
        assert [(e["log_level"], e["seq"]) for e in refused] == [("error", 5)]
        assert [err["loc"] for err in refused[0]["errors"]] == [["volume_ml"]]
        assert (await hq_sequence(hq))["gaps"] == [[5, 5]]  # HQ knows which sale it lacks
        assert await agent.upload_once() == 0  # nothing left to send
    finally:
        await client.close()


async def test_a_v1_payload_journaled_before_the_upgrade_uploads_in_a_v2_batch(
    office: tuple[HeadOffice, dict[str, str]], journal: Journal
) -> None:
    hq, tokens = office
    client = client_for(hq.app, tokens["S001"])
    try:
        for n in (1, 2):
            await journal.record_sale(draft(n))

        def as_v1(payload: dict[str, Any]) -> None:
            for name in ("device_id", "device_epoch", "device_flags", "device_raw"):
                payload.pop(name, None)
            payload["schema_version"] = 1

        await edit_outbox(journal, 1, as_v1)
        agent = SyncAgent(journal, client)
        assert await agent.upload_once() == 2
        assert agent.stats.statuses == {"created": 2}
        assert await journal.outbox_usage() == (0, 0, 0)
    finally:
        await client.close()


async def test_a_sale_hq_answers_conflict_leaves_the_outbox_so_the_drain_ends(
    office: tuple[HeadOffice, dict[str, str]], journal: Journal
) -> None:
    hq, tokens = office
    client = client_for(hq.app, tokens["S001"])
    try:
        sale = await journal.record_sale(draft(1))
        await journal.record_sale(draft(2))
        # HQ already holds another payload under this sale_id (e.g. from a restored backup).
        (first, _) = await journal.pending_uploads(10)
        other = dict(first.payload, volume_ml=first.payload["volume_ml"] + 10)
        assert (await client.upload([other])).json()["results"][0]["status"] == "created"

        agent = SyncAgent(journal, client)
        with capture_logs() as logs:
            assert await agent.upload_once() == 2
        assert agent.stats.conflicts == 1
        assert agent.stats.statuses == {"conflict": 1, "created": 1}
        assert await journal.outbox_usage() == (0, 0, 0)  # nothing left: a drain can finish
        assert (await journal.sale(sale.sale_id) or {})["hq_status"] == "conflict"
        alarms = [e for e in logs if e["event"] == "edge.upload_conflict"]
        assert [(e["log_level"], e["sale_id"]) for e in alarms] == [("error", sale.sale_id)]
    finally:
        await client.close()


class NewerEdgeClient(HqClient):
    UPLOAD_SCHEMA_VERSION = 3  # an edge newer than its HQ


def _set_token(client: HqClient, token: str) -> None:
    client._client.headers["authorization"] = f"Bearer {token}"


BatchFailure = Callable[[HeadOffice, dict[str, str]], tuple[HqClient, Callable[[], None]]]


def _unsupported_version(hq: HeadOffice, tokens: dict[str, str]) -> Any:
    client = client_for(hq.app, tokens["S001"], NewerEdgeClient)

    def fix() -> None:  # HQ learns v3, as far as this edge can tell
        client.UPLOAD_SCHEMA_VERSION = 2

    return client, fix


def _unknown_credential(hq: HeadOffice, tokens: dict[str, str]) -> Any:
    client = client_for(hq.app, "not-a-credential-of-any-station")
    return client, lambda: _set_token(client, tokens["S001"])


def _other_stations_credential(hq: HeadOffice, tokens: dict[str, str]) -> Any:
    client = client_for(hq.app, tokens["S002"])
    return client, lambda: _set_token(client, tokens["S001"])


@pytest.mark.parametrize(
    ("make", "alarm"),
    [
        (_unsupported_version, "upload refused by HQ: sales.unsupported_schema_version"),
        (_unknown_credential, "credential rejected by HQ: auth.unknown_credential"),
        (_other_stations_credential, "credential rejected by HQ: auth.wrong_station"),
    ],
    ids=["422-unsupported-version", "401", "403"],
)
async def test_a_batch_level_error_changes_no_item_alarms_once_backs_off_and_recovers(
    office: tuple[HeadOffice, dict[str, str]],
    journal: Journal,
    make: BatchFailure,
    alarm: str,
) -> None:
    hq, tokens = office
    client, fix = make(hq, tokens)
    try:
        for n in range(1, 4):
            await journal.record_sale(draft(n))
        before = await outbox_state(journal)
        agent = SyncAgent(journal, client, backoff_initial_s=0.1, backoff_max_s=30.0)
        caps = [agent.backoff_cap()]
        with capture_logs() as logs:
            for _ in range(3):
                assert await agent.upload_once() == 0
                caps.append(agent.backoff_cap())
                assert agent.upload_alarm == alarm
        assert caps == [0.1, 0.2, 0.4, 0.8]  # the back-off grows with each failure
        assert agent.stats.failures == 3
        assert (agent.stats.refused, agent.stats.uploaded) == (0, 0)
        assert await outbox_state(journal) == before  # not an attempt, not a mark: nothing
        assert len(await journal.pending_uploads(10)) == 3
        raised = [e for e in logs if e["event"] == "edge.upload_alarm"]
        assert [(e["log_level"], e["alarm"]) for e in raised] == [("error", alarm)]  # once

        fix()
        with capture_logs() as logs:
            assert await agent.upload_once() == 3
        assert agent.upload_alarm is None
        assert agent.stats.alarm is None  # the status API shows it cleared too
        assert agent.backoff_cap() == 0.1
        assert [e["was"] for e in logs if e["event"] == "edge.upload_alarm_cleared"] == [alarm]
        assert await journal.outbox_usage() == (0, 0, 0)
    finally:
        await client.close()


async def test_413_changes_no_item_and_halves_the_batch_until_it_fits(
    office: tuple[HeadOffice, dict[str, str]], journal: Journal
) -> None:
    hq, tokens = office
    for n in range(1, 9):
        await journal.record_sale(draft(n))
    one_item = len(json.dumps((await journal.pending_uploads(1))[0].payload))
    # Room for about three sales per request, whatever the exact payload size.
    client = client_for(SizeLimit(hq.app, max_bytes=one_item * 3 + 100), tokens["S001"])
    try:
        before = await outbox_state(journal)
        agent = SyncAgent(journal, client, batch_size=8, backoff_initial_s=0.1)
        assert await agent.upload_once() == 0  # 8 do not fit
        assert agent.upload_alarm == "upload refused by HQ: http_413"
        assert await outbox_state(journal) == before
        assert agent.backoff_cap() == 0.2
        assert await agent.upload_once() == 0  # 4 do not fit either
        assert await outbox_state(journal) == before
        assert agent.stats.failures == 2
        assert await agent.upload_once() == 2  # 2 do
        assert agent.upload_alarm is None
        assert agent.backoff_cap() == 0.1
        while await agent.upload_once():
            pass
        assert agent.stats.uploaded == 8
        assert agent.stats.failures == 2  # the smaller size was kept: no 413 after it fitted
        assert await journal.outbox_usage() == (0, 0, 0)
    finally:
        await client.close()


async def test_the_running_agent_waits_out_a_rejected_credential_and_then_drains(
    office: tuple[HeadOffice, dict[str, str]], journal: Journal
) -> None:
    hq, tokens = office
    client = client_for(hq.app, "revoked-credential")
    agent = SyncAgent(journal, client, backoff_initial_s=0.01, backoff_max_s=0.05, idle_s=0.02)
    try:
        for n in range(1, 4):
            await journal.record_sale(draft(n))
        before = await outbox_state(journal)
        with capture_logs() as logs:
            agent.start()

            async def failed_a_few_times() -> bool:
                return agent.stats.failures >= 5

            await eventually(failed_a_few_times)
            assert await outbox_state(journal) == before
            assert agent.upload_alarm == "credential rejected by HQ: auth.unknown_credential"
            _set_token(client, tokens["S001"])

            async def drained() -> bool:
                return await journal.outbox_usage() == (0, 0, 0)

            await eventually(drained)
        assert agent.upload_alarm is None
        assert agent.stats.last_error is None  # recovered: no stale error on the status API
        assert len([e for e in logs if e["event"] == "edge.upload_alarm"]) == 1
        assert agent.stats.uploaded == 3
    finally:
        await agent.stop()
        await client.close()


async def test_an_answer_that_does_not_match_the_batch_changes_no_item(
    journal: Journal,
) -> None:
    async def answer(request: httpx.Request) -> httpx.Response:
        sales = json.loads(request.content)["sales"]
        results = [
            {"index": i, "sale_id": s["sale_id"], "status": "created", "flags": []}
            for i, s in enumerate(sales)
        ]
        return httpx.Response(200, json={"results": results[:-1]})  # one result short

    client = HqClient("http://hq", "S001", "x" * 32, transport=httpx.MockTransport(answer))
    try:
        for n in (1, 2):
            await journal.record_sale(draft(n))
        before = await outbox_state(journal)
        agent = SyncAgent(journal, client)
        assert await agent.upload_once() == 0
        assert agent.upload_alarm == "HQ answer unreadable"
        assert await outbox_state(journal) == before
    finally:
        await client.close()


async def test_a_rejected_credential_on_the_snapshot_says_so_and_clears(
    office: tuple[HeadOffice, dict[str, str]], journal: Journal
) -> None:
    """Not the HTTP library's generic text with a link to a web page: what is wrong, and
    what to do."""
    from forecourt.edge.sync import SnapshotKeeper

    hq, tokens = office
    client = client_for(hq.app, "revoked-credential")
    keeper = SnapshotKeeper(journal, client)
    try:
        assert await keeper.refresh() is False
        assert keeper.last_error is not None
        assert keeper.last_error.startswith("credential rejected by HQ (HTTP 401)")
        assert "FORECOURT_EDGE_CREDENTIAL" in keeper.last_error
        assert "http" not in keeper.last_error.lower().replace("http 401", "")
        _set_token(client, tokens["S001"])
        assert await keeper.refresh() is True
        assert keeper.last_error is None
    finally:
        await client.close()
