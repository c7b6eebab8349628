"""DART edges: frame and transaction boundaries, resynchronisation, refusals, and what the
driver promises about numbers, epochs and the line when pumps misbehave.

Frame vectors are either captured ones (named by their fixture in
``moduslightstech-lgtm/intelipump:tests/fixtures/dart/data_frames.json``, as in
``test_line.py``) or built with the codec's own encoder, whose CRC-16/ARC and escaping are
proven on captured frames in ``test_line.py``. A scripted pump (a TCP server speaking the
line codec) plays the pump where a test needs a behaviour the simulator does not offer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from forecourt.kernel.errors import InvalidValue
from forecourt.protocols.dart import driver as dart_driver
from forecourt.protocols.dart.application import (
    Alarm,
    AlarmCode,
    Command,
    Decimals,
    Direction,
    FilledValues,
    NozzleStatus,
    PresetVolume,
    PumpCommand,
    PumpIdentity,
    PumpParameters,
    PumpStatusCode,
    PumpStatusReply,
    RequestTotals,
    TotalCounters,
    decode_transactions,
    encode_transaction,
    encode_transactions,
    raw_to_units,
)
from forecourt.protocols.dart.driver import DartDriver
from forecourt.protocols.dart.line import (
    DLE,
    ETX,
    MAX_DATA_BYTES,
    SF,
    DartMalformed,
    Deframer,
    Frame,
    FrameKind,
    ack,
    crc16_arc,
    data_frame,
    decode_frame,
    eot,
    escape,
    nak,
    poll,
)
from forecourt.protocols.dart.sim_pump import NozzleTotals
from forecourt.protocols.dart.simulator import DartSimulator
from forecourt.protocols.model import (
    AlarmReported,
    DeviceEvent,
    DeviceRejected,
    DeviceTransaction,
    FrameRefused,
    IdentityChanged,
    Preset,
    PresetType,
    PumpState,
    TransactionFinished,
)
from forecourt.protocols.store import MemoryDriverStore
from tests.protocols.dart.test_driver import PRICE, Rig, driver_for, reach, rig, sell, status
from tests.support import eventually

# data-capture_2026-07-19_merged_a-addr51-seq0-3: DC1 status 0 (data_frames.json)
CAPTURED_STATUS = bytes.fromhex("51 30 01 01 00 A2 9C 03 FA")


def wire_of(address: int, control: int, data: bytes, *, crc: int | None = None) -> bytes:
    """A data frame on the wire as DART writes it, whatever its length (``crc`` to spoil)."""
    head = bytes((address, control))
    value = crc16_arc(head + data) if crc is None else crc
    return head + escape(data + bytes((value & 0xFF, value >> 8))) + bytes((ETX, SF))


# --------------------------------------------------------------------------- frames


def test_a_data_frame_with_a_good_crc_but_no_data_is_refused_as_truncated() -> None:
    # Given a frame 50 30 with only its CRC, ETX and SF: a data frame carrying nothing
    empty = wire_of(0x50, 0x30, b"")
    # When decoded
    with pytest.raises(DartMalformed) as caught:
        decode_frame(empty)
    # Then it is refused as truncated, like any data frame too short for its parts
    assert caught.value.reason == "truncated"


def test_a_data_frame_of_the_longest_data_reads_and_one_byte_more_is_oversized() -> None:
    # Given a frame carrying exactly the longest data a frame may carry, stop flags included
    longest = bytes(range(256))[:MAX_DATA_BYTES].replace(b"\x00", b"\xfa")
    frame = data_frame(0x50, 3, longest)
    # Then it round-trips through the wire
    assert decode_frame(frame.encode()) == frame
    # And the same frame with one more data byte is refused as oversized
    with pytest.raises(DartMalformed) as caught:
        decode_frame(wire_of(0x50, 0x33, longest + b"\x01"))
    assert caught.value.reason == "oversized"


@pytest.mark.parametrize(
    "frame_hex",
    [
        "50 20 00",  # a POLL whose stop flag became 00
        "51 30 01 01 00 A2 9C 03",  # data-capture_2026-07-19_merged_a-addr51-seq0-3 cut
        "51 30 01 01 00 A2 9C 03 00",
    ],
)
def test_a_frame_that_does_not_end_with_its_stop_flag_is_refused_as_truncated(
    frame_hex: str,
) -> None:
    # Given a frame whose last byte is not the stop flag
    # When decoded
    with pytest.raises(DartMalformed) as caught:
        decode_frame(bytes.fromhex(frame_hex))
    # Then it is refused as truncated
    assert caught.value.reason == "truncated"


@pytest.mark.parametrize(
    "frame",
    [poll(0x50), ack(0x51, 10), nak(0x50, 12), eot(0x6F), Frame(0x50, FrameKind.ACKPOLL, 4)],
)
def test_line_noise_before_a_short_frame_is_refused_and_the_frame_still_read(
    frame: Frame,
) -> None:
    # Given line noise glued to a three-byte frame in one chunk
    deframer = Deframer()
    items = deframer.feed(b"\x00\x13\x99" + frame.encode())
    # Then the noise is refused as garbage and the frame comes out after it
    assert [type(item) for item in items] == [DartMalformed, Frame]
    assert items[1] == frame
    assert deframer.refused == {"garbage": 1}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0x00, 0x10, 0x55, 0xFA]), min_size=90, max_size=240))
@example([0x00] * 62 + [0xFA] + [0x00] * 40)  # the byte where the run turns too long is DLE
def test_an_oversized_frame_full_of_escaped_stop_flags_is_refused_once_and_the_next_read(
    data: list[int],
) -> None:
    # Given a data frame longer than the deframer allows, whose data holds escaped stop
    # flags anywhere (each sent as DLE FA), then a POLL
    oversized = wire_of(0x50, 0x31, bytes(data))
    deframer = Deframer(max_frame=64)
    # When it is fed in one chunk, or a byte at a time
    whole = deframer.feed(oversized + poll(0x50).encode())
    piecewise_deframer = Deframer(max_frame=64)
    stream = oversized + poll(0x50).encode()
    piecewise = [item for b in stream for item in piecewise_deframer.feed(bytes((b,)))]
    # Then the long frame is refused once as oversized, its escaped flags do not end it
    # early, and the POLL after it is read
    for items, used in ((whole, deframer), (piecewise, piecewise_deframer)):
        assert len(items) == 2
        assert isinstance(items[0], DartMalformed)
        assert items[0].reason == "oversized"
        assert items[1] == poll(0x50)
        assert used.refused == {"oversized": 1}
        assert used.pending == 0


def test_a_deframer_reset_inside_an_oversized_run_reads_the_next_frame() -> None:
    # Given a deframer skipping the rest of a run that grew too long
    deframer = Deframer(max_frame=16)
    assert [i.reason for i in deframer.feed(b"\x55" * 40) if isinstance(i, DartMalformed)] == [
        "oversized"
    ]
    # When the line is reconnected (the deframer reset) and a frame arrives
    deframer.reset()
    items = deframer.feed(CAPTURED_STATUS)
    # Then that frame is read
    assert items == [decode_frame(CAPTURED_STATUS)]


def test_a_deframer_reset_drops_a_half_frame_and_reads_the_next_whole() -> None:
    # Given half of a captured frame, then a reconnection
    deframer = Deframer()
    assert deframer.feed(CAPTURED_STATUS[:4]) == []
    deframer.reset()
    # When the whole frame comes
    items = deframer.feed(CAPTURED_STATUS)
    # Then it is read on its own, nothing refused
    assert items == [decode_frame(CAPTURED_STATUS)]
    assert not deframer.refused


def test_a_dle_that_ends_one_chunk_still_escapes_the_stop_flag_starting_the_next() -> None:
    # Given the captured frame data-capture_2026-07-19_merged_a-addr50-seqE-13, whose CRC
    # high byte FA is sent as DLE FA, cut between the DLE and the FA
    raw = bytes.fromhex(
        "50 3E 02 08 00 00 00 00 00 00 00 00 03 04 00 99 07 07 01 01 05 65 10 01 13 36 38 49"
        " 66 13 36 38 49 66 00 00 00 00 00 39 10 FA 03 FA"
    )
    cut = raw.index(bytes((DLE, SF))) + 1
    deframer = Deframer()
    # When fed in those two chunks
    items = deframer.feed(raw[:cut]) + deframer.feed(raw[cut:])
    # Then the frame is read whole
    assert items == [decode_frame(raw)]


# --------------------------------------------------------------------------- transactions


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 99_999_999), st.integers(0, 8), st.integers(0, 8))
@example(5, 4, 3)
@example(5, 2, 2)
def test_the_text_of_a_pump_number_says_exactly_what_the_pump_means(
    raw: int, decimals: int, exponent: int
) -> None:
    # Given any raw number and the pump's decimals
    scaled = raw_to_units(raw, decimals, exponent)
    # Then its text is the same number, with exactly the pump's decimals and a leading digit
    assert Decimal(scaled.text) == Decimal(raw).scaleb(-decimals)
    whole, _, fraction = scaled.text.partition(".")
    assert whole.isdigit()
    assert len(fraction) == decimals


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 255), st.integers(1, 255), st.sampled_from(list(Direction)))
def test_a_transaction_whose_length_runs_past_the_data_is_refused_whatever_its_code(
    code: int, length: int, direction: Direction
) -> None:
    # Given a transaction that says it carries more bytes than follow it
    data = bytes((code, length)) + bytes(length - 1)
    # When decoded, in either direction
    with pytest.raises(DartMalformed) as caught:
        decode_transactions(data, direction)
    # Then it is refused for its length, even for a code we do not know
    assert caught.value.reason == "bad_length"


FIXED_LENGTH = [
    (Direction.FROM_DEVICE, PumpStatusReply(1)),
    (Direction.FROM_DEVICE, FilledValues(3520, 27773)),
    (Direction.FROM_DEVICE, NozzleStatus(789, 1, True)),
    (Direction.FROM_DEVICE, Alarm(AlarmCode.POWER_FAILURE)),
    (Direction.FROM_DEVICE, PumpParameters(2, 2, 3, 999_999, (1, 2, *[0] * 13))),
    (Direction.FROM_DEVICE, PumpIdentity("4000000080")),
    (Direction.FROM_DEVICE, TotalCounters(0x01, 1_336_384_966, 1_336_384_966, 0)),
    (Direction.TO_DEVICE, Command(PumpCommand.AUTHORIZE)),
    (Direction.TO_DEVICE, PresetVolume(2000)),
    (Direction.TO_DEVICE, RequestTotals(0x11)),
]


@pytest.mark.parametrize(("direction", "item"), FIXED_LENGTH, ids=lambda v: type(v).__name__)
def test_a_fixed_length_transaction_with_a_byte_too_many_is_refused_for_its_length(
    direction: Direction, item: Any
) -> None:
    # Given a well-formed transaction of a fixed length, with one byte more (LNG + 1)
    good = encode_transaction(item)
    longer = bytes((good[0], good[1] + 1)) + good[2:] + b"\x00"
    assert decode_transactions(good, direction) == [item]
    # When decoded
    with pytest.raises(DartMalformed) as caught:
        decode_transactions(longer, direction)
    # Then it is refused for its length
    assert caught.value.reason == "bad_length"


@pytest.mark.parametrize(
    ("data_hex", "direction", "reason"),
    [
        ("05 04 00 07 89 00", Direction.TO_DEVICE, "bad_length"),  # CD5: one byte past a price
        ("05 02 07 89", Direction.TO_DEVICE, "bad_length"),  # CD5: less than one price
        ("02 01 00", Direction.TO_DEVICE, "bad_value"),  # CD2: nozzle 0
        ("02 02 01 10", Direction.TO_DEVICE, "bad_value"),  # CD2: nozzle 16
        ("67 04 00 07 89 00", Direction.FROM_DEVICE, "bad_length"),  # DC103: not 3 per price
    ],
)
def test_broken_price_and_nozzle_lists_are_refused_with_a_reason(
    data_hex: str, direction: Direction, reason: str
) -> None:
    with pytest.raises(DartMalformed) as caught:
        decode_transactions(bytes.fromhex(data_hex), direction)
    assert caught.value.reason == reason


@pytest.mark.parametrize("offset", [22, 23, 24])
def test_pump_parameters_with_nine_decimals_are_refused_as_a_bad_value(offset: int) -> None:
    # Given DC7 whose volume, amount or price decimals say 9 (the codec's range is 0-8)
    body = bytearray(encode_transaction(PumpParameters(2, 2, 3, 0, (1,))))
    body[2 + offset] = 9
    # When decoded
    with pytest.raises(DartMalformed) as caught:
        decode_transactions(bytes(body), Direction.FROM_DEVICE)
    # Then it is refused, not turned into decimals nobody can use
    assert caught.value.reason == "bad_value"


@pytest.mark.parametrize("field_name", ["volume", "amount", "price"])
def test_decimals_outside_zero_to_eight_are_refused(field_name: str) -> None:
    with pytest.raises(InvalidValue):
        Decimals(**{field_name: 9})
    with pytest.raises(InvalidValue):
        Decimals(**{field_name: -1})
    assert getattr(Decimals(**{field_name: 8}), field_name) == 8


def test_the_pumps_own_decimals_replace_the_configured_ones_each_in_its_place() -> None:
    # Given decimals configured 2/2/2 with the totals' volume at 2, and a pump whose DC7 says
    # volume 3, amount 1, price 4
    configured = Decimals(2, 2, 2, "CNY", total_volume=2)
    pumps = configured.with_pump(PumpParameters(3, 1, 4))
    # Then 1.234 L is 1234 ml, 1.2 yuan is 120 fen, 1.2345 /L is 123450 milli-fen
    assert pumps.volume_ml(1234).units == 1234
    assert pumps.amount_minor(12).units == 120
    assert pumps.price_mmu(12345).units == 123_450
    # And the totals keep the configured volume decimals, their amount follows the pump's
    assert pumps.total_volume_ml(1234).units == 12_340
    assert pumps.total_amount_minor(12).units == 120
    assert pumps.currency == "CNY"


# --------------------------------------------------------------------------- a scripted pump

Answer = Callable[[Frame], bytes | None]


class ScriptedPump:
    """One pump at ``address`` on a TCP line: answers each frame as ``answer`` says and
    keeps every frame it heard, in order."""

    def __init__(self, answer: Answer, address: int = 0x50) -> None:
        self.answer = answer
        self.address = address
        self.heard: list[Frame] = []
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"tcp://{host}:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        deframer = Deframer()
        self._writers.add(writer)
        try:
            while chunk := await reader.read(4096):
                for item in deframer.feed(chunk):
                    if isinstance(item, Frame) and item.address == self.address:
                        self.heard.append(item)
                        reply = self.answer(item)
                        if reply:
                            writer.write(reply)
                            await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def data_frames(self) -> list[Frame]:
        return [frame for frame in self.heard if frame.kind is FrameKind.DATA]


def polite(frame: Frame) -> bytes | None:
    """A pump with nothing to say: every data frame ACKed with its tx#, every POLL an EOT."""
    if frame.kind is FrameKind.DATA:
        return ack(frame.address, frame.tx).encode()
    if frame.kind is FrameKind.POLL:
        return eot(frame.address).encode()
    return None


