"""Persistence of the audit trail (SQLAlchemy Core on SQLite and PostgreSQL; raw asyncpg for
the two hot paths: appending a batch with COPY and streaming the chain to verify it)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from forecourt.audit.domain import GENESIS_HASH, AuditRecord, Checkpoint, format_at
from forecourt.infra.db import UTCDateTime, asyncpg_connection, audit_outbox_table

md = sa.MetaData(schema="audit")
SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

record_t = sa.Table(
    "audit_record",
    md,
    sa.Column("seq", SEQ, primary_key=True, autoincrement=False),
    sa.Column("record_id", sa.String(64), nullable=False, unique=True),
    sa.Column("at", UTCDateTime(), nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("action", sa.String(200), nullable=False),
    sa.Column("target", sa.String(200), nullable=False),
    sa.Column("details", sa.Text(), nullable=False),
    sa.Column("trace_id", sa.String(32)),
    sa.Column("source", sa.String(100)),
    sa.Column("hash", sa.String(64), nullable=False),
)
checkpoint_t = sa.Table(
    "audit_checkpoint",
    md,
    sa.Column("seq", SEQ, primary_key=True, autoincrement=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("at", UTCDateTime(), nullable=False),
    sa.Column("kid", sa.String(64), nullable=False),
    sa.Column("signature", sa.String(128), nullable=False),
)
key_t = sa.Table(
    "audit_signing_key",
    md,
    sa.Column("kid", sa.String(64), primary_key=True),
    sa.Column("generation", sa.Integer(), nullable=False, unique=True),
    sa.Column("public_key", sa.String(64), nullable=False),
    sa.Column("private_key", sa.Text()),
    sa.Column("created_at", UTCDateTime(), nullable=False),
)

RECORD_COLUMNS = (
    "seq",
    "record_id",
    "at",
    "actor",
    "action",
    "target",
    "details",
    "trace_id",
    "source",
    "hash",
)

# pg_try_advisory_xact_lock key of the chainer ("AUDT"): one chainer at a time, any process.
CHAINER_LOCK = 0x41554454


def parse_at(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


async def try_chainer_lock(conn: AsyncConnection) -> bool:
    """Take the chainer's transaction-scoped lock (PostgreSQL); False: another chainer has
    it. On SQLite the single writer lock of the transaction already serialises chainers."""
    if conn.dialect.name == "sqlite":
        return True
    got = await conn.execute(
        sa.text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": CHAINER_LOCK}
    )
    return bool(got.scalar())


async def chain_head(conn: AsyncConnection) -> tuple[int, str]:
    """The last record's seq and hash, (0, genesis) for an empty chain."""
    row = (
        await conn.execute(
            sa.select(record_t.c.seq, record_t.c.hash).order_by(record_t.c.seq.desc()).limit(1)
        )
    ).first()
    return (0, GENESIS_HASH) if row is None else (int(row.seq), str(row.hash))


@dataclass(frozen=True)
class Waiting:
    """An audit-outbox row waiting to be chained."""

    id: int
    fields: tuple[Any, ...]  # record_id, at (canonical), actor, action, target, details, …


async def take_outbox(conn: AsyncConnection, limit: int) -> list[Waiting]:
    """Up to ``limit`` committed outbox rows, in id order."""
    o = audit_outbox_table.c
    rows = await conn.execute(
        sa.select(
            o.id, o.record_id, o.at, o.actor, o.action, o.target, o.details, o.trace_id, o.source
        )
        .order_by(o.id)
        .limit(limit)
    )
    return [
        Waiting(
            int(r.id),
            (
                r.record_id,
                format_at(r.at),
                r.actor,
                r.action,
                r.target,
                r.details,
                r.trace_id,
                r.source,
            ),
        )
        for r in rows
    ]


async def append(conn: AsyncConnection, records: Sequence[AuditRecord]) -> None:
    if not records:
        return
    rows = [(*r[:2], parse_at(r.at), *r[3:]) for r in records]
    if conn.dialect.name == "sqlite":
        await conn.execute(
            record_t.insert(), [dict(zip(RECORD_COLUMNS, row, strict=True)) for row in rows]
        )
        return
    apg = await asyncpg_connection(conn)
    await apg.copy_records_to_table(
        "audit_record", schema_name="audit", columns=RECORD_COLUMNS, records=rows
    )


