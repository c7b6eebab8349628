"""The access-token rules HQ's verifier and the edge's counter share
(``forecourt.kernel.tokens``): each defect refused with the caller's own error."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from forecourt.kernel.tokens import CLOCK_SKEW_S, token_claims, token_kid


class Refused(Exception):
    pass


class Lapsed(Exception):
    pass


KEY = Ed25519PrivateKey.generate()
NOW = int(time.time())


def _claims(**changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": "forecourt",
        "aud": "forecourt",
        "sub": "u1",
        "kind": "user",
        "iat": NOW,
        "exp": NOW + 300,
        "jti": str(uuid.uuid4()),
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def _token(claims: dict[str, Any] | None = None, **headers: Any) -> str:
    return jwt.encode(claims or _claims(), KEY, algorithm="EdDSA", headers={"kid": "k1", **headers})


def _check(token: str) -> dict[str, Any]:
    assert token_kid(token, invalid=Refused) == "k1"
    return token_claims(
        token,
        KEY.public_key(),
        issuer="forecourt",
        audience="forecourt",
        now=NOW,
        invalid=Refused,
        expired=Lapsed,
    )


def test_a_good_token_gives_its_claims() -> None:
    assert _check(_token())["sub"] == "u1"
    # an iat within the skew ahead is still taken
    assert _check(_token(_claims(iat=NOW + CLOCK_SKEW_S)))["sub"] == "u1"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (12, "invalid access token"),
        ("not-a-token", "invalid access token"),
        ("a.b.c", "malformed"),
        (_token(kid=""), "no key id"),
        (_token(kid="k" * 65), "no key id"),
        (jwt.encode(_claims(), "s" * 32, algorithm="HS256", headers={"kid": "k1"}), "algorithm"),
    ],
)
def test_the_header_is_refused_with_the_callers_error(token: Any, reason: str) -> None:
    with pytest.raises(Refused, match=reason):
        token_kid(token, invalid=Refused)


def _unsigned_alg_none() -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'kid': 'k1'})}.{part(_claims())}."


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        (_claims(iss="elsewhere"), "InvalidIssuerError"),
        (_claims(aud="elsewhere"), "InvalidAudienceError"),
        (_claims(jti=None), "MissingRequiredClaimError"),
        (_claims(sub=None), "MissingRequiredClaimError"),
        (_claims(exp="soon"), "must be integers"),
        (_claims(iat=True), "must be integers"),
        (_claims(iat=NOW + CLOCK_SKEW_S + 1), "issued in the future"),
    ],
)
def test_the_claims_are_refused_with_the_callers_error(claims: dict[str, Any], reason: str) -> None:
    with pytest.raises(Refused, match=reason):
        _check(_token(claims))


def test_an_alg_none_token_is_refused() -> None:
    with pytest.raises(Refused, match="algorithm"):
        token_kid(_unsigned_alg_none(), invalid=Refused)


def test_a_token_signed_by_another_key_is_refused() -> None:
    other = jwt.encode(
        _claims(), Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": "k1"}
    )
    with pytest.raises(Refused, match="InvalidSignatureError"):
        _check(other)


def test_an_expired_token_is_the_callers_expired_error() -> None:
    with pytest.raises(Lapsed):
        _check(_token(_claims(exp=NOW)))
