"""``environment = "production"`` refuses default and placeholder secrets and weak settings.

Each refusal is checked on the settings classes themselves, through :func:`load_settings`
(the one line the operator reads, naming the setting where it was given) and, for the edge
and HQ, through the real ``forecourt`` command. Development keeps accepting everything the
simulators and the suite use.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError
from structlog.testing import capture_logs

from forecourt.edge.node import jsonpts_factory
from forecourt.settings import (
    PLACEHOLDER_SECRETS,
    DeviceLine,
    EdgeSettings,
    Settings,
    SettingsInvalid,
    load_settings,
)
from tests.cli.support import clean_env, run

CREDENTIAL = "a-real-station-credential-0123456789"
CONTROLLER_PASSWORD = "Pts-2-own-Pa55"
TOKEN = "k3Q9vT1xZp7LmW2cR8yB"
GOOD_EDGE: dict[str, Any] = {
    "station": "S001",
    "credential": CREDENTIAL,
    "environment": "production",
    "hq_url": "https://hq.example.com",
    "controller_password": CONTROLLER_PASSWORD,
}
GOOD_HQ: dict[str, Any] = {
    "environment": "production",
    "database_url": "postgresql://forecourt:Xq7-generated-db-pass@db.example.com/forecourt",
    "bus_url": "nats://forecourt:Vb4-generated-bus-pass@nats.example.com:4222",
    "identity_argon2_time_cost": 3,
    "identity_argon2_memory_kib": 65_536,
}
PLACEHOLDERS = sorted(PLACEHOLDER_SECRETS - {""})
# Any function-scoped fixture is set up once per test, not per example: fine here (it only
# clears the environment and changes the working directory).
examples = hypothesis_settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def no_outside_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No FORECOURT_* variable (the suite's cheap argon2 costs included) and no
    forecourt.toml: only what a test gives."""
    for name in list(os.environ):
        if name.startswith("FORECOURT_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def any_case(text: str) -> st.SearchStrategy[str]:
    """``text`` with each letter in either case."""
    return st.tuples(*(st.sampled_from(sorted({c.lower(), c.upper()})) for c in text)).map("".join)


placeholder_any_case = st.sampled_from(PLACEHOLDERS).flatmap(any_case)


def edge(**changes: Any) -> EdgeSettings:
    return EdgeSettings(**(GOOD_EDGE | changes))


def hq(**changes: Any) -> Settings:
    return Settings(**(GOOD_HQ | changes))


def refusal(build: Any, **changes: Any) -> str:
    """The message of the production refusal ``build(**changes)`` raises."""
    with pytest.raises(ValidationError) as caught:
        build(**changes)
    errors = caught.value.errors()
    assert len(errors) == 1, errors
    message = str(errors[0]["msg"]).removeprefix("Value error, ")
    assert "\n" not in message
    return message


def edge_line(**changes: Any) -> SettingsInvalid:
    """What the operator reads: load_settings' one line."""
    with pytest.raises(SettingsInvalid) as caught:
        load_settings(EdgeSettings, **(GOOD_EDGE | changes))
    assert "\n" not in caught.value.message
    return caught.value


# --- what production accepts, and development keeps accepting ------------------------------


def test_production_with_real_secrets_is_accepted() -> None:
    settings = edge(
        mqtt_url="mqtts://broker.example.com:8883",
        mqtt_password="Mq-generated-7f3a9c",
        terminal_tokens={"till1": TOKEN},
        reader_tokens={"screen": TOKEN[::-1]},
    )
    assert settings.environment == "production"
    head_office = hq(devices_mqtt_password="Mq-generated-7f3a9c", identity_access_token_s=3600)
    assert head_office.environment == "production"


@pytest.mark.parametrize(
    "hq_url",
    [
        "http://127.0.0.1:8400",
        "http://127.9.8.7:8400",
        "http://localhost:8400",
        "http://[::1]:8400",
        "https://10.0.0.5",
    ],
)
def test_production_accepts_http_to_a_loopback_hq_and_https_anywhere(hq_url: str) -> None:
    assert edge(hq_url=hq_url).hq_url == hq_url


def test_production_accepts_database_and_bus_urls_without_a_password() -> None:
    hq(database_url="postgresql://forecourt@db.example.com/forecourt", bus_url="memory://")
    hq(database_url="sqlite+aiosqlite:///var/forecourt-hq.db", bus_url="nats://127.0.0.1:4222")


def test_the_environment_is_development_unless_set() -> None:
    assert EdgeSettings(station="S001", credential=CREDENTIAL).environment == "development"
    assert Settings().environment == "development"


def test_development_keeps_accepting_every_default_and_placeholder() -> None:
    settings = EdgeSettings(
        station="S001",
        credential=CREDENTIAL,
        hq_url="http://hq.example.com",
        mqtt_url="mqtt://127.0.0.1:1883",
        mqtt_password="password",
        terminal_tokens={"till1": "a" * 16},
        reader_tokens={"screen": "changemechangeme"},
    )
    assert settings.controller_user == "admin"
    assert settings.controller_password.get_secret_value() == "admin"
    assert settings.default_controller_password
    Settings(
        database_url="postgresql://postgres:postgres@127.0.0.1/forecourt",
        bus_url="nats://nats:nats@127.0.0.1:4222",
        devices_mqtt_password="changeme",
        identity_argon2_time_cost=1,
        identity_argon2_memory_kib=8,
        identity_access_token_s=86_400,
    )


def test_the_environment_is_read_from_its_variables_in_any_case(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FORECOURT_EDGE_ENVIRONMENT", "Production")
    monkeypatch.setenv("FORECOURT_ENVIRONMENT", " PRODUCTION ")
    settings = EdgeSettings(
        station="S001", credential=CREDENTIAL, controller_password=CONTROLLER_PASSWORD
    )
    assert settings.environment == "production"
    with pytest.raises(ValidationError):
        Settings(database_url="postgresql://postgres:postgres@db/forecourt")


def test_an_unknown_environment_is_one_line_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FORECOURT_EDGE_ENVIRONMENT", "prod")
    with pytest.raises(SettingsInvalid) as caught:
        load_settings(EdgeSettings, station="S001", credential=CREDENTIAL)
    assert caught.value.setting == "FORECOURT_EDGE_ENVIRONMENT"
    assert caught.value.message.startswith(
        "setting environment (FORECOURT_EDGE_ENVIRONMENT) is invalid ('prod')"
    )


# --- the edge ----------------------------------------------------------------------------


def test_production_refuses_the_default_controller_password() -> None:
    settings = dict(GOOD_EDGE)
    del settings["controller_password"]  # the default: admin (with the user admin)
    with pytest.raises(ValidationError) as caught:
        EdgeSettings(**settings)
    message = str(caught.value.errors()[0]["msg"])
    assert "FORECOURT_EDGE_CONTROLLER_PASSWORD is a default or placeholder password" in message
    assert "FORECOURT_EDGE_ENVIRONMENT=production" in message


def test_the_default_controller_password_is_one_line_naming_its_variable_with_a_hint() -> None:
    refused = edge_line(controller_password="admin", controller_user="admin")
    assert refused.setting == "FORECOURT_EDGE_CONTROLLER_PASSWORD"
    assert refused.message.startswith("FORECOURT_EDGE_CONTROLLER_PASSWORD is a default")
    assert " — give the forecourt controller a password of its own" in refused.message


@examples
@given(password=placeholder_any_case)
def test_production_refuses_any_placeholder_controller_password_in_any_case(
    password: str,
) -> None:
    message = refusal(edge, controller_password=password)
    assert message.startswith("FORECOURT_EDGE_CONTROLLER_PASSWORD is a default or placeholder")


@pytest.mark.parametrize(
    ("password", "problem"),
    [("", "is empty"), ("Xy7#qZ1", "is shorter than 8 characters")],
)
def test_production_refuses_an_empty_or_short_controller_password(
    password: str, problem: str
) -> None:
    message = refusal(edge, controller_password=password)
    assert message.startswith(f"FORECOURT_EDGE_CONTROLLER_PASSWORD {problem}")
    assert not password or password not in message  # a secret is never shown


def test_production_accepts_an_eight_character_controller_password_of_its_own() -> None:
    assert edge(controller_password="Xy7#qZ1!").controller_password == SecretStr("Xy7#qZ1!")


def test_device_lines_are_checked_instead_of_the_unused_controller_settings() -> None:
    line = {"name": "pts", "protocol": "jsonpts", "transport": "http://10.0.0.9"}
    settings = dict(GOOD_EDGE)
    del settings["controller_password"]
    own = DeviceLine(**line, options={"password": CONTROLLER_PASSWORD})
    assert EdgeSettings(**settings, devices=[own]).devices == [own]
    factory = DeviceLine(**line, options={"user": "admin", "password": "ADMIN"})
    message = refusal(EdgeSettings, **settings, devices=[factory])
    assert message.startswith(
        "FORECOURT_EDGE_DEVICES device 'pts': its password option is a default or placeholder"
    )


@examples
@given(password=placeholder_any_case)
def test_production_refuses_a_placeholder_mqtt_password(password: str) -> None:
    message = refusal(edge, mqtt_url="mqtts://broker.example.com:8883", mqtt_password=password)
    assert message.startswith("FORECOURT_EDGE_MQTT_PASSWORD is a default or placeholder")


def test_production_accepts_no_mqtt_password_the_station_credential_is_used() -> None:
    assert edge(mqtt_url="mqtts://broker.example.com:8883").mqtt_password is None


@pytest.mark.parametrize(
    "hq_url",
    [
        "http://hq.example.com",
        "HTTP://hq.example.com:8400/",
        "http://10.1.2.3:8400",
        "http://[2001:db8::1]:8400",
        "http://localhost.example.com",
    ],
)
def test_production_refuses_plain_http_to_a_remote_hq(hq_url: str) -> None:
    message = refusal(edge, hq_url=hq_url)
    assert message.startswith("FORECOURT_EDGE_HQ_URL is plain http://")
    assert message.endswith("— use HQ's https:// address")


@pytest.mark.parametrize("url", ["mqtt://broker.example.com:1883", "mqtt://10.0.0.5"])
def test_production_refuses_plain_mqtt_to_a_remote_broker(url: str) -> None:
    message = refusal(edge, mqtt_url=url)
    assert message.startswith("FORECOURT_EDGE_MQTT_URL is plain mqtt://")
    assert "mqtts://" in message


def test_production_accepts_mqtts_anywhere_and_mqtt_on_loopback() -> None:
    assert edge(mqtt_url="mqtts://broker.example.com:8883").mqtt_url
    assert edge(mqtt_url="mqtt://127.0.0.1:1883").mqtt_url


@examples
@given(address=st.ip_addresses(v=4).filter(lambda a: not a.is_loopback))
def test_production_refuses_http_to_any_address_outside_loopback(
    address: ipaddress.IPv4Address,
) -> None:
    assert refusal(edge, hq_url=f"http://{address}:8400").startswith("FORECOURT_EDGE_HQ_URL")


@examples
@given(
    field=st.sampled_from(["terminal_tokens", "reader_tokens"]),
    secret=st.one_of(
        # one character repeated, 16+ times
        st.tuples(st.characters(min_codepoint=33, max_codepoint=126), st.integers(16, 64)).map(
            lambda pair: pair[0] * pair[1]
        ),
        # a placeholder repeated to 16+ characters, in any letter case
        st.sampled_from(PLACEHOLDERS).map(lambda p: p * (16 // len(p) + 1)).flatmap(any_case),
    ),
)
def test_production_refuses_repeated_or_placeholder_terminal_secrets(
    field: str, secret: str
) -> None:
    message = refusal(edge, **{field: {"till1": secret}})
    assert message.startswith(f"FORECOURT_EDGE_{field.upper()} terminal 'till1': its secret")
    assert secret not in message


def test_production_refusals_are_counted_in_the_one_line() -> None:
    message = refusal(edge, controller_password="admin", hq_url="http://hq.example.com")
    assert "(and 1 more: FORECOURT_EDGE_HQ_URL) — " in message


def test_a_refused_setting_from_the_settings_file_is_named_there(tmp_path: Path) -> None:
    (tmp_path / "forecourt.toml").write_text(
        '[edge]\nenvironment = "production"\ncontroller_password = "changeme"\n'
    )
    with pytest.raises(SettingsInvalid) as caught:
        load_settings(EdgeSettings, station="S001", credential=CREDENTIAL)
    assert caught.value.setting == "forecourt.toml [edge] controller_password"
    assert caught.value.message.startswith(
        "forecourt.toml [edge] controller_password is a default or placeholder password"
    )


def test_a_refused_option_is_named_as_typed() -> None:
    with pytest.raises(SettingsInvalid) as caught:
        load_settings(
            EdgeSettings,
            options={"hq_url": "--hq-url"},
            **(GOOD_EDGE | {"hq_url": "http://hq.example.com"}),
        )
    assert caught.value.setting == "--hq-url"
    assert caught.value.message.startswith("--hq-url is plain http:// to hq.example.com")


def test_a_refusal_never_shows_the_settings_in_the_pydantic_error() -> None:
    with pytest.raises(ValidationError) as caught:
        edge(controller_password="admin", credential="a-secret-station-credential-42")
    assert "a-secret-station-credential-42" not in str(caught.value)


def test_development_warns_once_of_the_default_controller_password() -> None:
    default = EdgeSettings(station="S001", credential=CREDENTIAL)
    own = EdgeSettings(station="S001", credential=CREDENTIAL, controller_password="Pts-own-1")
    with capture_logs() as logs:
        jsonpts_factory(default)
        jsonpts_factory(own)
    warned = [log for log in logs if log["event"] == "edge.default_controller_password"]
    assert len(warned) == 1
    assert warned[0]["log_level"] == "warning"


# --- head office --------------------------------------------------------------------------


@examples
@given(password=placeholder_any_case, field=st.sampled_from(["database_url", "bus_url"]))
def test_production_refuses_a_placeholder_password_in_a_database_or_bus_url(
    password: str, field: str
) -> None:
    url = {
        "database_url": f"postgresql+asyncpg://forecourt:{password}@db.example.com:5432/hq",
        "bus_url": f"nats://forecourt:{password}@nats.example.com:4222",
    }[field]
    message = refusal(hq, **{field: url})
    assert message.startswith(f"FORECOURT_{field.upper()} holds a default or placeholder")


@pytest.mark.parametrize(
    ("field", "url"),
    [
        ("database_url", "postgresql://postgres:postgres@127.0.0.1:5432/forecourt"),
        ("database_url", "postgresql://forecourt@db.example.com/hq?password=changeme"),
        ("bus_url", "nats://nats.example.com:4222,nats://user:Password@nats2.example.com:4222"),
    ],
)
def test_production_finds_the_password_wherever_the_url_holds_it(field: str, url: str) -> None:
    assert refusal(hq, **{field: url}).startswith(f"FORECOURT_{field.upper()} holds")


def test_a_refused_database_url_is_one_line_that_does_not_show_the_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FORECOURT_ENVIRONMENT", "production")
    monkeypatch.setenv("FORECOURT_DATABASE_URL", "postgresql://hq:ChangeMe@db.example.com/hq")
    with pytest.raises(SettingsInvalid) as caught:
        load_settings(Settings)
    assert caught.value.setting == "FORECOURT_DATABASE_URL"
    assert caught.value.message.startswith("FORECOURT_DATABASE_URL holds a default or")
    assert "ChangeMe" not in caught.value.message
    assert "db.example.com" not in caught.value.message


@examples
@given(password=placeholder_any_case)
def test_production_refuses_a_placeholder_devices_mqtt_password(password: str) -> None:
    message = refusal(hq, devices_mqtt_password=password)
    assert message.startswith("FORECOURT_DEVICES_MQTT_PASSWORD is a default or placeholder")


@pytest.mark.parametrize(
    ("changes", "variable"),
    [
        ({"identity_argon2_time_cost": 1}, "FORECOURT_IDENTITY_ARGON2_TIME_COST is 1"),
        ({"identity_argon2_memory_kib": 19_455}, "FORECOURT_IDENTITY_ARGON2_MEMORY_KIB is 19455"),
        ({"identity_access_token_s": 3601}, "FORECOURT_IDENTITY_ACCESS_TOKEN_S is 3601 s"),
    ],
)
def test_production_refuses_cheap_hashing_and_long_lived_access_tokens(
    changes: dict[str, Any], variable: str
) -> None:
    assert refusal(hq, **changes).startswith(variable)


def test_production_accepts_the_argon2_minimum() -> None:
    hq(identity_argon2_time_cost=2, identity_argon2_memory_kib=19_456)


def test_the_suites_cheap_argon2_costs_are_refused_in_production(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FORECOURT_IDENTITY_ARGON2_TIME_COST", "1")
    monkeypatch.setenv("FORECOURT_IDENTITY_ARGON2_MEMORY_KIB", "8")
    assert Settings().identity_argon2_time_cost == 1  # development: as the suite runs
    monkeypatch.setenv("FORECOURT_ENVIRONMENT", "production")
    with pytest.raises(SettingsInvalid) as caught:
        load_settings(Settings)
    assert caught.value.message.startswith("FORECOURT_IDENTITY_ARGON2_TIME_COST is 1")
    assert "(and 1 more: FORECOURT_IDENTITY_ARGON2_MEMORY_KIB)" in caught.value.message


# --- the real command ---------------------------------------------------------------------


def test_an_edge_in_production_on_the_default_controller_password_will_not_start(
    tmp_path: Path,
) -> None:
    env = clean_env(FORECOURT_EDGE_ENVIRONMENT="production", FORECOURT_EDGE_CREDENTIAL=CREDENTIAL)
    done = run(["edge", "--station", "S001"], tmp_path, env)
    assert done.code == 2, done.stderr
    message = done.one_line_error()  # no traceback, one Error: line
    assert message.startswith("FORECOURT_EDGE_CONTROLLER_PASSWORD is a default or placeholder")
    assert "FORECOURT_EDGE_ENVIRONMENT=production" in message
    assert " — " in message  # a hint
    assert not (tmp_path / "var").exists()  # refused before anything was opened


def test_an_edge_in_production_names_plain_http_to_hq_as_the_option_typed(
    tmp_path: Path,
) -> None:
    env = clean_env(
        FORECOURT_EDGE_ENVIRONMENT="production",
        FORECOURT_EDGE_CREDENTIAL=CREDENTIAL,
        FORECOURT_EDGE_CONTROLLER_PASSWORD=CONTROLLER_PASSWORD,
    )
    done = run(["edge", "--station", "S001", "--hq-url", "http://hq.example.com"], tmp_path, env)
    assert done.code == 2, done.stderr
    assert done.one_line_error().startswith("--hq-url is plain http:// to hq.example.com")


def test_hq_in_production_on_a_default_database_password_will_not_serve(tmp_path: Path) -> None:
    env = clean_env(
        FORECOURT_ENVIRONMENT="production",
        FORECOURT_DATABASE_URL="postgresql://postgres:postgres@127.0.0.1:1/forecourt",
    )
    done = run(["serve"], tmp_path, env)
    assert done.code == 2, done.stderr
    message = done.one_line_error()
    assert message.startswith("FORECOURT_DATABASE_URL holds a default or placeholder")
    assert "postgres:postgres" not in done.stderr
