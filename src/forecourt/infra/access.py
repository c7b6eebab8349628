"""A policy on every route: the dependency that authenticates the caller and checks the
route's :class:`~forecourt.kernel.access.Policy` before the route runs.

Every route of HQ and of the edge declares one, ``dependencies=[require(policy)]`` (open
routes too: ``require(Policy.open())``), so a test can enumerate the assembled apps and fail
on any route without one (:func:`route_policy`). Who a token belongs to is the app's
:class:`Authenticator` (installed with :func:`install_access`); which region a station is in
comes from its ``region_of``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, Request, Security
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from starlette.routing import BaseRoute

from forecourt.infra.logging import get_logger
from forecourt.kernel.access import Level, Permission, Policy, Principal, PrincipalKind
from forecourt.kernel.errors import Forbidden, ForecourtError, TooManyRequests, Unauthorized

log = get_logger("forecourt.access")

RegionOf = Callable[[str], Awaitable[str | None]]


class Authenticator(Protocol):
    async def principal(self, token: str, source: str | None) -> Principal:
        """The caller a bearer token stands for. Raises
        :class:`~forecourt.kernel.errors.Unauthorized` (unknown, expired, forged, revoked)
        or :class:`~forecourt.kernel.errors.TooManyRequests` (too many failures from
        ``source``)."""
        ...


# How OpenAPI names the credential (Swagger UI's Authorize button): a staff access token,
# a service account's, a station's credential or a terminal's token, all as Bearer.
BEARER = HTTPBearer(
    scheme_name="Bearer",
    description=(
        "a staff or service-account access token (POST /v1/auth/sign-in, /v1/auth/token), "
        "or a station's credential (forecourt credential issue CODE): Bearer <token>"
    ),
    auto_error=False,
)

_POLICY_ATTR = "forecourt_policy"


# Told of every refusal (401, 403, 429) before it is answered: the audit trail's entry.
RefusalHook = Callable[[Request, ForecourtError, "Principal | None", Policy], Awaitable[None]]


def install_access(
    app: FastAPI,
    authenticator: Authenticator,
    region_of: RegionOf | None = None,
    on_refusal: RefusalHook | None = None,
) -> None:
    app.state.authenticator = authenticator
    app.state.region_of = region_of
    app.state.on_refusal = on_refusal


def bearer_token(request: Request) -> str:
    """The bearer token of a request, or a 401 error with a stable code."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer credential", code="auth.missing_credential")
    return token.strip()


def source_of(request: Request) -> str | None:
    return request.client.host if request.client else None


def target_station(policy: Policy, request: Request) -> str | None:
    if policy.station is None:
        return None
    if policy.station == "self":
        code = getattr(request.app.state, "station_code", None)
        return str(code) if code else None
    where, _, name = policy.station.partition(":")
    value = (request.path_params if where == "path" else request.query_params).get(name)
    return str(value) if value else None


def require(policy: Policy) -> Any:
    """The route dependency enforcing ``policy``; the caller ends in
    ``request.state.principal`` (None on an open route)."""

    async def check(
        request: Request, _bearer: Annotated[Any, Security(BEARER)] = None
    ) -> Principal | None:
        request.state.principal = None
        if policy.permission is None:
            return None
        authenticator: Authenticator | None = getattr(request.app.state, "authenticator", None)
        if authenticator is None:
            raise Unauthorized("this server has no authenticator", code="auth.not_configured")
        principal: Principal | None = None
        try:
            principal = await authenticator.principal(
                _token(request, authenticator), source_of(request)
            )
            request.state.principal = principal
            await authorize(request, policy, principal)
        except (Unauthorized, Forbidden, TooManyRequests) as refused:
            await _tell_refusal(request, refused, principal, policy)
            raise
        return principal

    if policy.permission is None:

        async def open_route(request: Request) -> Principal | None:
            request.state.principal = None
            return None

        setattr(open_route, _POLICY_ATTR, policy)
        return Depends(open_route)
    setattr(check, _POLICY_ATTR, policy)
    return Depends(check)


