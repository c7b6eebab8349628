"""``bench/payments.py`` end to end with tiny figures: HQ, the edge and both provider
simulators as processes on PostgreSQL, pgbench beside them; the last line of ``--json`` has
the figures and says the run was verified (every paid order linked to its sale, the
simulators' captures equal to the paid orders)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "payments.py"
RUN_S = 55.0  # about 35-45 s: two 2-second pgbench runs, key generation, 40 orders; a hard stop

KEYS = {
    "orders_per_s",
    "pgbench_tps",
    "ratio",
    "p50_ms",
    "p99_ms",
    "clients",
    "orders",
    "cpu_signing_ms_per_order",
    "cpu_http_ms_per_order",
    "cpu_postgres_ms_per_order",
    "cpu_ms_per_order",
    "goal_met",
    "verified",
}


@pytest.mark.skipif(shutil.which("pgbench") is None, reason="needs pgbench on the path")
def test_the_payments_benchmark_runs_and_verifies_its_orders() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORECOURT_")}
    run = subprocess.run(
        [sys.executable, str(BENCH), "--clients", "2", "--orders", "40"]
        + ["--pgbench-seconds", "2", "--scale", "1", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_S,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert KEYS <= set(result), KEYS - set(result)
    assert result["verified"] is True, result["verification"]
    assert result["orders"] == 40
    assert result["clients"] == 2
    assert result["orders_per_s"] > 0
    assert result["pgbench_tps"] > 0
    assert result["verification"]["hq_paid_orders"] == result["verification"]["client_paid"]
    captures = result["verification"]["captures"]
    assert captures["wechat"] > 0
    assert captures["alipay"] > 0
    assert sum(captures.values()) == result["verification"]["hq_paid_orders"]
    assert result["p50_ms"] <= result["p99_ms"]
    assert {"hq", "edge", "wechat simulator", "alipay simulator"} <= set(result["cpu_ms_per_order"])
    assert result["cpu_signing_ms_per_order"] > 0
