"""Device telemetry on the wire, edge -> MQTT broker -> HQ: topics and payloads (version 1).

The edge publishes, HQ's ``devices`` context consumes; they share nothing but this format
(documented in ``docs/telemetry.md``). Every payload is a JSON object carrying ``v`` (1), the
``station`` it is about (it must equal the station in its topic: HQ discards one that does
not), ``at`` (when the edge saw it, ISO 8601 with an offset) and ``seq`` (the publishing
edge's counter, rising within one ``boot``; HQ keeps the newest by ``(boot, seq)`` per topic).

Topics, under a prefix (default ``forecourt/v1``; a test or a second chain may use another)::

    {prefix}/stations/{station}/status              retained   the edge's link: online or not
    {prefix}/stations/{station}/pumps/{pump}        retained   a fuelling point's last state
    {prefix}/stations/{station}/tanks/{tank}        retained   a tank's last measurement
    {prefix}/stations/{station}/devices/{device}    retained   a device line's health
    {prefix}/stations/{station}/alarms              not        an alarm raised or cleared

The status topic is also the edge's MQTT *last will* (``online: false``), so HQ learns that
an edge went away even when it could not say so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from forecourt.kernel.errors import InvalidValue

VERSION = 1
DEFAULT_PREFIX = "forecourt/v1"
KINDS = ("status", "pumps", "tanks", "devices", "alarms")
_SEGMENT = re.compile(r"^[A-Za-z0-9_.\-:]{1,64}$")  # no MQTT wildcard, separator or NUL
MAX_PAYLOAD_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed telemetry topic: ``kind`` is one of :data:`KINDS`; ``key`` the pump or tank
    number, or the device name (None for status and alarms)."""

    station: str
    kind: str
    key: str | None = None


def _segment(value: str, what: str) -> str:
    if not _SEGMENT.match(value):
        raise InvalidValue(f"{what} {value!r} cannot be a topic segment", field=what)
    return value


def topic(prefix: str, station: str, kind: str, key: str | int | None = None) -> str:
    """The topic a payload of ``kind`` about ``station`` (and ``key``) is published on."""
    if kind not in KINDS:
        raise InvalidValue(f"unknown telemetry kind {kind!r}", field="kind")
    base = f"{prefix}/stations/{_segment(station, 'station')}/{kind}"
    if kind in ("status", "alarms"):
        if key is not None:
            raise InvalidValue(f"a {kind} topic has no key", field="key")
        return base
    if key is None:
        raise InvalidValue(f"a {kind} topic needs a key", field="key")
    if kind in ("pumps", "tanks") and not _number(str(key)):
        # the same rule as parse_topic: never publish on a topic the consumer refuses
        raise InvalidValue(f"a {kind[:-1]} number is 1-9999, not {key!r}", field="key")
    return f"{base}/{_segment(str(key), 'key')}"


def _number(text: str) -> bool:
    return text.isascii() and text.isdigit() and 0 < int(text) < 10_000


def subscription(prefix: str, station: str = "+") -> str:
    """The filter HQ subscribes with (every station by default)."""
    return f"{prefix}/stations/{station}/#"


def parse_topic(prefix: str, name: str) -> Topic:
    """A topic name -> :class:`Topic`, or :class:`InvalidValue` for anything else."""
    head = f"{prefix}/stations/"
    if not name.startswith(head):
        raise InvalidValue(f"topic {name!r} is not under {head!r}", field="topic")
    parts = name[len(head) :].split("/")
    if len(parts) < 2 or not _SEGMENT.match(parts[0]) or parts[1] not in KINDS:
        raise InvalidValue(f"topic {name!r} names no station and kind", field="topic")
    station, kind, rest = parts[0], parts[1], parts[2:]
    if kind in ("status", "alarms"):
        if rest:
            raise InvalidValue(f"topic {name!r} has parts after {kind!r}", field="topic")
        return Topic(station, kind)
    if len(rest) != 1 or not _SEGMENT.match(rest[0]):
        raise InvalidValue(f"topic {name!r} needs one key after {kind!r}", field="topic")
    if kind in ("pumps", "tanks") and not _number(rest[0]):
        raise InvalidValue(f"topic {name!r}: a {kind[:-1]} number is 1-9999", field="topic")
    return Topic(station, kind, rest[0])


def encode(station: str, at: datetime, boot: str, seq: int, body: dict[str, Any]) -> bytes:
    """A payload: ``body`` with the envelope fields (``v``, ``station``, ``at``, ``boot``,
    ``seq``) set; compact JSON, UTF-8."""
    if at.tzinfo is None:
        raise InvalidValue("telemetry time must be timezone-aware", field="at")
    envelope = {"v": VERSION, "station": station, "at": at.isoformat(), "boot": boot, "seq": seq}
    return json.dumps({**body, **envelope}, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded payload: the envelope, and the rest as ``body``."""

    station: str
    at: datetime
    boot: str
    seq: int
    body: dict[str, Any]


def decode(payload: bytes, expected_station: str) -> Message:
    """Bytes from the broker -> :class:`Message`; :class:`InvalidValue` for a payload that is
    too big, not a JSON object, of another version, lacking an envelope field, or about a
    station other than its topic's (``expected_station``): a spoofed or broken message."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise InvalidValue(f"payload of {len(payload)} bytes is too big", field="payload")
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidValue(f"payload is not JSON: {exc}", field="payload") from None
    except RecursionError:  # "[[[[…" nested deeper than the parser's stack, within 64 KiB
        raise InvalidValue("payload is nested too deeply", field="payload") from None
    if not isinstance(data, dict):
        raise InvalidValue("payload is not a JSON object", field="payload")
    if data.get("v") != VERSION:
        raise InvalidValue(f"payload version {data.get('v')!r} is not {VERSION}", field="v")
    station, boot, seq, at = data.get("station"), data.get("boot"), data.get("seq"), data.get("at")
    if station != expected_station:
        raise InvalidValue(
            f"payload about station {station!r} on station {expected_station!r}'s topic",
            field="station",
        )
    if not isinstance(boot, str) or not boot or len(boot) > 64:
        raise InvalidValue("payload has no boot", field="boot")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 2**63:
        raise InvalidValue("payload has no valid seq", field="seq")
    try:
        when = datetime.fromisoformat(at) if isinstance(at, str) else None
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise InvalidValue("payload has no timezone-aware 'at'", field="at")
    body = {k: v for k, v in data.items() if k not in ("v", "station", "at", "boot", "seq")}
    return Message(station, when, boot, seq, body)
