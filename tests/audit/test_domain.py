"""The pure chain logic: any single tamper with a chain is found, at the right seq."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from forecourt.audit.domain import (
    GENESIS_HASH,
    AuditRecord,
    ChainVerifier,
    Checkpoint,
    canonical,
    chain,
    format_at,
    key_id,
    link,
    public_bytes,
    sign_checkpoint,
    verify_chain,
)

KEY = Ed25519PrivateKey.generate()
KID = key_id(public_bytes(KEY))
KEYS = {KID: public_bytes(KEY)}
BASE = datetime(2026, 12, 1, tzinfo=UTC)

text = st.text(min_size=0, max_size=12)
fields = st.tuples(
    st.uuids().map(str),
    st.integers(0, 10**9).map(lambda us: format_at(BASE + timedelta(microseconds=us))),
    text,
    text,
    text,
    text.map(lambda t: '{{"v": {}}}'.format(__import__("json").dumps(t))),
    st.none() | st.text(alphabet="0123456789abcdef", min_size=32, max_size=32),
    st.none() | text,
)


def build(rows: list[tuple[object, ...]], every: int) -> tuple[list[AuditRecord], list[Checkpoint]]:
    records = chain(GENESIS_HASH, 1, rows)
    cps = [sign_checkpoint(KEY, KID, r.seq, r.hash, r.at) for r in records if r.seq % every == 0]
    return records, cps


@st.composite
def chains(draw: st.DrawFn) -> tuple[list[AuditRecord], list[Checkpoint]]:
    rows = draw(st.lists(fields, min_size=2, max_size=40))
    every = draw(st.integers(1, len(rows)))
    return build(rows, every)


def renumber(records: list[AuditRecord], start: int, shift: int) -> list[AuditRecord]:
    return [r._replace(seq=r.seq + shift) if r.seq >= start else r for r in records]


TAMPERS = (
    "edit_field",
    "edit_hash",
    "delete",
    "insert",
    "swap",
    "truncate",
    "edit_checkpoint_hash",
    "edit_checkpoint_signature",
)


@given(chains())
def test_an_untampered_chain_verifies(built: tuple[list[AuditRecord], list[Checkpoint]]) -> None:
    records, cps = built
    verdict = verify_chain(records, cps, KEYS)
    assert verdict.ok, verdict.problem
    assert verdict.records_checked == len(records)
    assert verdict.checkpoints_checked == len(cps)
    assert verdict.last_seq == len(records)


@given(chains(), st.sampled_from(TAMPERS), st.data())
def test_one_tamper_is_found_at_its_seq(
    built: tuple[list[AuditRecord], list[Checkpoint]], tamper: str, data: st.DataObject
) -> None:
    records, cps = built
    n = len(records)
    last_cp = cps[-1].seq
    records = list(records)
    if tamper == "edit_field":
        i = data.draw(st.integers(0, n - 1))
        column = data.draw(st.integers(1, 8))
        old = records[i][column]
        new = f"{old or ''}x"
        records[i] = AuditRecord._make((*records[i][:column], new, *records[i][column + 1 :]))
        expected = i + 1
    elif tamper == "edit_hash":
        i = data.draw(st.integers(0, n - 1))
        records[i] = records[i]._replace(hash=link(GENESIS_HASH, ("forged",)))
        expected = i + 1
    elif tamper == "delete":
        # Any record but a last one after the last checkpoint (nothing can tell it was there).
        i = data.draw(st.integers(0, max(n - 2, last_cp - 1)))
        del records[i]
        expected = i + 1
    elif tamper == "insert":
        # A forged record after position i, chained to it (a plausible hash), the rest moved up.
        i = data.draw(st.integers(1, n - 1))
        forged = chain(records[i - 1].hash, i + 1, [data.draw(fields)])[0]
        records = [*records[:i], forged, *renumber(records[i:], i + 1, 1)]
        # found at the record after it, or at it if a checkpoint signed its seq's hash
        expected = i + 1 if any(cp.seq == i + 1 for cp in cps) else i + 2
    elif tamper == "swap":
        i = data.draw(st.integers(0, n - 2))
        j = data.draw(st.integers(i + 1, n - 1))
        a, b = records[i], records[j]
        if a[1:] == b[1:]:
            return
        records[i], records[j] = b._replace(seq=a.seq), a._replace(seq=b.seq)
        expected = i + 1
    elif tamper == "truncate":
        keep = data.draw(st.integers(0, last_cp - 1))
        records = records[:keep]
        expected = keep + 1
    else:
        k = data.draw(st.integers(0, len(cps) - 1))
        cp = cps[k]
        if tamper == "edit_checkpoint_hash":
            cps = [*cps[:k], replace(cp, hash=link(cp.hash, ("x",))), *cps[k + 1 :]]
        else:
            sig = bytearray(bytes.fromhex(cp.signature))
            sig[data.draw(st.integers(0, 63))] ^= 1 << data.draw(st.integers(0, 7))
            cps = [*cps[:k], replace(cp, signature=sig.hex()), *cps[k + 1 :]]
        expected = cp.seq
    verdict = verify_chain(records, cps, KEYS)
    assert not verdict.ok
    assert verdict.first_bad_seq == expected, verdict.problem
    assert verdict.problem


def test_messages_name_the_break() -> None:
    records, cps = build(
        [(f"r{i}", format_at(BASE), "a", "b", "c", "{}", None, None) for i in range(100)], 50
    )
    assert verify_chain(records, cps, KEYS).ok
    edited = [*records[:16], records[16]._replace(actor="mallory"), *records[17:]]
    assert verify_chain(edited, cps, KEYS).problem == (
        "record 17: hash does not match (edited, inserted or reordered)"
    )
    gone = [*records[:41], *records[42:]]
    assert verify_chain(gone, cps, KEYS).problem == "record 42 missing (sequence jumps 41 → 43)"
    assert (
        verify_chain(records[1:], cps, KEYS).problem == "record 1 missing (the chain starts at 2)"
    )
    verdict = verify_chain(records[:90], cps, KEYS)
    assert verdict.problem == (
        "chain ends at 90 but checkpoint at 100 was signed: records 91–100 removed (truncated)"
    )
    assert verdict.first_bad_seq == 91
    forged = [cps[0], replace(cps[1], signature="00" * 64)]
    assert verify_chain(records, forged, KEYS).problem == "checkpoint at 100: signature invalid"
    assert verify_chain(records, cps, {}).problem == (
        f"checkpoint at 50: signed by unknown key {KID!r}"
    )
    assert verify_chain([], cps, KEYS).problem == (
        "chain is empty but checkpoint at 100 was signed: records 1–100 removed (truncated)"
    )


def test_a_partial_check_trusts_the_record_before() -> None:
    records, cps = build(
        [(f"r{i}", format_at(BASE), "a", "b", "c", "{}", None, None) for i in range(30)], 10
    )
    tampered = [records[0]._replace(actor="x"), *records[1:]]
    verdict = verify_chain(tampered[10:], cps, KEYS, start_seq=11, prev_hash=records[9].hash)
    assert verdict.ok
    assert verdict.records_checked == 20
    assert verdict.checkpoints_checked == 2


def test_encoded_rows_and_recheck() -> None:
    records, cps = build(
        [(f"r{i}", format_at(BASE), "ü", "b", "c", "{}", "t", None) for i in range(20)], 5
    )
    encoded = [(r.seq, canonical(r), r.hash) for r in records]
    verifier = ChainVerifier(cps, KEYS)
    assert verifier.feed(encoded, encoded=True)
    assert verifier.finish().ok
    # bytes built differently for record 7 (not tampered): the recheck from fields carries on
    encoded[6] = (7, b"different", records[6].hash)
    verifier = ChainVerifier(cps, KEYS)
    assert not verifier.feed(encoded, encoded=True)
    assert verifier.first_bad_seq == 7
    assert verifier.recheck(records[6])
    assert verifier.feed(encoded[7:], encoded=True)
    assert verifier.finish().ok
    # a record that is really edited stays broken
    verifier = ChainVerifier(cps, KEYS)
    encoded[6] = (7, canonical(records[6]._replace(actor="x")), records[6].hash)
    assert not verifier.feed(encoded, encoded=True)
    assert not verifier.recheck(records[6]._replace(actor="x"))
    assert verifier.finish().first_bad_seq == 7


def test_canonical_is_length_prefixed() -> None:
    assert canonical((1, "ab", "", None, "é", "x", "{}", None, "s")) == (
        b"1:12:ab0:-2:\xc3\xa91:x2:{}-1:s"
    )
    # moving a character from one field to the next changes the bytes
    assert canonical((1, "ab", "c", None, "", "", "", None, None)) != canonical(
        (1, "a", "bc", None, "", "", "", None, None)
    )
    with pytest.raises(ValueError, match="naive"):
        format_at(datetime(2026, 1, 1))  # noqa: DTZ001
