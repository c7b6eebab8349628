"""The demo's stations mix device protocols: pumps 1-4 behind a PTS-2 (jsonPTS), 5-8 on a
Wayne DART line, the tanks on a Veeder-Root TLS gauge, each simulator a process of its own.
The dispensers (the PTS-2's memory and the DART line's record), the edge journals and HQ still
agree exactly, per protocol too; ``protocols=("jsonpts",)`` is one PTS-2 per station as before;
an interrupted mixed demo leaves no simulator behind."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from forecourt.demo import (
    DemoChain,
    DemoOptions,
    describe_layout,
    describe_live,
    describe_station,
    live_devices,
    parse_protocols,
    plan_layout,
    report,
)
from forecourt.kernel.errors import ForecourtError
from forecourt.sales.store import sale_t
from tests.cli.support import CLI, Running, clean_env, processes_mentioning
from tests.support import staff_headers

pytestmark = pytest.mark.e2e


def test_the_pump_protocols_share_a_station_in_order_and_the_gauge_is_separate() -> None:
    layout = plan_layout(range(1, 9), ("jsonpts", "dart", "tls"))
    assert layout.pumps == {"jsonpts": (1, 2, 3, 4), "dart": (5, 6, 7, 8)}
    assert layout.gauge is True
    assert layout.protocol_of(5) == "dart"
    assert plan_layout([1, 2, 3], ("dart", "jsonpts")).pumps == {"jsonpts": (1, 2), "dart": (3,)}
    only_pts = plan_layout(range(1, 9), ("jsonpts",))
    assert only_pts.one_controller
    assert only_pts.pumps == {"jsonpts": tuple(range(1, 9))}


def test_the_report_tells_each_station_its_layout_sales_per_protocol_and_tanks() -> None:
    layout = plan_layout(range(1, 9), ("jsonpts", "dart", "tls"))
    assert describe_layout(layout) == "pumps 1-4 jsonPTS, pumps 5-8 DART, tanks on a TLS gauge"
    result = {
        "sales_per_protocol": {"S001": {"jsonpts": 12, "dart": 9}},
        "tanks": [
            {"station": "S001", "tank": 1, "grade": "92", "volume_ml": 22_500_000},
            {"station": "S001", "tank": 2, "grade": "95", "volume_ml": None},
            {"station": "S002", "tank": 1, "grade": "92", "volume_ml": 1_000},
        ],
    }
    assert describe_station(result, "S001") == (
        "S001: 12 jsonPTS + 9 DART sales; 2 tanks read (T1 92# 22,500 L)"
    )


def test_the_report_tells_each_station_its_live_device_state() -> None:
    result = {
        "live": {
            "S001": {
                "pumps": {"1": "idle", "2": "idle", "3": "fuelling"},
                "lines": {"forecourt": "online", "dart": "degraded"},
                "gauges": {"tanks": "online"},
                "alarms": ["totalizer_gap_fp3_n1"],
            },
            "S002": {"pumps": {}, "lines": {}, "gauges": {}, "alarms": []},
        }
    }
    assert describe_live(result, "S001") == (
        "S001 live: pumps 1 fuelling, 2 idle; lines forecourt online, dart degraded; "
        "gauge tanks online; alarms totalizer_gap_fp3_n1"
    )
    assert describe_live(result, "S002") == "S002 live: pumps none; no alarms"
    assert describe_live(result, "S003") == "S003 live: not known"


@pytest.mark.parametrize("text", ["tls", "jsonpts,ifsf", ""])
def test_protocols_without_a_pump_protocol_or_unknown_ones_are_refused(text: str) -> None:
    with pytest.raises(ForecourtError) as refused:
        parse_protocols(text)
    assert refused.value.code == "demo.protocols_invalid"


async def test_a_mixed_demo_reconciles_exactly_with_both_pump_protocols_selling_everywhere(
    tmp_path: Path,
) -> None:
    demo = DemoChain(
        DemoOptions(duration_s=10, stations=2, workdir=tmp_path, arrivals_per_hour=300)
    )
    try:
        # Given two stations, each with a PTS-2, a DART line and a tank gauge in processes
        await demo.start()
        for st in demo.stations:
            assert st.simulator is not None
            assert st.dart is not None
            assert st.gauge is not None
            processes = (st.simulator.process, st.dart.process.process, st.gauge.process)
            assert all(p is not None and p.poll() is None for p in processes)
            assert [line.name for line in st.edge.lines] == ["pts", "dart"]
            assert st.edge.lines[1].controller.pumps() == [5, 6, 7, 8]

        # When customers are served, and then the forecourts are quiesced
        await demo.run_traffic()
        assert await demo.quiesce()
        result = report(await demo.reconcile(), len(demo.stations), True, 0.0)

        # Then the three stores agree exactly, in total and per protocol
        lost = result["lost_sales"]
        assert (result["lost"], result["duplicates"], result["quarantined"]) == (0, 0, 0), lost
        assert result["sales_at_dispensers"] == result["sales_at_edges"] == result["sales_at_hq"]
        assert result["volume_ml_at_dispensers"] == result["volume_ml_at_edges"]
        assert result["volume_ml_at_edges"] == result["volume_ml_at_hq"]
        assert result["amount_fen_at_dispensers"] == result["amount_fen_at_edges"]
        assert result["amount_fen_at_edges"] == result["amount_fen_at_hq"]
        assert result["agree"] is True
        for row in result["per_station_protocol"]:
            assert row["dispensers"] == row["edges"] == row["hq"], row
        # ...both pump protocols sold at every station, the DART share being the line's record
        codes = [st.code for st in demo.stations]
        assert sorted(result["sales_per_protocol"]) == codes
        sold_at = {code: result["sales_per_protocol"][code]["dart"] for code in codes}
        for st in demo.stations:
            sold = result["sales_per_protocol"][st.code]
            assert sold["jsonpts"] > 0, sold
            assert sold["dart"] > 0, sold
            assert st.dart is not None
            assert sold["dart"] == len(st.dart.fillings())
        # ...and every station's four tanks were read by its gauge
        assert result["tanks_read"] == dict.fromkeys(codes, 4)
        # ...and each edge tells its devices' live state: every pump's (the DART line's
        # customers keep calling), each line and gauge online
        for st in demo.stations:
            live = live_devices(st.edge)
            assert sorted(live["pumps"], key=int) == [str(n) for n in range(1, 9)], live
            assert set(live["pumps"].values()) <= {"idle", "calling", "authorised"}, live
            assert live["lines"] == {"pts": "online", "dart": "online"}, live
            assert list(live["gauges"].values()) == ["online"], live
            assert not [a for a in live["alarms"] if a.startswith("totalizer_")], live
        for reading in result["tanks"]:
            assert reading["volume_ml"] is not None, reading
            assert reading["volume_ml"] > 0, reading
            assert reading["grade"] in {"92", "95", "98", "0"}

        # The scheduled price rise reached the DART pumps: their 92# sales ran at the old and
        # at the new price, each under the price version it was authorised at.
        rise = demo.price_change
        assert rise is not None
        prices: dict[int, set[str]] = {}
        assert demo.hq is not None
        staff = await staff_headers(demo.hq.identity)
        async with httpx.AsyncClient(base_url=demo.hq_url, headers=staff) as hq:
            for st in demo.stations:
                params = {"station": st.code, "grade": "92", "limit": 5000}
                for sale in (await hq.get("/v1/sales", params=params)).json()["items"]:
                    if st.layout.protocol_of(sale["fuelling_point"]) == "dart":
                        prices.setdefault(sale["unit_price_mmu"], set()).add(sale["price_version"])
        assert rise.milli_minor_per_litre in prices, prices
        assert prices[rise.milli_minor_per_litre] == {rise.price_id}
        assert len(prices) == 2, prices

        # Given HQ loses one DART sale, the reconciliation names the filling from the record
        first = demo.stations[0]
        assert demo.hq is not None
        async with demo.hq.db.begin() as uow:
            dart_sales = sa.select(sale_t).where(
                sale_t.c.station_code == first.code,
                sale_t.c.fuelling_point.in_(first.layout.pumps["dart"]),
            )
            victim = (await uow.conn.execute(dart_sales.limit(1))).one()
            await uow.conn.execute(sa.delete(sale_t).where(sale_t.c.sale_id == victim.sale_id))
        result = report(await demo.reconcile(), len(demo.stations), True, 0.0)
        assert result["lost"] == 1
        (lost,) = result["lost_sales"]
        assert lost["protocol"] == "dart"
        assert (lost["station"], lost["fuelling_point"], lost["nozzle"]) == (
            victim.station_code,
            victim.fuelling_point,
            victim.nozzle,
        )
        assert (lost["volume_ml"], lost["amount_minor"]) == (victim.volume_ml, victim.amount_minor)
        assert lost["totalizer_end_ml"] == victim.totalizer_end_ml
        assert result["sales_per_protocol"][first.code]["dart"] == sold_at[first.code]
        assert result["agree"] is False
    finally:
        await demo.stop()
    for st in demo.stations:
        assert st.dart is not None
        assert st.dart.process.process is None


async def test_the_all_jsonpts_option_gives_one_pts2_controller_per_station(
    tmp_path: Path,
) -> None:
    demo = DemoChain(
        DemoOptions(duration_s=4, stations=1, workdir=tmp_path, protocols=("jsonpts",))
    )
    try:
        await demo.start()
        (st,) = demo.stations
        assert st.simulator is not None
        assert (st.dart, st.gauge) == (None, None)
        assert [line.config for line in st.edge.lines] == [None]
        assert st.edge.gauges == []
        await demo.run_traffic()
        assert await demo.quiesce()
        result = report(await demo.reconcile(), len(demo.stations), True, 0.0)
        assert result["agree"] is True
        assert result["sales_at_dispensers"] > 0
        assert result["sales_per_protocol"] == {st.code: {"jsonpts": result["sales_at_hq"]}}
        assert result["tanks_read"] == {st.code: 0}
    finally:
        await demo.stop()


def simulators_of(tmp: Path) -> dict[str, list[int]]:
    """The demo's simulator processes by kind (each names a file in the demo's folder)."""
    found: dict[str, list[int]] = {}
    for pid in processes_mentioning(str(tmp)):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [w.decode(errors="replace") for w in command]
        if "forecourt.sim.pts_controller" in words:
            found.setdefault("pts", []).append(pid)
        elif "simulate" in words:
            found.setdefault(words[words.index("simulate") + 1], []).append(pid)
    return found


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_an_interrupted_mixed_demo_leaves_no_simulator_process(
    tmp_path: Path, sig: signal.Signals
) -> None:
    tmp = tmp_path / "tmp"  # the demo's temporary folder goes here
    tmp.mkdir()
    demo = Running(
        [*CLI, "demo", "--stations", "2", "--duration", "60"],
        tmp_path,
        clean_env(TMPDIR=str(tmp)),
        "demo",
    )
    try:
        demo.wait_for(lambda t: "t=" in t, 30, "traffic")
        running = simulators_of(tmp)
        started = time.monotonic()
        code = demo.stop(sig, timeout=20.0)
    finally:
        demo.kill()
    assert {kind: len(pids) for kind, pids in running.items()} == {"pts": 2, "dart": 2, "tls": 2}
    assert code == 128 + sig, demo.stderr()
    assert time.monotonic() - started < 20.0
    assert "demo interrupted" in demo.stderr()
    assert "Traceback" not in demo.stderr()
    assert processes_mentioning(str(tmp)) == []
    assert list(tmp.iterdir()) == []
