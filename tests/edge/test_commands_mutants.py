"""Pump commands against a scripted pump driver (in-process, no device): the rules a mutation
run of forecourt.edge.commands found untested. The preset maxima (the edge's and a pump's
own), the state rules and the wait of a released pump for its reset, the refuse-audit-raise
path for every kind of failure, the emergency stop per pump and per line (jsonPTS and the
renumbering view included), and the terminal credential check."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from forecourt.edge.commands import CommandLine, PumpCommands, check_terminal
from forecourt.edge.controller import ForecourtController
from forecourt.edge.domain import FpState
from forecourt.edge.journal import Journal
from forecourt.kernel.errors import ForecourtError
from forecourt.protocols.driver import EventSink
from forecourt.protocols.jsonpts.codec import Packet, decode_envelope, dumps, encode_envelope
from forecourt.protocols.model import (
    Capability,
    DeviceHealth,
    DeviceHealthState,
    DeviceIdentity,
    DeviceRejected,
    DeviceTransaction,
    DriverUnavailable,
    NozzleTotals,
    Preset,
    PresetType,
    PumpState,
    PumpStatus,
)
from forecourt.protocols.renumber import renumbered
from tests.edge.forecourt_rig import snapshot
from tests.protocols.dart.test_edge_commands import audits
from tests.protocols.test_jsonpts_driver import make_driver
from tests.protocols.test_renumber_and_store import DevicePumps
from tests.support import ManualClock

EDGE_MAX_VOLUME_ML = 50_000
EDGE_MAX_AMOUNT_MINOR = 10_000
PRESETS = frozenset({Capability.PRESET_VOLUME, Capability.PRESET_AMOUNT, Capability.SUSPEND})


class ScriptedPumps:
    """A pump driver whose pumps are in whatever state the test puts them, that obeys every
    command the way a device would (an authorised pump is authorised, a stopped one stopped)
    and fails where the test tells it to (``failing``: method → the exception it raises)."""

    name = "scripted"

    def __init__(self, capabilities: frozenset[Capability] = PRESETS) -> None:
        self.capabilities = capabilities
        self.states: dict[int, PumpState] = {1: PumpState.IDLE, 2: PumpState.IDLE}
        self.calls: list[tuple[str, int]] = []
        self.failing: dict[str, Exception] = {}
        self.failing_pumps: dict[int, Exception] = {}  # emergency_stop of these pumps fails

    def _call(self, method: str, pump: int) -> None:
        self.calls.append((method, pump))
        if method in self.failing:
            raise self.failing[method]

    def subscribe(self, sink: EventSink) -> None:
        pass

    def health(self) -> DeviceHealth:
        return DeviceHealth(self.name, DeviceHealthState.ONLINE)

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def identity(self) -> DeviceIdentity:
        return DeviceIdentity("scripted:1", "boot-1")

    async def pump_status(self, pumps: Sequence[int]) -> list[PumpStatus]:
        for pump in pumps:
            self._call("pump_status", pump)
        return [
            PumpStatus(
                p,
                self.states[p],
                error="no answer" if self.states[p] is PumpState.OFFLINE else None,
            )
            for p in pumps
        ]

    async def authorize(
        self, pump: int, nozzle: int | None, preset: Preset, unit_price_mmu: int
    ) -> int | None:
        self._call("authorize", pump)
        self.states[pump] = PumpState.AUTHORISED
        return 7

    async def stop(self, pump: int) -> None:
        self._call("stop", pump)
        self.states[pump] = PumpState.IDLE

    async def emergency_stop(self, pump: int) -> None:
        self._call("emergency_stop", pump)
        if pump in self.failing_pumps:
            raise self.failing_pumps[pump]
        self.states[pump] = PumpState.STOPPED

    async def suspend(self, pump: int) -> None:
        self._call("suspend", pump)
        self.states[pump] = PumpState.SUSPENDED

    async def resume(self, pump: int) -> None:
        self._call("resume", pump)
        self.states[pump] = PumpState.FUELLING

    async def set_prices(self, pump: int, prices_mmu: Sequence[int]) -> None:
        self._call("set_prices", pump)

    async def totals(self, pump: int, nozzle: int) -> NozzleTotals:
        return NozzleTotals(pump, nozzle, 0, 0)

    async def unacknowledged_transactions(self, pumps: Sequence[int]) -> list[DeviceTransaction]:
        return []

    async def finished_transaction(self, pump: int) -> DeviceTransaction | None:
        return None

    async def close_transaction(self, pump: int, transaction: int) -> None:
        self._call("close_transaction", pump)

    async def transactions(
        self, pump: int, start: datetime, end: datetime
    ) -> list[DeviceTransaction]:
        return []


class WithLimits(ScriptedPumps):
    """Pumps that know their own maximum preset (``ReportsPresetLimits``)."""

    def __init__(self, limits: dict[PresetType, int | None]) -> None:
        super().__init__()
        self.limits = limits

    def max_preset(self, pump: int, kind: PresetType) -> int | None:
        return self.limits.get(kind)


class Resetting(ScriptedPumps):
    """Pumps that take a reset out of a stop (``Resets``), refusing it while ``refuse``."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse: str | None = None

    async def reset(self, pump: int) -> None:
        self._call("reset", pump)
        if self.refuse is not None:
            raise DeviceRejected(self.refuse, device_code="unclosed_filling")
        self.states[pump] = PumpState.IDLE


