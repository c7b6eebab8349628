"""A private Mosquitto broker for tests: a unix socket, users with passwords, per-station ACL.

Nothing listens on a TCP port: the broker's only listener is a unix socket in a fresh
directory, so no test picks a port and no other process shares the broker. Anonymous clients
are refused; every user has a password; the ACL lets a station user read and write only under
its own station (``{prefix}/stations/<username>/#``, Mosquitto's ``%u``) and the ``hq`` user
read every station. By default the broker runs without persistence: a restart forgets retained
messages and sessions (the edge publishes its last states again when it reconnects); with
``persistence=True`` a clean stop saves them and a start loads them, as a production broker
does.

Use the ``mqtt_broker`` fixture (import it into a test module or a conftest)::

    from tests.mqtt_broker import HQ_USER, MqttBroker, mqtt_broker  # noqa: F401 (fixture)

    async def test_something(mqtt_broker: MqttBroker) -> None:
        url = mqtt_broker.url                      # "unix:///tmp/mqtt-…/mqtt.sock"
        password = mqtt_broker.password("S001")    # station users: STATIONS, and hq
        async with mqtt_broker.client(HQ_USER) as hq:   # an aiomqtt.Client, connected
            await hq.subscribe("forecourt/v1/stations/+/#", qos=1)
        mqtt_broker.stop()      # the broker goes away (SIGTERM); .kill() for SIGKILL
        mqtt_broker.start()     # back on the same socket, ready when this returns

``persistent_mqtt_broker`` is the same broker with persistence; :func:`running_broker` (a
context manager) gives one with other users or another prefix. The process
is always killed at the end, whatever the test did.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import aiomqtt
import pytest

from forecourt.kernel.telemetry import DEFAULT_PREFIX

HQ_USER = "hq"
STATIONS = ("S001", "S002", "S003")
READY_TIMEOUT_S = 10.0
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin


def mosquitto_binary() -> str | None:
    """The ``mosquitto`` executable (on PATH or in /usr/sbin), or None."""
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


class MqttBroker:
    """One private Mosquitto process on a unix socket; see the module docstring.

    ``start()`` and ``stop()`` may be called any number of times; the socket path, users and
    ACL stay the same across restarts. ``close()`` stops the broker and removes its directory.
    """

    def __init__(
        self,
        users: Iterable[str] = STATIONS,
        *,
        prefix: str = DEFAULT_PREFIX,
        hq_user: str = HQ_USER,
        persistence: bool = False,
    ) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self.binary = binary
        self.prefix = prefix
        self.hq_user = hq_user
        self.persistence = persistence
        # A short directory of its own: a unix socket path must fit in 108 bytes, and a
        # pytest tmp_path named after a long test may not.
        self.directory = Path(tempfile.mkdtemp(prefix="mqtt-"))
        self.socket_path = self.directory / "mqtt.sock"
        if len(str(self.socket_path)) > _SOCKET_PATH_MAX:
            raise RuntimeError(f"socket path {self.socket_path} is too long for a unix socket")
        self.log_path = self.directory / "mosquitto.log"
        self._passwords = {name: secrets.token_urlsafe(18) for name in (*users, hq_user)}
        self._process: subprocess.Popen[bytes] | None = None
        self._write_config()

    # --- what a test needs -------------------------------------------------------------

    @property
    def url(self) -> str:
        """The broker's address as the edge's ``mqtt_url`` setting takes it."""
        return f"unix://{self.socket_path}"

    @property
    def users(self) -> tuple[str, ...]:
        return tuple(self._passwords)

    def password(self, user: str) -> str:
        return self._passwords[user]

    def client(
        self,
        user: str = HQ_USER,
        *,
        password: str | None = None,
        identifier: str | None = None,
        will: aiomqtt.Will | None = None,
        clean_session: bool | None = None,
    ) -> aiomqtt.Client:
        """An aiomqtt client for ``user`` on this broker (enter it with ``async with``);
        ``password`` overrides the user's own (to try a wrong one). With an ``identifier``
        and ``clean_session=False`` its subscriptions and the QoS 1 messages for them outlive
        a disconnection (and, with ``persistence``, a broker restart)."""
        return aiomqtt.Client(
            str(self.socket_path),
            1883,  # paho wants a valid port even for a unix socket, and ignores it
            username=user,
            password=self._passwords.get(user, "") if password is None else password,
            identifier=identifier,
            transport="unix",
            will=will,
            clean_session=clean_session,
            timeout=5,
        )

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Start the broker and return once its socket accepts connections (or raise, with
        the broker's log, after ``timeout`` seconds)."""
        if self.running:
            return
        # A broker killed with SIGKILL leaves its socket file behind, and bind() fails on it.
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [self.binary, "-c", str(self.directory / "mosquitto.conf")],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while not self._accepts():
            if self._process.poll() is not None:
                raise RuntimeError(f"mosquitto exited at start:\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mosquitto not ready after {timeout} s:\n{self.log_text()}")
            time.sleep(0.005)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after ``timeout``) and wait for it to end."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """End the broker at once (SIGKILL): it says nothing to its clients."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def restart(self, timeout: float = READY_TIMEOUT_S) -> None:
        self.stop()
        self.start(timeout)

    def close(self) -> None:
        """Kill the broker if it runs and remove its directory."""
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)

    # --- internals ---------------------------------------------------------------------

    def _accepts(self) -> bool:
        if not self.socket_path.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.socket_path))
            except OSError:
                return False
        return True

    def _write_config(self) -> None:
        passwords = self.directory / "passwords"
        passwords.write_text("".join(f"{u}:{p}\n" for u, p in self._passwords.items()))
        passwords.chmod(0o600)
        # -U hashes the plain-text file in place.
        subprocess.run(
            [shutil.which("mosquitto_passwd") or "mosquitto_passwd", "-U", str(passwords)],
            check=True,
            capture_output=True,
        )
        acl = self.directory / "acl"
        acl.write_text(
            f"user {self.hq_user}\n"
            f"topic read {self.prefix}/stations/#\n"
            "\n"
            f"pattern readwrite {self.prefix}/stations/%u/#\n"
        )
        acl.chmod(0o600)
        lines = [
            f"listener 0 {self.socket_path}",
            "allow_anonymous false",
            f"password_file {passwords}",
            f"acl_file {acl}",
            *(
                ("persistence true", f"persistence_location {self.directory}/")
                if self.persistence
                else ("persistence false",)
            ),
            "log_dest stderr",
            *(f"log_type {kind}" for kind in ("error", "warning", "notice", "information")),
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            # Started as root, Mosquitto drops to the "mosquitto" user, who cannot read these
            # 0600 files: it stays who started it.
            lines.insert(0, "user root")
        (self.directory / "mosquitto.conf").write_text("\n".join(lines) + "\n")


@contextlib.contextmanager
def running_broker(
    users: Iterable[str] = STATIONS, *, prefix: str = DEFAULT_PREFIX, persistence: bool = False
) -> Iterator[MqttBroker]:
    """A started :class:`MqttBroker`, killed and removed on exit."""
    broker = MqttBroker(users, prefix=prefix, persistence=persistence)
    try:
        broker.start()
        yield broker
    finally:
        broker.close()


def _require_mosquitto() -> None:
    if mosquitto_binary() is None:
        from tests.conftest import service_missing

        service_missing("mosquitto is not installed")


@pytest.fixture
def mqtt_broker() -> Iterator[MqttBroker]:
    """A private, running Mosquitto with users :data:`STATIONS` and ``hq`` (see module doc),
    without persistence; skipped (failed under ``FORECOURT_REQUIRE_SERVICES=1``) when
    mosquitto is not installed."""
    _require_mosquitto()
    with running_broker() as broker:
        yield broker


@pytest.fixture
def persistent_mqtt_broker() -> Iterator[MqttBroker]:
    """The same with persistence: a ``stop()`` (not a ``kill()``) keeps retained messages and
    persistent sessions across the restart."""
    _require_mosquitto()
    with running_broker(persistence=True) as broker:
        yield broker
