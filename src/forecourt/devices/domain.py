"""The rules of ``devices``: which telemetry message is newer, when a station is stale, and
why a message is discarded. Free of frameworks."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from forecourt.kernel.errors import ForecourtError, InvalidValue, NotFound

# The alarms head office raises itself (``source: hq``), next to those the edges publish.
TELEMETRY_STALE = "telemetry_stale"
TELEMETRY_DISCARDED = "telemetry_discarded"
HQ_SOURCE = "hq"
EDGE_SOURCE = "edge"

# Kinds kept as current state per key (the topic's kind; ``status`` has the key "").
STATE_KINDS = ("status", "pumps", "tanks", "devices")
HISTORY_KINDS = ("pumps", "tanks")


class DevicesError(ForecourtError):
    code = "devices.error"


class UnknownTelemetry(NotFound):
    """No telemetry (and no such station, pump or tank) to answer about."""

    code = "devices.not_found"


class DiscardReason(enum.StrEnum):
    """Why a message from the broker was not applied (the metric's ``reason`` label)."""

    TOPIC = "topic"  # not a telemetry topic under the prefix
    EMPTY = "empty"  # an empty payload: a retained topic cleared on the broker
    MALFORMED = "malformed"  # not a valid payload of the format
    SPOOFED = "spoofed"  # about another station than its topic's
    UNKNOWN_STATION = "unknown_station"  # a station the network does not know
    BAD_BODY = "bad_body"  # a valid envelope whose body this kind cannot use


@dataclass(frozen=True, slots=True)
class Stamp:
    """Where a message stands in its publisher's order: ``boot`` (the publishing process),
    ``seq`` (rising within a boot) and ``at`` (the edge's time)."""

    boot: str
    seq: int
    at: datetime


def supersedes(new: Stamp, old: Stamp | None) -> bool:
    """Whether ``new`` replaces ``old`` as a topic's current state.

    Within one boot the higher ``seq`` wins (a repeated or older one changes nothing, even
    if the edge's clock stepped back). Across boots the later ``at`` wins, and at the same
    ``at`` the greater ``boot`` text (so every reader agrees): a restarted edge's first
    message replaces whatever its previous process said, and a late message of an older
    process, stamped before, does not come back. While an edge's clock runs forward within a
    boot this is the order (at, boot, seq), so any arrival order ends in the same state.
    """
    if old is None:
        return True
    if new.boot == old.boot:
        return new.seq > old.seq
    return (new.at, new.boot) > (old.at, old.boot)


def is_stale(
    *, online: bool | None, last_seen: datetime | None, now: datetime, stale_after: timedelta
) -> bool:
    """A station's telemetry is stale when its link says offline (the edge said so, or the
    broker published its last will), or when nothing valid arrived from it for
    ``stale_after`` (HQ's own time of receipt)."""
    if online is False or last_seen is None:
        return True
    return now - last_seen > stale_after


def check_prefix(prefix: str) -> str:
    """A topic prefix HQ can subscribe under: levels of text, no wildcard, no NUL, no empty
    level at either end (``forecourt/v1``)."""
    if not prefix or any(c in prefix for c in "#+\x00") or prefix[0] == "/" or prefix[-1] == "/":
        raise InvalidValue(
            f"telemetry prefix {prefix!r} must be topic levels without wildcards, "
            "e.g. forecourt/v1",
            field="devices_telemetry_prefix",
        )
    return prefix


def number_key(value: str) -> int:
    """A pump or tank topic key as its number (the topic parser checked it is 1-9999)."""
    return int(value)


def alarm_body(body: dict[str, Any]) -> tuple[str, bool, str, dict[str, Any]]:
    """An alarm payload's (name, active, message, details), or ValueError."""
    name, active = body.get("name"), body.get("active")
    message, details = body.get("message"), body.get("details")
    if not isinstance(name, str) or not 0 < len(name) <= 100:
        raise ValueError("an alarm needs a name (1-100 characters)")
    if not isinstance(active, bool):
        raise ValueError("an alarm needs active (true or false)")
    if message is not None and not isinstance(message, str):
        raise ValueError("an alarm's message is text")
    if details is not None and not isinstance(details, dict):
        raise ValueError("an alarm's details are an object")
    return name, active, message or "", details or {}


def status_online(body: dict[str, Any]) -> bool:
    """A status payload's ``online``, or ValueError."""
    online = body.get("online")
    if not isinstance(online, bool):
        raise ValueError("a status needs online (true or false)")
    return online
