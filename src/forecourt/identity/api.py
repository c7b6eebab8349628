"""HTTP routes of ``identity``: sign-in, refresh, sign-out, client credentials (OAuth2,
RFC 6749 §4.4), the public keys, who am I; and the management of accounts and grants.

Token answers carry ``Cache-Control: no-store`` (RFC 6749 §5.1). The password grant of
``/v1/auth/token`` is refused on purpose: staff sign in with ``/v1/auth/sign-in``, which
applies the lockout and hands out a rotating refresh token.
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import parse_qsl, unquote_plus

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from forecourt.identity.domain import (
    WRONG_CREDENTIALS,
    InvalidCredentials,
    InvalidRequest,
    UnsupportedGrantType,
    parse_scope,
)
from forecourt.identity.handlers import AccessToken, IdentityService, TokenPair, UserView
from forecourt.infra.access import bearer_token, require, source_of
from forecourt.infra.http import error_responses
from forecourt.kernel.access import Permission, Policy, Scope

OPEN = Policy.open()
SIGNED_IN = Policy(Permission.SIGNED_IN)
USERS_READ = Policy(Permission.USERS_READ)
USERS_MANAGE = Policy(Permission.USERS_MANAGE)
STAFF_ERRORS = error_responses(401, 403, 422, 429)
# What a route with a JSON body may answer besides: a body that is not JSON (400), or larger
# than the server takes (413).
BODY_ERRORS = error_responses(400, 413)
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}

Username = Annotated[str, Field(min_length=1, max_length=64)]
Password = Annotated[str, Field(min_length=1, max_length=1024)]
RefreshText = Annotated[str, Field(min_length=1, max_length=512)]
RoleName = Annotated[str, Field(min_length=1, max_length=64)]
ScopeText = Annotated[
    str,
    Field(
        min_length=1,
        max_length=80,
        description="chain, region:CODE or station:CODE",
        examples=["station:S001"],
    ),
]
UsernamePath = Annotated[str, Path(min_length=1, max_length=64)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SignInBody(_Body):
    username: Username
    password: Password
    terminal: Annotated[str, Field(min_length=1, max_length=64)] | None = Field(
        default=None, description="the terminal signing in (kept in the token as term)"
    )


class RefreshBody(_Body):
    refresh_token: RefreshText


class TokenPairOut(BaseModel):
    access_token: str
    token_type: str = Field(examples=["Bearer"])
    expires_in: int = Field(description="seconds the access token is valid")
    refresh_token: str
    refresh_expires_in: int = Field(description="seconds the refresh token is valid")


class AccessTokenOut(BaseModel):
    access_token: str
    token_type: str = Field(examples=["Bearer"])
    expires_in: int


class GrantBody(_Body):
    role: RoleName
    scope: ScopeText = "chain"

    def parsed(self) -> tuple[str, Scope]:
        return self.role, parse_scope(self.scope)


class GrantOut(BaseModel):
    role: str
    scope: str


class UserOut(BaseModel):
    username: str
    display_name: str | None
    kind: str = Field(description="user or service")
    grants: list[GrantOut]
    disabled: bool
    locked_until: datetime | None
    created_at: datetime


class UserList(BaseModel):
    items: list[UserOut]


class CreateUserBody(_Body):
    username: Username
    password: Password | None = Field(
        default=None, description="absent: one is generated and answered once"
    )
    display_name: Annotated[str, Field(max_length=200)] | None = None
    grants: Annotated[list[GrantBody], Field(max_length=100)] = []


class CreatedUser(BaseModel):
    user: UserOut
    password: str | None = Field(description="the generated password (shown once), or null")


class PasswordBody(_Body):
    password: Password | None = None


class PasswordOut(BaseModel):
    username: str
    password: str | None = Field(description="the generated password (shown once), or null")


class ServiceAccountBody(_Body):
    name: Username
    grants: Annotated[list[GrantBody], Field(min_length=1, max_length=100)]


class ServiceAccountOut(BaseModel):
    client_id: str
    client_secret: str = Field(description="shown once: HQ keeps only its hash")
    account: UserOut


class MeOut(BaseModel):
    username: str
    kind: str
    grants: list[GrantOut]
    terminal: str | None
    expires: datetime


class Jwk(BaseModel):
    kty: str
    crv: str
    x: str
    kid: str
    alg: str
    use: str


class Jwks(BaseModel):
    keys: list[Jwk]


def _user_out(user: UserView) -> UserOut:
    return UserOut(
        username=user.username,
        display_name=user.display_name,
        kind=user.kind,
        grants=[GrantOut(role=r, scope=s) for r, s in user.grants],
        disabled=user.disabled,
        locked_until=user.locked_until,
        created_at=user.created_at,
    )


def _pair(pair: TokenPair) -> JSONResponse:
    body = TokenPairOut(
        access_token=pair.access_token,
        token_type=pair.token_type,
        expires_in=pair.expires_in,
        refresh_token=pair.refresh_token,
        refresh_expires_in=pair.refresh_expires_in,
    )
    return JSONResponse(body.model_dump(mode="json"), headers=NO_STORE)


def _access(token: AccessToken) -> JSONResponse:
    body = AccessTokenOut(
        access_token=token.access_token, token_type=token.token_type, expires_in=token.expires_in
    )
    return JSONResponse(body.model_dump(mode="json"), headers=NO_STORE)


TOKEN_FORM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["grant_type"],
    "properties": {
        "grant_type": {"type": "string", "enum": ["client_credentials"]},
        "client_id": {"type": "string", "maxLength": 64},
        "client_secret": {"type": "string", "maxLength": 1024},
        "scope": {"type": "string", "description": "ignored: a token holds the account's grants"},
    },
}
MAX_FORM_BYTES = 4096


def _form(body: bytes) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body; a parameter given twice, or a body
    that is not one, is an invalid request (RFC 6749 §3.2)."""
    if len(body) > MAX_FORM_BYTES:
        raise InvalidRequest("the token request is too large")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("the token request is not a form (UTF-8, url-encoded)") from None
    form: dict[str, str] = {}
    for key, value in pairs:
        if key in form:
            raise InvalidRequest(f"parameter {key[:40]!r} given twice")
        form[key] = value
    return form


