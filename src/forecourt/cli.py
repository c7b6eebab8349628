"""The ``forecourt`` command line: demo, serve (HQ), relay, worker, events, edge, import,
migrate, credential.

Every command runs inside :class:`ForecourtGroup`, which turns a failure into one line on
stderr with a hint, never a traceback (``FORECOURT_DEBUG=1`` shows it), and an exit status:

* ``0`` done; a service (``serve``, ``relay``, ``worker``, ``edge``) stopped by SIGINT or
  SIGTERM;
* ``1`` the command was right but could not do its work: a database or bus that does not
  answer, an unknown station or dead letter, a demo whose stores disagree, a replay that
  failed;
* ``2`` a usage error: a bad option (click's convention), an unknown consumer, or a missing
  or invalid setting (environment variable, ``forecourt.toml``), which is an option given
  another way;
* ``128 + signal`` (130 for SIGINT, 143 for SIGTERM) a demo or a one-off command that was
  interrupted: it stopped what it started and removed its temporary folder, but has no
  result.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from forecourt.infra.logging import announce, configure_logging

if TYPE_CHECKING:
    import socket

    import uvicorn

    from forecourt.settings import Settings

console = Console(stderr=False)
err = Console(stderr=True)

T = TypeVar("T")

EXIT_FAILURE = 1
EXIT_USAGE = 2
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A stop signal is how these end: status 0.
SERVICES = frozenset({"serve", "relay", "worker", "edge"})
DEBUG_ENV = "FORECOURT_DEBUG"
_DATABASE_URL = "forecourt.database_url"  # ctx.meta keys: what the command talks to
_BUS_URL = "forecourt.bus_url"


# --- failures: one line, one exit status ----------------------------------------------------


class Failure(click.ClickException):
    """A failure described for the operator; click prints ``Error: <message>``."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click declares it on the class


class _Interrupted(KeyboardInterrupt):
    """SIGTERM before a command has its own handling: stop like Ctrl-C does."""

    signum = signal.SIGTERM


def _interrupt(_signum: int, _frame: object) -> None:
    raise _Interrupted


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


def _uses(*, database_url: str | None = None, bus_url: str | None = None) -> None:
    """Note what the running command talks to, for :func:`explain` to name it."""
    meta = click.get_current_context().meta
    if database_url is not None:
        meta[_DATABASE_URL] = database_url
    if bus_url is not None:
        meta[_BUS_URL] = bus_url


