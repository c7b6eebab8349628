"""Tests that kill mutants a mutation pass over the edge's audit upload left alive: an HQ
answer that cannot be trusted record by record changes no record and backs off; the audit
back-off grows on its own counter and starts over after a success; a 413 halves the audit
batch; the batch is capped at HQ's 500; the journal marks more than one chunk at once and
prunes by the time HQ took a record, strictly before the cutoff."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from forecourt.bootstrap import HeadOffice, build_head_office
from forecourt.edge import sync
from forecourt.edge.journal import Journal, audit_t
from forecourt.edge.sync import HqClient, SyncAgent
from forecourt.kernel.clock import SystemClock
from forecourt.network.handlers import SAMPLE_CHAIN, import_chain, issue_credential, load_chain_file
from forecourt.settings import Settings
from tests.support import ManualClock

DAY = timedelta(days=1)


@pytest.fixture
async def office(tmp_path: Path) -> AsyncIterator[tuple[HeadOffice, str]]:
    hq = build_head_office(
        Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'hq.db'}", log_json=False)
    )
    await hq.start(relay=False)
    await import_chain(hq.db, load_chain_file(SAMPLE_CHAIN))
    _, token = await issue_credential(hq.db, "S001")
    yield hq, token
    await hq.stop()


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    j = Journal(tmp_path / "edge.db", SystemClock())
    await j.open()
    yield j
    await j.close()


@pytest.fixture
def longest_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Full jitter drawn at its upper end: the wait is the back-off's cap, exactly."""
    monkeypatch.setattr(sync.random, "uniform", lambda low, high: high)


class Rewrite:
    """A proxy in front of HQ that passes the upload through (HQ queues the records) and
    rewrites HQ's answer with ``edit`` (a broken or older HQ, a meddling middlebox); with
    ``status`` it answers that instead, without passing anything on."""

    def __init__(self, app: ASGIApp, edit: Callable[[Any], Any] | None = None) -> None:
        self.app = app
        self.edit = edit
        self.status: int | None = None
        self.requests = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.requests += 1
        if self.status is not None:
            body = json.dumps({"error": {"code": "proxy.failing"}}).encode()
            await send({"type": "http.response.start", "status": self.status, "headers": []})
            await send({"type": "http.response.body", "body": body})
            return
        start: Message = {}
        chunks: list[bytes] = []

        async def keep(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    body = b"".join(chunks)
                    if self.edit is not None and start["status"] == 200:
                        body = json.dumps(self.edit(json.loads(body))).encode()
                    headers = [
                        (k, v) for k, v in start.get("headers", []) if k != b"content-length"
                    ]
                    headers.append((b"content-length", str(len(body)).encode()))
                    await send({**start, "headers": headers})
                    await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, keep)


def _client(app: ASGIApp, token: str) -> HqClient:
    return HqClient("http://hq", "S001", token, transport=httpx.ASGITransport(app=app))


async def _audit_some(journal: Journal, n: int) -> None:
    for i in range(n):
        await journal.record_audit(
            actor="terminal:pos-1", action="pump.authorize", target=f"pump:{i + 1}", details={}
        )


async def _rows(journal: Journal) -> list[tuple[Any, ...]]:
    def read() -> list[tuple[Any, ...]]:
        with journal.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.select(audit_t).order_by(audit_t.c.id))]

    return await journal._run(read)


def _results(edit: Callable[[list[dict[str, Any]]], Any]) -> Callable[[Any], Any]:
    return lambda answer: {"results": edit(answer["results"])}


MALFORMED = {
    "one result short": _results(lambda r: r[:-1]),
    "one result too many": _results(lambda r: [*r, {**r[0], "index": 3}]),
    "an index past the end": _results(lambda r: [*r[:-1], {**r[-1], "index": 3}]),
    "a negative index": _results(lambda r: [*r[:-1], {**r[-1], "index": -1}]),
    "an index twice": _results(lambda r: [*r[:-1], {**r[-1], "index": 0}]),
    "an index as text": _results(lambda r: [*r[:-1], {**r[-1], "index": "2"}]),
    "an unknown status": _results(lambda r: [{**x, "status": "accepted"} for x in r]),
    "no status": _results(lambda r: [{k: v for k, v in x.items() if k != "status"} for x in r]),
    "results not a list": lambda answer: {"results": {"0": "created"}},
    "no results": lambda answer: {"items": answer["results"]},
}


