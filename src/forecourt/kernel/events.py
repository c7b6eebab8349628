"""The event envelope: CloudEvents 1.0 attributes plus W3C ``traceparent``.

Chosen encoding on the bus: CloudEvents *binary* content mode. Attributes travel as ``ce-*``
headers (NATS headers; the in-process bus carries the same mapping), the body is the JSON
``data``. Types are versioned, e.g. ``com.forecourt.sales.sale.completed.v1``; the NATS
subject is the type without the ``com.`` prefix (``forecourt.sales.sale.completed.v1``).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from forecourt.kernel.errors import InvalidValue
from forecourt.kernel.ids import new_id

SPECVERSION = "1.0"
_TYPE_RE = re.compile(r"^com\.forecourt\.[a-z_]+(\.[a-z_]+)+\.v[0-9]+$")
_TRACEPARENT_RE = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def event_type(context: str, name: str, version: int = 1) -> str:
    """``event_type("sales", "sale.completed")`` → ``com.forecourt.sales.sale.completed.v1``."""
    return f"com.forecourt.{context}.{name}.v{version}"


def new_traceparent() -> str:
    return f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"


def trace_id_of(traceparent: str | None) -> str | None:
    if traceparent and _TRACEPARENT_RE.fullmatch(traceparent):
        return traceparent.split("-")[1]
    return None


def check_type(type_: str) -> None:
    if not _TYPE_RE.fullmatch(type_):
        raise InvalidValue(f"event type {type_!r} is not com.forecourt.<ctx>.<name>.vN")


def check_traceparent(traceparent: str | None) -> None:
    if traceparent is not None and not _TRACEPARENT_RE.fullmatch(traceparent):
        raise InvalidValue(f"bad traceparent {traceparent!r}")


class EventRecord(NamedTuple):
    """An event as the outbox stores it and the relay publishes it: the envelope's attributes
    and its JSON body, encoded once. Hot paths build these directly (many events share one
    type, time and trace context, so :func:`check_records` validates each distinct value
    once); :meth:`Envelope.record` makes one from an envelope."""

    id: str
    type: str
    source: str
    subject: str | None
    time: datetime
    traceparent: str | None
    data: str  # the JSON body

    @property
    def bus_subject(self) -> str:
        return self.type.removeprefix("com.")

    def headers(self) -> dict[str, str]:
        """The CloudEvents binary-mode headers."""
        return binary_headers(self)


def binary_headers(
    event: EventRecord | Envelope,
    specversion: str = SPECVERSION,
    datacontenttype: str = "application/json",
) -> dict[str, str]:
    """An event's attributes as CloudEvents binary-mode headers (``ce-*``, W3C
    ``traceparent``, ``content-type``)."""
    h = {
        "ce-specversion": specversion,
        "ce-id": event.id,
        "ce-source": event.source,
        "ce-type": event.type,
        "ce-time": event.time.isoformat(),
        "content-type": datacontenttype,
    }
    if event.subject is not None:
        h["ce-subject"] = event.subject
    if event.traceparent is not None:
        h["traceparent"] = event.traceparent
    return h


def check_records(records: Iterable[EventRecord]) -> None:
    """The envelope's rules for a batch of records: each distinct type, time and trace
    context is checked once."""
    types: set[str] = set()
    times: set[datetime] = set()
    traces: set[str | None] = set()
    for r in records:
        types.add(r.type)
        times.add(r.time)
        traces.add(r.traceparent)
        if not r.id or not r.source:
            raise InvalidValue("an event needs an id and a source")
    for t in types:
        check_type(t)
    for moment in times:
        if moment.tzinfo is None:
            raise InvalidValue("event time must be timezone-aware")
    for tp in traces:
        check_traceparent(tp)


@dataclass(frozen=True)
class Envelope:
    type: str
    source: str
    data: dict[str, Any]
    time: datetime
    subject: str | None = None
    id: str = field(default_factory=lambda: str(new_id()))
    traceparent: str | None = None
    datacontenttype: str = "application/json"
    specversion: str = SPECVERSION
    # The JSON body when it is already encoded (the outbox stores exactly ``body()``), so
    # the relay does not encode every event a second time.
    encoded: bytes | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_type(self.type)
        if self.time.tzinfo is None:
            raise InvalidValue("event time must be timezone-aware")
        check_traceparent(self.traceparent)

    @property
    def bus_subject(self) -> str:
        return self.type.removeprefix("com.")

    def headers(self) -> dict[str, str]:
        return binary_headers(self, self.specversion, self.datacontenttype)

    def record(self) -> EventRecord:
        return EventRecord(
            self.id,
            self.type,
            self.source,
            self.subject,
            self.time,
            self.traceparent,
            self.body().decode(),
        )

    @classmethod
    def from_record(cls, record: EventRecord) -> Envelope:
        try:
            data = json.loads(record.data)
        except ValueError as exc:
            raise InvalidValue(
                f"malformed event body: {exc}", code="kernel.malformed_event"
            ) from exc
        return cls(
            id=record.id,
            type=record.type,
            source=record.source,
            subject=record.subject,
            time=record.time,
            traceparent=record.traceparent,
            data=data,
            encoded=record.data.encode(),
        )

    def body(self) -> bytes:
        if self.encoded is not None:
            return self.encoded
        return json.dumps(self.data, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_wire(cls, headers: dict[str, str], body: bytes) -> Envelope:
        try:
            if headers.get("ce-specversion") != SPECVERSION:
                raise ValueError("unsupported or missing ce-specversion")
            data = json.loads(body) if body else {}
            if not isinstance(data, dict):
                raise ValueError("the body must be a JSON object")
            return cls(
                id=headers["ce-id"],
                source=headers["ce-source"],
                type=headers["ce-type"],
                time=datetime.fromisoformat(headers["ce-time"]),
                subject=headers.get("ce-subject"),
                traceparent=headers.get("traceparent"),
                datacontenttype=headers.get("content-type", "application/json"),
                data=data,
            )
        except (KeyError, ValueError, InvalidValue) as exc:
            raise InvalidValue(f"malformed event: {exc}", code="kernel.malformed_event") from exc
