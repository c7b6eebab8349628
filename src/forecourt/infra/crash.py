"""Named crash points for fault-injection tests.

``FORECOURT_CRASH_AT=edge.after_journal_commit`` makes the process SIGKILL itself the first
time it reaches that point (``name:N`` on the N-th time). Before dying it appends the name to
``FORECOURT_CRASH_MARKER`` (a file) so a test can check the process died exactly there.
Unset, a crash point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    wanted = os.environ.get("FORECOURT_CRASH_AT")
    if not wanted:
        return
    target, _, nth = wanted.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] < (int(nth) if nth else 1):
        return
    marker = os.environ.get("FORECOURT_CRASH_MARKER")
    if marker:
        with open(marker, "a", encoding="utf-8") as fh:
            fh.write(f"{name} pid={os.getpid()}\n")
            fh.flush()
            os.fsync(fh.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
