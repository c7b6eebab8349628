"""What ``devices`` answers over HTTP (``/v1/devices/...``): the response models, which
OpenAPI documents. Telemetry comes in in the wire format of ``forecourt.kernel.telemetry``."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Reading(_Model):
    """One accepted message of a topic: its stamp, HQ's time of receipt, and its body as the
    edge published it (see docs/telemetry.md for each kind's fields: integers carry their
    unit in their name, money in minor units)."""

    boot: str = Field(description="the publishing edge process")
    seq: int = Field(description="the edge's counter within its boot")
    at: datetime = Field(description="when the edge saw it")
    received_at: datetime = Field(description="when HQ accepted it")
    data: dict[str, Any] = Field(description="the payload's body")


class Keyed(_Model):
    key: str = Field(description="the pump or tank number, or the device line's name")
    current: Reading


class Link(_Model):
    """The station's link to the broker, from its ``status`` topic (its last will: offline)."""

    online: bool
    software: str | None = None
    current: Reading


class Alarm(_Model):
    station: str
    name: str
    source: Literal["edge", "hq"] = Field(description="edge: published by the station; hq: HQ's")
    active: bool
    message: str
    details: dict[str, Any]
    raised_at: datetime | None
    cleared_at: datetime | None
    updated_at: datetime


class AlarmEvent(_Model):
    """An alarm raised (active) or cleared, as it happened."""

    station: str
    name: str
    source: Literal["edge", "hq"]
    active: bool
    message: str
    details: dict[str, Any]
    at: datetime
    received_at: datetime


class Discard(_Model):
    """A message HQ did not apply, and why (reason: topic, empty, malformed, spoofed,
    unknown_station, bad_body)."""

    topic: str
    reason: str
    message: str
    received_at: datetime


class StationSummary(_Model):
    station: str
    online: bool | None = Field(description="the link's state; null before any status")
    stale: bool = Field(description="offline, or nothing valid for devices_stale_after_s")
    last_seen: datetime | None = Field(description="HQ's time of the last valid message")
    active_alarms: int
    pumps: int
    tanks: int
    discards: int = Field(description="messages discarded from this station, ever")


class StationDevices(_Model):
    station: str
    online: bool | None
    stale: bool
    last_seen: datetime | None
    link: Link | None
    pumps: list[Keyed]
    tanks: list[Keyed]
    devices: list[Keyed]
    active_alarms: list[Alarm]
    discards: int
    recent_discards: list[Discard]


class PumpDevices(_Model):
    station: str
    pump: int
    stale: bool
    current: Reading
    history: list[Reading] = Field(description="accepted states, newest first")


class TankDevices(_Model):
    station: str
    tank: int
    stale: bool
    current: Reading
    history: list[Reading] = Field(description="accepted measurements, newest first")


class StationAlarms(_Model):
    station: str
    active: list[Alarm]
    recent: list[AlarmEvent] = Field(description="raised and cleared, newest first")
