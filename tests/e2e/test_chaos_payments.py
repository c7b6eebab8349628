"""``forecourt chaos payments``: HQ and the WeChat Pay and Alipay simulators as real processes
on PostgreSQL, payments taken under provider faults while HQ is SIGKILLed at named crash
points; HQ's orders and refunds agree with the providers' trades afterwards. The counting is
checked on its own too, so that its zeros mean something."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from forecourt.chaos.delivery import read_marker
from forecourt.chaos.payments import (
    CRASH_POINTS,
    FIGURES,
    HqOrder,
    ProviderTrade,
    count_mismatches,
    verdict,
)

RUN_S = 170.0  # about a minute on two cores (see docs/chaos.md); a hard stop


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FORECOURT_")}


def chaos(*args: str, timeout: float = RUN_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forecourt.cli", "chaos", "payments", *args],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def logs(workdir: Path) -> str:
    parts = []
    for log in sorted(workdir.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()
        parts.append(f"--- {log.name}\n" + "\n".join(lines[-15:]))
    return "\n".join(parts)


async def databases(prefix: str) -> list[str]:
    conn = await asyncpg.connect(host="127.0.0.1", user="postgres", database="postgres")
    try:
        rows = await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE $1", prefix)
        return [r["datname"] for r in rows]
    finally:
        await conn.close()


@pytest.mark.e2e
@pytest.mark.chaos
async def test_bounded_run_under_faults_and_crashes_keeps_money_right(tmp_path: Path) -> None:
    done = chaos("--orders", "60", "--json", "--workdir", str(tmp_path), "--seed", "3")
    lines = done.stdout.strip().splitlines()
    assert lines, f"no output (status {done.returncode}):\n{done.stderr}\n{logs(tmp_path)}"
    result: dict[str, Any] = json.loads(lines[-1])
    assert done.returncode == 0, f"{result}\n{done.stderr}\n{logs(tmp_path)}"
    for figure in FIGURES:
        assert result[figure] == 0, (figure, result)
    assert result["drained"] is True
    assert result["orders"] == 60
    assert result["hq_orders"] >= 60  # a declined or reversed code payment is paid in cash
    assert result["provider_trades"] > 0
    # HQ died at least twice, each time exactly at a named crash point (the marker says so).
    assert len(result["crashes"]) >= 2, result
    assert set(result["crashes"]) <= set(CRASH_POINTS)
    marker = next(tmp_path.glob("crash-*.marker"))
    assert sorted(read_marker(marker).values()) == sorted(result["crashes"])
    assert result["hq_unexpected_exits"] == 0
    # Faults really happened: clients had to retry, some orders ended reversed or refunded.
    assert result["client_retries"] > 0
    assert result["states"].get("cancelled", 0) + result["states"].get("failed", 0) > 0
    assert result["states"].get("refunded", 0) + result["states"].get("partially_refunded", 0)
    # Its database is gone.
    assert await databases(result["database"]) == []


def _order(no: str, state: str = "paid", *, sale: str = "s1", refunded: int = 0) -> HqOrder:
    return HqOrder(
        order_id=f"o-{no}",
        sale_id=sale,
        tender="wechat",
        state=state,
        amount_fen=1000,
        refunded_fen=refunded,
        out_trade_no=no,
    )


def _trade(no: str, *, charged: int = 1, returned: int = 0, refunded: int = 0) -> ProviderTrade:
    return ProviderTrade("wechat", no, 1000, charged, returned, refunded)


def test_agreeing_books_count_nothing() -> None:
    orders = [
        _order("A"),
        _order("B", "cancelled", sale="s2"),
        _order("C", "partially_refunded", sale="s3", refunded=300),
        HqOrder("o-cash", "s2", "cash", "paid", 1000, 0, None),
    ]
    trades = [_trade("A"), _trade("B", returned=1000), _trade("C", refunded=300)]
    figures = count_mismatches(orders, trades)
    assert all(figures[f] == 0 for f in FIGURES), figures


def test_a_trade_charged_twice_is_counted() -> None:
    figures = count_mismatches([_order("A")], [_trade("A", charged=2)])
    assert figures["charged_twice"] == 1
    assert verdict({**figures, "drained": True}) == ["1 charged twice"]


def test_a_sale_paid_by_two_kept_trades_is_counted() -> None:
    orders = [_order("A"), _order("B")]  # both of sale s1
    figures = count_mismatches(orders, [_trade("A"), _trade("B")])
    assert figures["charged_twice"] == 1


def test_every_other_mismatch_is_counted() -> None:
    orders = [
        _order("P", "pending", sale="s1"),  # in flight; its trade paid
        _order("Q", "paid", sale="s2"),  # paid at HQ, never charged
        _order("R", "cancelled", sale="s3"),  # reversed at HQ, still paid at the provider
        _order("S", "refunded", sale="s4", refunded=1000),  # the provider refunded 400
    ]
    trades = [
        _trade("P"),
        _trade("R"),
        _trade("S", refunded=400),
        _trade("X"),  # no order at all
    ]
    figures = count_mismatches(orders, trades)
    assert figures["not_terminal"] == 1
    assert figures["sales_without_capture"] == 1
    assert figures["compensations_incomplete"] == 1
    assert figures["captured_without_sale"] == 3  # P (pending), R (cancelled), X (none)
    assert figures["refund_mismatch"] == 1  # S: HQ 1000, the provider 400
    assert figures["charged_twice"] == 0


def test_bad_arguments_are_one_line() -> None:
    done = chaos("--orders", "0", timeout=60)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    done = chaos("--orders", "5", "--postgres-url", "sqlite:///x.db", timeout=60)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert len([line for line in done.stderr.splitlines() if line.strip()]) == 1, done.stderr
