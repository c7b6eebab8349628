"""The ``probe`` consumer: a diagnostic consumer whose effect is one row per event.

It takes every sales event and writes one ``platform.probe_effect`` row each time it
applies one (no unique key, on purpose: an event applied twice shows as two rows). A sale
whose ``shift_id`` is ``probe:fail`` makes it fail every time, so that event ends in the
dead-letter store. ``forecourt chaos delivery`` and the ingest benchmark run it
(``forecourt worker --consumers probe``); it is not a default consumer.
"""

from __future__ import annotations

from collections.abc import Sequence

from forecourt.infra.consumers import Consumer
from forecourt.infra.db import UnitOfWork, asyncpg_connection, probe_effect_table
from forecourt.kernel.events import Envelope

FAIL_MARKER = "probe:fail"

_INSERT_SQL = (
    "INSERT INTO platform.probe_effect (consumer, event_id, event_time, applied_at) "
    "SELECT 'probe', e.id, e.time, $3 "
    "FROM unnest($1::varchar[], $2::timestamptz[]) AS e(id, time)"
)


class ProbeRefused(RuntimeError):
    """The probe refuses an event marked to fail."""


async def apply_probe(envelope: Envelope, uow: UnitOfWork) -> None:
    await apply_probe_many([envelope], uow)


async def apply_probe_many(envelopes: Sequence[Envelope], uow: UnitOfWork) -> None:
    """:func:`apply_probe` for a batch, in one multi-row insert."""
    for envelope in envelopes:
        if envelope.data.get("shift_id") == FAIL_MARKER:
            raise ProbeRefused(f"event {envelope.id} is marked {FAIL_MARKER!r}")
    now = uow.db.clock.now()
    if not uow.db.is_sqlite:  # one prepared statement whatever the batch size
        apg = await asyncpg_connection(uow.conn)
        await apg.execute(
            _INSERT_SQL,
            [e.id for e in envelopes],
            [e.time for e in envelopes],
            now,
        )
        return
    await uow.conn.execute(
        probe_effect_table.insert(),
        [
            {"consumer": "probe", "event_id": e.id, "event_time": e.time, "applied_at": now}
            for e in envelopes
        ],
    )


PROBE = Consumer(
    "probe",
    ("forecourt.sales.>",),
    apply_probe,
    max_deliver=5,
    batch_size=500,
    default=False,
    description="diagnostic: one platform.probe_effect row per sales event applied",
    handle_many=apply_probe_many,
    concurrency=2,
)
