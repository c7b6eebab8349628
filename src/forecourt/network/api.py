"""HTTP routes of ``network``: read API for staff and the station snapshot for edges."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from forecourt.infra.access import require
from forecourt.infra.db import Database
from forecourt.infra.http import error_responses
from forecourt.kernel.access import Permission, Policy, PrincipalKind
from forecourt.kernel.money import UnitPrice, currency_exponent
from forecourt.network.contracts import StationSnapshot
from forecourt.network.domain import (
    Price,
    PriceScope,
    PriceSet,
    UnknownPrice,
    UnknownStation,
    effective_prices,
)
from forecourt.network.handlers import (
    PriceSetFile,
    build_snapshot,
    get_price_set,
    list_price_sets,
    publish_price_set,
    refuse_duplicate_grades,
    withdraw_price_set,
)
from forecourt.network.store import NetworkStore


class PriceSetPrice(BaseModel):
    model_config = ConfigDict(frozen=True)

    price: str = Field(description="major units per litre, exact", examples=["7.89"])
    milli_minor_per_litre: int


class PriceSetPublic(BaseModel):
    """A published price set and where it stands now."""

    model_config = ConfigDict(frozen=True)

    price_set_id: str
    scope: PriceScope
    scope_code: str
    effective_from: datetime
    currency: str
    status: str = Field(description="upcoming, in_force, superseded or withdrawn")
    created_at: datetime
    withdrawn_at: datetime | None
    prices: dict[str, PriceSetPrice]


class PriceSetList(BaseModel):
    model_config = ConfigDict(frozen=True)

    items: list[PriceSetPublic]


def _major(milli_minor_per_litre: int, currency: str) -> str:
    """A price as an operator writes it: the currency's decimals, more only where it has them
    (789 000 CNY milli-fen → "7.89", 145 900 EUR → "1.459")."""
    exact = UnitPrice(milli_minor_per_litre, currency).to_decimal()
    usual = exact.quantize(Decimal(1).scaleb(-currency_exponent(currency)))
    return f"{usual if usual == exact else exact.normalize():f}"


def _public(ps: PriceSet, status: str) -> PriceSetPublic:
    return PriceSetPublic(
        price_set_id=ps.price_set_id,
        scope=ps.scope,
        scope_code=ps.scope_code,
        effective_from=ps.effective_from,
        currency=ps.currency,
        status=status,
        created_at=ps.created_at,
        withdrawn_at=ps.withdrawn_at,
        prices={
            grade: PriceSetPrice(price=_major(mmu, ps.currency), milli_minor_per_litre=mmu)
            for grade, mmu in ps.prices
        },
    )


PriceSetId = Annotated[str, Path(min_length=1, max_length=64)]
PriceId = Annotated[str, Path(min_length=1, max_length=64)]


def _price_json(p: Price) -> dict[str, Any]:
    return {
        "price_id": p.price_id,
        "grade": p.grade,
        "scope": p.scope.value,
        "scope_code": p.scope_code,
        "milli_minor_per_litre": p.milli_minor_per_litre,
        "currency": p.currency,
        "effective_from": p.effective_from.isoformat(),
        "price_set_id": p.price_set_id,
    }


# The station's own snapshot (its credential); staff read the network where they may: the
# station list is chain-wide, one station needs it for that station, and the catalogue
# (grades, prices, price sets) is read by anyone holding network:read anywhere.
SNAPSHOT = Policy(
    Permission.NETWORK_SNAPSHOT, station="path:code", kinds=frozenset({PrincipalKind.STATION})
)
READ_CHAIN = Policy(Permission.NETWORK_READ)
READ_STATION = Policy(Permission.NETWORK_READ, station="path:code")
READ_CATALOGUE = Policy(Permission.NETWORK_READ, anywhere=True)
WRITE_PRICES = Policy(Permission.PRICES_WRITE)
STAFF_ERRORS = error_responses(401, 403, 422, 429)


def build_router(db: Database) -> APIRouter:
    router = APIRouter(tags=["network"])

    @router.get(
        "/v1/stations/{code}/snapshot",
        response_model=StationSnapshot,
        dependencies=[require(SNAPSHOT)],
        responses=error_responses(401, 403, 404, 422, 429),
    )
    async def station_snapshot(code: str) -> StationSnapshot:
        """The versioned snapshot an edge node runs from (its station's credential only)."""
        return await build_snapshot(db, code, db.clock.now())

    @router.get("/v1/network/stations", dependencies=[require(READ_CHAIN)], responses=STAFF_ERRORS)
    async def list_stations() -> list[dict[str, Any]]:
        async with db.connection() as conn:
            store = NetworkStore(conn)
            out = []
            for code in await store.station_codes():
                st = await store.station(code)
                if st is None:
                    continue
                out.append(
                    {
                        "code": st.code,
                        "name": st.name,
                        "region": st.region,
                        "timezone": st.timezone,
                        "business_day_cutoff": st.business_day_cutoff.isoformat(),
                        "dispensers": len(st.dispensers),
                        "fuelling_points": sum(len(d.fuelling_points) for d in st.dispensers),
                    }
                )
            return out

    @router.get(
        "/v1/network/stations/{code}",
        dependencies=[require(READ_STATION)],
        responses={**STAFF_ERRORS, **error_responses(404)},
    )
    async def get_station(code: str) -> dict[str, Any]:
        async with db.connection() as conn:
            store = NetworkStore(conn)
            st = await store.station(code)
            if st is None:
                raise UnknownStation(f"unknown station {code!r}")
            prices = effective_prices(
                await store.prices(), station=st.code, region=st.region, at=db.clock.now()
            )
        return {
            "code": st.code,
            "name": st.name,
            "region": st.region,
            "timezone": st.timezone,
            "business_day_cutoff": st.business_day_cutoff.isoformat(),
            "shift_starts": [t.isoformat() for t in st.shift_starts],
            "tanks": [t.__dict__ for t in st.tanks],
            "dispensers": [
                {
                    "number": d.number,
                    "model": d.model,
                    "fuelling_points": [
                        {"number": fp.number, "nozzles": [n.__dict__ for n in fp.nozzles]}
                        for fp in d.fuelling_points
                    ],
                }
                for d in st.dispensers
            ],
            "prices_now": {
                g: {
                    "milli_minor_per_litre": p.milli_minor_per_litre,
                    "currency": p.currency,
                    "effective_from": p.effective_from.isoformat(),
                    "scope": p.scope.value,
                    "price_set_id": p.price_set_id,
                }
                for g, p in sorted(prices.items())
            },
        }

    @router.get(
        "/v1/network/grades", dependencies=[require(READ_CATALOGUE)], responses=STAFF_ERRORS
    )
    async def list_grades() -> list[dict[str, str]]:
        async with db.connection() as conn:
            return [g.__dict__ for g in await NetworkStore(conn).grades()]

    @router.get(
        "/v1/network/prices", dependencies=[require(READ_CATALOGUE)], responses=STAFF_ERRORS
    )
    async def list_prices() -> list[dict[str, Any]]:
        async with db.connection() as conn:
            prices = await NetworkStore(conn).prices()
        return [_price_json(p) for p in prices]

    @router.get(
        "/v1/network/prices/{price_id}",
        dependencies=[require(READ_CATALOGUE)],
        responses={**STAFF_ERRORS, **error_responses(404)},
    )
    async def one_price(price_id: PriceId) -> dict[str, Any]:
        """One price by its id: a sale's ``price_version`` names the price it ran under, and
        this says which price set (if any) that price came from."""
        async with db.connection() as conn:
            found = await NetworkStore(conn).price(price_id)
        if found is None:
            raise UnknownPrice(f"no price {price_id!r}", price_id=price_id)
        return _price_json(found)

    @router.post(
        "/v1/network/price-sets",
        status_code=201,
        response_model=PriceSetPublic,
        dependencies=[require(WRITE_PRICES)],
        responses={
            200: {
                "model": PriceSetPublic,
                "description": "The same set was already published: answered, nothing changed",
            },
            **STAFF_ERRORS,
            **error_responses(400, 409, 413),
        },
    )
    async def publish(body: PriceSetFile, request: Request) -> Any:
        """Publish a price set ahead of its instant (see docs/prices.md for the rules)."""
        refuse_duplicate_grades(await request.body())
        published = await publish_price_set(db, body, actor=request.state.principal.actor)
        public = _public(published.price_set, published.status)
        if published.created:
            return public
        return JSONResponse(public.model_dump(mode="json"), status_code=200)

    @router.get(
        "/v1/network/price-sets",
        response_model=PriceSetList,
        dependencies=[require(READ_CATALOGUE)],
        responses=STAFF_ERRORS,
    )
    async def price_sets(
        scope: PriceScope | None = None,
        scope_code: Annotated[str | None, Query(max_length=40)] = None,
        every: bool = False,
    ) -> PriceSetList:
        """Sets upcoming and in force (``every=true``: superseded and withdrawn ones too)."""
        found = await list_price_sets(db, scope=scope, scope_code=scope_code, every=every)
        return PriceSetList(items=[_public(ps, status) for ps, status in found])

    @router.get(
        "/v1/network/price-sets/{price_set_id}",
        response_model=PriceSetPublic,
        dependencies=[require(READ_CATALOGUE)],
        responses={**STAFF_ERRORS, **error_responses(404)},
    )
    async def price_set(price_set_id: PriceSetId) -> PriceSetPublic:
        return _public(*await get_price_set(db, price_set_id))

    @router.delete(
        "/v1/network/price-sets/{price_set_id}",
        response_model=PriceSetPublic,
        dependencies=[require(WRITE_PRICES)],
        responses={**STAFF_ERRORS, **error_responses(404, 409)},
    )
    async def withdraw(price_set_id: PriceSetId, request: Request) -> PriceSetPublic:
        """Withdraw a set not yet in force; one in force is refused (409)."""
        withdrawn = await withdraw_price_set(db, price_set_id, actor=request.state.principal.actor)
        return _public(withdrawn.price_set, withdrawn.status)

    return router
