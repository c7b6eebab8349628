"""The role catalogue, where roles may be granted, the username and password rules, and the
refresh family's verdicts (pure; hypothesis over scope parsing and the verdicts)."""

from __future__ import annotations

import string
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forecourt.identity.domain import (
    ROLES,
    InvalidScope,
    InvalidUsername,
    RefreshState,
    RefreshVerdict,
    ScopeNotAllowed,
    UnknownRole,
    WeakPassword,
    check_assignment,
    check_password,
    check_username,
    grants_for,
    judge_refresh,
    parse_scope,
)
from forecourt.kernel.access import Level, Permission, PrincipalKind, Scope

# Written out by hand, apart from the catalogue it checks (the product's definition).
EXPECTED: dict[str, tuple[set[str], set[str], set[str]]] = {
    "hq_admin": (
        {
            "sales:read",
            "network:read",
            "network:prices:write",
            "devices:read",
            "pumps:command",
            "pumps:emergency-stop",
            "pumps:maintain",
            "station:read",
            "identity:users:read",
            "identity:users:manage",
            "audit:read",
            "metrics:read",
            "payments:read",
            "payments:charge",
            "payments:refund",
            "payments:void",
        },
        {"chain"},
        {"user"},
    ),
    "region_manager": (
        {
            "sales:read",
            "network:read",
            "devices:read",
            "station:read",
            "identity:users:read",
            "payments:read",
            "payments:refund",
            "payments:void",
        },
        {"chain", "region"},
        {"user"},
    ),
    "station_manager": (
        {
            "sales:read",
            "network:read",
            "devices:read",
            "station:read",
            "pumps:command",
            "pumps:emergency-stop",
            "payments:read",
            "payments:charge",
            "payments:refund",
            "payments:void",
        },
        {"station"},
        {"user"},
    ),
    "cashier": (
        {
            "pumps:command",
            "pumps:emergency-stop",
            "station:read",
            "sales:read",
            "payments:read",
            "payments:charge",
        },
        {"station"},
        {"user"},
    ),
    "finance": (
        {"sales:read", "network:read", "payments:read", "payments:refund"},
        {"chain", "region"},
        {"user"},
    ),
    "auditor": (
        {
            "audit:read",
            "sales:read",
            "network:read",
            "devices:read",
            "identity:users:read",
            "payments:read",
        },
        {"chain", "region", "station"},
        {"user", "service"},
    ),
    "marketing": ({"sales:read", "network:read"}, {"chain", "region"}, {"user"}),
    "device_technician": (
        {"devices:read", "station:read", "pumps:maintain", "pumps:emergency-stop", "network:read"},
        {"chain", "region", "station"},
        {"user"},
    ),
    "integration": (
        {"sales:read", "network:read", "devices:read"},
        {"chain", "region", "station"},
        {"service"},
    ),
    "metrics_scraper": ({"metrics:read"}, {"chain"}, {"service"}),
}


def test_each_role_holds_exactly_its_permissions_levels_and_kinds() -> None:
    assert set(ROLES) == set(EXPECTED)
    for name, (permissions, levels, kinds) in EXPECTED.items():
        role = ROLES[name]
        assert role.permissions == permissions | {"signed-in"}, name
        assert {str(lv) for lv in role.levels} == levels, name
        assert {str(k) for k in role.kinds} == kinds, name


def test_no_role_holds_a_station_credentials_permissions() -> None:
    for role in ROLES.values():
        assert Permission.SALES_UPLOAD not in role.permissions
        assert Permission.NETWORK_SNAPSHOT not in role.permissions
        assert Permission.PAYMENTS_UPLOAD not in role.permissions


def test_grants_for_expands_roles_and_refuses_an_unknown_one() -> None:
    (grant,) = grants_for([("cashier", Scope.station("S001"))])
    assert grant.role == "cashier"
    assert grant.scope == Scope.station("S001")
    assert grant.permissions == ROLES["cashier"].permissions
    with pytest.raises(UnknownRole):
        grants_for([("root", Scope.chain())])


def test_an_invalid_scope_is_a_422() -> None:
    for text in ("", "planet:MARS", "chain:X", "station:", "station:S\x00"):
        with pytest.raises(InvalidScope) as refused:
            parse_scope(text)
        assert refused.value.http_status == 422


