"""A tiny payments app for the idempotency contract tests, and its process entry point.

``POST /charge {"amount_minor": int, "card": str}`` under an ``Idempotency-Key``: it checks
the request (nothing outside called yet), marks the key started, makes its "outside call" —
one row in ``charges`` (the provider's ledger, in this app's own metadata) with the key as
the provider's reference — and completes ``201 {"charge_id", "amount_minor", "card"}``.
Knobs on ``app.state.knobs`` let a test hold the handler on an event or make it fail at a
given step. The recovery hook asks the "provider" what happened: it looks the key up in
``charges`` (found: the same ``201`` the request would have answered; not found: ``502
charge.not_made``, nothing was charged).

As a process (crash tests, with ``FORECOURT_CRASH_AT``)::

    python tests/infra/idempotency_app.py --database-url URL --port-file FILE \
        [--lease SECONDS] [--no-recovery]

it binds a port itself (``--port 0`` style) and names it in the port file once it serves.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Response
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, Field

from forecourt.infra.db import Database, UTCDateTime
from forecourt.infra.http import install_common
from forecourt.infra.idempotency import (
    IdempotencyKey,
    IdempotencyRecord,
    RecoveryHook,
    StoredResponse,
    error_outcome,
    idempotent,
    install_idempotency,
)
from forecourt.infra.migrate import upgrade
from forecourt.kernel.errors import ForecourtError

SCOPE = "test.charge"

provider_md = sa.MetaData()
charges_table = sa.Table(
    "charges",
    provider_md,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("reference", sa.String(255), nullable=False),
    sa.Column("amount_minor", sa.Integer(), nullable=False),
    sa.Column("card", sa.String(40), nullable=False),
    sa.Column("charged_at", UTCDateTime(), nullable=False),
)


class ChargeIn(BaseModel):
    amount_minor: int = Field(gt=0)
    card: str = Field(min_length=1, max_length=40)


class CardCheckUnavailable(ForecourtError):
    code = "charge.card_check_unavailable"
    http_status = 503


class ProviderError(ForecourtError):
    code = "charge.provider_error"
    http_status = 502


@dataclass
class Knobs:
    """What a test asks of the next request: hold it at a step, or fail there (once)."""

    hold_at: str | None = None  # "before_start" | "after_start"
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    fail_at: str | None = None  # "before_start" | "after_start" | "bug_after_start"
    runs: int = 0  # handler bodies entered
    provider_down: bool = False  # the recovery hook cannot tell what happened (None)
    recoveries: list[str] = field(default_factory=list)

    async def step(self, name: str) -> None:
        if self.hold_at == name:
            self.hold_at = None
            self.entered.set()
            await self.release.wait()
        if self.fail_at == name or (name == "after_start" and self.fail_at == "bug_after_start"):
            failure, self.fail_at = self.fail_at, None
            if failure == "before_start":
                raise CardCheckUnavailable("the card check is unavailable")
            if failure == "after_start":
                raise ProviderError("the provider answered 500")
            raise RuntimeError("a bug after the outside call may have started")


async def charge_count(db: Database, reference: str | None = None) -> int:
    query = sa.select(sa.func.count()).select_from(charges_table)
    if reference is not None:
        query = query.where(charges_table.c.reference == reference)
    async with db.connection() as conn:
        return int((await conn.execute(query)).scalar_one())


def _charged(row: Any) -> dict[str, Any]:
    return {"charge_id": row.id, "amount_minor": row.amount_minor, "card": row.card}


def provider_query(db: Database, knobs: Knobs) -> RecoveryHook:
    """The recovery hook: ask the "provider" (the ``charges`` table) about the key."""

    async def recover(record: IdempotencyRecord) -> StoredResponse | None:
        knobs.recoveries.append(record.key)
        if knobs.provider_down:
            return None
        async with db.connection() as conn:
            row = (
                await conn.execute(
                    sa.select(charges_table).where(charges_table.c.reference == record.key)
                )
            ).first()
        if row is not None:
            return StoredResponse(201, _charged(row))
        return error_outcome(
            502,
            "charge.not_made",
            "the provider has no charge for this request: nothing was charged; send it "
            "again with a new Idempotency-Key",
        )

    return recover


def build_app(
    db: Database, *, lease: timedelta, recovery: bool = True, common: bool = True
) -> FastAPI:
    """The app; ``common=False`` leaves out ``install_common`` (the idempotency errors must
    still answer the one envelope)."""
    app = FastAPI()
    knobs = Knobs()
    app.state.knobs = knobs
    app.state.db = db

    async def ready() -> dict[str, bool]:
        return {"database": True}

    if common:
        install_common(app, CollectorRegistry(), ready)
    install_idempotency(app)
    charge_key = idempotent(
        SCOPE,
        lambda request: request.app.state.db,
        lease=lease,
        recovery=provider_query(db, knobs) if recovery else None,
    )

    @app.post("/charge", status_code=201)
    async def charge(body: ChargeIn, key: IdempotencyKey = charge_key) -> Response:
        knobs.runs += 1
        await knobs.step("before_start")
        await key.mark_started(recovery_point=f"provider reference {key.key}")
        await knobs.step("after_start")
        async with db.begin() as uow:  # the outside call: the provider charges the card
            result = await uow.conn.execute(
                charges_table.insert().values(
                    reference=key.key,
                    amount_minor=body.amount_minor,
                    card=body.card,
                    charged_at=db.clock.now(),
                )
            )
            charge_id = result.inserted_primary_key[0]  # type: ignore[index]
        return await key.complete(
            201,
            {"charge_id": charge_id, "amount_minor": body.amount_minor, "card": body.card},
            {"Location": f"/charges/{charge_id}"},
        )

    return app


async def prepare(db: Database) -> None:
    """The platform tables and the provider's ledger."""
    await upgrade(db, ["platform"])
    async with db.engine.begin() as conn:
        await conn.run_sync(provider_md.create_all)


async def serve(url: str, port_file: Path, lease: float, recovery: bool) -> None:
    import uvicorn

    from forecourt.infra.listener import PortFileServer, listening_socket

    db = Database(url, application_name="idempotency-test-app")
    await db.connect()
    try:
        app = build_app(db, lease=timedelta(seconds=lease), recovery=recovery)
        sock = listening_socket("127.0.0.1", 0)
        config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False)
        await PortFileServer(config, port_file).serve(sockets=[sock])
    finally:
        await db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--port-file", required=True, type=Path)
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--no-recovery", action="store_true")
    args = parser.parse_args()
    asyncio.run(serve(args.database_url, args.port_file, args.lease, not args.no_recovery))


if __name__ == "__main__":
    main()