def _token(request: Request, authenticator: Authenticator) -> str:
    """The request's bearer token; without one, the authenticator's own refusal when it has
    one (``refuse_missing()``: the edge names the terminal credential it wants)."""
    try:
        return bearer_token(request)
    except Unauthorized:
        refuse = getattr(authenticator, "refuse_missing", None)
        if refuse is None:
            raise
        raise refuse(source_of(request)) from None


async def _tell_refusal(
    request: Request, refused: ForecourtError, principal: Principal | None, policy: Policy
) -> None:
    hook: RefusalHook | None = getattr(request.app.state, "on_refusal", None)
    if hook is None:
        return
    try:
        await hook(request, refused, principal, policy)
    except Exception:  # noqa: BLE001 - the refusal is answered whatever happens to its record
        log.exception("access.refusal_not_recorded", path=request.url.path, code=refused.code)


async def authorize(request: Request, policy: Policy, principal: Principal) -> None:
    """Refuse (403) unless ``principal`` may do what ``policy`` asks on the request's target."""
    assert policy.permission is not None
    if principal.kind not in policy.kinds:
        raise Forbidden(
            f"a {principal.kind} credential cannot do this ({policy.permission})",
            code="auth.wrong_principal",
            permission=policy.permission,
        )
    if policy.permission == Permission.SIGNED_IN:
        return
    if policy.anywhere and principal.scopes_for(policy.permission):
        return
    station = target_station(policy, request)
    region = None
    if station is not None and _needs_region(principal, policy.permission):
        region_of: RegionOf | None = getattr(request.app.state, "region_of", None)
        region = await region_of(station) if region_of is not None else None
    if principal.allows(policy.permission, station=station, region=region):
        return
    if principal.kind is PrincipalKind.STATION:
        raise Forbidden(
            f"credential is for {principal.subject}, not {station}", code="auth.wrong_station"
        )
    held = principal.scopes_for(policy.permission)
    if not held:
        raise Forbidden(
            f"{principal.actor} may not {policy.permission}",
            code="auth.forbidden",
            permission=policy.permission,
        )
    where = f"station {station}" if station else "the whole chain"
    hint = "" if station else " (name a station you hold it for: ?station=CODE)"
    raise Forbidden(
        f"{principal.actor} holds {policy.permission} only for "
        f"{', '.join(str(s) for s in held)}, not {where}{hint}",
        code="auth.out_of_scope",
        permission=policy.permission,
        station=station,
    )


def _needs_region(principal: Principal, permission: str) -> bool:
    return any(s.level is Level.REGION for s in principal.scopes_for(permission))


def app_routes(routes: list[BaseRoute]) -> list[BaseRoute]:
    """Every route an app serves, the routers it included (FastAPI keeps them as included
    routers, not copies) opened up."""
    out: list[BaseRoute] = []
    for route in routes:
        original = getattr(route, "original_router", None)
        if original is not None:
            out.extend(app_routes(original.routes))
        else:
            out.append(route)
    return out


def route_policy(route: BaseRoute) -> Policy | None:
    """The policy a route declares, or None (the enumeration test fails on None)."""
    declared = getattr(route, _POLICY_ATTR, None)
    if isinstance(declared, Policy):
        return declared
    if not isinstance(route, APIRoute):
        found = getattr(getattr(route, "endpoint", None), _POLICY_ATTR, None)
        return found if isinstance(found, Policy) else None
    return _find_policy(route.dependant)


def _find_policy(dependant: Any) -> Policy | None:
    for dep in dependant.dependencies:
        found = getattr(dep.call, _POLICY_ATTR, None)
        if isinstance(found, Policy):
            return found
        nested = _find_policy(dep)
        if nested is not None:
            return nested
    return None


def declare(policy: Policy, route: Any) -> Any:
    """Mark a plain (non-FastAPI) route, mount or endpoint with its policy: the docs pages
    and their assets, the OpenAPI document."""
    setattr(route, _POLICY_ATTR, policy)
    return route
