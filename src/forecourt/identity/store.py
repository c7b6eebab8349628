"""Persistence of ``identity`` (SQLAlchemy Core on SQLite and PostgreSQL).

On PostgreSQL the tables live in the ``identity`` schema; on SQLite without a schema, each
named ``identity_…`` so that names stay unique across contexts. A refresh token is kept as
its SHA-256 (hex), never in plain; a password or a service account's client secret as its
argon2id hash; a signing key as PEM (the private half never leaves HQ's database).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from forecourt.identity.domain import RefreshState, UsernameTaken
from forecourt.infra.db import Database, UnitOfWork, UTCDateTime
from forecourt.kernel.access import Level, Scope

SCHEMA = "identity"
md = sa.MetaData(schema=SCHEMA)

user_t = sa.Table(
    "identity_user",
    md,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("username", sa.String(64), nullable=False, unique=True),
    sa.Column("display_name", sa.String(200)),
    sa.Column("kind", sa.String(16), nullable=False),  # user | service
    sa.Column("password_hash", sa.Text, nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("disabled_at", UTCDateTime()),
    sa.Column("failed_sign_ins", sa.Integer, nullable=False, server_default="0"),
    sa.Column("locked_until", UTCDateTime()),
)
grant_t = sa.Table(
    "identity_grant",
    md,
    sa.Column("user_id", sa.String(64), primary_key=True),
    sa.Column("role", sa.String(64), primary_key=True),
    sa.Column("level", sa.String(16), primary_key=True),
    sa.Column("code", sa.String(64), primary_key=True),  # "" for the chain
    sa.Column("granted_at", UTCDateTime(), nullable=False),
)
refresh_t = sa.Table(
    "identity_refresh_token",
    md,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("family_id", sa.String(64), nullable=False),
    sa.Column("user_id", sa.String(64), nullable=False),
    sa.Column("issued_at", UTCDateTime(), nullable=False),
    sa.Column("expires_at", UTCDateTime(), nullable=False),
    sa.Column("used_at", UTCDateTime()),
    sa.Column("revoked_at", UTCDateTime()),
    sa.Column("terminal", sa.String(64)),
)
key_t = sa.Table(
    "identity_signing_key",
    md,
    sa.Column("kid", sa.String(64), primary_key=True),
    sa.Column("algorithm", sa.String(16), nullable=False),
    sa.Column("private_pem", sa.Text, nullable=False),
    sa.Column("public_pem", sa.Text, nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("retired_at", UTCDateTime()),
)


def hash_token(token: str) -> str:
    """A refresh token as it is stored and looked up: its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


async def _translated(conn: AsyncConnection) -> AsyncConnection:
    """On SQLite, the connection with ``identity`` translated away like the other schemas."""
    if conn.dialect.name != "sqlite":
        return conn
    sync = conn.sync_connection
    assert sync is not None  # a connection in use
    mapping = dict(sync.get_execution_options().get("schema_translate_map") or {})
    if SCHEMA in mapping:
        return conn
    mapping[SCHEMA] = None
    return await conn.execution_options(schema_translate_map=mapping)


@asynccontextmanager
async def reading(db: Database) -> AsyncIterator[IdentityStore]:
    """A store on a read connection."""
    async with db.connection() as conn:
        yield IdentityStore(await _translated(conn))


@asynccontextmanager
async def writing(db: Database) -> AsyncIterator[tuple[UnitOfWork, IdentityStore]]:
    """A store in a write transaction (committed at the end), with its unit of work (for
    the audit records that commit with it)."""
    async with db.begin() as uow:
        yield uow, IdentityStore(await _translated(uow.conn))


@dataclass(frozen=True)
class UserRow:
    id: str
    username: str
    display_name: str | None
    kind: str
    password_hash: str
    created_at: datetime
    disabled_at: datetime | None
    failed_sign_ins: int
    locked_until: datetime | None


@dataclass(frozen=True)
class RefreshRow:
    token_hash: str
    family_id: str
    user_id: str
    issued_at: datetime
    expires_at: datetime
    used_at: datetime | None
    revoked_at: datetime | None
    terminal: str | None

    @property
    def state(self) -> RefreshState:
        return RefreshState(self.expires_at, self.used_at, self.revoked_at)


@dataclass(frozen=True)
class KeyRow:
    kid: str
    algorithm: str
    private_pem: str
    public_pem: str
    created_at: datetime
    retired_at: datetime | None


