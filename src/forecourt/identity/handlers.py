"""Use cases of ``identity``: accounts and their grants, sign-in, refresh-token rotation,
client credentials for service accounts, signing keys, and the verifier every HQ route's
access check calls.

Access tokens are JWTs signed with Ed25519 (``EdDSA``), named by the signing key's ``kid``;
every HQ process keeps the public keys in memory and reads them again when a token names a
key it does not know (at most once a second). Refresh tokens are random, stored as their
SHA-256; each use rotates one (the presented token is marked used, a new one of the same
family issued), and presenting a used or revoked one revokes the whole family: the copy an
attacker replays, or the one the rightful user presents after the attacker, ends both.

Every identity action is audited in the transaction that makes it; a failed sign-in's
audit commits in a transaction of its own while the sign-in fails. Unauthenticated failures
are audited with the actor ``anonymous`` (who tried is not known; where from is in the
details).
"""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import time as _time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import jwt
import sqlalchemy as sa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from limits import parse as parse_limit
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from forecourt.identity.domain import (
    ROLES,
    USERNAME,
    WRONG_CREDENTIALS,
    AccountDisabled,
    AccountLocked,
    GrantExists,
    InvalidCredentials,
    InvalidToken,
    RefreshReused,
    RefreshVerdict,
    TokenExpired,
    TooManyFailures,
    UnknownGrant,
    UnknownUser,
    check_assignment,
    check_display_name,
    check_password,
    check_username,
    grants_for,
    judge_refresh,
    parse_scope,
)
from forecourt.identity.store import (
    IdentityStore,
    KeyRow,
    UserRow,
    hash_token,
    reading,
    writing,
)
from forecourt.infra.db import Database
from forecourt.infra.logging import get_logger
from forecourt.kernel.access import Principal, PrincipalKind, Scope
from forecourt.kernel.errors import InvalidValue
from forecourt.kernel.ids import new_id
from forecourt.kernel.tokens import ALGORITHM, looks_like_jwt, token_claims, token_kid

log = get_logger("forecourt.identity")

ANONYMOUS = "anonymous"  # the audit actor of an unauthenticated failure


_TERMINAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


def check_terminal(terminal: str | None) -> str | None:
    """A terminal's name as the token carries it (``term``), or InvalidValue."""
    if not terminal:
        return None
    if not _TERMINAL.fullmatch(terminal):
        raise InvalidValue(
            "a terminal is named by 1-64 letters, digits, '.', '_', ':' or '-'", field="terminal"
        )
    return terminal


@dataclass(frozen=True)
class IdentityConfig:
    issuer: str = "forecourt"
    audience: str = "forecourt"
    access_ttl: timedelta = timedelta(seconds=300)
    refresh_ttl: timedelta = timedelta(hours=12)
    argon2_time_cost: int = 3
    argon2_memory_kib: int = 65_536
    lockout_failures: int = 5
    lockout_s: float = 900.0
    failures_per_minute: int = 30
    min_password_length: int = 12

    @classmethod
    def from_settings(cls, settings: Any) -> IdentityConfig:
        return cls(
            issuer=settings.identity_issuer,
            audience=settings.identity_audience,
            access_ttl=timedelta(seconds=settings.identity_access_token_s),
            refresh_ttl=timedelta(seconds=settings.identity_refresh_token_s),
            argon2_time_cost=settings.identity_argon2_time_cost,
            argon2_memory_kib=settings.identity_argon2_memory_kib,
            lockout_failures=settings.identity_lockout_failures,
            lockout_s=settings.identity_lockout_s,
            failures_per_minute=settings.identity_failures_per_minute,
            min_password_length=settings.identity_min_password_length,
        )


@dataclass(frozen=True)
class UserView:
    """An account as it may be shown: never a hash. ``grants``: (role, scope) pairs, the
    scope as written (``chain``, ``region:EAST``, ``station:S001``)."""

    username: str
    display_name: str | None
    kind: str
    grants: tuple[tuple[str, str], ...]
    disabled: bool
    locked_until: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class AccessToken:
    access_token: str
    expires_in: int
    token_type: str = "Bearer"


