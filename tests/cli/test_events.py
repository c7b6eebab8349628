"""``forecourt events``: dead letters listed (table or JSON), shown in full, marked for replay
(and, with ``--wait``, the outcome reported), and the consumers' status; unknown ids and
missing arguments in one line. At the end, the whole path through real processes: a sale the
probe consumer refuses ends as a dead letter, and a replay reports that it failed again."""

from __future__ import annotations

import json
import signal
import time
from datetime import UTC, datetime
from itertools import count
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from forecourt.infra.db import Database, dead_letter_table
from forecourt.infra.migrate import upgrade
from tests.cli.support import CLI, Finished, Running, clean_env, run
from tests.sales.conftest import make_sale

QUIET = {"FORECOURT_LOG_LEVEL": "WARNING"}
_event_ids = count(1)


def env_for(url: str, **extra: str) -> dict[str, str]:
    return clean_env(FORECOURT_DATABASE_URL=url, **QUIET, **extra)


def events(args: list[str], tmp_path: Path, url: str, timeout: float = 30.0) -> Finished:
    return run(["events", *args], tmp_path, env_for(url), timeout=timeout)


def dead_letter(consumer: str = "probe", **overrides: Any) -> dict[str, Any]:
    event_id = f"0193e7c0-0000-7000-8000-{next(_event_ids):012d}"
    body = {"sale_id": event_id, "shift_id": "probe:fail", "volume_ml": 40000}
    row = {
        "consumer": consumer,
        "event_id": event_id,
        "type": "com.forecourt.sales.sale.completed.v1",
        "subject": "forecourt.sales.sale.completed",
        "headers": json.dumps({"ce-id": event_id, "ce-type": "com.forecourt.sales.sale.v1"}),
        "body": json.dumps(body),
        "deliveries": 5,
        "error": f"ProbeRefused: event {event_id} is marked 'probe:fail'\nsecond line",
        "dead_at": datetime(2026, 12, 1, 9, 30, tzinfo=UTC),
    }
    row.update(overrides)
    return row


async def insert_dead_letters(url: str, rows: list[dict[str, Any]]) -> list[int]:
    """Migrate the database and store ``rows`` as dead letters; their ids, in order."""
    db = Database(url)
    await db.connect()
    try:
        await upgrade(db)
        ids = []
        async with db.begin() as uow:
            for row in rows:
                result = await uow.conn.execute(dead_letter_table.insert().values(**row))
                ids.append(int(result.inserted_primary_key[0]))
        return ids
    finally:
        await db.dispose()


async def stored(url: str) -> dict[int, Any]:
    db = Database(url)
    await db.connect()
    try:
        async with db.connection() as conn:
            rows = (await conn.execute(sa.select(dead_letter_table))).all()
        return {row.id: row for row in rows}
    finally:
        await db.dispose()


# --- listing and showing ----------------------------------------------------------------------


def test_dead_letters_on_an_empty_database_says_there_are_none(
    tmp_path: Path, sqlite_url: str
) -> None:
    done = events(["dead-letters"], tmp_path, sqlite_url)
    assert done.code == 0, done.stderr
    assert done.stdout.strip() == "no dead letters"
    as_json = events(["dead-letters", "--json"], tmp_path, sqlite_url)
    assert as_json.code == 0, as_json.stderr
    assert json.loads(as_json.stdout) == []


async def test_dead_letters_are_listed_as_a_table_and_as_json(tmp_path: Path, db_url: str) -> None:
    rows = [dead_letter("probe"), dead_letter("loyalty.bookings"), dead_letter("probe")]
    ids = await insert_dead_letters(db_url, rows)

    table = events(["dead-letters"], tmp_path, db_url)
    assert table.code == 0, table.stderr
    lines = table.stdout.splitlines()
    for dead_id, row in zip(ids, rows, strict=True):
        line = next(line for line in lines if row["event_id"] in line)
        assert str(dead_id) in line
        assert row["consumer"] in line
        assert row["type"] in line
        assert "2026-12-01 09:30:00" in line
        assert "ProbeRefused: event" in line  # the error's first line only
    assert "second line" not in table.stdout

    listed = json.loads(events(["dead-letters", "--json"], tmp_path, db_url).stdout)
    assert [item["id"] for item in listed] == ids  # oldest first
    assert listed[0]["event_id"] == rows[0]["event_id"]
    assert listed[0]["headers"] == json.loads(rows[0]["headers"])
    assert listed[0]["deliveries"] == 5
    assert listed[0]["replay_requested_at"] is None

    probe = json.loads(
        events(["dead-letters", "--consumer", "probe", "--json"], tmp_path, db_url).stdout
    )
    assert [item["id"] for item in probe] == [ids[0], ids[2]]
    limited = events(["dead-letters", "--limit", "1"], tmp_path, db_url)
    assert "showing 1 of 3" in limited.stdout


