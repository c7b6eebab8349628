"""An edge node against a real simulated controller process and a real HQ over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import httpx

from forecourt.edge.node import EdgeNode
from forecourt.protocols.jsonpts.driver import JsonPtsDriver
from tests.edge.conftest import READER_HEADERS, HqServer, Station
from tests.support import eventually


async def hq_count(hq: HqServer) -> int:
    async with httpx.AsyncClient(base_url=hq.url, headers=await hq.staff_headers()) as client:
        summary = (await client.get("/v1/sales/summary", params={"station": "S001"})).json()
    return sum(g["sales"] for g in summary["groups"])


async def device_transactions(station: Station, node: EdgeNode) -> set[tuple[int, int]]:
    snap = node.snapshots.current
    assert snap is not None
    driver = JsonPtsDriver(
        station.sim.base_url, "admin", "demo-controller", timezone=snap.station.timezone
    )
    await driver.open()
    try:
        out: set[tuple[int, int]] = set()
        start = station.clock.sim_epoch
        for fp in snap.fuelling_points:
            for t in await driver.transactions(fp.number, start, station.clock.now()):
                out.add((t.pump, t.transaction))
        return out
    finally:
        await driver.close()


async def stop_customers_and_settle(station: Station) -> None:
    """No new customers; wait until nobody is left on the forecourt and every pump is idle
    (every sale closed): with arrivals off that stays so."""
    async with httpx.AsyncClient() as client:
        await client.post(f"{station.sim.base_url}/sim/control", json={"arrivals": False})

        async def forecourt_quiet() -> bool:
            health = (await client.get(f"{station.sim.base_url}/sim/health")).json()
            pumps_idle = all(p == "idle" for p in health["pumps"].values())
            return pumps_idle and health["customers"] == 0

        await eventually(forecourt_quiet, 30, interval=0.05, what="the forecourt to go quiet")


async def test_the_station_keeps_selling_while_hq_is_down_and_catches_up_exactly_once(
    station: Station, hq: HqServer
) -> None:
    node = station.node()
    await node.start()
    try:
        await eventually(lambda: node.controller.stats.journaled >= 3)
        await hq.down()
        before = node.controller.stats.journaled
        await eventually(lambda: node.controller.stats.journaled >= before + 5)
        pending, _, _ = await node.journal.outbox_usage()
        assert pending > 0  # sales piled up locally while HQ was away
        assert node.sync.stats.failures > 0
        await hq.up()
        await stop_customers_and_settle(station)
        assert await node.drain(20)
        journaled, top = await node.journal.sequence_check()
        assert journaled == top  # gap-free
        assert await hq_count(hq) == journaled
        assert len(await device_transactions(station, node)) == journaled
    finally:
        await node.stop()


async def test_the_stations_audit_records_reach_hqs_trail_once_after_hq_was_down(
    station: Station, hq: HqServer
) -> None:
    """Pump commands audited at the edge while HQ is away wait there, alarmed in the status,
    and join HQ's chain exactly once when it answers again."""
    from forecourt.audit.handlers import chain_waiting, verify

    node = station.node()
    await node.start()
    try:
        await hq.down()
        for pump in (1, 2, 3):
            await node.journal.record_audit(
                actor="till1", action="pump.stop", target=f"fp:{pump}", details={"n": pump}
            )
        await eventually(lambda: node.sync.audit_stats.failures > 0, 10, what="a failed upload")
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=node.app), base_url="http://edge"
        ) as edge:
            status = (await edge.get("/v1/status", headers=READER_HEADERS)).json()
        assert status["audit_uploads"]["pending"] >= 3
        assert status["audit_uploads"]["alarm"] == "HQ unreachable"
        assert "audit_upload" in {a["name"] for a in status["alarms"]}
        await hq.up()
        node.sync._audit_not_before = 0.0  # skip the rest of the back-off
        assert await node.drain(20)
        assert node.sync.audit_stats.alarm is None
        assert "audit_upload" not in {a["name"] for a in node.alarms()}
    finally:
        await node.stop()
    await chain_waiting(hq.office.db)
    async with httpx.AsyncClient(base_url=hq.url, headers=await hq.staff_headers()) as client:
        page = (
            await client.get("/v1/audit/records", params={"actor": "station:S001/till1"})
        ).json()
    assert sorted(r["target"] for r in page["items"]) == ["fp:1", "fp:2", "fp:3"]
    assert (await verify(hq.office.db)).ok


