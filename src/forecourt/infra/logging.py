"""Structured logging (structlog): JSON or console lines that carry the current trace id."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar

import structlog

trace_id_var: ContextVar[str | None] = ContextVar("trace_id", default=None)


def _add_trace_id(
    _logger: object, _name: str, event: structlog.types.EventDict
) -> structlog.types.EventDict:
    trace_id = trace_id_var.get()
    if trace_id and "trace_id" not in event:
        event["trace_id"] = trace_id
    return event


def configure_logging(level: str = "INFO", json_lines: bool = True) -> None:
    """Configure stdlib logging and structlog once per process; logs go to stderr."""
    logging.basicConfig(
        format="%(message)s", stream=sys.stderr, level=getattr(logging, level.upper())
    )
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add_trace_id,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