class ForecourtGroup(click.Group):
    """A click group whose commands fail in one line (see :func:`explain`) and stop quietly
    on SIGINT/SIGTERM: a command added to the group gets both without doing anything."""

    def invoke(self, ctx: click.Context) -> Any:
        in_main_thread = ctx.resilient_parsing is False and _main_thread()
        previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt as exc:
            # Interrupted before the command set up its own signal handling (or after it).
            if _debug():
                raise
            if ctx.invoked_subcommand in SERVICES:
                ctx.exit(0)
            signum = exc.signum if isinstance(exc, _Interrupted) else signal.SIGINT
            err.print("interrupted", highlight=False)
            ctx.exit(128 + signum)
        except Exception as exc:
            if _debug():
                raise
            message, code = explain(exc, ctx.meta)
            raise Failure(message, code) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and everything behind it: ``__cause__``, ``__context__`` and a DBAPI error's
    driver exception, depth first, each once."""
    seen: set[int] = set()
    out: list[BaseException] = []
    stack: list[BaseException | None] = [exc]
    while stack:
        item = stack.pop(0)
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        out.append(item)
        orig = getattr(item, "orig", None)
        stack.extend(
            [item.__cause__, orig if isinstance(orig, BaseException) else None, item.__context__]
        )
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def explain(exc: BaseException, meta: Mapping[str, Any]) -> tuple[str, int]:
    """The one place that turns an exception into (one line for the operator, exit status).

    Settings problems and unknown consumers are usage errors (2); an unreachable or missing
    service, an unknown station and any other failure are failures (1). Something unforeseen
    still gets one line, naming ``FORECOURT_DEBUG=1`` for the traceback.
    """
    from pydantic import ValidationError
    from pydantic_settings.exceptions import SettingsError

    from forecourt.bootstrap import ServiceUnavailable, UnknownConsumer
    from forecourt.kernel.errors import ForecourtError
    from forecourt.settings import SettingsInvalid, settings_problem

    chain = _causes(exc)
    for item in chain:
        if isinstance(item, SettingsInvalid):
            return item.message, EXIT_USAGE
        if isinstance(item, SettingsError) or (
            isinstance(item, ValidationError) and item.title in ("Settings", "EdgeSettings")
        ):
            return settings_problem(item).message, EXIT_USAGE
        if isinstance(item, UnknownConsumer):  # a name given on the command line or in settings
            return item.message, EXIT_USAGE
    for item in chain:
        if isinstance(item, ServiceUnavailable):
            if item.service == "bus":
                return _bus_problem(item.url, item.cause), EXIT_FAILURE
            return _database_problem(item.url, _causes(item.cause)), EXIT_FAILURE
    if any(_is_database_error(item) for item in chain):
        return _database_problem(meta.get(_DATABASE_URL), chain), EXIT_FAILURE
    for item in chain:
        if isinstance(item, ForecourtError):
            hint = _HINTS.get(item.code) or item.details.get("hint")
            return item.message + (f" — {hint}" if hint else ""), EXIT_FAILURE
    for item in chain:
        if isinstance(item, OSError) and item.strerror:
            where = f" {item.filename}" if item.filename else ""
            return f"cannot use{where}: {item.strerror}", EXIT_FAILURE
    return (
        f"unexpected {type(exc).__name__}: {_first_line(exc)} — run again with "
        f"{DEBUG_ENV}=1 to see the traceback",
        EXIT_FAILURE,
    )


_HINTS = {
    "network.unknown_station": (
        "list the known stations with GET /v1/network/stations on HQ; add a station to the "
        "chain file and load it with: forecourt import FILE.yaml (or: forecourt import --sample)"
    ),
}


def _is_database_error(exc: BaseException) -> bool:
    import sqlite3

    import sqlalchemy.exc

    return isinstance(exc, sqlalchemy.exc.DBAPIError | sqlite3.Error) or isinstance(
        getattr(exc, "sqlstate", None), str
    )


def _redacted(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def _database_problem(url: str | None, chain: list[BaseException]) -> str:
    from sqlalchemy.engine import make_url

    state = next((s for e in chain if isinstance(s := getattr(e, "sqlstate", None), str)), None)
    driver = next((e for e in reversed(chain) if _is_database_error(e)), chain[-1])
    reason = _first_line(driver)
    missing_tables = state in ("42P01", "3F000") or "no such table" in reason
    if missing_tables:
        which = f"the database {_redacted(url)}" if url else "the database"
        return (
            f"{which} has no Forecourt tables yet — load the chain first with: "
            "forecourt import FILE.yaml (or --sample), which creates them "
            "(forecourt migrate creates them alone)"
        )
    if url is None:
        return f"database error: {reason}"
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return f"cannot use the SQLite database {parsed.database}: {reason}"
    host, port, user, name = (
        parsed.host or "localhost",
        parsed.port or 5432,
        parsed.username,
        parsed.database,
    )
    if state == "3D000":
        flags = f"-h {host}" + (f" -p {port}" if port != 5432 else "")
        flags += f" -U {user}" if user else ""
        return (
            f"database {name} does not exist on {host}:{port} — create it with: "
            f"createdb {flags} {name}"
        )
    if state in ("28P01", "28000"):
        return (
            f"PostgreSQL on {host}:{port} refused the login: {reason} — check the user and "
            "password in the database URL (--database-url or FORECOURT_DATABASE_URL)"
        )
    unreachable = next((e for e in chain if isinstance(e, OSError | TimeoutError)), None)
    if unreachable is not None:
        why = (
            unreachable.strerror
            if isinstance(unreachable, OSError) and unreachable.strerror
            else _first_line(unreachable)
        )
        return (
            f"cannot reach PostgreSQL at {host}:{port} ({why}): is it running? "
            f"Check with: pg_isready -h {host} -p {port}"
        )
    return f"database error on {host}:{port}/{name}: {reason}"


def _bus_problem(url: str, cause: BaseException) -> str:
    if isinstance(cause, TimeoutError):
        reason = "no answer in time"
    elif isinstance(cause, OSError) and cause.strerror:
        reason = cause.strerror
    else:
        reason = _first_line(cause)
    return (
        f"cannot reach NATS at {_redacted(url)} ({reason}): is nats-server running with "
        "JetStream (-js)?"
    )


# --- services: run until SIGINT/SIGTERM, then stop in order ---------------------------------


class _Stop:
    """SIGINT and SIGTERM as a request to stop: the first one starts an orderly stop; one
    more, a second or more later, hurries it (uvicorn's second Ctrl-C). A signal that comes
    again at once is the same request: a terminal's Ctrl-C reaches a ``--workers`` child
    both directly and forwarded by the supervisor."""

    HURRY_AFTER_S = 1.0
    # An orderly stop takes seconds (uvicorn waits up to 10 s for open requests). One that
    # takes longer is stuck — e.g. SQLAlchemy's shielded close of an aiosqlite connection
    # whose worker thread is already gone, after a query was cancelled — and the process
    # exits rather than hang until someone kills it.
    STOP_DEADLINE_S = 30.0

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.signum: int | None = None
        self._first_at = 0.0
        self._hurry: list[Callable[[], None]] = []

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._received, sig)

    def on_hurry(self, callback: Callable[[], None]) -> None:
        self._hurry.append(callback)

    def _received(self, signum: int) -> None:
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
            self.requested.set()
            asyncio.get_running_loop().call_later(self.STOP_DEADLINE_S, self._overdue)
        elif time.monotonic() - self._first_at >= self.HURRY_AFTER_S:
            for callback in self._hurry:
                callback()

    def _overdue(self) -> None:
        from forecourt.infra.logging import get_logger

        get_logger("forecourt.cli").error("stop.overdue", deadline_s=self.STOP_DEADLINE_S)
        _hard_exit(EXIT_FAILURE)

    async def race(self, work: Awaitable[Any]) -> bool:
        """Run ``work`` unless a stop comes first (then cancel it); True if it finished."""
        task = asyncio.ensure_future(work)
        await self.until(task)
        if task.done():
            task.result()
            return True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False

    async def until(self, task: asyncio.Future[Any]) -> None:
        """Wait until a stop is requested or ``task`` ends (``task`` is left running)."""
        waiter = asyncio.ensure_future(self.requested.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()


def _hard_exit(code: int) -> None:
    """Exit now, without waiting for threads or finalisers (output flushed first)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _lingering_threads() -> list[Any]:
    """Non-daemon threads still alive, which the interpreter would wait for at exit: the
    worker of an aiosqlite connection lost to a cancellation waits forever (aiosqlite
    issue #259)."""
    import threading

    return [
        t
        for t in threading.enumerate()
        if t is not threading.main_thread() and not t.daemon and t.is_alive()
    ]


def _run_service(main: Callable[[_Stop], Coroutine[Any, Any, None]]) -> None:
    """Run ``main`` on uvloop with SIGINT/SIGTERM handled by a :class:`_Stop`."""
    import uvloop

    async def run() -> None:
        stop = _Stop()
        stop.install()
        await main(stop)

    uvloop.run(run())


def _listen(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    from forecourt.infra.listener import listening_socket

    try:
        return listening_socket(host, port, reuse_port=reuse_port)
    except OSError as exc:
        raise Failure(
            f"cannot listen on {host}:{port}: {exc.strerror or exc} — is another process on "
            "that port? (--port 0 takes a free one)"
        ) from None


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _http_config(app: Any, host: str, port: int) -> uvicorn.Config:
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http="httptools",
        log_level="warning",
        access_log=False,
        lifespan="off",  # the command starts and stops the app's resources itself
        log_config=None,  # uvicorn's records go through our logging: one format
        timeout_graceful_shutdown=10,
    )


def _http_server(config: uvicorn.Config, port_file: Path | None, service: str | None) -> Any:
    """uvicorn on sockets we bound, leaving SIGINT/SIGTERM to :class:`_Stop` (uvicorn
    re-raises a signal once it has shut down: a KeyboardInterrupt, or death by SIGTERM) and
    saying ``listening on http://HOST:PORT`` once it serves (``service`` None: silent)."""
    from forecourt.infra.listener import PortFileServer, port_of

    class Server(PortFileServer):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started and service is not None and sockets:
                url = _url(self.config.host, port_of(sockets[0]))
                announce(f"listening on {url}", service=service, url=url, pid=os.getpid())

    return Server(config, port_file)


async def _serve_until_stopped(server: Any, sock: socket.socket, stop: _Stop) -> None:
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    stop.on_hurry(lambda: setattr(server, "force_exit", True))
    await stop.until(serving)
    server.should_exit = True
    await serving


# --- the group --------------------------------------------------------------------------------


@click.group(cls=ForecourtGroup)
@click.version_option(package_name="forecourt")
def main() -> None:
    """Forecourt: run a chain of fuel stations — edge nodes at stations, one head office.

    Settings come from options, FORECOURT_* environment variables or forecourt.toml. A
    failure is one line on stderr (FORECOURT_DEBUG=1 shows the traceback); exit status 1:
    failed, 2: usage or settings error, 130/143: a demo interrupted by SIGINT/SIGTERM.
    """


# --- demo ---------------------------------------------------------------------------------

_DB_OPTION_HELP = (
    "HQ database URL: postgresql://user@host/db or sqlite:///file.db "
    "(default: FORECOURT_DATABASE_URL or forecourt.toml, else var/forecourt-hq.db)."
)
_CONSUMERS_OPTION_HELP = (
    "Event consumers and jobs to host: comma-separated names (e.g. probe, payments), default "
    "(every one registered as default) or none (default: FORECOURT_CONSUMERS, else default)."
)


@main.command()
@click.option(
    "--duration",
    "duration",
    type=float,
    default=20.0,
    show_default=True,
    help="Wall-clock seconds of customer traffic (draining comes after).",
)
@click.option(
    "--stations",
    type=click.IntRange(1, 50),
    default=3,
    show_default=True,
    help="Stations to run (taken from the sample chain), each with 4 dispensers.",
)
@click.option(
    "--speed",
    type=float,
    default=120.0,
    show_default=True,
    help="Simulated seconds per wall second.",
)
@click.option(
    "--arrivals-per-hour",
    type=float,
    default=150.0,
    show_default=True,
    help="Customers per simulated hour per station.",
)
@click.option(
    "--database-url",
    default=None,
    help="HQ database, e.g. postgresql://postgres@127.0.0.1/forecourt_demo "
    "(default: a SQLite file in the work folder).",
)
@click.option(
    "--bus-url",
    default="memory://",
    show_default=True,
    help="memory:// (in-process) or nats://host:4222 (JetStream).",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep journals, databases and logs here (default: a temporary folder, removed at "
    "the end).",
)
@click.option(
    "--seed",
    type=int,
    default=7,
    show_default=True,
    help="Seed of the simulated customers (arrivals, grades, volumes). Sale counts still "
    "vary from run to run: the demo runs on wall-clock time.",
)
@click.option(
    "--reset",
    is_flag=True,
    help="Start afresh: drop Forecourt's tables in the HQ database (--database-url) and the "
    "station journals and controller state an earlier demo left in --workdir. Without it "
    "the demo refuses a database holding sales or a work folder holding journals.",
)
@click.option(
    "--protocols",
    default="jsonpts,dart,tls",
    show_default=True,
    help="Device protocols at every station: jsonpts and/or dart share the pumps in order, "
    "tls adds a tank gauge; 'jsonpts' alone is one PTS-2 controller per station.",
)
@click.option(
    "--payments/--no-payments",
    default=True,
    show_default=True,
    help="Customers pay at the counter (WeChat Pay and Alipay simulators, cash) through each "
    "edge's POS API, and the reconciliation adds payments; --no-payments leaves them out.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end.")
def demo(
    duration: float,
    stations: int,
    speed: float,
    arrivals_per_hour: float,
    database_url: str | None,
    bus_url: str,
    workdir: Path | None,
    seed: int,
    reset: bool,
    protocols: str,
    payments: bool,
    as_json: bool,
) -> None:
    """HQ + N simulated stations (4 dispensers each), then a three-way reconciliation.

    Exit status 0: the dispensers, the edge journals and HQ agree; 1: they disagree (or the
    demo could not run); 130/143: interrupted by SIGINT/SIGTERM — the simulators are stopped
    and the temporary folder is removed first.
    """
    import shutil
    import tempfile

    from forecourt.demo import DemoOptions, parse_protocols, run_demo
    from forecourt.kernel.errors import ForecourtError
    from forecourt.settings import Settings, load_settings

    try:
        chosen = parse_protocols(protocols)
    except ForecourtError as exc:
        raise click.BadParameter(exc.message, param_hint="--protocols") from None

    own_workdir = workdir is None
    # The CLI owns the temporary folder (not the demo): it removes it only once every process
    # the demo started has ended, however the demo ended.
    folder = workdir or Path(tempfile.mkdtemp(prefix="forecourt-demo-"))

    def clean_up() -> None:
        with _signals_ignored():
            _stop_children()
            if own_workdir:
                shutil.rmtree(folder, ignore_errors=True)

    def interrupted(signum: int, why: str = "") -> str:
        removed = ", temporary folder removed" if own_workdir else ""
        return f"demo interrupted ({signal.Signals(signum).name}{why}): simulators stopped{removed}"

    def overdue(signum: int) -> None:
        clean_up()
        err.print(interrupted(signum, f"; its stop took over {DEMO_STOP_S:.0f} s"))
        _hard_exit(128 + signum)

    try:
        effective_url = database_url or f"sqlite+aiosqlite:///{folder / 'hq.db'}"
        _uses(database_url=effective_url, bus_url=bus_url)
        load_settings(  # the demo's HQ reads the environment and forecourt.toml too
            Settings,
            options={"database_url": "--database-url", "bus_url": "--bus-url"},
            database_url=effective_url,
            bus_url=bus_url,
        )
        configure_logging(os.environ.get("FORECOURT_LOG_LEVEL", "ERROR"), json_lines=False)
        opts = DemoOptions(
            duration_s=duration,
            stations=stations,
            speed=speed,
            arrivals_per_hour=arrivals_per_hour,
            database_url=database_url,
            reset=reset,
            bus_url=bus_url,
            workdir=folder,
            seed=seed,
            protocols=chosen,
            payments=payments,
        )

        def progress(line: str) -> None:
            if not as_json:
                err.print(line, highlight=False)

        if not as_json:
            err.print(
                f"Forecourt demo: {stations} stations ({', '.join(chosen)}), {duration:.0f} s "
                f"at {speed:.0f}x, database {'PostgreSQL' if database_url else 'SQLite'}, "
                f"bus {bus_url}",
                highlight=False,
            )
        _quiet_closed_loop_errors()
        result, interrupted_by = asyncio.run(
            _interruptible(run_demo(opts, progress), on_overdue=overdue)
        )
    finally:
        clean_up()
    if interrupted_by is not None or result is None:
        signum = interrupted_by or signal.SIGINT
        err.print(interrupted(signum), highlight=False)
        if _lingering_threads():
            _hard_exit(128 + signum)  # a lost connection's thread would hold the exit
        sys.exit(128 + signum)
    if as_json:
        click.echo(json.dumps(result, separators=(",", ":")))
    else:
        _print_demo(result)
    audit_broken = not (result.get("audit") or {}).get("verified", True)
    if not result["agree"] or not result["drained"] or audit_broken:
        # Undrained stores are not reconciled, whatever the figures say.
        sys.exit(EXIT_FAILURE)


DEMO_STOP_S = 10.0  # an interrupted demo stops within this (it takes a second or two)


def _quiet_closed_loop_errors() -> None:
    """aiosqlite's worker thread of a connection cancelled while opening delivers its result
    after the event loop has closed and prints a traceback (aiosqlite issue #259): harmless
    at that point, and not the operator's business."""
    import threading

    default = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.exc_value, RuntimeError) and "Event loop is closed" in str(
            args.exc_value
        ):
            return
        default(args)

    threading.excepthook = hook


async def _interruptible(
    work: Coroutine[Any, Any, T],
    *,
    on_overdue: Callable[[int], None],
    stop_s: float = DEMO_STOP_S,
) -> tuple[T | None, int | None]:
    """Run ``work`` as a task that the first SIGINT/SIGTERM cancels (its own ``finally``
    stops what it started); (result, None) or (None, the signal). ``on_overdue(signal)`` is
    called if the task has not ended ``stop_s`` seconds after the signal."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    received: list[int] = []

    def on_signal(signum: int) -> None:
        if received:
            return  # already stopping; a second cancel would cut its cleanup short
        received.append(signum)
        err.print("stopping…", highlight=False)
        task.cancel()
        # call_later runs while asyncio.run waits for cancelled tasks too.
        loop.call_later(stop_s, on_overdue, signum)

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await task, None
    except asyncio.CancelledError:
        if received:
            return None, received[0]
        raise
    except Exception:
        if received:  # failed while being stopped: the interruption is the news
            return None, received[0]
        raise
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """Finish a bounded cleanup even when another Ctrl-C comes."""
    if not _main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _child_pids() -> list[int]:
    """This process's children, from /proc (Linux; elsewhere none are found)."""
    me = os.getpid()
    pids = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = entry.read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == me:
            pids.append(int(entry.parent.name))
    return pids


def _stop_children(timeout_s: float = 5.0) -> None:
    """End (SIGTERM, then SIGKILL) and reap any child process still running: a simulator
    started while the demo was being cancelled is not known to the demo's own stop."""
    pids = _child_pids()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        for pid in list(alive):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid  # reaped elsewhere (its Popen)
            if done:
                alive.discard(pid)
        time.sleep(0.05)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def _print_demo(result: dict[str, Any]) -> None:
    table = Table(title="Reconciliation: dispensers vs edge journals vs HQ")
    for col in ("station", "grade", "sales", "litres", "amount", "edge journal", "HQ"):
        table.add_column(col, justify="left" if col in ("station", "grade") else "right")

    def versus(d: dict[str, int], x: dict[str, int]) -> str:
        if d == x:
            return "[green]equal[/green]"
        return (
            f"[red]{x['sales'] - d['sales']:+d} sales {x['volume_ml'] - d['volume_ml']:+d} ml "
            f"{x['amount_minor'] - d['amount_minor']:+d} fen[/red]"
        )

    for row in result["per_station_grade"]:
        d = row["dispensers"]
        table.add_row(
            row["station"],
            row["grade"],
            str(d["sales"]),
            f"{d['volume_ml'] / 1000:.2f}",
            f"{d['amount_minor'] / 100:.2f}",
            versus(d, row["edges"]),
            versus(d, row["hq"]),
        )
    console.print(table)
    verdict = "[green]AGREE[/green]" if result["agree"] else "[red]DISAGREE[/red]"
    console.print(
        f"sales at dispensers/edges/HQ: {result['sales_at_dispensers']}/{result['sales_at_edges']}/"
        f"{result['sales_at_hq']}  lost {result['lost']}  duplicates {result['duplicates']}  "
        f"quarantined {result['quarantined']}  drained {result['drained']}  {verdict}"
    )
    audit = result.get("audit") or {}
    if audit:
        checked = (
            "[green]chain and checkpoints verified[/green]"
            if audit["verified"]
            else f"[red]BROKEN: {audit['problem']}[/red]"
        )
        console.print(
            f"audit trail: {audit['records']} records ({audit['from_station_edges']} from the "
            f"station edges), {audit['checkpoints']} signed checkpoints, {checked}"
        )


def _hq_settings(database_url: str | None, **given: Any) -> Settings:
    """HQ settings, with the command's options (``None``: not given) winning."""
    from forecourt.settings import Settings, load_settings

    given = {"database_url": database_url or None, **given}
    overrides = {key: value for key, value in given.items() if value is not None}
    options = {key: f"--{key.replace('_', '-')}" for key in given}
    settings = load_settings(Settings, options=options, **overrides)
    _uses(database_url=settings.database_url, bus_url=settings.bus_url)
    return settings


# --- head office ----------------------------------------------------------------------------


@main.command()
@click.option(
    "--services",
    default=None,
    help="Comma-separated contexts to serve, e.g. network,sales or sales "
    "(default: FORECOURT_SERVICES, else all).",
)
@click.option("--host", default=None, help="Address to listen on (default: 127.0.0.1).")
@click.option(
    "--port", type=int, default=None, help="HTTP port (default: 8400; 0: one the kernel picks)."
)
@click.option(
    "--port-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the port HQ listens on to this file (atomically) once it serves requests.",
)
@click.option("--database-url", default=None, help=_DB_OPTION_HELP)
@click.option(
    "--bus-url",
    default=None,
    help="Event bus: memory:// (in-process) or nats://host:4222 (JetStream) "
    "(default: FORECOURT_BUS_URL, else memory://).",
)
@click.option(
    "--reuse-port", is_flag=True, hidden=True, help="Bind with SO_REUSEPORT (worker processes)."
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=None,
    help="HTTP worker processes (more than one needs PostgreSQL, and adds a relay process "
    "and a consumer worker process).",
)
@click.option("--consumers", default=None, help=_CONSUMERS_OPTION_HELP)
def serve(
    services: str | None,
    host: str | None,
    port: int | None,
    port_file: Path | None,
    database_url: str | None,
    bus_url: str | None,
    workers: int | None,
    consumers: str | None,
    reuse_port: bool,
) -> None:
    """Run the head office (HTTP API, outbox relay, event consumers) on the configured
    database and bus.

    Says "listening on http://HOST:PORT" once it serves; SIGINT or SIGTERM stop it in order
    (exit status 0). With --workers N: N HTTP processes, one relay process and one
    `forecourt worker` process hosting the consumers.
    """
    from forecourt.bootstrap import select_consumers
    from forecourt.infra.db import normalise_url
    from forecourt.settings import Settings, load_settings

    given = {
        "services": services,
        "host": host,
        "port": port,
        "database_url": database_url,
        "bus_url": bus_url,
        "workers": workers,
        "consumers": consumers,
    }
    overrides = {key: value for key, value in given.items() if value is not None}
    settings = load_settings(
        Settings, options={key: f"--{key.replace('_', '-')}" for key in given}, **overrides
    )
    _uses(database_url=settings.database_url, bus_url=settings.bus_url)
    select_consumers(settings.consumers)  # an unknown name is refused before anything starts
    # Options become environment variables so that every worker process sees them.
    for key, value in overrides.items():
        os.environ[f"FORECOURT_{key.upper()}"] = str(value)
    configure_logging(settings.log_level, settings.log_json)
    if settings.workers > 1 and normalise_url(settings.database_url).startswith("sqlite"):
        raise click.UsageError("several workers need PostgreSQL (SQLite has one writer)")
    if settings.workers > 1:
        sys.exit(_supervise_workers(settings, port_file))
    _serve_one(settings, reuse_port=reuse_port, port_file=port_file)


def _serve_one(settings: Settings, *, reuse_port: bool, port_file: Path | None) -> None:
    """One HQ process: connect and migrate, then uvicorn (httptools, on uvloop) on a socket
    this process binds and listens on itself (``port`` 0: the kernel picks one)."""
    from forecourt.bootstrap import build_head_office
    from forecourt.kernel.clock import SimulatedClock

    # A worker (``reuse_port``) binds its own socket with SO_REUSEPORT: the kernel spreads
    # connections over the workers evenly, where one shared accept queue lets one worker
    # take most of them. The supervisor says "listening" for all of them.
    sock = _listen(settings.host, settings.port, reuse_port=reuse_port)

    async def run(stop: _Stop) -> None:
        # A simulation (FORECOURT_SIM_* set) runs HQ in the same simulated time as its stations.
        hq = build_head_office(settings, clock=SimulatedClock.from_env(dict(os.environ)))
        try:
            if not await stop.race(hq.start()):
                return
            config = _http_config(hq.app, settings.host, settings.port)
            server = _http_server(config, port_file, None if reuse_port else "hq")
            await _serve_until_stopped(server, sock, stop)
        finally:
            await hq.stop()

    try:
        _run_service(run)
    finally:
        sock.close()


async def _check_services(settings: Settings) -> None:
    """Connect to the database and the bus once, so that a supervisor reports a missing one
    in one line before it starts workers that would each report it."""
    from forecourt.bootstrap import build_bus, open_bus, open_database
    from forecourt.infra.db import Database

    db = Database(settings.database_url, application_name="forecourt-supervisor")
    try:
        await open_database(db)
        if settings.bus_url.startswith("memory"):
            return  # the in-process bus is the database: nothing else to reach
        bus = build_bus(settings, db)
        try:
            await open_bus(bus, settings.bus_url)
        finally:
            await bus.close()
    finally:
        await db.dispose()


def _hosts_consumers(settings: Settings) -> bool:
    """Whether a process with these settings runs a consumer host (as HeadOffice.start
    decides: unless told ``none``, even with no consumer chosen, for its retention)."""
    from forecourt.bootstrap import select_consumers, select_jobs

    return (
        bool(select_consumers(settings.consumers))
        or bool(select_jobs(settings.consumers))
        or "none" not in settings.consumers
    )


WORKERS_START_S = 120.0  # every HTTP worker listens within this, or the supervisor gives up
WORKERS_STOP_S = 20.0  # then they are killed


def _metrics_directory() -> tuple[Path, bool]:
    """The directory the worker processes write their metrics to, and whether it is ours
    to remove: ``PROMETHEUS_MULTIPROC_DIR`` when the operator set it (emptied of an earlier
    run's files, as the client library requires), else a new temporary one."""
    import tempfile

    from forecourt.infra.http import MULTIPROCESS_ENV

    given = os.environ.get(MULTIPROCESS_ENV)
    if not given:
        return Path(tempfile.mkdtemp(prefix="forecourt-metrics-")), True
    directory = Path(given)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink()
    except OSError as exc:
        raise Failure(
            f"cannot use {MULTIPROCESS_ENV}={given}: {exc.strerror or exc} (point it at a "
            "directory this user can write, or unset it)"
        ) from None
    return directory, False


def _supervise_workers(settings: Settings, port_file: Path | None) -> int:
    """Start ``settings.workers`` single-worker HQ processes on the same port, a relay
    process and (unless the consumers are ``none``) a ``forecourt worker`` process hosting
    the consumers; stop them together. Returns the exit status.

    The supervisor binds the port first (SO_REUSEPORT, never listening, so it takes no
    connection): ``port`` 0 becomes a real number that every worker then binds too, and that
    nobody else can take while they start. The port file is written, and "listening on" said,
    once every worker has written its own port file, that is once every worker serves.
    SIGINT/SIGTERM are forwarded to every child once; the status is 0 when all then end so.
    """
    import shutil
    import subprocess
    import tempfile

    from forecourt.infra.http import MULTIPROCESS_ENV
    from forecourt.infra.listener import bound_socket, port_of, remove_port_file, write_port_file

    asyncio.run(_check_services(settings))
    host, count = settings.host, settings.workers
    if port_file is not None:
        remove_port_file(port_file)
    try:
        reserved = bound_socket(host, settings.port, reuse_port=True)
    except OSError as exc:
        raise Failure(f"cannot bind {host}:{settings.port}: {exc.strerror or exc}") from None
    chosen = port_of(reserved)
    ready_dir = Path(tempfile.mkdtemp(prefix="forecourt-workers-"))
    worker_files = [ready_dir / f"worker-{i}.port" for i in range(count)]
    # HTTP workers do not relay; one relay process of its own gets a fair share of the CPU
    # (inside busy HTTP workers it would starve and the outbox backlog would grow).
    args = [sys.executable, "-m", "forecourt.cli", "serve", "--workers", "1", "--reuse-port"]
    args += ["--port", str(chosen)]
    # One metrics directory for the HTTP workers and the relay (the client library's
    # multiprocess mode): a scrape reaching any worker answers every process's counts.
    metrics_dir, own_metrics_dir = _metrics_directory()
    shared_env = {**os.environ, MULTIPROCESS_ENV: str(metrics_dir)}
    http_env = {**shared_env, "FORECOURT_RELAY": "false", "FORECOURT_CONSUMERS": "none"}
    # The consumer worker serves its own metrics on its own port: not added in twice.
    worker_env = {k: v for k, v in os.environ.items() if k != MULTIPROCESS_ENV}
    children: list[subprocess.Popen[bytes]] = []
    stopping: list[int] = []

    def forward(signum: int) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)
        forward(signum)  # a later one too: the workers hurry (see _Stop)

    # Installed before the first child starts: no signal can fall between the two.
    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    try:
        for path in worker_files:
            children.append(subprocess.Popen([*args, "--port-file", str(path)], env=http_env))
        children.append(
            subprocess.Popen([sys.executable, "-m", "forecourt.cli", "relay"], env=shared_env)
        )
        if _hosts_consumers(settings):
            # The consumers get a process of their own too (FORECOURT_CONSUMERS as given).
            children.append(
                subprocess.Popen([sys.executable, "-m", "forecourt.cli", "worker"], env=worker_env)
            )
        started_by = time.monotonic() + WORKERS_START_S
        starting = True
        failed = False
        while all(child.poll() is None for child in children):
            if starting and all(path.exists() for path in worker_files):
                starting = False
                if port_file is not None:
                    write_port_file(port_file, chosen)
                url = _url(host, chosen)
                announce(f"listening on {url}", service="hq", url=url, workers=count)
            elif starting and not stopping and time.monotonic() > started_by:
                err.print(f"HQ workers not serving after {WORKERS_START_S:.0f} s")
                failed = True
                break
            time.sleep(0.05)
        if port_file is not None:
            remove_port_file(port_file)
        if not stopping:
            # One died (or they never all started): stop the rest, let the process manager
            # restart us.
            forward(signal.SIGTERM)
        deadline = time.monotonic() + WORKERS_STOP_S
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        reserved.close()
        shutil.rmtree(ready_dir, ignore_errors=True)
        if own_metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    codes = max((abs(c.returncode or 0) for c in children), default=0)
    return codes or int(failed)


