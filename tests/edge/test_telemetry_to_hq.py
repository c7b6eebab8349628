"""End to end: a station's edge (a simulated PTS-2 process selling, a TLS gauge) publishes its
pumps, tanks and device lines over a real Mosquitto (its own station login, the broker's
ACL) to HQ's devices context, whose API shows them live, and keeps doing so across the
broker's restart; the edge's sales never wait for the broker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from forecourt.bootstrap import HeadOffice, build_head_office
from forecourt.edge import node as node_module
from forecourt.network.handlers import SAMPLE_CHAIN, import_chain, load_chain_file
from forecourt.protocols.tls.simulator import serve
from forecourt.settings import Settings
from tests.edge.conftest import Station
from tests.edge.test_gauges_at_edge import gauge_config, gauge_line, pump_line, running
from tests.mqtt_broker import (
    HQ_USER,
    MqttBroker,
    persistent_mqtt_broker,  # noqa: F401 (a fixture)
)
from tests.support import eventually, staff_headers

STATION = "S001"


@pytest.fixture
async def devices_hq(
    persistent_mqtt_broker: MqttBroker,  # noqa: F811
    tmp_path: Path,
) -> AsyncIterator[HeadOffice]:
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'devices-hq.db'}",
        log_json=False,
        devices_mqtt_url=persistent_mqtt_broker.url,
        devices_mqtt_username=HQ_USER,
        devices_mqtt_password=SecretStr(persistent_mqtt_broker.password(HQ_USER)),
        devices_mqtt_client_id=f"hq-{uuid.uuid4().hex[:8]}",
        devices_stale_after_s=30.0,
    )
    office = build_head_office(settings)
    await office.start(relay=False, telemetry=True)
    await import_chain(office.db, load_chain_file(SAMPLE_CHAIN))
    try:
        yield office
    finally:
        await office.stop()


async def test_hq_shows_live_pump_and_tank_state_from_telemetry_across_a_broker_restart(
    station: Station,
    persistent_mqtt_broker: MqttBroker,  # noqa: F811
    devices_hq: HeadOffice,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The node's periodic sweep of its computed alarms, out of the way: an alarm a device
    # line raises or clears must reach HQ by itself.
    monkeypatch.setattr(node_module, "ALARM_SWEEP_S", 3600.0)
    broker = persistent_mqtt_broker
    async with await serve("127.0.0.1", 0, gauge_config()) as gauge:
        # Given an edge with a jsonPTS pump line and a TLS gauge, publishing to the broker
        # with its own station login, and HQ's devices context subscribed
        node = station.node(
            devices=[pump_line(station), gauge_line(gauge)],
            gauge_interval_s=0.1,
            mqtt_url=broker.url,
            mqtt_username=STATION,
            mqtt_password=broker.password(STATION),
            telemetry_tank_heartbeat_s=1.0,
        )
        transport = httpx.ASGITransport(app=devices_hq.app)
        async with (
            running(node) as edge,
            httpx.AsyncClient(
                transport=transport,
                base_url="http://hq",
                headers=await staff_headers(devices_hq.identity),
            ) as hq,
        ):

            async def at_hq() -> dict[str, Any] | None:
                response = await hq.get(f"/v1/devices/stations/{STATION}")
                if response.status_code != 200:
                    return None
                body: dict[str, Any] = response.json()
                return body

            async def everything_shown() -> dict[str, Any] | None:
                body = await at_hq()
                if body is None or body["stale"]:
                    return None
                if len(body["pumps"]) < 8 or len(body["tanks"]) < 4:
                    return None
                return body

            # When the station runs
            shown = await eventually(everything_shown, 30, what="every pump and tank at HQ")
            # Then HQ shows every pump's state, every tank's inventory and the device lines
            pumps = {int(p["key"]): p["current"]["data"] for p in shown["pumps"]}
            assert sorted(pumps) == list(range(1, 9))
            assert all(p["state"] for p in pumps.values())
            tanks = {int(t["key"]): t["current"]["data"] for t in shown["tanks"]}
            assert tanks[1]["volume_ml"] == 21_000_500
            assert {d["key"] for d in shown["devices"]} >= {"forecourt", "tanks"}
            assert (await edge.get("/v1/status")).json()["telemetry"]["connected"] is True

            # When the pump line raises an alarm, raises it again, then clears it
            async def hq_alarm(active: bool) -> bool:
                response = await hq.get(f"/v1/devices/stations/{STATION}/alarms")
                recent = response.json()["recent"] if response.status_code == 200 else []
                return any(a["name"] == "probe" and a["active"] is active for a in recent)

            board = node.controllers[0].alarms
            board.raise_("probe", "a condition on the pump line", pump=1)
            # Then HQ shows it raised, once, and then cleared
            await eventually(lambda: hq_alarm(True), 30, what="the raised alarm at HQ")
            board.raise_("probe", "a condition on the pump line", pump=1)
            board.clear("probe")
            await eventually(lambda: hq_alarm(False), 30, what="the cleared alarm at HQ")
            recent = (await hq.get(f"/v1/devices/stations/{STATION}/alarms")).json()["recent"]
            assert [a["active"] for a in recent if a["name"] == "probe"] == [False, True]

            # When the broker restarts, and meanwhile tank 1 is drawn down by 500 L
            journaled_before = sum(c.stats.journaled for c in node.controllers)
            await asyncio.to_thread(broker.stop)
            gauge.simulator.model.tank(1).volume -= 500.0
            await asyncio.to_thread(broker.start)

            # Then HQ shows the new inventory once the edge has reconnected
            async def drawn_down() -> bool:
                response = await hq.get(f"/v1/devices/stations/{STATION}/tanks/1")
                if response.status_code != 200:
                    return False
                return response.json()["current"]["data"]["volume_ml"] == 20_500_500  # type: ignore[no-any-return]

            await eventually(drawn_down, 30, what="the new inventory at HQ")
            # And the station kept selling and is shown live
            await eventually(
                lambda: sum(c.stats.journaled for c in node.controllers) > journaled_before,
                30,
                what="sales after the restart",
            )
            body = await at_hq()
            assert body is not None
            assert body["stale"] is False
            status = (await edge.get("/v1/status")).json()["telemetry"]
            assert status["connects"] >= 2
