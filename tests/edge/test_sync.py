"""The sync agent against a real HQ app: a refused sale never blocks the rest, the disk
budget, back-off (more on HQ's verdicts in test_upload_verdicts)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from forecourt.bootstrap import HeadOffice, build_head_office
from forecourt.edge.journal import Journal, outbox_t
from forecourt.edge.sync import HqClient, SyncAgent
from forecourt.kernel.clock import SystemClock
from forecourt.network.handlers import SAMPLE_CHAIN, import_chain, issue_credential, load_chain_file
from forecourt.settings import Settings
from tests.edge.test_journal import DRAFT
from tests.support import staff_headers


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


async def _journal(tmp_path: Path) -> Journal:
    journal = Journal(tmp_path / "edge.db", SystemClock())
    await journal.open()
    return journal


async def test_a_sale_hq_refuses_is_kept_aside_and_the_rest_uploads(
    tmp_path: Path, office: tuple[HeadOffice, str]
) -> None:
    hq, token = office
    journal = await _journal(tmp_path)
    client = HqClient("http://hq", "S001", token, transport=httpx.ASGITransport(app=hq.app))
    try:
        for n in range(1, 8):
            await journal.record_sale(replace(DRAFT, device_txn=n, device_id="pts-S001"))

        # Corrupt sale 5 in the outbox as a buggy older edge might have written it.
        def corrupt() -> None:
            with journal.engine.begin() as conn:
                row = conn.execute(sa.select(outbox_t.c.payload).where(outbox_t.c.seq == 5)).one()
                payload = json.loads(row.payload)
                payload["volume_ml"] = -1
                conn.execute(
                    outbox_t.update().where(outbox_t.c.seq == 5).values(payload=json.dumps(payload))
                )

        await journal._run(corrupt)
        agent = SyncAgent(journal, client, batch_size=100)
        for _ in range(20):
            if not await agent.upload_once():
                break
        assert agent.stats.uploaded == 6
        assert agent.stats.refused == 1
        pending, _, rejected = await journal.outbox_usage()
        assert (pending, rejected) == (1, 1)  # kept, not dropped, and never blocks the rest
        assert await journal.pending_uploads(100) == []
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=hq.app),
            base_url="http://hq",
            headers=await staff_headers(hq.identity),
        ) as staff:
            summary = (await staff.get("/v1/stations/S001/sequence")).json()
        assert summary["gaps"] == [[5, 5]]  # HQ sees exactly which sale it is missing
    finally:
        await client.close()
        await journal.close()


async def test_the_outbox_disk_budget_raises_alarms_at_each_threshold_and_clears(
    tmp_path: Path,
) -> None:
    journal = await _journal(tmp_path)
    client = HqClient("http://127.0.0.1:9", "S001", "x" * 32)
    try:
        first = await journal.record_sale(DRAFT)
        _, one_sale, _ = await journal.outbox_usage()
        agent = SyncAgent(journal, client, budget_bytes=one_sale * 10, alarm_ratios=(0.5, 0.8))
        await agent.check_budget()
        assert agent.alarm_level == 0
        for n in range(2, 6):
            await journal.record_sale(replace(DRAFT, device_txn=n))
        await agent.check_budget()
        assert agent.alarm_level == 1  # 50 %
        for n in range(6, 9):
            await journal.record_sale(replace(DRAFT, device_txn=n))
        await agent.check_budget()
        assert agent.alarm_level == 2  # 80 %
        assert await journal.sequence_check() == (8, 8)  # the station kept recording
        pending = await journal.pending_uploads(100)
        await journal.record_answers([(p.sale_id, "created", []) for p in pending if p.seq > 1])
        await agent.check_budget()
        assert agent.alarm_level == 0
        assert [p.sale_id for p in await journal.pending_uploads(100)] == [first.sale_id]
    finally:
        await client.close()
        await journal.close()


async def test_an_unreachable_hq_counts_failures_and_backs_off_with_jitter(tmp_path: Path) -> None:
    journal = await _journal(tmp_path)
    client = HqClient("http://127.0.0.1:9", "S001", "x" * 32, timeout=0.5)
    try:
        await journal.record_sale(DRAFT)
        agent = SyncAgent(journal, client, backoff_initial_s=0.1, backoff_max_s=2.0)
        for _ in range(4):
            assert await agent.upload_once() == 0
        assert agent.stats.failures == 4
        delays = [agent.backoff() for _ in range(200)]
        assert all(0 <= d <= 1.6 for d in delays)  # 0.1 × 2^4 cap
        assert max(delays) > 0.8  # jitter spreads over the whole range
        assert len(await journal.pending_uploads(10)) == 1  # nothing lost while HQ is away
    finally:
        await client.close()
        await journal.close()