class StopsAllAtOnce(ScriptedPumps):
    """A line stopped in one exchange (``Capability.EMERGENCY_STOP_ALL``)."""

    def __init__(self) -> None:
        super().__init__(PRESETS | {Capability.EMERGENCY_STOP_ALL})
        self.stop_all_fails: Exception | None = None

    async def emergency_stop_all(self, pumps: Sequence[int]) -> dict[int, Exception]:
        self.calls.append(("emergency_stop_all", 0))
        if self.stop_all_fails is not None:
            raise self.stop_all_fails
        for pump in pumps:
            self.states[pump] = PumpState.STOPPED
        return {}


@dataclass
class Station:
    driver: Any
    controller: ForecourtController
    commands: PumpCommands

    def audits(self, action: str) -> list[dict[str, Any]]:
        return audits(self.controller, action)


@contextlib.asynccontextmanager
async def station(tmp_path: Path, driver: Any) -> AsyncIterator[Station]:
    """Pumps 1 and 2 (one nozzle each) on one line named ``scripted``, with the edge's
    maxima of 50 L and 100.00."""
    clock = ManualClock()
    journal = Journal(tmp_path / "edge.db", clock)
    snap = snapshot((1, 2))
    await journal.open()
    try:
        controller = ForecourtController(driver, journal, lambda: snap, clock)
        line = CommandLine("scripted", "scripted", controller)
        commands = PumpCommands(
            lambda: [line],
            journal,
            max_volume_ml=EDGE_MAX_VOLUME_ML,
            max_amount_minor=EDGE_MAX_AMOUNT_MINOR,
        )
        yield Station(driver, controller, commands)
    finally:
        await journal.close()


async def refused(coroutine: Any) -> ForecourtError:
    """The error a command was refused with (it must be refused)."""
    with pytest.raises(ForecourtError) as caught:
        await coroutine
    return caught.value


def amount(value: int) -> dict[str, Any]:
    return {"nozzle": 1, "preset": {"amount_minor": value}}


# --------------------------------------------------------------------------- preset maxima


@pytest.mark.parametrize(
    ("device_limit", "maximum"),
    [
        (5_000, 5_000),  # the pump's own maximum is lower: it applies
        (20_000, EDGE_MAX_AMOUNT_MINOR),  # the pump's is higher: the edge's applies
        (0, EDGE_MAX_AMOUNT_MINOR),  # a pump that says 0 has no maximum of its own
        (None, EDGE_MAX_AMOUNT_MINOR),  # a pump that does not know
    ],
)
async def test_a_preset_is_limited_by_the_lower_of_the_edges_maximum_and_the_pumps_own(
    tmp_path: Path, device_limit: int | None, maximum: int
) -> None:
    # Given a pump that reports its own maximum amount (or 0, or nothing)
    async with station(tmp_path, WithLimits({PresetType.AMOUNT: device_limit})) as site:
        # When a cashier presets one minor unit above the maximum that should apply
        error = await refused(site.commands.authorise("till1", 1, amount(maximum + 1)))
        # Then it is refused, naming that maximum
        assert error.code == "pump.preset_above_maximum"
        assert error.details["maximum"] == maximum
        # And the maximum itself is authorised
        answer = await site.commands.authorise("till1", 1, amount(maximum))
        assert answer["state"] == "authorised"
        assert answer["preset"]["amount_minor"] == maximum


