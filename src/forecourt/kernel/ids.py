"""Identifiers: UUIDv7 (time-ordered, so they index well and partition by time)."""

from __future__ import annotations

import uuid

import uuid6


def new_id() -> uuid.UUID:
    """A new UUIDv7 as a standard :class:`uuid.UUID`."""
    return uuid.UUID(bytes=uuid6.uuid7().bytes)


def parse_id(value: str | uuid.UUID) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
