"""No log line shows a URL's password: our own events and the stdlib loggers of libraries,
whether the URL is text or a parsed URL (as the NATS client hands its server back)."""

from __future__ import annotations

import logging
from urllib.parse import urlparse

import pytest
import structlog

from forecourt.infra.logging import configure_logging, get_logger, redact


def test_a_urls_password_is_masked_wherever_it_sits_in_the_text() -> None:
    assert redact("nats://bus:s3cret@10.0.0.5:4222") == "nats://bus:***@10.0.0.5:4222"
    assert (
        redact("tried postgresql+asyncpg://hq:pw@db/hq and mqtt://s1:x%40y@mq:1883")
        == "tried postgresql+asyncpg://hq:***@db/hq and mqtt://s1:***@mq:1883"
    )
    assert redact("mqtt://user@mq:1883") == "mqtt://user@mq:1883"  # a user alone stays
    assert redact("no url, a@b") == "no url, a@b"


@pytest.mark.parametrize("json_lines", [True, False])
def test_neither_our_events_nor_library_lines_show_a_password(
    capsys: pytest.CaptureFixture[str], json_lines: bool
) -> None:
    # The suite's own logging, restored afterwards: the handler installed here writes to this
    # test's captured stderr, which is closed once the test ends.
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    configure_logging("INFO", json_lines=json_lines)
    try:
        get_logger("forecourt.test").warning(
            "bus.nats_reconnected", url=urlparse("nats://bus:s3cret@10.0.0.5:4222")
        )
        get_logger("forecourt.test").info("bus.open", url="nats://bus:s3cret@10.0.0.5:4222")
        logging.getLogger("nats.aio.client").warning(
            "could not connect to nats://bus:s3cret@10.0.0.5:4222"
        )
        err = capsys.readouterr().err
    finally:
        structlog.configure(**saved)
        root.handlers[:] = handlers
        root.setLevel(level)
    assert "s3cret" not in err
    assert err.count("bus:***@10.0.0.5:4222") == 3
