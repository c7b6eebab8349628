"""The simulator's HTTP authentication: Basic, RFC 7616 Digest, or both, like a PTS-2."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from forecourt.edge.drivers import DriverUnavailable, PumpState
from forecourt.protocols.jsonpts.driver import JsonPtsDriver
from forecourt.sim.pts_controller import ControllerConfig, create_app, digest_response
from tests.sim.support import basic, config_dict
from tests.support import ManualClock

ENVELOPE = b'{"Protocol":"jsonPTS","Packets":[{"Id":1,"Type":"PumpGetStatus","Data":{"Pump":1}}]}'


def test_the_digest_response_matches_the_rfc_7616_md5_example():
    # RFC 7616 section 3.9.1 (the MD5 variant of its example).
    assert (
        digest_response(
            username="Mufasa",
            realm="http-auth@example.org",
            password="Circle of Life",
            method="GET",
            uri="/dir/index.html",
            nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
            nc="00000001",
            cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
        )
        == "8ca523f5e9506fed4657c9700eebdbec"
    )


def app_with(scheme: str):
    config = config_dict()
    config["auth"] = {"username": "admin", "password": "secret", "scheme": scheme}
    return create_app(ControllerConfig.from_json(config), ManualClock())


def client(app, auth: Any = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://sim", auth=auth)


@pytest.mark.parametrize(
    ("scheme", "basic_ok", "digest_ok", "challenges"),
    [
        ("any", True, True, ["Digest", "Basic"]),
        ("digest", False, True, ["Digest"]),
        ("basic", True, False, ["Basic"]),
    ],
)
async def test_each_scheme_setting_accepts_exactly_its_schemes(
    scheme, basic_ok, digest_ok, challenges
):
    app = app_with(scheme)
    async with client(app) as http:
        refused = await http.post("/jsonPTS", content=ENVELOPE)
        with_basic = await http.post("/jsonPTS", content=ENVELOPE, headers=basic("admin", "secret"))
    async with client(app, httpx.DigestAuth("admin", "secret")) as http:
        with_digest = await http.post("/jsonPTS", content=ENVELOPE)
    assert refused.status_code == 401
    assert [c.split()[0] for c in refused.headers.get_list("www-authenticate")] == challenges
    assert (with_basic.status_code == 200) is basic_ok
    assert (with_digest.status_code == 200) is digest_ok


async def test_a_digest_challenge_offers_md5_with_qop_auth():
    async with client(app_with("digest")) as http:
        refused = await http.post("/jsonPTS", content=ENVELOPE)
    (challenge,) = refused.headers.get_list("www-authenticate")
    assert 'qop="auth"' in challenge
    assert "algorithm=MD5" in challenge
    assert re.search(r'nonce="[^"]+"', challenge)


def digest_header(nonce: str, nc: str, *, uri: str = "/jsonPTS", password: str = "secret") -> str:
    response = digest_response(
        username="admin",
        realm="Pts2WebServer",
        password=password,
        method="POST",
        uri=uri,
        nonce=nonce,
        nc=nc,
        cnonce="0a4f113b",
    )
    return (
        f'Digest username="admin", realm="Pts2WebServer", nonce="{nonce}", uri="{uri}", '
        f'qop=auth, nc={nc}, cnonce="0a4f113b", response="{response}", algorithm=MD5'
    )


async def test_digest_with_a_wrong_password_a_forged_nonce_or_a_replay_is_refused():
    app = app_with("digest")
    async with client(app, httpx.DigestAuth("admin", "guess")) as http:
        assert (await http.post("/jsonPTS", content=ENVELOPE)).status_code == 401
    async with client(app) as http:
        challenge = (await http.post("/jsonPTS", content=ENVELOPE)).headers["www-authenticate"]
        nonce = re.search(r'nonce="([^"]+)"', challenge).group(1)

        async def post(authorization: str, path: str = "/jsonPTS") -> int:
            headers = {"Authorization": authorization}
            return (await http.post(path, content=ENVELOPE, headers=headers)).status_code

        assert await post(digest_header(nonce, "00000001")) == 200
        assert await post(digest_header(nonce, "00000001")) == 401  # replayed
        assert await post(digest_header(nonce, "00000002")) == 200  # the next count is fine
        assert await post(digest_header(nonce, "00000003", password="guess")) == 401
        assert await post(digest_header("1.abc", "00000004")) == 401  # a nonce we never issued
        forged = digest_header(nonce[:-1] + ("0" if nonce[-1] != "0" else "1"), "00000005")
        assert await post(forged) == 401
        # Signed for one URI, sent to another.
        assert await post(digest_header(nonce, "00000006"), "/jsonPTS?x=1") == 401
        assert (
            await post(digest_header(nonce, "00000007", uri="/jsonPTS?x=1"), "/jsonPTS?x=1") == 200
        )


async def test_the_driver_finds_its_way_to_digest_on_a_digest_only_controller():
    app = app_with("digest")
    driver = JsonPtsDriver(
        "http://sim",
        "admin",
        "secret",
        timezone="Asia/Shanghai",
        transport=httpx.ASGITransport(app),
    )
    async with driver:
        first = await driver.pump_status([1, 2])
        second = await driver.pump_status([1])
    assert [s.state for s in first + second] == [PumpState.IDLE] * 3


async def test_the_driver_reports_wrong_credentials_as_an_auth_failure():
    driver = JsonPtsDriver(
        "http://sim",
        "admin",
        "guess",
        timezone="Asia/Shanghai",
        transport=httpx.ASGITransport(app_with("any")),
    )
    async with driver:
        with pytest.raises(DriverUnavailable) as caught:
            await driver.pump_status([1])
    assert caught.value.code == "jsonpts.auth_failed"
