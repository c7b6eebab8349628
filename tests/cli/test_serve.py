"""``forecourt serve`` as the README runs it: any subset of services, a "listening on" line
once it serves, and an orderly stop with status 0 on SIGINT and on SIGTERM — also with
``--workers 2``, whose children all end."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.cli.support import CLI, Running, alive, children_of, clean_env
from tests.support import staff_headers_at

QUIET = {"FORECOURT_LOG_LEVEL": "WARNING"}  # the listening line is said at any level


def sqlite_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return clean_env(FORECOURT_DATABASE_URL=f"sqlite:///{tmp_path / 'hq.db'}", **extra)


def assert_stopped_cleanly(proc: Running, code: int) -> None:
    text = proc.stderr()
    assert code == 0, text
    assert "Traceback" not in text
    assert "Aborted!" not in text
    assert "KeyboardInterrupt" not in text


@pytest.mark.parametrize(
    ("args", "env", "network_served"),
    [
        (["--services", "sales"], {}, False),
        (["--services", "network,sales"], {}, True),
        ([], {"FORECOURT_SERVICES": "sales"}, False),
        ([], {"FORECOURT_SERVICES": "network,sales"}, True),
    ],
    ids=["option-sales", "option-both", "env-sales", "env-both"],
)
def test_serve_runs_the_services_given_by_option_or_environment(
    tmp_path: Path, args: list[str], env: dict[str, str], network_served: bool
) -> None:
    hq = Running([*CLI, "serve", *args, "--port", "0"], tmp_path, sqlite_env(tmp_path, **env), "hq")
    try:
        url = hq.wait_listening()
        ready = httpx.get(f"{url}/ready", timeout=5)
        headers = asyncio.run(staff_headers_at(f"sqlite:///{tmp_path / 'hq.db'}"))
        stations = httpx.get(f"{url}/v1/network/stations", headers=headers, timeout=5)
    finally:
        code = hq.stop(signal.SIGINT)
    assert ready.status_code == 200
    assert (stations.status_code == 200) is network_served
    assert_stopped_cleanly(hq, code)
    assert hq.stderr().count("listening on http://") == 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_stops_in_order_with_status_zero(tmp_path: Path, sig: signal.Signals) -> None:
    port_file = tmp_path / "hq.port"
    command = [*CLI, "serve", "--port", "0", "--port-file", str(port_file)]
    hq = Running(command, tmp_path, sqlite_env(tmp_path, **QUIET), "hq")
    try:
        hq.wait_listening()
        assert port_file.exists()
    finally:
        code = hq.stop(sig)
    assert_stopped_cleanly(hq, code)
    assert not port_file.exists()  # removed by the orderly shutdown


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_with_two_workers_stops_every_child_with_status_zero(
    tmp_path: Path, pg_url: str, sig: signal.Signals
) -> None:
    env = clean_env(FORECOURT_DATABASE_URL=pg_url, **QUIET)
    hq = Running([*CLI, "serve", "--workers", "2", "--port", "0"], tmp_path, env, "hq")
    try:
        url = hq.wait_listening(60)
        assert httpx.get(f"{url}/ready", timeout=5).status_code == 200
        children = children_of(hq.pid)
        assert len(children) == 4  # two HTTP workers, the relay and the consumer worker
    finally:
        code = hq.stop(sig, timeout=30)
    assert_stopped_cleanly(hq, code)
    assert hq.stderr().count("listening on http://") == 1
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [pid for pid in children if alive(pid)] == []