async def test_a_pumps_own_amount_limit_does_not_bound_a_volume_preset(tmp_path: Path) -> None:
    # Given a pump whose own maximum is an amount only
    async with station(tmp_path, WithLimits({PresetType.AMOUNT: 100})) as site:
        # When a cashier presets the edge's maximum volume
        body = {"nozzle": 1, "preset": {"volume_ml": EDGE_MAX_VOLUME_ML}}
        answer = await site.commands.authorise("till1", 1, body)
        # Then it is authorised: the amount limit is not applied to a volume
        assert answer["state"] == "authorised"


async def test_a_zero_preset_is_refused_as_invalid_before_any_maximum(tmp_path: Path) -> None:
    async with station(tmp_path, ScriptedPumps()) as site:
        # When a cashier presets 0 ml
        error = await refused(
            site.commands.authorise("till1", 1, {"nozzle": 1, "preset": {"volume_ml": 0}})
        )
        # Then it is refused as invalid, and the pump is not authorised
        assert error.code == "pump.preset_invalid"
        assert ("authorize", 1) not in site.driver.calls


# --------------------------------------------------------------------------- state rules


async def test_an_authorised_pump_is_not_authorised_again(tmp_path: Path) -> None:
    async with station(tmp_path, ScriptedPumps()) as site:
        # Given a pump already authorised
        site.driver.states[1] = PumpState.AUTHORISED
        # When another authorisation comes
        error = await refused(site.commands.authorise("till1", 1, amount(1_000)))
        # Then the state forbids it, and the device is not asked
        assert error.code == "pump.state_forbids"
        assert error.details["state"] == "authorised"
        assert ("authorize", 1) not in site.driver.calls


async def test_an_emergency_stopped_pump_is_refused_as_emergency_stopped_whatever_it_shows(
    tmp_path: Path,
) -> None:
    async with station(tmp_path, ScriptedPumps()) as site:
        # Given the forecourt emergency-stopped (the device shows its pumps stopped)
        await site.commands.emergency_stop("till1")
        # When a cashier authorises a pump before releasing it
        error = await refused(site.commands.authorise("till1", 1, amount(1_000)))
        # Then the refusal says the pump is emergency-stopped, not just that it is stopped
        assert error.code == "pump.emergency_stopped"


async def test_a_pump_the_device_shows_stopped_is_authorised_only_while_it_awaits_its_reset(
    tmp_path: Path,
) -> None:
    # Given a line whose pumps are reset by their next authorisation (no reset of their own)
    async with station(tmp_path, ScriptedPumps()) as site:
        driver, commands = site.driver, site.commands
        # And a pump switched off by something other than this edge
        driver.states[1] = PumpState.STOPPED
        # Then it is not authorised: it is not awaiting a reset from this edge
        error = await refused(commands.authorise("till1", 1, amount(1_000)))
        assert (error.code, error.details["state"]) == ("pump.state_forbids", "stopped")
        # When the forecourt is emergency-stopped and the pump released (still switched off)
        await commands.emergency_stop("till1")
        await site.controller.poll_once()  # the edge sees the pump stopped
        released = await commands.release("till1", 1)
        assert released["state"] == "stopped"
        assert site.audits("pump.release")[-1]["sent"].startswith("nothing")
        # Then its next authorisation is accepted, and the edge's machine follows it
        answer = await commands.authorise("till1", 1, amount(1_000))
        assert answer["state"] == "authorised"
        assert site.controller.machine(1).state is FpState.AUTHORISED
        # When, that sale over, the pump is switched off elsewhere again
        await commands.stop("till1", 1)
        driver.states[1] = PumpState.STOPPED
        # Then the authorisation that reset it has ended its wait: it is refused again
        error = await refused(commands.authorise("till1", 1, amount(1_000)))
        assert error.code == "pump.state_forbids"


