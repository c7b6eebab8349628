"""The totalizer watch: a nozzle's meter that moves on with no sale journaled (injected by the
simulated PTS-2 as meter creep) raises an alarm with the evidence, confirmed by a second read
and reported once; a meter read while a sale is on its way never alarms."""

from __future__ import annotations

import json
from pathlib import Path

import sqlalchemy as sa

from forecourt.edge.journal import audit_t
from forecourt.edge.totalizers import TotalizerWatch
from tests.edge.forecourt_rig import Rig


def watch_of(rig: Rig, **options: float) -> TotalizerWatch:
    return TotalizerWatch(rig.controller, monotonic=lambda: rig.monotonic, **options)


async def check(rig: Rig, watch: TotalizerWatch, *, after_s: float = 0.0) -> None:
    rig.monotonic += after_s
    await watch.check_once()


def gap_alarms(rig: Rig) -> list[dict]:
    """The watch's alarms (the controller's own sale-to-sale alarm is ``totalizer_gap``)."""
    return [
        a
        for a in rig.controller.alarms.as_json()
        if a["name"].startswith(("totalizer_gap_fp", "totalizer_backwards_fp"))
    ]


async def audited(rig: Rig, action: str) -> list[dict]:
    with rig.journal.engine.connect() as conn:
        rows = conn.execute(sa.select(audit_t).where(audit_t.c.action == action)).fetchall()
    return [json.loads(r.details) for r in rows]


async def test_a_meter_moved_with_no_sale_raises_the_alarm_with_its_evidence_once(
    tmp_path: Path,
) -> None:
    # Given a station that sold 20 L on pump 1 nozzle 1, its meter read after the sale
    async with Rig(tmp_path) as rig:
        await rig.sell(litres=20)
        (sale,) = await rig.journaled()
        assert (sale["fuelling_point"], sale["nozzle"]) == (1, 1)
        watch = watch_of(rig, confirm_after_s=1.0)
        watch.request()
        await rig.poll(2)
        await check(rig, watch)
        assert watch.meter[(1, 1)] == sale["totalizer_end_ml"]
        assert gap_alarms(rig) == []
        # When 0.5 L leave through that nozzle with no transaction (meter creep)
        rig.station.creep([(1, 1, 500)])
        watch.request()
        await check(rig, watch)
        # Then a first read only suspects it, and so does another at once; a read a second
        # later raises the alarm
        assert gap_alarms(rig) == []
        await check(rig, watch, after_s=0.5)
        assert gap_alarms(rig) == []
        await check(rig, watch, after_s=1.0)
        (alarm,) = gap_alarms(rig)
        assert alarm["name"] == "totalizer_gap_fp1_n1"
        evidence = alarm["details"]
        assert evidence["expected_ml"] == sale["totalizer_end_ml"]
        assert evidence["meter_ml"] == sale["totalizer_end_ml"] + 500
        assert evidence["unaccounted_ml"] == 500
        assert evidence["last_sale_id"] == sale["sale_id"]
        # And it is in the audit trail
        assert [e["unaccounted_ml"] for e in await audited(rig, "meter.totalizer_gap")] == [500]
        # And later reads of the same meter do not report it again
        for _ in range(3):
            watch.request()
            await check(rig, watch, after_s=2.0)
        assert watch.stats.gaps == 1
        assert gap_alarms(rig)[0]["count"] == 1
        # But a further unaccounted move is reported again
        rig.station.creep([(1, 1, 250)])
        watch.request()
        await check(rig, watch)
        await check(rig, watch, after_s=1.5)
        assert watch.stats.gaps == 2
        details = gap_alarms(rig)[0]["details"]
        assert (details["unaccounted_ml"], details["unaccounted_total_ml"]) == (250, 750)
        assert details["journaled_end_ml"] == sale["totalizer_end_ml"]


