"""The rules of ``identity``: the role catalogue, where each role may be granted and to whom,
what a grant allows, the username and password rules, and the refresh-token family's state
machine. Free of frameworks."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from forecourt.kernel.access import (
    STATION_PERMISSIONS,
    Grant,
    Level,
    Permission,
    PrincipalKind,
    Scope,
)
from forecourt.kernel.errors import (
    Conflict,
    ForecourtError,
    InvalidValue,
    NotFound,
    TooManyRequests,
    Unauthorized,
)

# --- errors ---------------------------------------------------------------------------------


class UnknownRole(InvalidValue):
    code = "identity.unknown_role"


class ScopeNotAllowed(InvalidValue):
    code = "identity.scope_not_allowed"


class InvalidScope(InvalidValue):
    code = "identity.invalid_scope"


class InvalidUsername(InvalidValue):
    code = "identity.invalid_username"


class UsernameTaken(Conflict):
    code = "identity.username_taken"


class WeakPassword(InvalidValue):
    code = "identity.weak_password"


class UnknownUser(NotFound):
    code = "identity.unknown_user"


class GrantExists(Conflict):
    code = "identity.grant_exists"


class UnknownGrant(NotFound):
    code = "identity.unknown_grant"


class InvalidCredentials(Unauthorized):
    code = "auth.invalid_credentials"


class AccountLocked(TooManyRequests):
    code = "auth.account_locked"


class TooManyFailures(TooManyRequests):
    code = "auth.too_many_failures"


class InvalidToken(Unauthorized):
    code = "auth.invalid_token"


class TokenExpired(Unauthorized):
    code = "auth.token_expired"


class RefreshReused(Unauthorized):
    code = "auth.refresh_reused"


class AccountDisabled(Unauthorized):
    code = "auth.account_disabled"


class UnsupportedGrantType(ForecourtError):
    code = "auth.unsupported_grant_type"
    http_status = 400


class InvalidRequest(ForecourtError):
    code = "auth.invalid_request"
    http_status = 400


# The one message for an unknown user and a wrong password: which it was is not told.
WRONG_CREDENTIALS = "wrong username or password"


# --- roles ----------------------------------------------------------------------------------

P = Permission
USERS = frozenset({PrincipalKind.USER})
SERVICES = frozenset({PrincipalKind.SERVICE})
ALL_LEVELS = frozenset(Level)


@dataclass(frozen=True)
class Role:
    name: str
    description: str
    permissions: frozenset[str]
    levels: frozenset[Level]  # where it may be granted
    kinds: frozenset[PrincipalKind]  # who may hold it

    def __post_init__(self) -> None:
        # Every role holds SIGNED_IN: whoever holds a role is signed in.
        object.__setattr__(self, "permissions", frozenset({*self.permissions, P.SIGNED_IN}))


def _role(
    name: str,
    description: str,
    permissions: Iterable[Permission],
    levels: Iterable[Level],
    kinds: frozenset[PrincipalKind] = USERS,
) -> Role:
    return Role(name, description, frozenset(permissions), frozenset(levels), kinds)


ROLES: dict[str, Role] = {
    r.name: r
    for r in (
        _role(
            "hq_admin",
            "head office administrator: everything staff may do, over the whole chain",
            set(Permission) - STATION_PERMISSIONS,
            [Level.CHAIN],
        ),
        _role(
            "region_manager",
            "reads sales, payments, the network, devices and stations, and who the staff "
            "are; refunds and voids payments",
            [
                P.SALES_READ,
                P.NETWORK_READ,
                P.DEVICES_READ,
                P.STATION_READ,
                P.USERS_READ,
                P.PAYMENTS_READ,
                P.PAYMENTS_REFUND,
                P.PAYMENTS_VOID,
            ],
            [Level.CHAIN, Level.REGION],
        ),
        _role(
            "station_manager",
            "runs a station: reads it, commands its pumps, stops them in an emergency, "
            "takes, refunds and voids payments",
            [
                P.SALES_READ,
                P.NETWORK_READ,
                P.DEVICES_READ,
                P.STATION_READ,
                P.PUMPS_COMMAND,
                P.PUMPS_EMERGENCY_STOP,
                P.PAYMENTS_READ,
                P.PAYMENTS_CHARGE,
                P.PAYMENTS_REFUND,
                P.PAYMENTS_VOID,
            ],
            [Level.STATION],
        ),
        _role(
            "cashier",
            "commands a station's pumps, reads its sales and takes payments at its counter",
            [
                P.PUMPS_COMMAND,
                P.PUMPS_EMERGENCY_STOP,
                P.STATION_READ,
                P.SALES_READ,
                P.PAYMENTS_READ,
                P.PAYMENTS_CHARGE,
            ],
            [Level.STATION],
        ),
        _role(
            "finance",
            "reads sales, payments and the network (prices); refunds payments",
            [P.SALES_READ, P.NETWORK_READ, P.PAYMENTS_READ, P.PAYMENTS_REFUND],
            [Level.CHAIN, Level.REGION],
        ),
        _role(
            "auditor",
            "reads the audit trail, sales, payments, the network, devices and the staff",
            [
                P.AUDIT_READ,
                P.SALES_READ,
                P.NETWORK_READ,
                P.DEVICES_READ,
                P.USERS_READ,
                P.PAYMENTS_READ,
            ],
            ALL_LEVELS,
            USERS | SERVICES,
        ),
        _role(
            "marketing",
            "reads sales and the network",
            [P.SALES_READ, P.NETWORK_READ],
            [Level.CHAIN, Level.REGION],
        ),
        _role(
            "device_technician",
            "maintains pumps and devices; may stop the pumps in an emergency",
            [
                P.DEVICES_READ,
                P.STATION_READ,
                P.PUMPS_MAINTAIN,
                P.PUMPS_EMERGENCY_STOP,
                P.NETWORK_READ,
            ],
            ALL_LEVELS,
        ),
        _role(
            "integration",
            "a service reading sales, the network and devices (read only)",
            [P.SALES_READ, P.NETWORK_READ, P.DEVICES_READ],
            ALL_LEVELS,
            SERVICES,
        ),
        _role(
            "metrics_scraper",
            "a service scraping /metrics",
            [P.METRICS_READ],
            [Level.CHAIN],
            SERVICES,
        ),
    )
}

_LEVEL_HINT = {
    Level.CHAIN: "chain",
    Level.REGION: "--region CODE",
    Level.STATION: "--station CODE",
}
_LEVEL_WORD = {
    Level.CHAIN: "over the chain",
    Level.REGION: "per region",
    Level.STATION: "per station",
}
_LEVEL_ORDER = (Level.CHAIN, Level.REGION, Level.STATION)


def role(name: str) -> Role:
    found = ROLES.get(name)
    if found is None:
        raise UnknownRole(
            f"unknown role {name!r}; roles: {', '.join(sorted(ROLES))}", role=name[:64]
        )
    return found


_CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def parse_scope(text: str) -> Scope:
    """A scope as written (``chain``, ``region:EAST``, ``station:S001``), or InvalidScope."""
    try:
        scope = Scope.parse(text)
    except ValueError as exc:
        raise InvalidScope(str(exc)[:300]) from None
    check_scope(scope)
    return scope


def check_scope(scope: Scope) -> None:
    if scope.level is not Level.CHAIN and not _CODE.fullmatch(scope.code):
        raise InvalidScope(
            f"invalid {scope.level} code {scope.code[:64]!r}: 1-64 letters, digits, '.', '_', '-'"
        )


def check_assignment(role_name: str, scope: Scope, kind: PrincipalKind | str) -> Role:
    """The role, if it may be granted over ``scope`` to a principal of ``kind``; else
    :class:`UnknownRole` or :class:`ScopeNotAllowed` (naming where it may be granted)."""
    found = role(role_name)
    check_scope(scope)
    kind = PrincipalKind(kind)
    if kind not in found.kinds:
        holders = " and ".join(sorted(f"{k}s" for k in found.kinds))
        raise ScopeNotAllowed(
            f"{found.name} is held by {holders} only, not by a {kind}",
            role=found.name,
            kind=str(kind),
        )
    if scope.level not in found.levels:
        levels = [lv for lv in _LEVEL_ORDER if lv in found.levels]
        where = " or ".join(_LEVEL_WORD[lv] for lv in levels)
        hints = ", ".join(_LEVEL_HINT[lv] for lv in levels)
        raise ScopeNotAllowed(
            f"{found.name} is granted {where}: {hints}, not {scope}",
            role=found.name,
            allowed=[str(lv) for lv in levels],
        )
    return found


def grants_for(assignments: Iterable[tuple[str, Scope]]) -> tuple[Grant, ...]:
    """The grants (role, scope and the role's permissions) of role assignments; an unknown
    role raises :class:`UnknownRole`."""
    return tuple(Grant(name, scope, role(name).permissions) for name, scope in assignments)


# --- usernames and passwords ----------------------------------------------------------------

USERNAME = re.compile(r"[a-z0-9._-]{1,64}")
MAX_PASSWORD = 1024
MAX_DISPLAY_NAME = 200


def check_username(username: str) -> str:
    if not isinstance(username, str) or not USERNAME.fullmatch(username):
        shown = username[:64] if isinstance(username, str) else username
        raise InvalidUsername(
            f"invalid username {shown!r}: 1-64 lower-case letters, digits, '.', '_' or '-'",
            field="username",
        )
    return username


def check_display_name(name: str | None) -> str | None:
    if name is None:
        return None
    if len(name) > MAX_DISPLAY_NAME or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidValue(
            f"a display name is at most {MAX_DISPLAY_NAME} printable characters",
            field="display_name",
        )
    return name.strip() or None


def check_password(password: str, min_length: int, *, username: str | None = None) -> None:
    """Refuse a password that is short, the username, or one character repeated."""
    if len(password) > MAX_PASSWORD:
        raise WeakPassword(f"a password is at most {MAX_PASSWORD} characters", field="password")
    if len(password) < min_length:
        raise WeakPassword(f"a password needs at least {min_length} characters", field="password")
    if username is not None and password.casefold() == username.casefold():
        raise WeakPassword("the password cannot be the username", field="password")
    if len(set(password)) == 1:
        raise WeakPassword("the password cannot be one character repeated", field="password")


# --- refresh-token families -----------------------------------------------------------------


class RefreshVerdict(StrEnum):
    ROTATE = "rotate"  # the live token of its family: used now, a new one issued
    REUSED = "reused"  # used or revoked before: the whole family is revoked
    EXPIRED = "expired"


@dataclass(frozen=True)
class RefreshState:
    """What a refresh token's row says about it."""

    expires_at: datetime
    used_at: datetime | None = None
    revoked_at: datetime | None = None


def judge_refresh(state: RefreshState, now: datetime) -> RefreshVerdict:
    """What presenting a refresh token at ``now`` does. A token used or revoked before is a
    replay (someone holds a copy): it revokes the family, whatever its expiry."""
    if state.used_at is not None or state.revoked_at is not None:
        return RefreshVerdict.REUSED
    if now >= state.expires_at:
        return RefreshVerdict.EXPIRED
    return RefreshVerdict.ROTATE


def is_live(state: RefreshState, now: datetime) -> bool:
    return judge_refresh(state, now) is RefreshVerdict.ROTATE
