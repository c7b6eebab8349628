"""Every command in README.md's ``sh`` blocks, run as it stands, from the repository's directory.

A block whose first line is ``# examples: <kind> <value>...; ...`` names the values in it that
are only examples, and only those are replaced: ``port`` - a server started with ``--port N``
gets ``--port 0 --port-file FILE`` and N becomes the port it bound wherever the block says N
(another command naming N first gets a free port); ``path`` - a path under this test's
temporary folder; ``database`` - a PostgreSQL URL (and the database name in it, as ``createdb``
is given it) becomes a database on 127.0.0.1:5432 (user postgres) that nobody has yet, which
the block's own ``createdb`` creates and the test drops afterwards; ``duration`` - a demo's
``--duration`` becomes 1 s. Everything else runs as written.

A block is one shell: its lines run one after the other in bash, each seeing the environment
(``export``, ``source``) and the directory the lines before it left. Servers (``forecourt
serve``, ``forecourt edge``, ``forecourt worker``, the simulator) run in the background, as they
would in terminals of their own, from the moment they print ``listening on`` (a worker:
``consumers running:``) until the block's last line has run; then each gets SIGINT, as Ctrl-C
sends it, and must exit 0. Any other command must exit 0 within
its deadline. No command may print a traceback. ``FORECOURT_*`` variables of the test's own
environment are dropped, and ``PATH`` loses every folder holding a ``forecourt`` program, as in
a shell that has only run the README's two commands; defaults that would write into the
repository (HQ's SQLite file, the edge journal, temporary folders) point into the test's
temporary folder, and HQ's JetStream stream and subjects are the test's own.

The two commands themselves: ``bash scripts/test.sh`` would run this suite again, so it is
only checked to exist and to parse (``bash -n``); ``bash scripts/demo.sh``, which passes its
arguments to ``forecourt demo``, runs with ``--duration 1`` added.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import _port_open, service_missing

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
NATS_URL = "nats://127.0.0.1:4222"

COMMAND_S = 90.0  # a command that is not a server ends within this (a demo drains in <= 60 s)
SERVER_START_S = 60.0  # a server prints "listening on" within this
LISTENING_AFTER_PORT_FILE_S = 5.0  # ...and at the latest this long after its port file appears
SERVER_STOP_S = 20.0  # a server exits this long after SIGINT at the latest
SHORT_DURATION = "1"
TRACEBACK = "Traceback (most recent call last)"

SERVER = re.compile(
    r"(?:^|[\s/])forecourt\s+(?:serve|edge|worker)\b|-m\s+forecourt\.sim\.pts_controller\b"
)
# What a server prints once it serves: HTTP servers "listening on", a consumer worker this.
READY = ("listening on", "consumers running:")
KINDS = {"port": "port", "ports": "port", "path": "path", "paths": "path"}
KINDS |= {"database": "database", "databases": "database"}
KINDS |= {"duration": "duration", "durations": "duration"}
# The README's two commands; see the module docstring.
CHECK_ONLY = {"bash scripts/test.sh"}
WITH_ARGUMENTS = {"bash scripts/demo.sh": f" --duration {SHORT_DURATION}"}


@dataclass
class Block:
    heading: str
    number: int  # 1-based, within the README
    commands: list[str]
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.number}-{self.heading.lower().replace(' ', '-')}"

    @property
    def text(self) -> str:
        return "\n".join(self.commands)


def parse_examples(line: str) -> dict[str, list[str]]:
    examples: dict[str, list[str]] = {}
    for part in line.split(":", 1)[1].split(";"):
        words = part.split()
        if not words:
            continue
        assert words[0] in KINDS, f"unknown example kind {words[0]!r} in {line!r}"
        assert len(words) > 1, f"example kind {words[0]!r} without values in {line!r}"
        examples.setdefault(KINDS[words[0]], []).extend(words[1:])
    return examples


def readme_blocks(text: str) -> list[Block]:
    """The ``sh`` blocks: commands with their continuation lines joined, comments left out."""
    blocks: list[Block] = []
    heading = "top"
    fence: str | None = None  # the language of the fenced block we are in
    body: list[str] = []
    for line in text.splitlines():
        if fence is None:
            if line.startswith("```"):
                fence, body = line[3:].strip(), []
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
            continue
        if line.strip() != "```":
            body.append(line)
            continue
        if fence == "sh":
            blocks.append(sh_block(heading, len(blocks) + 1, body))
        fence = None
    assert fence is None, f"a fenced block under {heading!r} is not closed"
    return blocks


def sh_block(heading: str, number: int, body: list[str]) -> Block:
    block = Block(heading, number, [])
    pending = ""
    for index, raw in enumerate(body):
        stripped = raw.strip()
        if index == 0 and stripped.startswith("# examples:"):
            block.examples = parse_examples(stripped)
            continue
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        # bash drops a backslash-newline: the command is kept as the shell reads it.
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        block.commands.append(pending + stripped)
        pending = ""
    assert not pending, f"a command under {heading!r} ends with a backslash"
    return block


BLOCKS = readme_blocks(README.read_text())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def shell_environment(tmp: Path, stream: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FORECOURT_") and k not in ("VIRTUAL_ENV", "PYTHONHOME")
    }
    folders = env.get("PATH", "").split(os.pathsep)
    env["PATH"] = os.pathsep.join(f for f in folders if f and not (Path(f) / "forecourt").exists())
    (tmp / "tmp").mkdir()
    env.update(
        FORECOURT_DATABASE_URL=f"sqlite+aiosqlite:///{tmp / 'default-hq.db'}",
        FORECOURT_EDGE_JOURNAL_PATH=str(tmp / "default-edge.db"),
        FORECOURT_NATS_STREAM=stream,
        FORECOURT_NATS_SUBJECT_PREFIX=stream.lower(),
        TMPDIR=str(tmp / "tmp"),
    )
    return env


def working_directory(tmp: Path) -> Path:
    """The repository, where the README's commands run; without ``.venv`` there (CI installs
    into ``.ci/venv``) a folder of links to it with ``.venv`` linking the running environment,
    which is what the two commands would have left."""
    if (REPO / ".venv" / "bin" / "forecourt").exists():
        return REPO
    mirror = tmp / "repo"
    mirror.mkdir()
    for entry in REPO.iterdir():
        if entry.name != ".venv":
            (mirror / entry.name).symlink_to(entry)
    (mirror / ".venv").symlink_to(Path(sys.prefix))
    return mirror


@dataclass
class Server:
    written: str
    process: subprocess.Popen[bytes]
    log: Path


class Shell:
    """Runs one block's commands in order, carrying the environment and failures along."""

    def __init__(self, block: Block, tmp: Path) -> None:
        self.block = block
        self.tmp = tmp
        self.stream = f"FCREADME_{uuid.uuid4().hex[:8].upper()}"
        self.env = shell_environment(tmp, self.stream)
        self.cwd = working_directory(tmp)
        self.ports: dict[str, int] = {}
        self.databases: dict[str, str] = {}  # example URL -> fresh database name
        self.servers: list[Server] = []
        self.failures: list[str] = []
        self.count = 0
        for url in block.examples.get("database", []):
            self.databases[url] = f"forecourt_readme_{uuid.uuid4().hex[:10]}"

    # --- substitution -------------------------------------------------------------------

    def substitute(self, command: str, *, server: bool) -> tuple[str, list[tuple[str, Path]]]:
        """The command with its marked examples replaced; the (example port, port file) pairs
        of ports this server binds itself."""
        port_files: list[tuple[str, Path]] = []
        for port in self.block.examples.get("port", []):
            option = re.compile(rf"--port[ =]{re.escape(port)}(?![\w.])")
            if server and port not in self.ports and option.search(command):
                path = self.tmp / f"port-{port}-{self.count}"
                port_files.append((port, path))
                command = option.sub(f"--port 0 --port-file {path}", command, count=1)
        for port in self.block.examples.get("port", []):
            number = re.compile(rf"(?<![\w.]){re.escape(port)}(?![\w.])")
            if port in (p for p, _ in port_files) or not number.search(command):
                continue
            if port not in self.ports:
                self.ports[port] = free_port()
            command = number.sub(str(self.ports[port]), command)
        for duration in self.block.examples.get("duration", []):
            option = re.compile(rf"(--duration[ =]){re.escape(duration)}(?![\w.])")
            command = option.sub(rf"\g<1>{SHORT_DURATION}", command)
        for url, name in self.databases.items():
            command = command.replace(url, f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}")
            example_name = url.rsplit("/", 1)[1]
            command = re.sub(rf"(?<![\w.-]){re.escape(example_name)}(?![\w.-])", name, command)
        for path in self.block.examples.get("path", []):
            target = str(self.tmp / "examples" / path.lstrip("/"))
            pattern = rf"(?<![\w./-]){re.escape(path)}(?![\w./-])"
            command = re.sub(pattern, lambda _, target=target: target, command)
        return command, port_files

    # --- running ------------------------------------------------------------------------

    def fail(self, written: str, actual: str, why: str, output: str = "") -> None:
        tail = "\n".join(output.splitlines()[-25:])
        ran = "" if actual == written else f"\n  ran:     {actual}"
        self.failures.append(
            f"- {written}{ran}\n  {why}" + (f"\n  output:\n{tail}" if tail else "")
        )

    def run(self, written: str) -> None:
        self.count += 1
        if written in CHECK_ONLY or written in WITH_ARGUMENTS:
            self.check_script(written)
            if written in CHECK_ONLY:
                return
        server = bool(SERVER.search(written))
        command, port_files = self.substitute(written, server=server)
        if written in WITH_ARGUMENTS:
            command += WITH_ARGUMENTS[written]
        if server:
            self.start_server(written, command, port_files)
        else:
            self.run_command(written, command)

    def check_script(self, written: str) -> None:
        script = written.split()[1]
        if not (self.cwd / script).is_file():
            self.fail(written, written, f"{script} does not exist")
            return
        checked = subprocess.run(
            ["bash", "-n", script], cwd=self.cwd, capture_output=True, text=True, check=False
        )
        if checked.returncode != 0:
            self.fail(written, f"bash -n {script}", "does not parse", checked.stderr)

    def run_command(self, written: str, command: str) -> None:
        env_file = self.tmp / f"env-{self.count}"
        script = f'{command}\n__rc=$?\nenv -0 > "{env_file}"\nexit $__rc\n'
        log = self.tmp / f"command-{self.count}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                ["bash", "-c", script],
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                code = process.wait(timeout=COMMAND_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                self.fail(written, command, f"still running after {COMMAND_S:.0f} s", _read(log))
                return
        output = _read(log)
        if code != 0:
            self.fail(written, command, f"exit status {code}", output)
        elif TRACEBACK in output:
            self.fail(written, command, "printed a traceback", output)
        if env_file.exists():
            entries = env_file.read_bytes().decode(errors="replace").split("\0")
            env = dict(e.split("=", 1) for e in entries if "=" in e)
            for name in ("_", "SHLVL", "OLDPWD"):
                env.pop(name, None)
            self.cwd = Path(env.pop("PWD", str(self.cwd)))
            self.env = env

    def start_server(self, written: str, command: str, port_files: list[tuple[str, Path]]) -> None:
        log = self.tmp / f"server-{self.count}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                ["bash", "-c", command],
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, as a terminal's job
            )
        self.servers.append(Server(written, process, log))
        deadline = time.monotonic() + SERVER_START_S
        listening = False
        while time.monotonic() < deadline:
            listening = any(line in _read(log) for line in READY)
            announced = all(path.exists() for _, path in port_files)
            if listening and announced:
                break
            if process.poll() is not None:
                self.servers.pop()  # nothing left to stop: its failure is this one
                why = f"exited with status {process.returncode} before it served"
                self.fail(written, command, why, _read(log))
                return
            if announced and port_files:
                deadline = min(deadline, time.monotonic() + LISTENING_AFTER_PORT_FILE_S)
            time.sleep(0.05)
        for port, path in port_files:
            if path.exists():
                self.ports[port] = int(path.read_text())
        if not listening:
            announced = all(path.exists() for _, path in port_files)
            why = "printed no 'listening on' (or 'consumers running:') line" + (
                " (its port file appeared)" if announced and port_files else ""
            )
            self.fail(written, command, why, _read(log))

    def stop_servers(self) -> None:
        for server in reversed(self.servers):
            if server.process.poll() is None:
                os.killpg(server.process.pid, signal.SIGINT)
        for server in reversed(self.servers):
            try:
                code = server.process.wait(timeout=SERVER_STOP_S)
            except subprocess.TimeoutExpired:
                os.killpg(server.process.pid, signal.SIGKILL)
                server.process.wait()
                why = f"still running {SERVER_STOP_S:.0f} s after SIGINT"
                self.fail(server.written, server.written, why, _read(server.log))
                continue
            output = _read(server.log)
            if code != 0:
                self.fail(server.written, server.written, f"exit status {code}", output)
            elif TRACEBACK in output:
                self.fail(server.written, server.written, "printed a traceback", output)
        for server in self.servers:
            # Whatever it started (workers, a relay) goes with it.
            try:
                os.killpg(server.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def clean_up(self) -> None:
        if self.databases:
            asyncio.run(_drop_databases(list(self.databases.values())))
        if _port_open(NATS_URL, 4222):
            asyncio.run(_delete_stream(self.stream))


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except OSError:
        return ""


async def _drop_databases(names: list[str]) -> None:
    import asyncpg

    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database="postgres")
    try:
        for name in names:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _delete_stream(name: str) -> None:
    import nats

    try:
        nc = await nats.connect(NATS_URL, connect_timeout=2, allow_reconnect=False)
    except Exception:  # noqa: BLE001 - nothing to clean up without a server
        return
    try:
        await nc.jetstream().delete_stream(name)
    except Exception:  # noqa: BLE001 - the block may not have created it
        pass
    finally:
        await nc.close()


