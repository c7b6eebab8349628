"""The ``forecourt`` command line: demo, serve (HQ), relay, edge, import, migrate, credential.

Every command runs inside :class:`ForecourtGroup`, which turns a failure into one line on
stderr with a hint, never a traceback (``FORECOURT_DEBUG=1`` shows it), and an exit status:

* ``0`` done; a service (``serve``, ``relay``, ``edge``) stopped by SIGINT or SIGTERM;
* ``1`` the command was right but could not do its work: a database or bus that does not
  answer, an unknown station, a demo whose stores disagree;
* ``2`` a usage error: a bad option (click's convention) or a missing or invalid setting
  (environment variable, ``forecourt.toml``), which is an option given another way;
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
SERVICES = frozenset({"serve", "relay", "edge"})  # a stop signal is how these end: status 0
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

    Settings problems are usage errors (2); an unreachable or missing service, an unknown
    station and any other failure are failures (1). Something unforeseen still gets one line,
    naming ``FORECOURT_DEBUG=1`` for the traceback.
    """
    from pydantic import ValidationError
    from pydantic_settings.exceptions import SettingsError

    from forecourt.bootstrap import ServiceUnavailable
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
    for item in chain:
        if isinstance(item, ServiceUnavailable):
            if item.service == "bus":
                return _bus_problem(item.url, item.cause), EXIT_FAILURE
            return _database_problem(item.url, _causes(item.cause)), EXIT_FAILURE
    if any(_is_database_error(item) for item in chain):
        return _database_problem(meta.get(_DATABASE_URL), chain), EXIT_FAILURE
    for item in chain:
        if isinstance(item, ForecourtError):
            hint = _HINTS.get(item.code)
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
    as_json: bool,
) -> None:
    """HQ + N simulated stations (4 dispensers each), then a three-way reconciliation.

    Exit status 0: the dispensers, the edge journals and HQ agree; 1: they disagree (or the
    demo could not run); 130/143: interrupted by SIGINT/SIGTERM — the simulators are stopped
    and the temporary folder is removed first.
    """
    import shutil
    import tempfile

    from forecourt.demo import DemoOptions, run_demo
    from forecourt.settings import Settings, load_settings

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
        )

        def progress(line: str) -> None:
            if not as_json:
                err.print(line, highlight=False)

        if not as_json:
            err.print(
                f"Forecourt demo: {stations} stations, {duration:.0f} s at {speed:.0f}x, "
                f"database {'PostgreSQL' if database_url else 'SQLite'}, bus {bus_url}",
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
    if not result["agree"] or not result["drained"]:
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
    work: Coroutine[Any, Any, T], *, on_overdue: Callable[[int], None]
) -> tuple[T | None, int | None]:
    """Run ``work`` as a task that the first SIGINT/SIGTERM cancels (its own ``finally``
    stops what it started); (result, None) or (None, the signal). ``on_overdue(signal)`` is
    called if the task has not ended :data:`DEMO_STOP_S` after the signal."""
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
        loop.call_later(DEMO_STOP_S, on_overdue, signum)

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


def _hq_settings(database_url: str | None) -> Settings:
    from forecourt.settings import Settings, load_settings

    overrides = {"database_url": database_url} if database_url else {}
    settings = load_settings(Settings, options={"database_url": "--database-url"}, **overrides)
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
    help="HTTP worker processes (more than one needs PostgreSQL, and adds a relay process).",
)
def serve(
    services: str | None,
    host: str | None,
    port: int | None,
    port_file: Path | None,
    database_url: str | None,
    bus_url: str | None,
    workers: int | None,
    reuse_port: bool,
) -> None:
    """Run the head office (HTTP API, outbox relay) on the configured database and bus.

    Says "listening on http://HOST:PORT" once it serves; SIGINT or SIGTERM stop it in order
    (exit status 0).
    """
    from forecourt.infra.db import normalise_url
    from forecourt.settings import Settings, load_settings

    given = {
        "services": services,
        "host": host,
        "port": port,
        "database_url": database_url,
        "bus_url": bus_url,
        "workers": workers,
    }
    overrides = {key: value for key, value in given.items() if value is not None}
    settings = load_settings(
        Settings, options={key: f"--{key.replace('_', '-')}" for key in given}, **overrides
    )
    _uses(database_url=settings.database_url, bus_url=settings.bus_url)
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
    from forecourt.bootstrap import open_bus, open_database
    from forecourt.infra.bus import make_bus
    from forecourt.infra.db import Database

    db = Database(settings.database_url, application_name="forecourt-supervisor")
    bus = make_bus(
        settings.bus_url, stream=settings.nats_stream, subject_prefix=settings.nats_subject_prefix
    )
    try:
        await open_database(db)
        await open_bus(bus, settings.bus_url)
    finally:
        await bus.close()
        await db.dispose()


