"""Identifiers: UUIDv7 (time-ordered, so they index well and partition by time)."""

from __future__ import annotations

import hashlib
import uuid

import uuid6


def new_id() -> uuid.UUID:
    """A new UUIDv7 as a standard :class:`uuid.UUID`."""
    return uuid.UUID(bytes=uuid6.uuid7().bytes)


def parse_id(value: str | uuid.UUID) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def uuid5_str(namespace: bytes, name: str) -> str:
    """``str(uuid.uuid5(UUID(bytes=namespace), name))`` without the intermediate objects:
    derived ids are made once per event on the ingest hot path."""
    digest = bytearray(hashlib.sha1(namespace + name.encode()).digest()[:16])  # noqa: S324 - RFC 4122 v5
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