@dataclass(frozen=True)
class TokenPair:
    access_token: str
    expires_in: int
    refresh_token: str
    refresh_expires_in: int
    token_type: str = "Bearer"


def _view(user: UserRow, grants: list[tuple[str, Scope]], now: datetime) -> UserView:
    locked = user.locked_until if user.locked_until and user.locked_until > now else None
    return UserView(
        username=user.username,
        display_name=user.display_name,
        kind=user.kind,
        grants=tuple((r, str(s)) for r, s in grants),
        disabled=user.disabled_at is not None,
        locked_until=locked,
        created_at=user.created_at,
    )


def _generated_secret(min_length: int) -> str:
    length = max(24, min_length)
    return secrets.token_urlsafe(length)[:length]


def _secret_bytes(secret: str) -> bytes:
    """A password as hashed: UTF-8 (a lone surrogate kept as is, never an error)."""
    return secret.encode("utf-8", "surrogatepass")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class FailureLimit:
    """Failures per source and minute (a moving window); past the limit a source is refused
    (429, with when to retry) before anything is checked."""

    def __init__(self, per_minute: int, namespace: str, what: str) -> None:
        self._limit = parse_limit(f"{per_minute}/minute")
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self.namespace = namespace
        self.what = what

    def check(self, source: str | None) -> None:
        key = source or "unknown"
        if not self._limiter.test(self._limit, self.namespace, key):
            stats = self._limiter.get_window_stats(self._limit, self.namespace, key)
            retry = max(1.0, stats.reset_time - _time.time())
            raise TooManyFailures(
                f"too many failed {self.what} from this source: wait, then retry",
                retry_after_s=round(retry, 1),
            )

    def hit(self, source: str | None) -> None:
        key = source or "unknown"
        self._limiter.hit(self._limit, self.namespace, key)
        if not self._limiter.test(self._limit, self.namespace, key):
            log.warning("identity.source_blocked", source=key, what=self.what)


# --- signing keys ---------------------------------------------------------------------------

# Serialises the creation of the first signing key between HQ processes on PostgreSQL.
_FIRST_KEY_LOCK = 727_275


def _new_key_pems() -> tuple[str, str]:
    private = Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )
    return private_pem, public_pem


def _public_key(pem: str) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem.encode("ascii"))
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def _private_key(pem: str) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem.encode("ascii"), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("not an Ed25519 private key")
    return key


