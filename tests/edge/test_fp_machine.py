"""The fuelling-point state machine follows the device, refuses what no device can do, and
never loses a finished sale."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from forecourt.edge.domain import TRANSITIONS, FpState, FuellingPointMachine, Refusal
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
    assert m.move(FpState.CLOSED) is None
    assert m.observe(PumpState.IDLE) is FpState.IDLE
    assert m.refused == 0


def test_an_illegal_report_is_refused_counted_once_and_the_state_kept() -> None:
    m = FuellingPointMachine(1, state=FpState.FINISHED_UNPAID)
    # A pump holding an unclosed sale cannot be fuelling a new one.
    outcome = m.observe(PumpState.FUELLING)
    assert isinstance(outcome, Refusal)
    assert (outcome.current, outcome.target) == (FpState.FINISHED_UNPAID, FpState.FUELLING)
    assert m.state is FpState.FINISHED_UNPAID
    assert m.refused == 1
    # The device repeats itself on every poll: one episode, one count.
    assert m.observe(PumpState.FUELLING) is FpState.FINISHED_UNPAID
    assert m.refused == 1
    assert m.move(FpState.AUTHORISED) is not None
    assert m.refused == 2
    assert m.state is FpState.FINISHED_UNPAID


def test_a_move_made_by_us_that_the_model_forbids_is_refused() -> None:
    m = FuellingPointMachine(1, state=FpState.FUELLING)
    assert m.move(FpState.CLOSED) is not None  # closing a sale that has not finished
    assert m.state is FpState.FUELLING
    assert m.move(FpState.CALLING) is not None
    assert m.refused == 2


def test_skips_a_poll_can_miss_are_allowed() -> None:
    m = FuellingPointMachine(1, state=FpState.CALLING)
    assert m.observe(PumpState.END_OF_TRANSACTION) is FpState.FINISHED_UNPAID  # quick sale
    m = FuellingPointMachine(1, state=FpState.IDLE)
    assert m.observe(PumpState.FUELLING) is FpState.FUELLING  # another terminal authorised
    assert m.refused == 0


def test_finished_unpaid_is_not_left_by_the_device_repeating_itself() -> None:
    m = FuellingPointMachine(1, state=FpState.FINISHED_UNPAID)
    assert m.observe(PumpState.END_OF_TRANSACTION) is FpState.FINISHED_UNPAID
    assert m.observe(PumpState.IDLE) is FpState.IDLE  # closed elsewhere: passes through CLOSED
    assert (FpState.FINISHED_UNPAID, FpState.CLOSED) in m.history


def test_a_device_lagging_behind_our_authorisation_does_not_get_a_second_one() -> None:
    m = FuellingPointMachine(1, state=FpState.CALLING, authorise_grace_s=5.0)
    assert m.authorised(now=100.0) is None
    # The pump still shows the call it was just authorised for: stay authorised.
    assert isinstance(m.observe(PumpState.CALLING, now=101.0), Refusal)
    assert m.state is FpState.AUTHORISED
    assert m.observe(PumpState.CALLING, now=104.9) is FpState.AUTHORISED
    assert m.refused == 1
    # Past the grace the authorisation is taken as lost: the call is a call again.
    assert m.observe(PumpState.CALLING, now=105.0) is FpState.CALLING
    assert m.authorised_at is None


def test_offline_and_error_are_reachable_from_anywhere_and_left_to_anything() -> None:
    for state in FpState:
        m = FuellingPointMachine(1, state=state)
        assert m.move(FpState.OFFLINE) is None
        assert m.move(FpState.FUELLING) is None
        m = FuellingPointMachine(1, state=state)
        assert m.move(FpState.ERROR) is None
        assert m.state is FpState.ERROR


def test_every_state_has_a_way_out() -> None:
    for state in FpState:
        assert TRANSITIONS[state] - {state}, state


@given(st.lists(st.sampled_from(list(PumpState)), max_size=60))
def test_any_report_sequence_moves_only_along_allowed_transitions(
    reports: list[PumpState],
) -> None:
    m = FuellingPointMachine(1)
    for report in reports:
        before = m.state
        m.observe(report)
        after = m.state
        steps = [(a, b) for a, b in m.history[-2:]] if after != before else []
        for a, b in steps:
            assert b in TRANSITIONS[a] or b in (FpState.ERROR, FpState.OFFLINE), (a, b)
        if report is PumpState.END_OF_TRANSACTION and before not in (
            FpState.CLOSED,
            FpState.FINISHED_UNPAID,
        ):
            # A finished sale is always seen as one (journaling never waits on the model).
            assert after is FpState.FINISHED_UNPAID
