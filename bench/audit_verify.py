"""Audit-trail verification benchmark: how fast ``forecourt.audit.handlers.verify`` walks a
long hash chain on PostgreSQL.

Creates a database of its own (dropped at the end unless ``--keep``), migrates the audit tree,
fills ``audit.audit_record`` with N chained records (hashes computed in Python in bulk, rows
loaded with COPY) and a signed checkpoint every ``--checkpoint-every`` records, then times
``verify`` over the whole chain. Goal: ten million records in under a minute on two cores,
i.e. at least 170 000 records/s.

``--json`` prints one JSON object as the last line: ``records``, ``verify_s``,
``verify_records_per_s``, ``fill_s``, ``checkpoints``, ``ok``.

    .venv/bin/python bench/audit_verify.py --json
    .venv/bin/python bench/audit_verify.py --records 100000     # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

# bench/forecourt.py (another benchmark) would shadow the forecourt package: drop this
# script's folder from the path (as ``python -P`` would).
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _HERE]

import asyncpg  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from forecourt.audit.domain import (  # noqa: E402
    GENESIS_HASH,
    chain,
    format_at,
    key_id,
    public_bytes,
    sign_checkpoint,
)
from forecourt.audit.handlers import verify  # noqa: E402
from forecourt.audit.store import RECORD_COLUMNS  # noqa: E402
from forecourt.infra.db import Database  # noqa: E402
from forecourt.infra.migrate import upgrade  # noqa: E402

PG_HOST = os.environ.get("BENCH_PG_HOST", "127.0.0.1")
PG_USER = os.environ.get("BENCH_PG_USER", "postgres")

ACTIONS = (
    "network.prices.publish",
    "identity.user.sign_in",
    "devices.pump.authorise",
    "network.credential.issue",
    "sales.shift.close",
)


def _admin_url() -> str:
    return f"postgresql://{PG_USER}@{PG_HOST}:5432/postgres"


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(_admin_url())
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _rows(start: int, count: int, base: datetime, rng: random.Random) -> list[tuple[Any, ...]]:
    """``count`` records' fields after seq (record_id … source), realistic sizes."""
    out = []
    for i in range(start, start + count):
        action = ACTIONS[i % len(ACTIONS)]
        details = json.dumps(
            {"station": f"S{i % 400:03d}", "grades": ["E10", "B7"], "n": i}, sort_keys=True
        )
        out.append(
            (
                str(uuid.UUID(int=rng.getrandbits(128))),
                format_at(base + timedelta(milliseconds=i)),
                f"user:staff{i % 50}",
                action,
                f"station:S{i % 400:03d}",
                details,
                f"{rng.getrandbits(128):032x}",
                "192.0.2.10",
            )
        )
    return out


async def fill(url: str, records: int, checkpoint_every: int, batch: int = 50_000) -> int:
    """Fill the chain; the number of checkpoints signed."""
    rng = random.Random(7)
    base = datetime(2026, 1, 1, tzinfo=UTC)
    key = Ed25519PrivateKey.generate()
    public = public_bytes(key)
    kid = key_id(public)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "INSERT INTO audit.audit_signing_key (kid, generation, public_key, private_key, "
            "created_at) VALUES ($1, 1, $2, NULL, now())",
            kid,
            public.hex(),
        )
        prev, seq, checkpoints = GENESIS_HASH, 1, []
        while seq <= records:
            count = min(batch, records - seq + 1)
            chained = chain(prev, seq, _rows(seq, count, base, rng))
            rows = [
                (r.seq, r.record_id, base + timedelta(milliseconds=r.seq), *r[3:]) for r in chained
            ]
            await conn.copy_records_to_table(
                "audit_record", schema_name="audit", columns=RECORD_COLUMNS, records=rows
            )
            for r in chained:
                if r.seq % checkpoint_every == 0:
                    checkpoints.append(sign_checkpoint(key, kid, r.seq, r.hash, r.at))
            prev, seq = chained[-1].hash, seq + count
        await conn.executemany(
            "INSERT INTO audit.audit_checkpoint (seq, hash, at, kid, signature) "
            "VALUES ($1, $2, $3, $4, $5)",
            [
                (c.seq, c.hash, datetime.fromisoformat(c.at), c.kid, c.signature)
                for c in checkpoints
            ],
        )
        await conn.execute("VACUUM ANALYZE audit.audit_record")
        return len(checkpoints)
    finally:
        await conn.close()


async def run(arguments: argparse.Namespace) -> dict[str, Any]:
    name = f"forecourt_bench_audit_{uuid.uuid4().hex[:8]}"
    await _admin(f'CREATE DATABASE "{name}"')
    url = f"postgresql://{PG_USER}@{PG_HOST}:5432/{name}"
    db = Database(url)
    try:
        await db.connect()
        await upgrade(db, trees=("audit",))
        began = time.perf_counter()
        checkpoints = await fill(url, arguments.records, arguments.checkpoint_every)
        fill_s = time.perf_counter() - began
        print(f"filled {arguments.records} records in {fill_s:.1f} s", file=sys.stderr)
        timings = []
        verdict = None
        for _ in range(arguments.repeat):
            began = time.perf_counter()
            verdict = await verify(db)
            timings.append(time.perf_counter() - began)
            print(f"verify: {timings[-1]:.2f} s, {verdict.describe()}", file=sys.stderr)
        assert verdict is not None
        best = min(timings)
        return {
            "records": arguments.records,
            "checkpoints": checkpoints,
            "fill_s": round(fill_s, 2),
            "verify_s": round(best, 3),
            "verify_runs_s": [round(t, 3) for t in timings],
            "verify_records_per_s": round(arguments.records / best),
            "ok": verdict.ok and verdict.records_checked == arguments.records,
        }
    finally:
        await db.dispose()
        if arguments.keep:
            print(f"kept database {name}", file=sys.stderr)
        else:
            await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=1_000_000, help="chain length (1 000 000)")
    p.add_argument("--checkpoint-every", type=int, default=10_000, help="records per checkpoint")
    p.add_argument("--repeat", type=int, default=2, help="verify runs (the best is reported)")
    p.add_argument("--keep", action="store_true", help="keep the database afterwards")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    arguments = p.parse_args()
    result = asyncio.run(run(arguments))
    if arguments.json:
        print(json.dumps(result, separators=(",", ":")))
    else:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