async def test_a_new_emergency_stop_ends_a_stopped_pumps_wait_for_its_reset(
    tmp_path: Path,
) -> None:
    # Given a pump whose reset was refused on its release (it then awaits its reset)
    async with station(tmp_path, Resetting()) as site:
        driver, commands = site.driver, site.commands
        await commands.emergency_stop("till1")
        driver.refuse = "pump 1 holds unclosed filling 3: close it first"
        first = await commands.release("till1", 1)
        assert first["state"] == "stopped"
        # When it is emergency-stopped again, and released with a reset this time
        await commands.emergency_stop("till1")
        driver.refuse = None
        second = await commands.release("till1", 1)
        assert second["state"] == "idle"
        assert [a["sent"] for a in site.audits("pump.release")][-1] == "reset"
        # Then, switched off elsewhere later, it is not authorised as one awaiting a reset
        driver.states[1] = PumpState.STOPPED
        error = await refused(commands.authorise("till1", 1, amount(1_000)))
        assert error.code == "pump.state_forbids"


async def test_a_command_the_state_forbids_is_refused_and_audited_with_the_state_before(
    tmp_path: Path,
) -> None:
    async with station(tmp_path, ScriptedPumps()) as site:
        # Given an idle pump; When a cashier stops it
        error = await refused(site.commands.stop("till1", 1))
        # Then it is refused by its state, the device is not asked to stop
        assert error.code == "pump.state_forbids"
        assert ("stop", 1) not in site.driver.calls
        # And the refusal is audited with the state the command found
        (audit,) = site.audits("pump.stop")
        assert audit["refused"] == "pump.state_forbids"
        assert audit["state_before"] == "idle"
        assert audit["state"] == "idle"


async def test_a_suspended_fuelling_can_be_stopped(tmp_path: Path) -> None:
    async with station(tmp_path, ScriptedPumps()) as site:
        # Given a suspended fuelling
        site.driver.states[1] = PumpState.SUSPENDED
        # When a cashier stops it
        answer = await site.commands.stop("till1", 1)
        # Then the device is told to stop, and the pump is free
        assert ("stop", 1) in site.driver.calls
        assert answer["state"] == "idle"


async def test_a_command_on_a_pump_offline_is_refused_as_unavailable_not_as_its_state(
    tmp_path: Path,
) -> None:
    async with station(tmp_path, ScriptedPumps()) as site:
        # Given a pump its line reports offline
        site.driver.states[1] = PumpState.OFFLINE
        # When a cashier stops it
        error = await refused(site.commands.stop("till1", 1))
        # Then it is a 503 saying the pump does not answer, and why
        assert error.code == "pump.device_unavailable"
        assert error.http_status == 503
        assert "no answer" in error.message


# --------------------------------------------------------------------------- refusals


async def test_a_refused_command_is_raised_in_the_envelope_and_audited(tmp_path: Path) -> None:
    async with station(tmp_path, ScriptedPumps()) as site:
        # When a cashier authorises a pump the station does not have
        error = await refused(site.commands.authorise("till1", 42, amount(1_000)))
        # Then it is refused as unknown, and audited as refused with the request
        assert error.code == "pump.unknown"
        (audit,) = site.audits("pump.authorize")
        assert audit["refused"] == "pump.unknown"
        assert audit["request"] == amount(1_000)


@pytest.mark.parametrize(
    "failure",
    [TimeoutError(), OSError(104, "connection reset by peer")],
    ids=["timeout", "oserror"],
)
async def test_a_line_failing_with_a_timeout_or_oserror_is_unavailable_naming_the_line(
    tmp_path: Path, failure: Exception
) -> None:
    async with station(tmp_path, ScriptedPumps()) as site:
        # Given a line whose reads fail below the driver's own errors
        site.driver.failing["pump_status"] = failure
        # When a cashier stops a pump on it
        error = await refused(site.commands.stop("till1", 1))
        # Then it is a 503 in the envelope naming the line, and it is audited
        assert error.code == "pump.device_unavailable"
        assert "'scripted'" in error.message
        (audit,) = site.audits("pump.stop")
        assert audit["refused"] == "pump.device_unavailable"


# --------------------------------------------------------------------------- emergency stop


