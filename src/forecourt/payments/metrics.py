"""Payment metrics: attempts by provider, method and outcome, provider call latency, and the
recovery worker's view of the orders.

The metrics live in the client library's default registry (``prometheus_client.REGISTRY``);
:func:`register` adds them to an app's own registry as well, so its ``/metrics`` serves them.

In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, as ``forecourt serve --workers N`` sets it)
the counter and the histogram are added up across processes, like the project's other counts.
The gauges are database-wide figures the recovery worker reads: they are served as the process
that set them last left them (``multiprocess_mode="mostrecent"``), one series each, never added
up and never one per process.

Outcomes: ``success`` (the provider did what was asked: charged, refunded, reversed, answered
the query), ``declined`` (it refused for good), ``unknown`` (no trustworthy answer: a timeout,
a 5xx, a bad signature), ``error`` (our side failed before an answer could be judged).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from types import TracebackType
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from forecourt.payments.domain import OrderState

PROVIDERS: Final = frozenset({"wechat", "alipay", "cash"})
METHODS: Final = frozenset({"code", "cash", "refund", "reverse", "query"})
OUTCOMES: Final = frozenset({"success", "declined", "unknown", "error"})
OPERATIONS: Final = frozenset({"charge", "query", "reverse", "refund", "query_refund"})
#: Provider calls take from a few milliseconds (a simulator) to the adapters' timeouts.
PROVIDER_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 7.5, 10, 15, 30)

ATTEMPTS = Counter(
    "forecourt_payment_attempts",
    "Payment attempts by provider, method and outcome (this process)",
    ["provider", "method", "outcome"],
)
PROVIDER_SECONDS = Histogram(
    "forecourt_payment_provider_seconds",
    "Time of one call to a payment provider, by operation",
    ["provider", "operation"],
    buckets=PROVIDER_BUCKETS,
)
ORDERS = Gauge(
    "forecourt_payment_orders",
    "Payment orders by state (read by the recovery worker)",
    ["state"],
    multiprocess_mode="mostrecent",
)
RECOVERY_BACKLOG = Gauge(
    "forecourt_payment_recovery_backlog",
    "In-flight payment orders overdue for a check at the provider",
    multiprocess_mode="mostrecent",
)
UNKNOWN_OLDEST_SECONDS = Gauge(
    "forecourt_payment_unknown_oldest_seconds",
    "Age of the oldest payment order in state unknown (0 if none)",
    multiprocess_mode="mostrecent",
)
_ALL = (ATTEMPTS, PROVIDER_SECONDS, ORDERS, RECOVERY_BACKLOG, UNKNOWN_OLDEST_SECONDS)

_STATES: Final = frozenset(state.value for state in OrderState)


def _start_at_zero() -> None:
    """Series present from the start at zero, so that rates over them (the alert rules) see
    the first attempt and a quiet provider shows as zero rather than as nothing."""
    for provider in ("wechat", "alipay"):
        for method in ("code", "refund", "reverse", "query"):
            for outcome in OUTCOMES:
                ATTEMPTS.labels(provider, method, outcome)
        for operation in OPERATIONS:
            PROVIDER_SECONDS.labels(provider, operation)
    for outcome in OUTCOMES:
        ATTEMPTS.labels("cash", "cash", outcome)
    for state in _STATES:
        ORDERS.labels(state)


_start_at_zero()


def register(registry: CollectorRegistry) -> None:
    """Serve the payment metrics from ``registry`` too (an app's own; once per registry)."""
    for metric in _ALL:
        registry.register(metric)


def _check(kind: str, value: str, allowed: frozenset[str]) -> str:
    text = str(value)
    if text not in allowed:
        raise ValueError(f"{kind} {value!r} is not one of {sorted(allowed)}")
    return text


def observe_attempt(provider: str, method: str, outcome: str) -> None:
    """Count one payment attempt (``provider``: wechat|alipay|cash; ``method``:
    code|cash|refund|reverse|query; ``outcome``: success|declined|unknown|error)."""
    ATTEMPTS.labels(
        _check("provider", provider, PROVIDERS),
        _check("method", method, METHODS),
        _check("outcome", outcome, OUTCOMES),
    ).inc()


class ProviderTimer:
    """Times one provider call into ``forecourt_payment_provider_seconds``, with ``with`` or
    ``async with``; the time is recorded also when the call raises (``seconds`` after exit)."""

    def __init__(self, provider: str, operation: str) -> None:
        self._child = PROVIDER_SECONDS.labels(
            _check("provider", provider, PROVIDERS - {"cash"}),
            _check("operation", operation, OPERATIONS),
        )
        self._start = 0.0
        self.seconds: float | None = None

    def __enter__(self) -> ProviderTimer:
        self._start = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.seconds = time.perf_counter() - self._start
        self._child.observe(self.seconds)

    async def __aenter__(self) -> ProviderTimer:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


def timed(provider: str, operation: str) -> ProviderTimer:
    """``async with timed("wechat", "charge"): ...`` — the call's time, by provider and
    operation (charge|query|reverse|refund|query_refund)."""
    return ProviderTimer(provider, operation)


def set_order_gauges(
    counts_by_state: Mapping[str, int], overdue: int, oldest_unknown_s: float
) -> None:
    """The recovery worker's figures: orders by state (a state not given is 0), orders overdue
    for a check, and the age of the oldest unknown order (0 if none)."""
    counts = {_check("state", s, _STATES): n for s, n in counts_by_state.items()}
    for state in OrderState:
        ORDERS.labels(state.value).set(counts.get(state.value, 0))
    RECOVERY_BACKLOG.set(max(0, overdue))
    UNKNOWN_OLDEST_SECONDS.set(max(0.0, oldest_unknown_s))
