"""The audit trail's rules, free of any framework: the canonical encoding of a record, the hash
chain, signed checkpoints, and the verification that finds the first break.

Every audited action is a record; the chainer gives each a sequence number ``seq`` (1, 2, …)
and a hash ``SHA-256(prev || canonical(record))`` where ``prev`` is the previous record's hash
as 32 raw bytes (the genesis ``prev`` is 32 zero bytes) and ``canonical`` is the nine fields

    seq, record_id, at, actor, action, target, details, trace_id, source

each written as ``<byte length>:<UTF-8 bytes>`` (``seq`` in decimal), a null as ``-``, one
after the other: unambiguous (a length says where each field ends), cheap to produce here,
and simple enough for PostgreSQL to produce too (the verifier has the server build it while
it streams the chain; see store.py). ``at`` is the time in UTC as
``YYYY-MM-DDTHH:MM:SS.ffffffZ``; ``details`` is the JSON text as stored (not re-encoded);
``trace_id`` and ``source`` may be null. Hashes are written as 64 hex digits.

A checkpoint signs ``forecourt-audit-checkpoint:v1:<seq>:<hash>:<at>`` with Ed25519, so a
truncated tail (the records after the last one kept, up to a signed checkpoint) is found even
though every remaining link is sound.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

GENESIS_HASH = "0" * 64
_GENESIS = bytes(32)
_sha256 = hashlib.sha256


class AuditRecord(NamedTuple):
    """One chained record, in canonical field order, then its stored hash.

    The verifier only indexes rows (``row[0]`` is seq, ``row[:9]`` the canonical fields,
    ``row[9]`` the hash), so any sequence in this layout will do (a database row as is).
    An *encoded* row is ``(seq, canonical bytes, hash)``, see :meth:`ChainVerifier.feed`."""

    seq: int
    record_id: str
    at: str  # canonical UTC time, see format_at
    actor: str
    action: str
    target: str
    details: str
    trace_id: str | None
    source: str | None
    hash: str


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement: the chain's head at ``seq`` had hash ``hash``."""

    seq: int
    hash: str
    at: str  # canonical UTC time
    kid: str
    signature: str  # hex


@dataclass(frozen=True)
class Verdict:
    ok: bool
    records_checked: int
    checkpoints_checked: int
    first_bad_seq: int | None = None
    problem: str | None = None
    last_seq: int = 0

    def describe(self) -> str:
        if self.ok:
            return (
                f"audit trail intact: {self.records_checked} records, "
                f"{self.checkpoints_checked} checkpoints"
            )
        return f"audit trail broken: {self.problem}"


def format_at(at: datetime) -> str:
    """The canonical form of a record's time (UTC, microseconds, ``Z``)."""
    if at.tzinfo is None:
        raise ValueError(f"naive datetime {at!r} in the audit trail")
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical(fields: Sequence[Any]) -> bytes:
    """The bytes hashed for one record: ``fields`` are the nine canonical fields in order."""
    out = []
    for field in fields[:9]:
        if field is None:
            out.append(b"-")
        else:
            data = (field if field.__class__ is str else str(field)).encode()
            out.append(b"%d:%s" % (len(data), data))
    return b"".join(out)


def link(prev_hash: str, fields: Sequence[Any]) -> str:
    """The hash of a record whose predecessor's hash is ``prev_hash``."""
    return _sha256(bytes.fromhex(prev_hash) + canonical(fields)).hexdigest()


def chain(prev_hash: str, first_seq: int, rows: Iterable[Sequence[Any]]) -> list[AuditRecord]:
    """Number and hash ``rows`` (each the eight fields after seq: record_id … source) from
    ``first_seq`` on, after a record whose hash is ``prev_hash``."""
    out: list[AuditRecord] = []
    prev = bytes.fromhex(prev_hash)
    seq = first_seq
    for row in rows:
        record = AuditRecord._make((seq, *row[:8], ""))
        digest = _sha256(prev + canonical(record)).digest()
        out.append(record._replace(hash=digest.hex()))
        prev = digest
        seq += 1
    return out


def checkpoint_message(seq: int, hash_hex: str, at: str) -> bytes:
    return f"forecourt-audit-checkpoint:v1:{seq}:{hash_hex}:{at}".encode()


def key_id(public_key: bytes) -> str:
    """A signing key's id: the start of its public key's SHA-256."""
    return _sha256(public_key).hexdigest()[:16]


