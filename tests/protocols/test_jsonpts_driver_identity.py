"""JsonPtsDriver: the controller's identity, boot marker and decimals; Basic/Digest auth."""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

import httpx
import pytest

from forecourt.edge.drivers import DeviceIdentity, DriverUnavailable, PumpState
from forecourt.kernel.errors import InvalidValue
from forecourt.protocols.jsonpts.codec import (
    Packet,
    PtsErrorCode,
    confirmation,
    decode_envelope,
    encode_envelope,
    vendor_error,
)
from tests.protocols.test_jsonpts_driver import FakeController, make_driver

# Reply packets shaped after the vendor's Java SDK (package com.technotrade.pts2.network.http):
# GetUniqueIdentifier.java -> UniqueIdentifier {Id} (stored file 17114324032),
# GetFirmwareInformation.java -> FirmwareInformation {DateTime, *Protocols} (17114670687),
# GetDateTime.java -> DateTime {DateTime, AutoSynchronize, UTCOffset} (17523703720),
# GetSystemDecimalDigits.java -> SystemDecimalDigits {Price, Amount, Volume, AmountTotal,
# VolumeTotal} (17487983676); and the web UI's device page (stored file 56316693476):
# SystemOperationInformation {SystemUpTime (ms), CurrentHeapFreeSize, MinimalHeapFreeSize, Tasks}.
DEVICE: dict[str, tuple[str, dict[str, Any]]] = {
    "GetUniqueIdentifier": ("UniqueIdentifier", {"Id": 1234567}),
    "GetFirmwareInformation": (
        "FirmwareInformation",
        {
            "DateTime": "2023-05-29T15:41:11",
            "PumpProtocols": [1, 4],
            "ProbeProtocols": [2],
            "PriceBoardProtocols": [],
            "ReaderProtocols": [],
        },
    ),
    "GetSystemOperationInformation": (
        "SystemOperationInformation",
        {
            "SystemUpTime": 3_725_000,  # 1 h 2 min 5 s
            "CurrentHeapFreeSize": 41_000,
            "MinimalHeapFreeSize": 30_000,
            "Tasks": [
                {"Name": "Pumps", "Priority": 3, "State": "Blocked", "StackHighWaterMark": 90}
            ],
        },
    ),
    "GetDateTime": (
        "DateTime",
        {"DateTime": "2026-11-25T10:02:05", "AutoSynchronize": True, "UTCOffset": 8},
    ),
    "GetSystemDecimalDigits": (
        "SystemDecimalDigits",
        {"Price": 2, "Amount": 2, "Volume": 3, "AmountTotal": 2, "VolumeTotal": 3},
    ),
}


def device(overrides: dict[str, Any] | None = None) -> FakeController:
    answers: dict[str, Any] = {**DEVICE, **(overrides or {})}

    def reply_for(kind: str):
        def reply(request: Packet) -> Packet:
            answer = answers[kind]
            if callable(answer):
                return answer(request)
            packet_type, data = answer
            return Packet(request.id, packet_type, data)

        return reply

    return FakeController({kind: reply_for(kind) for kind in answers})


async def test_identity_reads_the_unique_id_firmware_boot_instant_and_decimals(caplog):
    controller = device(
        {
            "PumpGetStatus": (
                "PumpFillingStatus",
                {"Pump": 1, "Nozzle": 1, "Volume": Decimal("12.345"), "Price": Decimal("7.89")}
                | {"Amount": Decimal("97.40"), "Transaction": 3},
            )
        }
    )
    async with make_driver(controller) as driver:
        (before,) = await driver.pump_status([1])
        with caplog.at_level(logging.WARNING, logger="forecourt.protocols.jsonpts.driver"):
            identity = await driver.identity()
        (after,) = await driver.pump_status([1])
    assert len(controller.requests[1]) == 5  # one POST for all identity requests
    # Booted at 10:02:05 - 1:02:05 = 09:00:00 Shanghai = 01:00 UTC, floored to the minute.
    assert identity == DeviceIdentity(
        device_id="1234567",
        boot_marker="2026-11-25T01:00:00+00:00",
        firmware="2023-05-29T15:41:11",
    )
    assert "using the controller's" in caplog.text
    # 3 volume decimals from the controller: 12.345 L is no longer over-precise.
    assert before.state is PumpState.ERROR
    assert (after.state, after.volume_ml) == (PumpState.FUELLING, 12_345)
    assert driver.fmt.volume_decimals == 3
    assert driver.fmt.total_volume_decimals == 3


async def test_a_controller_without_the_identity_requests_leaves_the_configured_format():
    unknown = {
        kind: (lambda p: vendor_error(p.id, p.type, PtsErrorCode.JSONPTS_ERROR_NOT_FOUND))
        for kind in DEVICE
    }
    async with make_driver(device(unknown)) as driver:
        identity = await driver.identity()
        assert driver.fmt == driver.configured_format
    assert identity == DeviceIdentity(device_id="http://pts.test")


async def test_a_controller_refusing_the_whole_identity_post_is_also_a_fallback():
    async with make_driver(lambda request: httpx.Response(400, text="bad request")) as driver:
        identity = await driver.identity()
    assert identity == DeviceIdentity(device_id="http://pts.test")


async def test_identity_fails_as_unavailable_when_the_controller_does_not_answer():
    async with make_driver(lambda request: httpx.Response(503)) as driver:
        with pytest.raises(DriverUnavailable):
            await driver.identity()