@main.command()
def relay() -> None:
    """Run only the outbox relay (publishes committed events to the bus) until stopped
    (SIGINT or SIGTERM: exit status 0). With devices_mqtt_url set, it also runs the devices
    context's telemetry subscriber (serve --workers N runs it here, once, not in each HTTP
    worker)."""
    from prometheus_client import CollectorRegistry

    from forecourt.bootstrap import (
        build_bus,
        build_devices,
        build_relay,
        open_bus,
        open_database,
        runs_devices,
    )
    from forecourt.infra.db import Database
    from forecourt.infra.migrate import upgrade
    from forecourt.network.handlers import DbStationDirectory

    settings = _hq_settings(None)
    configure_logging(settings.log_level, settings.log_json)

    async def run(stop: _Stop) -> None:
        db = Database(settings.database_url, application_name="forecourt-relay")
        bus = build_bus(settings, db)
        worker = build_relay(db, bus, settings)
        telemetry = None
        if runs_devices(settings) and settings.devices_mqtt_url is not None:
            _, telemetry = build_devices(settings, db, DbStationDirectory(db), CollectorRegistry())

        async def start() -> None:
            await open_database(db)
            await upgrade(db)
            await open_bus(bus, settings.bus_url)
            worker.start()
            if telemetry is not None:
                telemetry.start()

        try:
            if await stop.race(start()):
                await stop.requested.wait()
        finally:
            if telemetry is not None:
                await telemetry.stop()
            await worker.stop()
            await bus.close()
            await db.dispose()

    _run_service(run)


