"""Structured logging (structlog): one JSON (or console) line format on stderr for every
process, for our own events and for the stdlib loggers of the libraries we use."""

from __future__ import annotations

import logging
import re
import sys
from contextvars import ContextVar
from typing import Any
from urllib.parse import ParseResult, SplitResult

import structlog

trace_id_var: ContextVar[str | None] = ContextVar("trace_id", default=None)
# The address of the HTTP client whose request is being answered (the audit's source).
source_var: ContextVar[str | None] = ContextVar("source", default=None)

# Libraries whose INFO lines are noise in production: httpx logs every request the edge makes
# to its controller ("HTTP Request: POST ..." ten times a second); alembic lists its plugins
# at every start. Their warnings and errors still show.
QUIET_LOGGERS = ("httpx", "httpcore", "alembic.runtime.plugins")


def _add_trace_id(
    _logger: object, _name: str, event: structlog.types.EventDict
) -> structlog.types.EventDict:
    trace_id = trace_id_var.get()
    if trace_id and "trace_id" not in event:
        event["trace_id"] = trace_id
    return event


_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*:)[^@/\s]*@")


def redact(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    return _URL_PASSWORD.sub(r"\g<head>***@", text) if "@" in text else text


def _redact_urls(
    _logger: object, _name: str, event: structlog.types.EventDict
) -> structlog.types.EventDict:
    """No log line shows a URL's password (a bus or broker URL may carry one)."""
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = redact(value)
        elif isinstance(value, ParseResult | SplitResult):
            event[key] = redact(value.geturl())
    return event


class _ForecourtHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root handler this module installs (and replaces when configured again)."""


def configure_logging(level: str = "INFO", json_lines: bool = True) -> None:
    """Configure structlog and stdlib logging for this process; every line goes to stderr.

    Each line carries ``timestamp`` (ISO 8601, UTC), ``level`` and ``event``. Records of
    stdlib loggers (uvicorn, SQLAlchemy, the simulator, ...) pass through the same processors,
    so a process writes one format only. Calling it again replaces the earlier configuration.
    """
    numeric = logging.getLevelNamesMapping()[level.upper()]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)

    handler = _ForecourtHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                _add_trace_id,
                structlog.processors.add_log_level,
                structlog.stdlib.add_logger_name,
                timestamper,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                _redact_urls,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ForecourtHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add_trace_id,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.format_exc_info,
            _redact_urls,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]


def announce(event: str, **fields: Any) -> None:
    """Log a lifecycle line (``listening on http://…``) whatever the configured level:
    operators, process managers and tests wait for it."""
    unfiltered = structlog.make_filtering_bound_logger(logging.NOTSET)
    structlog.wrap_logger(None, wrapper_class=unfiltered).info(event, **fields)