WORKERS_START_S = 120.0  # every HTTP worker listens within this, or the supervisor gives up
WORKERS_STOP_S = 20.0  # then they are killed


def _supervise_workers(settings: Settings, port_file: Path | None) -> int:
    """Start ``settings.workers`` single-worker HQ processes on the same port and a relay
    process; stop them together. Returns the exit status.

    The supervisor binds the port first (SO_REUSEPORT, never listening, so it takes no
    connection): ``port`` 0 becomes a real number that every worker then binds too, and that
    nobody else can take while they start. The port file is written, and "listening on" said,
    once every worker has written its own port file, that is once every worker serves.
    SIGINT/SIGTERM are forwarded to every child once; the status is 0 when all then end so.
    """
    import shutil
    import subprocess
    import tempfile

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
    http_env = {**os.environ, "FORECOURT_RELAY": "false"}
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
        children.append(subprocess.Popen([sys.executable, "-m", "forecourt.cli", "relay"]))
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
    codes = max((abs(c.returncode or 0) for c in children), default=0)
    return codes or int(failed)


@main.command()
def relay() -> None:
    """Run only the outbox relay (publishes committed events to the bus) until stopped
    (SIGINT or SIGTERM: exit status 0)."""
    from forecourt.bootstrap import build_relay, open_bus, open_database
    from forecourt.infra.bus import make_bus
    from forecourt.infra.db import Database
    from forecourt.infra.migrate import upgrade

    settings = _hq_settings(None)
    configure_logging(settings.log_level, settings.log_json)

    async def run(stop: _Stop) -> None:
        db = Database(settings.database_url, application_name="forecourt-relay")
        bus = make_bus(
            settings.bus_url,
            stream=settings.nats_stream,
            subject_prefix=settings.nats_subject_prefix,
        )
        worker = build_relay(db, bus, settings)

        async def start() -> None:
            await open_database(db)
            await upgrade(db)
            await open_bus(bus, settings.bus_url)
            worker.start()

        try:
            if await stop.race(start()):
                await stop.requested.wait()
        finally:
            await worker.stop()
            await bus.close()
            await db.dispose()

    _run_service(run)


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


@main.command()
@click.argument("station")
@click.option("--database-url", default=None, help=_DB_OPTION_HELP)
def credential(station: str, database_url: str | None) -> None:
    """Issue a new upload credential for STATION (printed once; HQ keeps only its hash)."""
    from forecourt.bootstrap import open_database
    from forecourt.infra.db import Database
    from forecourt.network.handlers import issue_credential

    settings = _hq_settings(database_url)

    async def run() -> tuple[str, str]:
        db = Database(settings.database_url)
        await open_database(db)
        try:
            return await issue_credential(db, station)
        finally:
            await db.dispose()

    key_id, token = asyncio.run(run())
    click.echo(json.dumps({"station": station, "key_id": key_id, "credential": token}))


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
    from forecourt.edge.node import build_edge_node, jsonpts_factory
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
        node = build_edge_node(settings, clock, jsonpts_factory(settings))
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


if __name__ == "__main__":
    main()
