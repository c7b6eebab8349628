"""DART line level: captured frames, the CRC proven on them, escaping, and the deframer.

Vectors are real frames. Unless named otherwise they are from
``moduslightstech-lgtm/intelipump:tests/fixtures/dart/data_frames.json`` and
``control_frames.json`` (frames assembled from ``capture_2026-07-19_merged_a.jsonl``, a
one-port capture of a Wayne line, 9600 8O1); each carries its fixture ``name``.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forecourt.protocols.dart.line import (
    ADDRESS_MAX,
    ADDRESS_MIN,
    DLE,
    MAX_DATA_BYTES,
    SF,
    DartMalformed,
    Deframer,
    Frame,
    FrameKind,
    crc16_arc,
    data_frame,
    decode_frame,
    escape,
    next_tx,
    unescape,
)

# (fixture name, wire hex) of captured data frames.
CAPTURED_DATA_FRAMES = [
    (
        "data-capture_2026-07-19_merged_a-addr50-seqE-13",
        "50 3E 02 08 00 00 00 00 00 00 00 00 03 04 00 99 07 07 01 01 05 65 10 01 13 36 38 49"
        " 66 13 36 38 49 66 00 00 00 00 00 39 10 FA 03 FA",
    ),
    ("data-capture_2026-07-19_merged_a-addr51-seq0-0", "51 30 65 01 01 22 83 03 FA"),
    (
        "data-capture_2026-07-19_merged_a-addr51-seqA-1",
        "51 3A 02 08 00 00 00 00 00 00 00 00 03 04 00 11 75 01 01 01 05 60 27 03 FA",
    ),
    (
        "data-capture_2026-07-19_merged_a-addr51-seqB-2",
        "51 3B 02 08 00 00 00 00 00 00 00 00 21 2D 03 FA",
    ),
    ("data-capture_2026-07-19_merged_a-addr51-seq0-3", "51 30 01 01 00 A2 9C 03 FA"),
    (
        "data-capture_2026-07-19_merged_a-addr51-seqC-4",
        "51 3C 01 01 05 03 04 00 11 75 01 1A C7 03 FA",
    ),
    ("data-capture_2026-07-19_merged_a-addr51-seq1-5", "51 31 65 01 01 23 7F 03 FA"),
    (
        "data-capture_2026-07-19_merged_a-addr51-seqD-6",
        "51 3D 65 10 01 00 00 00 00 02 00 00 00 00 02 00 00 00 00 00 58 F8 03 FA",
    ),
    ("data-capture_2026-07-19_merged_a-addr51-seq2-7", "51 32 65 01 01 23 3B 03 FA"),
    (
        "data-capture_2026-07-19_merged_a-addr51-seqE-8",
        "51 3E 65 10 01 00 00 00 00 02 00 00 00 00 02 00 00 00 00 00 1C BC 03 FA",
    ),
    ("data-capture_2026-07-19_merged_a-addr51-seq3-9", "51 33 65 01 01 22 C7 03 FA"),
    (
        "data-capture_2026-07-19_merged_a-addr51-seqF-10",
        "51 3F 65 10 01 00 00 00 00 02 00 00 00 00 02 00 00 00 00 00 21 40 03 FA",
    ),
    ("data-capture_2026-07-19_merged_a-addr51-seq4-11", "51 34 05 03 00 11 75 45 42 03 FA"),
    ("data-capture_2026-07-19_merged_a-addr50-seq0-12", "50 30 65 01 01 1F 43 03 FA"),
    (
        "data-capture_2026-07-19_merged_a-addr50-seq0-14",
        "50 30 02 08 00 00 00 00 00 00 00 00 03 04 00 99 07 07 01 01 05 65 10 01 13 36 38 49"
        " 66 13 36 38 49 66 00 00 00 00 00 D8 43 03 FA",
    ),
    ("data-capture_2026-07-19_merged_a-addr50-seq1-15", "50 31 01 01 00 9E A0 03 FA"),
    (
        "data-capture_2026-07-19_merged_a-addr50-seq1-16",
        "50 31 01 01 05 03 04 00 99 07 07 AB 49 03 FA",
    ),
    (
        "data-capture_2026-07-19_merged_a-addr50-seq2-18",
        "50 32 65 10 01 13 36 38 49 66 13 36 38 49 66 00 00 00 00 00 A3 C4 03 FA",
    ),
    ("data-capture_2026-07-19_merged_a-addr50-seq3-19", "50 33 65 01 01 1F 07 03 FA"),
]

# (fixture name, wire hex, kind, tx#) of captured short frames (control_frames.json).
CAPTURED_SHORT_FRAMES = [
    ("ctrl-POLL-addr50-ctrl20", "50 20 FA", FrameKind.POLL, 0),
    ("ctrl-POLL-addr51-ctrl20", "51 20 FA", FrameKind.POLL, 0),
    ("ctrl-EOT-addr50-ctrl70", "50 70 FA", FrameKind.EOT, 0),
    ("ctrl-EOT-addr51-ctrl70", "51 70 FA", FrameKind.EOT, 0),
    ("ctrl-ACK-addr51-ctrlCA", "51 CA FA", FrameKind.ACK, 10),
    ("ctrl-ACK-addr50-ctrlCF", "50 CF FA", FrameKind.ACK, 15),
    ("ctrl-NAK-addr50-ctrl50", "50 50 FA", FrameKind.NAK, 0),
    ("ctrl-NAK-addr50-ctrl5C", "50 5C FA", FrameKind.NAK, 12),
    ("ctrl-NAK-addr51-ctrl5D", "51 5D FA", FrameKind.NAK, 13),
]


def wire(text: str) -> bytes:
    return bytes.fromhex(text)


def crc_input(frame_hex: str) -> tuple[bytes, int]:
    """ADR..last data byte (unescaped) and the CRC the frame carries (low byte first)."""
    body = unescape(wire(frame_hex)[:-1])  # without the final SF
    return body[:-3], body[-3] | body[-2] << 8


def crc16_ccitt(data: bytes, *, init: int, reflected: bool, xor_out: int = 0) -> int:
    """The CCITT family (poly 0x1021) that the vendor text names, for the counter-proof."""
    crc = init
    if reflected:
        for byte in data:
            crc ^= byte
            for _ in range(8):
                crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
    else:
        for byte in data:
            crc ^= byte << 8
            for _ in range(8):
                crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc ^ xor_out


@pytest.mark.parametrize(("name", "frame_hex"), CAPTURED_DATA_FRAMES)
def test_every_captured_data_frame_carries_a_crc16_arc(name: str, frame_hex: str) -> None:
    # Given a data frame captured on a real Wayne line
    covered, received = crc_input(frame_hex)
    # Then CRC-16/ARC over ADR..last data byte is exactly the CRC it carries
    assert crc16_arc(covered) == received, name


@pytest.mark.parametrize(("name", "frame_hex"), CAPTURED_DATA_FRAMES)
def test_no_ccitt_variant_matches_the_captured_crcs(name: str, frame_hex: str) -> None:
    # Given the same captured frame
    covered, received = crc_input(frame_hex)
    # Then none of the CCITT variants the vendor's wording suggests produces its CRC
    for init in (0x0000, 0xFFFF, 0x1D0F):
        for reflected in (False, True):
            for xor_out in (0x0000, 0xFFFF):
                got = crc16_ccitt(covered, init=init, reflected=reflected, xor_out=xor_out)
                assert got != received, (name, init, reflected, xor_out)
                assert ((got & 0xFF) << 8 | got >> 8) != received, (name, "byte-swapped")


def test_crc16_arc_is_the_catalogue_algorithm() -> None:
    # Given the CRC catalogue's check input "123456789"
    # Then CRC-16/ARC gives its check value 0xBB3D
    assert crc16_arc(b"123456789") == 0xBB3D


@pytest.mark.parametrize(("name", "frame_hex"), CAPTURED_DATA_FRAMES)
def test_captured_data_frames_decode_and_encode_back_to_the_same_bytes(
    name: str, frame_hex: str
) -> None:
    # Given a captured data frame
    raw = wire(frame_hex)
    # When it is decoded
    frame = decode_frame(raw)
    # Then it is a data frame of its address and tx#, and it encodes back byte for byte
    assert frame.kind is FrameKind.DATA, name
    assert frame.address == raw[0]
    assert frame.tx == raw[1] & 0x0F
    assert frame.encode() == raw


def test_a_crc_low_byte_of_fa_is_escaped_with_dle_as_captured() -> None:
    # Given the captured frame data-capture_2026-07-19_merged_a-addr50-seqE-13, whose CRC is
    # 0xFA39: its low byte 0x39, then the high byte 0xFA sent as DLE FA
    raw = wire(CAPTURED_DATA_FRAMES[0][1])
    assert raw[-4:] == bytes((DLE, SF, 0x03, SF))
    # When decoded
    frame = decode_frame(raw)
    # Then the CRC is 0xFA39 and the data holds its four transactions, unescaped
    assert frame.crc() == 0xFA39
    assert frame.data[:2] == bytes((0x02, 0x08))
    assert len(frame.data) == 37


@pytest.mark.parametrize(("name", "frame_hex", "kind", "tx"), CAPTURED_SHORT_FRAMES)
def test_captured_short_frames_decode_to_their_kind_and_tx(
    name: str, frame_hex: str, kind: FrameKind, tx: int
) -> None:
    # Given a captured short frame
    raw = wire(frame_hex)
    # When decoded
    frame = decode_frame(raw)
    # Then its kind and tx# are the fixture's, and it encodes back to the same three bytes
    assert (frame.kind, frame.tx) == (kind, tx), name
    assert frame.encode() == raw


def test_control_bytes_are_the_documented_values() -> None:
    # Given a frame of each kind with tx# 5
    made = {
        kind: Frame(0x50, kind, 0 if kind is FrameKind.POLL else 5, b"\x01\x01\x00")
        if kind is FrameKind.DATA
        else Frame(0x50, kind, 0 if kind is FrameKind.POLL else 5)
        for kind in FrameKind
    }
    # Then the CTRL bytes are POLL 0x20, DATA 0x30|tx, ACK 0xC0|tx, NAK 0x50|tx, EOT 0x70|tx,
    # ACKPOLL 0xE0|tx
    assert {kind: frame.control for kind, frame in made.items()} == {
        FrameKind.POLL: 0x20,
        FrameKind.DATA: 0x35,
        FrameKind.ACK: 0xC5,
        FrameKind.NAK: 0x55,
        FrameKind.EOT: 0x75,
        FrameKind.ACKPOLL: 0xE5,
    }


def test_a_frame_with_a_wrong_crc_is_refused_as_bad_crc() -> None:
    # Given an AUTHORIZE frame from a field log quoted in stored file 22760329427 (a pump
    # ignored it): 50 37 01 01 06 with CRC bytes 1D 3D; ARC over the same bytes is 0x2A1E,
    # which is what the accepted copy of the frame in the same log carries (1E 2A)
    good = wire("50 37 01 01 06 1E 2A 03 FA")
    bad = wire("50 37 01 01 06 1D 3D 03 FA")
    assert decode_frame(good).data == bytes((0x01, 0x01, 0x06))
    # When the damaged one is decoded
    with pytest.raises(DartMalformed) as caught:
        decode_frame(bad)
    # Then it is refused with the stable reason and a one-line message
    assert caught.value.reason == "bad_crc"
    assert caught.value.code == "dart.malformed"
    assert "\n" not in caught.value.message


@pytest.mark.parametrize(
    ("frame_hex", "reason"),
    [
        ("50 20", "truncated"),
        ("4F 20 FA", "bad_address"),
        ("70 20 FA", "bad_address"),
        ("50 21 FA", "bad_control"),
        ("50 40 FA", "bad_control"),
        ("50 C1 00 FA", "bad_length"),
        ("50 30 01 01 00 9E A0 04 FA", "bad_etx"),
        ("50 30 A0 03 FA", "truncated"),
        ("50 30 01 FA 01 00 9E A0 03 FA", "bad_escape"),
    ],
)
def test_broken_frames_are_refused_with_a_stable_reason(frame_hex: str, reason: str) -> None:
    # Given a frame broken in one way
    # When decoded
    with pytest.raises(DartMalformed) as caught:
        decode_frame(wire(frame_hex))
    # Then the reason names the way
    assert caught.value.reason == reason


def test_a_literal_dle_is_not_escaped_and_dle_then_fa_is_unambiguous() -> None:
    # Given data holding a lone DLE, an FA, and a DLE followed by an FA
    data = bytes((0x10, 0x20, 0xFA, 0x10, 0xFA))
    # When escaped and unescaped
    escaped = escape(data)
    # Then only the FAs got a DLE, and the round trip is exact
    assert escaped == bytes((0x10, 0x20, 0x10, 0xFA, 0x10, 0x10, 0xFA))
    assert unescape(escaped) == data


def test_the_transaction_number_wraps_to_zero_or_to_one() -> None:
    # Given the last transaction number 0xF
    # Then it wraps to 0 by default, or to 1 (both seen in the captures' sequence report)
    assert next_tx(0x0E) == 0x0F
    assert next_tx(0x0F) == 0
    assert next_tx(0x0F, wrap_to=1) == 1


# --------------------------------------------------------------------------- deframer


def test_the_deframer_reassembles_captured_frames_fed_a_byte_at_a_time() -> None:
    # Given a captured exchange: POLL, the pump's data, our ACK, then POLL and EOT
    stream = b"".join(
        wire(h)
        for h in ("50 20 FA", CAPTURED_DATA_FRAMES[0][1], "50 CE FA", "50 20 FA", "50 70 FA")
    )
    deframer = Deframer()
    # When it is fed one byte at a time
    items = [item for byte in stream for item in deframer.feed(bytes((byte,)))]
    # Then the five frames come out in order, nothing refused
    assert [i.kind for i in items if isinstance(i, Frame)] == [
        FrameKind.POLL,
        FrameKind.DATA,
        FrameKind.ACK,
        FrameKind.POLL,
        FrameKind.EOT,
    ]
    assert not deframer.refused


def test_the_deframer_skips_garbage_before_a_frame_and_counts_it() -> None:
    # Given line noise, then a captured frame, merged in one chunk
    deframer = Deframer()
    items = deframer.feed(b"\x00\x13\x99" + wire(CAPTURED_DATA_FRAMES[4][1]))
    # Then the garbage is refused and the frame still comes out
    assert [type(i).__name__ for i in items] == ["DartMalformed", "Frame"]
    assert deframer.refused == {"garbage": 1}


def test_the_deframer_refuses_an_oversized_run_and_recovers_at_the_next_frame() -> None:
    # Given more bytes than a frame may have, with no stop flag, then a POLL
    deframer = Deframer(max_frame=64)
    items = deframer.feed(bytes(range(0x50, 0x50 + 16)) * 8 + b"\x03\xfa" + wire("50 20 FA"))
    # Then the run is refused as oversized (once) and the POLL after it is read
    assert deframer.refused["oversized"] == 1
    assert isinstance(items[-1], Frame)
    assert items[-1].kind is FrameKind.POLL


def test_the_deframer_reports_a_corrupt_crc_and_goes_on() -> None:
    # Given a corrupted copy of a captured frame, then the good one
    deframer = Deframer()
    items = deframer.feed(wire("50 37 01 01 06 1D 3D 03 FA") + wire("50 37 01 01 06 1E 2A 03 FA"))
    # Then the first is refused as bad_crc and the second decodes
    assert isinstance(items[0], DartMalformed)
    assert items[0].reason == "bad_crc"
    assert isinstance(items[1], Frame)
    assert deframer.refused == {"bad_crc": 1}


# --------------------------------------------------------------------------- properties

addresses = st.integers(ADDRESS_MIN, ADDRESS_MAX)
tx_numbers = st.integers(0, 15)
short_frames = st.builds(
    Frame,
    addresses,
    st.sampled_from([FrameKind.ACK, FrameKind.NAK, FrameKind.EOT, FrameKind.ACKPOLL]),
    tx_numbers,
) | st.builds(Frame, addresses, st.just(FrameKind.POLL))
data_frames = st.builds(
    data_frame, addresses, tx_numbers, st.binary(min_size=1, max_size=MAX_DATA_BYTES)
)
frames = short_frames | data_frames


@given(frames)
def test_every_frame_round_trips_through_the_wire(frame: Frame) -> None:
    # Given any frame
    # When encoded then decoded
    # Then it is the same frame
    assert decode_frame(frame.encode()) == frame


@given(st.binary(max_size=600))
def test_random_bytes_never_raise_anything_but_the_codec_error(data: bytes) -> None:
    # Given any bytes at all
    # When decoded as a frame, it is a frame or a DartMalformed, nothing else
    reasons = []
    try:
        decode_frame(data)
    except DartMalformed as exc:
        reasons.append(exc.reason)
    assert all(reasons)
    # And when fed to a deframer in any chunks, it never raises
    deframer = Deframer()
    for start in range(0, len(data), 7):
        for item in deframer.feed(data[start : start + 7]):
            assert isinstance(item, Frame | DartMalformed)


@given(st.lists(frames, min_size=1, max_size=8), st.data())
def test_the_deframer_reassembles_any_split_of_a_stream(
    frame_list: list[Frame], data: st.DataObject
) -> None:
    # Given several frames on the wire, cut at arbitrary points
    stream = b"".join(frame.encode() for frame in frame_list)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(len(stream) - 1, 1)), max_size=20)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    deframer = Deframer()
    # When fed piece by piece
    out = [item for piece in pieces for item in deframer.feed(piece)]
    # Then exactly the frames come out, in order, nothing refused, nothing left over
    assert out == frame_list
    assert deframer.pending == 0