@contextlib.asynccontextmanager
async def scripted(
    answer: Answer, events: list[DeviceEvent] | None = None, **options: Any
) -> AsyncIterator[tuple[ScriptedPump, DartDriver]]:
    pump = ScriptedPump(answer)
    transport = await pump.start()
    options.setdefault("command_timeout_s", 2.0)
    driver = DartDriver(
        "line",
        transport,
        {1: 0x50},
        timeout_s=options.pop("timeout_s", 0.2),
        poll_interval_s=0.01,
        offline_after=options.pop("offline_after", 3),
        read_parameters=False,
        **options,
    )
    if events is not None:
        driver.subscribe(events.append)
    try:
        async with driver:
            yield pump, driver
    finally:
        await pump.stop()


async def test_a_data_frame_answered_with_the_ack_of_another_tx_is_sent_again_unchanged() -> None:
    # Given a pump whose first answer to a data frame is an ACK carrying another tx#
    answered: list[Frame] = []

    def stale_first(frame: Frame) -> bytes | None:
        if frame.kind is FrameKind.DATA and not answered:
            answered.append(frame)
            return ack(frame.address, (frame.tx + 5) & 0x0F).encode()
        return polite(frame)

    async with scripted(stale_first) as (pump, _driver):
        # When the driver's first command goes out
        await eventually(lambda: len(pump.data_frames()) >= 2, 10, what="a second data frame")
        # Then that ACK does not count: the same frame is sent again at once, same tx#
        first = pump.heard[0]
        assert first.kind is FrameKind.DATA
        assert pump.heard[1] == first


