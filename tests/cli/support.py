"""Running ``forecourt`` (and the simulator) as the operator does: real processes, their
stderr in a file, waits with deadlines, signals, and checks on what they leave behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLI = [sys.executable, "-m", "forecourt.cli"]
SIMULATOR = [sys.executable, "-m", "forecourt.sim.pts_controller"]
STOP_S = 15.0  # a stopped process ends within this


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without the developer's own FORECOURT_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORECOURT_")}
    env.update(extra)
    return env


@dataclass
class Finished:
    code: int
    stdout: str
    stderr: str

    def one_line_error(self) -> str:
        """The single ``Error: ...`` line (and no traceback), as a user mistake must give."""
        assert "Traceback" not in self.stderr, self.stderr
        errors = [line for line in self.stderr.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1, self.stderr
        return errors[0].removeprefix("Error: ")


def run(
    args: list[str], cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 30.0
) -> Finished:
    done = subprocess.run(
        [*CLI, *args],
        cwd=cwd,
        env=dict(env) if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Finished(done.returncode, done.stdout, done.stderr)


class Running:
    """A long-running process whose stderr goes to a file we read while it runs."""

    def __init__(
        self, command: list[str], cwd: Path, env: Mapping[str, str], name: str = "proc"
    ) -> None:
        self.log = cwd / f"{name}.stderr"
        self.out = cwd / f"{name}.stdout"
        with self.log.open("wb") as err, self.out.open("wb") as out:
            self.process = subprocess.Popen(command, cwd=cwd, env=dict(env), stdout=out, stderr=err)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, predicate: Callable[[str], bool], timeout: float, what: str) -> str:
        """Poll stderr until ``predicate`` holds for it (the process must stay alive)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.stderr()
            if predicate(text):
                return text
            if self.process.poll() is not None:
                raise AssertionError(f"exited ({self.process.returncode}) before {what}:\n{text}")
            time.sleep(0.05)
        raise AssertionError(f"no {what} after {timeout} s:\n{self.stderr()}")

    def wait_listening(self, timeout: float = 30.0) -> str:
        """The URL of the one ``listening on http://HOST:PORT`` line."""
        text = self.wait_for(lambda t: "listening on http://" in t, timeout, "listening line")
        line = next(line for line in text.splitlines() if "listening on http://" in line)
        url = line.split("listening on ", 1)[1].split('"', 1)[0].split()[0]
        return url.rstrip("/")

    def stop(self, sig: int = signal.SIGINT, timeout: float = STOP_S) -> int:
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"still running {timeout} s after {sig!r}:\n{self.stderr()}"
            ) from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def children_of(pid: int) -> list[int]:
    """Processes whose parent is ``pid``, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent counts as gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rfind(")") + 2 :].split()[0] != "Z"


def processes_mentioning(needle: str) -> list[int]:
    """Live processes whose command line contains ``needle``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in text and alive(int(cmdline.parent.name)):
            found.append(int(cmdline.parent.name))
    return found


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line as a JSON object with timestamp, level and event (fails on any other)."""
    records = []
    for line in text.splitlines():
        assert "HTTP Request:" not in line, line
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON log line: {line!r}") from None
        assert isinstance(record, dict), line
        assert {"timestamp", "level", "event"} <= record.keys(), line
        assert "T" in record["timestamp"], line  # ISO 8601
        records.append(record)
    return records
