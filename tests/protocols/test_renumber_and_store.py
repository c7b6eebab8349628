"""A driver seen under the station's pump numbers, both ways, on every method and event; and
the driver stores: what is saved is what loads, durably, a crash leaving old or new."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forecourt.protocols import store as store_module
from forecourt.protocols.driver import EventSink, PumpDriver
from forecourt.protocols.model import (
    AlarmReported,
    DeviceAlarm,
    DeviceEvent,
    DeviceHealth,
    DeviceHealthState,
    DeviceIdentity,
    DeviceTransaction,
    FillingProgress,
    HealthChanged,
    NozzleTotals,
    Preset,
    PumpState,
    PumpStatus,
    PumpStatusChanged,
    TransactionFinished,
)
from forecourt.protocols.renumber import RenumberedPumps, renumbered
from forecourt.protocols.store import FileDriverStore, MemoryDriverStore

AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
STATION_TO_DEVICE = {1: 11, 2: 12}


def txn(pump: int, number: int = 7) -> DeviceTransaction:
    return DeviceTransaction(
        pump=pump,
        nozzle=1,
        transaction=number,
        volume_ml=2000,
        amount_minor=1578,
        unit_price_mmu=789_000,
        totalizer_start_ml=None,
        totalizer_end_ml=None,
        started_at=None,
        ended_at=AT,
    )


class DevicePumps:
    """A pump driver that knows only its own pump numbers (11 and 12 unless told): it refuses
    any other and remembers which pump each call named."""

    name = "pts"
    capabilities = frozenset()

    def __init__(self, numbers: Sequence[int] = (11, 12)) -> None:
        self.numbers = tuple(numbers)
        self.calls: list[tuple[str, int]] = []
        self.sink: EventSink | None = None

    def _pump(self, method: str, pump: int) -> int:
        assert pump in self.numbers, f"{method} asked the device for pump {pump}"
        self.calls.append((method, pump))
        return pump

    def subscribe(self, sink: EventSink) -> None:
        self.sink = sink

    def health(self) -> DeviceHealth:
        return DeviceHealth("pts", DeviceHealthState.ONLINE)

    async def open(self) -> None:
        self.calls.append(("open", 0))

    async def close(self) -> None:
        self.calls.append(("close", 0))

    async def identity(self) -> DeviceIdentity:
        return DeviceIdentity("pts:0042", "boot-1")

    async def pump_status(self, pumps: Sequence[int]) -> list[PumpStatus]:
        return [PumpStatus(self._pump("pump_status", p), PumpState.IDLE) for p in pumps]

    async def authorize(
        self, pump: int, nozzle: int | None, preset: Preset, unit_price_mmu: int
    ) -> int | None:
        self._pump("authorize", pump)
        return 7

    async def stop(self, pump: int) -> None:
        self._pump("stop", pump)

    async def emergency_stop(self, pump: int) -> None:
        self._pump("emergency_stop", pump)

    async def suspend(self, pump: int) -> None:
        self._pump("suspend", pump)

    async def resume(self, pump: int) -> None:
        self._pump("resume", pump)

    async def set_prices(self, pump: int, prices_mmu: Sequence[int]) -> None:
        self._pump("set_prices", pump)

    async def totals(self, pump: int, nozzle: int) -> NozzleTotals:
        return NozzleTotals(self._pump("totals", pump), nozzle, 10_000, 7_890)

    async def unacknowledged_transactions(self, pumps: Sequence[int]) -> list[DeviceTransaction]:
        return [txn(self._pump("unacknowledged_transactions", p)) for p in pumps]

    async def finished_transaction(self, pump: int) -> DeviceTransaction | None:
        return txn(self._pump("finished_transaction", pump))

    async def close_transaction(self, pump: int, transaction: int) -> None:
        self._pump("close_transaction", pump)

    async def transactions(
        self, pump: int, start: datetime, end: datetime
    ) -> list[DeviceTransaction]:
        return [txn(self._pump("transactions", pump))]


def station_view() -> tuple[DevicePumps, PumpDriver]:
    device = DevicePumps()
    view = renumbered(device, STATION_TO_DEVICE)
    assert isinstance(view, RenumberedPumps)
    return device, view


# --------------------------------------------------------------------------- renumbering

Call = Callable[[PumpDriver, int], Any]
COMMANDS: list[tuple[str, Call]] = [
    ("authorize", lambda d, p: d.authorize(p, 1, Preset(), 789_000)),
    ("stop", lambda d, p: d.stop(p)),
    ("emergency_stop", lambda d, p: d.emergency_stop(p)),
    ("suspend", lambda d, p: d.suspend(p)),
    ("resume", lambda d, p: d.resume(p)),
    ("set_prices", lambda d, p: d.set_prices(p, [789_000])),
    ("close_transaction", lambda d, p: d.close_transaction(p, 7)),
]


@pytest.mark.parametrize(("method", "call"), COMMANDS, ids=[m for m, _ in COMMANDS])
async def test_a_command_to_a_station_pump_reaches_the_devices_pump(
    method: str, call: Call
) -> None:
    # Given station pumps 1 and 2 that the device numbers 11 and 12
    device, view = station_view()
    # When a command is given to station pump 2
    await call(view, 2)
    # Then the device is told about its pump 12
    assert device.calls == [(method, 12)]


async def test_pump_status_asks_the_devices_numbers_and_answers_in_the_stations() -> None:
    device, view = station_view()
    found = await view.pump_status([2, 1])
    assert device.calls == [("pump_status", 12), ("pump_status", 11)]
    assert [s.pump for s in found] == [2, 1]


async def test_totals_ask_the_devices_pump_and_answer_for_the_stations() -> None:
    device, view = station_view()
    found = await view.totals(2, 1)
    assert device.calls == [("totals", 12)]
    assert (found.pump, found.nozzle, found.volume_ml) == (2, 1, 10_000)


async def test_transactions_are_asked_of_the_devices_pumps_and_told_in_the_stations() -> None:
    device, view = station_view()
    unacknowledged = await view.unacknowledged_transactions([1, 2])
    finished = await view.finished_transaction(2)
    report = await view.transactions(1, AT, AT)
    assert device.calls == [
        ("unacknowledged_transactions", 11),
        ("unacknowledged_transactions", 12),
        ("finished_transaction", 12),
        ("transactions", 11),
    ]
    assert [t.pump for t in unacknowledged] == [1, 2]
    assert finished == txn(2)
    assert report == [txn(1)]


async def test_events_from_the_device_arrive_in_the_stations_numbers() -> None:
    # Given a station-numbered view subscribed to
    device, view = station_view()
    seen: list[DeviceEvent] = []
    view.subscribe(seen.append)
    assert device.sink is not None
    health = HealthChanged("pts", DeviceHealth("pts", DeviceHealthState.ONLINE))
    tank_alarm = AlarmReported("pts", DeviceAlarm("tank", 12, "high_water", "IA05"))
    # When the device reports on its pumps 12 and 11 (a pump alarm among them), on itself,
    # and on its tank 12 (a tank is no pump: its number is the gauge's)
    device.sink(PumpStatusChanged("pts", PumpStatus(12, PumpState.FUELLING, volume_ml=5)))
    device.sink(FillingProgress("pts", 11, 1, 1000, 789))
    device.sink(TransactionFinished("pts", txn(12)))
    device.sink(AlarmReported("pts", DeviceAlarm("pump", 12, "pump_error", "E7")))
    device.sink(health)
    device.sink(tank_alarm)
    # Then each pump event names the station's pump, and the rest passes as it came
    assert seen == [
        PumpStatusChanged("pts", PumpStatus(2, PumpState.FUELLING, volume_ml=5)),
        FillingProgress("pts", 1, 1, 1000, 789),
        TransactionFinished("pts", txn(2)),
        AlarmReported("pts", DeviceAlarm("pump", 2, "pump_error", "E7")),
        health,
        tank_alarm,
    ]


async def test_the_view_passes_name_capabilities_health_identity_and_lifecycle_through() -> None:
    device, view = station_view()
    assert view.name == "pts"
    assert view.health() == device.health()
    assert await view.identity() == DeviceIdentity("pts:0042", "boot-1")
    await view.open()
    await view.close()
    assert device.calls == [("open", 0), ("close", 0)]


def test_two_station_pumps_on_one_device_pump_are_refused() -> None:
    with pytest.raises(ValueError, match="map to one device pump"):
        RenumberedPumps(DevicePumps(), {1: 11, 2: 11})


@pytest.mark.parametrize(
    ("mapping", "wrapped"),
    [({1: 1, 2: 2}, False), ({}, False), ({1: 1, 2: 5}, True), ({1: 2, 2: 1}, True)],
)
def test_a_view_is_made_only_when_some_number_differs(
    mapping: dict[int, int], wrapped: bool
) -> None:
    device = DevicePumps()
    view = renumbered(device, mapping)
    assert (view is not device) is wrapped


async def test_a_partly_renumbered_line_keeps_the_pumps_whose_numbers_agree() -> None:
    # Given station pump 1 = device pump 1 and station pump 2 = device pump 12
    device = DevicePumps(numbers=(1, 12))
    view = renumbered(device, {1: 1, 2: 12})
    found = await view.pump_status([1, 2])
    assert device.calls == [("pump_status", 1), ("pump_status", 12)]
    assert [s.pump for s in found] == [1, 2]


# --------------------------------------------------------------------------- stores

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=6)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(json_objects)
async def test_what_a_file_store_saves_is_what_it_loads(tmp_path: Path, value: dict) -> None:
    store = FileDriverStore(tmp_path / "drivers")
    await store.save("dart-line-50", value)
    assert await store.load("dart-line-50") == value


async def test_a_key_never_saved_loads_as_nothing(tmp_path: Path) -> None:
    assert await FileDriverStore(tmp_path / "none-yet").load("dart-line-50") is None
    assert await MemoryDriverStore().load("dart-line-50") is None


async def test_a_stored_file_that_is_not_an_object_loads_as_nothing(tmp_path: Path) -> None:
    store = FileDriverStore(tmp_path)
    await store.save("dart-line-50", {"next_number": 3})
    (path,) = tmp_path.glob("*.json")
    path.write_text("[1, 2, 3]", encoding="utf-8")
    assert await store.load("dart-line-50") is None


async def test_each_key_has_its_own_file_inside_the_stores_directory(tmp_path: Path) -> None:
    # Given keys that look like paths, and two that differ only after a dot
    directory = tmp_path / "drivers"
    store = FileDriverStore(directory)
    keys = ["../outside", "a/b", "dart-line-50", "dart-line-51"]
    # When each is saved
    for index, key in enumerate(keys):
        await store.save(key, {"index": index})
    # Then every file is in the directory, and each key loads its own value
    assert all(p.parent == directory for p in tmp_path.rglob("*.json"))
    assert len(list(directory.glob("*.json"))) == len(keys)
    for index, key in enumerate(keys):
        assert await store.load(key) == {"index": index}


@pytest.mark.parametrize("make", [MemoryDriverStore, FileDriverStore])
async def test_a_saved_value_is_a_copy_on_the_way_in_and_on_the_way_out(
    tmp_path: Path, make: Callable[..., Any]
) -> None:
    store = make(tmp_path) if make is FileDriverStore else make()
    value: dict[str, Any] = {"fillings": [{"number": 1}], "next_number": 2}
    await store.save("k", value)
    # Changing the caller's dict after the save changes nothing stored
    value["fillings"].append({"number": 2})
    value["next_number"] = 3
    loaded = await store.load("k")
    assert loaded == {"fillings": [{"number": 1}], "next_number": 2}
    # Nor does changing what a load handed out
    loaded["fillings"].clear()
    assert await store.load("k") == {"fillings": [{"number": 1}], "next_number": 2}


async def test_a_save_that_fails_part_way_leaves_the_previous_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a stored value
    store = FileDriverStore(tmp_path)
    await store.save("dart-line-50", {"next_number": 3, "fillings": [{"number": 2}]})

    # When the next save dies after writing half of its text (the process crashes)
    def half_then_crash(value: Any, f: Any, **kwargs: Any) -> None:
        text = json.dumps(value, **kwargs)
        f.write(text[: len(text) // 2])
        f.flush()
        raise OSError("power cut")

    monkeypatch.setattr(store_module.json, "dump", half_then_crash)
    with pytest.raises(OSError, match="power cut"):
        await store.save("dart-line-50", {"next_number": 4, "fillings": [{"number": 3}]})
    monkeypatch.undo()
    # Then the store still holds the previous value, whole
    assert await store.load("dart-line-50") == {"next_number": 3, "fillings": [{"number": 2}]}


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
async def test_a_save_is_on_disk_whole_before_it_takes_the_name_and_the_name_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a store whose fsyncs and renames are watched (what each fsync makes durable)
    steps: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path.is_dir():
            steps.append(("fsync dir", str(path)))
        else:
            steps.append(("fsync file", str(path), path.read_text(encoding="utf-8")))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        steps.append(("rename", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    directory = tmp_path / "drivers"
    store = FileDriverStore(directory)
    value = {"next_number": 2, "fillings": [{"number": 1, "volume_ml": 2000}]}
    # When a value is saved
    await store.save("dart-line-50", value)
    monkeypatch.undo()
    # Then the whole text was fsynced under another name, renamed to the key's file, and
    # the directory fsynced after the rename
    (final,) = directory.glob("*.json")
    assert [s[0] for s in steps] == ["fsync file", "rename", "fsync dir"]
    written, renamed, synced = steps
    assert json.loads(written[2]) == value
    assert written[1] != str(final)
    assert renamed[1:] == (written[1], str(final))
    assert synced[1] == str(directory)
    assert await store.load("dart-line-50") == value