async def test_an_emergency_stop_reports_and_audits_each_pump_it_could_not_stop(
    tmp_path: Path,
) -> None:
    # Given a line stopped pump by pump, whose pump 2 does not answer
    async with station(tmp_path, ScriptedPumps()) as site:
        site.driver.failing_pumps[2] = DriverUnavailable("pump 2 (0x51) does not answer")
        # When a cashier presses the emergency stop
        answer = await site.commands.emergency_stop("till1")
        # Then pump 1 is stopped, pump 2 is reported not stopped with why, and not all are
        by_pump = {p["pump"]: p for p in answer["pumps"]}
        assert answer["all_stopped"] is False
        assert (by_pump[1]["stopped"], by_pump[1]["error"]) == (True, None)
        assert by_pump[2]["stopped"] is False
        assert by_pump[2]["error"]["code"] == "pump.device_unavailable"
        # And each outcome is audited, pump 2's as refused; both are held by the edge
        trail = [a.get("refused") for a in site.audits("pump.emergency_stop")]
        assert sorted(trail, key=str) == sorted([None, "pump.device_unavailable"], key=str)
        assert site.controller.emergency_stopped == {1, 2}


async def test_an_emergency_stop_whose_one_request_fails_reports_every_pump_and_blocks_them(
    tmp_path: Path,
) -> None:
    # Given a line stopped in one request, and that request fails
    async with station(tmp_path, StopsAllAtOnce()) as site:
        site.driver.stop_all_fails = DriverUnavailable("the controller does not answer")
        # When a cashier presses the emergency stop
        answer = await site.commands.emergency_stop("till1")
        # Then no pump is reported stopped
        assert answer["all_stopped"] is False
        assert [p["stopped"] for p in answer["pumps"]] == [False, False]
        assert ("emergency_stop_all", 0) in site.driver.calls
        # And the edge still holds every pump: none is authorised until released
        assert site.controller.emergency_stopped == {1, 2}
        error = await refused(site.commands.authorise("till1", 1, amount(1_000)))
        assert error.code == "pump.emergency_stopped"


async def test_an_emergency_stop_of_a_renumbered_line_without_a_stop_all_goes_pump_by_pump(
    tmp_path: Path,
) -> None:
    # Given station pumps 1 and 2 that their device numbers 11 and 12, a device with no
    # stop-all: its renumbering view has the method but not the capability
    device = DevicePumps()
    view = renumbered(device, {1: 11, 2: 12})
    async with station(tmp_path, view) as site:
        # When a cashier presses the emergency stop
        answer = await site.commands.emergency_stop("till1")
        # Then each pump is stopped on its own, under the device's numbers
        assert answer["all_stopped"] is True
        assert sorted(c for c in device.calls if c[0] == "emergency_stop") == [
            ("emergency_stop", 11),
            ("emergency_stop", 12),
        ]


async def test_a_renumbered_device_that_cannot_stop_all_at_once_says_so() -> None:
    # Given a renumbering view of a device without a stop-all
    view = renumbered(DevicePumps(), {1: 11, 2: 12})
    # When it is asked to stop every pump at once
    with pytest.raises(DeviceRejected, match="cannot stop every pump"):
        await view.emergency_stop_all([1, 2])  # type: ignore[attr-defined]
    # Then it refuses rather than report every pump stopped


async def test_an_unreadable_reply_to_one_pumps_stop_counts_only_that_pump_as_not_stopped() -> None:
    # Given a PTS-2 that answers pump 2's stop with a broken packet
    def handler(request: httpx.Request) -> httpx.Response:
        first, second = decode_envelope(request.content)
        good = Packet(first.id, "PumpEmergencyStop", message="OK").to_json()
        broken = {"Id": second.id, "Type": 7}  # Type must be a string
        return httpx.Response(
            200, content=dumps({"Protocol": "jsonPTS", "Packets": [good, broken]})
        )

    async with make_driver(handler) as driver:
        # When the line is stopped
        failed = await driver.emergency_stop_all([1, 2])
    # Then only pump 2 is reported, as an unreadable reply
    assert list(failed) == [2]
    assert isinstance(failed[2], DriverUnavailable)
    assert failed[2].code == "jsonpts.malformed_reply"


async def test_release_frees_a_pump_the_device_shows_stopped_and_refuses_one_running(
    tmp_path: Path,
) -> None:
    async with station(tmp_path, Resetting()) as site:
        # Given pump 1 switched off at the device (not by this edge)
        site.driver.states[1] = PumpState.STOPPED
        # When a cashier releases it
        released = await site.commands.release("till1", 1)
        # Then it is reset and free
        assert released["state"] == "idle"
        assert ("reset", 1) in site.driver.calls
        # And a pump neither stopped nor emergency-stopped is not "released"
        error = await refused(site.commands.release("till1", 2))
        assert error.code == "pump.state_forbids"