def require_services(block: Block) -> None:
    text = block.text
    if ("createdb" in text or "postgresql://" in text) and not _port_open(
        f"postgresql://{PG_HOST}:{PG_PORT}", PG_PORT
    ):
        service_missing(f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT}")
    if "nats://" in text and not _port_open(NATS_URL, 4222):
        service_missing(f"NATS not reachable at {NATS_URL}")


def test_the_readme_has_its_two_commands_and_blocks_of_commands() -> None:
    commands = [command for block in BLOCKS for command in block.commands]
    assert "bash scripts/demo.sh" in commands
    assert "bash scripts/test.sh" in commands
    assert any(SERVER.search(command) for command in commands)


@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
def test_every_command_of_a_readme_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    # Given the block's marked examples, each of which its commands use
    for kind, values in block.examples.items():
        for value in values:
            assert value in block.text, f"example {kind} {value!r} is in no command of the block"
    require_services(block)
    shell = Shell(block, tmp_path)
    try:
        # When every command runs in order, servers staying up until the last has run
        for command in block.commands:
            shell.run(command)
    finally:
        shell.stop_servers()
        shell.clean_up()
    # Then each exited 0 (servers on SIGINT, after saying "listening on"), with no traceback
    if shell.failures:
        pytest.fail(
            f"README block {block.number} ({block.heading}):\n" + "\n".join(shell.failures),
            pytrace=False,
        )


