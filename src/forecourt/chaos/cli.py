"""``forecourt chaos``: fault-injection runs on real processes (see docs/chaos.md).

``forecourt chaos delivery`` runs HQ, the outbox relay and a consumer host as separate
processes, injects faults while sales are uploaded, and checks that every event was
processed or dead-lettered, none twice and none left pending. ``forecourt chaos payments``
runs HQ and the two payment provider simulators, takes payments under provider faults and HQ
crashes, and compares HQ's orders with the providers' trades. Failures are one line on
stderr (``FORECOURT_DEBUG=1`` shows the traceback); exit status 0: the guarantees held,
1: they did not (the line says which) or the run could not be carried out, 2: a usage
error, 130/143: interrupted by SIGINT/SIGTERM (its processes stopped, its database and
stream removed).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click

CLEANUP_S = 45.0  # an interrupted run stops its processes and drops its data within this

F = TypeVar("F", bound=Callable[..., Any])

# The options every chaos run takes.
_json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object as the last line."
)
_postgres_option = click.option(
    "--postgres-url",
    default="postgresql://postgres@127.0.0.1:5432/postgres",
    show_default=True,
    help="PostgreSQL server (and a database to connect to) where the run creates, then "
    "drops, a database of its own.",
)


def _workdir_option(help_text: str) -> Callable[[F], F]:
    return click.option(
        "--workdir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help=help_text,
    )


def _seed_option(help_text: str) -> Callable[[F], F]:
    return click.option("--seed", type=int, default=1, show_default=True, help=help_text)


@click.group()
def chaos() -> None:
    """Fault-injection runs: real HQ, relay and consumer processes, real faults."""


@chaos.command()
@click.option(
    "--embedded",
    is_flag=True,
    help="A SQLite file in the work folder and the in-process bus (default: a fresh "
    "PostgreSQL database and a NATS JetStream stream of the run's own).",
)
@click.option(
    "--sales",
    type=click.IntRange(100, 1_000_000),
    default=None,
    help="Ordinary sales to upload (default: 5000; 1500 with --quick).",
)
@click.option(
    "--quick", is_flag=True, help="Fewer sales, a shorter outage and pacing (well under a minute)."
)
@_json_option
@_workdir_option(
    "Keep the processes' logs (and, with --embedded, the SQLite file) here "
    "(default: a temporary folder, removed at the end)."
)
@_postgres_option
@click.option(
    "--nats-url",
    default="nats://127.0.0.1:4222",
    show_default=True,
    help="NATS server with JetStream; the run's stream is deleted at the end.",
)
@_seed_option("Seed of the sales mix.")
def delivery(
    embedded: bool,
    sales: int | None,
    quick: bool,
    as_json: bool,
    workdir: Path | None,
    postgres_url: str,
    nats_url: str,
    seed: int,
) -> None:
    """Inject delivery faults while sales are ingested, then count every event.

    HQ, the relay and a consumer host (the probe consumer) run as separate processes. The
    run cuts the consumer host's database for longer than its retry budget, kills the
    consumer host on the last allowed delivery of a poison event and after an effect
    before its ack, kills the relay between publish and delete, uploads conflicting
    payloads for one sale and writes an outbox row too large for the bus. Then it drains
    and counts the events expected (from HQ's sales), processed, dead-lettered, lost,
    processed twice and pending.

    Exit status 0 when none is lost, processed twice or pending and every injected crash
    was observed; 1 otherwise.
    """
    from forecourt.chaos.delivery import DeliveryOptions, run_delivery, verdict

    opts = DeliveryOptions(
        embedded=embedded,
        sales=sales,
        quick=quick,
        workdir=workdir,
        postgres_url=postgres_url,
        nats_url=nats_url,
        seed=seed,
    )

    _carry_out(
        "delivery",
        lambda progress: run_delivery(opts, progress),
        verdict,
        as_json=as_json,
        summary=_print_delivery_summary,
        removed="its database and stream removed",
    )


@chaos.command()
@click.option(
    "--orders",
    type=click.IntRange(1, 100_000),
    default=200,
    show_default=True,
    help="Counter payments to take (each of its own sale).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 256),
    default=16,
    show_default=True,
    help="Counter clients paying at once.",
)
@click.option(
    "--crashes",
    type=click.IntRange(0, 50),
    default=None,
    help="HQ lives armed with a crash point (default: 2 + orders/100, at most 8).",
)
@click.option(
    "--drain-s",
    type=click.FloatRange(1, 3600),
    default=150.0,
    show_default=True,
    help="How long the drain waits for every order to settle.",
)
@_json_option
@_workdir_option(
    "Keep the processes' logs and the crash marker here (default: a temporary folder, "
    "removed at the end)."
)
@_postgres_option
@_seed_option("Seed of the mix and crashes.")
def payments(
    orders: int,
    concurrency: int,
    crashes: int | None,
    drain_s: float,
    as_json: bool,
    workdir: Path | None,
    postgres_url: str,
    seed: int,
) -> None:
    """Take counter payments under provider faults and HQ crashes, then compare HQ with the
    providers.

    The WeChat Pay and Alipay simulators and HQ run as separate processes. While N payments
    (code and cash, some refunded or voided) are taken and retried under the same
    Idempotency-Key, the simulators time out, fail, answer slowly, charge without answering
    and mangle their notifications, and HQ is SIGKILLed at named crash points and
    restarted. Then the faults stop and the run waits until no order is in flight.

    Exit status 0 when nothing was charged twice, captured without a paid order, paid
    without a capture, left in flight, left uncompensated or refunded differently; 1
    otherwise.
    """
    from forecourt.chaos.payments import PaymentsOptions, run_payments, verdict

    opts = PaymentsOptions(
        orders=orders,
        seed=seed,
        concurrency=concurrency,
        crashes=crashes,
        drain_s=drain_s,
        workdir=workdir,
        postgres_url=postgres_url,
    )

    _carry_out(
        "payments",
        lambda progress: run_payments(opts, progress),
        verdict,
        as_json=as_json,
        summary=_print_payments_summary,
        removed="its database removed",
    )


def _carry_out(
    name: str,
    run: Callable[[Callable[[str], None]], Coroutine[Any, Any, dict[str, Any]]],
    verdict: Callable[[dict[str, Any]], list[str]],
    *,
    as_json: bool,
    summary: Callable[[dict[str, Any]], None],
    removed: str,
) -> None:
    """Carry out one chaos run: ``run(progress)`` (progress lines on stderr, none with
    ``--json``), interruptible by SIGINT/SIGTERM; then its result (one JSON line, or
    ``summary``) and the exit status: 0 when ``verdict`` finds nothing, 1 (one line naming
    what failed, or why the run could not be carried out), 128 + the signal when
    interrupted (``removed`` says what the run's cleanup removed)."""
    from forecourt.cli import _interruptible

    def progress(line: str) -> None:
        if not as_json:
            click.echo(line, err=True)

    try:
        result, interrupted_by = asyncio.run(
            _interruptible(run(progress), on_overdue=_overdue, stop_s=CLEANUP_S)
        )
    except Exception as exc:
        if os.environ.get("FORECOURT_DEBUG", "").lower() in ("1", "true", "yes"):
            raise
        raise _failure(exc) from None
    if interrupted_by is not None or result is None:
        signum = interrupted_by or signal.SIGINT
        click.echo(
            f"chaos run interrupted ({signal.Signals(signum).name}): its processes stopped, "
            + removed,
            err=True,
        )
        sys.exit(128 + signum)
    problems = verdict(result)
    if as_json:
        click.echo(json.dumps(result, separators=(",", ":")))
    else:
        summary(result)
    if problems:
        click.echo(f"chaos {name} failed: {'; '.join(problems)}", err=True)
        sys.exit(1)


def _overdue(signum: int) -> None:
    """The cleanup of an interrupted run took too long: kill every process of the run."""
    from forecourt.chaos.processes import kill_everything

    kill_everything()
    click.echo(f"chaos run interrupted; its cleanup took over {CLEANUP_S:.0f} s", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


def _failure(exc: Exception) -> click.ClickException:
    """One line for the operator, as every forecourt command gives."""
    from forecourt.cli import Failure, explain

    message, code = explain(exc, {})
    return Failure(message, code)


def _print_payments_summary(result: dict[str, Any]) -> None:
    from forecourt.chaos.payments import FIGURES

    click.echo(
        f"{result['orders']} orders ({result['hq_orders']} at HQ, "
        f"{result['provider_trades']} provider trades) in {result['seconds']:g} s; "
        f"crashes: {', '.join(result['crashes']) or 'none'}"
    )
    click.echo("  " + ", ".join(f"{key.replace('_', ' ')} {result[key]}" for key in FIGURES))


def _print_delivery_summary(result: dict[str, Any]) -> None:
    click.echo(
        f"{result['backend']}: {result['sales']} sales, {result['conflicts']} conflicts → "
        f"{result['events']} events in {result['seconds']:g} s"
    )
    click.echo(
        f"  processed {result['processed']}, dead-lettered {result['dead_lettered']} "
        f"({result['dead_lettered_marked']} of {result['marked_to_fail']} marked to fail), "
        f"parked {result['parked']}"
    )
    click.echo(
        f"  lost {result['lost']}, processed twice {result['processed_twice']}, "
        f"pending {result['pending']}"
    )
    republished = result.get("republished")
    click.echo(
        f"  crashes observed: {', '.join(result['crashes']) or 'none'}; outage "
        f"{result['outage_s']:g} s"
        + (f"; {republished} events published twice" if republished else "")
    )


if __name__ == "__main__":
    chaos()
