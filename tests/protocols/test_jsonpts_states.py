"""Random jsonPTS status replies are read by the driver as the protocol means them, and never
make the edge's fuelling-point machine apply an illegal transition: what it cannot allow it
refuses and counts, and a lifecycle a pump really goes through is never refused."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from forecourt.edge.domain import TRANSITIONS, FpState, FuellingPointMachine, Refusal
from forecourt.protocols.jsonpts.codec import Packet, decode_envelope, encode_envelope
from forecourt.protocols.jsonpts.driver import JsonPtsDriver
from forecourt.protocols.model import PumpState

VOLUME = st.sampled_from([Decimal("0"), Decimal("0.00"), Decimal("1.25"), Decimal("35.20")])
NOZZLE = st.integers(0, 3)

# Replies a PTS-2 gives to PumpGetStatus (field names as in the controller's replies; a value
# may be odd or missing: the driver must say ERROR, never crash or invent a state).
REPLY = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("PumpIdleStatus"), "NozzleUp": NOZZLE, "EmergencyStop": st.booleans()}
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("PumpFillingStatus"),
            "Nozzle": st.integers(1, 3),
            "Volume": VOLUME,
            "Amount": VOLUME,
            "Price": st.just(Decimal("7.89")),
            "Transaction": st.integers(1, 5),
            "IsSuspended": st.booleans(),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("PumpEndOfTransactionStatus"),
            "Nozzle": st.integers(1, 3),
            "Volume": VOLUME,
            "Amount": VOLUME,
            "Price": st.just(Decimal("7.89")),
            "Transaction": st.integers(1, 5),
        }
    ),
    st.fixed_dictionaries({"type": st.just("PumpOfflineStatus")}),
    st.fixed_dictionaries({"type": st.just("PumpFillingStatus"), "Volume": st.just("bad")}),
)


def meant(reply: dict[str, Any]) -> PumpState:
    """What a PTS-2 status reply says, written from the protocol's description (not the
    driver's code): the oracle the driver's reading is held to."""
    kind = reply["type"]
    if kind == "PumpOfflineStatus":
        return PumpState.OFFLINE
    if kind == "PumpIdleStatus":
        if reply["EmergencyStop"]:
            return PumpState.STOPPED
        return PumpState.CALLING if reply["NozzleUp"] else PumpState.IDLE
    if kind == "PumpEndOfTransactionStatus":
        return PumpState.END_OF_TRANSACTION
    if not isinstance(reply.get("Volume"), Decimal):
        return PumpState.ERROR  # a filling whose volume is no number
    if reply["IsSuspended"]:
        return PumpState.SUSPENDED
    return PumpState.AUTHORISED if reply["Volume"] == 0 else PumpState.FUELLING


class ScriptedController:
    """Answers each PumpGetStatus with the next scripted reply."""

    def __init__(self, script: list[dict[str, Any]]) -> None:
        self.script = list(script)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        answers = []
        for packet in decode_envelope(request.content):
            item = dict(self.script.pop(0)) if self.script else {"type": "PumpIdleStatus"}
            kind = item.pop("type")
            answers.append(Packet(packet.id, kind, {"Pump": 1, **item}))
        return httpx.Response(200, content=encode_envelope(answers))


@settings(max_examples=150, deadline=None)
@given(st.lists(REPLY, min_size=1, max_size=40))
async def test_no_illegal_transition_is_ever_applied_whatever_the_controller_reports(
    script: list[dict[str, Any]],
) -> None:
    driver = JsonPtsDriver(
        "http://pts.test",
        "admin",
        "secret",
        timezone="UTC",
        transport=httpx.MockTransport(ScriptedController(script)),
    )
    machine = FuellingPointMachine(1, state=FpState.IDLE)
    seen: list[PumpState] = []
    async with driver:
        for step in range(len(script)):
            (status,) = await driver.pump_status([1])
            assert status.state is meant(script[step]), (script[step], status)
            seen.append(status.state)
            outcome = machine.observe(status.state, now=float(step))
            if isinstance(outcome, Refusal):
                assert outcome.target not in TRANSITIONS[outcome.current]
    for before, after in machine.history:
        assert after in TRANSITIONS[before] or after in (FpState.ERROR, FpState.OFFLINE), (
            before,
            after,
            seen,
        )
    assert machine.refused <= len(script)


FILLING = {"Nozzle": 1, "Price": Decimal("7.89"), "Transaction": 3}
LIFECYCLE = [
    {"type": "PumpIdleStatus", "NozzleUp": 0, "EmergencyStop": False},
    {"type": "PumpIdleStatus", "NozzleUp": 1, "EmergencyStop": False},
    {"type": "PumpFillingStatus", **FILLING, "Volume": Decimal("0"), "Amount": Decimal("0")},
    {"type": "PumpFillingStatus", **FILLING, "Volume": Decimal("1.25"), "Amount": Decimal("9.86")},
    {
        "type": "PumpFillingStatus",
        **FILLING,
        "Volume": Decimal("1.25"),
        "Amount": Decimal("9.86"),
        "IsSuspended": True,
    },
    {"type": "PumpFillingStatus", **FILLING, "Volume": Decimal("2.50"), "Amount": Decimal("19.73")},
    {
        "type": "PumpEndOfTransactionStatus",
        **FILLING,
        "Volume": Decimal("2.50"),
        "Amount": Decimal("19.73"),
    },
    {"type": "PumpIdleStatus", "NozzleUp": 0, "EmergencyStop": False},
]


async def test_a_lifecycle_a_pump_really_goes_through_is_read_in_order_and_never_refused() -> None:
    # Given a controller reporting one whole sale: idle, nozzle up, authorised, fuelling,
    # suspended, fuelling again, end of transaction, idle
    driver = JsonPtsDriver(
        "http://pts.test",
        "admin",
        "secret",
        timezone="UTC",
        transport=httpx.MockTransport(ScriptedController(LIFECYCLE)),
    )
    machine = FuellingPointMachine(1, state=FpState.IDLE)
    # When the driver reads each and the machine observes it
    async with driver:
        for step in range(len(LIFECYCLE)):
            (status,) = await driver.pump_status([1])
            machine.observe(status.state, now=float(step))
    # Then every step was taken and none refused
    assert machine.refused == 0
    assert [after for _, after in machine.history] == [
        FpState.CALLING,
        FpState.AUTHORISED,
        FpState.FUELLING,
        FpState.SUSPENDED,
        FpState.FUELLING,
        FpState.FINISHED_UNPAID,
        FpState.CLOSED,  # idle again: closed elsewhere, then idle
        FpState.IDLE,
    ]
