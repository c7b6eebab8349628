"""A client that goes away before its request body is read (an edge stopping mid-upload) is
not an error: nothing is answered, nothing is stored, no traceback is logged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa

from forecourt.bootstrap import build_head_office
from forecourt.network.handlers import (
    SAMPLE_CHAIN,
    import_chain,
    issue_credential,
    load_chain_file,
)
from forecourt.sales.store import sale_t
from forecourt.settings import Settings


async def test_an_upload_whose_client_disconnects_before_its_body_is_read_is_not_an_error(
    tmp_path: Path,
) -> None:
    hq = build_head_office(
        Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'hq.db'}", log_json=False)
    )
    await hq.start(relay=False)
    try:
        await import_chain(hq.db, load_chain_file(SAMPLE_CHAIN))
        _, token = await issue_credential(hq.db, "S001")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/stations/S001/sales:batch",
            "raw_path": b"/v1/stations/S001/sales:batch",
            "query_string": b"",
            "headers": [
                (b"authorization", f"Bearer {token}".encode()),
                (b"content-type", b"application/json"),
                (b"content-length", b"100"),
            ],
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8400),
        }
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        # When the client is gone before its body arrives, Then the app ends without raising
        # (the server would log a traceback for an exception) and stores nothing
        await hq.app(scope, receive, send)
        async with hq.db.connection() as conn:
            stored = await conn.scalar(sa.select(sa.func.count()).select_from(sale_t))
        assert stored == 0
    finally:
        await hq.stop()
