"""HQ's devices context fed decoded telemetry directly, on SQLite and PostgreSQL: current
state per topic by (boot, seq), bounded history, alarms, staleness by the manual clock,
and discards of malformed or spoofed messages, each seen through the API."""

from __future__ import annotations

import json
from datetime import timedelta

from forecourt.devices.handlers import Received
from forecourt.kernel.telemetry import DEFAULT_PREFIX, MAX_PAYLOAD_BYTES, topic
from tests.devices.conftest import HISTORY_LIMIT, STALE_AFTER_S, START, DevicesHq, Edge

STATIONS = "/v1/devices/stations"


async def test_pump_tank_and_device_state_is_served_per_station(hq: DevicesHq) -> None:
    # Given an edge that came online and reported a pump, a tank and a device line
    edge = Edge("S001")
    outcome = await hq.ingest(
        edge.status(True),
        edge.pump(1, "idle"),
        edge.pump(1, "fuelling", body={"volume_ml": 1500, "amount_minor": 1133}),
        edge.tank(2, 8_000_000),
        edge.message(
            "devices", "pts-1", {"device": "pts-1", "protocol": "jsonpts", "state": "online"}
        ),
    )
    assert outcome.accepted == 5
    assert not outcome.discarded
    # When operations look at the chain, the station, the pump and the tank
    stations = await hq.get(STATIONS)
    station = await hq.get(f"{STATIONS}/S001")
    pump = await hq.get(f"{STATIONS}/S001/pumps/1")
    tank = await hq.get(f"{STATIONS}/S001/tanks/2")
    # Then each shows the newest state, with the pump's history newest first
    assert stations == [
        {
            "station": "S001",
            "online": True,
            "stale": False,
            "last_seen": "2026-12-01T08:00:00Z",
            "active_alarms": 0,
            "pumps": 1,
            "tanks": 1,
            "discards": 0,
        }
    ]
    assert station["link"]["online"] is True
    assert station["link"]["software"] == "forecourt"
    assert [p["key"] for p in station["pumps"]] == ["1"]
    assert station["pumps"][0]["current"]["data"]["state"] == "fuelling"
    assert station["devices"][0]["current"]["data"]["protocol"] == "jsonpts"
    assert pump["current"]["data"]["volume_ml"] == 1500
    assert pump["current"]["data"]["amount_minor"] == 1133  # money: integer minor units
    assert [h["data"]["state"] for h in pump["history"]] == ["fuelling", "idle"]
    assert tank["current"]["data"]["volume_ml"] == 8_000_000
    assert tank["current"]["seq"] == 4


async def test_an_older_or_repeated_message_changes_nothing(hq: DevicesHq) -> None:
    # Given a pump whose newest state is seq 5
    edge = Edge("S001")
    await hq.ingest(edge.pump(1, "fuelling", seq=5))
    # When a repeat of seq 5 and an older seq 3 arrive (QoS 1 redelivery, reordering)
    outcome = await hq.ingest(edge.pump(1, "idle", seq=5), edge.pump(1, "calling", seq=3))
    # Then both are ignored: the state and history are as they were
    assert (outcome.accepted, outcome.ignored) == (0, 2)
    pump = await hq.get(f"{STATIONS}/S001/pumps/1")
    assert pump["current"]["data"]["state"] == "fuelling"
    assert len(pump["history"]) == 1


async def test_a_restarted_edge_wins_over_any_seq_of_its_previous_boot(hq: DevicesHq) -> None:
    # Given a pump reported at seq 900 by an edge process
    old, new = Edge("S001", boot="boot-a"), Edge("S001", boot="boot-b")
    await hq.ingest(old.pump(1, "fuelling", seq=900))
    # When the restarted edge (a new boot, counting from 1, a later time) reports it
    await hq.ingest(new.pump(1, "idle", seq=1, at=START + timedelta(seconds=5)))
    # And a late message of the old process, stamped earlier, arrives after it
    late = await hq.ingest(old.pump(1, "stopped", seq=901, at=START + timedelta(seconds=1)))
    # Then the new boot's state stands
    assert late.ignored == 1
    pump = await hq.get(f"{STATIONS}/S001/pumps/1")
    assert (pump["current"]["boot"], pump["current"]["data"]["state"]) == ("boot-b", "idle")


async def test_history_keeps_only_the_newest_states_per_pump(hq: DevicesHq) -> None:
    # Given more states of pump 1 than the history keeps, and one state of pump 2
    edge = Edge("S001")
    await hq.ingest(*(edge.pump(1, "fuelling", body={"volume_ml": v}) for v in range(8)))
    await hq.ingest(edge.pump(2, "idle"), edge.pump(1, "idle"))
    # When the pumps are read
    one = await hq.get(f"{STATIONS}/S001/pumps/1")
    two = await hq.get(f"{STATIONS}/S001/pumps/2?limit=100")
    short = await hq.get(f"{STATIONS}/S001/pumps/1?limit=2")
    # Then pump 1 keeps its newest HISTORY_LIMIT states, newest first; pump 2 its own
    assert len(one["history"]) == HISTORY_LIMIT
    assert [h["seq"] for h in one["history"]] == [10, 8, 7, 6, 5]
    assert len(two["history"]) == 1
    assert [h["seq"] for h in short["history"]] == [10, 8]