async def test_show_prints_one_dead_letter_in_full(tmp_path: Path, sqlite_url: str) -> None:
    row = dead_letter()
    [dead_id] = await insert_dead_letters(sqlite_url, [row])

    done = events(["show", str(dead_id)], tmp_path, sqlite_url)
    assert done.code == 0, done.stderr
    text = done.stdout
    assert f"dead letter {dead_id}" in text
    assert row["event_id"] in text
    assert "second line" in text  # the whole error
    assert f"ce-id: {row['event_id']}" in text  # the headers
    assert '    "shift_id": "probe:fail"' in text  # the body, pretty-printed

    shown = json.loads(events(["show", str(dead_id), "--json"], tmp_path, sqlite_url).stdout)
    assert shown["id"] == dead_id
    assert shown["body"] == row["body"]
    assert shown["error"] == row["error"]


async def test_a_body_that_is_not_json_is_shown_as_it_is(tmp_path: Path, sqlite_url: str) -> None:
    [dead_id] = await insert_dead_letters(sqlite_url, [dead_letter(body="not json {")])
    done = events(["show", str(dead_id)], tmp_path, sqlite_url)
    assert done.code == 0, done.stderr
    assert "  not json {" in done.stdout


def test_show_of_an_unknown_id_is_one_line_and_status_one(tmp_path: Path, sqlite_url: str) -> None:
    done = events(["show", "42"], tmp_path, sqlite_url)
    assert done.code == 1, done.stderr
    assert done.one_line_error() == (
        "no dead letter 42 — list them with: forecourt events dead-letters"
    )


# --- replay -----------------------------------------------------------------------------------


async def test_replay_marks_the_dead_letters_named(tmp_path: Path, db_url: str) -> None:
    ids = await insert_dead_letters(db_url, [dead_letter(), dead_letter(), dead_letter()])
    done = events(["replay", str(ids[0]), str(ids[2])], tmp_path, db_url)
    assert done.code == 0, done.stderr
    assert "marked 2 dead letters for replay" in done.stdout
    assert "forecourt worker" in done.stdout
    assert "forecourt serve" in done.stdout
    rows = await stored(db_url)
    assert [i for i in ids if rows[i].replay_requested_at is not None] == [ids[0], ids[2]]


async def test_replay_all_marks_every_one_of_the_consumer_named(
    tmp_path: Path, sqlite_url: str
) -> None:
    rows = [dead_letter("probe"), dead_letter("loyalty.bookings"), dead_letter("probe")]
    ids = await insert_dead_letters(sqlite_url, rows)
    done = events(["replay", "--all", "--consumer", "probe", "--json"], tmp_path, sqlite_url)
    assert done.code == 0, done.stderr
    assert json.loads(done.stdout) == {"marked": [ids[0], ids[2]], "consumers": ["probe"]}
    stored_rows = await stored(sqlite_url)
    assert stored_rows[ids[1]].replay_requested_at is None
    # A consumer that is not registered has nobody to replay its dead letters: said so.
    other = events(["replay", str(ids[1])], tmp_path, sqlite_url)
    assert "no consumer named loyalty.bookings is registered" in other.stdout


def test_replay_without_ids_or_all_is_a_usage_error(tmp_path: Path, sqlite_url: str) -> None:
    done = events(["replay"], tmp_path, sqlite_url)
    assert done.code == 2, done.stderr
    assert "--all" in done.one_line_error()
    both = events(["replay", "1", "--all"], tmp_path, sqlite_url)
    assert both.code == 2, both.stderr


