"""Properties of the TLS codec: round trips, hostile bytes, and reassembly of any split."""

from __future__ import annotations

import json
import struct
from datetime import datetime

from hypothesis import given
from hypothesis import strategies as st

from forecourt.protocols.tls.codec import (
    METRIC,
    REASONS,
    DeliveryRecord,
    DeliveryReply,
    FrameReader,
    GaugeFloat,
    InventoryReply,
    RawReply,
    Reply,
    Request,
    RequestReader,
    SystemAlarm,
    SystemStatusReply,
    TankAlarms,
    TankDeliveries,
    TankInventory,
    TankStatusReply,
    TlsMalformed,
    UnknownCommandReply,
    WallClock,
    decode_reply,
    decode_request,
    describe,
    encode_reply,
    encode_request,
    parse_text,
)

wall_clocks = st.datetimes(
    min_value=datetime(2000, 1, 1),  # noqa: DTZ001 - a gauge's wall clock has no zone
    max_value=datetime(2099, 12, 31, 23, 59),  # noqa: DTZ001
).map(lambda d: WallClock(d.year, d.month, d.day, d.hour, d.minute))
gauge_floats = st.one_of(
    st.integers(0, 0xFFFFFFFF).map(lambda n: GaugeFloat(f"{n:08X}")),
    st.floats(width=32, allow_nan=False).map(GaugeFloat.of),
    st.just(GaugeFloat.no_data()),
)
products = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
tank_numbers = st.integers(0, 99)
digits2 = st.integers(0, 99).map(lambda n: f"{n:02d}")
function_letters = st.sampled_from(["i201", "i202", "i205", "i20C", "i101"])

inventories = st.builds(
    InventoryReply,
    code=tank_numbers.map(lambda t: f"i201{t:02d}"),
    at=wall_clocks,
    tanks=st.lists(
        st.builds(
            TankInventory,
            tank=tank_numbers,
            product=products,
            status=st.integers(0, 0xFFFF),
            fields=st.lists(gauge_floats, max_size=12).map(tuple),
        ),
        max_size=5,
    ).map(tuple),
)
deliveries = st.builds(
    DeliveryReply,
    code=st.tuples(st.sampled_from(["i202", "i20C"]), tank_numbers).map(
        lambda p: f"{p[0]}{p[1]:02d}"
    ),
    at=wall_clocks,
    tanks=st.lists(
        st.builds(
            TankDeliveries,
            tank=tank_numbers,
            product=products,
            deliveries=st.lists(
                st.builds(
                    DeliveryRecord,
                    started=wall_clocks,
                    ended=wall_clocks,
                    fields=st.lists(gauge_floats, max_size=12).map(tuple),
                ),
                max_size=3,
            ).map(tuple),
        ),
        max_size=3,
    ).map(tuple),
)
statuses = st.builds(
    TankStatusReply,
    code=tank_numbers.map(lambda t: f"i205{t:02d}"),
    at=wall_clocks,
    tanks=st.lists(
        st.builds(TankAlarms, tank=tank_numbers, codes=st.lists(digits2, max_size=6).map(tuple)),
        max_size=5,
    ).map(tuple),
)
system_statuses = st.builds(
    SystemStatusReply,
    code=st.just("i10100"),
    at=wall_clocks,
    alarms=st.lists(
        st.builds(SystemAlarm, category=digits2, type=digits2, device=tank_numbers), max_size=5
    ).map(tuple),
)
raws = st.builds(
    RawReply,
    code=st.sampled_from(["i90200", "i21B00", "i60200", "iA0101"]),
    data=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80),
)
replies: st.SearchStrategy[Reply] = st.one_of(
    inventories, deliveries, statuses, system_statuses, raws, st.just(UnknownCommandReply())
)
requests = st.builds(
    Request,
    function=st.sampled_from(["i201", "i202", "i205", "i20C", "i902", "I201", "s501", "iA01"]),
    tank=tank_numbers,
    security_code=st.none() | st.text(products, min_size=6, max_size=6),
)


@given(replies)
def test_every_reply_round_trips_through_its_frame(reply):
    assert decode_reply(encode_reply(reply)) == reply