async def test_a_data_frame_the_pump_repeats_because_our_ack_was_lost_is_acted_on_once() -> None:
    # Given a pump reporting a power-failure alarm that sends its frame twice, as a pump
    # does when it misses the master's ACK, then has nothing more to say
    frame = data_frame(0x50, 2, encode_transactions([Alarm(AlarmCode.POWER_FAILURE)]))
    sent: list[Frame] = []

    def repeats(request: Frame) -> bytes | None:
        if request.kind is FrameKind.POLL and len(sent) < 2:
            sent.append(frame)
            return frame.encode()
        return polite(request)

    events: list[DeviceEvent] = []
    async with scripted(repeats, events) as (pump, _driver):
        # When the driver has polled past both copies
        await eventually(
            lambda: sum(f.kind is FrameKind.POLL for f in pump.heard) >= 3, 10, what="3 polls"
        )
    # Then both copies were ACKed, and the alarm was reported once
    assert [f for f in pump.heard if f.kind is FrameKind.ACK][:2] == [ack(0x50, 2)] * 2
    alarms = [e for e in events if isinstance(e, AlarmReported)]
    assert len(alarms) == 1
    assert alarms[0].alarm.device_code == "0A"


async def test_a_corrupt_answer_to_a_poll_is_naked_with_its_tx_and_the_repeat_is_taken() -> None:
    # Given a pump (reset, nozzle in) whose first status frame arrives with a broken CRC
    data = encode_transactions([PumpStatusReply(1), NozzleStatus(789, 1, False)])
    good = data_frame(0x50, 6, data)
    crc = good.crc()
    broken = wire_of(0x50, good.control, data, crc=crc ^ 0x5A5A)
    state = {"corrupt_sent": False, "acked": False}

    def corrupt_once(frame: Frame) -> bytes | None:
        if frame.kind is FrameKind.POLL and not state["corrupt_sent"]:
            state["corrupt_sent"] = True
            return broken
        if frame.kind is FrameKind.NAK or (frame.kind is FrameKind.POLL and not state["acked"]):
            return good.encode()
        if frame.kind is FrameKind.ACK and frame.tx == good.tx:
            state["acked"] = True
            return None
        return polite(frame)

    events: list[DeviceEvent] = []
    async with scripted(corrupt_once, events) as (pump, driver):
        # When the driver polls it
        await reach(driver, 1, PumpState.IDLE, timeout=10)
    # Then the broken frame was refused and answered with a NAK of its tx#, right away
    refused = [e for e in events if isinstance(e, FrameRefused)]
    assert [e.reason for e in refused] == ["bad_crc"]
    first_poll = next(i for i, f in enumerate(pump.heard) if f.kind is FrameKind.POLL)
    assert pump.heard[first_poll + 1] == nak(0x50, good.tx)
    # And the repeat it asked for was taken and ACKed
    assert ack(0x50, good.tx) in pump.heard


