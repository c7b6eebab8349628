"""The payments recovery job: :func:`forecourt.payments.recovery.recover_once` every
``payments_recovery_interval_s``, hosted by ``forecourt worker --consumers payments`` (or
``default``) and by ``forecourt serve`` where HQ's background work runs (with the relay:
``FORECOURT_RELAY=false`` leaves it to a worker).

It builds its own provider clients from the settings (the merchant keys and base URLs the
HTTP API uses); with no provider configured it says so once and idles. Several processes may
run it at once: an order two of them look at is moved by one (the version compare).
"""

from __future__ import annotations

import asyncio
from typing import Any

from forecourt.infra.background import BackgroundService, Job
from forecourt.infra.db import Database
from forecourt.infra.logging import get_logger
from forecourt.payments.config import providers_from_settings
from forecourt.payments.handlers import PaymentsConfig
from forecourt.payments.providers.base import PaymentProvider
from forecourt.payments.recovery import recover_once

log = get_logger("forecourt.payments.worker")

JOB_NAME = "payments"


class RecoveryService(BackgroundService):
    """Looks for orders due a look every ``interval`` seconds until stopped."""

    task_name = "payments-recovery"

    def __init__(
        self,
        db: Database,
        providers: dict[str, PaymentProvider],
        interval: float,
        config: PaymentsConfig | None = None,
    ) -> None:
        self.db = db
        self.providers = providers
        self.interval = interval
        self.config = config
        self.rounds = 0  # rounds completed since start (for status and tests)

    async def run(self) -> None:
        if not self.providers:
            # Nothing can be owed to a provider nobody configured: idle until stopped.
            log.info("payments.recovery_idle", reason="no payment provider configured")
            await asyncio.Event().wait()
        log.info("payments.recovery_started", providers=sorted(self.providers))
        while True:
            try:
                await recover_once(self.db, self.providers, config=self.config)
            except Exception:  # noqa: BLE001 - the loop outlives a database hiccup
                log.exception("payments.recovery_round_failed")
            self.rounds += 1
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        await super().stop()
        for provider in self.providers.values():
            await provider.aclose()

    def health(self) -> dict[str, Any]:
        return {**super().health(), "rounds": self.rounds, "providers": sorted(self.providers)}


def build_recovery(settings: Any, db: Database) -> RecoveryService:
    """The recovery service the settings describe (providers, interval, deadlines)."""
    return RecoveryService(
        db,
        providers_from_settings(settings),
        settings.payments_recovery_interval_s,
        PaymentsConfig.from_settings(settings),
    )


RECOVERY_JOB = Job(
    JOB_NAME,
    build_recovery,
    description="payment orders in flight driven to a settled state (query, reverse, refund)",
)
