"""A staff credential for HQ clients whose clock a test moves (months, back and forth)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from datetime import datetime, timedelta
from uuid import uuid4

import httpx

from forecourt.identity.handlers import IdentityService
from forecourt.kernel.access import Scope
from tests.support import ADMIN, Assignment


class StaffAuth(httpx.Auth):
    """Signs every request in as one staff member (an HQ admin unless ``grants`` say
    otherwise), with an access token valid at HQ's current time: it signs in again when the
    test's clock has moved outside the token's lifetime. A request carrying its own
    ``authorization`` header (a station's credential) keeps it."""

    def __init__(self, identity: IdentityService, *grants: Assignment) -> None:
        self.identity = identity
        self.grants = grants or ADMIN
        self.username = f"t-{uuid4().hex[:12]}"
        self.password = f"pw-{uuid4().hex}"
        self._created = False
        self._token = ""
        self._valid: tuple[datetime, datetime] | None = None

    async def header(self) -> str:
        now = self.identity.clock.now()
        if self._valid is None or not self._valid[0] <= now < self._valid[1]:
            if not self._created:
                await self.identity.create_user(self.username, password=self.password, actor="test")
                for role, scope in self.grants:
                    await self.identity.grant(self.username, role, Scope.parse(scope), actor="test")
                self._created = True
            tokens = await self.identity.sign_in(self.username, self.password, source="127.0.0.1")
            self._token = tokens.access_token
            self._valid = (now, now + timedelta(seconds=tokens.expires_in - 30))
        return f"Bearer {self._token}"

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        if "authorization" not in request.headers:
            request.headers["authorization"] = await self.header()
        yield request
