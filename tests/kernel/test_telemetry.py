"""The telemetry wire format: every topic the edge builds parses back to what it named, every
payload decodes to what was encoded, and anything else is refused with the field it broke."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forecourt.kernel.errors import InvalidValue
from forecourt.kernel.telemetry import (
    DEFAULT_PREFIX,
    MAX_PAYLOAD_BYTES,
    Topic,
    decode,
    encode,
    parse_topic,
    subscription,
    topic,
)

AT = datetime(2026, 12, 1, 8, 30, tzinfo=timezone(timedelta(hours=8)))
SEGMENT = st.text(
    st.sampled_from("abcXYZ0189_.-:"),
    min_size=1,
    max_size=64,
)
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)


@given(
    station=SEGMENT,
    kind=st.sampled_from(["pumps", "tanks"]),
    number=st.integers(1, 9999),
)
def test_a_pump_or_tank_topic_parses_back_to_its_station_kind_and_number(
    station: str, kind: str, number: int
) -> None:
    # Given the topic the edge publishes a pump's or tank's state on
    name = topic(DEFAULT_PREFIX, station, kind, number)
    # When HQ parses it
    # Then it names that station, kind and number
    assert parse_topic(DEFAULT_PREFIX, name) == Topic(station, kind, str(number))


@given(station=SEGMENT, device=SEGMENT)
def test_status_alarm_and_device_topics_parse_back(station: str, device: str) -> None:
    assert parse_topic(DEFAULT_PREFIX, topic(DEFAULT_PREFIX, station, "status")) == Topic(
        station, "status"
    )
    assert parse_topic(DEFAULT_PREFIX, topic(DEFAULT_PREFIX, station, "alarms")) == Topic(
        station, "alarms"
    )
    assert parse_topic(DEFAULT_PREFIX, topic(DEFAULT_PREFIX, station, "devices", device)) == (
        Topic(station, "devices", device)
    )


@pytest.mark.parametrize(
    "name",
    [
        "other/v1/stations/S1/status",  # another prefix
        "forecourt/v1/stations/S1",  # no kind
        "forecourt/v1/stations/S1/valves/1",  # an unknown kind
        "forecourt/v1/stations/S1/status/extra",  # parts after a keyless kind
        "forecourt/v1/stations/S1/pumps",  # a pump topic without its number
        "forecourt/v1/stations/S1/pumps/0",  # pump numbers start at 1
        "forecourt/v1/stations/S1/pumps/10000",
        "forecourt/v1/stations/S1/pumps/x1",
        "forecourt/v1/stations/S1/pumps/1/2",
        "forecourt/v1/stations/S 1/status",  # not a segment
        "forecourt/v1/stations//status",
        "forecourt/v1/stations/+/status",  # a wildcard is never a station
    ],
)
def test_a_topic_outside_the_format_is_refused(name: str) -> None:
    with pytest.raises(InvalidValue):
        parse_topic(DEFAULT_PREFIX, name)


@pytest.mark.parametrize("station", ["", "a/b", "+", "#", "x" * 65, "s\x00"])
def test_a_station_that_cannot_be_a_topic_segment_is_refused_when_building(station: str) -> None:
    with pytest.raises(InvalidValue):
        topic(DEFAULT_PREFIX, station, "status")


def test_keys_are_given_exactly_where_the_kind_has_one() -> None:
    with pytest.raises(InvalidValue):
        topic(DEFAULT_PREFIX, "S1", "pumps")
    with pytest.raises(InvalidValue):
        topic(DEFAULT_PREFIX, "S1", "status", 1)
    with pytest.raises(InvalidValue):
        topic(DEFAULT_PREFIX, "S1", "valves", 1)


def test_hq_subscribes_to_every_station_or_to_one() -> None:
    assert subscription(DEFAULT_PREFIX) == "forecourt/v1/stations/+/#"
    assert subscription("p", "S1") == "p/stations/S1/#"


@given(
    body=st.dictionaries(st.text(max_size=12), JSON_VALUE, max_size=6),
    seq=st.integers(0, 2**63 - 1),
    boot=st.text(min_size=1, max_size=64),
)
def test_a_payload_decodes_to_what_was_encoded(body: dict, seq: int, boot: str) -> None:
    # Given any body the edge sends, under its envelope
    payload = encode("S1", AT, boot, seq, body)
    # When HQ decodes it for the station of its topic
    message = decode(payload, "S1")
    # Then the envelope and the body come back (the envelope's names are the envelope's)
    assert (message.station, message.at, message.boot, message.seq) == ("S1", AT, boot, seq)
    envelope = {"v", "station", "at", "boot", "seq"}
    assert message.body == {k: v for k, v in body.items() if k not in envelope}


def test_a_naive_time_is_refused_when_encoding() -> None:
    with pytest.raises(InvalidValue):
        encode("S1", datetime(2026, 12, 1, 8, 30), "b", 1, {})  # noqa: DTZ001 - the point


def good() -> dict:
    return {"v": 1, "station": "S1", "at": AT.isoformat(), "boot": "b1", "seq": 3, "state": "idle"}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"station": "S2"}, "station"),  # spoofed: about another station than its topic
        ({"v": 2}, "v"),
        ({"v": None}, "v"),
        ({"boot": ""}, "boot"),
        ({"boot": 7}, "boot"),
        ({"boot": "b" * 65}, "boot"),
        ({"seq": -1}, "seq"),
        ({"seq": True}, "seq"),
        ({"seq": 2**63}, "seq"),
        ({"seq": "3"}, "seq"),
        ({"at": "2026-12-01T08:30:00"}, "at"),  # no offset
        ({"at": "yesterday"}, "at"),
        ({"at": 1700000000}, "at"),
    ],
)
def test_a_payload_missing_or_breaking_an_envelope_field_is_refused_naming_it(
    change: dict, field: str
) -> None:
    payload = json.dumps({**good(), **change}).encode()
    with pytest.raises(InvalidValue) as refused:
        decode(payload, "S1")
    assert refused.value.details["field"] == field


@pytest.mark.parametrize(
    "payload",
    [b"", b"not json", b"\xff\xfe", b"[1, 2]", b'"idle"', b"null", b"{"],
)
def test_a_payload_that_is_not_a_json_object_is_refused(payload: bytes) -> None:
    with pytest.raises(InvalidValue) as refused:
        decode(payload, "S1")
    assert refused.value.details["field"] == "payload"


def test_a_payload_over_the_limit_is_refused_before_it_is_parsed() -> None:
    big = json.dumps({**good(), "pad": "x" * MAX_PAYLOAD_BYTES}).encode()
    with pytest.raises(InvalidValue, match="too big"):
        decode(big, "S1")
    # And one just under it is read
    fitting = {**good(), "pad": ""}
    fitting["pad"] = "x" * (MAX_PAYLOAD_BYTES - len(json.dumps(fitting).encode()))
    assert len(json.dumps(fitting).encode()) == MAX_PAYLOAD_BYTES
    assert decode(json.dumps(fitting).encode(), "S1").body["pad"] == fitting["pad"]


def test_a_time_in_another_zone_keeps_its_instant() -> None:
    message = decode(encode("S1", AT, "b", 0, {}), "S1")
    assert message.at == AT.astimezone(UTC)