async def test_a_station_publishing_for_another_is_discarded_counted_and_alarmed(
    hq: DevicesHq,
) -> None:
    # Given S001's telemetry is live
    edge = Edge("S001")
    await hq.ingest(edge.pump(1, "idle"))
    # When a message about S002 arrives on S001's topic
    spoof = edge.pump(1, "fuelling", station="S002")
    outcome = await hq.ingest(spoof)
    # Then it changes nothing, is counted by reason, and S001 shows the discard and an alarm
    assert outcome.discarded == {"spoofed": 1}
    assert hq.discarded("spoofed") == 1
    pump = await hq.get(f"{STATIONS}/S001/pumps/1")
    assert pump["current"]["data"]["state"] == "idle"
    station = await hq.get(f"{STATIONS}/S001")
    assert station["discards"] == 1
    assert station["recent_discards"][0]["reason"] == "spoofed"
    assert "S002" in station["recent_discards"][0]["message"]
    assert [(a["name"], a["source"]) for a in station["active_alarms"]] == [
        ("telemetry_discarded", "hq")
    ]
    # And S002 got nothing
    assert (await hq.get(f"{STATIONS}/S002"))["pumps"] == []


def _payload(**fields: object) -> bytes:
    body = {"v": 1, "station": "S001", "at": START.isoformat(), "boot": "b", "seq": 1}
    return json.dumps({**body, **fields}).encode()


PUMP_TOPIC = topic(DEFAULT_PREFIX, "S001", "pumps", 1)
BROKEN: dict[str, tuple[str, bytes, str]] = {
    "not_json": (PUMP_TOPIC, b"\xff{not json", "malformed"),
    "an_array": (PUMP_TOPIC, b"[1, 2]", "malformed"),
    "another_version": (PUMP_TOPIC, _payload(v=2), "malformed"),
    "no_boot": (PUMP_TOPIC, _payload(boot=""), "malformed"),
    "negative_seq": (PUMP_TOPIC, _payload(seq=-1), "malformed"),
    "naive_time": (PUMP_TOPIC, _payload(at="2026-12-01T08:00:00"), "malformed"),
    "too_big": (PUMP_TOPIC, b" " * (MAX_PAYLOAD_BYTES + 1), "malformed"),
    "nested_deep": (PUMP_TOPIC, b"[" * 60_000, "malformed"),
    "pump_of_another_topic": (PUMP_TOPIC, _payload(pump=2), "bad_body"),
    "status_without_online": (topic(DEFAULT_PREFIX, "S001", "status"), _payload(), "bad_body"),
    "alarm_without_name": (
        topic(DEFAULT_PREFIX, "S001", "alarms"),
        _payload(active=True),
        "bad_body",
    ),
    "not_a_telemetry_topic": (f"{DEFAULT_PREFIX}/stations/S001/valves/1", _payload(), "topic"),
    "unknown_station": (
        topic(DEFAULT_PREFIX, "S999", "pumps", 1),
        _payload(station="S999"),
        "unknown_station",
    ),
    "cleared_retained_topic": (PUMP_TOPIC, b"", "empty"),
}


async def test_a_broken_message_is_discarded_with_its_reason_and_nothing_else_changes(
    hq: DevicesHq,
) -> None:
    edge = Edge("S001")
    recorded = 0
    for case, (name, payload, reason) in sorted(BROKEN.items()):
        # Given a broken message and a valid one arriving together
        before = hq.discarded(reason)
        # When HQ applies them
        outcome = await hq.ingest(Received(name, payload), edge.tank(1, 100))
        # Then the broken one is discarded, counted by its reason, and the valid one applied
        assert outcome.discarded == {reason: 1}, case
        assert outcome.accepted == 1, case
        assert hq.discarded(reason) == before + 1, case
        # And recorded for its station when the station is known and it was no mere clear
        recorded += reason not in ("empty", "unknown_station", "topic")
        station = await hq.get(f"{STATIONS}/S001")
        assert station["pumps"] == [], case
        assert station["discards"] == recorded, case


async def test_edge_alarms_are_raised_cleared_and_kept_per_name(hq: DevicesHq) -> None:
    # Given two alarms raised by the edge, one of them then cleared
    edge = Edge("S001")
    await hq.ingest(edge.alarm("tank_low", True), edge.alarm("totalizer_gap", True))
    await hq.ingest(edge.alarm("tank_low", False))
    # And an older "raised" of the cleared one arriving late
    late = await hq.ingest(edge.alarm("tank_low", True, seq=1))
    # When the station's alarms are read
    alarms = await hq.get(f"{STATIONS}/S001/alarms")
    # Then one is active, and the recent list shows each transition, newest first
    assert late.ignored == 1
    assert [a["name"] for a in alarms["active"]] == ["totalizer_gap"]
    assert [(e["name"], e["active"]) for e in alarms["recent"]] == [
        ("tank_low", False),
        ("totalizer_gap", True),
        ("tank_low", True),
    ]
    summary = await hq.get(STATIONS)
    assert summary[0]["active_alarms"] == 1


