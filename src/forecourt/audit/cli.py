"""``forecourt audit``: verify the audit trail and chain what waits in the audit outbox.

``forecourt audit verify`` exits 0 and prints ``audit trail intact: N records, M checkpoints``,
or exits 1 with one line naming the first broken record. ``forecourt audit chain`` chains
everything waiting in the outbox now, once, and signs a checkpoint of the head (HQ's chainer
does this continuously; this is for operators and tests). Register with
``main.add_command(audit)``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

T = TypeVar("T")
AUDIT_TREES = ("platform", "audit")

_DB_OPTION_HELP = (
    "HQ database URL: postgresql://user@host/db or sqlite:///file.db "
    "(default: FORECOURT_DATABASE_URL or forecourt.toml, else var/forecourt-hq.db)."
)


def _with_hq_db(database_url: str | None, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``work(db)`` on HQ's database, connected and its audit trees migrated (as the
    main CLI's ``_with_hq_db`` does, which this mirrors without importing it)."""
    import sqlalchemy as sa

    from forecourt.infra.db import Database
    from forecourt.infra.migrate import upgrade
    from forecourt.kernel.errors import ForecourtError
    from forecourt.settings import Settings, load_settings

    try:
        settings = load_settings(
            Settings,
            options={"database_url": "--database-url"},
            **({"database_url": database_url} if database_url else {}),
        )
    except ForecourtError as exc:
        raise click.ClickException(str(exc)) from None

    async def run() -> T:
        db = Database(settings.database_url)
        try:
            await db.connect()
            async with db.connection() as conn:
                await conn.execute(sa.text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001 - one line, not a traceback
            await db.dispose()
            raise click.ClickException(
                f"cannot reach the database {_safe(settings.database_url)}: {_reason(exc)}"
            ) from None
        try:
            # The trees the audit trail reads and writes (HQ migrates them all at start).
            await upgrade(db, AUDIT_TREES)
            return await work(db)
        finally:
            await db.dispose()

    try:
        return asyncio.run(run())
    except click.ClickException:
        raise
    except Exception as exc:
        if os.environ.get("FORECOURT_DEBUG") == "1":
            raise
        raise click.ClickException(_reason(exc)) from None


def _safe(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@click.group()
def audit() -> None:
    """The tamper-evident audit trail: verify it, chain what waits."""


@audit.command("verify")
@click.option(
    "--from",
    "from_seq",
    type=click.IntRange(min=1),
    default=None,
    help="Check from this record on only (the record before it is trusted).",
)
@click.option("--database-url", default=None, help=_DB_OPTION_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as one JSON object.")
def verify_command(from_seq: int | None, database_url: str | None, as_json: bool) -> None:
    """Check every link of the hash chain and every signed checkpoint; exit 1 at a break."""
    from forecourt.audit.handlers import verify

    verdict = _with_hq_db(database_url, lambda db: verify(db, from_seq=from_seq))
    if as_json:
        click.echo(
            json.dumps(
                {
                    "ok": verdict.ok,
                    "records_checked": verdict.records_checked,
                    "checkpoints_checked": verdict.checkpoints_checked,
                    "first_bad_seq": verdict.first_bad_seq,
                    "problem": verdict.problem,
                    "last_seq": verdict.last_seq,
                }
            )
        )
    else:
        click.echo(verdict.describe(), err=not verdict.ok)
    if not verdict.ok:
        raise click.exceptions.Exit(1)


@audit.command("chain")
@click.option("--database-url", default=None, help=_DB_OPTION_HELP)
def chain_command(database_url: str | None) -> None:
    """Chain every record waiting in the audit outbox now, then sign a checkpoint."""
    from forecourt.audit.handlers import chain_waiting

    chained, head = _with_hq_db(database_url, lambda db: chain_waiting(db))
    click.echo(json.dumps({"chained": chained, "head_seq": head}))
