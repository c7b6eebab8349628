"""The event envelope: CloudEvents binary mode (``ce-*`` headers + JSON body) and its rules.

An envelope written as headers and body must read back as the same envelope; whatever is
not a well-formed event on the wire is refused with ``kernel.malformed_event``.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forecourt.kernel.errors import InvalidValue
from forecourt.kernel.events import Envelope, event_type, new_traceparent, trace_id_of

SALE_COMPLETED = "com.forecourt.sales.sale.completed.v1"
AT = datetime(2026, 11, 25, 8, 30, tzinfo=UTC)
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(), json_values, max_size=6)
segments = st.from_regex(r"[a-z_]{1,12}", fullmatch=True)
event_types = st.builds(
    lambda ctx, names, version: event_type(ctx, ".".join(names), version),
    segments,
    st.lists(segments, min_size=1, max_size=3),
    st.integers(min_value=0, max_value=999),
)
traceparents = st.from_regex(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]", fullmatch=True)
aware_times = st.builds(
    lambda micros, minutes: (
        datetime(1971, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
    ).astimezone(timezone(timedelta(minutes=minutes))),
    st.integers(min_value=0, max_value=229 * 365 * 86_400 * 10**6),
    st.integers(min_value=-14 * 60, max_value=14 * 60),
)


def envelope(**overrides: Any) -> Envelope:
    fields: dict[str, Any] = {
        "type": SALE_COMPLETED,
        "source": "/forecourt/sales",
        "subject": "S001",
        "time": AT,
        "data": {"sale_id": "x", "amount_minor": 30200},
        "traceparent": TRACEPARENT,
    }
    fields.update(overrides)
    return Envelope(**fields)


@given(
    data=json_objects,
    type_=event_types,
    source=st.text(min_size=1),
    subject=st.none() | st.text(),
    traceparent=st.none() | traceparents,
    time=aware_times,
)
def test_an_envelope_read_back_from_its_headers_and_body_is_the_same_envelope(
    data: dict[str, Any],
    type_: str,
    source: str,
    subject: str | None,
    traceparent: str | None,
    time: datetime,
) -> None:
    # Given an envelope
    sent = Envelope(
        type=type_, source=source, subject=subject, time=time, data=data, traceparent=traceparent
    )
    # When it travels as CloudEvents binary mode: ce-* headers and a JSON body
    received = Envelope.from_wire(sent.headers(), sent.body())
    # Then every attribute arrives unchanged, the instant and its offset included
    assert received == sent
    assert received.time.utcoffset() == sent.time.utcoffset()
    assert received.data == data


def test_the_wire_form_uses_cloudevents_binary_mode_headers() -> None:
    sent = envelope()
    assert sent.headers() == {
        "ce-specversion": "1.0",
        "ce-id": sent.id,
        "ce-source": "/forecourt/sales",
        "ce-type": SALE_COMPLETED,
        "ce-time": "2026-11-25T08:30:00+00:00",
        "ce-subject": "S001",
        "traceparent": TRACEPARENT,
        "content-type": "application/json",
    }
    assert json.loads(sent.body()) == {"sale_id": "x", "amount_minor": 30200}


def test_optional_attributes_left_out_are_absent_from_the_headers_and_stay_absent() -> None:
    sent = envelope(subject=None, traceparent=None)
    assert "ce-subject" not in sent.headers()
    assert "traceparent" not in sent.headers()
    received = Envelope.from_wire(sent.headers(), sent.body())
    assert received.subject is None
    assert received.traceparent is None


def test_each_new_envelope_gets_its_own_uuid7_id() -> None:
    first, second = envelope(), envelope()
    assert first.id != second.id
    assert uuid.UUID(first.id).version == 7


def test_event_type_names_context_event_and_version() -> None:
    assert event_type("sales", "sale.completed") == SALE_COMPLETED
    assert event_type("network", "revision.published", 3) == (
        "com.forecourt.network.revision.published.v3"
    )


def test_the_bus_subject_is_the_type_without_the_com_prefix() -> None:
    assert envelope().bus_subject == "forecourt.sales.sale.completed.v1"


@given(type_=event_types)
def test_every_type_built_by_event_type_is_accepted_and_maps_to_its_subject(type_: str) -> None:
    sent = envelope(type=type_)
    assert sent.bus_subject == type_.removeprefix("com.")
    assert not sent.bus_subject.startswith("com.")


@pytest.mark.parametrize(
    "bad_type",
    [
        "sales.sale.completed.v1",  # no com.forecourt prefix
        "com.example.sales.sale.completed.v1",  # someone else's namespace
        "com.forecourt.sales.v1",  # a context but no event name
        "com.forecourt.sales.sale.completed",  # no version
        "com.forecourt.sales.sale.completed.1",  # version without v
        "com.forecourt.sales.sale.completed.vx",  # version not a number
        "com.forecourt.Sales.sale.completed.v1",  # upper case
        "com.forecourt.sales.sale-completed.v1",  # hyphen
        "com.forecourt.sales.sale completed.v1",  # space
        "com.forecourt.sales..completed.v1",  # empty segment
        "com.forecourt.sales.sale.completed.v1\n",  # trailing newline
        "com.forecourt.sales.sale.completed.v1.",  # trailing dot
        "",
    ],
)
def test_an_event_type_that_breaks_the_naming_rule_is_refused(bad_type: str) -> None:
    with pytest.raises(InvalidValue):
        envelope(type=bad_type)


def test_a_naive_event_time_is_refused() -> None:
    with pytest.raises(InvalidValue):
        envelope(time=datetime(2026, 11, 25, 8, 30))  # noqa: DTZ001 - the point of the test


@pytest.mark.parametrize(
    "bad",
    [
        "not-a-traceparent",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case hex
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # trace id one digit short
        TRACEPARENT + "\n",
    ],
)
def test_a_malformed_traceparent_is_refused(bad: str) -> None:
    with pytest.raises(InvalidValue):
        envelope(traceparent=bad)


def test_a_fresh_traceparent_is_well_formed_and_carries_its_trace_id() -> None:
    traceparent = new_traceparent()
    assert envelope(traceparent=traceparent).traceparent == traceparent
    assert trace_id_of(traceparent) == traceparent.split("-")[1]
    assert trace_id_of("garbage") is None
    assert trace_id_of(None) is None


def _without(headers: dict[str, str], name: str) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k != name}


GOOD = envelope()


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        pytest.param(_without(GOOD.headers(), "ce-id"), GOOD.body(), id="missing ce-id"),
        pytest.param(_without(GOOD.headers(), "ce-type"), GOOD.body(), id="missing ce-type"),
        pytest.param(_without(GOOD.headers(), "ce-source"), GOOD.body(), id="missing ce-source"),
        pytest.param(_without(GOOD.headers(), "ce-time"), GOOD.body(), id="missing ce-time"),
        pytest.param(
            _without(GOOD.headers(), "ce-specversion"), GOOD.body(), id="missing specversion"
        ),
        pytest.param(
            {**GOOD.headers(), "ce-specversion": "0.3"}, GOOD.body(), id="wrong specversion"
        ),
        pytest.param(
            {**GOOD.headers(), "ce-time": "yesterday"}, GOOD.body(), id="unparseable ce-time"
        ),
        pytest.param(
            {**GOOD.headers(), "ce-time": "2026-11-25T08:30:00"}, GOOD.body(), id="naive ce-time"
        ),
        pytest.param(
            {**GOOD.headers(), "ce-type": "sale.completed"}, GOOD.body(), id="badly named type"
        ),
        pytest.param(
            {**GOOD.headers(), "traceparent": "zz"}, GOOD.body(), id="malformed traceparent"
        ),
        pytest.param(GOOD.headers(), b'{"sale_id": ', id="truncated JSON body"),
        pytest.param(GOOD.headers(), b"\xff\xfe\x00garbage", id="body not text"),
        pytest.param(GOOD.headers(), b"[1, 2, 3]", id="JSON body not an object"),
    ],
)
def test_a_malformed_event_on_the_wire_is_refused_as_malformed(
    headers: dict[str, str], body: bytes
) -> None:
    with pytest.raises(InvalidValue) as caught:
        Envelope.from_wire(headers, body)
    assert caught.value.code == "kernel.malformed_event"


def test_an_empty_body_reads_as_empty_data() -> None:
    assert Envelope.from_wire(GOOD.headers(), b"").data == {}