class HoldingPump:
    """A pump that answers commands as the Pump Interface says, showing one finished filling
    (status 5: 2.00 L, 15.78 at 7.89 on nozzle 1, meter 12.00 L). It repeats its data until
    ACKed; ``reset_when_totals_asked`` makes another terminal RESET it the moment its meter is
    read, and ``tells_identity`` is whether it answers RETURN PUMP IDENTITY."""

    def __init__(self, *, reset_when_totals_asked: bool = False, tells_identity: bool = True):
        self.status = PumpStatusCode.FILLING_COMPLETED
        self.reset_when_totals_asked = reset_when_totals_asked
        self.tells_identity = tells_identity
        self.outbox: list[Any] = []
        self.tx = 0
        self.unacked: Frame | None = None

    def _shown(self) -> list[Any]:
        filled = FilledValues(200, 1578) if self.status == 5 else FilledValues(0, 0)
        return [PumpStatusReply(self.status), filled, NozzleStatus(789, 1, False)]

    def _handle(self, item: Any) -> None:
        if isinstance(item, RequestTotals):
            if self.reset_when_totals_asked:
                self.status = PumpStatusCode.RESET
                self.outbox.append(PumpStatusReply(self.status))
            self.outbox.append(TotalCounters(item.counter, 1200, 1200, 0))
        elif isinstance(item, Command) and item.command == PumpCommand.RETURN_PUMP_IDENTITY:
            if self.tells_identity:
                self.outbox.append(PumpIdentity("4000000080"))
        elif isinstance(item, Command) and item.command in (
            PumpCommand.RETURN_STATUS,
            PumpCommand.RETURN_FILLING_INFORMATION,
        ):
            self.outbox.extend(self._shown())

    def __call__(self, frame: Frame) -> bytes | None:
        if frame.kind is FrameKind.DATA:
            for item in decode_transactions(frame.data, Direction.TO_DEVICE):
                self._handle(item)
            return ack(frame.address, frame.tx).encode()
        if frame.kind is FrameKind.ACK and self.unacked and frame.tx == self.unacked.tx:
            self.unacked, self.tx = None, (self.tx + 1) & 0x0F
            return None
        if frame.kind is FrameKind.POLL:
            if self.unacked is None and self.outbox:
                self.unacked = data_frame(frame.address, self.tx, encode_transactions(self.outbox))
                self.outbox = []
            return (self.unacked or eot(frame.address)).encode()
        return None


