"""The edge's alarm board: conditions a person at the station or at HQ must look at.

An alarm is raised once (one ERROR log line, a counter) and stays on the status API until it is
cleared; raising it again while it is active only updates its details and count, so a
condition that persists across thousands of polls is one alarm, not thousands of lines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from forecourt.infra.logging import get_logger
from forecourt.kernel.clock import Clock

log = get_logger("forecourt.edge.alarms")


@dataclass
class Alarm:
    name: str
    message: str
    raised_at: datetime
    count: int = 1
    details: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "message": self.message,
            "raised_at": self.raised_at.isoformat(),
            "count": self.count,
            "details": self.details,
        }


class AlarmBoard:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.active: dict[str, Alarm] = {}
        self.raised_total: dict[str, int] = {}
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever an alarm is raised anew or cleared."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:  # noqa: BLE001 - a listener's fault must not stop the raiser
                log.exception("edge.alarm_listener_failed")

    def raise_(self, name: str, message: str, **details: Any) -> None:
        self.raised_total[name] = self.raised_total.get(name, 0) + 1
        alarm = self.active.get(name)
        if alarm is not None:
            alarm.count += 1
            alarm.details = details
            return
        self.active[name] = Alarm(name, message, self.clock.now(), details=details)
        log.error("edge.alarm", alarm=name, message=message, **details)
        self._changed()

    def clear(self, name: str) -> None:
        alarm = self.active.pop(name, None)
        if alarm is not None:
            log.info("edge.alarm_cleared", alarm=name, raised=alarm.count)
            self._changed()

    def as_json(self) -> list[dict[str, Any]]:
        return [a.as_json() for _, a in sorted(self.active.items())]
