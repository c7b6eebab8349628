"""Persistence of the station network (SQLAlchemy Core; SQLite and PostgreSQL alike)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from datetime import datetime, time
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from forecourt.infra.db import UTCDateTime
from forecourt.kernel.ids import new_id
from forecourt.kernel.money import Rounding
from forecourt.network.domain import (
    Chain,
    Dispenser,
    DispenserModel,
    FuellingPoint,
    Grade,
    Nozzle,
    Price,
    PriceScope,
    PriceSet,
    PriceSetExists,
    Station,
    Tank,
)

md = sa.MetaData(schema="network")

revision_t = sa.Table(
    "network_revision",
    md,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)
chain_t = sa.Table(
    "chain",
    md,
    sa.Column("code", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
)
region_t = sa.Table(
    "region",
    md,
    sa.Column("code", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
)
grade_t = sa.Table(
    "grade",
    md,
    sa.Column("code", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("kind", sa.String(40), nullable=False),
)
model_t = sa.Table(
    "dispenser_model",
    md,
    sa.Column("code", sa.String(80), primary_key=True),
    sa.Column("amount_resolution_minor", sa.Integer, nullable=False),
    sa.Column("rounding", sa.String(20), nullable=False),
    sa.Column("volume_decimals", sa.Integer, nullable=False),
)
station_t = sa.Table(
    "station",
    md,
    sa.Column("code", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("region_code", sa.String(40), nullable=False),
    sa.Column("timezone", sa.String(64), nullable=False),
    sa.Column("business_day_cutoff", sa.String(8), nullable=False),
    sa.Column("shift_starts", sa.Text, nullable=False),
)
tank_t = sa.Table(
    "tank",
    md,
    sa.Column("station_code", sa.String(40), primary_key=True),
    sa.Column("number", sa.Integer, primary_key=True),
    sa.Column("grade", sa.String(40), nullable=False),
    sa.Column("capacity_ml", sa.BigInteger, nullable=False),
)
dispenser_t = sa.Table(
    "dispenser",
    md,
    sa.Column("station_code", sa.String(40), primary_key=True),
    sa.Column("number", sa.Integer, primary_key=True),
    sa.Column("model", sa.String(80), nullable=False),
)
fp_t = sa.Table(
    "fuelling_point",
    md,
    sa.Column("station_code", sa.String(40), primary_key=True),
    sa.Column("number", sa.Integer, primary_key=True),
    sa.Column("dispenser", sa.Integer, nullable=False),
)
nozzle_t = sa.Table(
    "nozzle",
    md,
    sa.Column("station_code", sa.String(40), primary_key=True),
    sa.Column("fuelling_point", sa.Integer, primary_key=True),
    sa.Column("number", sa.Integer, primary_key=True),
    sa.Column("grade", sa.String(40), nullable=False),
    sa.Column("tank", sa.Integer, nullable=False),
)
price_t = sa.Table(
    "price",
    md,
    sa.Column("price_id", sa.String(64), primary_key=True),
    sa.Column("grade", sa.String(40), nullable=False),
    sa.Column("scope", sa.String(20), nullable=False),
    sa.Column("scope_code", sa.String(40), nullable=False),
    sa.Column("milli_minor_per_litre", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("effective_from", UTCDateTime(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("price_set_id", sa.String(64)),  # network_0002; NULL from a chain file
    sa.UniqueConstraint("grade", "scope", "scope_code", "effective_from"),
    sa.Index("ix_price_price_set_id", "price_set_id"),
)
price_set_t = sa.Table(
    "price_set",
    md,
    sa.Column("price_set_id", sa.String(64), primary_key=True),
    sa.Column("scope", sa.String(20), nullable=False),
    sa.Column("scope_code", sa.String(40), nullable=False),
    sa.Column("effective_from", UTCDateTime(), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("prices", sa.Text, nullable=False),  # JSON {grade: milli-minor per litre}
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("withdrawn_at", UTCDateTime()),
)
credential_t = sa.Table(
    "station_credential",
    md,
    sa.Column("key_id", sa.String(64), primary_key=True),
    sa.Column("station_code", sa.String(40), nullable=False),
    sa.Column("secret_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    # Valid until revoked_at (a rotation sets it ahead: the grace period) and expires_at.
    sa.Column("revoked_at", UTCDateTime()),
    sa.Column("expires_at", UTCDateTime()),
)
credential_revision_t = sa.Table(
    "credential_revision",
    md,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("revision", sa.BigInteger, nullable=False),
)


class SecretMatch(NamedTuple):
    """A credential found valid: its station and region, until when it is valid (None for
    no end), and the credential revision it was read at."""

    code: str
    region: str
    until: datetime | None
    revision: int


def credential_valid_at(now: datetime) -> sa.ColumnElement[bool]:
    """The one rule for a credential valid at ``now``: neither revoked nor expired by then."""
    c = credential_t.c
    return sa.and_(
        sa.or_(c.revoked_at.is_(None), c.revoked_at > now),
        sa.or_(c.expires_at.is_(None), c.expires_at > now),
    )


def hash_secret(token: str) -> str:
    """Station credentials are 256-bit random tokens, so one SHA-256 suffices to store them
    safely (no dictionary to attack) and keeps authentication cheap on the ingest hot path."""
    return hashlib.sha256(token.encode()).hexdigest()


def _hhmm(value: time) -> str:
    return value.strftime("%H:%M")


# The rows a chain is stored as, one builder per table: saving writes them and
# ``NetworkStore.holds`` compares them, so the two cannot disagree on what a change is.


def _chain_row(chain: Chain) -> dict[str, object]:
    return {"code": chain.code, "name": chain.name, "currency": chain.currency}


def _region_rows(chain: Chain) -> list[dict[str, object]]:
    return [{"code": code, "name": name} for code, name in chain.regions]


def _grade_rows(chain: Chain) -> list[dict[str, object]]:
    return [{"code": g.code, "name": g.name, "kind": g.kind} for g in chain.grades]


def _model_rows(chain: Chain) -> list[dict[str, object]]:
    return [
        {
            "code": m.code,
            "amount_resolution_minor": m.amount_resolution_minor,
            "rounding": m.rounding.value,
            "volume_decimals": m.volume_decimals,
        }
        for m in chain.dispenser_models
    ]


def _station_rows(st: Station) -> list[tuple[sa.Table, list[dict[str, object]]]]:
    """A station's rows per table, parents before children (the order to insert them)."""
    station: dict[str, object] = {
        "code": st.code,
        "name": st.name,
        "region_code": st.region,
        "timezone": st.timezone,
        "business_day_cutoff": _hhmm(st.business_day_cutoff),
        "shift_starts": json.dumps([_hhmm(t) for t in st.shift_starts]),
    }
    tanks: list[dict[str, object]] = [
        {
            "station_code": st.code,
            "number": t.number,
            "grade": t.grade,
            "capacity_ml": t.capacity_ml,
        }
        for t in st.tanks
    ]
    dispensers: list[dict[str, object]] = [
        {"station_code": st.code, "number": d.number, "model": d.model} for d in st.dispensers
    ]
    fuelling_points: list[dict[str, object]] = [
        {"station_code": st.code, "number": fp.number, "dispenser": d.number}
        for d in st.dispensers
        for fp in d.fuelling_points
    ]
    nozzles: list[dict[str, object]] = [
        {
            "station_code": st.code,
            "fuelling_point": fp.number,
            "number": n.number,
            "grade": n.grade,
            "tank": n.tank,
        }
        for d in st.dispensers
        for fp in d.fuelling_points
        for n in fp.nozzles
    ]
    return [
        (station_t, [station]),
        (tank_t, tanks),
        (dispenser_t, dispensers),
        (fp_t, fuelling_points),
        (nozzle_t, nozzles),
    ]