def _basic(request: Request) -> tuple[str, str] | None:
    """The client id and secret of an HTTP Basic ``Authorization`` header (each form-encoded
    inside, RFC 6749 §2.3.1), or None without one. A Bearer header is not a client's."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidCredentials(WRONG_CREDENTIALS) from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise InvalidCredentials(WRONG_CREDENTIALS)
    return unquote_plus(client_id), unquote_plus(secret)


def build_router(service: IdentityService) -> APIRouter:
    router = APIRouter(tags=["identity"])

    # --- signing in ---------------------------------------------------------------------

    @router.post(
        "/v1/auth/sign-in",
        response_model=TokenPairOut,
        dependencies=[require(OPEN)],
        responses={**error_responses(401, 422, 429), **BODY_ERRORS},
    )
    async def sign_in(body: SignInBody, request: Request) -> Response:
        """Sign in with a username and password: an access token (short) and a refresh
        token (each use rotates it). 401 ``auth.invalid_credentials`` for a wrong username
        or password alike; 429 ``auth.account_locked`` after too many failures in a row, or
        ``auth.too_many_failures`` from one source (Retry-After)."""
        pair = await service.sign_in(
            body.username, body.password, source=source_of(request), terminal=body.terminal
        )
        return _pair(pair)

    @router.post(
        "/v1/auth/refresh",
        response_model=TokenPairOut,
        dependencies=[require(OPEN)],
        responses={**error_responses(401, 422, 429), **BODY_ERRORS},
    )
    async def refresh(body: RefreshBody, request: Request) -> Response:
        """A new token pair for a refresh token, which is used up. Presenting one used
        before revokes every token of its sign-in (401 ``auth.refresh_reused``)."""
        return _pair(await service.refresh(body.refresh_token, source=source_of(request)))

    @router.post(
        "/v1/auth/sign-out",
        status_code=204,
        response_class=Response,
        dependencies=[require(OPEN)],
        responses={**error_responses(422), **BODY_ERRORS},
    )
    async def sign_out(body: RefreshBody) -> Response:
        """End the sign-in the refresh token belongs to (an unknown one: nothing to end)."""
        await service.sign_out(body.refresh_token)
        return Response(status_code=204)

    @router.post(
        "/v1/auth/token",
        response_model=AccessTokenOut,
        dependencies=[require(OPEN)],
        responses=error_responses(400, 401, 413, 422, 429),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/x-www-form-urlencoded": {"schema": TOKEN_FORM_SCHEMA}},
            }
        },
    )
    async def token(request: Request) -> Response:
        """OAuth2 client credentials (RFC 6749 §4.4) for a service account: the form
        ``grant_type=client_credentials``, the client id and secret in the form or as HTTP
        Basic. No refresh token: ask again. Any other grant type (``password`` too, on
        purpose) is 400 ``auth.unsupported_grant_type``."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            raise InvalidRequest(
                "send the token request as application/x-www-form-urlencoded (RFC 6749)"
            )
        form = _form(await request.body())
        grant_type = form.get("grant_type")
        if not grant_type:
            raise InvalidRequest("grant_type is missing")
        if grant_type != "client_credentials":
            raise UnsupportedGrantType(
                f"grant type {grant_type[:40]!r} is not supported: client_credentials only "
                "(staff sign in with POST /v1/auth/sign-in)",
                grant_type=grant_type[:40],
            )
        basic = _basic(request)
        if basic is not None:
            if "client_secret" in form:
                raise InvalidRequest("give the client's credentials once: Basic or the form")
            client_id, secret = basic
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
            if not client_id or not secret:
                raise InvalidCredentials(WRONG_CREDENTIALS)
        if len(client_id) > 64 or len(secret) > 1024:
            raise InvalidCredentials(WRONG_CREDENTIALS)
        issued = await service.client_credentials(client_id, secret, source=source_of(request))
        return _access(issued)

    @router.get("/v1/auth/keys", response_model=Jwks, dependencies=[require(OPEN)])
    async def keys() -> Response:
        """The public keys access tokens are signed with (a JWK Set; tokens name theirs by
        ``kid``), for the edge nodes to verify staff tokens offline."""
        jwks = await service.jwks()
        return JSONResponse(jwks, headers={"Cache-Control": "max-age=60"})

    @router.get(
        "/v1/auth/me",
        response_model=MeOut,
        dependencies=[require(SIGNED_IN)],
        responses=error_responses(401, 403, 429),
    )
    async def me(request: Request) -> MeOut:
        """Who the access token is for, what it grants, and when it expires."""
        claims = await service.verifier.claims(bearer_token(request), source_of(request))
        principal = request.state.principal
        return MeOut(
            username=principal.subject,
            kind=str(principal.kind),
            grants=[GrantOut(role=g.role, scope=str(g.scope)) for g in principal.grants],
            terminal=claims.get("term"),
            expires=datetime.fromtimestamp(claims["exp"], UTC),
        )

    # --- accounts -----------------------------------------------------------------------

    @router.get(
        "/v1/identity/users",
        response_model=UserList,
        dependencies=[require(USERS_READ)],
        responses=STAFF_ERRORS,
    )
    async def list_users() -> UserList:
        """Every account (staff and service accounts) with its grants; never a hash."""
        return UserList(items=[_user_out(u) for u in await service.list_users()])

    @router.get(
        "/v1/identity/users/{username}",
        response_model=UserOut,
        dependencies=[require(USERS_READ)],
        responses={**STAFF_ERRORS, **error_responses(404)},
    )
    async def get_user(username: UsernamePath) -> UserOut:
        return _user_out(await service.get_user(username))

    @router.post(
        "/v1/identity/users",
        status_code=201,
        response_model=CreatedUser,
        dependencies=[require(USERS_MANAGE)],
        responses={**STAFF_ERRORS, **error_responses(409), **BODY_ERRORS},
    )
    async def create_user(body: CreateUserBody, request: Request) -> CreatedUser:
        """A new staff member with the grants given; without a password one is generated
        and answered once."""
        grants = [g.parsed() for g in body.grants]
        user, generated = await service.create_user(
            body.username,
            password=body.password,
            display_name=body.display_name,
            actor=request.state.principal.actor,
            grants=grants,
        )
        return CreatedUser(user=_user_out(user), password=generated)

    @router.post(
        "/v1/identity/users/{username}/grants",
        response_model=UserOut,
        dependencies=[require(USERS_MANAGE)],
        responses={**STAFF_ERRORS, **error_responses(404, 409), **BODY_ERRORS},
    )
    async def grant(username: UsernamePath, body: GrantBody, request: Request) -> UserOut:
        """Give a role over a scope; it holds from the user's next sign-in or refresh."""
        role, scope = body.parsed()
        user = await service.grant(username, role, scope, actor=request.state.principal.actor)
        return _user_out(user)

    @router.delete(
        "/v1/identity/users/{username}/grants",
        response_model=UserOut,
        dependencies=[require(USERS_MANAGE)],
        responses={**STAFF_ERRORS, **error_responses(404), **BODY_ERRORS},
    )
    async def revoke(username: UsernamePath, body: GrantBody, request: Request) -> UserOut:
        """Take a role over a scope (the body names it: ``{"role", "scope"}``); it is gone
        from the user's next refresh. One the user does not hold is 404
        ``identity.unknown_grant``."""
        role, scope = body.parsed()
        user = await service.revoke(username, role, scope, actor=request.state.principal.actor)
        return _user_out(user)

    @router.post(
        "/v1/identity/users/{username}/password",
        response_model=PasswordOut,
        dependencies=[require(USERS_MANAGE)],
        responses={**STAFF_ERRORS, **error_responses(404), **BODY_ERRORS},
    )
    async def reset_password(
        username: UsernamePath, request: Request, body: PasswordBody | None = None
    ) -> JSONResponse:
        """Set a password (absent: one is generated and answered once); the account is
        unlocked and every session it has ends."""
        generated = await service.reset_password(
            username, body.password if body else None, actor=request.state.principal.actor
        )
        out = PasswordOut(username=username, password=generated)
        return JSONResponse(out.model_dump(mode="json"), headers=NO_STORE)

    @router.post(
        "/v1/identity/users/{username}/disable",
        response_model=UserOut,
        dependencies=[require(USERS_MANAGE)],
        responses={**STAFF_ERRORS, **error_responses(404)},
    )
    async def disable(username: UsernamePath, request: Request) -> UserOut:
        """No more sign-in or refresh; every session of the account ends (access tokens
        already out live their few minutes)."""
        return _user_out(await service.disable(username, actor=request.state.principal.actor))

    @router.post(
        "/v1/identity/service-accounts",
        status_code=201,
        response_model=ServiceAccountOut,
        dependencies=[require(USERS_MANAGE)],
        responses={**STAFF_ERRORS, **error_responses(409), **BODY_ERRORS},
    )
    async def create_service_account(body: ServiceAccountBody, request: Request) -> JSONResponse:
        """A service account for an integration or a scraper: its client id and secret (shown
        once) for ``POST /v1/auth/token``."""
        grants = [g.parsed() for g in body.grants]
        user, secret = await service.create_service_account(
            body.name, grants=grants, actor=request.state.principal.actor
        )
        out = ServiceAccountOut(
            client_id=user.username, client_secret=secret, account=_user_out(user)
        )
        return JSONResponse(out.model_dump(mode="json"), status_code=201, headers=NO_STORE)

    return router
