"""``forecourt worker --consumers payments``: the recovery worker as a process of its own. A
charge HQ never heard back on is settled by the worker process (querying the provider, never
charging again); the worker says it runs, stops with status 0, and is a known name."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from forecourt.bootstrap import known_jobs, select_consumers, select_jobs
from forecourt.payments.domain import OrderState
from forecourt.settings import Settings
from tests.cli.support import CLI, Running, clean_env, run

from . import wechat_support
from .hq_payments import PaymentsHq, Sims, payments_hq, payments_settings, running_sims

START_S = 60.0
SETTLE_S = 30.0


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sims]:
    with running_sims(tmp_path_factory.mktemp("sims")) as running:
        yield running


@pytest.fixture
async def hq(pg_url: str, sims: Sims, tmp_path: Path) -> AsyncIterator[PaymentsHq]:
    # HQ without its background work: only the worker process recovers orders here.
    async with payments_hq(pg_url, sims, tmp_path) as running:
        yield running


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a process these settings."""
    env: dict[str, str] = {}
    for name in settings.model_fields_set:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if value is not None:
            env[f"FORECOURT_{name.upper()}"] = str(value)
    return env


async def wait_state(hq: PaymentsHq, order_id: str, state: OrderState, worker: Running) -> None:
    deadline = time.monotonic() + SETTLE_S
    while (await hq.order(order_id)).state is not state:
        assert worker.process.poll() is None, worker.stderr()
        assert time.monotonic() < deadline, (
            f"order still {(await hq.order(order_id)).state} after {SETTLE_S} s\n{worker.stderr()}"
        )
        await asyncio.sleep(0.1)


async def test_the_worker_process_settles_a_charge_hq_never_heard_back_on(
    hq: PaymentsHq, pg_url: str, tmp_path: Path
) -> None:
    sale = await hq.upload_sale()
    code = wechat_support.auth_code()
    hq.sims.wechat.faults(charge_no_answer_rate=1.0)
    first = await hq.pay(sale, code=code, key=f"sale-{sale['sale_id']}-1")
    hq.sims.wechat.reset_faults()
    assert first.status_code == 202, first.text
    body = first.json()
    assert body["state"] == "unknown"
    settings = payments_settings(pg_url, hq.sims, tmp_path)
    env = clean_env(
        **{
            **settings_env(settings),
            "FORECOURT_LOG_LEVEL": "INFO",
            "FORECOURT_PAYMENTS_RECOVERY_INTERVAL_S": "0.2",
            "FORECOURT_PAYMENTS_RECHECK_S": "0.2",
        }
    )
    worker = Running([*CLI, "worker", "--consumers", "payments"], tmp_path, env, "worker")
    try:
        worker.wait_for(lambda t: "consumers running: payments" in t, START_S, "the running line")
        await wait_state(hq, body["order_id"], OrderState.PAID, worker)
    finally:
        code_ = worker.stop(signal.SIGTERM, timeout=30)
    text = worker.stderr()
    assert code_ == 0, text
    assert "Traceback" not in text, text
    assert "payments.recovery_started" in text
    # Settled by asking, never by charging again.
    assert hq.sims.wechat.trade(body["out_trade_no"])["charged_times"] == 1
    # And the order the cashier's terminal polls now reads paid.
    polled = await hq.client.get(
        f"/v1/stations/S001/payments/{body['order_id']}", headers=hq.cashier
    )
    assert polled.json()["state"] == "paid", polled.text


def test_payments_is_a_job_the_worker_and_default_include() -> None:
    assert "payments" in known_jobs()
    assert [j.name for j in select_jobs(["payments"])] == ["payments"]
    assert "payments" in [j.name for j in select_jobs(["default"])]
    assert select_jobs(["none"]) == []
    assert select_jobs(["probe"]) == []
    # A job's name is not an event consumer's.
    assert [c.name for c in select_consumers(["payments"])] == []


def test_a_worker_with_no_provider_configured_says_so_and_idles(tmp_path: Path) -> None:
    env = clean_env(
        FORECOURT_DATABASE_URL=f"sqlite:///{tmp_path / 'hq.db'}", FORECOURT_LOG_LEVEL="INFO"
    )
    worker = Running([*CLI, "worker", "--consumers", "payments"], tmp_path, env, "worker")
    try:
        worker.wait_for(lambda t: "payments.recovery_idle" in t, START_S, "the idle line")
        assert worker.process.poll() is None
    finally:
        code = worker.stop(signal.SIGTERM, timeout=30)
    assert code == 0, worker.stderr()
    assert "background.task_finished" not in worker.stderr()


def test_an_unknown_name_beside_payments_is_refused_naming_both_kinds(tmp_path: Path) -> None:
    env = clean_env(FORECOURT_DATABASE_URL=f"sqlite:///{tmp_path / 'hq.db'}")
    done = run(["worker", "--consumers", f"payments,nosuch{uuid.uuid4().hex[:4]}"], tmp_path, env)
    assert done.code == 2, done.stderr
    line = done.one_line_error()
    assert "known: payments, probe" in line


def test_a_provider_half_configured_stops_the_worker_with_one_line(tmp_path: Path) -> None:
    env = clean_env(
        FORECOURT_DATABASE_URL=f"sqlite:///{tmp_path / 'hq.db'}",
        FORECOURT_PAYMENTS_WECHAT_MCHID="1900000109",
    )
    done = run(["worker", "--consumers", "payments"], tmp_path, env)
    assert done.code == 2, done.stderr
    line = done.one_line_error()
    assert line.startswith("payments settings: "), line
    assert "Traceback" not in done.stderr