async def test_a_filling_read_as_the_pump_is_reset_elsewhere_is_reported_but_not_held() -> None:
    # Given a pump showing a finished filling, which another terminal resets while the
    # driver reads the filling's meter
    events: list[DeviceEvent] = []
    pump = HoldingPump(reset_when_totals_asked=True)
    async with scripted(pump, events) as (_line, driver):
        await reach(driver, 1, PumpState.IDLE, timeout=10)
        # Then the filling was numbered and reported, as it was sold
        (finished,) = [e.transaction for e in events if isinstance(e, TransactionFinished)]
        assert (finished.transaction, finished.volume_ml, finished.totalizer_end_ml) == (
            1,
            2000,
            12_000,
        )
        # But the pump does not hold it: it cannot be closed, nor is it waiting to be
        with pytest.raises(DeviceRejected) as caught:
            await driver.close_transaction(1, finished.transaction)
        assert caught.value.details["device_code"] == "not_held"
        assert await driver.unacknowledged_transactions([1]) == []
        (reported,) = await driver.transactions(1, finished.ended_at, finished.ended_at)
        assert reported.closed


async def test_a_pump_identity_read_once_survives_a_restart_when_the_pump_stops_telling_it() -> (
    None
):
    store = MemoryDriverStore()
    # Given an edge that read the identity of the one pump on its line
    async with scripted(HoldingPump(), store=store) as (_line, driver):
        first = await driver.identity()
    assert first.device_id == "dart:line:4000000080"
    # When the edge restarts and the pump no longer answers RETURN PUMP IDENTITY
    async with scripted(HoldingPump(tells_identity=False), store=store) as (_line, driver):
        again = await driver.identity()
    # Then the line is still the same device
    assert again.device_id == first.device_id


