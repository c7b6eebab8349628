"""The technician's tools as a user runs them: ``forecourt protocol decode``, ``forecourt
simulate`` and ``forecourt device poll`` as real processes, with good frames and bad ones, a
simulator of each protocol, a port nobody listens on, and Ctrl-C / SIGTERM.

Frames are the codec tests' vectors:

- TLS: the i101 reply read off a real console, from
  ``eredden/Veeder-Root-TLS-Socket-Library:tests/test_socket.py`` (``test_checksum`` case 1,
  and case 2 with the checksum digit changed), as in tests/protocols/tls/test_codec_captures.py.
- DART: the four-transaction frame ``data-capture_2026-07-19_merged_a-addr50-seqE-13`` from
  ``moduslightstech-lgtm/intelipump:tests/fixtures/dart/data_frames.json`` and the bad-CRC
  frame of tests/protocols/dart/test_application.py.
- jsonPTS: the end-of-transaction status of tests/protocols/test_jsonpts_driver.py
  (``EOT_DATA``) in its envelope, and broken messages of tests/protocols/test_jsonpts_codec.py.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.cli.support import CLI, Finished, Running, clean_env, run

T = TypeVar("T")

I101_CAPTURE = b"\x01i101002312301342020402&&FB3B\x03"
FOUR_TRANSACTIONS = (
    "50 3E 02 08 00 00 00 00 00 00 00 00 03 04 00 99 07 07 01 01 05 65 10 01 13 36 38 49 66"
    " 13 36 38 49 66 00 00 00 00 00 39 10 FA 03 FA"
)
DART_BAD_CRC = "50 37 01 01 06 1D 3D 03 FA"
EOT_MESSAGE = (
    '{"Protocol": "jsonPTS", "Packets": [{"Id": 7, "Type": "PumpEndOfTransactionStatus",'
    ' "Data": {"Pump": 1, "Nozzle": 2, "FuelGradeId": 95, "Volume": 35.20, "TCVolume": 35.20,'
    ' "Price": 7.89, "Amount": 277.73, "Transaction": 41, "TotalVolume": 12345.67,'
    ' "TotalAmount": 98765.43, "DateTimeStart": "2026-11-25T10:00:00",'
    ' "DateTime": "2026-11-25T10:01:30"}}]}'
)
SAMPLE_PASSWORD = "admin"  # src/forecourt/sim/sample_pts.json: auth.password
START_S = 30.0  # a simulator says where it listens within this


def wait_until(check: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout} s")
        time.sleep(0.05)


def decoded(result: Finished) -> dict[str, Any]:
    assert result.code == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    body = json.loads(result.stdout)
    assert isinstance(body, dict)
    return body


def refused(result: Finished) -> str:
    """The reason of a refusal: exit 1, one line on stderr, ``Error: ...``, nothing else."""
    assert result.code == 1, (result.code, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return result.one_line_error()


# --------------------------------------------------------------------------- protocol decode


def test_a_captured_tls_reply_decodes_to_its_alarms(tmp_path: Path) -> None:
    # Given the i101 reply a real console sent (eredden test_checksum case 1)
    result = run(["protocol", "decode", "--protocol", "tls", "--hex", I101_CAPTURE.hex()], tmp_path)
    # Then it is shown as a system status report naming the overfill alarm on tank 2
    body = decoded(result)
    assert body["protocol"] == "tls"
    assert body["direction"] == "from-device"
    assert (body["code"], body["function"], body["kind"]) == ("i10100", "i101", "system_status")
    assert body["gauge_time"]["wall_clock"] == "2312301342"
    assert body["alarms"] == [{"category": "02", "type": "04", "device": 2, "code": "overfill"}]


def test_a_captured_tls_reply_given_as_text_decodes_the_same(tmp_path: Path) -> None:
    text = I101_CAPTURE.decode().replace("\x01", "<SOH>").replace("\x03", "<ETX>")
    by_text = decoded(run(["protocol", "decode", "--protocol", "tls", "--text", text], tmp_path))
    by_hex = decoded(
        run(["protocol", "decode", "--protocol", "tls", "--hex", I101_CAPTURE.hex()], tmp_path)
    )
    assert by_text == by_hex


def test_a_captured_dart_frame_decodes_to_its_four_transactions(tmp_path: Path) -> None:
    # Given data-capture_2026-07-19_merged_a-addr50-seqE-13, from the pump
    result = run(
        [
            "protocol",
            "decode",
            "--protocol",
            "dart",
            "--direction",
            "from-device",
            "--hex",
            FOUR_TRANSACTIONS,
        ],
        tmp_path,
    )
    body = decoded(result)
    assert (body["address"], body["kind"], body["tx"]) == ("0x50", "data", 14)
    assert body["crc"] == "0xFA39"
    assert [t["name"] for t in body["transactions"]] == [
        "DC2 filled volume and amount",
        "DC3 nozzle status and filling price",
        "DC1 pump status",
        "DC101 total counters",
    ]
    assert body["transactions"][1]["fields"] == {
        "price_raw": 9907,
        "nozzle": 7,
        "nozzle_out": False,
    }
    assert body["transactions"][2]["fields"] == {"status": 5, "meaning": "filling completed"}
    assert body["transactions"][3]["fields"]["total_raw"] == 1336384966


def test_a_jsonpts_end_of_transaction_decodes_to_exact_integers(tmp_path: Path) -> None:
    result = run(["protocol", "decode", "--protocol", "jsonpts", "--text", EOT_MESSAGE], tmp_path)
    body = decoded(result)
    assert body["direction"] == "from-device"
    (packet,) = body["packets"]
    assert (packet["id"], packet["type"]) == (7, "PumpEndOfTransactionStatus")
    assert packet["data"]["Transaction"] == 41
    scaled = packet["scaled"]
    assert scaled["Volume"] == {"raw": "35.20", "volume_ml": 35200, "exact": True}
    assert scaled["Amount"] == {"raw": "277.73", "amount_minor": 27773, "exact": True}
    assert scaled["Price"] == {"raw": "7.89", "unit_price_mmu": 789000, "exact": True}
    assert scaled["TotalVolume"]["totalizer_ml"] == 12_345_670


@pytest.mark.parametrize(
    ("protocol", "frame", "reason"),
    [
        pytest.param(
            "tls",
            ["--hex", I101_CAPTURE.replace(b"FB3B", b"FB3A").hex()],
            r"checksum FB3A does not match",
            id="tls-bad-checksum",
        ),
        pytest.param(
            "tls",
            ["--direction", "from-device", "--hex", I101_CAPTURE[:20].hex()],
            r"ETX",
            id="tls-truncated",
        ),
        pytest.param("tls", ["--hex", "01 69 3Z"], r"not hex", id="tls-not-hex"),
        pytest.param(
            "dart",
            ["--direction", "to-device", "--hex", DART_BAD_CRC],
            r"bad CRC",
            id="dart-bad-crc",
        ),
        pytest.param(
            "dart",
            ["--direction", "from-device", "--hex", FOUR_TRANSACTIONS[:29]],
            r"no stop flag",
            id="dart-truncated",
        ),
        pytest.param("dart", ["--hex", "50 2"], r"not hex", id="dart-not-hex"),
        pytest.param("jsonpts", ["--text", EOT_MESSAGE[:60]], r"not valid JSON", id="jsonpts-cut"),
        pytest.param(
            "jsonpts",
            [
                "--text",
                '{"Protocol": "jsonPTS", "Packets": [{"Id": "1", "Type": "PumpGetStatus"}]}',
            ],
            r"'Id' must be an integer",
            id="jsonpts-bad-field",
        ),
        pytest.param("jsonpts", ["--hex", "7b 22 zz"], r"not hex", id="jsonpts-not-hex"),
    ],
)
def test_a_frame_that_does_not_decode_exits_1_with_one_line_naming_why(
    tmp_path: Path, protocol: str, frame: list[str], reason: str
) -> None:
    result = run(["protocol", "decode", "--protocol", protocol, *frame], tmp_path)
    assert re.search(reason, refused(result)), result.stderr


# --------------------------------------------------------------------------- simulate + poll


@dataclass
class Simulator:
    """A ``forecourt simulate`` process and the HOST:PORT of its device port."""

    kind: str
    proc: Running
    address: str
    control: str | None = None  # the DART simulator's control port


def _stdout_match(proc: Running, pattern: str) -> re.Match[str] | None:
    if proc.process.poll() is not None:
        raise AssertionError(f"exited ({proc.process.returncode}):\n{proc.stderr()}")
    return re.search(pattern, proc.out.read_text(errors="replace"))


def start_simulator(kind: str, cwd: Path) -> Simulator:
    """Start ``forecourt simulate KIND`` on a port the kernel picks; wait until it says where."""
    env = clean_env()
    if kind == "tls":
        proc = Running([*CLI, "simulate", "tls", "--listen", "127.0.0.1:0"], cwd, env, "tls")
        found = wait_until(
            lambda: _stdout_match(proc, r"TLS gauge simulator on tcp://(\S+:\d+)"),
            START_S,
            "TLS simulator line",
        )
        return Simulator(kind, proc, found.group(1))
    if kind == "dart":
        args = ["--listen", "127.0.0.1:0", "--pumps", "2", "--control", "127.0.0.1:0"]
        proc = Running([*CLI, "simulate", "dart", *args], cwd, env, "dart")
        found = wait_until(
            lambda: _stdout_match(proc, r"DART simulator tcp on tcp://(\S+:\d+)"),
            START_S,
            "DART simulator line",
        )
        control = wait_until(
            lambda: _stdout_match(proc, r"DART simulator control on (\S+:\d+)"),
            START_S,
            "DART control line",
        )
        return Simulator(kind, proc, found.group(1), control.group(1))
    port_file = cwd / "jsonpts.port"
    proc = Running(
        [*CLI, "simulate", "jsonpts", "--listen", "127.0.0.1:0", "--port-file", str(port_file)],
        cwd,
        env,
        "jsonpts",
    )

    def announced() -> str | None:
        if proc.process.poll() is not None:
            raise AssertionError(f"exited ({proc.process.returncode}):\n{proc.stderr()}")
        text = port_file.read_text().strip() if port_file.exists() else ""
        return f"127.0.0.1:{text}" if text else None

    return Simulator(kind, proc, wait_until(announced, START_S, "jsonPTS port file"))


@pytest.fixture
def simulators(tmp_path: Path) -> Iterator[Callable[[str], Simulator]]:
    started: list[Simulator] = []

    def start(kind: str) -> Simulator:
        sim = start_simulator(kind, tmp_path)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.proc.kill()


POLL_OPTIONS = {
    "tls": [],
    "dart": ["--option", "addresses=0x50,0x51"],
    "jsonpts": ["--option", f"password={SAMPLE_PASSWORD}", "--option", "pumps=1-2"],
}


def poll(kind: str, address: str, cwd: Path) -> Finished:
    return run(
        ["device", "poll", "--protocol", kind, "--connect", address, *POLL_OPTIONS[kind], "--json"],
        cwd,
    )


def test_device_poll_reads_the_tls_simulator_who_it_is_and_every_tank(
    tmp_path: Path, simulators: Callable[[str], Simulator]
) -> None:
    gauge = simulators("tls")
    body = decoded(poll("tls", gauge.address, tmp_path))
    assert body["protocol"] == "tls"
    assert body["identity"] == {
        "device_id": f"tcp://{gauge.address}",
        "boot_marker": None,
        "firmware": "346330-100-B",
    }
    tanks = body["measurements"]
    assert [m["tank"] for m in tanks] == list(range(1, len(tanks) + 1))
    assert tanks, body
    for measured in tanks:
        assert isinstance(measured["volume_ml"], int)
        assert measured["volume_ml"] > 0
        assert isinstance(measured["product_height_um"], int)
        assert isinstance(measured["temperature_mdegc"], int)
    assert body["health"]["state"] == "online"
    assert body["health"]["frames_refused"] == 0


def test_simulate_tls_serves_as_many_tanks_as_its_help_says(
    tmp_path: Path, simulators: Callable[[str], Simulator]
) -> None:
    # Given what ``simulate tls --help`` promises when --tanks is not given
    helped = run(["simulate", "tls", "--help"], tmp_path)
    assert helped.code == 0, helped.stderr
    promised = re.search(r"--tanks.*?\(default (\d+)\)", " ".join(helped.stdout.split()))
    assert promised, helped.stdout
    # Then the simulator started without --tanks has that many tanks
    gauge = simulators("tls")
    body = decoded(poll("tls", gauge.address, tmp_path))
    assert len(body["measurements"]) == int(promised.group(1))


def test_device_poll_reads_the_dart_simulator_who_each_pump_is_and_its_state(
    tmp_path: Path, simulators: Callable[[str], Simulator]
) -> None:
    line = simulators("dart")
    body = decoded(poll("dart", line.address, tmp_path))
    assert body["protocol"] == "dart"
    assert body["endpoint"] == f"tcp://{line.address}"
    assert body["identity"]["boot_marker"] == "50:0,51:0"
    pumps = body["pumps"]
    assert [p["address"] for p in pumps] == ["0x50", "0x51"]
    assert [p["identity"] for p in pumps] == ["4000000080", "4000000081"]
    for pump in pumps:
        assert pump["state"] == "idle"
        assert pump["dart_status"] == 0  # not programmed since power-up
        assert pump["error"] is None
        assert pump["epoch"] == 0
    assert body["health"]["state"] == "online"


def test_device_poll_reads_the_jsonpts_simulator_who_it_is_and_its_pumps(
    tmp_path: Path, simulators: Callable[[str], Simulator]
) -> None:
    controller = simulators("jsonpts")
    body = decoded(poll("jsonpts", controller.address, tmp_path))
    assert body["protocol"] == "jsonpts"
    assert body["endpoint"] == f"http://{controller.address}"
    assert body["identity"]["device_id"]
    assert body["identity"]["boot_marker"]
    assert [(p["pump"], p["state"], p["error"]) for p in body["pumps"]] == [
        (1, "idle", None),
        (2, "idle", None),
    ]


@pytest.fixture
def nobody_listens() -> Iterator[str]:
    """HOST:PORT of a port that is bound (so nobody else takes it) and never listened on:
    a connection there is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{held.getsockname()[1]}"


