"""The bus's NATS client handles headers exactly as the client library does.

``forecourt.infra.bus.nats._Client`` replaces the library's header parser and header
writer with faster ones; for any input they must give what the library's own code gives
(the same dict on receipt, the same bytes on the wire, the same refusal of a bad name).
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as LibraryClient

from forecourt.infra.bus.nats import _Client

# Pieces that exercise every branch: delimiters, whitespace the two strips differ on
# (\x1c-\x1f, \x85 are str whitespace but not bytes whitespace), bytes beyond ASCII,
# ill-formed UTF-8 cut by a delimiter, status lines.
_PIECES = st.sampled_from(
    [
        b"\r\n",
        b":",
        b": ",
        b" ",
        b"\t",
        b"\x0b",
        b"\x0c",
        b"\x1c",
        b"\x1f",
        b"\r",
        b"\n",
        b"\x85",
        b"\xc2\x85",
        b"\xc2\xa0",
        b"\xff",
        b"\xc3",
        b"\xa9",
        b"\xe2\x80",
        b"ce-id",
        b"Nats-Msg-Id",
        b"NATS/1.0",
        b"a",
        b"\xe6\xb2\xb9",
    ]
)
_RAW = st.lists(_PIECES | st.binary(max_size=6), max_size=40).map(b"".join)


@settings(max_examples=3000, deadline=None)
@given(_RAW)
def test_the_header_parser_gives_what_the_library_gives(raw: bytes) -> None:
    assert _Client._parse_header_lines(raw) == LibraryClient._parse_header_lines(raw)


def test_the_header_parser_on_a_real_cloudevents_block() -> None:
    raw = (
        b"ce-specversion: 1.0\r\nce-id: 0193-abc\r\nce-source: /hq/sales\r\n"
        b"ce-subject: S0001/\xe6\xb2\xb9\r\nbad name: x\r\n\xff: y\r\nNats-Msg-Id:z\r\n\r\n"
    )
    parsed = _Client._parse_header_lines(raw)
    assert parsed == LibraryClient._parse_header_lines(raw)
    assert parsed["ce-subject"] == "S0001/油"
    assert "bad name" not in parsed
    assert parsed["Nats-Msg-Id"] == "z"


def _wire(cls: type[LibraryClient], headers: dict[str, Any]) -> bytes | type[Exception]:
    """What ``cls``'s publish path writes for ``headers`` (or the error it raises)."""
    client = cls()
    sent: list[bytes] = []

    async def capture(cmd: bytes, priority: bool = False) -> None:  # noqa: ARG001
        sent.append(cmd)

    client._send_command = capture  # type: ignore[method-assign]
    client._flush_queue = None
    try:
        asyncio.run(client._send_publish("s.1", "r.2", b"{}", 2, headers))
    except nats.errors.BadHeaderError:
        return nats.errors.BadHeaderError
    assert len(sent) == 1
    return sent[0]


_TEXT = st.text(
    alphabet=st.sampled_from(list("aZ09-_.:!~ \t\r\n\x1cé油") + ["\u2028", "\x85"]), max_size=8
)


@settings(max_examples=1500, deadline=None)
@given(st.dictionaries(_TEXT, _TEXT, max_size=6))
def test_the_header_writer_writes_what_the_library_writes(headers: dict[str, str]) -> None:
    assert _wire(_Client, headers) == _wire(LibraryClient, headers)


@pytest.mark.parametrize(
    "headers",
    [
        {"ce-id": "1", "traceparent": "00-ab-cd-01", "Nats-Msg-Id": "1"},
        {" ce-type ": " com.forecourt.sales.sale.completed.v1 \r\n"},
        {"": "skipped", "ok": "line\rbreak\nhere"},
        {"bad name": "x"},
        {"ce-subject": "S0001/油站"},
    ],
)
def test_the_header_writer_on_real_headers(headers: dict[str, str]) -> None:
    assert _wire(_Client, headers) == _wire(LibraryClient, headers)


def test_a_publish_without_headers_is_the_librarys() -> None:
    assert _wire(_Client, {}) == _wire(LibraryClient, {})
