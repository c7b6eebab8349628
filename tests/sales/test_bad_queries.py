"""The sales query API refuses what it cannot read, on SQLite and on PostgreSQL: a control
character in any parameter (PostgreSQL text cannot hold NUL: it was a 500) and any date,
number or id not written exactly as documented (``business_date=0`` was read as 1970-01-01
and answered as if nothing matched). Each refusal is 422 in the envelope, naming the field."""

from __future__ import annotations

import httpx
import pytest

from forecourt.kernel.events import trace_id_of
from tests.sales.conftest import Hq, make_sale

CONTROLS = ["%00", "%01", "%09", "%0A", "%1F", "%7F", "%C2%85"]
# Every query parameter and path parameter of the sales queries, with a valid value
PARAMETERS = [
    ("/v1/sales", "station", "S001"),
    ("/v1/sales", "business_date", "2026-11-25"),
    ("/v1/sales", "grade", "92"),
    ("/v1/sales", "after", "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"),
    ("/v1/sales", "limit", "10"),
    ("/v1/sales/summary", "station", "S001"),
    ("/v1/sales/summary", "business_date", "2026-11-25"),
    ("/v1/sales/summary", "grade", "92"),
    ("/v1/sales/alerts", "station", "S001"),
    ("/v1/sales/alerts", "limit", "10"),
]
BAD_DATES = [
    "0",  # was read as a Unix time: 1970-01-01
    "1",
    "-1",
    "",
    "2026-1-5",
    "20261125",
    "2026-11-25T00:00:00",
    "2026-11-25T00:00",
    " 2026-11-25",
    "2026-11-25 ",
    "2026-02-30",
    "2026-13-01",
    "0001-01-01",
    "1999-12-31",
    "2101-01-01",
    "9999-12-31",
    "\u0662\u0660\u0662\u0666-11-25",  # Arabic-Indic digits
]
BAD_NUMBERS = ["", "abc", "1.0", "1e2", "1_0", "+5", " 5", "5 ", "0x10", "\u0665", "9" * 40]
BAD_IDS = [
    "not-a-uuid",
    "0193a1b2c3d47e5f8a9b0c1d2e3f4a5b",
    "{0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b}",
    "urn:uuid:0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
    "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5",
]


def assert_refused(response: httpx.Response, loc: list[str]) -> dict[str, str]:
    """422 in the envelope (with the request's trace id), one error naming ``loc``."""
    assert response.status_code == 422, (response.request.url, response.text)
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "request.invalid"
    assert error["trace_id"] == trace_id_of(response.headers["traceparent"])
    [only] = error["details"]["errors"]
    assert only["loc"] == loc, (response.request.url, only)
    return only  # type: ignore[no-any-return]


async def test_a_control_character_in_any_parameter_is_refused(hq: Hq) -> None:
    for control in CONTROLS:
        for route, name, value in PARAMETERS:
            # In the value, at its start, middle or end
            for bad in (control + value, value[:1] + control + value[1:], value + control):
                response = await hq.client.get(f"{route}?{name}={bad}")
                assert_refused(response, ["query", name])
        # And in the station code of the sequence route's path
        for path in (
            f"/v1/stations/{control}S001/sequence",
            f"/v1/stations/S0{control}01/sequence",
        ):
            assert_refused(await hq.client.get(path), ["path"])


async def test_a_date_not_written_yyyy_mm_dd_or_out_of_range_is_refused(hq: Hq) -> None:
    for route in ("/v1/sales", "/v1/sales/summary"):
        for bad in BAD_DATES:
            response = await hq.client.get(route, params={"business_date": bad})
            assert_refused(response, ["query", "business_date"])


async def test_a_number_or_a_sale_id_not_written_as_documented_is_refused(hq: Hq) -> None:
    for route in ("/v1/sales", "/v1/sales/alerts"):
        for bad in [*BAD_NUMBERS, "0", "-1", "1000001"]:
            response = await hq.client.get(route, params={"limit": bad})
            assert_refused(response, ["query", "limit"])
    for bad in BAD_IDS:
        response = await hq.client.get("/v1/sales", params={"after": bad})
        assert_refused(response, ["query", "after"])


async def test_a_code_longer_than_the_network_stores_is_refused(hq: Hq) -> None:
    long = "S" * 41
    for route, name in [
        ("/v1/sales", "station"),
        ("/v1/sales", "grade"),
        ("/v1/sales/summary", "station"),
        ("/v1/sales/summary", "grade"),
        ("/v1/sales/alerts", "station"),
    ]:
        assert_refused(await hq.client.get(route, params={name: long}), ["query", name])
    assert_refused(await hq.client.get(f"/v1/stations/{long}/sequence"), ["path", "code"])


@pytest.mark.parametrize(
    "url",
    [
        "/v1/sales?business_date=2000-01-01&limit=1",
        "/v1/sales?business_date=2100-12-31&limit=5000",
        "/v1/sales?after=0193A1B2-C3D4-7E5F-8A9B-0C1D2E3F4A5B",
        "/v1/sales?station=" + "S" * 40 + "&grade=" + "9" * 40,
        "/v1/sales/summary?business_date=2024-02-29",
        "/v1/sales/alerts?limit=1000",
        "/v1/stations/" + "S" * 40 + "/sequence",
    ],
)
async def test_values_written_as_documented_are_answered_at_the_edges_of_their_range(
    hq: Hq, url: str
) -> None:
    response = await hq.client.get(url)
    assert response.status_code == 200, response.text


async def test_a_date_query_finds_the_sales_of_that_date_and_no_other(hq: Hq) -> None:
    sale = make_sale()
    assert (await hq.upload("S001", [sale])).status_code == 200

    async def found(business_date: str) -> list[str]:
        response = await hq.client.get("/v1/sales", params={"business_date": business_date})
        assert response.status_code == 200
        return [item["sale_id"] for item in response.json()["items"]]

    assert await found("2026-11-25") == [sale["sale_id"]]
    assert await found("2026-11-26") == []
    summary = await hq.client.get("/v1/sales/summary", params={"business_date": "2026-11-25"})
    assert [g["sales"] for g in summary.json()["groups"]] == [1]
