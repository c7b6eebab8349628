"""Metrics that are true across HTTP worker processes: database-wide figures are read at
every scrape, so two workers on one database serve the same value, never a stale view."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest

from forecourt.bootstrap import HeadOffice, build_head_office
from forecourt.settings import Settings
from tests.infra.support import sale_event


def gauge(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


@pytest.fixture
async def two_workers(pg_url: str) -> AsyncIterator[list[HeadOffice]]:
    offices = [
        build_head_office(Settings(database_url=pg_url, log_json=False, consumers=["none"]))
        for _ in range(2)
    ]
    for office in offices:
        await office.start(relay=False)
    yield offices
    for office in offices:
        await office.stop()


async def scrape(office: HeadOffice) -> str:
    transport = httpx.ASGITransport(app=office.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://hq") as client:
        return (await client.get("/metrics")).text


async def test_both_workers_report_the_outbox_backlog_as_it_is_now(
    two_workers: list[HeadOffice],
) -> None:
    first, second = two_workers
    async with first.db.begin() as uow:
        await uow.emit(*(sale_event(n) for n in range(40)))
    assert [gauge(await scrape(o), "forecourt_outbox_backlog") for o in two_workers] == [40, 40]
    await first.relay.drain()
    # The second worker never relayed nor was asked /ready: it still sees the truth.
    assert [gauge(await scrape(o), "forecourt_outbox_backlog") for o in two_workers] == [0, 0]
    assert gauge(await scrape(second), "forecourt_outbox_parked") == 0
