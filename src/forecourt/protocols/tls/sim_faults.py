"""Faults the simulated TLS gauge can inject on its line, set from options or at runtime.

A fault is ``NAME`` or ``NAME=VALUE`` (``forecourt simulate tls --fault corrupt_checksum=2``).
Counted faults (``no_answer``, ``corrupt_checksum``, ``merge``, ``lowercase``, ``reboot``)
take the number of replies they spoil, after which they clear themselves; without a value they
last until cleared (``reboot`` defaults to one). Shaped faults (``garbage``, ``split``,
``delay``) take their size and last until cleared.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from forecourt.kernel.errors import InvalidValue

FAULTS: dict[str, str] = {
    "no_answer": "answer nothing (=N: only the next N requests)",
    "garbage": "write junk (no SOH, CR, LF, NUL) before each reply (=N bytes, default 16)",
    "corrupt_checksum": "send replies with a wrong checksum (=N: only the next N replies)",
    "split": "write each reply in several writes (=N pieces, default 3)",
    "merge": "write each reply twice in one write (=N: only the next N replies)",
    "delay": "answer after a delay (=SECONDS, default 1.0)",
    "lowercase": "write hex digits in lower case (=N: only the next N replies)",
    "reboot": "drop the connection instead of answering, as a restarting console "
    "(=N: the next N requests, default 1)",
}

_COUNTED = frozenset({"no_answer", "corrupt_checksum", "merge", "lowercase", "reboot"})
_DEFAULTS = {"garbage": 16.0, "split": 3.0, "delay": 1.0}
_LIMITS = {"garbage": (1, 4096), "split": (2, 64), "delay": (0.0, 600.0)}


@dataclass
class _Active:
    remaining: int | None  # counted faults: replies left; None: until cleared
    size: float | None = None  # shaped faults


class FaultPlan:
    """The faults active on one simulated gauge."""

    def __init__(self, faults: Mapping[str, str] | None = None) -> None:
        self._active: dict[str, _Active] = {}
        for name, value in (faults or {}).items():
            self.set(name, value)

    def set(self, name: str, value: str | None = None) -> None:
        """Activate a fault (``value`` as on the command line; None or "" for the default)."""
        if name not in FAULTS:
            raise InvalidValue(f"unknown TLS simulator fault {name!r}", hint=", ".join(FAULTS))
        text = (value or "").strip()
        if name in _COUNTED:
            if not text:
                self._active[name] = _Active(1 if name == "reboot" else None)
                return
            try:
                count = int(text)
            except ValueError:
                raise InvalidValue(f"fault {name} takes a count, not {text!r}") from None
            if count < 1:
                raise InvalidValue(f"fault {name} takes a positive count")
            self._active[name] = _Active(count)
            return
        try:
            size = float(text) if text else _DEFAULTS[name]
        except ValueError:
            raise InvalidValue(f"fault {name} takes a number, not {text!r}") from None
        low, high = _LIMITS[name]
        if not low <= size <= high:
            raise InvalidValue(f"fault {name} takes a value in {low}-{high}")
        self._active[name] = _Active(None, size)

    def clear(self, name: str | None = None) -> None:
        """Clear one fault, or all of them."""
        if name is None:
            self._active.clear()
        else:
            self._active.pop(name, None)

    @property
    def active(self) -> dict[str, str]:
        """The active faults as ``NAME -> VALUE`` (VALUE "" for until-cleared)."""
        out: dict[str, str] = {}
        for name, fault in self._active.items():
            if fault.size is not None:
                out[name] = f"{fault.size:g}"
            else:
                out[name] = "" if fault.remaining is None else str(fault.remaining)
        return out

    def take(self, name: str) -> bool:
        """Whether a counted fault spoils this reply (and count it down)."""
        fault = self._active.get(name)
        if fault is None:
            return False
        if fault.remaining is not None:
            fault.remaining -= 1
            if fault.remaining <= 0:
                del self._active[name]
        return True

    def size(self, name: str) -> float | None:
        """A shaped fault's size, or None when it is not active."""
        fault = self._active.get(name)
        return None if fault is None else fault.size


def parse_fault_specs(specs: Iterable[str]) -> dict[str, str]:
    """``["corrupt_checksum=2", "split"]`` -> ``{"corrupt_checksum": "2", "split": ""}``,
    each checked against :data:`FAULTS`."""
    faults: dict[str, str] = {}
    for spec in specs:
        name, _, value = spec.partition("=")
        name = name.strip()
        FaultPlan().set(name, value)  # validate
        faults[name] = value.strip()
    return faults