async def already_chained(conn: AsyncConnection, record_ids: Sequence[str]) -> set[str]:
    """Which of these record ids the chain holds already."""
    found: set[str] = set()
    for start in range(0, len(record_ids), 500):
        chunk = list(record_ids[start : start + 500])
        rows = await conn.execute(
            sa.select(record_t.c.record_id).where(record_t.c.record_id.in_(chunk))
        )
        found.update(r.record_id for r in rows)
    return found


async def add_to_outbox(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> set[str]:
    """Queue records that carry their own ``record_id`` (a station's, uploaded again after a
    lost answer); the ids of those queued now. A record already chained or already waiting
    is left as it is: first write wins, nothing is overwritten."""
    if not rows:
        return set()
    ids = [str(r["record_id"]) for r in rows]
    known = await already_chained(conn, ids)
    fresh = [r for r in rows if r["record_id"] not in known]
    if not fresh:
        return set()
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    statement = (
        insert(audit_outbox_table)
        .values(fresh)
        .on_conflict_do_nothing(index_elements=["record_id"])
        .returning(audit_outbox_table.c.record_id)
    )
    return {r.record_id for r in await conn.execute(statement)}


async def delete_outbox(conn: AsyncConnection, ids: Sequence[int]) -> None:
    """Delete exactly these outbox rows (never a range: a lower id may commit later)."""
    for start in range(0, len(ids), 500):
        chunk = list(ids[start : start + 500])
        await conn.execute(audit_outbox_table.delete().where(audit_outbox_table.c.id.in_(chunk)))


def _checkpoint(row: Any) -> Checkpoint:
    return Checkpoint(
        seq=int(row.seq),
        hash=row.hash,
        at=format_at(row.at),
        kid=row.kid,
        signature=row.signature,
    )


async def last_checkpoint(conn: AsyncConnection) -> Checkpoint | None:
    row = (
        await conn.execute(sa.select(checkpoint_t).order_by(checkpoint_t.c.seq.desc()).limit(1))
    ).first()
    return None if row is None else _checkpoint(row)


async def checkpoints_from(conn: AsyncConnection, from_seq: int) -> list[Checkpoint]:
    rows = await conn.execute(
        sa.select(checkpoint_t).where(checkpoint_t.c.seq >= from_seq).order_by(checkpoint_t.c.seq)
    )
    return [_checkpoint(r) for r in rows]


async def insert_checkpoint(conn: AsyncConnection, cp: Checkpoint) -> None:
    await conn.execute(
        checkpoint_t.insert().values(
            seq=cp.seq, hash=cp.hash, at=parse_at(cp.at), kid=cp.kid, signature=cp.signature
        )
    )


async def public_keys(conn: AsyncConnection) -> dict[str, bytes]:
    rows = await conn.execute(sa.select(key_t.c.kid, key_t.c.public_key))
    return {r.kid: bytes.fromhex(r.public_key) for r in rows}


@dataclass(frozen=True)
class StoredKey:
    kid: str
    generation: int
    public_key: bytes
    private_key_pem: str | None


async def newest_key(conn: AsyncConnection) -> StoredKey | None:
    row = (
        await conn.execute(sa.select(key_t).order_by(key_t.c.generation.desc()).limit(1))
    ).first()
    if row is None:
        return None
    return StoredKey(row.kid, row.generation, bytes.fromhex(row.public_key), row.private_key)


async def add_key_if_none(
    conn: AsyncConnection,
    kid: str,
    public_key: bytes,
    private_key_pem: str | None,
    now: datetime,
) -> None:
    """Store the first key (generation 1) unless one exists: of two processes racing, one
    insert wins and the other does nothing (then both read the winner's)."""
    values = {
        "kid": kid,
        "generation": 1,
        "public_key": public_key.hex(),
        "private_key": private_key_pem,
        "created_at": now,
    }
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    await conn.execute(insert(key_t).values(**values).on_conflict_do_nothing())


async def add_public_key(conn: AsyncConnection, kid: str, public_key: bytes, now: datetime) -> None:
    """Register a public key (of a private key kept outside the database) unless known.
    Raises if another process registered a different key for the same generation at the
    same moment (the pass fails and the next one registers it as the next generation)."""
    known = (await conn.execute(sa.select(key_t.c.kid).where(key_t.c.kid == kid))).first()
    if known is not None:
        return
    generation = (
        await conn.execute(sa.select(sa.func.coalesce(sa.func.max(key_t.c.generation), 0)))
    ).scalar_one()
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    await conn.execute(
        insert(key_t)
        .values(
            kid=kid,
            generation=int(generation) + 1,
            public_key=public_key.hex(),
            private_key=None,
            created_at=now,
        )
        .on_conflict_do_nothing()
    )
    if (await conn.execute(sa.select(key_t.c.kid).where(key_t.c.kid == kid))).first() is None:
        raise RuntimeError(f"audit signing key {kid} could not be registered (a race); retry")


async def record_at(conn: AsyncConnection, seq: int) -> AuditRecord | None:
    row = (await conn.execute(sa.select(record_t).where(record_t.c.seq == seq))).first()
    return None if row is None else _record(row)


def _record(row: Any) -> AuditRecord:
    return AuditRecord(
        int(row.seq),
        row.record_id,
        format_at(row.at),
        row.actor,
        row.action,
        row.target,
        row.details,
        row.trace_id,
        row.source,
        row.hash,
    )


@dataclass(frozen=True)
class RecordQuery:
    actor: str | None = None
    action: str | None = None
    target: str | None = None
    after_seq: int | None = None
    before_seq: int | None = None
    newest_first: bool = True
    limit: int = 100


async def find_records(conn: AsyncConnection, q: RecordQuery) -> list[AuditRecord]:
    c = record_t.c
    query = sa.select(record_t)
    if q.actor is not None:
        query = query.where(c.actor == q.actor)
    if q.action is not None:
        query = query.where(c.action == q.action)
    if q.target is not None:
        query = query.where(c.target == q.target)
    if q.after_seq is not None:
        query = query.where(c.seq > q.after_seq)
    if q.before_seq is not None:
        query = query.where(c.seq < q.before_seq)
    query = query.order_by(c.seq.desc() if q.newest_first else c.seq).limit(q.limit)
    return [_record(r) for r in await conn.execute(query)]


async def waiting_count(conn: AsyncConnection) -> int:
    got = await conn.execute(sa.select(sa.func.count()).select_from(audit_outbox_table))
    return int(got.scalar_one())


# --- streaming the chain ----------------------------------------------------------------------

# PostgreSQL builds each record's canonical bytes itself (domain.canonical's encoding, on the
# server's core, while this process hashes the previous chunk): three columns to decode here
# instead of ten. ``at`` in domain.format_at's form is 27 characters. The verifier re-checks
# any record whose hash does not match from its fields, with domain.canonical, so a
# difference between the two encoders can never be taken for tampering.
_PG_STREAM = """
SELECT seq,
       convert_to(
           length(seq::text) || ':' || seq::text
           || octet_length(record_id) || ':' || record_id
           || '27:' || to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
           || octet_length(actor) || ':' || actor
           || octet_length(action) || ':' || action
           || octet_length(target) || ':' || target
           || octet_length(details) || ':' || details
           || coalesce(octet_length(trace_id) || ':' || trace_id, '-')
           || coalesce(octet_length(source) || ':' || source, '-'),
           'UTF8'),
       hash
FROM audit.audit_record WHERE seq >= $1 ORDER BY seq
"""


async def stream_chain(
    conn: AsyncConnection, from_seq: int, chunk: int = 20_000
) -> AsyncGenerator[tuple[Sequence[Sequence[Any]], bool]]:
    """The records from ``from_seq`` on, in seq order, in chunks: (rows, encoded). Rows are
    laid out as AuditRecord, or when ``encoded`` as (seq, canonical bytes, hash).

    PostgreSQL: encoded rows from one server-side cursor (asyncpg) inside the caller's
    transaction, the next chunk requested while the caller checks the current one.
    SQLite: AuditRecord rows, keyset pages by seq.
    """
    if conn.dialect.name == "sqlite":
        after = from_seq - 1
        while True:
            rows = (
                await conn.execute(
                    sa.select(record_t)
                    .where(record_t.c.seq > after)
                    .order_by(record_t.c.seq)
                    .limit(chunk)
                )
            ).all()
            if not rows:
                return
            after = int(rows[-1].seq)
            await conn.commit()  # SQLite: do not hold the file's lock across the walk
            yield [_record(r) for r in rows], False
        return
    apg = await asyncpg_connection(conn)
    # JIT compiling the row expression costs more than it saves here (2.9 s → 1.9 s of
    # server time per million records).
    await apg.execute("SET LOCAL jit = off")
    cursor = await apg.cursor(_PG_STREAM, from_seq)
    pending = asyncio.ensure_future(cursor.fetch(chunk))
    try:
        while True:
            rows = await pending
            if not rows:
                return
            pending = asyncio.ensure_future(cursor.fetch(chunk))
            yield rows, True
    finally:
        # Let a fetch under way finish (cancelling it would abort the transaction).
        with contextlib.suppress(Exception):
            await pending
