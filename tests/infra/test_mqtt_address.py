"""One parser for every broker URL, the edge's (no login in the URL) and HQ's (a login
allowed): what each URL names, and every URL that names no broker refused with the setting."""

from __future__ import annotations

import pytest

from forecourt.infra.mqtt import BrokerAddress
from forecourt.kernel.errors import InvalidValue


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("mqtt://127.0.0.1", BrokerAddress("tcp", "127.0.0.1", 1883)),
        ("mqtt://127.0.0.1:1884/", BrokerAddress("tcp", "127.0.0.1", 1884)),
        ("mqtts://mq.example", BrokerAddress("tcp", "mq.example", 8883, tls=True)),
        (" mqtts://mq.example:9883 ", BrokerAddress("tcp", "mq.example", 9883, tls=True)),
        ("unix:///run/mqtt.sock", BrokerAddress("unix", "/run/mqtt.sock")),
    ],
)
def test_a_broker_url_names_transport_host_port_and_tls(url: str, address: BrokerAddress) -> None:
    assert BrokerAddress.parse(url) == address
    assert BrokerAddress.parse(url, login=True) == address


def test_a_login_in_the_url_is_read_only_where_it_is_allowed_and_never_shown() -> None:
    # Given HQ's subscriber URL with a login (a percent-encoded @ in the password)
    url = "mqtt://hq:s%40cret@mq:1884"
    # Then HQ reads the login from it
    address = BrokerAddress.parse(url, setting="devices_mqtt_url", login=True)
    assert address == BrokerAddress("tcp", "mq", 1884, username="hq", password="s@cret")
    assert "s@cret" not in str(address)
    assert str(address) == "mqtt://mq:1884"
    # And the edge, whose credentials have settings of their own, refuses it, naming them
    with pytest.raises(InvalidValue, match="credentials in their own settings") as refused:
        BrokerAddress.parse(url)
    assert "s%40cret" not in refused.value.message
    assert refused.value.details["field"] == "mqtt_url"


@pytest.mark.parametrize(
    "url",
    [
        "http://mq:1883",
        "mqtt://",
        "unix://",
        "unix://relative.sock",
        "mqtt://mq:0",
        "mqtt://mq:99999",
        "mqtt://mq:1883/topic",
        "mqtt://mq:1883?qos=1",
        "mqtt://mq#x",
        "",
    ],
)
def test_a_url_that_names_no_broker_is_refused_naming_the_setting(url: str) -> None:
    with pytest.raises(InvalidValue) as refused:
        BrokerAddress.parse(url, setting="devices_mqtt_url", login=True)
    assert refused.value.message.startswith("devices_mqtt_url: ")
    assert refused.value.details["field"] == "devices_mqtt_url"


def test_the_address_prints_as_a_url_it_parses_back_to() -> None:
    for url in ("mqtt://a:1", "mqtts://b:8883", "unix:///x/y.sock", "mqtt://[::1]:1884"):
        address = BrokerAddress.parse(url)
        assert BrokerAddress.parse(str(address)) == address


def test_a_user_name_alone_in_the_url_is_a_login_too() -> None:
    # Given a URL naming a user without a password
    url = "mqtt://S001@mq"
    # Then the edge refuses it like any login in the URL
    with pytest.raises(InvalidValue, match="credentials in their own settings"):
        BrokerAddress.parse(url)
    # And HQ reads the user, with no password
    address = BrokerAddress.parse(url, login=True)
    assert address == BrokerAddress("tcp", "mq", 1883, username="S001")


@pytest.mark.parametrize("url", ["unix://mq/run/mqtt.sock", "unix://user@/run/mqtt.sock"])
def test_a_unix_socket_url_with_a_host_or_login_is_refused(url: str) -> None:
    # When a unix socket URL carries anything before its path
    with pytest.raises(InvalidValue, match="absolute path") as refused:
        BrokerAddress.parse(url, login=True)
    # Then it is refused, naming the setting, rather than the host being silently dropped
    assert refused.value.details["field"] == "mqtt_url"


def test_an_explicitly_empty_password_is_a_password() -> None:
    address = BrokerAddress.parse("mqtt://hq:@mq", login=True)
    assert (address.username, address.password) == ("hq", "")
