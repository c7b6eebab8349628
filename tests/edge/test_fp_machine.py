"""The fuelling-point state machine follows the device and never loses a finished sale."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from forecourt.edge.domain import FpState, FuellingPointMachine
from forecourt.edge.drivers import PumpState


def test_a_normal_fuelling_walks_the_expected_states() -> None:
    m = FuellingPointMachine(1, state=FpState.IDLE)
    seen = [
        m.observe(s)
        for s in (
            PumpState.CALLING,
            PumpState.AUTHORISED,
            PumpState.FUELLING,
            PumpState.END_OF_TRANSACTION,
        )
    ]
    assert seen == [FpState.CALLING, FpState.AUTHORISED, FpState.FUELLING, FpState.FINISHED_UNPAID]
    assert m.move(FpState.CLOSED)
    assert m.observe(PumpState.IDLE) is FpState.IDLE
    assert m.anomalies == 0


def test_an_unexpected_report_is_applied_and_counted_as_an_anomaly() -> None:
    m = FuellingPointMachine(1, state=FpState.IDLE)
    m.observe(PumpState.FUELLING)  # idle → fuelling skips authorisation
    assert m.state is FpState.FUELLING
    assert m.anomalies == 1


def test_finished_unpaid_is_not_left_by_the_device_repeating_itself() -> None:
    m = FuellingPointMachine(1, state=FpState.FINISHED_UNPAID)
    assert m.observe(PumpState.END_OF_TRANSACTION) is FpState.FINISHED_UNPAID
    assert m.observe(PumpState.IDLE) is FpState.IDLE  # closed elsewhere: passes through CLOSED
    assert (FpState.FINISHED_UNPAID, FpState.CLOSED) in m.history


def test_offline_and_error_are_reachable_from_anywhere_and_left_to_anything() -> None:
    for state in FpState:
        m = FuellingPointMachine(1, state=state)
        assert m.move(FpState.OFFLINE)
        assert m.move(FpState.FUELLING)
        m = FuellingPointMachine(1, state=state)
        assert m.move(FpState.ERROR)


@given(st.lists(st.sampled_from(list(PumpState)), max_size=60))
def test_any_report_sequence_keeps_the_machine_in_a_known_state(reports: list[PumpState]) -> None:
    m = FuellingPointMachine(1)
    for report in reports:
        state = m.observe(report)
        assert state in FpState
        if report is PumpState.END_OF_TRANSACTION:
            assert state in (FpState.FINISHED_UNPAID, FpState.CLOSED)
