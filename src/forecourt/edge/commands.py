"""Pump commands of the edge API: what a cashier terminal (and HQ's command channel) may ask of
a pump, the rules that refuse it, and the audit of every outcome.

Commands: authorise (a preset by volume or by amount, or a full tank only when asked for),
stop, suspend, resume, an emergency stop of every pump of the station at once and the release
of a pump after it. Each command on a pump runs under its line's controller lock
(:meth:`ForecourtController.commanding`): it reads the pump's state from the device, checks it
against the rule below and only then acts, so two commands on one pump, or a command and the
poll loop, never interleave. The emergency stop waits for nothing: every line at once, every
pump of a line concurrently (or the protocol's broadcast, where the driver has one).

State rules (the state is the device's, read when the command runs; refusals are 409
``pump.state_forbids`` with the state in the details):

- authorise: ``idle`` (a pre-authorisation before the nozzle is lifted: prepay) or
  ``calling``; never while the pump is emergency-stopped (409 ``pump.emergency_stopped``);
- stop: ``authorised``, ``fuelling`` or ``suspended``;
- suspend: ``fuelling``; resume: ``suspended`` (both only where the driver can suspend);
- release: a pump emergency-stopped from this edge, or one the device shows ``stopped``.

Every command a terminal sends is audited in the journal (``record_audit``), accepted or not;
a refused one carries ``refused`` (its error code) and ``message`` in its details. See
docs/pump-commands.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, ValidationError, model_validator

from forecourt.edge.controller import EmergencyStopped, ForecourtController, NozzleUnknown
from forecourt.edge.domain import FpState
from forecourt.edge.drivers import (
    Capability,
    DeviceRejected,
    DriverUnavailable,
    Preset,
    PresetType,
    PumpState,
    PumpStatus,
)
from forecourt.edge.journal import Journal
from forecourt.infra.logging import get_logger
from forecourt.kernel.access import Grant, Permission, Principal, PrincipalKind, Scope
from forecourt.kernel.errors import Conflict, ForecourtError, InvalidValue, NotFound, Unauthorized
from forecourt.protocols.driver import ReportsPresetLimits, Resets

log = get_logger("forecourt.edge.commands")

AUTHORISE_FROM = frozenset({PumpState.IDLE, PumpState.CALLING})
STOP_FROM = frozenset({PumpState.AUTHORISED, PumpState.FUELLING, PumpState.SUSPENDED})
SUSPEND_FROM = frozenset({PumpState.FUELLING})
RESUME_FROM = frozenset({PumpState.SUSPENDED})

#: protocols whose devices release an emergency stop with a resume of the pump (a PTS-2 takes
#: ``PumpResume``); a DART pump stays switched off until it is RESET, which its driver sends
#: as the first step of the pump's next authorisation
_RELEASED_BY_RESUME = frozenset({"jsonpts"})
#: a refused body longer than this is audited by its head only
_AUDITED_BODY_CHARS = 2000


# --- errors ---------------------------------------------------------------------------------


class TerminalUnauthorized(Unauthorized):
    code = "auth.terminal_credential"


class PumpUnknown(NotFound):
    code = "pump.unknown"


class PumpsNotReady(ForecourtError):
    code = "pump.not_ready"
    http_status = 503


class StateForbids(Conflict):
    code = "pump.state_forbids"


class NozzleMismatch(Conflict):
    code = "pump.nozzle_mismatch"


class CommandInvalid(InvalidValue):
    code = "request.invalid"


class PresetRequired(InvalidValue):
    code = "pump.preset_required"


class PresetInvalid(InvalidValue):
    code = "pump.preset_invalid"


class PresetAboveMaximum(InvalidValue):
    code = "pump.preset_above_maximum"


class Unsupported(InvalidValue):
    code = "pump.command_unsupported"


class PresetUnsupported(InvalidValue):
    code = "pump.preset_unsupported"


class NozzleRequired(InvalidValue):
    code = "pump.nozzle_required"


class DeviceRefused(Conflict):
    code = "pump.device_rejected"


class LineUnavailable(ForecourtError):
    code = "pump.device_unavailable"
    http_status = 503


# --- requests -------------------------------------------------------------------------------


class PresetBody(BaseModel):
    """A limit for the fuelling: exactly one of a volume (ml) or an amount (minor units)."""

    model_config = ConfigDict(extra="forbid")

    volume_ml: StrictInt | None = None
    amount_minor: StrictInt | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> PresetBody:
        if (self.volume_ml is None) == (self.amount_minor is None):
            raise ValueError("a preset is either {'volume_ml': N} or {'amount_minor': N}")
        return self


class AuthoriseRequest(BaseModel):
    """``POST /v1/pumps/{pump}/authorize``: a nozzle (None: the one lifted, or the pump's only
    one) and a preset, or ``full: true`` for a full tank."""

    model_config = ConfigDict(extra="forbid")

    nozzle: StrictInt | None = None
    preset: PresetBody | None = None
    full: StrictBool = False


@dataclass(frozen=True)
class CommandLine:
    """One pump device line as the commands see it."""

    name: str
    protocol: str
    controller: ForecourtController


@dataclass
class _Attempt:
    """What a command found out before it was refused (see ``PumpCommands._refusals``)."""

    line: CommandLine | None = None


def check_terminal(header: str | None, tokens: Mapping[str, str]) -> str:
    """The name of the terminal whose secret ``header`` (``Bearer <secret>``) carries, compared
    in constant time with every configured one; :class:`TerminalUnauthorized` otherwise."""
    scheme, _, secret = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise TerminalUnauthorized(
            "missing terminal credential: send Authorization: Bearer <terminal secret>"
        )
    if not tokens:
        raise TerminalUnauthorized(
            "this edge has no terminal credentials configured (FORECOURT_EDGE_TERMINAL_TOKENS)"
        )
    found = _holder(secret.strip(), tokens)
    if found is None:
        raise TerminalUnauthorized("unknown terminal credential")
    return found


def _holder(secret: str, tokens: Mapping[str, str]) -> str | None:
    """The name whose secret ``secret`` is, compared in constant time with every one."""
    given = secret.encode()
    found: str | None = None
    for name, expected in tokens.items():
        if hmac.compare_digest(given, expected.encode()):
            found = name  # no early exit: every secret is compared
    return found


# What an edge credential allows, at its own station only: a terminal commands the pumps
# and reads the station; a reader (reader_tokens) only reads it.
TERMINAL_PERMISSIONS = frozenset(
    {
        Permission.PUMPS_COMMAND,
        Permission.PUMPS_EMERGENCY_STOP,
        Permission.STATION_READ,
        Permission.METRICS_READ,
    }
)
READER_PERMISSIONS = frozenset({Permission.STATION_READ, Permission.METRICS_READ})


class TerminalAuthenticator:
    """The edge's :class:`~forecourt.infra.access.Authenticator`: a terminal's or a reader's
    secret (each compared in constant time) as a principal scoped to this station."""

    def __init__(
        self, station: str, terminals: Mapping[str, str], readers: Mapping[str, str]
    ) -> None:
        self.station = station
        self.terminals = dict(terminals)
        self.readers = dict(readers)

    def refuse_missing(self, source: str | None) -> TerminalUnauthorized:
        refused = TerminalUnauthorized(
            "missing terminal credential: send Authorization: Bearer <terminal secret>"
        )
        log.warning("edge.terminal_refused", source=source, reason=refused.message)
        return refused

    async def principal(self, token: str, source: str | None) -> Principal:
        scope = Scope.station(self.station)
        for tokens, role, permissions in (
            (self.terminals, "terminal", TERMINAL_PERMISSIONS),
            (self.readers, "reader", READER_PERMISSIONS),
        ):
            name = _holder(token, tokens)
            if name is not None:
                grant = Grant(role, scope, permissions)
                return Principal(PrincipalKind.TERMINAL, name, (grant,))
        if not self.terminals and not self.readers:
            refused = TerminalUnauthorized(
                "this edge has no terminal credentials configured "
                "(FORECOURT_EDGE_TERMINAL_TOKENS, FORECOURT_EDGE_READER_TOKENS)"
            )
        else:
            refused = TerminalUnauthorized("unknown terminal credential")
        log.warning("edge.terminal_refused", source=source, reason=refused.message)
        raise refused


def _state(status: PumpStatus) -> str:
    return status.state.value


def _status_json(line: CommandLine, status: PumpStatus) -> dict[str, Any]:
    return {
        "pump": status.pump,
        "line": line.name,
        "state": _state(status),
        "nozzle": status.nozzle,
        "volume_ml": status.volume_ml,
        "amount_minor": status.amount_minor,
        "unit_price_mmu": status.unit_price_mmu,
        "device_txn": status.transaction,
        "emergency_stopped": status.pump in line.controller.emergency_stopped,
        "error": status.error,
    }


def _as_api_error(line: CommandLine | None, exc: Exception) -> ForecourtError:
    """A driver's refusal or fault as the command's answer, with the vendor's reason."""
    where = f"device line {line.name!r}" if line else "the device line"
    if isinstance(exc, DeviceRejected):
        return DeviceRefused(f"the device refused the command: {exc.message}", **exc.details)
    if isinstance(exc, DriverUnavailable):
        return LineUnavailable(f"{where} does not answer: {exc.message}; try again later")
    if isinstance(exc, ForecourtError):
        return exc
    return LineUnavailable(f"{where} does not answer: {exc or type(exc).__name__}")