@given(replies)
def test_every_reply_written_in_lower_case_hex_reads_the_same(reply):
    assert decode_reply(encode_reply(reply, lowercase=True)) == reply


@given(requests)
def test_every_request_round_trips_through_its_frame(request):
    assert decode_request(encode_request(request)) == request
    assert decode_request(encode_request(request) + b"\r\n") == request


@given(st.floats(width=32))
def test_every_single_precision_float_round_trips_through_its_hex(value):
    decoded = GaugeFloat.of(value).value
    if value != value:
        assert decoded != decoded
    else:
        assert struct.pack(">f", decoded) == struct.pack(">f", value)


@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_the_codecs_error(data):
    for decode in (decode_reply, decode_request):
        reason = "decoded"
        try:
            decode(data)
        except TlsMalformed as exc:
            reason = exc.reason
        assert reason == "decoded" or reason in REASONS
    for direction in (None, "to-device", "from-device"):
        try:
            describe(data, direction)
        except TlsMalformed:
            pass


@given(replies)
def test_every_reply_is_described_as_json_with_and_without_units(reply):
    frame = encode_reply(reply)
    for units in (None, METRIC):
        body = describe(frame, units=units, timezone="Asia/Shanghai")
        json.dumps(body, allow_nan=False)
        assert body["direction"] == "from-device"


@given(replies, st.data())
def test_a_reply_with_one_byte_changed_decodes_or_is_refused_with_the_codecs_error(reply, data):
    frame = bytearray(encode_reply(reply))
    index = data.draw(st.integers(0, len(frame) - 1))
    frame[index] = data.draw(st.integers(0, 255))
    try:
        decode_reply(bytes(frame))
    except TlsMalformed:
        pass


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_random_bytes_never_break_the_frame_reader(first, second):
    reader = FrameReader(max_frame=64)
    for item in reader.feed(first) + reader.feed(second):
        assert isinstance(item, bytes | TlsMalformed)
        if isinstance(item, bytes):
            assert item[:1] == b"\x01"
            assert item[-1:] == b"\x03"
            assert len(item) <= 64


@given(st.lists(replies, min_size=1, max_size=6), st.data())
def test_the_frame_reader_reassembles_any_split_of_a_stream_of_frames(frames, data):
    encoded = [encode_reply(r) for r in frames]
    stream = b"".join(encoded)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    bounds = [0, *cuts, len(stream)]
    reader = FrameReader()
    out: list[object] = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        out += reader.feed(stream[start:end])
    assert out == encoded
    assert reader.garbage_bytes == 0
    assert reader.pending == 0


@given(
    st.lists(
        st.tuples(st.binary(max_size=10).map(lambda b: b.replace(b"\x01", b"")), replies),
        min_size=1,
        max_size=5,
    )
)
def test_the_frame_reader_skips_and_counts_garbage_between_frames(items):
    stream = b"".join(junk + encode_reply(reply) for junk, reply in items)
    reader = FrameReader()
    out = reader.feed(stream)
    assert out == [encode_reply(reply) for _, reply in items]
    assert reader.garbage_bytes == sum(
        sum(1 for b in junk if b not in b"\r\n\x00") for junk, _ in items
    )


@given(st.lists(requests, min_size=1, max_size=6), st.data())
def test_the_request_reader_reassembles_any_split_of_a_stream_of_requests(items, data):
    plain = [Request(r.function, r.tank) for r in items]
    stream = b"".join(encode_request(r) for r in plain)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    bounds = [0, *cuts, len(stream)]
    reader = RequestReader()
    out: list[bytes] = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        out += reader.feed(stream[start:end])
    assert [decode_request(frame) for frame in out] == plain


@given(st.text(max_size=80))
def test_parse_text_never_raises_anything_but_the_codecs_error(text):
    try:
        assert isinstance(parse_text(text), bytes)
    except TlsMalformed:
        pass


@given(st.binary(max_size=60).filter(lambda b: all(0x20 <= c <= 0x7E for c in b)))
def test_parse_text_keeps_plain_text_without_markers_as_it_is(data):
    text = data.decode("ascii")
    if "\\" not in text and "<" not in text and "^" not in text:
        assert parse_text(text) == data
