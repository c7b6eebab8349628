"""``forecourt worker``: hosts the consumers named by ``--consumers`` (or FORECOURT_CONSUMERS)
on the configured database and bus, says "consumers running: ..." once subscribed and stops
with status 0 on SIGINT and SIGTERM; an unknown consumer is a usage error (2) in one line, a
database or bus that does not answer the same one line ``serve`` gives. ``serve --workers N``
starts one beside its relay process and stops it with the others."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.cli.support import CLI, Running, alive, children_of, clean_env, run

QUIET = {"FORECOURT_LOG_LEVEL": "WARNING"}  # the announce line is said at any level
START_S = 60.0


def sqlite_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return clean_env(FORECOURT_DATABASE_URL=f"sqlite:///{tmp_path / 'hq.db'}", **QUIET, **extra)


def nats_env(pg_url: str, nats_url: str, stream: str, **extra: str) -> dict[str, str]:
    return clean_env(
        FORECOURT_DATABASE_URL=pg_url,
        FORECOURT_BUS_URL=nats_url,
        FORECOURT_NATS_STREAM=stream,
        FORECOURT_NATS_SUBJECT_PREFIX=stream.lower(),
        **QUIET,
        **extra,
    )


def running_line(proc: Running, names: str) -> str:
    line = f"consumers running: {names}"
    return proc.wait_for(lambda text: line in text, START_S, f"'{line}'")


def assert_stopped_cleanly(proc: Running, code: int) -> None:
    text = proc.stderr()
    assert code == 0, text
    for sign in ("Traceback", "Aborted!", "KeyboardInterrupt", '"level": "error"'):
        assert sign not in text, text


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_worker_on_sqlite_and_the_memory_bus_says_it_runs_and_stops_with_status_zero(
    tmp_path: Path, sig: signal.Signals
) -> None:
    command = [*CLI, "worker", "--consumers", "probe"]
    worker = Running(command, tmp_path, sqlite_env(tmp_path), "worker")
    try:
        running_line(worker, "probe")
    finally:
        code = worker.stop(sig)
    assert_stopped_cleanly(worker, code)
    assert worker.stderr().count("consumers running: probe") == 1
    assert (tmp_path / "hq.db").exists()  # migrated like relay: it made the schema


async def test_a_worker_on_postgresql_and_nats_says_it_runs_and_stops_with_status_zero(
    tmp_path: Path, pg_url: str, nats_url: str, unique_stream: str
) -> None:
    command = [*CLI, "worker", "--consumers", "probe"]
    worker = Running(command, tmp_path, nats_env(pg_url, nats_url, unique_stream), "worker")
    try:
        running_line(worker, "probe")
        # While it runs, the bus knows its subscription: the status names it.
        done = run(
            ["events", "status", "--json"], tmp_path, nats_env(pg_url, nats_url, unique_stream)
        )
    finally:
        code = worker.stop(signal.SIGTERM)
    assert_stopped_cleanly(worker, code)
    assert done.code == 0, done.stderr
    assert '"probe"' in done.stdout


def test_the_consumers_come_from_the_environment_when_no_option_names_them(
    tmp_path: Path,
) -> None:
    env = sqlite_env(tmp_path, FORECOURT_CONSUMERS="probe")
    worker = Running([*CLI, "worker"], tmp_path, env, "worker")
    try:
        running_line(worker, "probe")
    finally:
        code = worker.stop(signal.SIGTERM)
    assert_stopped_cleanly(worker, code)


def test_an_unknown_consumer_is_a_usage_error_naming_the_known_ones(tmp_path: Path) -> None:
    done = run(["worker", "--consumers", "probe,nosuch"], tmp_path, sqlite_env(tmp_path))
    assert done.code == 2, done.stderr
    message = done.one_line_error()
    assert "unknown consumer 'nosuch'" in message
    assert "known: payments, probe" in message


def test_an_unknown_consumer_in_the_environment_is_a_usage_error_too(tmp_path: Path) -> None:
    done = run(["worker"], tmp_path, sqlite_env(tmp_path, FORECOURT_CONSUMERS="nosuch"))
    assert done.code == 2, done.stderr
    assert "unknown consumer 'nosuch'" in done.one_line_error()


def test_serve_refuses_an_unknown_consumer_before_it_starts(tmp_path: Path) -> None:
    done = run(["serve", "--port", "0", "--consumers", "nosuch"], tmp_path, sqlite_env(tmp_path))
    assert done.code == 2, done.stderr
    assert "unknown consumer 'nosuch'" in done.one_line_error()


def test_a_postgresql_server_that_does_not_answer_is_the_line_serve_gives(tmp_path: Path) -> None:
    url = "postgresql://postgres@127.0.0.1:1/x"
    env = clean_env(FORECOURT_DATABASE_URL=url, **QUIET)
    worker = run(["worker", "--consumers", "probe"], tmp_path, env)
    serve = run(["serve", "--port", "0"], tmp_path, env)
    assert worker.code == 1, worker.stderr
    line = worker.one_line_error()
    assert line.startswith("cannot reach PostgreSQL at 127.0.0.1:1 (")
    assert line == serve.one_line_error()


def test_a_bus_that_does_not_answer_is_the_line_serve_gives(tmp_path: Path) -> None:
    env = sqlite_env(tmp_path, FORECOURT_BUS_URL="nats://127.0.0.1:1")
    worker = run(["worker", "--consumers", "probe"], tmp_path, env)
    serve = run(["serve", "--port", "0"], tmp_path, env)
    assert worker.code == 1, worker.stderr
    line = worker.one_line_error()
    assert line.startswith("cannot reach NATS at nats://127.0.0.1:1 (")
    assert line == serve.one_line_error()


def test_serve_with_workers_runs_the_consumers_in_a_worker_process_stopped_with_the_rest(
    tmp_path: Path, pg_url: str
) -> None:
    env = clean_env(FORECOURT_DATABASE_URL=pg_url, **QUIET)
    command = [*CLI, "serve", "--workers", "2", "--port", "0", "--consumers", "probe"]
    hq = Running(command, tmp_path, env, "hq")
    try:
        url = hq.wait_listening(START_S)
        running_line(hq, "probe")  # the worker child shares the supervisor's stderr
        assert httpx.get(f"{url}/ready", timeout=5).status_code == 200
        children = children_of(hq.pid)
        commands = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in children]
        assert len(children) == 4  # two HTTP workers, the relay and the consumer worker
        assert sum(b"worker" in args for args in commands) == 1
    finally:
        code = hq.stop(signal.SIGTERM, timeout=30)
    assert_stopped_cleanly(hq, code)
    # Only the worker process hosts consumers: the HTTP workers run none.
    assert hq.stderr().count("consumers running:") == 1
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [pid for pid in children if alive(pid)] == []


def test_a_worker_serves_its_consumers_metrics_when_asked(tmp_path: Path) -> None:
    proc = Running(
        [*CLI, "worker", "--consumers", "probe", "--metrics-port", "0"],
        tmp_path,
        sqlite_env(tmp_path),
        "worker",
    )
    try:
        text = proc.wait_for(lambda t: "metrics on http://" in t, 60, "the metrics line")
        line = next(x for x in text.splitlines() if "metrics on http://" in x)
        url = line.split("metrics on ", 1)[1].split('"', 1)[0].split()[0]
        running_line(proc, "probe")
        body = httpx.get(url, timeout=5).text
        assert "forecourt_consumer_outage 0.0" in body
        assert "# TYPE forecourt_consumer_lag_seconds histogram" in body
        code = proc.stop(signal.SIGTERM)
    finally:
        proc.kill()
    assert_stopped_cleanly(proc, code)