@main.command()
@click.option("--consumers", default=None, help=_CONSUMERS_OPTION_HELP)
@click.option("--database-url", default=None, help=_DB_OPTION_HELP)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve the consumers' Prometheus metrics on http://127.0.0.1:PORT/metrics "
    "(0: a port the kernel picks; default: FORECOURT_WORKER_METRICS_PORT, else none).",
)
def worker(consumers: str | None, database_url: str | None, metrics_port: int | None) -> None:
    """Host event consumers and background jobs (payments: the payment recovery worker; no
    HTTP API, no relay) on the configured database and bus until stopped (SIGINT or SIGTERM:
    exit status 0).

    Migrates the database like serve, then says "consumers running: NAME, ..." once every
    consumer is subscribed. Processes hosting the same consumer share its events. With
    --metrics-port it says "metrics on http://HOST:PORT/metrics" (per-consumer processed,
    dead-lettered, retries, lag, pending, outage).
    """
    from forecourt.bootstrap import (
        build_bus,
        build_consumer_host,
        open_bus,
        open_database,
        select_consumers,
        select_jobs,
    )
    from forecourt.infra.background import BackgroundService
    from forecourt.infra.db import Database
    from forecourt.infra.migrate import upgrade
    from forecourt.kernel.clock import SimulatedClock

    settings = _hq_settings(database_url, consumers=consumers)
    configure_logging(settings.log_level, settings.log_json)
    chosen = select_consumers(settings.consumers)
    jobs = select_jobs(settings.consumers)
    names = [c.name for c in chosen] + [j.name for j in jobs]

    async def run(stop: _Stop) -> None:
        # A simulation (FORECOURT_SIM_* set) runs in the same simulated time as HQ.
        clock = SimulatedClock.from_env(dict(os.environ))
        db = Database(settings.database_url, clock=clock, application_name="forecourt-worker")
        bus = build_bus(settings, db)
        port = metrics_port if metrics_port is not None else settings.worker_metrics_port
        registry = CollectorRegistry() if port is not None else None
        host = build_consumer_host(db, bus, settings, registry, chosen)
        # Built before anything starts: a provider half configured is refused at once.
        running: list[BackgroundService] = [job.build(settings, db) for job in jobs]
        metrics_server: Any = None
        if registry is not None and port is not None:
            try:
                metrics_server, _thread = start_http_server(
                    port, addr=settings.host, registry=registry
                )
            except OSError as exc:
                raise Failure(
                    f"cannot serve metrics on {settings.host}:{port}: {exc.strerror or exc}"
                ) from None
            url = f"{_url(settings.host, metrics_server.server_port)}/metrics"
            announce(f"metrics on {url}", service="worker", url=url)

        async def start() -> None:
            await open_database(db)
            await upgrade(db)
            await open_bus(bus, settings.bus_url)
            await host.start()
            for service in running:
                service.start()
            announce(
                f"consumers running: {', '.join(names) or 'none'}",
                service="worker",
                consumers=names,
                pid=os.getpid(),
            )

        try:
            if await stop.race(start()):
                await stop.requested.wait()
        finally:
            for service in running:
                await service.stop()
            await host.stop()
            await bus.close()
            await db.dispose()
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()

    from prometheus_client import CollectorRegistry, start_http_server

    _run_service(run)


