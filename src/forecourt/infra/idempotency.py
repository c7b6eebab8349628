"""Request idempotency records: key, request hash, stored response, expiry.

For API retries (payments use it next): the first request with a key reserves it and later
stores its response; a retry with the same key and the same request gets the stored response;
the same key with a different request is refused (``idempotency.key_reused``); a retry while
the first is still running is refused as ``idempotency.in_progress`` (retry later).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from forecourt.infra.db import UnitOfWork, idempotency_table
from forecourt.kernel.errors import Conflict


class KeyReused(Conflict):
    code = "idempotency.key_reused"
    http_status = 422


class InProgress(Conflict):
    code = "idempotency.in_progress"
    http_status = 409


@dataclass(frozen=True)
class StoredResponse:
    status_code: int
    body: Any


def request_hash(payload: Any) -> str:
    return hashlib.sha256(
        json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()
    ).hexdigest()


async def begin_request(
    uow: UnitOfWork, scope: str, key: str, req_hash: str, ttl: timedelta = timedelta(hours=24)
) -> StoredResponse | None:
    """Reserve ``key`` or return the stored response of an earlier identical request."""
    t = idempotency_table
    now = uow.db.clock.now()
    row = (await uow.conn.execute(sa.select(t).where(t.c.scope == scope, t.c.key == key))).first()
    if row is not None and row.expires_at <= now:
        await uow.conn.execute(t.delete().where(t.c.scope == scope, t.c.key == key))
        row = None
    if row is None:
        try:
            async with uow.conn.begin_nested():
                await uow.conn.execute(
                    t.insert().values(
                        scope=scope,
                        key=key,
                        request_hash=req_hash,
                        created_at=now,
                        expires_at=now + ttl,
                    )
                )
        except IntegrityError:
            raise InProgress(f"request {key!r} is being processed") from None
        return None
    if row.request_hash != req_hash:
        raise KeyReused(f"idempotency key {key!r} was used for a different request")
    if row.status_code is None:
        raise InProgress(f"request {key!r} is being processed")
    return StoredResponse(status_code=row.status_code, body=json.loads(row.response))


async def complete_request(
    uow: UnitOfWork, scope: str, key: str, status_code: int, body: Any
) -> None:
    t = idempotency_table
    await uow.conn.execute(
        t.update()
        .where(t.c.scope == scope, t.c.key == key)
        .values(status_code=status_code, response=json.dumps(body, sort_keys=True, default=str))
    )


async def purge_expired(uow: UnitOfWork) -> int:
    t = idempotency_table
    result = await uow.conn.execute(t.delete().where(t.c.expires_at <= uow.db.clock.now()))
    return int(result.rowcount or 0)
