"""The DART pump simulator is strict like a real pump: frame by frame, through its line logic.

These tests talk to :meth:`DartSimulator.handle` with decoded frames (no socket); the driver
tests run the same simulator over TCP and a pty.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from forecourt.protocols.dart.application import (
    Command,
    Decimals,
    Direction,
    FilledValues,
    NozzleStatus,
    PresetAmount,
    PresetVolume,
    PriceUpdate,
    PumpCommand,
    PumpStatusCode,
    PumpStatusReply,
    RequestTotals,
    TotalCounters,
    Transaction,
    decode_transactions,
    encode_transactions,
)
from forecourt.protocols.dart.line import (
    Frame,
    FrameKind,
    ack,
    data_frame,
    nak,
    poll,
)
from forecourt.protocols.dart.sim_faults import FAULTS, FaultError, parse_fault
from forecourt.protocols.dart.simulator import DartSimulator

S = PumpStatusCode


class Master:
    """A minimal site controller speaking to the simulator frame by frame."""

    def __init__(self, sim: DartSimulator, address: int = 0x50) -> None:
        self.sim = sim
        self.address = address
        self.tx = 0

    def send(self, *items: Transaction) -> Frame | None:
        frame = data_frame(self.address, self.tx, encode_transactions(items))
        self.tx = (self.tx + 1) % 16
        return self.sim.handle(frame)

    def collect(self) -> list[Transaction]:
        """POLL (and ACK) until EOT; everything the pump sent."""
        found: list[Transaction] = []
        for _ in range(20):
            reply = self.sim.handle(poll(self.address))
            assert reply is not None
            if reply.kind is FrameKind.EOT:
                return found
            found += decode_transactions(reply.data, Direction.FROM_DEVICE)
            self.sim.handle(ack(self.address, reply.tx))
        raise AssertionError("the pump never said EOT")

    def status(self) -> int:
        self.send(Command(PumpCommand.RETURN_STATUS))
        statuses = [i.status for i in self.collect() if isinstance(i, PumpStatusReply)]
        return statuses[-1]


def test_a_pump_answers_a_poll_with_eot_when_it_has_nothing_to_say() -> None:
    sim = DartSimulator()
    master = Master(sim)
    master.collect()  # what it had to say after power-up
    reply = sim.handle(poll(0x50))
    assert reply == Frame(0x50, FrameKind.EOT, 0)


def test_a_pump_keeps_silent_for_another_address() -> None:
    sim = DartSimulator(pumps=2)
    assert sim.handle(poll(0x52)) is None
    assert sim.handle(poll(0x51)) is not None


def test_a_data_frame_is_acked_with_its_tx_and_a_retransmission_is_not_executed_twice() -> None:
    # Given a programmed pump in RESET
    sim = DartSimulator()
    master = Master(sim)
    master.send(PriceUpdate((789, 650)))
    master.send(Command(PumpCommand.RESET))
    master.collect()
    # When the master sends a CD101 request with tx 7, and sends it again (lost ACK)
    request = data_frame(0x50, 7, encode_transactions([RequestTotals(1)]))
    first, again = sim.handle(request), sim.handle(request)
    # Then both are ACKed with tx 7, but only one DC101 answer is queued
    assert first == again == Frame(0x50, FrameKind.ACK, 7)
    answers = [i for i in master.collect() if isinstance(i, TotalCounters)]
    assert len(answers) == 1


def test_a_pump_repeats_its_data_frame_until_the_master_acks_it() -> None:
    sim = DartSimulator()
    first = sim.handle(poll(0x50))
    assert first is not None
    assert first.kind is FrameKind.DATA
    # When polled again without an ACK, and after a NAK
    assert sim.handle(poll(0x50)) == first
    assert sim.handle(nak(0x50, first.tx)) == first
    # Then after the ACK it moves on (its next frame, or EOT) with the next tx#
    sim.handle(ack(0x50, first.tx))
    assert sim.handle(poll(0x50)) != first


async def test_a_frame_with_a_bad_crc_gets_no_answer_and_a_good_one_does() -> None:
    # Given the simulator on a TCP port
    async with DartSimulator() as sim:
        await sim.start("127.0.0.1:0")
        assert sim.tcp_address is not None
        reader, writer = await asyncio.open_connection(*sim.tcp_address)
        # When a captured RETURN STATUS frame (data-capture_2026-07-19_merged_a-addr50-seq1-15)
        # arrives with its CRC one bit off
        writer.write(bytes.fromhex("50 31 01 01 00 9E A1 03 FA"))
        await writer.drain()
        # Then the pump says nothing (a real pump ignores it; the master retransmits)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(64), 0.3)
        assert sim.frames_refused == 1
        # And the same frame with its right CRC is ACKed with its tx#
        writer.write(bytes.fromhex("50 31 01 01 00 9E A0 03 FA"))
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(3), 2.0) == bytes.fromhex("50 C1 FA")
        writer.close()


def test_a_paced_line_takes_eleven_bits_a_byte_at_its_baud_rate() -> None:
    sim = DartSimulator(faults=["baud=9600"])
    assert sim.faults.on_the_line_s(96) == pytest.approx(0.11)  # 96 bytes x 11 bits / 9600
    sim.clear_fault("baud")
    assert sim.faults.on_the_line_s(96) == 0.0
    with pytest.raises(FaultError):
        sim.set_fault("baud", "10")  # no RS-485 line runs that slowly


async def test_a_paced_line_answers_a_frame_only_after_both_have_crossed_it() -> None:
    # Given a line paced at 300 baud: a 9-byte RETURN STATUS and its 3-byte ACK are 12 bytes,
    # 132 bits, 0.44 s on the wire
    async with DartSimulator(faults=["baud=300"]) as sim:
        await sim.start("127.0.0.1:0")
        assert sim.tcp_address is not None
        reader, writer = await asyncio.open_connection(*sim.tcp_address)
        loop = asyncio.get_running_loop()
        started = loop.time()
        writer.write(bytes.fromhex("50 31 01 01 00 9E A0 03 FA"))
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(3), 5.0) == bytes.fromhex("50 C1 FA")
        # Then the answer came no sooner than the line allows
        assert loop.time() - started >= 0.44
        writer.close()


def test_well_framed_data_that_does_not_decode_is_nakked() -> None:
    sim = DartSimulator()
    reply = sim.handle(data_frame(0x50, 3, bytes.fromhex("0102")))  # LNG 2, no data
    assert reply == Frame(0x50, FrameKind.NAK, 3)


def test_a_pump_is_not_programmed_after_power_up_and_refuses_to_be_authorised() -> None:
    # Given a pump just powered up
    sim = DartSimulator()
    master = Master(sim)
    assert master.status() == S.NOT_PROGRAMMED
    # When it is reset and authorised without prices
    master.send(Command(PumpCommand.RESET))
    master.send(Command(PumpCommand.AUTHORIZE))
    # Then it stays not programmed
    assert master.status() == S.NOT_PROGRAMMED
    # And a price update missing one of its two nozzles is ignored too
    master.send(PriceUpdate((789,)))
    assert master.status() == S.NOT_PROGRAMMED
    # Until it has a price for every nozzle: then FILLING COMPLETED, as documented
    master.send(PriceUpdate((789, 650)))
    assert master.status() == S.FILLING_COMPLETED


def test_authorize_is_refused_outside_reset() -> None:
    sim = DartSimulator()
    master = Master(sim)
    master.send(PriceUpdate((789, 650)))
    master.send(Command(PumpCommand.AUTHORIZE))  # still FILLING COMPLETED: refused
    assert master.status() == S.FILLING_COMPLETED
    master.send(Command(PumpCommand.RESET))
    master.send(Command(PumpCommand.AUTHORIZE))
    assert master.status() == S.AUTHORIZED


def sale(sim: DartSimulator, master: Master, *preset: Transaction, seconds: float) -> None:
    master.send(PriceUpdate((789, 650)))
    master.send(Command(PumpCommand.RESET))
    master.send(*preset, Command(PumpCommand.AUTHORIZE))
    sim.lift(1, 1)
    sim.pump(1).advance(seconds)
    sim.hang(1)


def test_a_volume_preset_stops_the_filling_at_the_preset() -> None:
    # Given a pump authorised with a preset of 10.00 L (raw 1000, 2 decimals)
    sim = DartSimulator(flow_l_per_min=60)
    master = Master(sim)
    master.collect()
    master.send(PriceUpdate((789, 650)))
    master.send(Command(PumpCommand.RESET))
    master.send(PresetVolume(1000), Command(PumpCommand.AUTHORIZE))
    sim.lift(1, 1)
    # When a minute's flow would give 60 L
    sim.pump(1).advance(60)
    # Then it stopped at 10.00 L (max reached), 78.90 at 7.89/L
    assert master.status() == S.MAX_REACHED
    sim.hang(1)
    master.send(Command(PumpCommand.RETURN_FILLING_INFORMATION))
    values = [i for i in master.collect() if isinstance(i, FilledValues)]
    assert values[-1] == FilledValues(1000, 7890)


def test_an_amount_preset_stops_the_filling_at_the_amount() -> None:
    sim = DartSimulator(flow_l_per_min=60)
    master = Master(sim)
    sale(sim, master, PresetAmount(5000), seconds=60)
    master.send(Command(PumpCommand.RETURN_FILLING_INFORMATION))
    values = [i for i in master.collect() if isinstance(i, FilledValues)]
    assert values[-1].amount == 5000
    assert values[-1].volume == 5000 * 100 // 789  # what 50.00 buys at 7.89/L, rounded down


def test_total_counters_grow_per_nozzle_and_survive_a_reboot() -> None:
    sim = DartSimulator(flow_l_per_min=60)
    master = Master(sim)
    sale(sim, master, PresetVolume(1500), seconds=60)
    sim.reboot(1)
    master.tx = 0
    master.send(RequestTotals(1), RequestTotals(0x11), RequestTotals(2))
    counters = {i.counter: i for i in master.collect() if isinstance(i, TotalCounters)}
    assert counters[1].total == 1500
    assert counters[0x11].total == 1500 * 789 // 100
    assert counters[0x11].meter1 == 1  # one filling on nozzle 1
    assert counters[2].total == 0


def test_a_reboot_mid_filling_ends_it_keeps_it_on_display_and_forgets_the_prices() -> None:
    # Given a filling running at 60 L/min for 10 s
    sim = DartSimulator(flow_l_per_min=60)
    master = Master(sim)
    master.collect()
    master.send(PriceUpdate((789, 650)))
    master.send(Command(PumpCommand.RESET))
    master.send(Command(PumpCommand.AUTHORIZE))
    sim.lift(1, 1)
    sim.pump(1).advance(10)
    # When the pump loses power
    sim.reboot(1)
    master.tx = 0
    # Then it is not programmed, and still shows the partial filling of 10.00 L
    assert master.status() == S.NOT_PROGRAMMED
    master.send(Command(PumpCommand.RETURN_FILLING_INFORMATION))
    got = master.collect()
    assert FilledValues(1000, 7890) in got
    assert NozzleStatus(789, 1, True) in got


def test_suspend_and_resume_pause_the_flow() -> None:
    sim = DartSimulator(flow_l_per_min=60)
    master = Master(sim)
    master.send(PriceUpdate((789, 650)))
    master.send(Command(PumpCommand.RESET))
    master.send(Command(PumpCommand.AUTHORIZE))
    sim.lift(1, 1)
    sim.pump(1).advance(1)
    master.send(Command(PumpCommand.SUSPEND))
    assert master.status() == S.SUSPENDED
    volume = sim.pump(1).filling.volume  # type: ignore[union-attr]
    sim.pump(1).advance(10)
    assert sim.pump(1).filling.volume == volume  # type: ignore[union-attr]
    master.send(Command(PumpCommand.RESUME))
    assert master.status() == S.FILLING


def test_every_fault_has_help_and_unknown_faults_are_refused() -> None:
    assert set(FAULTS) == {
        "no_answer",
        "garbage",
        "corrupt_crc",
        "split",
        "merge",
        "slow",
        "baud",
        "reboot",
        "nozzle_hanging",
        "tx_wrap",
    }
    assert all(FAULTS.values())
    assert parse_fault("slow=0.5") == ("slow", "0.5")
    with pytest.raises(FaultError):
        parse_fault("flood")


def test_no_answer_silences_only_the_named_pump() -> None:
    sim = DartSimulator(pumps=2, faults=["no_answer=0x51"])
    assert sim.handle(poll(0x51)) is None
    assert sim.handle(poll(0x50)) is not None
    sim.clear_fault("no_answer")
    assert sim.handle(poll(0x51)) is not None


def test_tx_wrap_moves_the_pumps_numbers_to_the_end_of_their_range() -> None:
    sim = DartSimulator(faults=["tx_wrap=1"])
    seen = []
    for _ in range(4):
        reply = sim.handle(poll(0x50))
        assert reply is not None
        if reply.kind is FrameKind.DATA:
            seen.append(reply.tx)
            sim.handle(ack(0x50, reply.tx))
        sim.pump(1).lift(1)
        sim.pump(1).hang()
    assert seen[:3] == [0x0E, 0x0F, 0x01]


async def test_completed_fillings_are_recorded_one_json_line_each(tmp_path: Path) -> None:
    # Given a simulator recording to a file
    record = tmp_path / "fillings.jsonl"
    sim = DartSimulator(flow_l_per_min=60, decimals=Decimals(2, 2, 2), record=record)
    await sim.start(None)
    try:
        master = Master(sim)
        sale(sim, master, PresetVolume(1000), seconds=60)
    finally:
        await sim.stop()
    # Then one line says what the dispenser measured, in our units
    (line,) = record.read_text().splitlines()
    entry = json.loads(line)
    assert entry["pump"] == 1
    assert entry["nozzle"] == 1
    assert entry["volume_ml"] == 10000
    assert entry["amount_minor"] == 7890
    assert entry["unit_price_mmu"] == 789000
    assert entry["totals"] == {"volume_ml": 10000, "amount_minor": 7890}


async def test_the_control_port_lifts_nozzles_and_injects_faults() -> None:
    # Given a simulator with a control port
    async with DartSimulator() as sim:
        await sim.start(None, control="127.0.0.1:0")
        assert sim.control_address is not None
        reader, writer = await asyncio.open_connection(*sim.control_address)

        async def ask(command: dict[str, object]) -> dict[str, object]:
            writer.write(json.dumps(command).encode() + b"\n")
            await writer.drain()
            answer: dict[str, object] = json.loads(await reader.readline())
            return answer

        # When a nozzle is lifted and a reboot injected
        lifted = await ask({"cmd": "lift", "pump": 1, "nozzle": 2})
        rebooted = await ask({"cmd": "fault", "name": "reboot", "value": "1"})
        wrong = await ask({"cmd": "fly"})
        writer.close()
        # Then the state says so, and a wrong command is answered with an error
        assert lifted["ok"] is True
        pumps = rebooted["pumps"]
        assert isinstance(pumps, list)
        assert pumps[0]["nozzle_out"] == 2
        assert pumps[0]["boots"] == 1
        assert wrong["ok"] is False