def test_a_cashier_is_granted_per_station_never_over_the_chain() -> None:
    with pytest.raises(ScopeNotAllowed) as refused:
        check_assignment("cashier", Scope.chain(), PrincipalKind.USER)
    assert refused.value.http_status == 422
    assert refused.value.code == "identity.scope_not_allowed"
    assert "cashier is granted per station: --station CODE" in refused.value.message
    assert check_assignment("cashier", Scope.station("S001"), "user").name == "cashier"


@pytest.mark.parametrize(
    ("role", "scope", "kind"),
    [
        ("hq_admin", "region:EAST", "user"),
        ("region_manager", "station:S001", "user"),
        ("metrics_scraper", "region:EAST", "service"),
        ("integration", "chain", "user"),  # a service's role only
        ("metrics_scraper", "chain", "user"),
        ("cashier", "station:S001", "service"),  # a person's role only
    ],
)
def test_assignments_outside_a_roles_levels_or_kinds_are_refused(
    role: str, scope: str, kind: str
) -> None:
    with pytest.raises(ScopeNotAllowed):
        check_assignment(role, Scope.parse(scope), kind)


def test_an_unknown_role_is_refused_naming_the_roles() -> None:
    with pytest.raises(UnknownRole) as refused:
        check_assignment("superuser", Scope.chain(), "user")
    assert refused.value.code == "identity.unknown_role"
    assert "cashier" in refused.value.message


@pytest.mark.parametrize("name", ["alice", "a", "j.doe-2_x", "x" * 64])
def test_usernames_that_are_taken(name: str) -> None:
    assert check_username(name) == name


@pytest.mark.parametrize("name", ["", "Alice", "a b", "x" * 65, "al\x00ce", "élodie", "a/b"])
def test_usernames_that_are_refused(name: str) -> None:
    with pytest.raises(InvalidUsername) as refused:
        check_username(name)
    assert refused.value.http_status == 422


@pytest.mark.parametrize(
    "password", ["short", "aaaaaaaaaaaaaaaa", "alice.smith-01", "ALICE.SMITH-01", "x" * 1025]
)
def test_weak_passwords_are_refused(password: str) -> None:
    with pytest.raises(WeakPassword) as refused:
        check_password(password, 12, username="alice.smith-01")
    assert refused.value.code == "identity.weak_password"
    assert refused.value.http_status == 422


def test_a_long_varied_password_is_taken() -> None:
    check_password("correct horse battery", 12, username="alice")


# --- properties -----------------------------------------------------------------------------

CODES = st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=63).map(
    lambda s: "S" + s
)
SCOPES = st.one_of(
    st.just(Scope.chain()),
    CODES.map(Scope.region),
    CODES.map(Scope.station),
)


@given(SCOPES)
def test_a_scope_reads_back_as_it_is_written(scope: Scope) -> None:
    assert parse_scope(str(scope)) == scope
    assert Scope.parse(str(scope)) == scope


@given(st.text(max_size=80))
def test_any_text_is_a_scope_written_so_or_invalid_scope(text: str) -> None:
    try:
        scope = parse_scope(text)
    except InvalidScope:
        return  # a 422 (InvalidValue), never another error
    assert str(scope) == text
    assert scope.level in Level


T0 = datetime(2026, 11, 25, tzinfo=UTC)
MOMENTS = st.integers(min_value=-1000, max_value=1000).map(lambda s: T0 + timedelta(seconds=s))


@given(MOMENTS, st.one_of(st.none(), MOMENTS), st.one_of(st.none(), MOMENTS), MOMENTS)
def test_a_used_or_revoked_token_is_always_a_replay_whatever_its_expiry(
    expires_at: datetime, used_at: datetime | None, revoked_at: datetime | None, now: datetime
) -> None:
    verdict = judge_refresh(RefreshState(expires_at, used_at, revoked_at), now)
    if used_at is not None or revoked_at is not None:
        assert verdict is RefreshVerdict.REUSED
    elif now >= expires_at:
        assert verdict is RefreshVerdict.EXPIRED
    else:
        assert verdict is RefreshVerdict.ROTATE
