"""The simulated TLS gauge seen from the wire: what it answers, what it refuses, its faults."""

from __future__ import annotations

import asyncio
import json

import pytest

from forecourt.kernel.errors import InvalidValue
from forecourt.protocols.tls.codec import (
    UNKNOWN_COMMAND_FRAME,
    FrameReader,
    InventoryReply,
    RawReply,
    TlsMalformed,
    decode_reply,
)
from forecourt.protocols.tls.sim_faults import FAULTS, FaultPlan, parse_fault_specs
from forecourt.protocols.tls.sim_gauge import GaugeConfig, SimTank
from forecourt.protocols.tls.simulator import load_config, open_pty, run, serve
from forecourt.protocols.transport import open_stream, parse_endpoint


async def ask(
    endpoint: str, request: bytes, *, frames: int = 1, within_s: float = 2.0
) -> tuple[list[bytes | TlsMalformed], FrameReader]:
    """Send raw bytes, collect ``frames`` frames (or what came before the deadline)."""
    reader, writer = await open_stream(parse_endpoint(endpoint))
    found: list[bytes | TlsMalformed] = []
    frame_reader = FrameReader()
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(within_s):
            while len(found) < frames:
                chunk = await reader.read(4096)
                if not chunk:
                    break
                found += frame_reader.feed(chunk)
    except TimeoutError:
        pass
    finally:
        writer.close()
    return found, frame_reader


@pytest.fixture
async def server():
    gauge = await serve("127.0.0.1", 0, GaugeConfig.default(3))
    yield gauge
    await gauge.close()


async def test_the_gauge_answers_an_inventory_request_with_a_checksummed_reply(server):
    (frame,), _ = await ask(server.endpoint, b"\x01i20100")
    reply = decode_reply(frame)

    assert isinstance(reply, InventoryReply)
    assert reply.code == "i20100"
    assert [t.tank for t in reply.tanks] == [1, 2, 3]
    assert all(len(t.fields) == 7 for t in reply.tanks)


async def test_a_request_for_one_tank_is_answered_for_that_tank_only(server):
    (frame,), _ = await ask(server.endpoint, b"\x01i20102\r\n")
    reply = decode_reply(frame)
    assert isinstance(reply, InventoryReply)
    assert [t.tank for t in reply.tanks] == [2]


@pytest.mark.parametrize("request_bytes", [b"\x01i99900", b"\x01I20100", b"\x01hello!"])
async def test_anything_but_a_known_computer_format_request_gets_9999ff1b(server, request_bytes):
    """3xx manual §5: an unrecognised function code is answered SOH 9999FF1B ETX."""
    (frame,), _ = await ask(server.endpoint, request_bytes)
    assert frame == UNKNOWN_COMMAND_FRAME


async def test_stacked_requests_are_answered_in_order(server):
    found, _ = await ask(server.endpoint, b"\x01i20500\x01i90200\x01i20100", frames=3)
    codes = [decode_reply(f).code for f in found if isinstance(f, bytes)]
    assert codes == ["i20500", "i90200", "i20100"]
    revision = decode_reply(found[1])  # type: ignore[arg-type]
    assert isinstance(revision, RawReply)
    assert "SOFTWARE# 346330-100-B" in revision.data


async def test_a_secured_gauge_answers_only_the_right_security_code():
    """3xx manual §5: "The system will not respond to a command without the proper security
    code"."""
    config = GaugeConfig.default(1, security_code="ABC123")
    async with await serve("127.0.0.1", 0, config) as gauge:
        silent, _ = await ask(gauge.endpoint, b"\x01XYZ789i20100", within_s=0.3)
        assert silent == []
        answered, _ = await ask(gauge.endpoint, b"\x01ABC123i20100")
        assert decode_reply(answered[0]).code == "i20100"  # type: ignore[arg-type]


async def test_corrupt_checksum_spoils_only_the_counted_replies(server):
    server.simulator.faults.set("corrupt_checksum", "1")
    (first,), _ = await ask(server.endpoint, b"\x01i20500")
    with pytest.raises(TlsMalformed) as caught:
        decode_reply(first)  # type: ignore[arg-type]
    assert caught.value.reason == "bad_checksum"
    (second,), _ = await ask(server.endpoint, b"\x01i20500")
    decode_reply(second)  # type: ignore[arg-type]
    assert server.simulator.faults.active == {}


async def test_merge_writes_the_reply_twice_in_one_go(server):
    server.simulator.faults.set("merge")
    found, _ = await ask(server.endpoint, b"\x01i20500", frames=2)
    assert len(found) == 2
    assert found[0] == found[1]


async def test_garbage_is_written_before_the_reply(server):
    server.simulator.faults.set("garbage", "12")
    (frame,), reader = await ask(server.endpoint, b"\x01i20500")
    decode_reply(frame)  # type: ignore[arg-type]
    assert reader.garbage_bytes == 12