async def test_replay_of_unknown_ids_names_them_and_marks_nothing(
    tmp_path: Path, sqlite_url: str
) -> None:
    [known] = await insert_dead_letters(sqlite_url, [dead_letter()])
    done = events(["replay", str(known), "998", "999"], tmp_path, sqlite_url)
    assert done.code == 1, done.stderr
    assert done.one_line_error().startswith("no dead letters 998, 999 (nothing marked)")
    assert (await stored(sqlite_url))[known].replay_requested_at is None


async def test_replay_wait_without_a_consumer_host_reports_them_still_marked(
    tmp_path: Path, sqlite_url: str
) -> None:
    [dead_id] = await insert_dead_letters(sqlite_url, [dead_letter()])
    started = time.monotonic()
    done = events(["replay", str(dead_id), "--wait", "0.5", "--json"], tmp_path, sqlite_url)
    assert done.code == 1, done.stderr
    assert time.monotonic() - started < 25
    outcome = json.loads(done.stdout)
    assert outcome["waiting"] == [dead_id]
    assert outcome["replayed"] == []
    assert outcome["failed"] == []


# --- status -----------------------------------------------------------------------------------


async def test_status_gives_pending_dead_letters_backlog_and_parked(
    tmp_path: Path, sqlite_url: str
) -> None:
    await insert_dead_letters(sqlite_url, [dead_letter("probe"), dead_letter("probe")])
    done = events(["status", "--json"], tmp_path, sqlite_url)
    assert done.code == 0, done.stderr
    figures = json.loads(done.stdout)
    assert set(figures) == {"consumers", "outbox_backlog", "outbox_parked", "stream"}
    assert figures["stream"] is None  # the in-process bus has no stream
    assert set(figures["consumers"]["probe"]) == {"pending", "dead_letters", "registered"}
    assert figures["consumers"]["probe"]["dead_letters"] == 2
    assert figures["outbox_backlog"] == 0
    assert figures["outbox_parked"] == 0
    table = events(["status"], tmp_path, sqlite_url)
    assert table.code == 0, table.stderr
    assert "probe" in table.stdout
    assert "outbox backlog: 0" in table.stdout


async def test_status_on_nats_reports_the_stream_and_leaves_its_policy_alone(
    tmp_path: Path, pg_url: str, nats_url: str, unique_stream: str
) -> None:
    import nats

    env = env_for(
        pg_url,
        FORECOURT_BUS_URL=nats_url,
        FORECOURT_NATS_STREAM=unique_stream,
        FORECOURT_NATS_SUBJECT_PREFIX=unique_stream.lower(),
    )
    # The deployment's stream keeps events an hour; the operator's shell does not say so.
    worker = Running(
        [*CLI, "worker", "--consumers", "probe"],
        tmp_path,
        {**env, "FORECOURT_NATS_MAX_AGE_S": "3600"},
        "worker",
    )
    try:
        worker.wait_for(lambda t: "consumers running: probe" in t, 60, "the running line")
        done = run(["events", "status", "--json"], tmp_path, env)
    finally:
        assert worker.stop(signal.SIGTERM) == 0, worker.stderr()
    assert done.code == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["consumers"]["probe"]["pending"] == 0
    assert figures["stream"]["stream"] == unique_stream
    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().stream_info(unique_stream)
    finally:
        await nc.close()
    assert info.config.max_age == 3600


def test_status_with_a_bus_that_does_not_answer_is_one_line(
    tmp_path: Path, sqlite_url: str
) -> None:
    done = run(
        ["events", "status", "--bus-url", "nats://127.0.0.1:1"], tmp_path, env_for(sqlite_url)
    )
    assert done.code == 1, done.stderr
    assert done.one_line_error().startswith("cannot reach NATS at nats://127.0.0.1:1 (")


def test_events_on_a_postgresql_server_that_does_not_answer_is_one_line(tmp_path: Path) -> None:
    done = events(["dead-letters"], tmp_path, "postgresql://postgres@127.0.0.1:1/x")
    assert done.code == 1, done.stderr
    assert done.one_line_error().startswith("cannot reach PostgreSQL at 127.0.0.1:1 (")


# --- end to end ---------------------------------------------------------------------------


def eventually(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"no {what} after {timeout} s")