# --- events: dead letters and the consumers' backlog -----------------------------------------

_REPLAY_POLL_S = 0.2
_ID_CHUNK = 500  # ids per IN (...) list: well under SQLite's limit of bound parameters


@main.group()
def events() -> None:
    """Operate the event consumers: list, show and replay dead letters; backlog status."""


def _events_run(settings: Settings, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``work(db)`` on the HQ database (connected, schema brought up to date first)."""
    from forecourt.bootstrap import open_database
    from forecourt.infra.db import Database
    from forecourt.infra.migrate import upgrade

    async def run() -> T:
        db = Database(settings.database_url, application_name="forecourt-events")
        await open_database(db)
        try:
            await upgrade(db)
            return await work(db)
        finally:
            await db.dispose()

    return asyncio.run(run())


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _first_text_line(text: str, limit: int = 100) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _when(value: Any) -> str:
    return value.isoformat(sep=" ", timespec="seconds") if value is not None else "-"


def _wide_console() -> Console:
    """stdout for a table: as wide as the table when it is not a terminal (a pipe, a file),
    so a row stays one line for grep."""
    return console if console.is_terminal else Console(width=1000, highlight=False)


_JSON_OPTION_HELP = "Print JSON instead of a table."


@events.command("dead-letters")
@click.option("--consumer", default=None, help="Only this consumer's dead letters.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Show at most this many, oldest first.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print a JSON list (every field, headers and body)."
)
@click.option("--database-url", default=None, help=_DB_OPTION_HELP)
def dead_letters(consumer: str | None, limit: int, as_json: bool, database_url: str | None) -> None:
    """List dead letters: events a consumer gave up on, oldest first."""
    from forecourt.infra.consumers import count_dead_letters, list_dead_letters

    settings = _hq_settings(database_url)

    async def work(db: Any) -> tuple[list[Any], dict[str, int]]:
        letters = await list_dead_letters(db, consumer=consumer, limit=limit)
        return letters, await count_dead_letters(db)

    letters, counts = _events_run(settings, work)
    if as_json:
        click.echo(json.dumps([letter.to_dict() for letter in letters], indent=2))
        return
    of = f" of consumer {consumer}" if consumer else ""
    if not letters:
        click.echo(f"no dead letters{of}")
        return
    from rich.text import Text

    table = Table(title=f"Dead letters{of}", title_justify="left")
    for column in ("id", "consumer", "event id", "type", "deliveries", "dead at", "error"):
        table.add_column(column, justify="right" if column in ("id", "deliveries") else "left")
    for letter in letters:
        cells = (
            str(letter.id),
            letter.consumer,
            letter.event_id,
            letter.type,
            str(letter.deliveries),
            _when(letter.dead_at),
            _first_text_line(letter.error),
        )
        table.add_row(*(Text(cell) for cell in cells))  # Text: no markup in error messages
    _wide_console().print(table)
    total = counts.get(consumer, 0) if consumer else sum(counts.values())
    if total > len(letters):
        click.echo(f"showing {len(letters)} of {total}; --limit {total} shows every one")
    marked = sum(letter.replay_requested_at is not None for letter in letters)
    if marked:
        click.echo(f"{_plural(marked, 'dead letter')} marked for replay")
    click.echo(
        "see one with: forecourt events show ID; replay with: forecourt events replay ID (or --all)"
    )


@events.command("show")
@click.argument("dead_letter_id", metavar="ID", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print it as one JSON object.")
@click.option("--database-url", default=None, help=_DB_OPTION_HELP)
def show(dead_letter_id: int, as_json: bool, database_url: str | None) -> None:
    """Show one dead letter in full: headers, body (pretty-printed when JSON), error."""
    from forecourt.infra.consumers import get_dead_letter

    settings = _hq_settings(database_url)
    letter = _events_run(settings, lambda db: get_dead_letter(db, dead_letter_id))
    if letter is None:
        raise Failure(
            f"no dead letter {dead_letter_id} — list them with: forecourt events dead-letters"
        )
    if as_json:
        click.echo(json.dumps(letter.to_dict(), indent=2))
        return
    replay = (
        f"requested at {_when(letter.replay_requested_at)}"
        if letter.replay_requested_at is not None
        else "not requested"
    )
    lines = [
        f"dead letter {letter.id}",
        f"  consumer:    {letter.consumer}",
        f"  event id:    {letter.event_id}",
        f"  type:        {letter.type}",
        f"  subject:     {letter.subject or '-'}",
        f"  deliveries:  {letter.deliveries}",
        f"  dead at:     {_when(letter.dead_at)}",
        f"  replays:     {letter.replays} (replay {replay})",
        "error:",
        *(f"  {line}" for line in (letter.error.splitlines() or [""])),
        "headers:",
        *(f"  {name}: {value}" for name, value in sorted(letter.headers.items())),
        "body:",
    ]
    try:
        body = json.dumps(json.loads(letter.body), indent=2, ensure_ascii=False)
    except ValueError:
        body = letter.body
    lines.extend(f"  {line}" for line in body.splitlines())
    click.echo("\n".join(lines))


async def _dead_letter_rows(db: Any, ids: list[int] | None, consumer: str | None) -> dict[int, Any]:
    """(id, consumer, error, replay_requested_at) of the dead letters ``ids`` (None: every
    one), of ``consumer`` when named, by id."""
    import sqlalchemy as sa

    from forecourt.infra.db import dead_letter_table as t

    columns = (t.c.id, t.c.consumer, t.c.error, t.c.replay_requested_at)
    chunks: list[list[int] | None] = (
        [None] if ids is None else [ids[i : i + _ID_CHUNK] for i in range(0, len(ids), _ID_CHUNK)]
    )
    found: dict[int, Any] = {}
    async with db.connection() as conn:
        for chunk in chunks:
            query = sa.select(*columns).order_by(t.c.id)
            if chunk is not None:
                query = query.where(t.c.id.in_(chunk))
            if consumer is not None:
                query = query.where(t.c.consumer == consumer)
            found.update({row.id: row for row in (await conn.execute(query)).all()})
    return found


@events.command("replay")
@click.argument("ids", metavar="[ID]...", nargs=-1, type=int)
@click.option(
    "--all", "every", is_flag=True, help="Every dead letter (of --consumer when it is given)."
)
@click.option("--consumer", default=None, help="Only dead letters of this consumer.")
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Wait up to SECONDS until the consumer host has replayed them, and report which "
    "took effect and which failed again (exit status 1 unless every one took effect).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as one JSON object.")
@click.option("--database-url", default=None, help=_DB_OPTION_HELP)
def replay(
    ids: tuple[int, ...],
    every: bool,
    consumer: str | None,
    wait_s: float | None,
    as_json: bool,
    database_url: str | None,
) -> None:
    """Mark dead letters (IDs, or --all) for replay.

    A running consumer host (forecourt serve, or forecourt worker) hosting their consumer
    runs each marked one through its consumer again within seconds: one that takes effect
    leaves the dead letters, one that fails again stays with its new error.
    """
    from forecourt.bootstrap import known_consumers
    from forecourt.infra.consumers import request_replay

    if not ids and not every:
        raise click.UsageError(
            "give the IDs of dead letters to replay, or --all "
            "(list them with: forecourt events dead-letters)"
        )
    if ids and every:
        raise click.UsageError("give the IDs of dead letters to replay or --all, not both")
    settings = _hq_settings(database_url)
    wanted = list(dict.fromkeys(ids))

    async def work(db: Any) -> dict[str, Any]:
        found = await _dead_letter_rows(db, wanted or None, consumer)
        unknown = [i for i in wanted if i not in found]
        if unknown:
            return {"unknown": unknown}
        marked = sorted(found)
        for start in range(0, len(marked), _ID_CHUNK):
            await request_replay(db, marked[start : start + _ID_CHUNK])
        outcome: dict[str, Any] = {
            "marked": marked,
            "consumers": sorted({found[i].consumer for i in marked}),
        }
        if wait_s is None or not marked:
            return outcome
        deadline = time.monotonic() + wait_s
        while True:
            rows = await _dead_letter_rows(db, marked, None)
            waiting = [i for i in marked if i in rows and rows[i].replay_requested_at is not None]
            if not waiting or time.monotonic() >= deadline:
                break
            await asyncio.sleep(_REPLAY_POLL_S)
        outcome["replayed"] = [i for i in marked if i not in rows]
        outcome["failed"] = [
            {"id": i, "consumer": rows[i].consumer, "error": _first_text_line(rows[i].error, 500)}
            for i in marked
            if i in rows and rows[i].replay_requested_at is None
        ]
        outcome["waiting"] = waiting
        return outcome

    outcome = _events_run(settings, work)
    if "unknown" in outcome:
        unknown = outcome["unknown"]
        of = f" of consumer {consumer}" if consumer else ""
        which = "dead letter" if len(unknown) == 1 else "dead letters"
        raise Failure(
            f"no {which} {', '.join(map(str, unknown))}{of} (nothing marked) — list them "
            "with: forecourt events dead-letters"
        )
    marked, consumers = outcome["marked"], outcome["consumers"]
    unhosted = [name for name in consumers if name not in known_consumers()]
    waited = "replayed" in outcome
    ok = not waited or (not outcome["failed"] and not outcome["waiting"])
    if as_json:
        click.echo(json.dumps(outcome, indent=2))
        if not ok:
            sys.exit(EXIT_FAILURE)
        return
    if not marked:
        click.echo(f"no dead letters{f' of consumer {consumer}' if consumer else ''} to replay")
        return
    them = "it" if len(marked) == 1 else "them"
    click.echo(
        f"marked {_plural(len(marked), 'dead letter')} for replay "
        f"({', '.join(consumers)}): a running consumer host (forecourt serve, or forecourt "
        f"worker) hosting {'its' if len(marked) == 1 else 'their'} consumer replays {them} "
        "within seconds"
    )
    for name in unhosted:
        click.echo(f"warning: no consumer named {name} is registered: nothing will replay {them}")
    if not waited:
        return
    failed, waiting = outcome["failed"], outcome["waiting"]
    click.echo(
        f"replayed {len(outcome['replayed'])}, failed again {len(failed)}"
        + (f", not taken yet {len(waiting)}" if waiting else "")
    )
    for item in failed:
        click.echo(f"  {item['id']} ({item['consumer']}) failed again: {item['error']}")
    if waiting:
        click.echo(
            f"  {_plural(len(waiting), 'dead letter')} still marked after {wait_s:g} s: is "
            f"forecourt serve or forecourt worker --consumers {','.join(consumers)} running "
            "on this database? They stay marked and are replayed once it runs."
        )
    if not ok:
        sys.exit(EXIT_FAILURE)


@events.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--database-url", default=None, help=_DB_OPTION_HELP)
@click.option(
    "--bus-url",
    default=None,
    help="Event bus to ask for pending events: memory:// or nats://host:4222 "
    "(default: FORECOURT_BUS_URL, else memory://).",
)
def status(as_json: bool, database_url: str | None, bus_url: str | None) -> None:
    """Per consumer: events pending on the bus and dead letters; the outbox backlog (events
    not yet published), parked events (refused by the broker for good) and, on NATS, how
    full the stream is. Changes nothing, on the bus either."""
    import sqlalchemy as sa

    from forecourt.bootstrap import build_bus, known_consumers, open_bus
    from forecourt.infra.consumers import count_dead_letters
    from forecourt.infra.db import outbox_table
    from forecourt.infra.relay import count_parked

    settings = _hq_settings(database_url, bus_url=bus_url)
    registered = sorted(known_consumers())

    async def work(db: Any) -> dict[str, Any]:
        bus = build_bus(settings, db, manage_stream=False)
        await open_bus(bus, settings.bus_url)
        try:
            pending = {name: await bus.pending(name) for name in registered}
            stream = await _stream_usage(bus)
        finally:
            await bus.close()
        dead = await count_dead_letters(db)
        async with db.connection() as conn:
            backlog = await conn.scalar(sa.select(sa.func.count()).select_from(outbox_table))
        consumers = {
            name: {
                "pending": pending.get(name),
                "dead_letters": dead.get(name, 0),
                "registered": name in registered,
            }
            for name in sorted({*registered, *dead})
        }
        return {
            "consumers": consumers,
            "outbox_backlog": int(backlog or 0),
            "outbox_parked": await count_parked(db),
            "stream": stream,
        }

    figures = _events_run(settings, work)
    if as_json:
        click.echo(json.dumps(figures, indent=2))
        return
    table = Table(title="Consumers", title_justify="left")
    for column in ("consumer", "pending", "dead letters"):
        table.add_column(column, justify="left" if column == "consumer" else "right")
    for name, row in figures["consumers"].items():
        pending = "-" if row["pending"] is None else str(row["pending"])
        label = name if row["registered"] else f"{name} (not registered)"
        table.add_row(label, pending, str(row["dead_letters"]))
    _wide_console().print(table)
    click.echo(
        f"outbox backlog: {figures['outbox_backlog']} (not yet published); "
        f"parked: {figures['outbox_parked']} (refused by the broker)"
    )
    stream = figures["stream"]
    if stream is not None:
        click.echo(
            f"stream: {stream['messages']} events, {stream['bytes']} bytes, "
            f"{float(stream['usage']):.0%} of its limit"
        )
    if any(row["pending"] is None for row in figures["consumers"].values()):
        click.echo("pending '-': the bus has no subscription of that consumer yet")


@events.command("parked")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.option("--database-url", default=None, help=_DB_OPTION_HELP)
def parked(as_json: bool, database_url: str | None) -> None:
    """List the events the broker refused for good (kept in platform.outbox_parked with the
    reason; the relay published everything behind them)."""
    import sqlalchemy as sa

    from forecourt.infra.db import outbox_parked_table

    settings = _hq_settings(database_url)

    async def work(db: Any) -> list[dict[str, Any]]:
        t = outbox_parked_table
        query = sa.select(t.c.id, t.c.event_id, t.c.type, t.c.parked_at, t.c.reason, t.c.data)
        async with db.connection() as conn:
            rows = (await conn.execute(query.order_by(t.c.id))).all()
        return [
            {
                "id": r.id,
                "event_id": r.event_id,
                "type": r.type,
                "parked_at": r.parked_at.isoformat(),
                "reason": r.reason,
                "bytes": len(r.data.encode()),
            }
            for r in rows
        ]

    rows = _events_run(settings, work)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no parked events")
        return
    table = Table(title="Parked events", title_justify="left")
    for column in ("id", "event id", "type", "bytes", "parked at", "reason"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            str(r["id"]),
            r["event_id"],
            r["type"],
            str(r["bytes"]),
            r["parked_at"],
            _first_text_line(r["reason"]),
        )
    _wide_console().print(table)
    click.echo("put them back with: forecourt events requeue ID... | --all")


@events.command("requeue")
@click.argument("ids", nargs=-1, type=int)
@click.option("--all", "every", is_flag=True, help="Every parked event.")
@click.option("--database-url", default=None, help=_DB_OPTION_HELP)
def requeue(ids: tuple[int, ...], every: bool, database_url: str | None) -> None:
    """Move parked events back into the outbox, to be published again (e.g. once the
    stream's limits allow them)."""
    from forecourt.infra.db import outbox_parked_table
    from forecourt.infra.relay import requeue_parked

    if bool(ids) == every:
        raise click.UsageError("name parked event ids or --all (see: forecourt events parked)")
    settings = _hq_settings(database_url)

    async def work(db: Any) -> tuple[int, list[int]]:
        import sqlalchemy as sa

        t = outbox_parked_table
        if ids:
            async with db.connection() as conn:
                known = set(
                    (await conn.execute(sa.select(t.c.id).where(t.c.id.in_(ids)))).scalars()
                )
            unknown = sorted(set(ids) - known)
            if unknown:
                return 0, unknown
        return await requeue_parked(db, list(ids) if ids else None), []

    moved, unknown = _events_run(settings, work)
    if unknown:
        raise Failure(
            f"no parked event {', '.join(map(str, unknown))} — list them with: "
            "forecourt events parked"
        )
    click.echo(f"{_plural(moved, 'event')} back in the outbox; the relay publishes them")


async def _stream_usage(bus: Any) -> dict[str, Any] | None:
    """The NATS stream's figures (messages, bytes, limits, usage); None on the in-process
    bus or when the stream does not exist."""
    usage = getattr(bus, "stream_usage", None)
    if usage is None:
        return None
    import nats.js.errors

    try:
        figures: dict[str, Any] = await usage()
    except nats.js.errors.NotFoundError:
        return None
    return figures


@main.command()
@click.option("--database-url", default=None, help=_DB_OPTION_HELP)
def migrate(database_url: str | None) -> None:
    """Bring the HQ database schema up to date (every context's tree)."""
    from forecourt.bootstrap import open_database
    from forecourt.infra.db import Database
    from forecourt.infra.migrate import upgrade

    settings = _hq_settings(database_url)

    async def run() -> None:
        db = Database(settings.database_url)
        await open_database(db)
        try:
            await upgrade(db)
        finally:
            await db.dispose()

    asyncio.run(run())
    console.print("schema up to date")


@main.command("import")
@click.argument(
    "path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=False
)
@click.option("--database-url", default=None, help=_DB_OPTION_HELP)
@click.option("--sample", is_flag=True, help="Import the sample chain shipped with Forecourt.")
def import_(path: Path | None, database_url: str | None, sample: bool) -> None:
    """Import chain master data (regions, stations, equipment, grades, prices) from YAML."""
    from forecourt.bootstrap import open_database
    from forecourt.infra.db import Database
    from forecourt.infra.migrate import upgrade
    from forecourt.network.handlers import SAMPLE_CHAIN, import_chain, load_chain_file

    if path is None and not sample:
        raise click.UsageError("give a YAML file or --sample")
    chain = load_chain_file(SAMPLE_CHAIN if sample else path)  # type: ignore[arg-type]
    settings = _hq_settings(database_url)

    async def run() -> Any:
        db = Database(settings.database_url)
        await open_database(db)
        try:
            await upgrade(db)
            return await import_chain(db, chain)
        finally:
            await db.dispose()

    result = asyncio.run(run())
    if not result.changed:
        console.print(
            f"unchanged: revision {result.revision} kept ({result.stations} stations, "
            "nothing differs from what HQ holds)"
        )
        return
    console.print(
        f"imported revision {result.revision}: {result.stations} stations, "
        f"{result.prices_added} new prices"
    )


class _CredentialGroup(ForecourtGroup):
    """``forecourt credential STATION`` still issues one (as ``credential issue STATION``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["issue", *args]
        return super().parse_args(ctx, args)


def _duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``24h``, ``7d`` (or plain seconds) as a timedelta."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
    value = text.strip().lower()
    factor = units.get(value[-1:], None)
    number = value[:-1] if factor else value
    try:
        seconds = float(number) * (factor or 1)
    except ValueError:
        raise click.BadParameter(f"{text!r}: give a duration such as 90s, 15m, 24h or 7d") from None
    if seconds < 0:
        raise click.BadParameter(f"{text!r}: a duration cannot be negative")
    return timedelta(seconds=seconds)


def _with_hq_db(database_url: str | None, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``work(db)`` on HQ's database (migrated), the database noted for error messages."""
    from forecourt.bootstrap import open_database
    from forecourt.infra.db import Database
    from forecourt.infra.migrate import upgrade

    settings = _hq_settings(database_url)
    _uses(database_url=settings.database_url)

    async def run() -> T:
        db = Database(settings.database_url)
        await open_database(db)
        try:
            await upgrade(db)
            return await work(db)
        finally:
            await db.dispose()

    return asyncio.run(run())


@main.group(cls=_CredentialGroup)
def credential() -> None:
    """Station credentials: issue, rotate, revoke, list (``forecourt credential STATION``
    issues one). A credential is printed once; HQ keeps only its hash."""


@credential.command("issue")
@click.argument("station")
@click.option("--database-url", default=None, help=_DB_OPTION_HELP)
def credential_issue(station: str, database_url: str | None) -> None:
    """Issue a new upload credential for STATION (it expires after
    station_credential_valid_days when that is set)."""
    from forecourt.network.handlers import issue_credential

    days = _hq_settings(database_url).station_credential_valid_days
    valid_for = timedelta(days=days) if days else None
    key_id, token = _with_hq_db(
        database_url, lambda db: issue_credential(db, station, valid_for=valid_for)
    )
    click.echo(json.dumps({"station": station, "key_id": key_id, "credential": token}))


@credential.command("rotate")
@click.argument("station")
@click.option(
    "--grace",
    default=None,
    help="How long the station's current credentials stay valid, e.g. 24h or 30m "
    "(default: station_credential_grace_s, 24 h).",
)
@click.option("--database-url", default=None, help=_DB_OPTION_HELP)
def credential_rotate(station: str, grace: str | None, database_url: str | None) -> None:
    """Issue STATION a new credential; its current ones end after the grace period (install
    the new one at the station meanwhile: FORECOURT_EDGE_CREDENTIAL)."""
    from forecourt.network.handlers import rotate_credential

    settings = _hq_settings(database_url)
    period = _duration(grace) if grace else timedelta(seconds=settings.station_credential_grace_s)
    days = settings.station_credential_valid_days
    rotated = _with_hq_db(
        database_url,
        lambda db: rotate_credential(
            db, station, grace=period, valid_for=timedelta(days=days) if days else None
        ),
    )
    click.echo(
        json.dumps(
            {
                "station": station,
                "key_id": rotated.key_id,
                "credential": rotated.token,
                "old_keys": rotated.old_keys,
                "old_valid_until": rotated.old_valid_until.isoformat(),
            }
        )
    )


@credential.command("revoke")
@click.argument("station")
@click.option("--key", "key_id", default=None, help="Only this key id (default: all of them).")
@click.option("--database-url", default=None, help=_DB_OPTION_HELP)
def credential_revoke(station: str, key_id: str | None, database_url: str | None) -> None:
    """Revoke STATION's credentials (or one) now: every HQ process refuses them at once."""
    from forecourt.network.handlers import revoke_credentials

    revoked = _with_hq_db(database_url, lambda db: revoke_credentials(db, station, key_id=key_id))
    click.echo(json.dumps({"station": station, "revoked": revoked}))


@credential.command("list")
@click.argument("station")
@click.option("--database-url", default=None, help=_DB_OPTION_HELP)
def credential_list(station: str, database_url: str | None) -> None:
    """STATION's credentials (key id, created, revoked or ending, expiry, valid now); never a
    secret."""
    from forecourt.network.handlers import list_credentials

    found = _with_hq_db(database_url, lambda db: list_credentials(db, station))
    click.echo(json.dumps({"station": station, "credentials": found}))


# --- staff identity -------------------------------------------------------------------------


def _grants(values: tuple[str, ...]) -> list[tuple[str, Any]]:
    """``ROLE@SCOPE`` (``cashier@station:S001``, ``finance@region:EAST``, ``hq_admin`` for
    the whole chain) as (role, Scope)."""
    from forecourt.kernel.access import Scope

    out = []
    for value in values:
        role, _, scope = value.partition("@")
        try:
            out.append((role.strip(), Scope.parse(scope.strip() or "chain")))
        except ValueError as exc:
            raise click.BadParameter(f"{value!r}: {exc}", param_hint="--grant") from None
    return out


def _scope(text: str) -> Any:
    from forecourt.kernel.access import Scope

    try:
        return Scope.parse(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="SCOPE") from None


def _password(from_stdin: bool) -> str | None:
    """The password on standard input (its first line), or None: one is generated."""
    if not from_stdin:
        return None
    line = sys.stdin.readline().rstrip("\r\n")
    if not line:
        raise click.BadParameter("standard input held no password", param_hint="--password-stdin")
    return line


def _identity(database_url: str | None, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``work(service)`` with the identity context on HQ's database."""
    from forecourt.identity.handlers import IdentityConfig, IdentityService

    config = IdentityConfig.from_settings(_hq_settings(database_url))
    return _with_hq_db(database_url, lambda db: work(IdentityService(db, config)))


def _user_json(user: Any) -> dict[str, Any]:
    return {
        "username": user.username,
        "kind": user.kind,
        "display_name": user.display_name,
        "grants": [f"{role}@{scope}" for role, scope in user.grants],
        "disabled": user.disabled,
        "locked_until": user.locked_until.isoformat() if user.locked_until else None,
    }


_GRANT_HELP = (
    "A role and where it holds: ROLE@SCOPE, e.g. cashier@station:S001, finance@region:EAST, "
    "hq_admin (the chain). Repeat for more."
)
_STDIN_HELP = "Read the password from standard input (default: generate one and print it)."
_ACTOR = "cli"


@main.group(cls=ForecourtGroup)
def users() -> None:
    """Staff and service accounts: create, grant, revoke, reset, disable, list (on HQ's
    database, as an operator on the HQ host). Roles and scopes: docs/security.md."""


@users.command("create")
@click.argument("username")
@click.option("--grant", "grants", multiple=True, help=_GRANT_HELP)
@click.option("--display-name", default=None, help="The name shown for the user.")
@click.option("--password-stdin", is_flag=True, help=_STDIN_HELP)
@click.option("--database-url", default=None, help=_DB_OPTION_HELP)
def users_create(
    username: str,
    grants: tuple[str, ...],
    display_name: str | None,
    password_stdin: bool,
    database_url: str | None,
) -> None:
    """Create staff member USERNAME with the roles given; a generated password is printed
    once (HQ keeps only its argon2 hash)."""
    chosen = _grants(grants)
    password = _password(password_stdin)

    async def work(service: Any) -> tuple[Any, str | None]:
        user, generated = await service.create_user(
            username, password=password, display_name=display_name, actor=_ACTOR
        )
        for role, scope in chosen:
            await service.grant(username, role, scope, actor=_ACTOR)
        return await service.get_user(username), generated

    user, generated = _identity(database_url, work)
    click.echo(json.dumps({**_user_json(user), "password": generated}))


@users.command("service")
@click.argument("name")
@click.option("--grant", "grants", multiple=True, required=True, help=_GRANT_HELP)
@click.option("--database-url", default=None, help=_DB_OPTION_HELP)
def users_service(name: str, grants: tuple[str, ...], database_url: str | None) -> None:
    """Create service account NAME (an integration, a metrics scraper): its client id and
    secret are printed once, for POST /v1/auth/token (OAuth2 client credentials)."""
    chosen = _grants(grants)
    user, secret = _identity(
        database_url,
        lambda service: service.create_service_account(name, grants=chosen, actor=_ACTOR),
    )
    click.echo(json.dumps({**_user_json(user), "client_id": name, "client_secret": secret}))


@users.command("grant")
@click.argument("username")
@click.argument("role")
@click.argument("scope", default="chain")
@click.option("--database-url", default=None, help=_DB_OPTION_HELP)
def users_grant(username: str, role: str, scope: str, database_url: str | None) -> None:
    """Give USERNAME the ROLE over SCOPE (chain, region:CODE or station:CODE); it holds from
    their next sign-in or refresh."""
    where = _scope(scope)

    async def work(service: Any) -> Any:
        await service.grant(username, role, where, actor=_ACTOR)
        return await service.get_user(username)

    click.echo(json.dumps(_user_json(_identity(database_url, work))))


@users.command("revoke")
@click.argument("username")
@click.argument("role")
@click.argument("scope", default="chain")
@click.option("--database-url", default=None, help=_DB_OPTION_HELP)
def users_revoke(username: str, role: str, scope: str, database_url: str | None) -> None:
    """Take ROLE over SCOPE from USERNAME (gone at their next refresh; access tokens live
    identity_access_token_s at most)."""
    where = _scope(scope)

    async def work(service: Any) -> Any:
        await service.revoke(username, role, where, actor=_ACTOR)
        return await service.get_user(username)

    click.echo(json.dumps(_user_json(_identity(database_url, work))))


@users.command("reset")
@click.argument("username")
@click.option("--password-stdin", is_flag=True, help=_STDIN_HELP)
@click.option("--database-url", default=None, help=_DB_OPTION_HELP)
def users_reset(username: str, password_stdin: bool, database_url: str | None) -> None:
    """Set USERNAME's password (a generated one is printed once), unlock the account and end
    every session it has."""
    password = _password(password_stdin)
    generated = _identity(
        database_url, lambda service: service.reset_password(username, password, actor=_ACTOR)
    )
    click.echo(json.dumps({"username": username, "password": generated}))


@users.command("disable")
@click.argument("username")
@click.option("--database-url", default=None, help=_DB_OPTION_HELP)
def users_disable(username: str, database_url: str | None) -> None:
    """Disable USERNAME: no sign-in, and every session it has ends."""
    _identity(database_url, lambda service: service.disable(username, actor=_ACTOR))
    click.echo(json.dumps({"username": username, "disabled": True}))


@users.command("list")
@click.option("--database-url", default=None, help=_DB_OPTION_HELP)
def users_list(database_url: str | None) -> None:
    """Every account with its grants (never a password or a hash)."""
    found = _identity(database_url, lambda service: service.list_users())
    click.echo(json.dumps([_user_json(u) for u in found]))


@users.command("rotate-key")
@click.option("--database-url", default=None, help=_DB_OPTION_HELP)
def users_rotate_key(database_url: str | None) -> None:
    """Sign new access tokens with a new key; tokens signed by the old one stay valid until
    they expire."""
    kid = _identity(database_url, lambda service: service.rotate_signing_key(actor=_ACTOR))
    click.echo(json.dumps({"kid": kid}))


@main.command("sign-in")
@click.argument("username")
@click.option(
    "--hq-url",
    default="http://127.0.0.1:8400",
    show_default=True,
    help="The head office to sign in to.",
)
@click.option("--terminal", default=None, help="The terminal signing in (kept in the token).")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def sign_in(username: str, hq_url: str, terminal: str | None, password_stdin: bool) -> None:
    """Sign in to HQ as USERNAME; prints the access and refresh tokens as JSON (send the
    access token as Authorization: Bearer <token>)."""
    import httpx

    password = _password(True) if password_stdin else click.prompt("password", hide_input=True)
    body: dict[str, Any] = {"username": username, "password": password}
    if terminal:
        body["terminal"] = terminal
    try:
        answer = httpx.post(f"{hq_url.rstrip('/')}/v1/auth/sign-in", json=body, timeout=30)
    except httpx.HTTPError as exc:
        raise click.ClickException(
            f"cannot reach HQ at {hq_url}: {exc} — is forecourt serve running there?"
        ) from None
    if answer.status_code != 200:
        try:
            message = answer.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = answer.text.strip().splitlines()[0] if answer.text.strip() else ""
        raise click.ClickException(f"sign-in refused ({answer.status_code}): {message}")
    click.echo(answer.text)


@main.command("publish-prices")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--database-url", default=None, help=_DB_OPTION_HELP)
def publish_prices(path: Path, database_url: str | None) -> None:
    """Publish the price set in PATH (YAML or JSON, as POST /v1/network/price-sets takes)."""
    from forecourt.bootstrap import open_database
    from forecourt.infra.db import Database
    from forecourt.infra.migrate import upgrade
    from forecourt.kernel.errors import ForecourtError
    from forecourt.network.handlers import load_price_set_file, publish_price_set

    settings = _hq_settings(database_url)

    async def run() -> Any:
        db = Database(settings.database_url)
        await open_database(db)
        try:
            await upgrade(db)
            return await publish_price_set(db, load_price_set_file(path), actor="cli")
        finally:
            await db.dispose()

    try:
        published = asyncio.run(run())
    except ForecourtError as exc:
        for problem in exc.details.get("problems", []):
            console.print(f"  - {problem}")
        raise
    ps = published.price_set
    click.echo(
        json.dumps(
            {
                "price_set_id": ps.price_set_id,
                "created": published.created,
                "scope": ps.scope.value,
                "scope_code": ps.scope_code,
                "effective_from": ps.effective_from.isoformat(),
                "prices_milli_minor_per_litre": dict(ps.prices),
            }
        )
    )


# --- edge node ------------------------------------------------------------------------------


@main.command()
@click.option("--station", required=True, help="The station code this edge node runs.")
@click.option(
    "--hq-url",
    default=None,
    help="Base URL of HQ, where sales are uploaded and snapshots fetched "
    "(default: http://127.0.0.1:8400).",
)
@click.option(
    "--journal",
    "journal_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The station's SQLite sales journal; keep it on durable storage (default: var/edge.db).",
)
@click.option(
    "--controller-url",
    default=None,
    help="The PTS-2 forecourt controller (jsonPTS), e.g. http://192.0.2.10 "
    "(default: http://127.0.0.1:8500).",
)
@click.option(
    "--host", default=None, help="Address of the edge's own HTTP API (default: 127.0.0.1)."
)
@click.option(
    "--port",
    type=int,
    default=None,
    help="Port of the edge's own HTTP API (default: 8401; 0: the kernel picks).",
)
@click.option(
    "--port-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the port of the edge's API to this file (atomically) once it serves requests.",
)
def edge(
    station: str,
    hq_url: str | None,
    journal_path: Path | None,
    controller_url: str | None,
    host: str | None,
    port: int | None,
    port_file: Path | None,
) -> None:
    """Run one station's edge node (credential from FORECOURT_EDGE_CREDENTIAL).

    Says "listening on http://HOST:PORT" once its API serves; SIGINT or SIGTERM stop it in
    order (exit status 0).
    """
    from forecourt.edge.node import build_edge_node
    from forecourt.kernel.clock import SimulatedClock, SystemClock
    from forecourt.settings import EdgeSettings, load_settings

    given: dict[str, Any] = {
        "station": station,
        "hq_url": hq_url,
        "journal_path": journal_path,
        "controller_url": controller_url,
        "host": host,
        "port": port,
    }
    options = {key: f"--{key.replace('_', '-')}" for key in given} | {"journal_path": "--journal"}
    settings = load_settings(
        EdgeSettings, options=options, **{k: v for k, v in given.items() if v is not None}
    )
    configure_logging(settings.log_level, settings.log_json)
    clock = SimulatedClock.from_env(dict(os.environ)) or SystemClock()
    sock = _listen(settings.host, settings.port)

    async def run(stop: _Stop) -> None:
        node = build_edge_node(settings, clock)
        config = _http_config(node.app, settings.host, settings.port)
        server = _http_server(config, port_file, "edge")
        # The API serves at once (status, health) while the node starts: it does not wait
        # for the forecourt, and may wait for its first snapshot.
        serving = asyncio.ensure_future(server.serve(sockets=[sock]))
        stop.on_hurry(lambda: setattr(server, "force_exit", True))
        try:
            if await stop.race(node.start()):
                await stop.until(serving)
        finally:
            server.should_exit = True
            try:
                await serving
            finally:
                await node.stop()

    try:
        _run_service(run)
    finally:
        sock.close()


def _register_chaos() -> None:
    from forecourt.audit.cli import audit
    from forecourt.chaos.cli import chaos
    from forecourt.protocols.cli import device, protocol, simulate

    main.add_command(audit)
    main.add_command(chaos)
    main.add_command(protocol)
    main.add_command(simulate)
    main.add_command(device)


_register_chaos()


if __name__ == "__main__":
    main()