async def test_lowercase_writes_lower_case_hex(server):
    server.simulator.faults.set("lowercase")
    (frame,), _ = await ask(server.endpoint, b"\x01i20101")
    assert isinstance(frame, bytes)
    assert frame[-5:-1] == frame[-5:-1].lower()
    assert isinstance(decode_reply(frame), InventoryReply)


async def test_no_answer_counted_once_lets_the_next_request_through(server):
    server.simulator.faults.set("no_answer", "1")
    silent, _ = await ask(server.endpoint, b"\x01i20500", within_s=0.3)
    assert silent == []
    answered, _ = await ask(server.endpoint, b"\x01i20500")
    assert len(answered) == 1


async def test_reboot_drops_the_connection_without_an_answer(server):
    server.simulator.faults.set("reboot")
    found, _ = await ask(server.endpoint, b"\x01i20500")
    assert found == []  # the connection ended before the deadline
    answered, _ = await ask(server.endpoint, b"\x01i20500")
    assert len(answered) == 1


async def test_the_gauge_answers_on_a_pty():
    async with await open_pty(GaugeConfig.default(2)) as gauge:
        (frame,), _ = await ask(gauge.endpoint, b"\x01i20100")
    reply = decode_reply(frame)  # type: ignore[arg-type]
    assert isinstance(reply, InventoryReply)
    assert len(reply.tanks) == 2


def test_every_fault_has_a_one_line_help_and_can_be_set_from_options():
    assert set(FAULTS) == {
        "no_answer",
        "garbage",
        "corrupt_checksum",
        "split",
        "merge",
        "delay",
        "lowercase",
        "reboot",
    }
    assert all("\n" not in text for text in FAULTS.values())
    plan = FaultPlan(dict.fromkeys(FAULTS, ""))
    assert set(plan.active) == set(FAULTS)


def test_fault_specs_parse_names_and_values_and_refuse_unknown_ones():
    assert parse_fault_specs(["corrupt_checksum=2", "split", "delay=0.5"]) == {
        "corrupt_checksum": "2",
        "split": "",
        "delay": "0.5",
    }
    with pytest.raises(InvalidValue):
        parse_fault_specs(["melt"])
    with pytest.raises(InvalidValue):
        parse_fault_specs(["corrupt_checksum=lots"])
    with pytest.raises(InvalidValue):
        parse_fault_specs(["split=1"])


def test_a_gauge_configuration_is_read_from_a_json_file(tmp_path):
    path = tmp_path / "gauge.json"
    path.write_text(
        json.dumps(
            {
                "timezone": "Asia/Shanghai",
                "security_code": "ABC123",
                "tanks": [
                    {
                        "number": 4,
                        "product": "D",
                        "volume": 5000.0,
                        "alarms": ["03"],
                        "deliveries": [
                            {
                                "started": "2026-11-30T06:00",
                                "ended": "2026-11-30T06:20",
                                "start_volume": 1000.0,
                                "end_volume": 5000.0,
                            }
                        ],
                    }
                ],
            }
        ),
        encoding="utf-8",
    )
    config = load_config(str(path))

    assert config.security_code == "ABC123"
    (tank,) = config.tanks
    assert (tank.number, tank.product, tank.volume, tank.alarms) == (4, "D", 5000.0, ["03"])
    assert tank.deliveries[0].started.utcoffset().total_seconds() == 8 * 3600


@pytest.mark.parametrize(
    "document",
    [
        {"tanks": [{"number": 1}, {"number": 1}]},
        {"tanks": [{"number": 1, "volume": 99999.0}]},
        {"tanks": [{"number": 1, "colour": "red"}]},
        {"timezone": "Mars/Olympus"},
        {"security_code": "short"},
    ],
)
def test_a_bad_gauge_configuration_is_refused(document):
    with pytest.raises(InvalidValue):
        GaugeConfig.from_json(document)


def test_a_default_gauge_has_the_tanks_asked_for():
    config = load_config(tanks=5)
    assert [t.number for t in config.tanks] == [1, 2, 3, 4, 5]
    assert all(isinstance(t, SimTank) for t in config.tanks)


async def test_run_serves_until_cancelled_and_announces_where():
    announced: asyncio.Queue[str] = asyncio.Queue()
    task = asyncio.create_task(
        run("127.0.0.1:0", ["split=2"], tanks=2, announce=announced.put_nowait)
    )
    try:
        async with asyncio.timeout(5):
            line = await announced.get()
        endpoint = line.split(" on ")[1].split(" ")[0]
        (frame,), _ = await ask(endpoint, b"\x01i20100")
        reply = decode_reply(frame)  # type: ignore[arg-type]
        assert isinstance(reply, InventoryReply)
        assert len(reply.tanks) == 2
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
