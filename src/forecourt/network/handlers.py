"""Use cases of ``network``: import the chain file, issue station credentials, build station
snapshots, and the station directory other contexts authenticate and validate against.
"""

from __future__ import annotations

import json
import secrets
import time as _time
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import sqlalchemy as sa
import yaml
from cachetools import LRUCache
from limits import parse as parse_limit
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
)

from forecourt.infra.db import Database, UnitOfWork
from forecourt.infra.logging import get_logger
from forecourt.infra.notify import ChannelListener
from forecourt.kernel.errors import InvalidValue
from forecourt.kernel.events import Envelope, event_type
from forecourt.kernel.ids import new_id
from forecourt.kernel.money import Rounding, UnitPrice
from forecourt.network.contracts import (
    NozzleRef,
    SnapshotFuellingPoint,
    SnapshotGrade,
    SnapshotModel,
    SnapshotNozzle,
    SnapshotPrice,
    SnapshotStation,
    SnapshotTank,
    StationIdentity,
    StationReferences,
    StationSnapshot,
)
from forecourt.network.domain import (
    SCOPE_RANK,
    Chain,
    Dispenser,
    DispenserModel,
    FuellingPoint,
    Grade,
    NetworkError,
    Nozzle,
    Price,
    PriceScope,
    PriceSet,
    PriceSetExists,
    PriceSetInForce,
    PriceSetInvalid,
    Station,
    Tank,
    TooManyFailures,
    UnknownCredential,
    UnknownPriceSet,
    UnknownStation,
    applies_to,
    parse_unit_price,
    price_set_gaps,
    stations_in_scope,
    timing_problems,
)
from forecourt.network.store import NetworkStore, hash_secret

SAMPLE_CHAIN = Path(__file__).with_name("sample_chain.yaml")


# --- the chain file (YAML), validated with pydantic -----------------------------------------


