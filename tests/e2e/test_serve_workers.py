"""``forecourt serve --workers N --port 0 --port-file``: N worker processes listen on one port
the supervisor chose, and the port file names it once all of them serve."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from forecourt.infra.db import Database
from forecourt.kernel.telemetry import DEFAULT_PREFIX, encode, topic
from forecourt.network.handlers import (
    SAMPLE_CHAIN,
    import_chain,
    issue_credential,
    load_chain_file,
)
from tests.mqtt_broker import HQ_USER, MqttBroker, mqtt_broker  # noqa: F401 (a fixture)
from tests.support import eventually, staff_headers_at, start_workers

pytestmark = pytest.mark.e2e

LISTEN = "0A"  # the TCP state in /proc/net/tcp
PUMP_1 = {"pump": 1, "device": "pts", "state": "idle", "volume_ml": 0}


def listeners_on(port: int) -> int:
    """Sockets listening on ``port`` (IPv4), as the kernel lists them."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    fields = [line.split() for line in lines]
    return sum(int(f[1].split(":")[1], 16) == port and f[3] == LISTEN for f in fields)


async def test_workers_on_port_zero_share_the_port_the_file_names_once_all_serve(
    tmp_path: Path, pg_url: str
) -> None:
    port_file = tmp_path / "hq.port"
    env = {**os.environ, "FORECOURT_DATABASE_URL": pg_url, "FORECOURT_LOG_LEVEL": "WARNING"}
    supervisor, port = await start_workers(tmp_path, env)
    try:
        # Both workers listen on it (the supervisor's own socket only holds the number).
        assert listeners_on(port) == 2
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            answers = [(await client.get("/ready")).status_code for _ in range(4)]
        assert answers == [200] * 4
    finally:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(timeout=30)
    assert not port_file.exists()  # stopped: the port is named no more
    assert listeners_on(port) == 0


async def test_under_workers_one_process_subscribes_to_telemetry_and_every_worker_shows_it(
    tmp_path: Path,
    pg_url: str,
    mqtt_broker: MqttBroker,  # noqa: F811
) -> None:
    # Given HQ as two HTTP workers and a relay process, with a broker for device telemetry
    env = {
        **os.environ,
        "FORECOURT_DATABASE_URL": pg_url,
        "FORECOURT_LOG_LEVEL": "WARNING",
        "FORECOURT_DEVICES_MQTT_URL": mqtt_broker.url,
        "FORECOURT_DEVICES_MQTT_USERNAME": HQ_USER,
        "FORECOURT_DEVICES_MQTT_PASSWORD": mqtt_broker.password(HQ_USER),
    }
    supervisor, port = await start_workers(tmp_path, env)
    db = Database(pg_url)
    try:
        await db.connect()
        await import_chain(db, load_chain_file(SAMPLE_CHAIN))
        staff = await staff_headers_at(pg_url)  # the devices' reads are staff's
        # When station S001 publishes its pump 1, with its own login
        payload = encode("S001", datetime.now(UTC), "boot-1", 1, PUMP_1)
        async with mqtt_broker.client("S001") as station:
            await station.publish(topic(DEFAULT_PREFIX, "S001", "pumps", 1), payload, qos=1)

        # Then whichever worker answers shows it: the relay process subscribed, once
        async def shown(client: httpx.AsyncClient) -> dict[str, Any] | None:
            answer = await client.get("/v1/devices/stations/S001/pumps/1")
            return answer.json() if answer.status_code == 200 else None  # type: ignore[no-any-return]

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=staff) as client:
            found = await eventually(lambda: shown(client), 30, what="pump 1 at HQ")
            assert found["current"]["data"]["state"] == "idle"
            for _ in range(4):  # a new connection each time: any of the workers
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}", headers=staff
                ) as other:
                    assert await shown(other) is not None
        # One subscriber (the HTTP workers run none): the broker saw HQ's client once
        assert mqtt_broker.log_text().count("as forecourt-hq-devices") == 1
    finally:
        await db.dispose()
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(timeout=30)


async def test_under_workers_a_revoked_station_credential_is_refused_by_every_worker_at_once(
    tmp_path: Path, pg_url: str
) -> None:
    # Given HQ as two HTTP workers that cache station credentials for an hour
    env = {
        **os.environ,
        "FORECOURT_DATABASE_URL": pg_url,
        "FORECOURT_LOG_LEVEL": "WARNING",
        "FORECOURT_STATION_CREDENTIAL_CACHE_S": "3600",
    }
    supervisor, port = await start_workers(tmp_path, env)
    db = Database(pg_url)
    try:
        await db.connect()
        await import_chain(db, load_chain_file(SAMPLE_CHAIN))
        _, token = await issue_credential(db, "S001")
        headers = {"Authorization": f"Bearer {token}"}

        async def statuses() -> list[int]:
            """The snapshot asked on eight new connections: both workers answer."""
            found = []
            for _ in range(8):
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                    answer = await client.get("/v1/stations/S001/snapshot", headers=headers)
                    found.append(answer.status_code)
            return found

        async def all_ok() -> bool:
            return await statuses() == [200] * 8

        await eventually(all_ok, 30, what="both workers trusting the credential")
        # When the station's credential is revoked from the command line
        revoked = subprocess.run(
            [sys.executable, "-m", "forecourt.cli", "credential", "revoke", "S001"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert revoked.returncode == 0, revoked.stderr

        # Then every worker refuses it at once, whatever its cache
        async def all_refused() -> bool:
            return await statuses() == [401] * 8

        await eventually(all_refused, 10, what="every worker refusing the revoked credential")
    finally:
        await db.dispose()
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(timeout=30)