@pytest.mark.parametrize("edit", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_audit_answer_marks_nothing_and_backs_off(
    office: tuple[HeadOffice, str],
    journal: Journal,
    edit: Callable[[Any], Any],
    longest_waits: None,
) -> None:
    hq, token = office
    await _audit_some(journal, 3)
    before = await _rows(journal)
    proxy = Rewrite(hq.app, edit)
    client = _client(proxy, token)
    try:
        agent = SyncAgent(journal, client, backoff_initial_s=5.0, backoff_max_s=60.0)
        assert await agent.upload_audit_once() == 0
        waits = agent._audit_not_before - time.monotonic()
        assert 9.0 < waits <= 10.0  # backing off: 5 s × 2 after the first failure
        assert await agent.upload_audit_once() == 0  # within the back-off: nothing sent
        assert proxy.requests == 1
    finally:
        await client.close()
    assert await _rows(journal) == before  # not a mark, not a refusal: nothing changed
    assert await journal.audit_usage() == (3, 0)
    stats = agent.audit_stats
    assert (stats.failures, stats.uploaded, stats.refused, stats.duplicates) == (1, 0, 0, 0)
    assert stats.alarm == "HQ audit answer unreadable"
    assert stats.last_error
    assert (agent.stats.failures, agent.upload_alarm) == (0, None)  # sales untouched


async def test_hqs_index_pairs_each_answer_with_its_record_whatever_the_order(
    office: tuple[HeadOffice, str], journal: Journal
) -> None:
    hq, token = office
    await _audit_some(journal, 3)
    first = (await journal.pending_audit(1))[0]

    def corrupt() -> None:  # an actor HQ refuses
        with journal.engine.begin() as conn:
            conn.execute(audit_t.update().where(audit_t.c.id == first.id).values(actor="x" * 190))

    await journal._run(corrupt)
    client = _client(Rewrite(hq.app, _results(lambda r: r[::-1])), token)
    try:
        agent = SyncAgent(journal, client)
        assert await agent.upload_audit_once() == 3
    finally:
        await client.close()
    assert (agent.audit_stats.uploaded, agent.audit_stats.refused) == (2, 1)

    def rejected() -> list[int]:
        with journal.engine.connect() as conn:
            return list(conn.execute(sa.select(audit_t.c.id).where(audit_t.c.rejected)).scalars())

    assert await journal._run(rejected) == [first.id]  # the one HQ refused, not another


async def test_the_audit_back_off_grows_on_its_own_and_starts_over_after_a_success(
    office: tuple[HeadOffice, str], journal: Journal, longest_waits: None
) -> None:
    hq, token = office
    await _audit_some(journal, 2)
    proxy = Rewrite(hq.app)
    proxy.status = 503
    client = _client(proxy, token)
    try:
        agent = SyncAgent(journal, client, backoff_initial_s=10.0, backoff_max_s=1000.0)

        async def failed_wait() -> float:
            agent._audit_not_before = 0.0  # the previous back-off is over
            assert await agent.upload_audit_once() == 0
            return round(agent._audit_not_before - time.monotonic())

        assert [await failed_wait() for _ in range(3)] == [20, 40, 80]
        assert agent.audit_stats.alarm == "audit upload refused by HQ: proxy.failing"
        assert agent.backoff_cap() == 10.0  # the sales upload's back-off did not move
        proxy.status = None
        agent._audit_not_before = 0.0
        assert await agent.upload_audit_once() == 2
        assert agent.audit_stats.alarm is None
        await _audit_some(journal, 1)
        proxy.status = 503
        assert await failed_wait() == 20  # a new outage starts from the first step again
    finally:
        await client.close()


class SizeLimit:
    """A reverse proxy's body-size limit in front of HQ (nginx's ``client_max_body_size``)."""

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


async def test_413_halves_the_audit_batch_until_it_fits(
    office: tuple[HeadOffice, str], journal: Journal
) -> None:
    hq, token = office
    await _audit_some(journal, 8)
    one = len(json.dumps((await journal.pending_audit(1))[0].payload))
    client = _client(SizeLimit(hq.app, max_bytes=one * 3 + 100), token)
    try:
        agent = SyncAgent(journal, client, batch_size=8)
        assert await agent.upload_audit_once() == 0  # 8 do not fit
        assert agent.audit_stats.alarm == "audit upload refused by HQ: http_413"
        assert agent.audit_batch_size == 4
        agent._audit_not_before = 0.0
        assert await agent.upload_audit_once() == 0  # 4 do not fit either
        assert agent.audit_batch_size == 2
        agent._audit_not_before = 0.0
        assert await agent.upload_audit_once() == 2
        assert agent.audit_stats.alarm is None
        while await agent.upload_audit_once():
            pass
    finally:
        await client.close()
    assert (agent.audit_stats.uploaded, agent.audit_stats.failures) == (8, 2)
    assert await journal.audit_usage() == (0, 0)


async def test_after_a_413_the_audit_batch_grows_back_after_a_run_of_successes(
    office: tuple[HeadOffice, str], journal: Journal
) -> None:
    hq, token = office
    regrow = sync.REGROW_AFTER_BATCHES
    await _audit_some(journal, 4 * regrow + 16)
    one = len(json.dumps((await journal.pending_audit(1))[0].payload))
    client = _client(SizeLimit(hq.app, max_bytes=one * 6), token)  # 4 fit, 8 never
    try:
        agent = SyncAgent(journal, client, batch_size=8)
        assert await agent.upload_audit_once() == 0  # 8 do not fit; 4 will
        assert agent.audit_batch_size == 4
        agent._audit_not_before = 0.0
        for n in range(regrow - 1):
            assert await agent.upload_audit_once() == 4, n
            assert agent.audit_batch_size == 4
        assert await agent.upload_audit_once() == 4
        assert agent.audit_batch_size == 8  # tried again after a run of successes
        assert await agent.upload_audit_once() == 0  # still too large: halved again
        assert agent.audit_batch_size == 4
    finally:
        await client.close()
    assert agent.audit_stats.failures == 2
    assert agent.audit_stats.uploaded == 4 * regrow


async def _audit_many(journal: Journal, n: int) -> None:
    """``n`` audit records as record_audit writes them, in one transaction (quicker)."""

    def write() -> None:
        with journal.engine.begin() as conn:
            conn.execute(
                audit_t.insert(),
                [
                    {
                        "record_id": f"0193a7c2-0000-7000-8000-{i:012d}",
                        "at": journal.clock.now(),
                        "actor": "edge",
                        "action": "pump.prices",
                        "target": f"S001-{i}",
                        "details": "{}",
                    }
                    for i in range(n)
                ],
            )

    await journal._run(write)


async def test_an_agent_with_big_batches_uploads_audit_records_500_at_a_time(
    office: tuple[HeadOffice, str], journal: Journal
) -> None:
    hq, token = office
    await _audit_many(journal, 600)
    client = _client(hq.app, token)
    try:
        agent = SyncAgent(journal, client, batch_size=1000)
        assert await agent.upload_audit_once() == 500  # HQ's limit, not the sales batch size
        assert await agent.upload_audit_once() == 100
    finally:
        await client.close()
    assert agent.audit_stats.failures == 0
    assert await journal.audit_usage() == (0, 0)


async def test_the_journal_marks_more_than_500_delivered_records_at_once(
    journal: Journal,
) -> None:
    await _audit_many(journal, 501)
    pending = await journal.pending_audit(1000)
    await journal.audit_answered([p.id for p in pending], {})
    assert await journal.pending_audit(1000) == []
    assert await journal.audit_usage() == (0, 0)


async def test_pruning_goes_by_when_hq_took_a_record_strictly_before_the_cutoff(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    journal = Journal(tmp_path / "edge.db", clock)
    await journal.open()
    try:
        recorded = clock.now()
        await _audit_some(journal, 2)
        clock.advance(40 * DAY)  # HQ was away for 40 days: they went up only now
        taken = clock.now()
        await journal.audit_answered([p.id for p in await journal.pending_audit(10)], {})
        assert await journal.prune_uploaded_audit(recorded + 30 * DAY) == 0
        assert await journal.prune_uploaded_audit(taken) == 0  # taken at, not before
        assert await journal.prune_uploaded_audit(taken + timedelta(microseconds=1)) == 2
    finally:
        await journal.close()