class PumpCommands:
    """The command service of one edge node."""

    def __init__(
        self,
        lines: Callable[[], Sequence[CommandLine]],
        journal: Journal,
        *,
        max_volume_ml: int,
        max_amount_minor: int,
    ) -> None:
        self.lines = lines
        self.journal = journal
        self.max_volume_ml = max_volume_ml
        self.max_amount_minor = max_amount_minor
        #: DART pumps released after an emergency stop, still switched off until their next
        #: authorisation resets them
        self._awaiting_reset: set[int] = set()

    # --- finding pumps ------------------------------------------------------------------------

    def line_of(self, pump: int) -> CommandLine:
        lines = list(self.lines())
        if lines and all(line.controller.snapshot() is None for line in lines):
            raise PumpsNotReady("the edge has no station snapshot yet: no pump can be commanded")
        for line in lines:
            if pump in line.controller.pumps():
                return line
        raise PumpUnknown(f"no pump {pump} on this station's device lines", pump=pump)

    async def status(self, pump: int) -> dict[str, Any]:
        line = self.line_of(pump)
        try:
            status = await line.controller.read_status(pump)
        except (DriverUnavailable, DeviceRejected, OSError, TimeoutError) as exc:
            raise _as_api_error(line, exc) from exc
        return _status_json(line, status)

    async def statuses(self) -> list[dict[str, Any]]:
        """Every pump of every line, read from the devices now (a line that does not answer
        shows its pumps offline with the reason)."""

        async def of(line: CommandLine) -> list[dict[str, Any]]:
            pumps = line.controller.pumps()
            if not pumps:
                return []
            try:
                found = await line.controller.driver.pump_status(pumps)
            except (DriverUnavailable, DeviceRejected, OSError, TimeoutError, AttributeError) as e:
                found = [PumpStatus(p, PumpState.OFFLINE, error=str(e)) for p in pumps]
            return [_status_json(line, status) for status in found]

        per_line = await asyncio.gather(*(of(line) for line in self.lines()))
        return sorted((s for found in per_line for s in found), key=lambda s: int(s["pump"]))

    # --- auditing -----------------------------------------------------------------------------

    async def _audit(
        self, actor: str, action: str, pump: int | None, details: dict[str, Any]
    ) -> None:
        target = f"fp:{pump}" if pump is not None else "forecourt"
        await self.journal.record_audit(actor=actor, action=action, target=target, details=details)

    async def _refused(
        self,
        actor: str,
        action: str,
        pump: int | None,
        details: dict[str, Any],
        error: ForecourtError,
    ) -> None:
        log.warning(
            "edge.pump_command_refused",
            actor=actor,
            action=action,
            pump=pump,
            code=error.code,
            reason=error.message,
        )
        await self._audit(
            actor,
            action,
            pump,
            {**details, "refused": error.code, "message": error.message, **error.details},
        )

    @contextlib.asynccontextmanager
    async def _refusals(
        self, actor: str, action: str, pump: int, details: dict[str, Any]
    ) -> AsyncIterator[_Attempt]:
        """One command inside: whatever refuses it (our rules, the device, a line that does
        not answer) is audited as refused, with ``details`` as they are then, and raised in
        the API's envelope. The block sets ``attempt.line`` once it knows the pump's line."""
        attempt = _Attempt()
        try:
            yield attempt
        except (ForecourtError, OSError, TimeoutError) as exc:
            error = _as_api_error(attempt.line, exc)
            await self._refused(actor, action, pump, details, error)
            raise error from exc

    # --- the rules ----------------------------------------------------------------------------

    def _preset(self, line: CommandLine, pump: int, request: AuthoriseRequest) -> Preset:
        if request.preset is None and not request.full:
            raise PresetRequired("give a preset or ask for a full tank", pump=pump)
        if request.preset is not None and request.full:
            raise PresetRequired("give a preset or ask for a full tank, not both", pump=pump)
        if request.preset is None:
            return Preset(PresetType.FULL_TANK)
        capabilities: frozenset[Capability] = getattr(
            line.controller.driver, "capabilities", frozenset()
        )
        if request.preset.volume_ml is not None:
            kind, value, limit = PresetType.VOLUME, request.preset.volume_ml, self.max_volume_ml
            needs, unit = Capability.PRESET_VOLUME, "volume_ml"
        else:
            assert request.preset.amount_minor is not None  # PresetBody holds exactly one
            kind, value, limit = (
                PresetType.AMOUNT,
                request.preset.amount_minor,
                self.max_amount_minor,
            )
            needs, unit = Capability.PRESET_AMOUNT, "amount_minor"
        if needs not in capabilities:
            raise PresetUnsupported(
                f"pump {pump} ({line.protocol}) takes no {kind.value} preset",
                pump=pump,
                preset=kind.value,
            )
        if value <= 0:
            raise PresetInvalid(f"a preset must be positive: {unit} {value}", pump=pump)
        driver = line.controller.driver
        if isinstance(driver, ReportsPresetLimits):
            device_limit = driver.max_preset(pump, kind)
            if device_limit is not None and device_limit > 0:
                limit = min(limit, device_limit)
        if value > limit:
            raise PresetAboveMaximum(
                f"a preset of {unit} {value} is above pump {pump}'s maximum {limit}",
                pump=pump,
                maximum=limit,
            )
        if kind is PresetType.VOLUME:
            return Preset(PresetType.VOLUME, volume_ml=value)
        return Preset(PresetType.AMOUNT, amount_minor=value)

    def _nozzle(self, line: CommandLine, pump: int, status: PumpStatus, asked: int | None) -> int:
        snap = line.controller.snapshot()
        fp = snap.fuelling_point(pump) if snap else None
        numbers = sorted(n.number for n in fp.nozzles) if fp else []
        if asked is not None and asked not in numbers:
            raise NozzleUnknown(f"pump {pump} has no nozzle {asked}", pump=pump, nozzles=numbers)
        if status.state is PumpState.CALLING and status.nozzle is not None:
            if asked is not None and asked != status.nozzle:
                raise NozzleMismatch(
                    f"nozzle {status.nozzle} of pump {pump} is up, not nozzle {asked}",
                    pump=pump,
                    nozzle_up=status.nozzle,
                )
            return status.nozzle
        if asked is not None:
            return asked
        if len(numbers) == 1:
            return numbers[0]
        raise NozzleRequired(
            f"pump {pump} has nozzles {numbers}: name the one to authorise", pump=pump
        )

    @staticmethod
    def _allowed(pump: int, status: PumpStatus, allowed: frozenset[PumpState], what: str) -> None:
        if status.state is PumpState.OFFLINE:
            raise LineUnavailable(
                f"pump {pump} does not answer ({status.error or 'offline'}); try again later",
                pump=pump,
                state=status.state.value,
            )
        if status.state not in allowed:
            raise StateForbids(
                f"pump {pump} is {status.state.value}: {what} needs it "
                + " or ".join(sorted(s.value for s in allowed)),
                pump=pump,
                state=status.state.value,
                allowed=sorted(s.value for s in allowed),
            )

    # --- the commands -------------------------------------------------------------------------

    async def authorise(self, actor: str, pump: int, body: Any) -> dict[str, Any]:
        action = "pump.authorize"
        shown = json.dumps(body, sort_keys=True, default=str)
        details: dict[str, Any] = (
            {"request": body}
            if len(shown) <= _AUDITED_BODY_CHARS
            else {"request_head": shown[:200]}
        )
        async with self._refusals(actor, action, pump, details) as attempt:
            try:
                request = AuthoriseRequest.model_validate(body)
            except ValidationError as exc:
                errors = [
                    {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                    for e in exc.errors()
                ]
                raise CommandInvalid("the command is not valid", errors=errors) from None
            line = attempt.line = self.line_of(pump)
            preset = self._preset(line, pump, request)
            controller = line.controller
            async with controller.commanding(pump) as status:
                if pump in controller.emergency_stopped:
                    raise EmergencyStopped(
                        f"pump {pump} is emergency-stopped: release it first",
                        pump=pump,
                        state=status.state.value,
                    )
                allowed = AUTHORISE_FROM
                if pump in self._awaiting_reset:
                    allowed = allowed | {PumpState.STOPPED}
                self._allowed(pump, status, allowed, "an authorisation")
                nozzle = self._nozzle(line, pump, status, request.nozzle)
                if status.state is PumpState.STOPPED:
                    # Released after an emergency stop, switched off until this authorisation
                    # resets it: the pump is free.
                    controller.machine(pump).move(FpState.IDLE)
                authorised = await controller.authorise(pump, nozzle, preset, actor=actor)
                self._awaiting_reset.discard(pump)
                after = await controller.read_status(pump)
        return {
            **_status_json(line, after),
            "nozzle": authorised.nozzle,
            "grade": authorised.grade,
            "device_txn": authorised.device_txn
            if authorised.device_txn is not None
            else after.transaction,
            "unit_price_mmu": authorised.unit_price_mmu,
            "price_version": authorised.price_version,
            "preset": {
                "type": preset.type.value,
                "volume_ml": preset.volume_ml,
                "amount_minor": preset.amount_minor,
            },
        }

    async def _simple(
        self,
        actor: str,
        pump: int,
        action: str,
        allowed: frozenset[PumpState],
        what: str,
        *,
        needs: Capability | None = None,
    ) -> dict[str, Any]:
        details: dict[str, Any] = {}
        async with self._refusals(actor, action, pump, details) as attempt:
            line = attempt.line = self.line_of(pump)
            controller = line.controller
            capabilities: frozenset[Capability] = getattr(
                controller.driver, "capabilities", frozenset()
            )
            if needs is not None and needs not in capabilities:
                raise Unsupported(f"pump {pump} ({line.protocol}) cannot {what}", pump=pump)
            async with controller.commanding(pump) as status:
                details["state_before"] = status.state.value
                self._allowed(pump, status, allowed, f"to {what}")
                if action == "pump.stop":
                    await controller.driver.stop(pump)
                    if status.state is PumpState.AUTHORISED:
                        controller.cancelled(pump)
                elif action == "pump.suspend":
                    await controller.driver.suspend(pump)
                else:
                    await controller.driver.resume(pump)
                after = await controller.read_status(pump)
        await self._audit(actor, action, pump, {**details, "state_after": after.state.value})
        return _status_json(line, after)

    async def stop(self, actor: str, pump: int) -> dict[str, Any]:
        return await self._simple(actor, pump, "pump.stop", STOP_FROM, "stop")

    async def suspend(self, actor: str, pump: int) -> dict[str, Any]:
        return await self._simple(
            actor, pump, "pump.suspend", SUSPEND_FROM, "suspend", needs=Capability.SUSPEND
        )

    async def resume(self, actor: str, pump: int) -> dict[str, Any]:
        return await self._simple(
            actor, pump, "pump.resume", RESUME_FROM, "resume", needs=Capability.SUSPEND
        )

    async def emergency_stop(self, actor: str) -> dict[str, Any]:
        """Every pump of every line, at once; the answer says per pump whether it stopped."""

        async def line_stop(line: CommandLine) -> list[dict[str, Any]]:
            controller = line.controller
            pumps = controller.pumps()
            failures = await controller.emergency_stop_all()
            try:
                found = {s.pump: s for s in await controller.driver.pump_status(pumps)}
            except (DriverUnavailable, DeviceRejected, OSError, TimeoutError, AttributeError):
                found = {}
            results = []
            for pump in pumps:
                error = failures.get(pump)
                status = found.get(pump)
                entry: dict[str, Any] = {
                    "pump": pump,
                    "line": line.name,
                    "stopped": error is None,
                    "state": _state(status) if status else None,
                    "error": None,
                }
                if error is not None:
                    api = _as_api_error(line, error)
                    entry["error"] = {"code": api.code, "message": api.message}
                    await self._refused(actor, "pump.emergency_stop", pump, {}, api)
                else:
                    self._awaiting_reset.discard(pump)
                    await self._audit(
                        actor, "pump.emergency_stop", pump, {"state_after": entry["state"]}
                    )
                results.append(entry)
            return results

        per_line = await asyncio.gather(*(line_stop(line) for line in self.lines()))
        pumps = sorted((p for found in per_line for p in found), key=lambda p: int(p["pump"]))
        log.warning(
            "edge.emergency_stop",
            actor=actor,
            stopped=[p["pump"] for p in pumps if p["stopped"]],
            failed=[p["pump"] for p in pumps if not p["stopped"]],
        )
        return {"all_stopped": all(p["stopped"] for p in pumps), "pumps": pumps}

    async def release(self, actor: str, pump: int) -> dict[str, Any]:
        """Release a pump after an emergency stop, as its protocol requires."""
        action = "pump.release"
        details: dict[str, Any] = {}
        async with self._refusals(actor, action, pump, details) as attempt:
            line = attempt.line = self.line_of(pump)
            controller = line.controller
            async with controller.commanding(pump) as status:
                details["state_before"] = status.state.value
                blocked = pump in controller.emergency_stopped
                if not blocked and status.state is not PumpState.STOPPED:
                    raise StateForbids(
                        f"pump {pump} is not emergency-stopped (it is {status.state.value})",
                        pump=pump,
                        state=status.state.value,
                    )
                driver = controller.driver
                if line.protocol in _RELEASED_BY_RESUME:
                    await driver.resume(pump)
                    details["sent"] = "resume"
                elif isinstance(driver, Resets):
                    try:
                        await driver.reset(pump)
                        details["sent"] = "reset"
                        self._awaiting_reset.discard(pump)
                        controller.machine(pump).move(FpState.IDLE)
                    except DeviceRejected as exc:  # e.g. the stopped sale is not closed yet
                        self._awaiting_reset.add(pump)
                        details["sent"] = f"nothing yet ({exc.message}): reset when authorised"
                else:
                    self._awaiting_reset.add(pump)
                    details["sent"] = "nothing: reset by the next authorisation"
                controller.released(pump)
                after = await controller.read_status(pump)
        await self._audit(actor, action, pump, {**details, "state_after": after.state.value})
        return _status_json(line, after)