async def test_a_gap_seen_once_and_gone_at_the_second_read_raises_nothing(tmp_path: Path) -> None:
    # Given a suspect gap on pump 1 nozzle 1
    async with Rig(tmp_path) as rig:
        await rig.sell(litres=10)
        watch = watch_of(rig, confirm_after_s=1.0)
        watch.request()
        await rig.poll(2)
        await check(rig, watch)
        rig.station.creep([(1, 1, 300)])
        watch.request()
        await check(rig, watch)
        # When, before the second read, the sale that explains it is journaled
        await rig.sell(litres=5)
        await rig.poll(2)
        await check(rig, watch, after_s=1.5)
        await check(rig, watch, after_s=1.5)
        # Then the watch compares with that sale and raises nothing (the controller's own
        # continuity check flags the sale that starts past the journal)
        assert watch.stats.gaps == 0
        assert gap_alarms(rig) == []
        assert "totalizer_gap" in {a["name"] for a in rig.controller.alarms.as_json()}
        # And a new creep after another sale is suspected afresh, not confirmed by the
        # suspicion from before that sale
        rig.station.creep([(1, 1, 100)])
        watch.request()
        await check(rig, watch)
        await rig.sell(litres=5, number=3)
        await rig.poll(2)
        rig.station.creep([(1, 1, 200)])
        watch.request()
        await check(rig, watch, after_s=1.5)
        assert gap_alarms(rig) == []
        await check(rig, watch, after_s=1.5)
        assert gap_alarms(rig)[0]["details"]["unaccounted_ml"] == 200


async def test_a_sale_journaled_while_the_meter_is_read_is_left_to_the_next_read(
    tmp_path: Path,
) -> None:
    # Given a nozzle whose meter is ahead of the journal, and a journal that answers with a
    # new sale between the watch's two looks at it (a sale journaled while the meter is read)
    async with Rig(tmp_path) as rig:
        await rig.sell(litres=10)
        watch = watch_of(rig, confirm_after_s=0.0)
        await rig.poll(2)
        watch.request()
        await check(rig, watch)
        rig.station.creep([(1, 1, 400)])
        journal = rig.controller.journal
        real = journal.last_reading
        calls = [0]

        async def moving(fp: int, nozzle: int):  # type: ignore[no-untyped-def]
            found = await real(fp, nozzle)
            calls[0] += 1
            if found is not None and calls[0] % 2 == 0:
                return type(found)("a-sale-being-journaled", found.totalizer_end_ml + 400)
            return found

        journal.last_reading = moving  # type: ignore[method-assign]
        # When the watch reads the meter, twice
        for _ in range(2):
            watch.request()
            await check(rig, watch, after_s=1.0)
        # Then it raised nothing: each read saw the journal move under it
        assert gap_alarms(rig) == []
        assert 1 in watch._due


async def test_a_pump_that_is_not_idle_is_not_read_and_is_read_once_idle(tmp_path: Path) -> None:
    # Given the watch due to read every pump, and a customer fuelling at pump 1
    async with Rig(tmp_path) as rig:
        await rig.poll(2)
        watch = watch_of(rig)
        rig.customer(litres=30)
        for _ in range(40):
            await rig.poll()
            if rig.controller.machines[1].state.value == "fuelling":
                break
        else:
            raise AssertionError("pump 1 never fuelled")
        # When the watch checks
        watch.request()
        reads = watch.stats.reads
        await check(rig, watch)
        # Then pump 1 was skipped (pump 2 was read)
        assert watch.stats.skipped_busy >= 1
        assert (1, 1) not in watch.meter
        assert (2, 1) in watch.meter
        assert watch.stats.reads == reads + 1
        # And once the sale is journaled and the pump idle, pump 1 is read, with no alarm
        for _ in range(400):
            await rig.poll()
            if rig.controller.machines[1].state.value == "idle" and await rig.journaled():
                break
        await check(rig, watch)
        assert (1, 1) in watch.meter
        assert gap_alarms(rig) == []


async def test_a_meter_behind_the_journal_raises_the_backwards_alarm(tmp_path: Path) -> None:
    # Given a nozzle whose journaled end is ahead of what its meter now shows (the watch was
    # told of a higher reported meter: a replaced or reset meter reads less than that)
    async with Rig(tmp_path) as rig:
        await rig.sell(litres=10)
        watch = watch_of(rig, confirm_after_s=1.0)
        await rig.poll(2)
        watch.request()
        await check(rig, watch)
        meter = watch.meter[(1, 1)]
        watch.reported[(1, 1)] = meter + 10_000
        # When it is read twice
        watch.request()
        await check(rig, watch)
        await check(rig, watch, after_s=1.5)
        # Then the backwards alarm is raised with what the meter shows
        (alarm,) = gap_alarms(rig)
        assert alarm["name"] == "totalizer_backwards_fp1_n1"
        assert alarm["details"]["unaccounted_ml"] == -10_000
        assert watch.stats.backwards == 1
