"""The audit trail end to end on PostgreSQL, through the installed command: sign-ins and user
changes made through HQ are chained and verify; an edit made directly in the database is
named by ``forecourt audit verify``, as a real process, with exit status 1 and one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


async def test_checkpoints_signed_by_a_key_kept_out_of_the_database(
    sqlite_url: str, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from forecourt.audit.handlers import verify

    key = Ed25519PrivateKey.generate()
    pem = tmp_path / "audit-key.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    hq = build_head_office(
        Settings(database_url=sqlite_url, log_json=False, audit_signing_key_file=pem)
    )
    await hq.start(relay=False)
    try:
        await staff_headers(hq.identity)
        assert await hq.chainer.run_once(force_checkpoint=True) > 0
        async with hq.db.connection() as conn:
            keys = (await conn.execute(sa.text("SELECT private_key FROM audit_signing_key"))).all()
        assert keys == [(None,)]  # only the public half is stored
        verdict = await verify(hq.db)
        assert verdict.ok
        assert verdict.checkpoints_checked == 1
    finally:
        await hq.stop()