@pytest.mark.parametrize("kind", ["tls", "dart", "jsonpts"])
def test_polling_a_port_nobody_listens_on_exits_1_with_one_line(
    tmp_path: Path, nobody_listens: str, kind: str
) -> None:
    started = time.monotonic()
    reason = refused(poll(kind, nobody_listens, tmp_path))
    assert nobody_listens.rsplit(":", 1)[1] in reason, reason
    assert time.monotonic() - started < 20


# --------------------------------------------------------------------------- stopping


def _connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=5)


@contextmanager
def connected_clients(sim: Simulator) -> Iterator[None]:
    """Clients that stay connected while the simulator stops: a driver that has polled the
    device and, for DART, a test harness on the control port."""
    with contextlib.ExitStack() as held:
        client = held.enter_context(_connect(sim.address))
        if sim.kind == "tls":
            client.sendall(b"\x01i20100")  # inventory, all tanks
            assert client.recv(1) == b"\x01"
        elif sim.kind == "dart":
            client.sendall(bytes.fromhex("50 20 FA"))  # POLL pump 0x50
            assert client.recv(1) == b"\x50"
            assert sim.control is not None
            control = held.enter_context(_connect(sim.control))
            control.sendall(b'{"cmd": "state"}\n')
            assert control.makefile("rb").readline().startswith(b'{"')
        yield


@pytest.mark.parametrize("kind", ["tls", "dart", "jsonpts"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_simulator_stops_cleanly_on_ctrl_c_and_sigterm_with_a_client_connected(
    simulators: Callable[[str], Simulator], kind: str, sig: signal.Signals
) -> None:
    sim = simulators(kind)
    with connected_clients(sim):
        code = sim.proc.stop(sig)
    stderr = sim.proc.stderr()
    assert code in (0, 128 + sig), (code, stderr)
    assert "Traceback" not in stderr, stderr
    assert "Exception in callback" not in stderr, stderr
