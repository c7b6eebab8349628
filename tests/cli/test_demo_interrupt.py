"""Ctrl-C during ``forecourt demo``: it stops its simulator processes, removes its temporary
folder and exits 130, within a deadline, whenever the signal comes (starting up or selling)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.cli.support import CLI, Running, clean_env, processes_mentioning

ENDED_WITHIN_S = 20.0
ROUNDS = 5


def wait_for_start_phase(demo: Running, round_no: int) -> None:
    """Rounds 0 and 1 interrupt during start-up (HQ migrating, simulators and edges being
    started); the others once customers are being served, a little later each time."""
    if round_no < 2:
        demo.wait_for(lambda t: "Forecourt demo:" in t, 20, "the demo banner")
        time.sleep(0.3 + 0.5 * round_no)
        return
    demo.wait_for(lambda t: "t=" in t, 30, "traffic")
    time.sleep(0.5 * (round_no - 2))


def test_an_interrupted_demo_leaves_no_simulator_and_no_temporary_folder(tmp_path: Path) -> None:
    sig = signal.SIGINT
    for round_no in range(ROUNDS):
        tmp = tmp_path / f"tmp-{round_no}"  # the demo's temporary folder goes here
        tmp.mkdir()
        env = clean_env(TMPDIR=str(tmp))
        command = [*CLI, "demo", "--stations", "2", "--duration", "60"]
        demo = Running(command, tmp_path, env, f"demo-{round_no}")
        try:
            wait_for_start_phase(demo, round_no)
            started = time.monotonic()
            code = demo.stop(sig, timeout=ENDED_WITHIN_S)
        finally:
            demo.kill()
        took = time.monotonic() - started
        text = demo.stderr()
        assert code == 128 + sig, f"round {round_no}: {code}\n{text}"
        assert took < ENDED_WITHIN_S
        for word in ("Traceback", "Aborted!", "KeyboardInterrupt"):
            assert word not in text, f"round {round_no}:\n{text}"
        assert "demo interrupted" in text
        assert list(tmp.iterdir()) == [], f"round {round_no} left {list(tmp.iterdir())}"
        # Every simulator's command line names its config inside the temporary folder.
        left = processes_mentioning(str(tmp))
        assert left == [], f"round {round_no}: processes left: {left}"


def test_an_interrupted_demo_with_sigterm_exits_143_and_cleans_up(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    demo = Running(
        [*CLI, "demo", "--stations", "1", "--duration", "60"],
        tmp_path,
        clean_env(TMPDIR=str(tmp)),
        "demo",
    )
    try:
        demo.wait_for(lambda t: "t=" in t, 30, "traffic")
        code = demo.stop(signal.SIGTERM, timeout=ENDED_WITHIN_S)
    finally:
        demo.kill()
    assert code == 128 + signal.SIGTERM, demo.stderr()
    assert list(tmp.iterdir()) == []
    assert processes_mentioning(str(tmp)) == []