class _F(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NozzleFile(_F):
    number: int = Field(ge=1)
    grade: str
    tank: int


class FuellingPointFile(_F):
    number: int = Field(ge=1)
    nozzles: list[NozzleFile] = Field(min_length=1)


class DispenserFile(_F):
    number: int = Field(ge=1)
    model: str
    fuelling_points: list[FuellingPointFile] = Field(min_length=1)


class TankFile(_F):
    number: int = Field(ge=1)
    grade: str
    capacity_l: int = Field(gt=0)


class StationFile(_F):
    code: str = Field(min_length=1, max_length=40)
    name: str
    timezone: str
    business_day_cutoff: time = time(0, 0)
    shift_starts: list[time] | None = None
    tanks: list[TankFile] = []
    dispensers: list[DispenserFile] = []


class RegionFile(_F):
    code: str
    name: str
    stations: list[StationFile] = []


class GradeFile(_F):
    code: str
    name: str
    kind: str = "gasoline"


class ModelFile(_F):
    code: str
    amount_resolution_minor: int = 1
    rounding: Rounding = Rounding.HALF_UP
    volume_decimals: int = 2


class PriceFile(_F):
    grade: str
    price: Decimal  # major units per litre, e.g. "7.89" or "1.459"
    effective_from: datetime
    region: str | None = None
    station: str | None = None


class ChainFile(_F):
    code: str
    name: str
    currency: str = Field(min_length=3, max_length=3)
    grades: list[GradeFile] = Field(min_length=1)
    dispenser_models: list[ModelFile] = Field(min_length=1)
    regions: list[RegionFile] = Field(min_length=1)
    prices: list[PriceFile] = []


def parse_chain(document: dict[str, Any]) -> Chain:
    """Validate a chain document (parsed YAML) into the domain model, or raise NetworkError
    listing every problem found."""
    if not isinstance(document, dict):
        raise NetworkError("invalid chain file", problems=["expected a mapping at the top level"])
    try:
        f = ChainFile.model_validate(document.get("chain", document))
    except ValidationError as exc:
        found = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise NetworkError("invalid chain file", problems=found) from None
    problems: list[str] = []
    grades = {g.code for g in f.grades}
    models = {m.code for m in f.dispenser_models}
    stations: list[Station] = []
    for region in f.regions:
        for s in region.stations:
            tanks = {t.number: t.grade for t in s.tanks}
            for t in s.tanks:
                if t.grade not in grades:
                    problems.append(f"{s.code} tank {t.number}: unknown grade {t.grade}")
            fp_numbers: set[int] = set()
            for d in s.dispensers:
                if d.model not in models:
                    problems.append(f"{s.code} dispenser {d.number}: unknown model {d.model}")
                for fp in d.fuelling_points:
                    if fp.number in fp_numbers:
                        problems.append(f"{s.code}: fuelling point {fp.number} defined twice")
                    fp_numbers.add(fp.number)
                    for n in fp.nozzles:
                        if n.grade not in grades:
                            problems.append(
                                f"{s.code} FP{fp.number} N{n.number}: unknown grade {n.grade}"
                            )
                        elif tanks.get(n.tank) != n.grade:
                            problems.append(
                                f"{s.code} FP{fp.number} N{n.number}: "
                                f"tank {n.tank} does not hold {n.grade}"
                            )
            try:
                stations.append(
                    Station(
                        code=s.code,
                        name=s.name,
                        region=region.code,
                        timezone=s.timezone,
                        business_day_cutoff=s.business_day_cutoff,
                        shift_starts=tuple(s.shift_starts or [s.business_day_cutoff]),
                        tanks=tuple(Tank(t.number, t.grade, t.capacity_l * 1000) for t in s.tanks),
                        dispensers=tuple(
                            Dispenser(
                                number=d.number,
                                model=d.model,
                                fuelling_points=tuple(
                                    FuellingPoint(
                                        number=fp.number,
                                        nozzles=tuple(
                                            Nozzle(n.number, n.grade, n.tank) for n in fp.nozzles
                                        ),
                                    )
                                    for fp in d.fuelling_points
                                ),
                            )
                            for d in s.dispensers
                        ),
                    )
                )
            except NetworkError as exc:
                problems.append(exc.message)
    region_codes = {r.code for r in f.regions}
    station_codes = {s.code for s in stations}
    if len(station_codes) != len(stations):
        problems.append("station codes must be unique")
    prices: list[Price] = []
    for p in f.prices:
        if p.grade not in grades:
            problems.append(f"price for unknown grade {p.grade}")
            continue
        if p.region and p.station:
            problems.append(f"price for {p.grade}: give a region or a station, not both")
            continue
        if p.region and p.region not in region_codes:
            problems.append(f"price for {p.grade}: unknown region {p.region}")
            continue
        if p.station and p.station not in station_codes:
            problems.append(f"price for {p.grade}: unknown station {p.station}")
            continue
        scope, scope_code = (
            (PriceScope.STATION, p.station)
            if p.station
            else (PriceScope.REGION, p.region)
            if p.region
            else (PriceScope.CHAIN, f.code)
        )
        try:
            unit = UnitPrice.from_decimal(p.price, f.currency)
            prices.append(
                Price(
                    grade=p.grade,
                    scope=scope,
                    scope_code=str(scope_code),
                    milli_minor_per_litre=unit.milli_minor_per_litre,
                    currency=f.currency,
                    effective_from=p.effective_from,
                    price_id=str(new_id()),
                )
            )
        except Exception as exc:  # noqa: BLE001 - each problem is reported, none is fatal alone
            problems.append(f"price for {p.grade}: {exc}")
    if problems:
        raise NetworkError("invalid chain file", problems=problems)
    return Chain(
        code=f.code,
        name=f.name,
        currency=f.currency,
        regions=tuple((r.code, r.name) for r in f.regions),
        grades=tuple(Grade(g.code, g.name, g.kind) for g in f.grades),
        dispenser_models=tuple(
            DispenserModel(m.code, m.amount_resolution_minor, m.rounding, m.volume_decimals)
            for m in f.dispenser_models
        ),
        stations=tuple(stations),
        prices=tuple(prices),
    )


def load_chain_file(path: Path) -> Chain:
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise NetworkError(f"cannot read {path}: {exc}") from None
    if not isinstance(document, dict):
        raise NetworkError(
            f"{path}: expected a mapping at the top level",
            problems=["expected a mapping at the top level"],
        )
    return parse_chain(document)


@dataclass(frozen=True)
class ImportResult:
    """What an import did: ``changed`` is false when the chain was already stored as it is,
    and then ``revision`` is the one kept (nothing was written, audited or announced)."""

    revision: int
    stations: int
    prices_added: int
    changed: bool


async def import_chain(db: Database, chain: Chain, *, actor: str = "cli") -> ImportResult:
    """Store the chain and publish it as a new network revision, unless nothing changed."""
    now = db.clock.now()
    async with db.begin() as uow:
        store = NetworkStore(uow.conn)
        if await store.holds(chain):
            # A new revision would make every edge fetch and switch to an identical snapshot,
            # and would tell the audit trail that the network changed when it did not.
            return ImportResult(
                revision=await store.revision(),
                stations=len(chain.stations),
                prices_added=0,
                changed=False,
            )
        added = await store.save_chain(chain, now)
        revision = await store.bump_revision(now)
        await uow.record_audit(
            actor=actor,
            action="network.import",
            target=f"chain:{chain.code}",
            details={"revision": revision, "stations": len(chain.stations), "prices_added": added},
        )
        await uow.emit(
            Envelope(
                type=event_type("network", "revision.published"),
                source="/forecourt/network",
                subject=chain.code,
                time=now,
                data={"revision": revision, "stations": [s.code for s in chain.stations]},
            )
        )
    return ImportResult(
        revision=revision, stations=len(chain.stations), prices_added=added, changed=True
    )


async def issue_credential(
    db: Database,
    station_code: str,
    *,
    actor: str = "cli",
    valid_for: timedelta | None = None,
) -> tuple[str, str]:
    """Create a new credential for a station; the token is shown once and stored hashed.
    ``valid_for``: it expires that long after now (None: it never expires)."""
    token, key_id, now, expires_at = _new_credential(db, valid_for)
    async with db.begin() as uow:
        store = await _station_store(uow, station_code)
        await store.add_credential(station_code, key_id, token, now, expires_at)
        await uow.record_audit(
            actor=actor,
            action="network.credential.issue",
            target=f"station:{station_code}",
            details={
                "key_id": key_id,
                "expires_at": expires_at.isoformat() if expires_at else None,
            },
        )
    return key_id, token


def _new_credential(
    db: Database, valid_for: timedelta | None
) -> tuple[str, str, datetime, datetime | None]:
    """(token, key id, now, expiry) of a credential about to be issued."""
    now = db.clock.now()
    expires_at = now + valid_for if valid_for is not None else None
    return secrets.token_urlsafe(32), str(new_id()), now, expires_at


async def _station_store(uow: UnitOfWork, station_code: str) -> NetworkStore:
    """The network's store in ``uow``, once the station is known."""
    store = NetworkStore(uow.conn)
    if await store.station(station_code) is None:
        raise UnknownStation(f"unknown station {station_code!r}")
    return store


@dataclass(frozen=True)
class Rotated:
    key_id: str
    token: str
    expires_at: datetime | None
    old_valid_until: datetime  # the station's earlier credentials end then
    old_keys: list[str]


async def rotate_credential(
    db: Database,
    station_code: str,
    *,
    grace: timedelta,
    actor: str = "cli",
    valid_for: timedelta | None = None,
) -> Rotated:
    """A new credential for the station; its earlier ones stay valid for ``grace`` (the time
    to install the new one at the station), then end. One transaction, audited."""
    if grace < timedelta(0):
        raise InvalidValue("the grace period cannot be negative", field="grace")
    token, key_id, now, expires_at = _new_credential(db, valid_for)
    async with db.begin() as uow:
        store = await _station_store(uow, station_code)
        old = await store.end_credentials(station_code, now + grace)
        await store.add_credential(station_code, key_id, token, now, expires_at)
        await _notify_credentials(uow)
        await uow.record_audit(
            actor=actor,
            action="network.credential.rotate",
            target=f"station:{station_code}",
            details={
                "key_id": key_id,
                "old_keys": old,
                "old_valid_until": (now + grace).isoformat(),
                "expires_at": expires_at.isoformat() if expires_at else None,
            },
        )
    return Rotated(key_id, token, expires_at, now + grace, old)


async def revoke_credentials(
    db: Database, station_code: str, *, key_id: str | None = None, actor: str = "cli"
) -> list[str]:
    """End the station's credentials (or the one ``key_id``) now, on every HQ process at
    once; the key ids revoked. Audited."""
    now = db.clock.now()
    async with db.begin() as uow:
        store = await _station_store(uow, station_code)
        if key_id is not None and key_id not in {
            r.key_id for r in await store.credentials(station_code)
        }:
            raise UnknownCredential(f"station {station_code} has no credential {key_id!r}")
        revoked = await store.end_credentials(station_code, now, key_id=key_id)
        await _notify_credentials(uow)
        await uow.record_audit(
            actor=actor,
            action="network.credential.revoke",
            target=f"station:{station_code}",
            details={"key_ids": revoked},
        )
    return revoked


async def list_credentials(db: Database, station_code: str) -> list[dict[str, Any]]:
    """The station's credentials (never a secret) and whether each is valid now."""
    now = db.clock.now()
    async with db.connection() as conn:
        store = NetworkStore(conn)
        if await store.station(station_code) is None:
            raise UnknownStation(f"unknown station {station_code!r}")
        rows = await store.credentials(station_code, now)

    def ends(at: datetime | None) -> str | None:
        return at.isoformat() if at else None

    return [
        {
            "key_id": r.key_id,
            "created_at": r.created_at.isoformat(),
            "revoked_at": ends(r.revoked_at),
            "expires_at": ends(r.expires_at),
            "valid": bool(r.valid),
        }
        for r in rows
    ]


CREDENTIALS_CHANNEL = "forecourt_credentials"
log = get_logger("forecourt.network")


async def _notify_credentials(uow: UnitOfWork) -> None:
    """Tell every HQ process, at commit, that credentials changed (PostgreSQL NOTIFY; on
    SQLite each process reads the revision instead)."""
    if uow.conn.dialect.name == "postgresql":
        await uow.conn.execute(sa.text(f"NOTIFY {CREDENTIALS_CHANNEL}"))


async def build_snapshot(db: Database, station_code: str, now: datetime) -> StationSnapshot:
    async with db.connection() as conn:
        store = NetworkStore(conn)
        station = await store.station(station_code)
        if station is None:
            raise UnknownStation(f"unknown station {station_code!r}")
        chain = await store.chain_row()
        models = await store.models()
        grades = await store.grades()
        prices = await store.prices()
        revision = await store.revision()
    # Ship, per grade and scope, the price in force now and every later one, so the edge
    # switches at the exact instant even while HQ is unreachable.
    applicable = [p for p in prices if applies_to(p, station=station.code, region=station.region)]
    in_force: dict[tuple[str, PriceScope], Price] = {}
    for p in applicable:
        if p.effective_from <= now:
            key = (p.grade, p.scope)
            if key not in in_force or p.effective_from > in_force[key].effective_from:
                in_force[key] = p
    shipped = [p for p in applicable if p.effective_from > now] + list(in_force.values())
    shipped.sort(key=lambda p: (p.grade, SCOPE_RANK[p.scope], p.effective_from))
    fps = [
        SnapshotFuellingPoint(
            number=fp.number,
            dispenser=d.number,
            model=SnapshotModel(
                code=d.model,
                amount_resolution_minor=models[d.model].amount_resolution_minor,
                rounding=models[d.model].rounding,
                volume_decimals=models[d.model].volume_decimals,
            ),
            nozzles=[
                SnapshotNozzle(number=n.number, grade=n.grade, tank=n.tank) for n in fp.nozzles
            ],
        )
        for d in station.dispensers
        for fp in d.fuelling_points
    ]
    return StationSnapshot(
        version=max(revision, 1),
        generated_at=now,
        chain=chain.code if chain else "",
        currency=chain.currency if chain else "",
        station=SnapshotStation(
            code=station.code,
            name=station.name,
            region=station.region,
            timezone=station.timezone,
            business_day_cutoff=station.business_day_cutoff,
            shift_starts=list(station.shift_starts),
        ),
        grades=[SnapshotGrade(code=g.code, name=g.name, kind=g.kind) for g in grades],
        tanks=[
            SnapshotTank(number=t.number, grade=t.grade, capacity_ml=t.capacity_ml)
            for t in station.tanks
        ],
        fuelling_points=sorted(fps, key=lambda fp: fp.number),
        prices=[
            SnapshotPrice(
                price_id=p.price_id,
                grade=p.grade,
                scope=p.scope,
                scope_code=p.scope_code,
                milli_minor_per_litre=p.milli_minor_per_litre,
                currency=p.currency,
                effective_from=p.effective_from,
                price_set_id=p.price_set_id,
            )
            for p in shipped
        ],
    )


@dataclass(frozen=True, slots=True)
class _Trusted:
    identity: StationIdentity
    until: datetime | None  # the credential's end (revoked_at ahead, or expires_at)
    checked: float  # monotonic


class DbStationDirectory:
    """The network's :class:`StationDirectory` over its own tables, with short caches.

    A station credential is looked up by its SHA-256 (the cache never holds a secret) in a
    bounded LRU cache of credentials found valid; an unknown credential is never cached, so
    random tokens cannot flush the real ones. A rotation or revocation empties every HQ
    process's cache at once: on PostgreSQL each process LISTENs for the NOTIFY the change
    commits with (while it does not listen, it does not trust its cache), on SQLite it compares
    the credential revision before it answers from its cache (a lookup reads the revision in
    the same statement, so a miss costs one query). Failed lookups are limited per source
    (``failures_per_minute``): past it a source gets 429 until the window moves on.

    The reference cache keeps the ingest hot path to one dictionary lookup per batch;
    master-data edits show up within ``ttl_s``.
    """

    def __init__(
        self,
        db: Database,
        ttl_s: float = 5.0,
        *,
        cache_size: int = 10_000,
        credential_ttl_s: float | None = None,
        failures_per_minute: int = 30,
    ) -> None:
        self.db = db
        self.ttl_s = ttl_s
        # A change empties the cache at once; the lifetime only bounds how long a credential
        # is trusted without looking at the database again.
        self.credential_ttl_s = ttl_s if credential_ttl_s is None else credential_ttl_s
        self._auth: LRUCache[str, _Trusted] = LRUCache(maxsize=cache_size)
        self._refs: dict[str, tuple[float, StationReferences | None]] = {}
        self._failures = parse_limit(f"{failures_per_minute}/minute")
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._revision: int | None = None
        self._listener: ChannelListener | None = None
        self.lookups = 0  # credential lookups in the database (the cache missed)

    async def authenticate(self, token: str, source: str | None = None) -> StationIdentity | None:
        source_key = source or "unknown"
        if not self._limiter.test(self._failures, "station-credential", source_key):
            stats = self._limiter.get_window_stats(self._failures, "station-credential", source_key)
            retry = max(1.0, stats.reset_time - _time.time())
            raise TooManyFailures(
                "too many failed station credentials from this source: wait, then retry",
                retry_after_s=round(retry, 1),
            )
        key = hash_secret(token)
        now = self.db.clock.now()
        hit = self._auth.get(key) if await self._cache_trusted() else None
        if (
            hit is not None
            and _time.monotonic() - hit.checked < self.credential_ttl_s
            and (hit.until is None or now < hit.until)
            and await self._cache_current()
        ):
            return hit.identity
        self.lookups += 1
        async with self.db.connection() as conn:
            found = await NetworkStore(conn).station_for_secret(key, now)
        if found is None:
            self._auth.pop(key, None)
            self._limiter.hit(self._failures, "station-credential", source_key)
            # The hash's head names the credential tried without showing it.
            log.warning("network.credential_refused", source=source_key, credential=key[:12])
            if not self._limiter.test(self._failures, "station-credential", source_key):
                log.warning("network.credential_source_blocked", source=source_key)
            return None
        if self.db.backend != "postgresql":
            self._note_revision(found.revision)
        identity = StationIdentity(code=found.code, region=found.region)
        self._auth[key] = _Trusted(identity, found.until, _time.monotonic())
        return identity

    @property
    def cache_trusted(self) -> bool:
        """Whether cached credentials may be used now (PostgreSQL: while the LISTEN stands)."""
        if self.db.backend == "postgresql":
            return self._listener is not None and self._listener.listening
        return True

    def forget_credentials(self) -> None:
        """Trust no cached credential (a rotation or revocation happened)."""
        self._auth.clear()

    async def _cache_trusted(self) -> bool:
        """Whether the cache may be used now: on PostgreSQL while the LISTEN stands (started
        here); on SQLite always, each entry found being checked by :meth:`_cache_current`."""
        if self.db.backend == "postgresql":
            if self._listener is None:
                self._listener = ChannelListener(
                    self.db, CREDENTIALS_CHANNEL, self.forget_credentials
                )
            self._listener.start()
            return self._listener.listening
        return True

    async def _cache_current(self) -> bool:
        """Whether no credential changed since the cache was filled (PostgreSQL: the NOTIFY
        empties it; SQLite: the revision is read), emptying the cache if one did."""
        if self.db.backend == "postgresql":
            return True
        async with self.db.connection() as conn:
            revision = await NetworkStore(conn).credential_revision()
        return self._note_revision(revision)

    def _note_revision(self, revision: int) -> bool:
        """Keep the credential revision the cache holds to, emptying it on a change; whether
        the revision was the one held."""
        if revision == self._revision:
            return True
        self._revision = revision
        self.forget_credentials()
        return False

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.stop()

    async def references(self, station_code: str) -> StationReferences | None:
        hit = self._refs.get(station_code)
        if hit and _time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        async with self.db.connection() as conn:
            store = NetworkStore(conn)
            station = await store.station(station_code)
            chain = await store.chain_row()
            models = await store.models()
            grades = await store.grades()
        refs = None
        if station is not None:
            refs = StationReferences(
                code=station.code,
                region=station.region,
                timezone=station.timezone,
                currency=chain.currency if chain else "",
                nozzles={
                    (fp.number, n.number): NozzleRef(grade=n.grade, tank=n.tank)
                    for d in station.dispensers
                    for fp in d.fuelling_points
                    for n in fp.nozzles
                },
                amount_rules={
                    fp.number: (models[d.model].amount_resolution_minor, models[d.model].rounding)
                    for d in station.dispensers
                    for fp in d.fuelling_points
                },
                grades=frozenset(g.code for g in grades),
            )
        self._refs[station_code] = (_time.monotonic(), refs)
        return refs


# --- price sets: published ahead of their instant, refused when they would leave a gap ------

PriceSetGrade = Annotated[str, StringConstraints(min_length=1, max_length=40)]
PriceSetDecimal = Annotated[
    str,
    StringConstraints(max_length=32),
    WithJsonSchema(
        {
            "type": "string",
            "maxLength": 32,
            "description": "major units per litre as a decimal string, e.g. 7.89 or 1.459",
            "examples": ["7.89"],
        }
    ),
]


class PriceSetFile(_F):
    """A price set as an operator publishes it (HTTP body, or a file for the CLI)."""

    effective_from: datetime = Field(
        description="the instant the set comes into force, with a UTC offset; not in the "
        "past by head office's clock",
        examples=["2026-12-24T00:00:00+08:00"],
    )
    scope: PriceScope = PriceScope.CHAIN
    scope_code: str | None = Field(
        default=None,
        min_length=1,
        max_length=40,
        description="the region or station code; for the chain, its code (or left out)",
    )
    prices: dict[PriceSetGrade, PriceSetDecimal] = Field(
        max_length=200, description="grade → price per litre in major units"
    )
    replace: bool = Field(
        default=False,
        description="replace a different set (or chain-file prices) already scheduled for "
        "the same scope and instant instead of being refused with 409",
    )


@dataclass(frozen=True)
class PublishedPriceSet:
    price_set: PriceSet
    status: str
    created: bool  # false: an identical set was already published, nothing was written


def _refused(problems: list[str]) -> PriceSetInvalid:
    more = f" (and {len(problems) - 1} more, see details)" if len(problems) > 1 else ""
    return PriceSetInvalid(f"price set refused: {problems[0]}{more}", problems=problems)


async def publish_price_set(
    db: Database, request: PriceSetFile, *, actor: str = "api"
) -> PublishedPriceSet:
    """Validate a price set against the network as stored and publish it as a new network
    revision, so every edge in its scope has it before its instant; or refuse it, listing
    every problem found."""
    now = db.clock.now()
    async with db.begin() as uow:
        store = NetworkStore(uow.conn)
        chain = await store.chain_row()
        if chain is None:
            raise _refused(["no chain is imported yet: import the chain file first"])
        problems = timing_problems(request.effective_from, now)
        scope = request.scope
        scope_code = request.scope_code
        stations = await store.stations()
        scope_known = True
        if scope is PriceScope.CHAIN:
            if scope_code is not None and scope_code != chain.code:
                problems.append(f"scope_code: unknown chain {scope_code!r} (it is {chain.code})")
                scope_known = False
            scope_code = chain.code
        elif scope_code is None:
            problems.append(f"scope_code: a {scope.value} set names its {scope.value}")
            scope_known = False
        elif scope is PriceScope.REGION and scope_code not in await store.region_codes():
            problems.append(f"scope_code: unknown region {scope_code!r}")
            scope_known = False
        elif scope is PriceScope.STATION and scope_code not in {s.code for s in stations}:
            problems.append(f"scope_code: unknown station {scope_code!r}")
            scope_known = False
        grades = {g.code for g in await store.grades()}
        priced: dict[str, int] = {}
        if not request.prices:
            problems.append("prices: a price set prices at least one grade")
        for grade, text in sorted(request.prices.items()):
            if grade not in grades:
                problems.append(f"prices.{grade}: unknown grade {grade!r}")
                continue
            value, problem = parse_unit_price(grade, text, chain.currency)
            if problem is not None:
                problems.append(problem)
            elif value is not None:
                priced[grade] = value
        if scope_known and scope_code is not None:
            given = set(request.prices) & grades
            problems.extend(price_set_gaps(stations, scope, scope_code, given))
        if problems or scope_code is None:
            raise _refused(problems)
        effective_from = request.effective_from
        price_set = PriceSet(
            price_set_id=str(new_id()),
            scope=scope,
            scope_code=scope_code,
            effective_from=effective_from,
            currency=chain.currency,
            prices=tuple(sorted(priced.items())),
            created_at=now,
        )
        scheduled = await store.prices_at(scope, scope_code, effective_from)
        if scheduled:
            same_set = {p.price_set_id for p in scheduled}
            existing = await store.price_set(next(iter(same_set)) or "")
            if (
                len(same_set) == 1
                and existing is not None
                and existing.prices == price_set.prices
                and len(scheduled) == len(price_set.prices)
            ):
                # The same set again (a retried request): answered, nothing written.
                return PublishedPriceSet(existing, "upcoming", created=False)
            if not request.replace:
                held = sorted(f"{p.grade}={p.milli_minor_per_litre}" for p in scheduled)
                raise PriceSetExists(
                    f"prices for {scope.value} {scope_code} at {effective_from.isoformat()} "
                    "are already scheduled; send replace: true to replace them",
                    problems=[f"already scheduled: {', '.join(held)}"],
                    price_set_id=existing.price_set_id if existing else None,
                )
            await store.withdraw_prices_at(scope, scope_code, effective_from, now)
        await store.add_price_set(price_set)
        revision = await _announce(
            uow,
            store,
            now,
            chain.code,
            stations=[s.code for s in stations_in_scope(stations, scope, scope_code)],
            price_set_id=price_set.price_set_id,
        )
        await uow.record_audit(
            actor=actor,
            action="network.price_set.publish",
            target=f"price_set:{price_set.price_set_id}",
            details={
                "revision": revision,
                "scope": scope.value,
                "scope_code": scope_code,
                "effective_from": effective_from.isoformat(),
                "prices": dict(price_set.prices),
                "replaced": bool(scheduled),
            },
        )
    return PublishedPriceSet(price_set, "upcoming", created=True)


async def _announce(
    uow: UnitOfWork,
    store: NetworkStore,
    now: datetime,
    chain_code: str,
    *,
    stations: list[str],
    price_set_id: str,
) -> int:
    """A new network revision, so every edge in scope fetches a snapshot with the change."""
    revision = await store.bump_revision(now)
    await uow.emit(
        Envelope(
            type=event_type("network", "revision.published"),
            source="/forecourt/network",
            subject=chain_code,
            time=now,
            data={"revision": revision, "stations": stations, "price_set_id": price_set_id},
        )
    )
    return revision


async def withdraw_price_set(
    db: Database, price_set_id: str, *, actor: str = "api"
) -> PublishedPriceSet:
    """Withdraw a set not yet in force (its prices leave every snapshot); a set in force is
    history that sales ran under and is refused (409). Withdrawing twice answers the same."""
    now = db.clock.now()
    async with db.begin() as uow:
        store = NetworkStore(uow.conn)
        found = await store.price_set(price_set_id)
        if found is None:
            raise UnknownPriceSet(f"unknown price set {price_set_id!r}")
        if found.withdrawn_at is not None:
            return PublishedPriceSet(found, "withdrawn", created=False)
        if found.effective_from <= now:
            raise PriceSetInForce(
                f"price set {price_set_id} has been in force since "
                f"{found.effective_from.isoformat()}: publish a new set instead",
                problems=["a set in force (or superseded) cannot be withdrawn"],
            )
        await store.withdraw_price_set(price_set_id, now)
        stations = await store.stations()
        chain = await store.chain_row()
        revision = await _announce(
            uow,
            store,
            now,
            chain.code if chain else "",
            stations=[s.code for s in stations_in_scope(stations, found.scope, found.scope_code)],
            price_set_id=price_set_id,
        )
        await uow.record_audit(
            actor=actor,
            action="network.price_set.withdraw",
            target=f"price_set:{price_set_id}",
            details={"revision": revision},
        )
        withdrawn = await store.price_set(price_set_id)
    assert withdrawn is not None
    return PublishedPriceSet(withdrawn, "withdrawn", created=False)


def _statuses(sets: list[PriceSet], now: datetime) -> list[tuple[PriceSet, str]]:
    latest: dict[tuple[PriceScope, str], datetime] = {}
    for ps in sets:
        if ps.withdrawn_at is None and ps.effective_from <= now:
            key = (ps.scope, ps.scope_code)
            latest[key] = max(latest.get(key, ps.effective_from), ps.effective_from)
    return [(ps, ps.status(now, latest.get((ps.scope, ps.scope_code)))) for ps in sets]


async def list_price_sets(
    db: Database,
    *,
    scope: PriceScope | None = None,
    scope_code: str | None = None,
    every: bool = False,
) -> list[tuple[PriceSet, str]]:
    """The sets upcoming and in force (``every``: superseded and withdrawn ones too), by
    instant, each with its status."""
    async with db.connection() as conn:
        sets = await NetworkStore(conn).price_sets()
    return [
        (ps, status)
        for ps, status in _statuses(sets, db.clock.now())
        if (scope is None or ps.scope is scope)
        and (scope_code is None or ps.scope_code == scope_code)
        and (every or status in ("upcoming", "in_force"))
    ]


async def get_price_set(db: Database, price_set_id: str) -> tuple[PriceSet, str]:
    async with db.connection() as conn:
        sets = await NetworkStore(conn).price_sets()
    for ps, status in _statuses(sets, db.clock.now()):
        if ps.price_set_id == price_set_id:
            return ps, status
    raise UnknownPriceSet(f"unknown price set {price_set_id!r}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML whose mappings refuse a key given twice (``safe_load`` would keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def duplicate_keys(body: bytes) -> list[str]:
    """Every key a JSON document gives twice in one object (``json`` would keep the last:
    a grade priced twice must be refused, not silently priced at its second figure)."""
    found: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in items]
        found.extend(sorted({key for key in keys if keys.count(key) > 1}))
        return dict(items)

    try:
        json.loads(body, object_pairs_hook=pairs)
    except ValueError:
        return []  # not JSON: the request's own validation says so
    return found


def refuse_duplicate_grades(body: bytes) -> None:
    """PriceSetInvalid when the body gives a key (a grade) twice."""
    twice = duplicate_keys(body)
    if twice:
        raise _refused([f"{key}: given twice" for key in twice])


def load_price_set_file(path: Path) -> PriceSetFile:
    """A price set from a YAML or JSON file (the body ``POST /v1/network/price-sets`` takes),
    or PriceSetInvalid listing every problem with its shape."""
    try:
        document = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except (OSError, yaml.YAMLError) as exc:
        reason = str(exc).replace("\n", " ")
        raise PriceSetInvalid(f"cannot read {path}: {reason}", problems=[reason]) from None
    try:
        return PriceSetFile.model_validate(document)
    except ValidationError as exc:
        found = [f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in exc.errors()]
        raise _refused(found) from None