class KeyRing:
    """The signing keys in HQ's database: the newest signs, every one not retired verifies.

    Public keys are cached in the process; the cache is read again when a token names a kid
    it lacks (at most every ``reload_interval_s``, so made-up kids cannot hammer the
    database) and when it is older than ``max_age_s`` (so a retired key stops verifying in
    every process)."""

    def __init__(
        self, db: Database, *, reload_interval_s: float = 1.0, max_age_s: float = 60.0
    ) -> None:
        self.db = db
        self.reload_interval_s = reload_interval_s
        self.max_age_s = max_age_s
        self._public: dict[str, Ed25519PublicKey] = {}
        self._private: dict[str, Ed25519PrivateKey] = {}
        self._loaded_at = float("-inf")
        self._lock = asyncio.Lock()
        self.reloads = 0  # reads of the public keys (a test's window on the throttle)

    async def signing_key(self) -> tuple[str, Ed25519PrivateKey]:
        """The newest key (created when there is none yet)."""
        async with reading(self.db) as store:
            row = await store.newest_key()
        if row is None:
            row = await self._first_key()
        key = self._private.get(row.kid)
        if key is None:
            key = self._private[row.kid] = _private_key(row.private_pem)
            self._public[row.kid] = key.public_key()
        return row.kid, key

    async def _first_key(self) -> KeyRow:
        """Create the first key, unless another process just did (PostgreSQL: under an
        advisory lock; SQLite: writers are serialised, the check is inside the write)."""
        async with writing(self.db) as (uow, store):
            if not self.db.is_sqlite:
                await uow.conn.execute(
                    sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _FIRST_KEY_LOCK}
                )
            row = await store.newest_key()
            if row is None:
                kid = await self._add(store)
                await uow.record_audit(
                    actor="system",
                    action="identity.key.create",
                    target=f"key:{kid}",
                    details={"algorithm": ALGORITHM, "first": True},
                )
                row = await store.newest_key()
        assert row is not None
        return row

    async def _add(self, store: IdentityStore) -> str:
        kid = str(new_id())
        private_pem, public_pem = _new_key_pems()
        await store.add_key(
            kid=kid,
            algorithm=ALGORITHM,
            private_pem=private_pem,
            public_pem=public_pem,
            now=self.db.clock.now(),
        )
        return kid

    async def rotate(self, *, actor: str) -> str:
        async with writing(self.db) as (uow, store):
            kid = await self._add(store)
            await uow.record_audit(
                actor=actor,
                action="identity.key.rotate",
                target=f"key:{kid}",
                details={"algorithm": ALGORITHM},
            )
        self._loaded_at = float("-inf")
        return kid

    async def retire(self, older_than: datetime, *, actor: str) -> list[str]:
        """Retire the keys created before ``older_than`` (never the newest, which signs)."""
        async with writing(self.db) as (uow, store):
            keys = await store.keys()
            chosen = [k.kid for k in keys[1:] if k.created_at < older_than]
            if chosen:
                await store.retire_keys(chosen, self.db.clock.now())
                await uow.record_audit(
                    actor=actor,
                    action="identity.key.retire",
                    target="keys",
                    details={"kids": chosen},
                )
        for kid in chosen:
            self._public.pop(kid, None)
            self._private.pop(kid, None)
        self._loaded_at = float("-inf")
        return chosen

    async def public_key(self, kid: str) -> Ed25519PublicKey | None:
        stale = _time.monotonic() - self._loaded_at >= self.max_age_s
        if kid not in self._public or stale:
            await self._reload(force=stale)
        return self._public.get(kid)

    async def _reload(self, *, force: bool) -> None:
        async with self._lock:
            if not force and _time.monotonic() - self._loaded_at < self.reload_interval_s:
                return
            if force and _time.monotonic() - self._loaded_at < self.max_age_s:
                return  # another task just did
            async with reading(self.db) as store:
                rows = await store.keys()
            self.reloads += 1
            self._public = {r.kid: _public_key(r.public_pem) for r in rows}
            self._private = {k: v for k, v in self._private.items() if k in self._public}
            self._loaded_at = _time.monotonic()

    async def jwks(self) -> dict[str, Any]:
        async with reading(self.db) as store:
            rows = await store.keys()
        keys = []
        for r in rows:
            raw = _public_key(r.public_pem).public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
            keys.append(
                {
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "x": _b64(raw),
                    "kid": r.kid,
                    "alg": ALGORITHM,
                    "use": "sig",
                }
            )
        return {"keys": keys}


# --- the verifier ---------------------------------------------------------------------------


def _expired(_: str) -> TokenExpired:
    return TokenExpired("the access token has expired: refresh it, or sign in again")


class TokenVerifier:
    """Checks an access token (signature by a known key, ``EdDSA`` only, issuer, audience,
    lifetime) and gives the :class:`Principal` it stands for. Failures are counted per
    source: past ``failures_per_minute`` a source is refused (429) before any check."""

    def __init__(self, db: Database, keys: KeyRing, config: IdentityConfig) -> None:
        self.db = db
        self.keys = keys
        self.config = config
        self.failures = FailureLimit(config.failures_per_minute, "identity-token", "tokens")

    async def claims(self, token: str, source: str | None = None) -> dict[str, Any]:
        """The verified claims of ``token``; :class:`InvalidToken`, :class:`TokenExpired` or
        :class:`TooManyFailures`."""
        self.failures.check(source)
        try:
            return await self._claims(token)
        except InvalidToken:
            self.failures.hit(source)
            raise

    async def _claims(self, token: str) -> dict[str, Any]:
        kid = token_kid(token, invalid=InvalidToken)
        key = await self.keys.public_key(kid)
        if key is None:
            raise InvalidToken("invalid access token: unknown key")
        return token_claims(
            token,
            key,
            issuer=self.config.issuer,
            audience=self.config.audience,
            now=self.db.clock.now().timestamp(),  # the lifetime on the database's clock
            invalid=InvalidToken,
            expired=_expired,
        )

    async def verify(self, token: str, source: str | None = None) -> Principal:
        claims = await self.claims(token, source)
        try:
            return _principal(claims)
        except (KeyError, TypeError, ValueError):
            self.failures.hit(source)
            raise InvalidToken("invalid access token: malformed claims") from None