def _user(row: sa.Row) -> UserRow:
    return UserRow(
        id=row.id,
        username=row.username,
        display_name=row.display_name,
        kind=row.kind,
        password_hash=row.password_hash,
        created_at=row.created_at,
        disabled_at=row.disabled_at,
        failed_sign_ins=int(row.failed_sign_ins or 0),
        locked_until=row.locked_until,
    )


def _scope(level: str, code: str) -> Scope:
    return Scope(Level(level), code)


class IdentityStore:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    # --- users --------------------------------------------------------------------------

    async def user_by_name(self, username: str) -> UserRow | None:
        row = (
            await self.conn.execute(sa.select(user_t).where(user_t.c.username == username))
        ).first()
        return _user(row) if row is not None else None

    async def user_by_id(self, user_id: str) -> UserRow | None:
        row = (await self.conn.execute(sa.select(user_t).where(user_t.c.id == user_id))).first()
        return _user(row) if row is not None else None

    async def users(self) -> list[UserRow]:
        rows = await self.conn.execute(sa.select(user_t).order_by(user_t.c.username))
        return [_user(r) for r in rows]

    async def add_user(
        self,
        *,
        user_id: str,
        username: str,
        display_name: str | None,
        kind: str,
        password_hash: str,
        now: datetime,
    ) -> None:
        if await self.user_by_name(username) is not None:
            raise UsernameTaken(f"username {username!r} is taken", username=username)
        try:
            await self.conn.execute(
                user_t.insert().values(
                    id=user_id,
                    username=username,
                    display_name=display_name,
                    kind=kind,
                    password_hash=password_hash,
                    created_at=now,
                    failed_sign_ins=0,
                )
            )
        except IntegrityError:  # another process took it meanwhile
            raise UsernameTaken(f"username {username!r} is taken", username=username) from None

    async def set_password_hash(self, user_id: str, password_hash: str) -> None:
        await self.conn.execute(
            user_t.update().where(user_t.c.id == user_id).values(password_hash=password_hash)
        )

    async def clear_failures(self, user_id: str) -> None:
        await self.conn.execute(
            user_t.update()
            .where(user_t.c.id == user_id)
            .values(failed_sign_ins=0, locked_until=None)
        )

    async def record_failure(
        self, user_id: str, *, lock_after: int, lock_until: datetime
    ) -> tuple[int, datetime | None]:
        """Count one more failed sign-in (atomically); at ``lock_after`` failures in a row the
        account locks until ``lock_until`` and the count starts again. The count reached and
        the lock set (None if it did not lock)."""
        u = user_t.c
        await self.conn.execute(
            user_t.update().where(u.id == user_id).values(failed_sign_ins=u.failed_sign_ins + 1)
        )
        failures = int(
            await self.conn.scalar(sa.select(u.failed_sign_ins).where(u.id == user_id)) or 0
        )
        if failures < lock_after:
            return failures, None
        await self.conn.execute(
            user_t.update()
            .where(u.id == user_id)
            .values(failed_sign_ins=0, locked_until=lock_until)
        )
        return failures, lock_until

    async def disable(self, user_id: str, now: datetime) -> bool:
        """Disable the account; whether it was enabled."""
        result = await self.conn.execute(
            user_t.update()
            .where(user_t.c.id == user_id, user_t.c.disabled_at.is_(None))
            .values(disabled_at=now)
        )
        return bool(result.rowcount)

    # --- grants -------------------------------------------------------------------------

    async def grants_of(self, user_id: str) -> list[tuple[str, Scope]]:
        g = grant_t.c
        rows = await self.conn.execute(
            sa.select(g.role, g.level, g.code)
            .where(g.user_id == user_id)
            .order_by(g.role, g.level, g.code)
        )
        return [(r.role, _scope(r.level, r.code)) for r in rows]

    async def all_grants(self) -> dict[str, list[tuple[str, Scope]]]:
        g = grant_t.c
        rows = await self.conn.execute(
            sa.select(g.user_id, g.role, g.level, g.code).order_by(g.role, g.level, g.code)
        )
        found: dict[str, list[tuple[str, Scope]]] = {}
        for r in rows:
            found.setdefault(r.user_id, []).append((r.role, _scope(r.level, r.code)))
        return found

    async def has_grant(self, user_id: str, role: str, scope: Scope) -> bool:
        g = grant_t.c
        count = await self.conn.scalar(
            sa.select(sa.func.count())
            .select_from(grant_t)
            .where(
                g.user_id == user_id,
                g.role == role,
                g.level == scope.level.value,
                g.code == scope.code,
            )
        )
        return bool(count)

    async def add_grant(self, user_id: str, role: str, scope: Scope, now: datetime) -> None:
        await self.conn.execute(
            grant_t.insert().values(
                user_id=user_id,
                role=role,
                level=scope.level.value,
                code=scope.code,
                granted_at=now,
            )
        )

    async def remove_grant(self, user_id: str, role: str, scope: Scope) -> bool:
        g = grant_t.c
        result = await self.conn.execute(
            grant_t.delete().where(
                g.user_id == user_id,
                g.role == role,
                g.level == scope.level.value,
                g.code == scope.code,
            )
        )
        return bool(result.rowcount)

    # --- refresh tokens -----------------------------------------------------------------

    async def add_refresh(
        self,
        *,
        token_hash: str,
        family_id: str,
        user_id: str,
        now: datetime,
        expires_at: datetime,
        terminal: str | None,
    ) -> None:
        await self.conn.execute(
            refresh_t.insert().values(
                token_hash=token_hash,
                family_id=family_id,
                user_id=user_id,
                issued_at=now,
                expires_at=expires_at,
                terminal=terminal,
            )
        )

    async def refresh_token(self, token_hash: str) -> RefreshRow | None:
        row = (
            await self.conn.execute(
                sa.select(refresh_t).where(refresh_t.c.token_hash == token_hash)
            )
        ).first()
        if row is None:
            return None
        return RefreshRow(
            token_hash=row.token_hash,
            family_id=row.family_id,
            user_id=row.user_id,
            issued_at=row.issued_at,
            expires_at=row.expires_at,
            used_at=row.used_at,
            revoked_at=row.revoked_at,
            terminal=row.terminal,
        )

    async def use_refresh(self, token_hash: str, now: datetime) -> bool:
        """Mark a live token used; whether this call did (False: it was used or revoked
        meanwhile, by a concurrent refresh with the same token)."""
        r = refresh_t.c
        result = await self.conn.execute(
            refresh_t.update()
            .where(r.token_hash == token_hash, r.used_at.is_(None), r.revoked_at.is_(None))
            .values(used_at=now)
        )
        return result.rowcount == 1

    async def revoke_family(self, family_id: str, now: datetime) -> int:
        r = refresh_t.c
        result = await self.conn.execute(
            refresh_t.update()
            .where(r.family_id == family_id, r.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        return int(result.rowcount or 0)

    async def revoke_user_tokens(self, user_id: str, now: datetime) -> int:
        r = refresh_t.c
        result = await self.conn.execute(
            refresh_t.update()
            .where(r.user_id == user_id, r.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        return int(result.rowcount or 0)

    async def family(self, family_id: str) -> list[RefreshRow]:
        rows = await self.conn.execute(
            sa.select(refresh_t.c.token_hash)
            .where(refresh_t.c.family_id == family_id)
            .order_by(refresh_t.c.issued_at)
        )
        found = [await self.refresh_token(r.token_hash) for r in rows]
        return [f for f in found if f is not None]

    # --- signing keys -------------------------------------------------------------------

    async def newest_key(self) -> KeyRow | None:
        """The key that signs: the newest one not retired (ties: the greatest kid)."""
        k = key_t.c
        row = (
            await self.conn.execute(
                sa.select(key_t)
                .where(k.retired_at.is_(None))
                .order_by(k.created_at.desc(), k.kid.desc())
                .limit(1)
            )
        ).first()
        return KeyRow(**row._mapping) if row is not None else None

    async def keys(self) -> list[KeyRow]:
        """Every key that verifies (not retired), newest first."""
        k = key_t.c
        rows = await self.conn.execute(
            sa.select(key_t)
            .where(k.retired_at.is_(None))
            .order_by(k.created_at.desc(), k.kid.desc())
        )
        return [KeyRow(**r._mapping) for r in rows]

    async def add_key(
        self, *, kid: str, algorithm: str, private_pem: str, public_pem: str, now: datetime
    ) -> None:
        await self.conn.execute(
            key_t.insert().values(
                kid=kid,
                algorithm=algorithm,
                private_pem=private_pem,
                public_pem=public_pem,
                created_at=now,
            )
        )

    async def retire_keys(self, kids: Iterable[str], now: datetime) -> None:
        chosen = list(kids)
        if chosen:
            await self.conn.execute(
                key_t.update().where(key_t.c.kid.in_(chosen)).values(retired_at=now)
            )