async def test_an_edge_starts_from_its_persisted_snapshot_when_hq_is_unreachable(
    station: Station, hq: HqServer
) -> None:
    first = station.node()
    await first.start()
    assert first.snapshots.source == "hq"
    await first.stop()
    await hq.down()
    second = station.node()
    await second.start()
    try:
        assert second.snapshots.source == "journal"
        assert second.snapshots.current is not None
        await eventually(lambda: second.controller.stats.journaled >= 3)
        transport = httpx.ASGITransport(app=second.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://edge", headers=READER_HEADERS
        ) as edge_api:
            assert (await edge_api.get("/health")).status_code == 200
            assert (await edge_api.get("/ready")).json()["checks"]["snapshot"] is True
            status = (await edge_api.get("/v1/status")).json()
            assert status["snapshot_source"] == "journal"
            assert status["outbox"]["pending"] >= 1  # HQ is down: sales wait locally
            assert "forecourt_edge_journaled" in (await edge_api.get("/metrics")).text
    finally:
        await second.stop()


async def test_a_transaction_journaled_but_not_closed_is_not_journaled_again_after_restart(
    station: Station, hq: HqServer
) -> None:
    # The first life journals sales but never closes them at the device (as if it died
    # right after the journal commit).
    first = station.node(auto_settle=False)
    await first.start()
    await eventually(lambda: first.controller.stats.journaled >= 2)
    await first.stop()
    first_life = _journal_rows(station.journal)
    second = station.node()
    await second.start()
    try:
        # The held sales of the first life are closed, under the sale ids they already have.
        await eventually(lambda: second.controller.stats.closed >= len(first_life))
        await stop_customers_and_settle(station)
        assert await second.drain(20)
        journaled, top = await second.journal.sequence_check()
        assert journaled == top
        device = await device_transactions(station, second)
        rows = _journal_rows(station.journal)
        assert {(fp, txn) for fp, txn, _, _ in rows.values()} == device  # each one once
        assert len(device) == journaled
        # The first life's sales keep their seq and sale id, and are closed now.
        assert {seq: rows[seq][:3] for seq in first_life} == {
            seq: row[:3] for seq, row in first_life.items()
        }
        assert all(rows[seq][3] for seq in first_life)
        assert await hq_count(hq) == journaled
    finally:
        await second.stop()


def _journal_rows(path: Path) -> dict[int, tuple[int, int, str, bool]]:
    """seq -> (fuelling point, device transaction, sale id, settled) of every journaled sale."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = conn.execute(
            "SELECT seq, fuelling_point, device_txn, sale_id, settled_at IS NOT NULL FROM journal"
        ).fetchall()
    return {seq: (fp, txn, sale_id, bool(settled)) for seq, fp, txn, sale_id, settled in rows}


async def test_the_edge_starts_and_serves_while_its_controller_is_down(
    station: Station, hq: HqServer
) -> None:
    """The controller is away when the edge starts: the edge serves its API, shows every pump
    offline with an alarm, and sells as soon as the controller answers."""
    url = station.sim.base_url
    station.sim.stop()
    node = station.node()
    await node.start()  # must not wait for, or fail on, the forecourt
    try:
        await eventually(lambda: node.controller.stats.driver_errors >= 1)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(node.app), base_url="http://edge", headers=READER_HEADERS
        ) as edge_api:
            status = (await edge_api.get("/v1/status")).json()
        assert status["fuelling_points"]
        assert set(status["fuelling_points"].values()) == {"offline"}
        assert "controller_unreachable" in {a["name"] for a in status["alarms"]}
        assert status["device"]["reachable"] is False
        port = int(url.rsplit(":", 1)[1])
        await asyncio.to_thread(station.sim.start, port=port)  # back on its address
        await eventually(lambda: node.controller.stats.journaled >= 1, timeout=30)
        assert node.controller.reachable
        assert "controller_unreachable" not in {a["name"] for a in node.alarms()}
    finally:
        await node.stop()
