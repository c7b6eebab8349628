"""The process around a payment-provider simulator (WeChat Pay, Alipay): one command line, a
socket the process binds itself, uvicorn, the port file and orderly stops on signals.

Every simulator is run the same way::

    python -m forecourt.sim.<name> --config CONFIG.json --port 0 [--host 127.0.0.1] \\
        [--port-file PATH] [--log-level INFO]

The process binds and listens before uvicorn starts, so with ``--port 0`` the port the kernel
picked is never free for another process to take. Once the app has started (its lifespan), the
simulator announces its URL and, with ``--port-file``, writes the port to that file atomically.
SIGINT and SIGTERM stop uvicorn in order (exit 0); a bad config exits 2, a port that cannot be
bound 1.

A simulator module keeps its own ``main(argv)`` and hands :func:`run_simulator` only what is
its own: its program name and description, how its app is built, which exception is a bad
config, and what it announces.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

from forecourt.infra.listener import bound_socket, port_of, write_port_file
from forecourt.infra.logging import configure_logging

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
BACKLOG = 128
GRACEFUL_SHUTDOWN_S = 2

AppFactory = Callable[[str, Callable[[], None]], ASGIApp]
"""Builds a simulator's app from its config file's path; the app must call the given callable
once it has started (in its lifespan). Raises the simulator's config error for a bad config."""


class SignalledServer(uvicorn.Server):
    """uvicorn that stops in order on SIGINT/SIGTERM and then returns (exit 0); off the main
    thread it leaves signals alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        stops = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in stops}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class QuietDrops(logging.Filter):
    """A deliberately unfinished answer (a dropped connection) is not an error to log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "without completing response" not in record.getMessage()


def http_url(host: str, port: int) -> str:
    """The base URL of a listener on ``host:port`` (an IPv6 address in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def parse_args(argv: list[str] | None, *, prog: str, description: str) -> argparse.Namespace:
    """The simulators' common command line: ``config``, ``port``, ``host``, ``port_file``,
    ``log_level`` (upper case)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help="simulator config JSON file")
    parser.add_argument("--port", type=int, required=True, help="TCP port; 0 picks a free one")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port-file", help="write the chosen port to this file once listening")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)
    return parser.parse_args(argv)


def run_simulator(
    argv: list[str] | None,
    *,
    prog: str,
    description: str,
    build_app: AppFactory,
    config_error: type[Exception],
    announce_listening: Callable[[str], None],
    logger: logging.Logger,
) -> int:
    """Run a simulator until SIGINT/SIGTERM (exit 0); 2: a bad config, 1: no port.

    ``build_app`` makes the app from ``--config`` (raising ``config_error``, whose text is
    logged, for a bad one); ``announce_listening`` gets the base URL once the app has started,
    just before the port file is written; ``logger`` is the simulator's own.
    """
    args = parse_args(argv, prog=prog, description=description)
    configure_logging(args.log_level, json_lines=True)
    logging.getLogger("uvicorn.error").addFilter(QuietDrops())
    port_holder: list[int] = []

    def on_started() -> None:
        port = port_holder[0]
        announce_listening(http_url(args.host, port))
        if args.port_file:
            write_port_file(Path(args.port_file), port)

    try:
        app = build_app(args.config, on_started)
    except config_error as exc:
        logger.error("%s", exc)
        return 2
    try:
        sock = bound_socket(args.host, args.port)
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", args.host, args.port, exc)
        return 1
    sock.listen(BACKLOG)
    port_holder.append(port_of(sock))
    server = SignalledServer(
        uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            log_config=None,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
    )
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        return 0
    return 0