class NetworkStore:
    """Reads and writes of the network tables on one connection."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def revision(self) -> int:
        value = await self.conn.scalar(sa.select(revision_t.c.revision).where(revision_t.c.id == 1))
        return int(value or 0)

    async def bump_revision(self, now: datetime) -> int:
        current = await self.revision()
        if current == 0:
            await self.conn.execute(revision_t.insert().values(id=1, revision=1, updated_at=now))
            return 1
        await self.conn.execute(
            revision_t.update()
            .where(revision_t.c.id == 1)
            .values(revision=current + 1, updated_at=now)
        )
        return current + 1

    async def holds(self, chain: Chain) -> bool:
        """Whether saving ``chain`` would change nothing stored: the same chain, regions,
        grades, models and equipment of the stations it names, and no price it lacks.

        Compares the very rows :meth:`save_chain` writes, so both agree on what a change is."""
        chain_row = _chain_row(chain)
        if not await self._holds_rows(chain_t, [chain_row]):
            return False
        for table, rows in (
            (region_t, _region_rows(chain)),
            (grade_t, _grade_rows(chain)),
            (model_t, _model_rows(chain)),
        ):
            for row in rows:
                if not await self._holds_rows(table, [row], table.c.code == row["code"]):
                    return False
        for st in chain.stations:
            for table, rows in _station_rows(st):
                column = table.c.code if table is station_t else table.c.station_code
                if not await self._holds_rows(table, rows, column == st.code):
                    return False
        for p in chain.prices:
            if not await self._has_price(p):
                return False
        return True

    async def _holds_rows(
        self, table: sa.Table, rows: list[dict[str, object]], *where: sa.ColumnElement[bool]
    ) -> bool:
        """Whether ``table`` (restricted by ``where``) holds exactly ``rows``, in any order."""
        found = await self.conn.execute(sa.select(table).where(*where))
        expected = [tuple(row[c.name] for c in table.c) for row in rows]
        return Counter(tuple(r) for r in found) == Counter(expected)

    async def _has_price(self, p: Price) -> bool:
        """Prices are append-only: one is known by its grade, scope and ``effective_from``."""
        count = await self.conn.scalar(
            sa.select(sa.func.count())
            .select_from(price_t)
            .where(
                price_t.c.grade == p.grade,
                price_t.c.scope == p.scope.value,
                price_t.c.scope_code == p.scope_code,
                price_t.c.effective_from == p.effective_from,
            )
        )
        return bool(count)

    async def save_chain(self, chain: Chain, now: datetime) -> int:
        """Upsert the chain's master data; returns how many new prices were added.

        Stations named in ``chain`` have their equipment replaced as a whole (the file is the
        truth for them); stations not named are left alone; prices are append-only.
        """
        c = self.conn
        await c.execute(chain_t.delete())
        await c.execute(chain_t.insert().values(**_chain_row(chain)))
        for table, rows in (
            (region_t, _region_rows(chain)),
            (grade_t, _grade_rows(chain)),
            (model_t, _model_rows(chain)),
        ):
            for row in rows:
                await self._replace_by_code(table, **row)
        for st in chain.stations:
            await self._replace_station(st)
        added = 0
        for p in chain.prices:
            if await self._has_price(p):
                continue
            await c.execute(
                price_t.insert().values(
                    price_id=p.price_id,
                    grade=p.grade,
                    scope=p.scope.value,
                    scope_code=p.scope_code,
                    milli_minor_per_litre=p.milli_minor_per_litre,
                    currency=p.currency,
                    effective_from=p.effective_from,
                    created_at=now,
                )
            )
            added += 1
        return added

    async def _replace_by_code(self, table: sa.Table, **values: object) -> None:
        """Upsert a row keyed by ``code`` the same way on SQLite and PostgreSQL."""
        await self.conn.execute(table.delete().where(table.c.code == values["code"]))
        await self.conn.execute(table.insert().values(**values))

    async def _replace_station(self, st: Station) -> None:
        c = self.conn
        for table in (nozzle_t, fp_t, dispenser_t, tank_t, station_t):
            column = table.c.code if table is station_t else table.c.station_code
            await c.execute(table.delete().where(column == st.code))
        for table, rows in _station_rows(st):
            if rows:
                await c.execute(table.insert(), rows)

    async def add_credential(
        self,
        station_code: str,
        key_id: str,
        token: str,
        now: datetime,
        expires_at: datetime | None = None,
    ) -> None:
        await self.conn.execute(
            credential_t.insert().values(
                key_id=key_id,
                station_code=station_code,
                secret_sha256=hash_secret(token),
                created_at=now,
                expires_at=expires_at,
            )
        )

    async def station_for_secret(self, secret_sha256: str, now: datetime) -> SecretMatch | None:
        """The station, region and end of a credential valid at ``now`` (else None), with the
        credential revision read in the same statement."""
        c = credential_t.c
        r = credential_revision_t.c
        revision = sa.select(r.revision).where(r.id == 1).scalar_subquery()
        row = (
            await self.conn.execute(
                sa.select(
                    station_t.c.code,
                    station_t.c.region_code,
                    c.revoked_at,
                    c.expires_at,
                    revision.label("credential_revision"),
                )
                .select_from(credential_t.join(station_t, station_t.c.code == c.station_code))
                .where(c.secret_sha256 == secret_sha256, credential_valid_at(now))
            )
        ).first()
        if row is None:
            return None
        ends = [t for t in (row.revoked_at, row.expires_at) if t is not None]
        return SecretMatch(
            row.code,
            row.region_code,
            min(ends) if ends else None,
            int(row.credential_revision or 0),
        )

    async def credentials(self, station_code: str, now: datetime | None = None) -> list[sa.Row]:
        """A station's credentials, oldest first (never their secrets); given ``now``, each
        row's ``valid`` says whether it is valid then (the rule authentication applies)."""
        c = credential_t.c
        columns: list[sa.ColumnElement[Any]] = [c.key_id, c.created_at, c.revoked_at, c.expires_at]
        if now is not None:
            columns.append(credential_valid_at(now).label("valid"))
        rows = await self.conn.execute(
            sa.select(*columns)
            .where(c.station_code == station_code)
            .order_by(c.created_at, c.key_id)
        )
        return list(rows)

    async def end_credentials(
        self, station_code: str, at: datetime, *, key_id: str | None = None
    ) -> list[str]:
        """Make the station's credentials (or one) invalid from ``at``, keeping an earlier
        end; the key ids it changed. Raises the credential revision."""
        c = credential_t.c
        where = [c.station_code == station_code, sa.or_(c.revoked_at.is_(None), c.revoked_at > at)]
        if key_id is not None:
            where.append(c.key_id == key_id)
        changed = [r.key_id for r in await self.conn.execute(sa.select(c.key_id).where(*where))]
        if changed:
            await self.conn.execute(
                credential_t.update().where(c.key_id.in_(changed)).values(revoked_at=at)
            )
        await self.bump_credential_revision()
        return changed

    async def bump_credential_revision(self) -> None:
        r = credential_revision_t.c
        await self.conn.execute(
            credential_revision_t.update().where(r.id == 1).values(revision=r.revision + 1)
        )

    async def credential_revision(self) -> int:
        r = credential_revision_t.c
        found = await self.conn.scalar(sa.select(r.revision).where(r.id == 1))
        return int(found or 0)

    async def chain_row(self) -> sa.Row | None:
        return (await self.conn.execute(sa.select(chain_t))).first()

    async def grades(self) -> list[Grade]:
        rows = await self.conn.execute(sa.select(grade_t).order_by(grade_t.c.code))
        return [Grade(code=r.code, name=r.name, kind=r.kind) for r in rows]

    async def models(self) -> dict[str, DispenserModel]:
        rows = await self.conn.execute(sa.select(model_t))
        return {
            r.code: DispenserModel(
                code=r.code,
                amount_resolution_minor=r.amount_resolution_minor,
                rounding=Rounding(r.rounding),
                volume_decimals=r.volume_decimals,
            )
            for r in rows
        }

    async def station_codes(self) -> list[str]:
        return list(await self.conn.scalars(sa.select(station_t.c.code).order_by(station_t.c.code)))

    async def station(self, code: str) -> Station | None:
        row = (
            await self.conn.execute(sa.select(station_t).where(station_t.c.code == code))
        ).first()
        if row is None:
            return None
        tanks = tuple(
            Tank(number=t.number, grade=t.grade, capacity_ml=t.capacity_ml)
            for t in await self.conn.execute(
                sa.select(tank_t).where(tank_t.c.station_code == code).order_by(tank_t.c.number)
            )
        )
        nozzles: dict[int, list[Nozzle]] = {}
        for n in await self.conn.execute(
            sa.select(nozzle_t)
            .where(nozzle_t.c.station_code == code)
            .order_by(nozzle_t.c.fuelling_point, nozzle_t.c.number)
        ):
            nozzles.setdefault(n.fuelling_point, []).append(
                Nozzle(number=n.number, grade=n.grade, tank=n.tank)
            )
        fps: dict[int, list[FuellingPoint]] = {}
        for fp in await self.conn.execute(
            sa.select(fp_t).where(fp_t.c.station_code == code).order_by(fp_t.c.number)
        ):
            fps.setdefault(fp.dispenser, []).append(
                FuellingPoint(number=fp.number, nozzles=tuple(nozzles.get(fp.number, ())))
            )
        dispensers = tuple(
            Dispenser(number=d.number, model=d.model, fuelling_points=tuple(fps.get(d.number, ())))
            for d in await self.conn.execute(
                sa.select(dispenser_t)
                .where(dispenser_t.c.station_code == code)
                .order_by(dispenser_t.c.number)
            )
        )
        starts = tuple(time.fromisoformat(s) for s in json.loads(row.shift_starts))
        return Station(
            code=row.code,
            name=row.name,
            region=row.region_code,
            timezone=row.timezone,
            business_day_cutoff=time.fromisoformat(row.business_day_cutoff),
            shift_starts=starts,
            tanks=tanks,
            dispensers=dispensers,
        )

    async def prices(self) -> list[Price]:
        rows = await self.conn.execute(sa.select(price_t).order_by(price_t.c.effective_from))
        return [_price(r) for r in rows]

    async def price(self, price_id: str) -> Price | None:
        """One price by its id (a sale's ``price_version``), or None."""
        row = (
            await self.conn.execute(sa.select(price_t).where(price_t.c.price_id == price_id))
        ).first()
        return _price(row) if row is not None else None

    # --- price sets ---------------------------------------------------------------------

    async def region_codes(self) -> set[str]:
        return set(await self.conn.scalars(sa.select(region_t.c.code)))

    async def stations(self) -> list[Station]:
        found = [await self.station(code) for code in await self.station_codes()]
        return [s for s in found if s is not None]

    async def prices_at(
        self, scope: PriceScope, scope_code: str, effective_from: datetime
    ) -> list[Price]:
        """The prices stored for one scope at one instant (from a set or a chain file)."""
        return [
            p
            for p in await self.prices()
            if p.scope is scope
            and p.scope_code == scope_code
            and p.effective_from == effective_from
        ]

    async def add_price_set(self, price_set: PriceSet) -> None:
        """Store a set and its price rows; another set for the same scope and instant stored
        meanwhile (the price table's unique key) is :class:`PriceSetExists`."""
        ps = price_set
        try:
            await self.conn.execute(
                price_set_t.insert().values(
                    price_set_id=ps.price_set_id,
                    scope=ps.scope.value,
                    scope_code=ps.scope_code,
                    effective_from=ps.effective_from,
                    currency=ps.currency,
                    prices=json.dumps(dict(ps.prices), sort_keys=True),
                    created_at=ps.created_at,
                )
            )
            await self.conn.execute(
                price_t.insert(),
                [
                    {
                        "price_id": str(new_id()),
                        "grade": grade,
                        "scope": ps.scope.value,
                        "scope_code": ps.scope_code,
                        "milli_minor_per_litre": mmu,
                        "currency": ps.currency,
                        "effective_from": ps.effective_from,
                        "created_at": ps.created_at,
                        "price_set_id": ps.price_set_id,
                    }
                    for grade, mmu in ps.prices
                ],
            )
        except IntegrityError:
            raise PriceSetExists(
                f"prices for {ps.scope.value} {ps.scope_code} at "
                f"{ps.effective_from.isoformat()} were stored meanwhile",
                problems=["another price set for this scope and instant was just published"],
            ) from None

    async def withdraw_prices_at(
        self, scope: PriceScope, scope_code: str, effective_from: datetime, now: datetime
    ) -> None:
        """Take every price of one scope at one instant out of force (a set being replaced,
        or prices a chain file scheduled there); the sets stay on record as withdrawn."""
        await self.conn.execute(
            price_t.delete().where(
                price_t.c.scope == scope.value,
                price_t.c.scope_code == scope_code,
                price_t.c.effective_from == effective_from,
            )
        )
        await self.conn.execute(
            price_set_t.update()
            .where(
                price_set_t.c.scope == scope.value,
                price_set_t.c.scope_code == scope_code,
                price_set_t.c.effective_from == effective_from,
                price_set_t.c.withdrawn_at.is_(None),
            )
            .values(withdrawn_at=now)
        )

    async def withdraw_price_set(self, price_set_id: str, now: datetime) -> None:
        await self.conn.execute(price_t.delete().where(price_t.c.price_set_id == price_set_id))
        await self.conn.execute(
            price_set_t.update()
            .where(price_set_t.c.price_set_id == price_set_id)
            .values(withdrawn_at=now)
        )

    async def price_sets(self) -> list[PriceSet]:
        rows = await self.conn.execute(
            sa.select(price_set_t).order_by(
                price_set_t.c.effective_from, price_set_t.c.price_set_id
            )
        )
        return [_price_set(r) for r in rows]

    async def price_set(self, price_set_id: str) -> PriceSet | None:
        row = (
            await self.conn.execute(
                sa.select(price_set_t).where(price_set_t.c.price_set_id == price_set_id)
            )
        ).first()
        return _price_set(row) if row else None


def _price_set(r: sa.Row) -> PriceSet:
    return PriceSet(
        price_set_id=r.price_set_id,
        scope=PriceScope(r.scope),
        scope_code=r.scope_code,
        effective_from=r.effective_from,
        currency=r.currency,
        prices=tuple(sorted((g, int(v)) for g, v in json.loads(r.prices).items())),
        created_at=r.created_at,
        withdrawn_at=r.withdrawn_at,
    )


def _price(r: Any) -> Price:
    return Price(
        grade=r.grade,
        scope=PriceScope(r.scope),
        scope_code=r.scope_code,
        milli_minor_per_litre=r.milli_minor_per_litre,
        currency=r.currency,
        effective_from=r.effective_from,
        price_id=r.price_id,
        price_set_id=r.price_set_id,
    )
