"""How HQ wires the devices context: which processes run it, the subscriber only with a
broker configured, broker addresses and settings refused when they cannot work."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from forecourt.bootstrap import build_head_office, runs_devices
from forecourt.infra.mqtt import BrokerAddress
from forecourt.kernel.errors import InvalidValue
from forecourt.settings import Settings

MEMORY_DB = "sqlite+aiosqlite://"


def _paths(settings: Settings) -> set[str]:
    return set(build_head_office(settings).app.openapi()["paths"])


def test_the_whole_hq_serves_the_devices_api_and_a_sales_only_process_does_not() -> None:
    # Given HQ with its default services, and a process serving sales only
    whole = Settings(database_url=MEMORY_DB)
    sales = Settings(database_url=MEMORY_DB, services=["sales"])
    # When their apps are built
    # Then only the whole HQ has the devices routes
    assert runs_devices(whole)
    assert not runs_devices(sales)
    assert "/v1/devices/stations/{station}/pumps/{pump}" in _paths(whole)
    assert not any(p.startswith("/v1/devices") for p in _paths(sales))


def test_the_subscriber_exists_only_when_a_broker_is_configured() -> None:
    # Given HQ without and with a broker URL
    without = build_head_office(Settings(database_url=MEMORY_DB))
    configured = build_head_office(
        Settings(database_url=MEMORY_DB, devices_mqtt_url="mqtt://broker.example:1884")
    )
    # Then only the second has a subscriber, for that broker
    assert without.devices is not None
    assert without.telemetry is None
    assert configured.telemetry is not None
    assert configured.telemetry.address == BrokerAddress("tcp", "broker.example", 1884)


@pytest.mark.parametrize(
    "overrides",
    [
        {"devices_mqtt_url": "http://mq:1883"},
        {"devices_telemetry_prefix": "forecourt/v1/"},
        {"devices_stale_after_s": 0},
        {"devices_history_limit": 0},
    ],
)
def test_devices_settings_that_cannot_work_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(database_url=MEMORY_DB, **overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize("prefix", ["forecourt/#", "forecourt/+/v1", "/forecourt", "a\x00b"])
def test_a_telemetry_prefix_with_wildcards_is_refused_before_hq_runs(prefix: str) -> None:
    # by the settings, or at the latest when HQ is built
    with pytest.raises((InvalidValue, ValidationError)):
        build_head_office(Settings(database_url=MEMORY_DB, devices_telemetry_prefix=prefix))