def _principal(claims: dict[str, Any]) -> Principal:
    kind = PrincipalKind(claims["kind"])
    if kind not in (PrincipalKind.USER, PrincipalKind.SERVICE):
        raise ValueError(kind)
    subject = claims["sub"]
    if not isinstance(subject, str) or not isinstance(claims["jti"], str):
        raise TypeError("sub")
    assignments = []
    for role, scope in claims.get("grants", []):
        if role in ROLES:  # a role no longer in the catalogue allows nothing
            assignments.append((str(role), Scope.parse(str(scope))))
    return Principal(kind, subject, grants_for(assignments), session=claims["jti"])


# --- the service ----------------------------------------------------------------------------


@dataclass
class _Outcome:
    """What a transaction decided, raised once it committed."""

    error: Exception | None = None
    user: UserRow | None = None
    grants: list[tuple[str, Scope]] = field(default_factory=list)
    refresh: str | None = None
    terminal: str | None = None


class IdentityService:
    def __init__(self, db: Database, config: IdentityConfig) -> None:
        self.db = db
        self.config = config
        self.hasher = PasswordHasher(
            time_cost=config.argon2_time_cost,
            memory_cost=config.argon2_memory_kib,
            parallelism=1,
        )
        self.keys = KeyRing(db)
        self.verifier = TokenVerifier(db, self.keys, config)
        self.sign_in_failures = FailureLimit(
            config.failures_per_minute, "identity-sign-in", "sign-ins"
        )
        self._dummy: str | None = None
        self.hashes_verified = 0  # argon2 verifications run (a test's window on "no hashing")

    @property
    def clock(self) -> Any:
        return self.db.clock

    # --- hashing ------------------------------------------------------------------------

    async def _hash(self, secret: str) -> str:
        return await asyncio.to_thread(self.hasher.hash, _secret_bytes(secret))

    async def _verify(self, password_hash: str, secret: str) -> bool:
        self.hashes_verified += 1

        def run() -> bool:
            try:
                return bool(self.hasher.verify(password_hash, _secret_bytes(secret)))
            except (VerificationError, InvalidHashError):
                return False

        return await asyncio.to_thread(run)

    async def _dummy_hash(self) -> str:
        """A hash to verify against for an unknown user, so that answering takes as long."""
        if self._dummy is None:
            self._dummy = await self._hash(secrets.token_urlsafe(16))
        return self._dummy

    # --- accounts -----------------------------------------------------------------------

    async def create_user(
        self,
        username: str,
        *,
        password: str | None,
        display_name: str | None = None,
        actor: str,
        grants: list[tuple[str, Scope]] | None = None,
    ) -> tuple[UserView, str | None]:
        """A new staff member (with ``grants``, in the same transaction); a generated
        password is returned (once) when ``password`` is None."""
        check_username(username)
        display_name = check_display_name(display_name)
        generated = None
        if password is None:
            password = generated = _generated_secret(self.config.min_password_length)
        else:
            check_password(password, self.config.min_password_length, username=username)
        chosen = list(grants or [])
        for role, scope in chosen:
            check_assignment(role, scope, PrincipalKind.USER)
        view = await self._create(
            username,
            kind=PrincipalKind.USER,
            secret=password,
            display_name=display_name,
            grants=chosen,
            actor=actor,
            action="identity.user.create",
        )
        return view, generated

    async def create_service_account(
        self, name: str, *, grants: list[tuple[str, Scope]], actor: str
    ) -> tuple[UserView, str]:
        """A service account (client credentials: ``name`` and the secret returned once)
        holding ``grants`` (roles a service may hold only)."""
        check_username(name)
        chosen = list(grants)
        for role, scope in chosen:
            check_assignment(role, scope, PrincipalKind.SERVICE)
        secret = secrets.token_urlsafe(32)
        view = await self._create(
            name,
            kind=PrincipalKind.SERVICE,
            secret=secret,
            display_name=None,
            grants=chosen,
            actor=actor,
            action="identity.service_account.create",
        )
        return view, secret

    async def _create(
        self,
        username: str,
        *,
        kind: PrincipalKind,
        secret: str,
        display_name: str | None,
        grants: list[tuple[str, Scope]],
        actor: str,
        action: str,
    ) -> UserView:
        password_hash = await self._hash(secret)
        now = self.clock.now()
        user_id = str(new_id())
        unique = list(dict.fromkeys(grants))
        async with writing(self.db) as (uow, store):
            await store.add_user(
                user_id=user_id,
                username=username,
                display_name=display_name,
                kind=str(kind),
                password_hash=password_hash,
                now=now,
            )
            for role, scope in unique:
                await store.add_grant(user_id, role, scope, now)
            await uow.record_audit(
                actor=actor,
                action=action,
                target=f"{kind}:{username}",
                details={
                    "kind": str(kind),
                    "display_name": display_name,
                    "grants": [[r, str(s)] for r, s in unique],
                },
            )
            user = await store.user_by_id(user_id)
        assert user is not None
        return _view(user, unique, now)

    async def _user(self, store: IdentityStore, username: str) -> UserRow:
        user = await store.user_by_name(username) if USERNAME.fullmatch(username) else None
        if user is None:
            shown = ascii(username[:64])
            raise UnknownUser(f"no user {shown}", username=shown)
        return user

    async def grant(self, username: str, role: str, scope: Scope, *, actor: str) -> UserView:
        now = self.clock.now()
        async with writing(self.db) as (uow, store):
            user = await self._user(store, username)
            check_assignment(role, scope, user.kind)
            if await store.has_grant(user.id, role, scope):
                raise GrantExists(
                    f"{username} already holds {role} over {scope}", role=role, scope=str(scope)
                )
            await store.add_grant(user.id, role, scope, now)
            await uow.record_audit(
                actor=actor,
                action="identity.grant",
                target=f"{user.kind}:{username}",
                details={"role": role, "scope": str(scope)},
            )
            grants = await store.grants_of(user.id)
        return _view(user, grants, now)

    async def revoke(self, username: str, role: str, scope: Scope, *, actor: str) -> UserView:
        """Take a role from a user; it is gone from their next refresh (their access token
        keeps it until it expires)."""
        now = self.clock.now()
        async with writing(self.db) as (uow, store):
            user = await self._user(store, username)
            if not await store.remove_grant(user.id, role, scope):
                raise UnknownGrant(
                    f"{username} holds no {role} over {scope}", role=role[:64], scope=str(scope)
                )
            await uow.record_audit(
                actor=actor,
                action="identity.revoke",
                target=f"{user.kind}:{username}",
                details={"role": role, "scope": str(scope)},
            )
            grants = await store.grants_of(user.id)
        return _view(user, grants, now)

    async def reset_password(
        self, username: str, password: str | None = None, *, actor: str
    ) -> str | None:
        """Set a new password (or client secret); a generated one is returned when
        ``password`` is None. The account is unlocked and every session it has ends."""
        async with reading(self.db) as store:
            found = await self._user(store, username)
        generated = None
        if password is None:
            length = self.config.min_password_length
            password = generated = (
                secrets.token_urlsafe(32) if found.kind == "service" else _generated_secret(length)
            )
        else:
            check_password(password, self.config.min_password_length, username=username)
        password_hash = await self._hash(password)
        now = self.clock.now()
        async with writing(self.db) as (uow, store):
            user = await self._user(store, username)
            await store.set_password_hash(user.id, password_hash)
            await store.clear_failures(user.id)
            revoked = await store.revoke_user_tokens(user.id, now)
            await uow.record_audit(
                actor=actor,
                action="identity.password.reset",
                target=f"{user.kind}:{username}",
                details={"generated": generated is not None, "refresh_tokens_revoked": revoked},
            )
        return generated

    async def disable(self, username: str, *, actor: str) -> UserView:
        """No more sign-in nor refresh; every refresh token of the account is revoked (its
        access tokens live out their short lifetime)."""
        now = self.clock.now()
        async with writing(self.db) as (uow, store):
            user = await self._user(store, username)
            changed = await store.disable(user.id, now)
            revoked = await store.revoke_user_tokens(user.id, now)
            await uow.record_audit(
                actor=actor,
                action="identity.user.disable",
                target=f"{user.kind}:{username}",
                details={"was_enabled": changed, "refresh_tokens_revoked": revoked},
            )
            user = await self._user(store, username)
            grants = await store.grants_of(user.id)
        return _view(user, grants, now)

    async def list_users(self) -> list[UserView]:
        now = self.clock.now()
        async with reading(self.db) as store:
            users = await store.users()
            grants = await store.all_grants()
        return [_view(u, grants.get(u.id, []), now) for u in users]

    async def get_user(self, username: str) -> UserView:
        async with reading(self.db) as store:
            user = await self._user(store, username)
            grants = await store.grants_of(user.id)
        return _view(user, grants, self.clock.now())

    # --- sign-in ------------------------------------------------------------------------

    async def _authenticate(
        self, name: str, secret: str, *, kind: PrincipalKind, source: str | None
    ) -> UserRow:
        """The account ``name`` of ``kind`` if ``secret`` is its password (or client
        secret). Refused: too many failures from ``source`` (before any hashing), a locked
        account, a wrong name or secret (one answer for both, after as long a check), a
        disabled account. A failure is counted and audited in its own transaction."""
        self.sign_in_failures.check(source)
        name = name if isinstance(name, str) else ""
        user = None
        if USERNAME.fullmatch(name):  # else no such account, and nothing odd reaches SQL
            async with reading(self.db) as store:
                user = await store.user_by_name(name)
        if user is not None and user.kind != kind:
            user = None  # a service account does not sign in, a user has no client secret
        now = self.clock.now()
        what = "client credentials" if kind is PrincipalKind.SERVICE else "sign-in"
        if user is not None and user.locked_until is not None and user.locked_until > now:
            self.sign_in_failures.hit(source)
            retry = (user.locked_until - now).total_seconds()
            await self._audit_failure(user.username, kind, source, "locked", what)
            raise AccountLocked(
                "this account is locked after too many failed sign-ins: wait, then retry",
                retry_after_s=round(max(1.0, retry), 1),
            )
        password_hash = user.password_hash if user is not None else await self._dummy_hash()
        ok = await self._verify(password_hash, secret[:1024] if isinstance(secret, str) else "")
        if user is None or not ok:
            self.sign_in_failures.hit(source)
            await self._audit_failure(
                name, kind, source, "wrong secret" if user else "unknown", what, user=user
            )
            raise InvalidCredentials(WRONG_CREDENTIALS)
        if user.disabled_at is not None:
            await self._audit_failure(user.username, kind, source, "disabled", what)
            raise AccountDisabled("this account is disabled")
        return user

    async def _audit_failure(
        self,
        name: str,
        kind: PrincipalKind,
        source: str | None,
        reason: str,
        what: str,
        *,
        user: UserRow | None = None,
    ) -> None:
        """Audit a failed sign-in in its own transaction (it commits; the sign-in fails);
        with ``user`` (a wrong secret), count the failure and lock the account past the
        limit."""
        now = self.clock.now()
        details: dict[str, Any] = {"source": source, "reason": reason}
        if not USERNAME.fullmatch(name):
            details["username"] = ascii(name[:64])
            name = "(invalid)"
        async with writing(self.db) as (uow, store):
            if user is not None:
                until = now + timedelta(seconds=self.config.lockout_s)
                failures, locked = await store.record_failure(
                    user.id, lock_after=self.config.lockout_failures, lock_until=until
                )
                details["failures"] = failures
                if locked is not None:
                    details["locked_until"] = locked.isoformat()
            action = (
                "identity.token.failed"
                if kind is PrincipalKind.SERVICE
                else "identity.sign_in.failed"
            )
            await uow.record_audit(
                actor=ANONYMOUS, action=action, target=f"{kind}:{name}", details=details
            )
        log.info("identity.refused", what=what, target=f"{kind}:{name}", **details)

    async def _rehash(self, user: UserRow, secret: str) -> str | None:
        """A new hash when the stored one was made with other argon2 parameters."""
        try:
            needs = self.hasher.check_needs_rehash(user.password_hash)
        except (InvalidHashError, ValueError):
            needs = True
        return await self._hash(secret) if needs else None

    async def sign_in(
        self,
        username: str,
        password: str,
        *,
        source: str | None,
        terminal: str | None = None,
    ) -> TokenPair:
        username = username.lower() if isinstance(username, str) else ""
        terminal = check_terminal(terminal)
        user = await self._authenticate(username, password, kind=PrincipalKind.USER, source=source)
        rehashed = await self._rehash(user, password)
        kid, key = await self.keys.signing_key()
        now = self.clock.now()
        token = secrets.token_urlsafe(32)
        family = str(new_id())
        async with writing(self.db) as (uow, store):
            if user.failed_sign_ins or user.locked_until is not None:
                await store.clear_failures(user.id)
            if rehashed is not None:
                await store.set_password_hash(user.id, rehashed)
            await store.add_refresh(
                token_hash=hash_token(token),
                family_id=family,
                user_id=user.id,
                now=now,
                expires_at=now + self.config.refresh_ttl,
                terminal=terminal,
            )
            grants = await store.grants_of(user.id)
            await uow.record_audit(
                actor=f"user:{user.username}",
                action="identity.sign_in",
                target=f"user:{user.username}",
                details={
                    "source": source,
                    "terminal": terminal,
                    "family": family,
                    "rehashed": rehashed is not None,
                },
            )
        access = self._access_token(kid, key, user, grants, now, terminal)
        return TokenPair(
            access_token=access,
            expires_in=int(self.config.access_ttl.total_seconds()),
            refresh_token=token,
            refresh_expires_in=int(self.config.refresh_ttl.total_seconds()),
        )

    def _access_token(
        self,
        kid: str,
        key: Ed25519PrivateKey,
        user: UserRow,
        grants: list[tuple[str, Scope]],
        now: datetime,
        terminal: str | None,
    ) -> str:
        iat = int(now.timestamp())
        claims: dict[str, Any] = {
            "iss": self.config.issuer,
            "aud": self.config.audience,
            "sub": user.username,
            "kind": user.kind,
            "grants": [[role, str(scope)] for role, scope in grants if role in ROLES],
            "iat": iat,
            "exp": iat + int(self.config.access_ttl.total_seconds()),
            "jti": str(new_id()),
        }
        if terminal:
            claims["term"] = terminal
        return jwt.encode(claims, key, algorithm=ALGORITHM, headers={"kid": kid, "typ": "JWT"})

    async def refresh(self, refresh_token: str, *, source: str | None) -> TokenPair:
        """A new pair for a live refresh token, which is used up (rotation). A used or revoked
        one revokes its whole family (:class:`RefreshReused`); an expired one is
        :class:`TokenExpired`; a disabled account's :class:`AccountDisabled`. Grants are read
        again: a role revoked since is not in the new access token."""
        self.sign_in_failures.check(source)
        presented = hash_token(refresh_token) if isinstance(refresh_token, str) else ""
        kid, key = await self.keys.signing_key()
        now = self.clock.now()
        new_token = secrets.token_urlsafe(32)
        outcome = _Outcome()
        async with writing(self.db) as (uow, store):
            row = await store.refresh_token(presented)
            if row is None:
                outcome.error = InvalidToken("unknown refresh token: sign in again")
            else:
                verdict = judge_refresh(row.state, now)
                if verdict is RefreshVerdict.ROTATE and not await store.use_refresh(presented, now):
                    verdict = RefreshVerdict.REUSED  # a concurrent refresh used it first
                user = await store.user_by_id(row.user_id)
                owner = f"{user.kind}:{user.username}" if user else f"user-id:{row.user_id}"
                if verdict is RefreshVerdict.REUSED:
                    revoked = await store.revoke_family(row.family_id, now)
                    await uow.record_audit(
                        actor=ANONYMOUS,
                        action="identity.refresh.reused",
                        target=owner,
                        details={"source": source, "family": row.family_id, "revoked": revoked},
                    )
                    log.warning("identity.refresh_reused", target=owner, source=source)
                    outcome.error = RefreshReused(
                        "this refresh token was used already: every session of its sign-in "
                        "is revoked; sign in again"
                    )
                elif verdict is RefreshVerdict.EXPIRED:
                    outcome.error = TokenExpired("the refresh token has expired: sign in again")
                elif user is None or user.disabled_at is not None:
                    await store.revoke_family(row.family_id, now)
                    outcome.error = AccountDisabled("this account is disabled")
                else:
                    await store.add_refresh(
                        token_hash=hash_token(new_token),
                        family_id=row.family_id,
                        user_id=user.id,
                        now=now,
                        expires_at=now + self.config.refresh_ttl,
                        terminal=row.terminal,
                    )
                    outcome.user = user
                    outcome.terminal = row.terminal
                    outcome.grants = await store.grants_of(user.id)
        if outcome.error is not None:
            if isinstance(outcome.error, InvalidToken):
                self.sign_in_failures.hit(source)
            raise outcome.error
        assert outcome.user is not None
        access = self._access_token(kid, key, outcome.user, outcome.grants, now, outcome.terminal)
        return TokenPair(
            access_token=access,
            expires_in=int(self.config.access_ttl.total_seconds()),
            refresh_token=new_token,
            refresh_expires_in=int(self.config.refresh_ttl.total_seconds()),
        )

    async def sign_out(self, refresh_token: str) -> None:
        """End the sign-in the refresh token belongs to (its whole family). An unknown token
        is no error: signing out twice is signing out."""
        presented = hash_token(refresh_token) if isinstance(refresh_token, str) else ""
        now = self.clock.now()
        async with writing(self.db) as (uow, store):
            row = await store.refresh_token(presented)
            if row is None:
                return
            revoked = await store.revoke_family(row.family_id, now)
            if revoked:
                user = await store.user_by_id(row.user_id)
                who = f"{user.kind}:{user.username}" if user else f"user-id:{row.user_id}"
                await uow.record_audit(
                    actor=who,
                    action="identity.sign_out",
                    target=who,
                    details={"family": row.family_id, "revoked": revoked},
                )

    async def client_credentials(
        self, client_id: str, client_secret: str, *, source: str | None
    ) -> AccessToken:
        """An access token for a service account (OAuth2 client credentials); no refresh
        token: the service asks again."""
        user = await self._authenticate(
            client_id, client_secret, kind=PrincipalKind.SERVICE, source=source
        )
        rehashed = await self._rehash(user, client_secret)
        kid, key = await self.keys.signing_key()
        now = self.clock.now()
        async with writing(self.db) as (uow, store):
            if user.failed_sign_ins or user.locked_until is not None:
                await store.clear_failures(user.id)
            if rehashed is not None:
                await store.set_password_hash(user.id, rehashed)
            grants = await store.grants_of(user.id)
            await uow.record_audit(
                actor=f"service:{user.username}",
                action="identity.token.issue",
                target=f"service:{user.username}",
                details={"source": source, "grants": [[r, str(s)] for r, s in grants]},
            )
        return AccessToken(
            access_token=self._access_token(kid, key, user, grants, now, None),
            expires_in=int(self.config.access_ttl.total_seconds()),
        )

    # --- keys ---------------------------------------------------------------------------

    async def rotate_signing_key(self, *, actor: str) -> str:
        """A new signing key (its kid): new tokens carry it; tokens signed by the older keys
        verify until those are retired."""
        return await self.keys.rotate(actor=actor)

    async def retire_keys(self, older_than: datetime | timedelta, *, actor: str) -> list[str]:
        """Stop verifying tokens of the keys created before ``older_than`` (an instant, or
        an age); the newest key is never retired."""
        before = self.clock.now() - older_than if isinstance(older_than, timedelta) else older_than
        return await self.keys.retire(before, actor=actor)

    async def jwks(self) -> dict[str, Any]:
        """The public keys that verify, as a JWK Set (for the edge nodes)."""
        return await self.keys.jwks()


__all__ = [
    "AccessToken",
    "IdentityConfig",
    "IdentityService",
    "KeyRing",
    "TokenPair",
    "TokenVerifier",
    "UserView",
    "looks_like_jwt",
    "parse_scope",
]
