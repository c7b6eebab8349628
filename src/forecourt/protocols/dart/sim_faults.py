"""Faults the DART simulator can inject into its line, set at start or at run time.

``FAULTS`` names each fault and says what its value means (``--fault NAME[=VALUE]``). Address
values are a comma-separated list of DART addresses (``0x51``, ``81``) or pump numbers
(``2`` = the second pump, 0x51); no value means every pump.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from forecourt.kernel.errors import InvalidValue
from forecourt.protocols.dart.line import ADDRESS_MAX, ADDRESS_MIN

FAULTS: dict[str, str] = {
    "no_answer": "the pumps at these addresses stay silent (VALUE: addresses; default all)",
    "garbage": "random bytes before a reply (VALUE: probability 0-1, default 1)",
    "corrupt_crc": "the next N data frames from the pumps carry a wrong CRC (VALUE: N, default 1)",
    "split": "replies written in pieces of N bytes, a moment apart (VALUE: N, default 1)",
    "merge": "the request echoed with the reply in one write, as a two-wire RS-485 adapter does",
    "slow": "every reply delayed by VALUE seconds (default 0.3)",
    "baud": "the line paced at VALUE baud (default 9600), 11 bits a byte (8O1): each frame is "
    "answered only once it has crossed the line, and each reply takes its time back",
    "reboot": "power-cycle these pumps now (one-shot): not programmed again, line state lost "
    "(VALUE: addresses; default all)",
    "nozzle_hanging": "after the flow ends the customer leaves the nozzle out of its holster "
    "(VALUE: addresses; default all)",
    "tx_wrap": "the pumps' transaction numbers jump to 0xE so they wrap soon; VALUE is what "
    "0xF wraps to, 0 or 1 (default 0)",
}

BITS_PER_BYTE = 11  # start, 8 data, odd parity, stop
ONE_SHOT = frozenset({"reboot", "tx_wrap"})


class FaultError(InvalidValue):
    code = "dart.sim_fault"


def parse_fault(text: str) -> tuple[str, str | None]:
    """``NAME[=VALUE]`` -> (name, value); unknown names are refused with the known list."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if name not in FAULTS:
        raise FaultError(f"unknown DART fault {name!r}", hint=f"known: {', '.join(FAULTS)}")
    return name, (value.strip() if sep else None)


def parse_addresses(value: str | None, known: Iterable[int]) -> frozenset[int]:
    """The addresses a fault value names (all known ones when there is no value)."""
    known_set = frozenset(known)
    if value is None or value.strip() in ("", "all", "*"):
        return known_set
    found = set()
    for part in value.split(","):
        try:
            number = int(part.strip(), 0)
        except ValueError:
            raise FaultError(f"not an address or pump number: {part!r}") from None
        address = number if number >= ADDRESS_MIN else ADDRESS_MIN + number - 1
        if not ADDRESS_MIN <= address <= ADDRESS_MAX:
            raise FaultError(f"address 0x{address:02X} outside 0x50-0x6F")
        found.add(address)
    return frozenset(found)


def _float(name: str, value: str | None, default: float, low: float, high: float) -> float:
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise FaultError(f"fault {name} needs a number, got {value!r}") from None
    if not low <= number <= high:
        raise FaultError(f"fault {name} must be between {low} and {high}, got {number}")
    return number


@dataclass
class ActiveFaults:
    """The faults in force on one simulated line (the line reads them on every frame)."""

    addresses: frozenset[int]
    silent: frozenset[int] = frozenset()
    garbage: float = 0.0
    corrupt_crc: int = 0
    split: int = 0
    merge: bool = False
    slow_s: float = 0.0
    baud: float = 0.0  # 0: unpaced
    hanging: frozenset[int] = frozenset()
    names: dict[str, str | None] = field(default_factory=dict)

    def set(self, name: str, value: str | None = None) -> None:
        """Put a continuing fault in force (one-shot faults are the simulator's to apply)."""
        if name not in FAULTS:
            raise FaultError(f"unknown DART fault {name!r}", hint=f"known: {', '.join(FAULTS)}")
        if name == "no_answer":
            self.silent = parse_addresses(value, self.addresses)
        elif name == "garbage":
            self.garbage = _float(name, value, 1.0, 0.0, 1.0)
        elif name == "corrupt_crc":
            self.corrupt_crc = int(_float(name, value, 1, 0, 1_000_000))
        elif name == "split":
            self.split = int(_float(name, value, 1, 1, 512))
        elif name == "merge":
            self.merge = True
        elif name == "slow":
            self.slow_s = _float(name, value, 0.3, 0.0, 60.0)
        elif name == "baud":
            self.baud = _float(name, value, 9600.0, 300.0, 1_000_000.0)
        elif name == "nozzle_hanging":
            self.hanging = parse_addresses(value, self.addresses)
        if name not in ONE_SHOT:
            self.names[name] = value

    def clear(self, name: str | None = None) -> None:
        """End one fault (or all of them)."""
        names = list(self.names) if name is None else [name]
        for each in names:
            if each not in FAULTS:
                raise FaultError(f"unknown DART fault {each!r}")
            self.names.pop(each, None)
            if each == "no_answer":
                self.silent = frozenset()
            elif each == "garbage":
                self.garbage = 0.0
            elif each == "corrupt_crc":
                self.corrupt_crc = 0
            elif each == "split":
                self.split = 0
            elif each == "merge":
                self.merge = False
            elif each == "slow":
                self.slow_s = 0.0
            elif each == "baud":
                self.baud = 0.0
            elif each == "nozzle_hanging":
                self.hanging = frozenset()

    def on_the_line_s(self, frame_bytes: int) -> float:
        """How long ``frame_bytes`` take on the paced line (0 when unpaced)."""
        return frame_bytes * BITS_PER_BYTE / self.baud if self.baud else 0.0

    def active(self) -> dict[str, str | None]:
        return dict(self.names)
