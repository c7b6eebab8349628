"""The rules of Forecourt's access tokens, shared by every place that checks one (HQ's routes
and the edge's counter): a JWT of three base64url parts, signed with Ed25519 (``EdDSA``)
under a ``kid``, carrying HQ's issuer and audience, ``exp``, ``iat``, ``sub`` and ``jti``;
``exp`` and ``iat`` are integers judged on the checker's clock, an ``iat`` up to
:data:`CLOCK_SKEW_S` ahead of it still taken.

Checking is two steps, the key lookup between them being the checker's own:
:func:`token_kid` reads the header (shape, algorithm, key id), :func:`token_claims` verifies
the signature with the key the kid named and the claims. A refusal is raised as the caller's
error type (``invalid`` or ``expired``), so each keeps its codes and messages.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jwt

ALGORITHM = "EdDSA"
MAX_TOKEN_CHARS = 8192  # longer is no token of ours: refused before any parsing
MAX_KID_CHARS = 64
REQUIRED_CLAIMS = ("exp", "iat", "sub", "aud", "iss", "jti")
CLOCK_SKEW_S = 30  # an ``iat`` this far ahead of the checker's clock is still taken
_JWT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

#: builds the caller's error from a message (e.g. its ``InvalidToken``)
Refusal = Callable[[str], Exception]


def looks_like_jwt(token: str) -> bool:
    """Whether a bearer token has a JWT's shape (three base64url parts, the signature maybe
    empty): a staff or service-account token, not a station's or a terminal's secret."""
    return len(token) <= MAX_TOKEN_CHARS and _JWT.fullmatch(token) is not None


def token_kid(token: Any, *, invalid: Refusal) -> str:
    """The key id of an access token's header, once its shape and algorithm are ours."""
    if not isinstance(token, str) or not looks_like_jwt(token):
        raise invalid("invalid access token")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        raise invalid("invalid access token: malformed") from None
    kid = header.get("kid")
    if header.get("alg") != ALGORITHM:
        raise invalid("invalid access token: unsupported algorithm")
    if not isinstance(kid, str) or not kid or len(kid) > MAX_KID_CHARS:
        raise invalid("invalid access token: no key id")
    return kid


def _timestamp(value: Any, invalid: Refusal) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid("invalid access token: exp and iat must be integers")
    return value


def token_claims(
    token: str,
    key: Any,
    *,
    issuer: str,
    audience: str,
    now: float,
    invalid: Refusal,
    expired: Refusal,
) -> dict[str, Any]:
    """The claims of ``token`` verified with ``key`` (the public key its kid names): the
    signature (``EdDSA`` only), issuer, audience, the required claims, and the lifetime on
    ``now`` (seconds since the epoch on the checker's clock)."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            audience=audience,
            issuer=issuer,
            options={
                "require": list(REQUIRED_CLAIMS),
                "verify_exp": False,  # checked below, on the checker's clock
                "verify_iat": False,
                "verify_nbf": False,
            },
        )
    except jwt.InvalidTokenError as exc:
        raise invalid(f"invalid access token: {type(exc).__name__}") from None
    exp, iat = _timestamp(claims["exp"], invalid), _timestamp(claims["iat"], invalid)
    if iat > now + CLOCK_SKEW_S:
        raise invalid("invalid access token: issued in the future")
    if exp <= now:
        raise expired("the access token has expired")
    return claims