def test_a_sale_the_probe_refuses_ends_as_a_dead_letter_and_fails_again_on_replay(
    tmp_path: Path, sqlite_url: str
) -> None:
    env = env_for(sqlite_url, FORECOURT_CONSUMERS="probe")
    assert run(["import", "--sample"], tmp_path, env).code == 0
    issued = run(["credential", "S001"], tmp_path, env)
    assert issued.code == 0, issued.stderr
    token = json.loads(issued.stdout)["credential"]
    hq = Running([*CLI, "serve", "--port", "0"], tmp_path, env, "hq")
    try:
        url = hq.wait_listening()
        sale = make_sale(shift_id="probe:fail")
        response = httpx.post(
            f"{url}/v1/stations/S001/sales:batch",
            json={"schema_version": 1, "sales": [sale]},
            headers={"authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["status"] == "created"

        def dead() -> list[dict[str, Any]]:
            done = events(["dead-letters", "--json"], tmp_path, sqlite_url)
            assert done.code == 0, done.stderr
            return [d for d in json.loads(done.stdout) if d["consumer"] == "probe"]

        [letter] = eventually(dead, 60, "dead letter of the probe")
        assert json.loads(letter["body"])["shift_id"] == "probe:fail"
        assert letter["deliveries"] == 5
        assert "ProbeRefused" in letter["error"]

        replayed = events(["replay", str(letter["id"]), "--wait", "20"], tmp_path, sqlite_url)
        assert replayed.code == 1, replayed.stdout + replayed.stderr
        assert "replayed 0, failed again 1" in replayed.stdout
        assert f"{letter['id']} (probe) failed again: ProbeRefused" in replayed.stdout
        [again] = dead()
        assert again["replays"] == 1
        assert again["replay_requested_at"] is None
    finally:
        code = hq.stop(signal.SIGTERM)
    assert code == 0, hq.stderr()
    assert "Traceback" not in hq.stderr()


async def park(url: str, count_: int) -> list[int]:
    from forecourt.infra.db import outbox_parked_table

    db = Database(url)
    await db.connect()
    try:
        await upgrade(db)
        now = datetime.now(UTC)
        async with db.begin() as uow:
            await uow.conn.execute(
                outbox_parked_table.insert(),
                [
                    {
                        "id": 100 + n,
                        "event_id": f"evt-parked-{n}",
                        "type": "com.forecourt.sales.sale.completed.v1",
                        "source": "/forecourt/sales",
                        "subject": None,
                        "time": now,
                        "traceparent": None,
                        "data": "{}",
                        "created_at": now,
                        "parked_at": now,
                        "reason": "message size exceeds maximum allowed",
                    }
                    for n in range(count_)
                ],
            )
    finally:
        await db.dispose()
    return [100 + n for n in range(count_)]


async def outbox_ids(url: str) -> list[str]:
    from forecourt.infra.db import outbox_table

    db = Database(url)
    await db.connect()
    try:
        async with db.connection() as conn:
            return list((await conn.execute(sa.select(outbox_table.c.event_id))).scalars())
    finally:
        await db.dispose()


async def test_parked_events_are_listed_and_requeued_into_the_outbox(
    tmp_path: Path, sqlite_url: str
) -> None:
    assert events(["parked"], tmp_path, sqlite_url).stdout.strip() == "no parked events"
    ids = await park(sqlite_url, 2)
    listed = events(["parked", "--json"], tmp_path, sqlite_url)
    assert listed.code == 0, listed.stderr
    assert [r["id"] for r in json.loads(listed.stdout)] == ids
    assert "maximum allowed" in events(["parked"], tmp_path, sqlite_url).stdout
    unknown = events(["requeue", "999"], tmp_path, sqlite_url)
    assert unknown.code == 1
    assert "no parked event 999" in unknown.one_line_error()
    assert events(["requeue"], tmp_path, sqlite_url).code == 2
    moved = events(["requeue", str(ids[0])], tmp_path, sqlite_url)
    assert moved.code == 0, moved.stderr
    assert "1 event back in the outbox" in moved.stdout
    assert await outbox_ids(sqlite_url) == ["evt-parked-0"]
    assert "2 event" not in events(["requeue", "--all"], tmp_path, sqlite_url).stdout
    assert sorted(await outbox_ids(sqlite_url)) == ["evt-parked-0", "evt-parked-1"]
