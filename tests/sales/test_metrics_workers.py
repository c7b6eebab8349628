"""Metrics that are true across HTTP worker processes: database-wide figures are read at
every scrape, so two workers on one database serve the same value, never a stale view."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from forecourt.bootstrap import HeadOffice, build_head_office
from forecourt.settings import Settings
from tests.infra.support import sale_event
from tests.support import staff_headers, staff_headers_at, start_workers


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
    """``/metrics`` as an HQ admin (it holds metrics:read)."""
    transport = httpx.ASGITransport(app=office.app)
    headers = await staff_headers(office.identity)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://hq", headers=headers
    ) as client:
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


# --- real worker processes: counts added up across them ---------------------------------------


def _counter(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = rf"^{name}\{{{wanted}\}} (\S+)$" if labels else rf"^{name} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def _seed(pg_url: str) -> str:
    from forecourt.infra.db import Database
    from forecourt.infra.migrate import upgrade
    from forecourt.network.handlers import (
        SAMPLE_CHAIN,
        import_chain,
        issue_credential,
        load_chain_file,
    )

    db = Database(pg_url)
    await db.connect()
    try:
        await upgrade(db)
        await import_chain(db, load_chain_file(SAMPLE_CHAIN))
        return (await issue_credential(db, "S001"))[1]
    finally:
        await db.dispose()


@pytest.mark.e2e
@pytest.mark.parametrize("operator_dir", [True, False], ids=["operator-dir", "own-dir"])
async def test_every_scrape_of_two_worker_processes_answers_the_totals_of_both(
    tmp_path: Path, pg_url: str, operator_dir: bool
) -> None:
    """With ``PROMETHEUS_MULTIPROC_DIR`` set by the operator (emptied at start, each
    process's file visible) or left to the supervisor (a directory of its own)."""
    from tests.sales.conftest import make_sale

    token = await _seed(pg_url)
    staff = await staff_headers_at(pg_url)  # scrapes /metrics as an HQ admin
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_99999.db").write_bytes(b"an earlier run's file")
    env = {
        **{k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
        "FORECOURT_DATABASE_URL": pg_url,
        "FORECOURT_CONSUMERS": "none",
        "FORECOURT_LOG_LEVEL": "WARNING",
    }
    if operator_dir:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    supervisor, port = await start_workers(tmp_path, env)
    try:
        url = f"http://127.0.0.1:{port}"
        # The operator's directory is emptied at start; otherwise it is not used at all.
        assert (metrics_dir / "counter_99999.db").exists() is not operator_dir
        uploaded = 0
        pids: set[str] = set()
        # One connection per batch: the kernel spreads connections over the two workers.
        for _ in range(40):
            async with httpx.AsyncClient(base_url=url) as client:
                sales = [make_sale() for _ in range(3)]
                answer = await client.post(
                    "/v1/stations/S001/sales:batch",
                    json={"schema_version": 1, "sales": sales},
                    headers={"authorization": f"Bearer {token}"},
                )
                assert answer.status_code == 200, answer.text
                uploaded += 3
            # Which processes have counted something (each writes its own file).
            pids = {p.stem.rsplit("_", 1)[1] for p in metrics_dir.glob("counter_*.db")}
            if operator_dir and uploaded >= 12 and len(pids) >= 2:
                break
        if operator_dir:
            assert len(pids) >= 2, "every upload reached one worker: nothing to add up"
        for _ in range(10):
            async with httpx.AsyncClient(base_url=url) as client:
                text = (await client.get("/metrics", headers=staff)).text
            assert _counter(text, "forecourt_sales_ingested_total", status="created") == uploaded
            assert "forecourt_outbox_backlog " in text  # read live, not added up
            assert text.count("# TYPE forecourt_outbox_backlog gauge") == 1
    finally:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(timeout=30)
    assert supervisor.returncode == 0