async def test_unusable_decimals_from_the_controller_are_logged_and_ignored(caplog):
    odd = {
        "GetSystemDecimalDigits": ("SystemDecimalDigits", {"Price": 2, "Amount": 2, "Volume": 4})
    }
    async with make_driver(device(odd)) as driver:
        with caplog.at_level(logging.ERROR, logger="forecourt.protocols.jsonpts.driver"):
            await driver.identity()
        assert driver.fmt == driver.configured_format
    assert "cannot use" in caplog.text


def uptime(ms: int, clock: str) -> dict[str, Any]:
    return {
        "GetSystemOperationInformation": ("SystemOperationInformation", {"SystemUpTime": ms}),
        "GetDateTime": ("DateTime", {"DateTime": clock, "AutoSynchronize": False}),
    }


async def test_the_boot_marker_holds_while_uptime_grows_and_changes_when_it_falls():
    controller = device()

    def set_reading(ms: int, clock: str) -> None:
        for kind, answer in uptime(ms, clock).items():
            controller.replies[kind] = lambda p, a=answer: Packet(p.id, a[0], a[1])

    async with make_driver(controller) as driver:
        set_reading(10_000, "2026-11-25T10:00:40")  # booted 10:00:30
        first = (await driver.identity()).boot_marker
        set_reading(70_000, "2026-11-25T12:00:00")  # clock set forward: same life
        assert (await driver.identity()).boot_marker == first
        set_reading(2_000, "2026-11-25T12:00:50")  # restarted
        second = (await driver.identity()).boot_marker
        set_reading(5_000, "2026-11-25T12:00:53")
        assert (await driver.identity()).boot_marker == second
        set_reading(1_000, "2026-11-25T12:00:55")  # restarted again within the same minute
        third = (await driver.identity()).boot_marker
    assert first == "2026-11-25T02:00:00+00:00"
    assert second == "2026-11-25T04:00:00+00:00"
    # Floored, it would equal the second marker: the fall of the uptime gives a finer one.
    assert third == "2026-11-25T04:00:54+00:00"


# --------------------------------------------------------------------------- authentication


class AuthController:
    """Refuses anything but the schemes it offers; records each request's Authorization."""

    def __init__(self, offers: tuple[str, ...], *, accept_digest: bool = True) -> None:
        self.offers = offers
        self.accept_digest = accept_digest
        self.headers: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        header = request.headers.get("authorization", "")
        self.headers.append(header.split(" ")[0])
        accepted = (header.startswith("Basic ") and "basic" in self.offers) or (
            header.startswith("Digest ")
            and "digest" in self.offers
            and self.accept_digest
            and 'username="admin"' in header
        )
        if not accepted:
            challenges = []
            if "digest" in self.offers:
                challenges.append(
                    ("www-authenticate", 'Digest realm="Pts2WebServer", qop="auth", nonce="n1"')
                )
            if "basic" in self.offers:
                challenges.append(("www-authenticate", 'Basic realm="Pts2WebServer"'))
            return httpx.Response(401, headers=challenges)
        packets = decode_envelope(request.content)
        return httpx.Response(
            200, content=encode_envelope(confirmation(p.id, p.type) for p in packets)
        )


async def test_auto_auth_switches_to_digest_when_the_controller_wants_it_and_stays():
    controller = AuthController(("digest",))
    async with make_driver(controller) as driver:
        await driver.stop(1)
        await driver.stop(2)
    # Basic refused -> httpx.DigestAuth: challenge round trip, then Digest; the next request
    # reuses the challenge.
    assert controller.headers == ["Basic", "", "Digest", "Digest"]


async def test_auto_auth_keeps_basic_when_the_controller_offers_both():
    controller = AuthController(("digest", "basic"))
    async with make_driver(controller) as driver:
        await driver.stop(1)
    assert controller.headers == ["Basic"]


@pytest.mark.parametrize(
    ("scheme", "offers", "accept_digest", "requests"),
    [
        ("auto", ("digest",), False, ["Basic", "", "Digest"]),  # switched once, still refused
        ("auto", ("none",), True, ["Basic"]),  # no Digest offered: nothing to switch to
        ("basic", ("digest",), True, ["Basic"]),  # told to use Basic only
    ],
)
async def test_refused_credentials_end_as_auth_failed_after_at_most_one_switch(
    scheme, offers, accept_digest, requests
):
    controller = AuthController(offers, accept_digest=accept_digest)
    async with make_driver(controller, auth_scheme=scheme) as driver:
        with pytest.raises(DriverUnavailable) as caught:
            await driver.stop(1)
    assert caught.value.code == "jsonpts.auth_failed"
    assert controller.headers == requests


async def test_digest_auth_can_be_required_from_the_start():
    controller = AuthController(("digest",))
    async with make_driver(controller, auth_scheme="digest") as driver:
        await driver.stop(1)
    assert controller.headers == ["", "Digest"]


async def test_a_forbidden_reply_is_an_auth_failure():
    async with make_driver(lambda request: httpx.Response(403)) as driver:
        with pytest.raises(DriverUnavailable) as caught:
            await driver.stop(1)
    assert caught.value.code == "jsonpts.auth_failed"


def test_an_unknown_auth_scheme_is_refused():
    with pytest.raises(InvalidValue, match="auth_scheme"):
        make_driver(FakeController({}), auth_scheme="ntlm")


async def test_decimals_equal_to_the_configured_ones_are_not_reported_as_different(caplog):
    same = {
        "GetSystemDecimalDigits": (
            "SystemDecimalDigits",
            {"Price": 2, "Amount": 2, "Volume": 2, "AmountTotal": 2, "VolumeTotal": 2},
        )
    }
    async with make_driver(device(same)) as driver:
        with caplog.at_level(logging.INFO, logger="forecourt.protocols.jsonpts.driver"):
            await driver.identity()
    assert "differ" not in caplog.text
