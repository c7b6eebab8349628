"""Use cases of ``devices``: apply the telemetry that arrived together in one transaction,
mark silent stations stale, answer queries."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from forecourt.devices.contracts import (
    Alarm,
    AlarmEvent,
    Discard,
    Keyed,
    Link,
    PumpDevices,
    Reading,
    StationAlarms,
    StationDevices,
    StationSummary,
    TankDevices,
)
from forecourt.devices.domain import (
    EDGE_SOURCE,
    HISTORY_KINDS,
    HQ_SOURCE,
    TELEMETRY_DISCARDED,
    TELEMETRY_STALE,
    DiscardReason,
    Stamp,
    UnknownTelemetry,
    alarm_body,
    check_prefix,
    is_stale,
    status_online,
    supersedes,
)
from forecourt.devices.store import DevicesStore, reading, writing
from forecourt.infra.db import Database
from forecourt.infra.logging import get_logger
from forecourt.kernel.errors import InvalidValue
from forecourt.kernel.telemetry import Message, Topic, decode, parse_topic

log = get_logger("forecourt.devices")

KnownStation = Callable[[str], Awaitable[bool]]
TopicKey = tuple[str, str, str]  # station, kind, key ("" for status; the name for alarms)


@dataclass(frozen=True, slots=True)
class Received:
    """A message as the broker delivered it. ``retained``: sent because the topic holds it
    (on subscribing), not because the edge published it just now."""

    topic: str
    payload: bytes
    retained: bool = False


@dataclass
class IngestOutcome:
    accepted: int = 0  # applied as the newest state or a new alarm transition
    ignored: int = 0  # valid but older than, or a repeat of, what HQ holds
    discarded: Counter[str] = field(default_factory=Counter)  # by reason


@dataclass(frozen=True, slots=True)
class _Valid:
    topic: Topic
    message: Message
    retained: bool


@dataclass(frozen=True, slots=True)
class _Discarded:
    station: str | None
    topic: str
    reason: DiscardReason
    message: str


def _alarm_row(
    station: str,
    source: str,
    name: str,
    active: bool,
    message: str,
    details: dict[str, Any],
    at: datetime,
    previous: Any,
    raised_at: datetime | None = None,
) -> dict[str, Any]:
    if previous is not None and previous.active:
        raised_at = previous.raised_at
    return {
        "station_code": station,
        "source": source,
        "name": name,
        "active": active,
        "message": message,
        "details": json.dumps(details, sort_keys=True),
        "raised_at": (raised_at or at) if active else (previous.raised_at if previous else None),
        "cleared_at": None if active else at,
        "updated_at": at,
    }


class DevicesService:
    """Applies telemetry and keeps staleness. ``known_station`` (the network's directory)
    says whether a station exists; ``on_discard`` and ``on_applied`` count (metrics)."""

    def __init__(
        self,
        db: Database,
        *,
        prefix: str,
        stale_after: timedelta,
        history_limit: int,
        known_station: KnownStation | None = None,
        on_discard: Callable[[str], None] | None = None,
        on_applied: Callable[[str, int], None] | None = None,
    ) -> None:
        self.db = db
        self.prefix = check_prefix(prefix)
        self.stale_after = stale_after
        self.history_limit = history_limit
        self.known_station = known_station
        self.on_discard = on_discard
        self.on_applied = on_applied

    # --- telemetry in ------------------------------------------------------------------------

    def _check(self, item: Received) -> _Valid | _Discarded:
        try:
            parsed = parse_topic(self.prefix, item.topic)
        except InvalidValue as exc:
            return _Discarded(None, item.topic, DiscardReason.TOPIC, exc.message)
        if not item.payload:
            return _Discarded(parsed.station, item.topic, DiscardReason.EMPTY, "empty payload")
        if parsed.kind in HISTORY_KINDS:  # "007" and "7" are one pump
            parsed = Topic(parsed.station, parsed.kind, str(int(parsed.key or "0")))
        try:
            message = decode(item.payload, expected_station=parsed.station)
        except InvalidValue as exc:
            spoofed = exc.details.get("field") == "station"
            reason = DiscardReason.SPOOFED if spoofed else DiscardReason.MALFORMED
            return _Discarded(parsed.station, item.topic, reason, exc.message)
        except Exception as exc:  # noqa: BLE001 - no payload may stop the subscriber
            return _Discarded(parsed.station, item.topic, DiscardReason.MALFORMED, repr(exc))
        try:
            self._check_body(parsed, message.body)
        except ValueError as exc:
            return _Discarded(parsed.station, item.topic, DiscardReason.BAD_BODY, str(exc))
        return _Valid(parsed, message, item.retained)

    @staticmethod
    def _check_body(parsed: Topic, body: dict[str, Any]) -> None:
        if parsed.kind == "status":
            status_online(body)
        elif parsed.kind == "alarms":
            alarm_body(body)
        elif parsed.kind in HISTORY_KINDS:
            number = body.get(parsed.kind[:-1])
            if number is not None and (
                isinstance(number, bool) or not isinstance(number, int) or str(number) != parsed.key
            ):
                raise ValueError(f"{parsed.kind[:-1]} {number!r} on the topic of {parsed.key}")
        elif parsed.kind == "devices":
            device = body.get("device")
            if device is not None and device != parsed.key:
                raise ValueError(f"device {device!r} on the topic of {parsed.key}")

    async def ingest(self, received: Sequence[Received]) -> IngestOutcome:
        """Apply messages that arrived together, in arrival order, in one transaction:
        newest state per topic by stamp (see ``domain.supersedes``), pump and tank history,
        alarm transitions, link and staleness; discard the rest, recorded per station."""
        outcome = IngestOutcome()
        now = self.db.clock.now()
        checked = [self._check(item) for item in received]
        stations = {c.topic.station if isinstance(c, _Valid) else c.station for c in checked}
        known = {s for s in stations if s is not None and await self._known(s)}
        valid: list[_Valid] = []
        discarded: list[_Discarded] = []
        for c in checked:
            if isinstance(c, _Valid):
                if c.topic.station in known:
                    valid.append(c)
                else:
                    discarded.append(
                        _Discarded(
                            c.topic.station,
                            f"{self.prefix}/stations/{c.topic.station}/{c.topic.kind}",
                            DiscardReason.UNKNOWN_STATION,
                            f"station {c.topic.station!r} is not in the network",
                        )
                    )
            else:
                discarded.append(c)
        for d in discarded:
            outcome.discarded[d.reason.value] += 1
            # A cleared retained topic (an empty payload) is an operator's act, not a fault.
            (log.info if d.reason is DiscardReason.EMPTY else log.warning)(
                "devices.telemetry_discarded",
                station=d.station,
                topic=d.topic,
                reason=d.reason.value,
                error=d.message,
            )
            if self.on_discard is not None:
                self.on_discard(d.reason.value)
        recorded = [
            d for d in discarded if d.station in known and d.reason is not DiscardReason.EMPTY
        ]
        if valid or recorded:
            async with writing(self.db) as store:
                await self._apply(store, valid, recorded, now, outcome)
        if self.on_applied is not None:
            self.on_applied("accepted", outcome.accepted)
            self.on_applied("ignored", outcome.ignored)
        return outcome

    async def _known(self, station: str) -> bool:
        return True if self.known_station is None else await self.known_station(station)

    async def _apply(
        self,
        store: DevicesStore,
        valid: list[_Valid],
        recorded: list[_Discarded],
        now: datetime,
        outcome: IngestOutcome,
    ) -> None:
        codes = {v.topic.station for v in valid} | {d.station for d in recorded if d.station}
        await store.lock_stations(codes)
        station_rows = await store.stations(codes)
        stations: dict[str, dict[str, Any]] = {
            code: (
                dict(station_rows[code]._mapping)
                if code in station_rows
                else {
                    "station_code": code,
                    "online": None,
                    "last_seen": None,
                    "stale": False,
                    "discards": 0,
                    "last_discard_at": None,
                }
            )
            for code in codes
        }
        current: dict[TopicKey, dict[str, Any]] = {
            (r.station_code, r.kind, r.key): dict(r._mapping) for r in await store.current_of(codes)
        }
        alarms = await store.alarms_of(codes)
        changed: dict[TopicKey, dict[str, Any]] = {}
        history: list[dict[str, Any]] = []
        alarm_rows: dict[tuple[str, str, str], dict[str, Any]] = {}
        alarm_log: list[dict[str, Any]] = []

        def set_alarm(
            station: str,
            source: str,
            name: str,
            active: bool,
            message: str,
            details: dict[str, Any],
            at: datetime,
            raised_at: datetime | None = None,
        ) -> None:
            key = (station, source, name)
            previous = alarm_rows.get(key) or alarms.get(key)
            prev_active = (
                previous["active"]
                if isinstance(previous, dict)
                else (previous.active if previous is not None else False)
            )
            if source == HQ_SOURCE and prev_active == active:
                return  # HQ's own alarms change on transitions only
            row = _alarm_row(
                station, source, name, active, message, details, at, _AsRow.of(previous), raised_at
            )
            alarm_rows[key] = row
            alarm_log.append(
                {
                    "station_code": station,
                    "source": source,
                    "name": name,
                    "active": active,
                    "message": message,
                    "details": row["details"],
                    "at": at,
                    "received_at": now,
                }
            )

        for v in valid:
            station, kind = v.topic.station, v.topic.kind
            body = v.message.body
            key = v.topic.key or ""
            if kind == "alarms":
                key = alarm_body(body)[0]
            topic_key = (station, kind, key)
            row = stations[station]
            seen = min(now, v.message.at) if v.retained else now
            if row["last_seen"] is None or seen > row["last_seen"]:
                row["last_seen"] = seen
            held = current.get(topic_key)
            new = Stamp(v.message.boot, v.message.seq, v.message.at)
            old = Stamp(held["boot"], held["seq"], held["at"]) if held is not None else None
            if not supersedes(new, old):
                outcome.ignored += 1
                continue
            outcome.accepted += 1
            entry = {
                "station_code": station,
                "kind": kind,
                "key": key,
                "boot": new.boot,
                "seq": new.seq,
                "at": new.at,
                "body": json.dumps(body, sort_keys=True),
                "received_at": now,
            }
            current[topic_key] = changed[topic_key] = entry
            if kind in HISTORY_KINDS:
                history.append(dict(entry))
            elif kind == "status":
                row["online"] = status_online(body)
            elif kind == "alarms":
                name, active, message, details = alarm_body(body)
                raised = _aware(body.get("raised_at"))
                set_alarm(station, EDGE_SOURCE, name, active, message, details, new.at, raised)

        for d in recorded:
            assert d.station is not None
            row = stations[d.station]
            row["discards"] += 1
            row["last_discard_at"] = now
            set_alarm(
                d.station,
                HQ_SOURCE,
                TELEMETRY_DISCARDED,
                True,
                f"telemetry discarded ({d.reason.value}): {d.message}",
                {"reason": d.reason.value, "topic": d.topic},
                now,
            )
        for row in stations.values():
            self._stale_transition(row, now, set_alarm)

        await store.save_stations(list(stations.values()))
        await store.save_current(list(changed.values()))
        await store.append_history(history)
        await store.save_alarms(list(alarm_rows.values()))
        await store.log_alarms(alarm_log)
        await store.append_discards(
            [
                {
                    "station_code": d.station,
                    "topic": d.topic[:1000],
                    "reason": d.reason.value,
                    "message": d.message[:1000],
                    "received_at": now,
                }
                for d in recorded
            ]
        )
        for station, kind, key in {(h["station_code"], h["kind"], h["key"]) for h in history}:
            await store.prune_history(station, kind, key, self.history_limit)
        for station in {d.station for d in recorded if d.station}:
            await store.prune_discards(station, self.history_limit)

    def _stale_transition(
        self, row: dict[str, Any], now: datetime, set_alarm: Callable[..., None]
    ) -> bool:
        """Raise or clear a station's ``telemetry_stale`` when its staleness changed; only
        for a station that sent valid telemetry once (one that never did is just absent)."""
        if row["last_seen"] is None:
            return False
        stale = is_stale(
            online=row["online"], last_seen=row["last_seen"], now=now, stale_after=self.stale_after
        )
        if stale == row["stale"]:
            return False
        row["stale"] = stale
        why = "its link is offline" if row["online"] is False else "nothing arrived"
        set_alarm(
            row["station_code"],
            HQ_SOURCE,
            TELEMETRY_STALE,
            stale,
            f"telemetry from {row['station_code']} is stale: {why}"
            if stale
            else f"telemetry from {row['station_code']} is live again",
            {"last_seen": row["last_seen"].isoformat(), "online": row["online"]},
            now,
        )
        return True

    async def sweep(self) -> int:
        """Mark stations stale that fell silent (or clear those that came back), and clear
        ``telemetry_discarded`` alarms with no discard for ``stale_after``: the number of
        alarms that changed. Cheap when nothing changes (one read)."""
        now = self.db.clock.now()
        async with reading(self.db) as store:
            rows = await store.stations()
            alarms = await store.alarms_of(rows)
        due = set()
        for code, r in rows.items():
            stale = r.last_seen is not None and is_stale(
                online=r.online, last_seen=r.last_seen, now=now, stale_after=self.stale_after
            )
            if r.last_seen is not None and stale != r.stale:
                due.add(code)
            discarded = alarms.get((code, HQ_SOURCE, TELEMETRY_DISCARDED))
            if (
                discarded is not None
                and discarded.active
                and (r.last_discard_at is None or now - r.last_discard_at > self.stale_after)
            ):
                due.add(code)
        if not due:
            return 0
        changes = 0
        async with writing(self.db) as store:
            await store.lock_stations(due)
            fresh = await store.stations(due)
            held = await store.alarms_of(due)
            alarm_rows: list[dict[str, Any]] = []
            log_rows: list[dict[str, Any]] = []

            def set_alarm(
                station: str,
                source: str,
                name: str,
                active: bool,
                message: str,
                details: dict[str, Any],
                at: datetime,
            ) -> None:
                row = _alarm_row(
                    station,
                    source,
                    name,
                    active,
                    message,
                    details,
                    at,
                    held.get((station, source, name)),
                )
                alarm_rows.append(row)
                log_rows.append(
                    {
                        k: row[k]
                        for k in ("station_code", "source", "name", "active", "message", "details")
                    }
                    | {"at": at, "received_at": now}
                )

            station_rows = []
            for code, r in fresh.items():
                row = dict(r._mapping)
                if self._stale_transition(row, now, set_alarm):
                    station_rows.append(row)
                discarded = held.get((code, HQ_SOURCE, TELEMETRY_DISCARDED))
                if (
                    discarded is not None
                    and discarded.active
                    and (
                        row["last_discard_at"] is None
                        or now - row["last_discard_at"] > self.stale_after
                    )
                ):
                    set_alarm(
                        code,
                        HQ_SOURCE,
                        TELEMETRY_DISCARDED,
                        False,
                        f"no telemetry discarded from {code} since "
                        f"{row['last_discard_at'].isoformat() if row['last_discard_at'] else '-'}",
                        json.loads(discarded.details),
                        now,
                    )
            await store.save_stations(station_rows)
            await store.save_alarms(alarm_rows)
            await store.log_alarms(log_rows)
            changes = len(alarm_rows)
        for row in alarm_rows:
            log.warning(
                "devices.alarm_raised" if row["active"] else "devices.alarm_cleared",
                station=row["station_code"],
                alarm=row["name"],
                message=row["message"],
            )
        return changes

    # --- queries -----------------------------------------------------------------------------

    def _stale(self, row: Any, now: datetime) -> bool:
        if row is None:
            return True
        return is_stale(
            online=row.online, last_seen=row.last_seen, now=now, stale_after=self.stale_after
        )

    async def list_stations(self) -> list[StationSummary]:
        now = self.db.clock.now()
        async with reading(self.db) as store:
            rows = await store.stations()
            counts = await store.active_alarm_counts()
            current = await store.current_of(rows, kind=None)
        per: Counter[tuple[str, str]] = Counter((r.station_code, r.kind) for r in current)
        return [
            StationSummary(
                station=code,
                online=r.online,
                stale=self._stale(r, now),
                last_seen=r.last_seen,
                active_alarms=counts.get(code, 0),
                pumps=per[(code, "pumps")],
                tanks=per[(code, "tanks")],
                discards=r.discards,
            )
            for code, r in rows.items()
        ]

    async def _require(self, station: str, row: Any) -> None:
        """404 unless the station sent telemetry or is in the network (asked after the read
        connection is closed: SQLite would make a second one wait for the first)."""
        if row is None and (self.known_station is None or not await self._known(station)):
            raise UnknownTelemetry(f"no telemetry from station {station!r}", station=station)

    async def station(self, station: str, discards: int = 20) -> StationDevices:
        now = self.db.clock.now()
        async with reading(self.db) as store:
            row = (await store.stations([station])).get(station)
            current = await store.current_of([station])
            alarms = await store.alarms_of([station])
            recent = await store.discards(station, discards)
        await self._require(station, row)
        by_kind: dict[str, list[Any]] = {}
        for r in current:
            by_kind.setdefault(r.kind, []).append(r)
        link = None
        for r in by_kind.get("status", []):
            data = json.loads(r.body)
            software = data.get("software")
            link = Link(
                online=bool(data.get("online")),
                software=software if isinstance(software, str) else None,
                current=_reading(r),
            )

        def keyed(kind: str) -> list[Keyed]:
            rows = by_kind.get(kind, [])
            if kind in HISTORY_KINDS:
                rows = sorted(rows, key=lambda r: int(r.key))
            return [Keyed(key=r.key, current=_reading(r)) for r in rows]

        return StationDevices(
            station=station,
            online=row.online if row is not None else None,
            stale=self._stale(row, now),
            last_seen=row.last_seen if row is not None else None,
            link=link,
            pumps=keyed("pumps"),
            tanks=keyed("tanks"),
            devices=keyed("devices"),
            active_alarms=[_alarm(a) for a in alarms.values() if a.active],
            discards=row.discards if row is not None else 0,
            recent_discards=[
                Discard(
                    topic=d.topic, reason=d.reason, message=d.message, received_at=d.received_at
                )
                for d in recent
            ],
        )

    async def _keyed(
        self, station: str, kind: str, number: int, limit: int
    ) -> tuple[bool, Reading, list[Reading]]:
        now = self.db.clock.now()
        async with reading(self.db) as store:
            row = (await store.stations([station])).get(station)
            found = await store.current_of([station], kind=kind, key=str(number))
            if row is None or not found:
                raise UnknownTelemetry(
                    f"no telemetry for {kind[:-1]} {number} of station {station!r}",
                    station=station,
                    kind=kind[:-1],
                    number=number,
                )
            history = await store.history(station, kind, str(number), limit)
        return self._stale(row, now), _reading(found[0]), [_reading(h) for h in history]

    async def pump(self, station: str, pump: int, limit: int) -> PumpDevices:
        stale, current, history = await self._keyed(station, "pumps", pump, limit)
        return PumpDevices(
            station=station, pump=pump, stale=stale, current=current, history=history
        )

    async def tank(self, station: str, tank: int, limit: int) -> TankDevices:
        stale, current, history = await self._keyed(station, "tanks", tank, limit)
        return TankDevices(
            station=station, tank=tank, stale=stale, current=current, history=history
        )

    async def alarms(self, station: str, limit: int) -> StationAlarms:
        async with reading(self.db) as store:
            row = (await store.stations([station])).get(station)
            alarms = await store.alarms_of([station])
            log_rows = await store.alarm_log(station, limit)
        await self._require(station, row)
        return StationAlarms(
            station=station,
            active=[_alarm(a) for a in alarms.values() if a.active],
            recent=[
                AlarmEvent(
                    station=r.station_code,
                    name=r.name,
                    source=r.source,
                    active=r.active,
                    message=r.message,
                    details=json.loads(r.details),
                    at=r.at,
                    received_at=r.received_at,
                )
                for r in log_rows
            ],
        )


class _AsRow:
    """A previous alarm, held as a row or as the dict about to be written."""

    def __init__(self, active: bool, raised_at: datetime | None) -> None:
        self.active = active
        self.raised_at = raised_at

    @classmethod
    def of(cls, previous: Any) -> _AsRow | None:
        if previous is None:
            return None
        if isinstance(previous, dict):
            return cls(previous["active"], previous["raised_at"])
        return cls(previous.active, previous.raised_at)


def _aware(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _reading(r: Any) -> Reading:
    return Reading(
        boot=r.boot, seq=r.seq, at=r.at, received_at=r.received_at, data=json.loads(r.body)
    )


def _alarm(a: Any) -> Alarm:
    return Alarm(
        station=a.station_code,
        name=a.name,
        source=a.source,
        active=a.active,
        message=a.message,
        details=json.loads(a.details),
        raised_at=a.raised_at,
        cleared_at=a.cleared_at,
        updated_at=a.updated_at,
    )