async def test_a_silent_station_turns_stale_and_back_with_an_alarm(hq: DevicesHq) -> None:
    # Given S001 online and reporting
    edge = Edge("S001")
    await hq.ingest(edge.status(True), edge.pump(1, "idle"))
    assert await hq.devices.sweep() == 0
    # When nothing arrives from it for longer than devices_stale_after_s
    hq.clock.advance(STALE_AFTER_S + 1)
    # Then it is stale at once in the API, and the sweep raises telemetry_stale
    assert (await hq.get(STATIONS))[0]["stale"] is True
    assert (await hq.get(f"{STATIONS}/S001/pumps/1"))["stale"] is True
    assert await hq.devices.sweep() == 1
    assert await hq.devices.sweep() == 0  # raised once
    alarms = await hq.get(f"{STATIONS}/S001/alarms")
    assert [(a["name"], a["source"]) for a in alarms["active"]] == [("telemetry_stale", "hq")]
    # When it reports again
    await hq.ingest(edge.pump(1, "calling"))
    # Then it is live and the alarm is cleared
    station = await hq.get(f"{STATIONS}/S001")
    assert station["stale"] is False
    assert station["last_seen"] == (
        START + timedelta(seconds=STALE_AFTER_S + 1)
    ).isoformat().replace("+00:00", "Z")
    alarms = await hq.get(f"{STATIONS}/S001/alarms")
    assert alarms["active"] == []
    assert [(e["name"], e["active"]) for e in alarms["recent"][:2]] == [
        ("telemetry_stale", False),
        ("telemetry_stale", True),
    ]


async def test_the_last_will_marks_the_station_stale_at_once(hq: DevicesHq) -> None:
    # Given S001 online; the broker holds its last will (offline), stamped after its status
    edge = Edge("S001")
    await hq.ingest(edge.status(True, seq=10), edge.pump(1, "idle", seq=12))
    # When the edge's connection drops and the broker publishes the will
    await hq.ingest(edge.status(False, seq=11))
    # Then the station is offline and stale, with the alarm, without waiting
    station = await hq.get(f"{STATIONS}/S001")
    assert (station["online"], station["stale"], station["link"]["online"]) == (
        False,
        True,
        False,
    )
    assert [a["name"] for a in station["active_alarms"]] == ["telemetry_stale"]
    # And when the edge is back online (a new connection, a higher seq)
    await hq.ingest(edge.status(True, seq=13))
    assert (await hq.get(f"{STATIONS}/S001"))["active_alarms"] == []


async def test_discard_alarm_clears_after_a_quiet_period(hq: DevicesHq) -> None:
    # Given a discard from S001 while it keeps reporting
    edge = Edge("S001")
    await hq.ingest(edge.pump(1, "idle"), Received(PUMP_TOPIC, b"junk"))
    # When no discard follows for devices_stale_after_s (the station stays live)
    hq.clock.advance(STALE_AFTER_S / 2)
    await hq.ingest(edge.pump(1, "calling"))
    hq.clock.advance(STALE_AFTER_S / 2 + 1)
    await hq.ingest(edge.pump(1, "idle"))
    await hq.devices.sweep()
    # Then the discard alarm is cleared, and the discard is still on record
    station = await hq.get(f"{STATIONS}/S001")
    assert station["active_alarms"] == []
    assert station["discards"] == 1


BAD_REFERENCES = [
    (f"{STATIONS}/S999", 404),
    (f"{STATIONS}/S999/alarms", 404),
    (f"{STATIONS}/S001/pumps/3", 404),
    (f"{STATIONS}/S001/tanks/9", 404),
    (f"{STATIONS}/S001/pumps/0", 422),
    (f"{STATIONS}/S001/pumps/x", 422),
    (f"{STATIONS}/S001/pumps/1?limit=0", 422),
    (f"{STATIONS}/S001/pumps/1?limit=1.0", 422),
    (f"{STATIONS}/S%20001", 422),
]


async def test_unknown_or_invalid_references_answer_the_error_envelope(hq: DevicesHq) -> None:
    # Given S001 with pump 1 only
    await hq.ingest(Edge("S001").pump(1, "idle"))
    for path, status in BAD_REFERENCES:
        # When something else is asked for
        body = await hq.get(path, status)
        # Then the answer is the one error envelope
        assert set(body) == {"error"}, path
        assert body["error"]["code"], path


async def test_a_network_station_without_telemetry_is_empty_and_stale(hq: DevicesHq) -> None:
    # Given S002 is in the network but sent nothing
    # When it is read
    station = await hq.get(f"{STATIONS}/S002")
    # Then it answers empty and stale, and is not listed among reporting stations
    assert (station["online"], station["stale"], station["pumps"]) == (None, True, [])
    assert await hq.get(STATIONS) == []