# --------------------------------------------------------------------------- the driver


class CopyableStore:
    """A driver store in memory whose whole content can be copied at any instant."""

    def __init__(self, values: dict[str, Any] | None = None) -> None:
        self.values: dict[str, Any] = json.loads(json.dumps(values or {}))

    async def load(self, key: str) -> dict[str, Any] | None:
        value = self.values.get(key)
        return None if value is None else json.loads(json.dumps(value))

    async def save(self, key: str, value: dict[str, Any]) -> None:
        self.values[key] = json.loads(json.dumps(value))

    def copy(self) -> dict[str, Any]:
        copied: dict[str, Any] = json.loads(json.dumps(self.values))
        return copied


def dead_endpoint() -> str:
    """A TCP address nothing listens on (a line that is down)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


async def test_a_sale_is_reported_only_once_its_number_would_survive_a_restart() -> None:
    # Given a driver whose store is copied at the instant each sale is reported
    async with DartSimulator(speed=40, flow_l_per_min=60) as sim:
        await sim.start("127.0.0.1:0")
        store = CopyableStore()
        copies: list[tuple[DeviceTransaction, dict[str, Any]]] = []

        def on_event(event: DeviceEvent) -> None:
            if isinstance(event, TransactionFinished):
                copies.append((event.transaction, store.copy()))

        driver = driver_for(sim, store)
        driver.subscribe(on_event)
        async with driver:
            # When two sales are made
            first = await sell(Rig(sim, driver, store), litres=2)
            await driver.close_transaction(1, first.transaction)
            await sell(Rig(sim, driver, store), litres=1)
    assert [t.transaction for t, _ in copies] == [1, 2]
    # Then a driver restarted from what was stored at each report, with the pumps away,
    # knows that sale under its number
    for reported, stored in copies:
        again = DartDriver("line", dead_endpoint(), {1: 0x50}, store=CopyableStore(stored))
        async with again:
            found = await again.transactions(1, reported.ended_at, reported.ended_at)
        assert [t.transaction for t in found] == [reported.transaction]


async def test_an_identical_sale_made_while_the_edge_was_away_gets_the_next_number() -> None:
    async with DartSimulator(speed=40, flow_l_per_min=60) as sim:
        await sim.start("127.0.0.1:0")
        store = MemoryDriverStore()
        preset = Preset(PresetType.VOLUME, volume_ml=2_000)
        # Given a sale of 2 L numbered 1, held by the pump and not closed, when the edge stops
        async with driver_for(sim, store) as first:
            sale = await sell(Rig(sim, first, store), preset=preset)
        # When another terminal sells the same 2 L at the same price on the same nozzle
        pump = sim.pump(1)
        pump.handle(Command(PumpCommand.RESET))
        pump.handle(PresetVolume(200))
        pump.handle(Command(PumpCommand.AUTHORIZE))
        sim.lift(1, 1, target_ml=5_000, hang=True)
        await eventually(lambda: pump.status is PumpStatusCode.FILLING_COMPLETED, 10)
        assert pump.display is not None
        assert (pump.display.volume, pump.display.price) == (200, 789)
        events: list[DeviceEvent] = []
        again = driver_for(sim, store)
        again.subscribe(events.append)
        async with again:
            held = await reach(again, 1, PumpState.END_OF_TRANSACTION)
            found = await again.finished_transaction(1)
            assert found is not None
            report = await again.transactions(1, sale.ended_at, found.ended_at)
        # Then the meter tells them apart: the pump's sale is a new one, numbered 2
        assert held.transaction == found.transaction == sale.transaction + 1
        assert (found.volume_ml, found.amount_minor) == (sale.volume_ml, sale.amount_minor)
        assert found.totalizer_end_ml == sale.totalizer_end_ml + 2_000  # type: ignore[operator]
        reported = [e.transaction for e in events if isinstance(e, TransactionFinished)]
        assert [t.transaction for t in reported] == [found.transaction]
        # And the first one is in the report, no longer held
        assert [(t.transaction, t.closed) for t in report] == [(1, True), (2, False)]


async def test_a_sale_the_pump_was_reset_from_elsewhere_cannot_be_closed_any_more() -> None:
    async with rig() as setup:
        # Given a finished sale the pump holds
        sale = await sell(setup, litres=2)
        # When another terminal resets the pump (it lets go of the sale)
        setup.sim.pump(1).handle(Command(PumpCommand.RESET))
        await reach(setup.driver, 1, PumpState.IDLE)
        # Then closing that number is refused: the pump does not hold it
        with pytest.raises(DeviceRejected) as caught:
            await setup.driver.close_transaction(1, sale.transaction)
        assert caught.value.details["device_code"] == "not_held"
        # And it is no longer unacknowledged; the report keeps it, as closed
        assert await setup.driver.unacknowledged_transactions([1]) == []
        (reported,) = await setup.driver.transactions(1, sale.ended_at, sale.ended_at)
        assert reported.transaction == sale.transaction
        assert reported.closed


async def test_numbers_keep_growing_once_the_report_has_forgotten_the_oldest_sales(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a driver that keeps only the two latest fillings of a pump for its report
    monkeypatch.setattr(dart_driver, "_KEPT_FILLINGS", 2)
    async with rig() as setup:
        # When four sales are made
        numbers = []
        for _ in range(4):
            sale = await sell(setup, litres=1)
            numbers.append(sale.transaction)
            await setup.driver.close_transaction(1, sale.transaction)
        # Then each got the next number, none was handed out twice
        assert numbers == [1, 2, 3, 4]


async def test_a_pump_power_cycle_is_announced_as_an_identity_change_in_a_new_epoch() -> None:
    async with rig() as setup:
        # Given a pump that was programmed and sold
        sale = await sell(setup, litres=1)
        await setup.driver.close_transaction(1, sale.transaction)
        assert (await setup.driver.identity()).boot_marker == "50:0"
        # When it loses power
        setup.sim.reboot(1)

        # Then the driver announces it, and the boot marker names a new epoch
        def announced() -> bool:
            return any(isinstance(e, IdentityChanged) for e in setup.events)

        await eventually(announced, 10, what="an identity change")
        assert (await setup.driver.identity()).boot_marker == "50:1"
        changes = [e for e in setup.events if isinstance(e, IdentityChanged)]
        assert len(changes) == 1
        assert "0x50" in changes[0].reason


async def test_a_meter_that_went_back_is_a_new_epoch_and_is_announced() -> None:
    async with rig() as setup:
        # Given a pump whose nozzle 1 meter read 20 L
        await sell(setup, litres=20)
        before = await setup.driver.totals(1, 1)
        assert before.volume_ml >= 20_000
        assert (await setup.driver.identity()).boot_marker == "50:0"
        # When the meter is replaced (it reads 0 again)
        setup.sim.pump(1).totals[1] = NozzleTotals()
        after = await setup.driver.totals(1, 1)
        # Then the totalizer went back: the driver begins an epoch and says so
        assert after.volume_ml == 0
        assert (await setup.driver.identity()).boot_marker == "50:1"
        changes = [e for e in setup.events if isinstance(e, IdentityChanged)]
        assert len(changes) == 1
        assert "totalizer" in changes[0].reason


async def test_a_meter_that_went_back_while_the_edge_was_away_is_a_new_epoch() -> None:
    async with DartSimulator(speed=40) as sim:
        await sim.start("127.0.0.1:0")
        store = MemoryDriverStore()
        sim.pump(1).totals[1] = NozzleTotals(volume=500_000, amount=394_500, fillings=40)
        # Given an edge that read nozzle 1's meter at 5000.00 L, then stopped
        async with driver_for(sim, store) as first:
            assert (await first.totals(1, 1)).volume_ml == 5_000_000
        # When the meter is replaced meanwhile
        sim.pump(1).totals[1] = NozzleTotals()
        # Then the next edge, reading it, begins an epoch
        async with driver_for(sim, store) as again:
            assert (await again.totals(1, 1)).volume_ml == 0
            assert (await again.identity()).boot_marker == "50:1"


async def test_a_silent_pump_is_given_up_after_its_tries_and_left_alone_until_its_retry() -> None:
    # Given two pumps, the second silent from the start, retried only every 30 s
    async with rig(
        pumps=2, faults=["no_answer=0x51"], offline_after=2, offline_retry_s=30.0, timeout_s=1.0
    ) as setup:
        driver = setup.driver

        async def given_up() -> bool:
            return (await status(driver, 2)).error == "no answer from 0x51"

        await eventually(given_up, 10, what="pump 2 given up")
        # Then it cost exactly the tries that make it offline
        assert driver.health().timeouts == 2
        # And while the other pump sells, it is not asked again
        sale = await sell(setup, pump=1, litres=3)
        await driver.close_transaction(1, sale.transaction)
        assert (await status(driver, 2)).state is PumpState.OFFLINE
        assert driver.health().timeouts == 2


@pytest.mark.parametrize("chunked", [False, True])
def test_a_frame_of_exactly_the_deframers_limit_reads_and_one_byte_longer_is_refused(
    chunked: bool,
) -> None:
    # Given a deframer allowing frames of 64 bytes, a valid frame of exactly 64 bytes and a
    # valid frame of 65 (data without DLE-escaped bytes, so its length is what is counted)
    limit = 64
    exact = wire_of(0x50, 0x31, b"\x01" * (limit - 6))
    longer = wire_of(0x50, 0x31, b"\x01" * (limit - 5))
    assert (len(exact), len(longer)) == (limit, limit + 1)
    for frame, accepted in ((exact, True), (longer, False)):
        deframer = Deframer(max_frame=limit)
        stream = frame + poll(0x50).encode()
        # When it is fed whole or a byte at a time
        if chunked:
            items = [item for b in stream for item in deframer.feed(bytes((b,)))]
        else:
            items = deframer.feed(stream)
        # Then the 64-byte frame is read and the 65-byte one refused as oversized, once,
        # and the POLL after either is read
        if accepted:
            assert items == [decode_frame(frame), poll(0x50)]
            assert deframer.refused == {}
        else:
            assert len(items) == 2
            assert isinstance(items[0], DartMalformed)
            assert items[0].reason == "oversized"
            assert "longer than 64 bytes" in str(items[0])
            assert items[1] == poll(0x50)
            assert deframer.refused == {"oversized": 1}


async def test_a_filling_reset_elsewhere_while_read_is_not_reported_and_the_next_one_is(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a pump whose keypad resets it the moment it has answered the driver's
    # RETURN FILLING INFORMATION (another terminal takes the sale)
    async with rig() as setup:
        pump = setup.sim.pump(1)
        original = pump._command
        armed = [True]

        def keypad_reset_after_reading(command: int) -> None:
            original(command)
            if command == PumpCommand.RETURN_FILLING_INFORMATION and armed[0]:
                armed[0] = False
                original(PumpCommand.RESET)

        pump._command = keypad_reset_after_reading  # type: ignore[method-assign]
        # When a customer fills 5 L under the driver's authorisation
        setup.sim.lift(1, 1, target_ml=5000, hang=True)
        await reach(setup.driver, 1, PumpState.CALLING)
        await setup.driver.authorize(1, 1, Preset(), PRICE)
        await eventually(lambda: not armed[0], what="the filling read")
        await reach(setup.driver, 1, PumpState.IDLE)
        # Then that sale is not reported (the terminal that reset it owns it), the line says
        # so, and the pump goes on
        assert setup.of(TransactionFinished) == []
        assert len(setup.sim.completed) == 1
        assert any("reset elsewhere" in r.getMessage() for r in caplog.records)
        # And the next filling is reported, with the next number
        found = await sell(setup, litres=3.0)
        assert found.volume_ml >= 3000
        assert found.transaction == 1
        reported = setup.of(TransactionFinished)
        assert [e.transaction.transaction for e in reported] == [found.transaction]  # type: ignore[attr-defined]
