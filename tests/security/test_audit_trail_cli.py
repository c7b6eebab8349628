"""The audit trail end to end on PostgreSQL, through the installed command: sign-ins and user
changes made through HQ are chained and verify; an edit made directly in the database is
named by ``forecourt audit verify``, as a real process, with exit status 1 and one line."""

from __future__ import annotations

import json
import subprocess
import sys

import sqlalchemy as sa

from forecourt.bootstrap import build_head_office
from forecourt.settings import Settings
from tests.cli.support import clean_env
from tests.support import eventually, staff_headers


def _forecourt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forecourt.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=clean_env(),
    )


async def test_staff_actions_chain_verify_and_an_edit_is_named(pg_url: str) -> None:
    hq = build_head_office(Settings(database_url=pg_url, log_json=False))
    await hq.start(relay=False)
    try:
        for n in range(5):
            await staff_headers(hq.identity, ("finance", "chain"), name=f"clerk{n}")
        assert len(await hq.identity.list_users()) == 5
    finally:
        await hq.stop()

    chained = _forecourt("audit", "chain", "--database-url", pg_url)
    assert chained.returncode == 0, chained.stderr
    head = json.loads(chained.stdout)["head_seq"]
    assert head >= 15  # per user: created, granted, signed in (and the first signing key)

    intact = _forecourt("audit", "verify", "--database-url", pg_url)
    assert intact.returncode == 0, intact.stderr
    assert intact.stdout.startswith(f"audit trail intact: {head} records")

    await hq.db.connect()  # stop() disposed of it
    try:
        async with hq.db.engine.begin() as conn:
            actions = (
                await conn.execute(
                    sa.text("SELECT seq, actor FROM audit.audit_record ORDER BY seq")
                )
            ).all()
            sign_in = next(seq for seq, actor in actions if actor == "user:clerk2")
            await conn.execute(
                sa.text("UPDATE audit.audit_record SET actor = 'user:someone-else' WHERE seq = :s"),
                {"s": sign_in},
            )
    finally:
        await hq.db.dispose()

    broken = _forecourt("audit", "verify", "--database-url", pg_url)
    assert broken.returncode == 1
    assert "Traceback" not in broken.stderr
    lines = (broken.stdout + broken.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert f"record {sign_in}" in lines[0]


async def test_hq_chains_what_it_audits_on_its_own(db_url: str) -> None:
    from forecourt.audit.handlers import verify

    hq = build_head_office(
        Settings(database_url=db_url, log_json=False, audit_chain_interval_s=0.05)
    )
    await hq.start()  # the relay's process: it runs the chainer too
    try:
        await staff_headers(hq.identity, name="watched")

        async def chained() -> bool:
            async with hq.db.connection() as conn:
                waiting = await conn.scalar(
                    sa.text(f"SELECT count(*) FROM {OUTBOX[hq.db.is_sqlite]}")
                )
                actors = set(
                    await conn.scalars(sa.text(f"SELECT actor FROM {RECORDS[hq.db.is_sqlite]}"))
                )
            return waiting == 0 and "user:watched" in actors

        await eventually(chained, what="the audit outbox chained")
        verdict = await verify(hq.db)
        assert verdict.ok, verdict
    finally:
        await hq.stop()


OUTBOX = {True: "audit_outbox", False: "platform.audit_outbox"}
RECORDS = {True: "audit_record", False: "audit.audit_record"}