async def test_release_frees_an_emergency_stopped_pump_that_still_shows_its_sale(
    tmp_path: Path,
) -> None:
    async with station(tmp_path, Resetting()) as site:
        # Given pump 1 emergency-stopped by this edge, the device still showing its sale
        await site.commands.emergency_stop("till1")
        site.driver.states[1] = PumpState.END_OF_TRANSACTION
        site.driver.refuse = "pump 1 holds unclosed filling 3: close it first"
        # When a cashier releases it
        released = await site.commands.release("till1", 1)
        # Then the edge's stop is released (the reset waits for the sale to be closed)
        assert released["emergency_stopped"] is False
        assert site.controller.emergency_stopped == {2}


# --------------------------------------------------------------------------- credentials

TOKENS = {"till1": "till-one-secret-0123456789", "till2": "till-two-secret-0123456789"}


@pytest.mark.parametrize(
    "header",
    [
        "Bearer till-two-secret-0123456789",
        "bearer till-two-secret-0123456789",
        "BEARER till-two-secret-0123456789",
        "Bearer  till-two-secret-0123456789 ",
    ],
)
def test_a_terminal_credential_names_its_terminal_whatever_the_schemes_case_or_spacing(
    header: str,
) -> None:
    assert check_terminal(header, TOKENS) == "till2"


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer ",
        "Basic till-two-secret-0123456789",
        "Bearer till-two-secret-012345678",  # a prefix of a secret
        "Bearer till-two-secret-01234567890",  # a secret and more
        "Bearer till-two",
    ],
)
def test_a_missing_wrong_or_partial_terminal_credential_is_refused(header: str | None) -> None:
    with pytest.raises(ForecourtError) as caught:
        check_terminal(header, TOKENS)
    assert caught.value.code == "auth.terminal_credential"


def test_an_edge_without_terminal_credentials_refuses_every_credential_saying_so() -> None:
    with pytest.raises(ForecourtError, match="no terminal credentials configured"):
        check_terminal("Bearer till-two-secret-0123456789", {})


async def test_a_released_pump_reset_on_a_later_release_no_longer_awaits_its_reset(
    tmp_path: Path,
) -> None:
    async with station(tmp_path, Resetting()) as site:
        driver, service = site.driver, site.commands
        # Given an emergency-stopped pump whose first release could not reset it (its sale
        # was still open), so it awaits its reset
        await service.emergency_stop("till1")
        driver.refuse = "pump 1 holds unclosed filling 3: close it first"
        await service.release("till1", 1)
        # When, the sale closed, a second release resets it
        driver.refuse = None
        assert (await service.release("till1", 1))["state"] == "idle"
        # Then it awaits nothing: switched off later by something else, it is not authorised
        driver.states[1] = PumpState.STOPPED
        error = await refused(service.authorise("till1", 1, amount(1_000)))
        assert error.code == "pump.state_forbids"


async def test_an_emergency_stop_of_many_pumps_sends_every_post_even_when_one_fails() -> None:
    # Given a PTS-2 that takes two packets per POST and answers one of the POSTs 503
    for failing in (1, 2):
        posts: list[list[int]] = []

        def handler(
            request: httpx.Request, failing: int = failing, posts: list[list[int]] = posts
        ) -> httpx.Response:
            packets = decode_envelope(request.content)
            posts.append([p.data["Pump"] for p in packets])
            if posts[-1][0] == 2 * failing - 1:
                return httpx.Response(503, text="busy")
            answers = [Packet(p.id, "PumpEmergencyStop", message="OK") for p in packets]
            return httpx.Response(200, content=encode_envelope(answers))

        async with make_driver(handler, max_packets_per_post=2) as driver:
            # When its four pumps are emergency-stopped
            failed = await driver.emergency_stop_all([1, 2, 3, 4])
        # Then both POSTs went out, and only the pumps of the failed one are reported
        assert sorted(sorted(p) for p in posts) == [[1, 2], [3, 4]]
        assert sorted(failed) == ([1, 2] if failing == 1 else [3, 4])


async def test_an_emergency_stop_whose_every_post_fails_raises() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, text="down")

    async with make_driver(handler, max_packets_per_post=2) as driver:
        with pytest.raises(DriverUnavailable):
            await driver.emergency_stop_all([1, 2, 3])
