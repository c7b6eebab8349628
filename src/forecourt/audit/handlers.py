"""Use cases of ``audit``: chain the audit outbox, sign checkpoints, verify, read.

Every audited action writes its record to ``platform.audit_outbox`` in its own transaction
(``UnitOfWork.record_audit``), so actions never wait for each other. One chainer, after
commit, gives the waiting records their order and hash chain (see :class:`AuditChainer`), and
signs a checkpoint of the chain's head now and then; :func:`verify` walks the chain and names
the first break.

Signing keys: by default (:class:`DatabaseSigningKeys`) the Ed25519 key is created on first use
and stored, private part included, in ``audit.audit_signing_key``: simple, but whoever can
rewrite the database can also re-sign it. In production the private key may live outside the
database (a file, a KMS/HSM): give the chainer a :class:`StaticSigningKey` (only its public key
is stored, for the verifiers) and verify with ``trusted_keys`` held out of band.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.ext.asyncio import AsyncConnection

from forecourt.audit import store
from forecourt.audit.domain import (
    GENESIS_HASH,
    AuditRecord,
    ChainVerifier,
    Checkpoint,
    Verdict,
    chain,
    format_at,
    key_id,
    public_bytes,
    sign_checkpoint,
)
from forecourt.audit.store import RecordQuery
from forecourt.infra.db import Database
from forecourt.infra.logging import get_logger, source_var, trace_id_var

log = get_logger("forecourt.audit")


# --- signing keys -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Signer:
    kid: str
    private_key: Ed25519PrivateKey


class SigningKeys(Protocol):
    async def signer(self, conn: AsyncConnection, db: Database) -> Signer:
        """The key to sign the next checkpoint with (its public key stored for verifiers)."""
        ...


def _pem(private_key: Ed25519PrivateKey) -> str:
    return private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


class DatabaseSigningKeys:
    """The key lives in ``audit.audit_signing_key`` and is created on first use (race-safe:
    of two processes creating it at once one insert wins, and both then use the winner's)."""

    def __init__(self) -> None:
        self._cached: Signer | None = None

    async def signer(self, conn: AsyncConnection, db: Database) -> Signer:
        if self._cached is not None:
            return self._cached
        stored = await store.newest_key(conn)
        if stored is None or stored.private_key_pem is None:
            if stored is None:
                candidate = Ed25519PrivateKey.generate()
                public = public_bytes(candidate)
                await store.add_key_if_none(
                    conn, key_id(public), public, _pem(candidate), db.clock.now()
                )
                stored = await store.newest_key(conn)
            if stored is None or stored.private_key_pem is None:
                raise RuntimeError(
                    "the newest audit signing key has no private key in the database: "
                    "give the chainer that key (StaticSigningKey)"
                )
        private = serialization.load_pem_private_key(stored.private_key_pem.encode(), None)
        if not isinstance(private, Ed25519PrivateKey):
            raise RuntimeError(f"audit signing key {stored.kid} is not an Ed25519 key")
        self._cached = Signer(stored.kid, private)
        return self._cached


class StaticSigningKey:
    """A private key held outside the database; only its public key is stored."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        public = public_bytes(private_key)
        self._signer = Signer(key_id(public), private_key)
        self._public = public
        self._registered = False

    @classmethod
    def from_pem(cls, pem: bytes) -> StaticSigningKey:
        key = serialization.load_pem_private_key(pem, None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("the audit signing key must be an Ed25519 private key")
        return cls(key)

    async def signer(self, conn: AsyncConnection, db: Database) -> Signer:
        if not self._registered:
            await store.add_public_key(conn, self._signer.kid, self._public, db.clock.now())
            self._registered = True
        return self._signer


# --- the chainer ------------------------------------------------------------------------------


class AuditChainer:
    """Moves committed audit-outbox rows into the hash chain, in id order, one pass at a time.

    A pass is one transaction: take the chainer lock (PostgreSQL: a transaction-scoped
    advisory lock, so one chainer in any process chains at a time; another returns at once;
    SQLite: the single writer lock), read the head, take up to ``batch_size`` outbox rows in
    id order, append them with seq head+1… and their hashes, delete exactly those rows (by id:
    a row with a lower id that commits later waits for a later pass), and sign a checkpoint
    when ``checkpoint_every`` records or ``checkpoint_interval_s`` seconds have passed since
    the last one (and the head moved). While rows wait, a pass runs every ``interval_s``
    (at once again after a full batch), so the lag is bounded.
    """

    def __init__(
        self,
        db: Database,
        *,
        batch_size: int = 1000,
        interval_s: float = 0.5,
        checkpoint_every: int = 10_000,
        checkpoint_interval_s: float = 60,
        signing: SigningKeys | None = None,
    ) -> None:
        if batch_size < 1 or checkpoint_every < 1:
            raise ValueError("batch_size and checkpoint_every must be at least 1")
        self.db = db
        self.batch_size = batch_size
        self.interval_s = interval_s
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval_s = checkpoint_interval_s
        self.signing: SigningKeys = signing or DatabaseSigningKeys()
        self._since = time.monotonic()  # when no checkpoint was signed yet: since start
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.chained = 0
        self.checkpoints = 0

    def start(self) -> None:
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.create_task(self._loop(), name="audit-chainer")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            moved = 0
            try:
                moved = await self.run_once()
            except Exception:  # noqa: BLE001 - keep chaining after a failed pass
                log.exception("audit chainer pass failed")
            if moved >= self.batch_size:
                continue  # a backlog: the next pass at once
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval_s)

    async def run_once(self, *, force_checkpoint: bool = False) -> int:
        """One pass; the number of records chained (0 also when another chainer held the
        lock). ``force_checkpoint``: sign a checkpoint of the head if it moved since the
        last one, whatever the thresholds."""
        async with self.db.begin() as uow:
            conn = uow.conn
            if not await store.try_chainer_lock(conn):
                return 0
            head_seq, head_hash = await store.chain_head(conn)
            waiting = await store.take_outbox(conn, self.batch_size)
            fresh: list[tuple[Any, ...]] = []
            if waiting:
                # A record queued again while an earlier copy was being chained (a station's
                # upload racing this pass) is dropped here, never chained twice.
                chained = await store.already_chained(conn, [w.fields[0] for w in waiting])
                fresh = [w.fields for w in waiting if w.fields[0] not in chained]
                if fresh:
                    records = chain(head_hash, head_seq + 1, fresh)
                    await store.append(conn, records)
                    head_seq, head_hash = records[-1].seq, records[-1].hash
                await store.delete_outbox(conn, [w.id for w in waiting])
            await self._maybe_checkpoint(conn, head_seq, head_hash, force_checkpoint)
        self.chained += len(fresh)
        return len(waiting)  # what left the outbox: a full batch means more may wait

    async def _maybe_checkpoint(
        self, conn: AsyncConnection, head_seq: int, head_hash: str, force: bool
    ) -> None:
        if head_seq == 0:
            return
        last = await store.last_checkpoint(conn)
        last_seq = last.seq if last is not None else 0
        if head_seq <= last_seq:
            return
        now = self.db.clock.now()
        if last is not None:
            elapsed = (now - store.parse_at(last.at)).total_seconds()
        else:
            elapsed = time.monotonic() - self._since
        due = (
            force
            or head_seq - last_seq >= self.checkpoint_every
            or elapsed >= self.checkpoint_interval_s
        )
        if not due:
            return
        signer = await self.signing.signer(conn, self.db)
        cp = sign_checkpoint(signer.private_key, signer.kid, head_seq, head_hash, format_at(now))
        await store.insert_checkpoint(conn, cp)
        self.checkpoints += 1


async def chain_waiting(
    db: Database, *, checkpoint: bool = True, signing: SigningKeys | None = None
) -> tuple[int, int]:
    """Chain everything waiting in the outbox now (several passes), then sign a checkpoint
    of the head if it moved; (records chained, seq of the head)."""
    chainer = AuditChainer(db, signing=signing)
    total = 0
    while True:
        moved = await chainer.run_once()
        total += moved
        if moved < chainer.batch_size:
            break
    if checkpoint:
        total += await chainer.run_once(force_checkpoint=True)
    async with db.connection() as conn:
        head, _ = await store.chain_head(conn)
    return total, head


# --- a station's own records ------------------------------------------------------------------

# The edge audits what happens at the station (pump commands, price downloads, totalizer
# checks …) in its journal and uploads the records here; each joins the one chain under an id
# derived from the station and the edge's own id, so an upload repeated after a lost answer
# adds nothing, and one station can never collide with another's record or with HQ's.
STATION_RECORD_NAMESPACE = uuid.UUID("6f1c2b1e-41c4-5d9a-9e0b-2f6d4a7c3e58")


@dataclass(frozen=True)
class StationRecord:
    """An audit record as the edge wrote it."""

    record_id: str  # the edge's
    at: datetime  # when it happened, by the edge's clock
    actor: str  # the edge's actor (``terminal:pos-1``, ``edge`` …)
    action: str
    target: str
    details: Mapping[str, Any]


@dataclass(frozen=True)
class RefusedRecord:
    """An uploaded item that is not a valid record: kept out of the chain, and audited."""

    record_id: str | None
    errors: Sequence[Mapping[str, Any]]


def station_record_id(station: str, edge_record_id: str) -> str:
    return str(uuid.uuid5(STATION_RECORD_NAMESPACE, f"{station}/{edge_record_id}"))


def station_actor(station: str, edge_actor: str) -> str:
    return f"station:{station}/{edge_actor}"


async def accept_station_records(
    db: Database, station: str, items: Sequence[StationRecord | RefusedRecord]
) -> list[str]:
    """Queue a station's uploaded records for the chain in one transaction; per item:
    ``created`` (queued now), ``duplicate`` (chained or queued by an earlier upload) or
    ``refused`` (not a valid record: left out, and an ``audit.upload_refused`` record says
    so). The actor is the station's: ``station:CODE/<the edge's actor>``."""
    trace_id = trace_id_var.get()
    origin = source_var.get()
    source = origin[:100] if origin else None
    ids = {
        i: station_record_id(station, item.record_id)
        for i, item in enumerate(items)
        if isinstance(item, StationRecord)
    }
    rows: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        if isinstance(item, StationRecord):
            rows.append(
                {
                    "record_id": ids[i],
                    "at": item.at,
                    "actor": station_actor(station, item.actor),
                    "action": item.action,
                    "target": item.target,
                    "details": json.dumps(item.details, sort_keys=True, default=str),
                    "trace_id": trace_id,
                    "source": source,
                }
            )
    async with db.begin() as uow:
        created = await store.add_to_outbox(uow.conn, rows)
        for item in items:
            if isinstance(item, RefusedRecord):
                await uow.record_audit(
                    actor=f"station:{station}",
                    action="audit.upload_refused",
                    target=f"station:{station}",
                    details={"record_id": item.record_id, "errors": list(item.errors)},
                )
    statuses: list[str] = []
    for i, item in enumerate(items):
        if isinstance(item, RefusedRecord):
            statuses.append("refused")
            continue
        rid = ids[i]
        statuses.append("created" if rid in created else "duplicate")
        created.discard(rid)  # the same record twice in one upload: the second a duplicate
    refused = sum(1 for s in statuses if s == "refused")
    if refused:
        log.warning("audit.station_records_refused", station=station, refused=refused)
    return statuses


# --- verification ----------------------------------------------------------------------------


async def verify(
    db: Database,
    *,
    from_seq: int | None = None,
    trusted_keys: Mapping[str, bytes] | None = None,
    chunk: int = 20_000,
) -> Verdict:
    """Walk the chain in seq order (streamed in chunks, never all in memory) and check every
    link and every signed checkpoint; the verdict names the first break.

    Detected: an edited field or stored hash, a record deleted (first or any other), inserted
    or moved, a tail removed back to (or past) a signed checkpoint, an edited checkpoint.
    Not detectable by a hash chain: records appended after the last checkpoint by someone
    who can write the database (they chain like genuine ones), nor the newest records and
    checkpoints removed together (hence verifying against ``trusted_keys`` and keeping the
    last checkpoint somewhere else too).

    ``from_seq``: check from that record on only. A partial check TRUSTS the record before
    ``from_seq``: its stored hash is taken as the previous hash, unchecked.
    ``trusted_keys`` (kid → raw Ed25519 public key): verify checkpoints against these keys
    rather than those stored in the database.
    """
    start = max(1, from_seq or 1)
    async with db.connection() as conn:
        if not db.is_sqlite:
            # One snapshot for the whole walk (the chainer may append meanwhile).
            conn = await conn.execution_options(isolation_level="REPEATABLE READ")
        prev_hash = GENESIS_HASH
        if start > 1:
            before = await store.record_at(conn, start - 1)
            if before is None:
                return Verdict(
                    ok=False,
                    records_checked=0,
                    checkpoints_checked=0,
                    first_bad_seq=start - 1,
                    problem=f"record {start - 1} missing (the check from {start} starts after it)",
                )
            prev_hash = before.hash
        keys = dict(trusted_keys) if trusted_keys is not None else await store.public_keys(conn)
        checkpoints = await store.checkpoints_from(conn, start)
        verifier = ChainVerifier(checkpoints, keys, start_seq=start, prev_hash=prev_hash)
        resume = True
        while resume:
            resume = False
            stream = store.stream_chain(conn, verifier.next_seq, chunk)
            async with contextlib.aclosing(stream):
                async for rows, encoded in stream:
                    # Checked in a thread, so that the next chunk arrives meanwhile.
                    if len(rows) > 1000:
                        ok = await asyncio.to_thread(verifier.feed, rows, encoded=encoded)
                    else:
                        ok = verifier.feed(rows, encoded=encoded)
                    if not ok:
                        break
            if verifier.mismatch and verifier.first_bad_seq is not None:
                # The server built the bytes: check that record again from its fields.
                record = await store.record_at(conn, verifier.first_bad_seq)
                if record is not None and verifier.recheck(record):
                    log.warning(
                        "audit verify: the server encoded a record differently", seq=record.seq
                    )
                    resume = True
        return verifier.finish()


# --- reading ---------------------------------------------------------------------------------


async def list_records(db: Database, query: RecordQuery) -> list[AuditRecord]:
    async with db.connection() as conn:
        return await store.find_records(conn, query)


async def checkpoint_list(db: Database, from_seq: int = 1) -> list[Checkpoint]:
    async with db.connection() as conn:
        return await store.checkpoints_from(conn, from_seq)
