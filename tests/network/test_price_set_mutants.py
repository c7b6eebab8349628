"""Price-set checks that hand mutation testing found unpinned: a gap in a station set, the
last instant a set may be published for, an empty set, and the ceiling in currencies whose
minor unit is not a hundredth. On SQLite and PostgreSQL, with the head office of
test_price_sets (the sample chain, 2026-06-01 12:00 in Shanghai)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from forecourt.network.domain import MAX_LEAD, MAX_MINOR_PER_LITRE, parse_unit_price
from tests.cli import support as cli
from tests.network.test_price_sets import NOW, US, Office, office, refusal, revision

__all__ = ["office"]  # a fixture, imported for pytest


async def test_a_station_set_that_leaves_a_grade_it_sells_unpriced_is_refused(
    office: Office,
) -> None:
    # Given S003 sells 92, 95, 98 and diesel (0)
    # When a set for S003 alone prices 92 only
    response = await office.publish(scope="station", scope_code="S003", prices={"92": "7.89"})
    # Then it is refused with the gap at S003, and at no other station
    problems = refusal(response, 422, "network.price_set_invalid")
    assert problems == ["gap: station S003 sells 0, 95, 98 but the set has no price for them"]
    assert await revision(office.db) == 1
    # And a set for S003 pricing all it sells is taken
    taken = await office.publish(scope="station", scope_code="S003")
    assert taken.status_code == 201, taken.text


async def test_a_set_exactly_366_days_ahead_is_taken_and_one_a_microsecond_later_refused(
    office: Office,
) -> None:
    # Given the furthest instant a set may start at
    assert timedelta(days=366) == MAX_LEAD
    last = NOW + MAX_LEAD
    # When a set starts a microsecond after it, Then it is refused
    late = await office.publish(effective_from=(last + US).isoformat())
    assert "more than 366 days ahead" in refusal(late, 422, "network.price_set_invalid")[0]
    # When a set starts exactly then, Then it is taken
    response = await office.publish(effective_from=last.isoformat())
    assert response.status_code == 201, response.text


async def test_an_empty_set_is_refused_for_pricing_nothing(office: Office) -> None:
    # When a set with no price at all is published
    response = await office.publish(prices={})
    # Then the first problem named is that it prices nothing (its gaps follow)
    problems = refusal(response, 422, "network.price_set_invalid")
    assert problems[0] == "prices: a price set prices at least one grade"
    assert all(p.startswith("gap:") for p in problems[1:])


@pytest.mark.parametrize(
    ("currency", "highest", "too_high"),
    [
        ("JPY", "10000", "10001"),
        ("KWD", "10.000", "10.001"),
        ("EUR", "100.00", "100.01"),
    ],
)
def test_the_ceiling_is_max_minor_units_per_litre_in_the_currency_s_own_minor_unit(
    currency: str, highest: str, too_high: str
) -> None:
    # Given MAX_MINOR_PER_LITRE minor units per litre, written in each currency's major units
    # When the highest price is parsed, Then it is taken exactly
    assert parse_unit_price("92", highest, currency) == (MAX_MINOR_PER_LITRE * 1000, None)
    # And the next step up is refused as above the ceiling
    value, problem = parse_unit_price("92", too_high, currency)
    assert value is None
    assert problem is not None
    assert f"above the ceiling of {highest} {currency}/L" in problem


async def test_a_grade_priced_twice_in_one_body_is_refused_not_priced_at_its_last_figure(
    office: Office,
) -> None:
    # Given a body that gives 92 twice (JSON would keep the second figure)
    body = (
        '{"effective_from": "2026-12-24T00:00:00+08:00", "scope": "chain", "prices": '
        '{"92": "7.89", "95": "8.41", "98": "9.20", "0": "7.35", "92": "78.90"}}'
    )
    # When it is published
    response = await office.client.post(
        "/v1/network/price-sets", content=body, headers={"content-type": "application/json"}
    )
    # Then it is refused, naming the grade, and nothing is stored
    assert refusal(response, 422, "network.price_set_invalid") == ["92: given twice"]
    assert await revision(office.db) == 1


def test_a_price_set_file_giving_a_grade_twice_is_refused_in_one_line(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'hq.db'}"
    assert cli.run(["import", "--sample", "--database-url", database], tmp_path).code == 0
    starts = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
    twice = tmp_path / "prices.yaml"
    twice.write_text(
        f"effective_from: '{starts.isoformat()}'\n"
        "prices:\n  '92': '7.89'\n  '95': '8.41'\n  '98': '9.20'\n  '0': '7.35'\n"
        "  '92': '78.90'\n",
        encoding="utf-8",
    )
    refused = cli.run(["publish-prices", str(twice), "--database-url", database], tmp_path)
    assert refused.code == 1
    assert "'92' is given twice" in refused.one_line_error()
    assert "Traceback" not in refused.stderr
