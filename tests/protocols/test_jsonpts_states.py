"""Random jsonPTS status replies, read by the driver, never make the edge's fuelling-point
machine apply an illegal transition: what it cannot allow it refuses and counts."""

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