def test_the_sample_simulator_config_is_station_s001_of_the_sample_chain(tmp_path: Path) -> None:
    """Pumps, nozzles, grade ids (the chain's grade order, as the demo numbers them), rounding,
    resolution and the prices in force now: what the edge's snapshot of S001 says."""
    import json
    from datetime import UTC, datetime

    from forecourt.demo import DemoOptions, simulator_config
    from forecourt.infra.db import Database
    from forecourt.infra.migrate import upgrade
    from forecourt.network.handlers import (
        SAMPLE_CHAIN,
        build_snapshot,
        import_chain,
        load_chain_file,
    )

    sample = json.loads((REPO / "src/forecourt/sim/sample_pts.json").read_text())

    async def expected() -> dict[str, Any]:
        db = Database(f"sqlite+aiosqlite:///{tmp_path / 'hq.db'}")
        await db.connect()
        try:
            await upgrade(db)
            chain = load_chain_file(SAMPLE_CHAIN)
            await import_chain(db, chain)
            grade_ids = {g.code: i + 1 for i, g in enumerate(chain.grades)}
            now = datetime.now(UTC)
            snapshot = await build_snapshot(db, "S001", now)
            return simulator_config(snapshot, now, grade_ids, DemoOptions(), seed=1)
        finally:
            await db.dispose()

    config = asyncio.run(expected())
    for key in ("currency", "volume_decimals", "amount_decimals", "price_decimals", "timezone"):
        assert sample[key] == config[key], key
    assert sample["pumps"] == config["pumps"]
    assert sample["customers"]["truck_grade_ids"] == config["customers"]["truck_grade_ids"]
    # The edge's default controller login, so `forecourt edge` needs no controller settings.
    assert sample["auth"]["username"] == "admin"
    assert sample["auth"]["password"] == "admin"