def public_bytes(private_key: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def sign_checkpoint(
    private_key: Ed25519PrivateKey, kid: str, seq: int, hash_hex: str, at: str
) -> Checkpoint:
    signature = private_key.sign(checkpoint_message(seq, hash_hex, at))
    return Checkpoint(seq=seq, hash=hash_hex, at=at, kid=kid, signature=signature.hex())


def checkpoint_problem(cp: Checkpoint, public_keys: Mapping[str, bytes]) -> str | None:
    """Why ``cp`` is not a valid signature by one of ``public_keys`` (None: it is)."""
    key = public_keys.get(cp.kid)
    if key is None:
        return f"checkpoint at {cp.seq}: signed by unknown key {cp.kid!r}"
    try:
        signature = bytes.fromhex(cp.signature)
        Ed25519PublicKey.from_public_bytes(key).verify(
            signature, checkpoint_message(cp.seq, cp.hash, cp.at)
        )
    except (InvalidSignature, ValueError):
        return f"checkpoint at {cp.seq}: signature invalid"
    return None


def _span(first: int, last: int) -> str:
    return f"record {first}" if first == last else f"records {first}–{last}"


class ChainVerifier:
    """Checks a chain fed in seq order, chunk by chunk, and stops at the first break.

    ``start_seq``: the first record expected; ``prev_hash``: the hash of the record before it
    (trusted as is; the genesis hash when ``start_seq`` is 1). ``checkpoints`` at or after
    ``start_seq`` are checked: their signature against ``public_keys`` (kid → raw Ed25519
    public key), their hash against the chain's at their seq, and that the chain reaches them.
    """

    def __init__(
        self,
        checkpoints: Iterable[Checkpoint],
        public_keys: Mapping[str, bytes],
        *,
        start_seq: int = 1,
        prev_hash: str = GENESIS_HASH,
    ) -> None:
        self._prev = bytes.fromhex(prev_hash) if prev_hash != GENESIS_HASH else _GENESIS
        self._start = start_seq
        self._expected = start_seq
        self._checked = 0
        self._checkpoints_ok = 0
        self.problem: str | None = None
        self.first_bad_seq: int | None = None
        self.mismatch = False  # the break is a record's hash (see recheck)
        # (seq, checkpoint, problem) in seq order; one per seq (the first given wins)
        pending: dict[int, tuple[Checkpoint, str | None]] = {}
        for cp in checkpoints:
            if cp.seq >= start_seq and cp.seq not in pending:
                pending[cp.seq] = (cp, checkpoint_problem(cp, public_keys))
        self._pending = [pending[s] for s in sorted(pending, reverse=True)]  # pop() = lowest
        self._next_cp = self._pending[-1][0].seq if self._pending else -1

    @property
    def broken(self) -> bool:
        return self.problem is not None

    @property
    def next_seq(self) -> int:
        return self._expected

    def _fail(self, seq: int, problem: str) -> bool:
        self.first_bad_seq = seq
        self.problem = problem
        return False

    def feed(self, rows: Iterable[Sequence[Any]], *, encoded: bool = False) -> bool:
        """Check the next rows; False once broken (then feed no more, but see
        :meth:`recheck`). Rows are laid out as :class:`AuditRecord`, or with ``encoded``
        as ``(seq, canonical bytes, hash)`` (the canonical bytes built elsewhere)."""
        if self.problem is not None:
            return False
        prev = self._prev
        expected = self._expected
        next_cp = self._next_cp
        sha = _sha256
        hash_at = 2 if encoded else 9
        try:
            for row in rows:
                seq = row[0]
                if seq != expected:
                    if seq > expected:
                        how = (
                            f"the chain starts at {seq}"
                            if expected == 1
                            else f"sequence jumps {expected - 1} → {seq}"
                        )
                        return self._fail(expected, f"{_span(expected, seq - 1)} missing ({how})")
                    return self._fail(
                        seq, f"record {seq} out of order (after {expected - 1}; duplicated)"
                    )
                stored = row[hash_at]
                digest = sha(prev + (row[1] if encoded else canonical(row))).digest()
                if digest.hex() != stored:
                    self.mismatch = True
                    return self._fail(
                        seq, f"record {seq}: hash does not match (edited, inserted or reordered)"
                    )
                if seq == next_cp:
                    cp, cp_problem = self._pending.pop()
                    if cp_problem is not None:
                        return self._fail(seq, cp_problem)
                    if cp.hash != stored:
                        return self._fail(
                            seq,
                            f"checkpoint at {seq}: the chain's hash differs from the signed one "
                            f"(records up to {seq} rewritten)",
                        )
                    self._checkpoints_ok += 1
                    next_cp = self._pending[-1][0].seq if self._pending else -1
                prev = digest
                expected += 1
                self._checked += 1
        finally:
            self._prev = prev
            self._expected = expected
            self._next_cp = next_cp
        return True

    def recheck(self, record: Sequence[Any]) -> bool:
        """After an *encoded* row failed its hash: check that record again from its fields
        (laid out as :class:`AuditRecord`) with this module's own encoding, and carry on if
        it holds (the bytes built elsewhere differed, the record did not). True: it held."""
        if not self.mismatch or record[0] != self.first_bad_seq:
            return False
        self.problem = self.first_bad_seq = None
        self.mismatch = False
        return self.feed([record])

    def finish(self) -> Verdict:
        """The verdict once every row was fed (or the verifier broke)."""
        last = self._expected - 1
        if self.problem is None and self._pending:
            cp, cp_problem = self._pending[-1]
            if cp_problem is not None:
                self._fail(cp.seq, cp_problem)
            else:
                # The newest validly signed checkpoint tells how far the chain reached.
                furthest = max((c.seq for c, p in self._pending if p is None), default=cp.seq)
                ends = f"chain ends at {last}" if last else "chain is empty"
                self._fail(
                    last + 1,
                    f"{ends} but checkpoint at {furthest} was signed: "
                    f"{_span(last + 1, furthest)} removed (truncated)",
                )
        return Verdict(
            ok=self.problem is None,
            records_checked=self._checked,
            checkpoints_checked=self._checkpoints_ok,
            first_bad_seq=self.first_bad_seq,
            problem=self.problem,
            last_seq=last,
        )


def verify_chain(
    records: Iterable[Sequence[Any]],
    checkpoints: Iterable[Checkpoint],
    public_keys: Mapping[str, bytes],
    *,
    start_seq: int = 1,
    prev_hash: str = GENESIS_HASH,
) -> Verdict:
    """Verify ``records`` (in seq order, each laid out as :class:`AuditRecord`) and the
    ``checkpoints`` over them; the verdict names the first break. Starting past 1 trusts
    ``prev_hash``, the hash of the record before ``start_seq``."""
    verifier = ChainVerifier(checkpoints, public_keys, start_seq=start_seq, prev_hash=prev_hash)
    verifier.feed(records)
    return verifier.finish()
