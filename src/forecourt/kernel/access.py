"""Who is asking and what they may do: the vocabulary every context and the HTTP layer share.

A :class:`Principal` is an authenticated caller: a staff member (``user``), a service account
(``service``), a station (its credential) or a station terminal. It holds :class:`Grant` s, each
a role's permissions over a :class:`Scope` (the chain, one region or one station). A route
declares a :class:`Policy`: the permission it needs and where its target station comes from;
the caller may call it when one of their grants holds the permission over that station.

Roles and who holds them are the identity context's; this module knows only permissions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Permission(StrEnum):
    """Every permission a route can ask for. ``<context>:<what>``."""

    SALES_READ = "sales:read"
    SALES_UPLOAD = "sales:upload"  # a station's own uploads
    NETWORK_READ = "network:read"
    NETWORK_SNAPSHOT = "network:snapshot"  # a station's own snapshot
    PRICES_WRITE = "network:prices:write"
    DEVICES_READ = "devices:read"
    PUMPS_COMMAND = "pumps:command"
    PUMPS_EMERGENCY_STOP = "pumps:emergency-stop"
    PUMPS_MAINTAIN = "pumps:maintain"
    STATION_READ = "station:read"  # an edge node's status, tanks and journal figures
    USERS_READ = "identity:users:read"
    USERS_MANAGE = "identity:users:manage"
    AUDIT_READ = "audit:read"
    AUDIT_UPLOAD = "audit:upload"  # a station's own edge audit records
    METRICS_READ = "metrics:read"
    PAYMENTS_READ = "payments:read"
    PAYMENTS_CHARGE = "payments:charge"  # take a payment at the counter (code or cash)
    PAYMENTS_REFUND = "payments:refund"
    PAYMENTS_VOID = "payments:void"  # reverse an unconfirmed payment, void a same-day one
    PAYMENTS_UPLOAD = "payments:upload"  # a station's own cash taken while HQ was away
    SIGNED_IN = "signed-in"  # any authenticated caller of the route's kinds, anywhere


# What a station's credential allows (its own uploads, audit records, snapshot and offline
# cash payments), and nothing staff hold.
STATION_PERMISSIONS = frozenset(
    {
        Permission.SALES_UPLOAD,
        Permission.AUDIT_UPLOAD,
        Permission.NETWORK_SNAPSHOT,
        Permission.PAYMENTS_UPLOAD,
    }
)


class Level(StrEnum):
    CHAIN = "chain"
    REGION = "region"
    STATION = "station"


class PrincipalKind(StrEnum):
    USER = "user"
    SERVICE = "service"  # a service account (client credentials): integrations, scrapers
    STATION = "station"  # a station's credential: its edge node's uploads and snapshot
    TERMINAL = "terminal"  # a terminal at a station (the edge's terminal tokens)


STAFF = frozenset({PrincipalKind.USER, PrincipalKind.SERVICE})


@dataclass(frozen=True)
class Scope:
    """Where a grant holds: the whole chain, one region (``code``) or one station."""

    level: Level
    code: str = ""

    @classmethod
    def chain(cls) -> Scope:
        return cls(Level.CHAIN)

    @classmethod
    def region(cls, code: str) -> Scope:
        return cls(Level.REGION, code)

    @classmethod
    def station(cls, code: str) -> Scope:
        return cls(Level.STATION, code)

    @classmethod
    def parse(cls, text: str) -> Scope:
        """``chain``, ``region:NORTH`` or ``station:S001``; ValueError otherwise."""
        level, _, code = text.partition(":")
        try:
            parsed = Level(level)
        except ValueError:
            raise ValueError(
                f"unknown scope {text!r}: chain, region:CODE or station:CODE"
            ) from None
        if (parsed is Level.CHAIN) != (not code):
            raise ValueError(f"unknown scope {text!r}: chain, region:CODE or station:CODE")
        return cls(parsed, code)

    def __str__(self) -> str:
        return self.level.value if self.level is Level.CHAIN else f"{self.level}:{self.code}"

    def covers(self, station: str | None, region: str | None) -> bool:
        """Whether this scope holds over ``station`` (in ``region``); ``station`` None means
        the whole chain (a route over every station), which only the chain scope covers."""
        if self.level is Level.CHAIN:
            return True
        if station is None:
            return False
        if self.level is Level.STATION:
            return self.code == station
        return region is not None and self.code == region


@dataclass(frozen=True)
class Grant:
    role: str
    scope: Scope
    permissions: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Principal:
    kind: PrincipalKind
    subject: str  # a user's or service account's name, a station code, a terminal's name
    grants: tuple[Grant, ...] = ()
    session: str | None = None  # the token's id, for the audit trail

    @property
    def actor(self) -> str:
        """How the audit trail names this caller: ``user:alice``, ``station:S001``."""
        return f"{self.kind}:{self.subject}"

    def allows(
        self, permission: str, *, station: str | None = None, region: str | None = None
    ) -> bool:
        return any(
            permission in g.permissions and g.scope.covers(station, region) for g in self.grants
        )

    def scopes_for(self, permission: str) -> tuple[Scope, ...]:
        return tuple(g.scope for g in self.grants if permission in g.permissions)


@dataclass(frozen=True)
class Policy:
    """What a route needs. ``permission`` None: open to anyone (``/health``, sign-in).

    ``station``: where the route's target station is read from, ``path:NAME`` or
    ``query:NAME`` (absent or empty query: the whole chain), ``self`` (the station an edge
    node runs); None: the route is chain-wide. ``anywhere``: the permission held at any
    scope will do (a catalogue every station reads, such as the grades).
    ``kinds``: which kinds of principal may hold it (a station credential cannot read
    sales; staff cannot upload a station's sales).
    """

    permission: str | None
    station: str | None = None
    kinds: frozenset[PrincipalKind] = field(default=STAFF)
    anywhere: bool = False

    @classmethod
    def open(cls) -> Policy:
        return cls(None)

    @property
    def is_open(self) -> bool:
        return self.permission is None

    def __post_init__(self) -> None:
        if self.station is not None and self.station != "self":
            where, _, name = self.station.partition(":")
            if where not in ("path", "query") or not name:
                raise ValueError(f"policy station {self.station!r}: path:NAME, query:NAME or self")
