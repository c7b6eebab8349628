"""The network's pure rules: business days, shifts, which price is in force, station checks.

Business days and shifts are checked at the instants where they change — local midnight, the
cut-off, and across daylight-saving changes (Europe/Berlin switches on 2026-03-29 and
2026-10-25 at 01:00 UTC; Asia/Shanghai has no DST).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forecourt.kernel.money import Rounding
from forecourt.network.domain import (
    DispenserModel,
    NetworkError,
    Price,
    PriceScope,
    Station,
    business_date,
    effective_prices,
    shift_id,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")
BERLIN = ZoneInfo("Europe/Berlin")
MIDNIGHT = time(0, 0)
SIX = time(6, 0)
US = timedelta(microseconds=1)


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


def local(zone: ZoneInfo, *parts: int) -> datetime:
    return datetime(*parts, tzinfo=zone)  # type: ignore[misc]


# --- business_date -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("zone", "cutoff", "at", "expected"),
    [
        # Shanghai, cut-off at midnight: the day changes at 16:00 UTC
        (SHANGHAI, MIDNIGHT, utc(2026, 11, 24, 15, 59, 59, 999_999), date(2026, 11, 24)),
        (SHANGHAI, MIDNIGHT, utc(2026, 11, 24, 16, 0), date(2026, 11, 25)),
        # Shanghai, cut-off at 06:00: local midnight is still the previous business day
        (SHANGHAI, SIX, utc(2026, 11, 24, 16, 0), date(2026, 11, 24)),
        (SHANGHAI, SIX, utc(2026, 11, 24, 21, 59, 59, 999_999), date(2026, 11, 24)),
        (SHANGHAI, SIX, utc(2026, 11, 24, 22, 0), date(2026, 11, 25)),
        # Berlin, spring change (CET → CEST): midnight before is +01:00, midnight after +02:00
        (BERLIN, MIDNIGHT, utc(2026, 3, 28, 22, 59, 59, 999_999), date(2026, 3, 28)),
        (BERLIN, MIDNIGHT, utc(2026, 3, 28, 23, 0), date(2026, 3, 29)),
        (BERLIN, MIDNIGHT, utc(2026, 3, 29, 21, 59, 59, 999_999), date(2026, 3, 29)),
        (BERLIN, MIDNIGHT, utc(2026, 3, 29, 22, 0), date(2026, 3, 30)),
        # Berlin, spring change, cut-off 06:00: 05:00 UTC the day before, 04:00 UTC after
        (BERLIN, SIX, utc(2026, 3, 28, 4, 59, 59, 999_999), date(2026, 3, 27)),
        (BERLIN, SIX, utc(2026, 3, 28, 5, 0), date(2026, 3, 28)),
        (BERLIN, SIX, utc(2026, 3, 29, 0, 59, 59), date(2026, 3, 28)),  # 01:59:59 CET
        (BERLIN, SIX, utc(2026, 3, 29, 1, 0), date(2026, 3, 28)),  # 03:00 CEST
        (BERLIN, SIX, utc(2026, 3, 29, 3, 59, 59, 999_999), date(2026, 3, 28)),
        (BERLIN, SIX, utc(2026, 3, 29, 4, 0), date(2026, 3, 29)),
        # Berlin, autumn change (CEST → CET)
        (BERLIN, MIDNIGHT, utc(2026, 10, 24, 21, 59, 59, 999_999), date(2026, 10, 24)),
        (BERLIN, MIDNIGHT, utc(2026, 10, 24, 22, 0), date(2026, 10, 25)),
        (BERLIN, MIDNIGHT, utc(2026, 10, 25, 22, 59, 59, 999_999), date(2026, 10, 25)),
        (BERLIN, MIDNIGHT, utc(2026, 10, 25, 23, 0), date(2026, 10, 26)),
        (BERLIN, SIX, utc(2026, 10, 25, 0, 30), date(2026, 10, 24)),  # 02:30 CEST
        (BERLIN, SIX, utc(2026, 10, 25, 1, 30), date(2026, 10, 24)),  # 02:30 CET, again
        (BERLIN, SIX, utc(2026, 10, 25, 4, 59, 59, 999_999), date(2026, 10, 24)),
        (BERLIN, SIX, utc(2026, 10, 25, 5, 0), date(2026, 10, 25)),
    ],
)
def test_an_instant_belongs_to_the_business_day_of_its_local_time_minus_the_cutoff(
    zone: ZoneInfo, cutoff: time, at: datetime, expected: date
) -> None:
    assert business_date(at, zone, cutoff) == expected


def first_instant_of(day: date, zone: ZoneInfo, cutoff: time) -> datetime:
    """Where business day ``day`` starts, found by bisection on ``business_date`` alone."""
    low = datetime.combine(day, MIDNIGHT, tzinfo=UTC) - timedelta(days=1)
    high = low + timedelta(days=3)
    assert business_date(low, zone, cutoff) < day <= business_date(high, zone, cutoff)
    while high - low > US:
        middle = low + (high - low) / 2
        if business_date(middle, zone, cutoff) < day:
            low = middle
        else:
            high = middle
    return high


@pytest.mark.parametrize(
    ("day", "cutoff", "starts_at", "hours"),
    [
        (date(2026, 3, 28), SIX, utc(2026, 3, 28, 5, 0), 23),  # the day the clocks go forward
        (date(2026, 3, 29), SIX, utc(2026, 3, 29, 4, 0), 24),
        (date(2026, 10, 24), SIX, utc(2026, 10, 24, 4, 0), 25),  # the day the clocks go back
        (date(2026, 3, 29), MIDNIGHT, utc(2026, 3, 28, 23, 0), 23),
        (date(2026, 10, 25), MIDNIGHT, utc(2026, 10, 24, 22, 0), 25),
    ],
)
def test_a_business_day_across_a_dst_change_is_an_hour_shorter_or_longer(
    day: date, cutoff: time, starts_at: datetime, hours: int
) -> None:
    # When the first instants of a business day and of the next one are located
    start = first_instant_of(day, BERLIN, cutoff)
    end = first_instant_of(day + timedelta(days=1), BERLIN, cutoff)
    # Then the day starts at the cut-off in the local time of that moment
    assert start == starts_at
    assert start.astimezone(BERLIN).time() == cutoff
    # And it lasts as long as the wall clock says, not always 24 hours
    assert end - start == timedelta(hours=hours)


@given(
    at=st.datetimes(
        min_value=datetime(2000, 1, 1),  # noqa: DTZ001 - hypothesis bounds are naive
        max_value=datetime(2100, 1, 1),  # noqa: DTZ001
        timezones=st.just(UTC),
    ),
    offset_minutes=st.integers(min_value=-12 * 60, max_value=14 * 60),
    zone=st.sampled_from([SHANGHAI, BERLIN, ZoneInfo("America/New_York")]),
    cutoff=st.sampled_from([MIDNIGHT, SIX, time(4, 30)]),
)
def test_the_business_day_depends_on_the_instant_not_on_how_it_is_written(
    at: datetime, offset_minutes: int, zone: ZoneInfo, cutoff: time
) -> None:
    elsewhere = at.astimezone(timezone(timedelta(minutes=offset_minutes)))
    assert business_date(elsewhere, zone, cutoff) == business_date(at, zone, cutoff)
    assert business_date(at.astimezone(zone), zone, cutoff) == business_date(at, zone, cutoff)


def _shift_key(value: str) -> tuple[date, int]:
    day, number = value.split("/")
    return date.fromisoformat(day), int(number)


@pytest.mark.parametrize(
    ("zone", "cutoff", "shift_starts", "window_start"),
    [
        pytest.param(SHANGHAI, SIX, (SIX, time(14), time(22)), utc(2026, 11, 24), id="shanghai"),
        pytest.param(BERLIN, SIX, (SIX, time(14), time(22)), utc(2026, 3, 28), id="berlin-spring"),
        pytest.param(BERLIN, SIX, (SIX, time(14), time(22)), utc(2026, 10, 24), id="berlin-autumn"),
        pytest.param(
            BERLIN, MIDNIGHT, (MIDNIGHT, time(8), time(16)), utc(2026, 10, 24), id="midnight"
        ),
        pytest.param(
            BERLIN,
            SIX,
            (SIX, time(18), time(2, 30)),
            utc(2026, 10, 24),
            id="night shift starting inside the repeated hour",
        ),
        pytest.param(
            BERLIN,
            time(2, 30),
            (time(2, 30), time(14, 30)),
            utc(2026, 10, 24),
            id="cut-off inside the repeated hour",
        ),
        pytest.param(
            BERLIN,
            time(2, 30),
            (time(2, 30), time(14, 30)),
            utc(2026, 3, 28),
            id="cut-off inside the skipped hour",
        ),
        pytest.param(
            ZoneInfo("America/Havana"),  # clocks go back from 01:00 to 00:00
            time(0, 30),
            (time(0, 30), time(12)),
            utc(2026, 10, 31),
            id="havana cut-off 00:30",
        ),
    ],
)
def test_a_later_instant_never_belongs_to_an_earlier_business_day_or_shift(
    zone: ZoneInfo, cutoff: time, shift_starts: tuple[time, ...], window_start: datetime
) -> None:
    # Given instants every five minutes across two days around a DST change
    instants = [window_start + timedelta(minutes=5 * i) for i in range(2 * 24 * 12)]
    # When each is given its business day and shift
    days = [business_date(at, zone, cutoff) for at in instants]
    shifts = [_shift_key(shift_id(at, zone, cutoff, shift_starts)) for at in instants]
    # Then neither ever goes back in time, and the shift is always one of the station's
    assert days == sorted(days)
    assert shifts == sorted(shifts)
    assert [day for day, _ in shifts] == days
    assert {number for _, number in shifts} == set(range(1, len(shift_starts) + 1))


# --- shift_id ------------------------------------------------------------------------------

THREE_SHIFTS_FROM_MIDNIGHT = (MIDNIGHT, time(8), time(16))
THREE_SHIFTS_FROM_SIX = (SIX, time(14), time(22))
NIGHT_SHIFT_AFTER_MIDNIGHT = (SIX, time(18), time(2))


@pytest.mark.parametrize(
    ("cutoff", "shift_starts", "at", "expected"),
    [
        (MIDNIGHT, THREE_SHIFTS_FROM_MIDNIGHT, (2026, 11, 25, 0, 0), "2026-11-25/1"),
        (MIDNIGHT, THREE_SHIFTS_FROM_MIDNIGHT, (2026, 11, 25, 7, 59, 59, 999_999), "2026-11-25/1"),
        (MIDNIGHT, THREE_SHIFTS_FROM_MIDNIGHT, (2026, 11, 25, 8, 0), "2026-11-25/2"),
        (MIDNIGHT, THREE_SHIFTS_FROM_MIDNIGHT, (2026, 11, 25, 16, 0), "2026-11-25/3"),
        (MIDNIGHT, THREE_SHIFTS_FROM_MIDNIGHT, (2026, 11, 25, 23, 59, 59), "2026-11-25/3"),
        (SIX, THREE_SHIFTS_FROM_SIX, (2026, 11, 25, 5, 59, 59, 999_999), "2026-11-24/3"),
        (SIX, THREE_SHIFTS_FROM_SIX, (2026, 11, 25, 6, 0), "2026-11-25/1"),
        (SIX, THREE_SHIFTS_FROM_SIX, (2026, 11, 25, 13, 59, 59), "2026-11-25/1"),
        (SIX, THREE_SHIFTS_FROM_SIX, (2026, 11, 25, 14, 0), "2026-11-25/2"),
        (SIX, THREE_SHIFTS_FROM_SIX, (2026, 11, 25, 22, 0), "2026-11-25/3"),
        (SIX, THREE_SHIFTS_FROM_SIX, (2026, 11, 26, 1, 0), "2026-11-25/3"),
        # the third shift starts at 02:00, after midnight, yet belongs to the day before
        (SIX, NIGHT_SHIFT_AFTER_MIDNIGHT, (2026, 11, 25, 17, 59, 59), "2026-11-25/1"),
        (SIX, NIGHT_SHIFT_AFTER_MIDNIGHT, (2026, 11, 25, 18, 0), "2026-11-25/2"),
        (SIX, NIGHT_SHIFT_AFTER_MIDNIGHT, (2026, 11, 26, 0, 0), "2026-11-25/2"),
        (SIX, NIGHT_SHIFT_AFTER_MIDNIGHT, (2026, 11, 26, 1, 59, 59, 999_999), "2026-11-25/2"),
        (SIX, NIGHT_SHIFT_AFTER_MIDNIGHT, (2026, 11, 26, 2, 0), "2026-11-25/3"),
        (SIX, NIGHT_SHIFT_AFTER_MIDNIGHT, (2026, 11, 26, 5, 59, 59, 999_999), "2026-11-25/3"),
        (SIX, NIGHT_SHIFT_AFTER_MIDNIGHT, (2026, 11, 26, 6, 0), "2026-11-26/1"),
    ],
)
def test_shifts_are_numbered_from_the_cutoff_within_the_business_day(
    cutoff: time, shift_starts: tuple[time, ...], at: tuple[int, ...], expected: str
) -> None:
    # Given a Shanghai station's shift plan, in any order it was written
    instant = local(SHANGHAI, *at)
    # When an instant is placed into a shift
    forwards = shift_id(instant, SHANGHAI, cutoff, shift_starts)
    backwards = shift_id(instant, SHANGHAI, cutoff, tuple(reversed(shift_starts)))
    # Then it is the n-th shift of its business day, counted from the cut-off
    assert forwards == expected
    assert backwards == expected


def test_shifts_follow_local_time_across_the_spring_change() -> None:
    # 22:00 CEST on 2026-03-29 is 20:00 UTC; the day before, 22:00 CET was 21:00 UTC
    assert shift_id(utc(2026, 3, 29, 19, 59, 59), BERLIN, SIX, THREE_SHIFTS_FROM_SIX) == (
        "2026-03-29/2"
    )
    assert shift_id(utc(2026, 3, 29, 20, 0), BERLIN, SIX, THREE_SHIFTS_FROM_SIX) == "2026-03-29/3"
    assert shift_id(utc(2026, 3, 28, 20, 0), BERLIN, SIX, THREE_SHIFTS_FROM_SIX) == "2026-03-28/2"


@given(
    at=st.datetimes(
        min_value=datetime(2020, 1, 1),  # noqa: DTZ001 - hypothesis bounds are naive
        max_value=datetime(2040, 1, 1),  # noqa: DTZ001
        timezones=st.just(UTC),
    ),
    plan=st.sampled_from(
        [
            (MIDNIGHT, THREE_SHIFTS_FROM_MIDNIGHT),
            (SIX, THREE_SHIFTS_FROM_SIX),
            (SIX, NIGHT_SHIFT_AFTER_MIDNIGHT),
            (SIX, (SIX,)),
        ]
    ),
    zone=st.sampled_from([SHANGHAI, BERLIN]),
)
def test_a_shift_id_names_the_business_day_and_one_of_its_shifts(
    at: datetime, plan: tuple[time, tuple[time, ...]], zone: ZoneInfo
) -> None:
    cutoff, starts = plan
    day, number = _shift_key(shift_id(at, zone, cutoff, starts))
    assert day == business_date(at, zone, cutoff)
    assert 1 <= number <= len(starts)


# --- effective_prices ----------------------------------------------------------------------

JAN = datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=8)))
SWITCH = datetime(2026, 11, 13, tzinfo=timezone(timedelta(hours=8)))


def price(
    mmu: int,
    effective_from: datetime,
    scope: PriceScope = PriceScope.CHAIN,
    scope_code: str = "DEMO",
    grade: str = "92",
) -> Price:
    return Price(
        grade=grade,
        scope=scope,
        scope_code=scope_code,
        milli_minor_per_litre=mmu,
        currency="CNY",
        effective_from=effective_from,
        price_id=f"{grade}-{scope.value}-{scope_code}-{mmu}",
    )


def in_force(prices: list[Price], at: datetime, station: str = "S001", region: str = "EAST") -> int:
    return effective_prices(prices, station=station, region=region, at=at)[
        "92"
    ].milli_minor_per_litre


def test_a_new_price_takes_over_exactly_at_its_effective_instant() -> None:
    # Given a chain price and a later one
    prices = [price(762_000, JAN), price(755_000, SWITCH)]
    # Then one microsecond before the switch the old price holds, at the switch the new one
    assert in_force(prices, SWITCH - US) == 762_000
    assert in_force(prices, SWITCH) == 755_000
    # And the same instant written in UTC switches just the same
    assert in_force(prices, SWITCH.astimezone(UTC)) == 755_000
    assert in_force(prices, (SWITCH - US).astimezone(UTC)) == 762_000


def test_before_any_price_is_effective_the_grade_has_no_price() -> None:
    prices = [price(762_000, JAN)]
    assert effective_prices(prices, station="S001", region="EAST", at=JAN - US) == {}


def test_the_order_prices_are_listed_in_does_not_matter() -> None:
    prices = [price(755_000, SWITCH), price(762_000, JAN)]
    assert in_force(prices, SWITCH - US) == 762_000
    assert in_force(prices, SWITCH) == 755_000


def test_a_station_price_overrides_a_region_price_which_overrides_the_chain_price() -> None:
    # Given a chain price, an EAST region price and a price for station S001
    prices = [
        price(762_000, JAN),
        price(770_000, JAN, PriceScope.REGION, "EAST"),
        price(780_000, JAN, PriceScope.STATION, "S001"),
    ]
    # Then each station gets the most specific price that applies to it
    assert in_force(prices, SWITCH, station="S001", region="EAST") == 780_000
    assert in_force(prices, SWITCH, station="S002", region="EAST") == 770_000
    assert in_force(prices, SWITCH, station="S003", region="WEST") == 762_000


def test_a_more_specific_price_wins_even_over_a_newer_chain_price() -> None:
    prices = [price(770_000, JAN, PriceScope.REGION, "EAST"), price(755_000, SWITCH)]
    assert in_force(prices, SWITCH + timedelta(days=1)) == 770_000


def test_a_scheduled_station_price_does_not_apply_before_its_instant() -> None:
    later = SWITCH + timedelta(hours=6)
    prices = [price(762_000, JAN), price(700_000, later, PriceScope.STATION, "S001")]
    assert in_force(prices, later - US) == 762_000
    assert in_force(prices, later) == 700_000


def test_prices_for_other_stations_and_regions_are_ignored() -> None:
    # Given prices for another station and another region only, besides the chain price
    prices = [
        price(762_000, JAN),
        price(600_000, JAN, PriceScope.STATION, "S002"),
        price(650_000, JAN, PriceScope.REGION, "WEST"),
    ]
    # Then S001 in EAST pays the chain price
    assert in_force(prices, SWITCH) == 762_000
    # And a station code that merely equals a region code does not match as a region
    assert in_force([*prices, price(1, JAN, PriceScope.STATION, "EAST")], SWITCH) == 762_000


def test_each_grade_gets_its_own_price() -> None:
    prices = [price(762_000, JAN, grade="92"), price(811_000, JAN, grade="95")]
    chosen = effective_prices(prices, station="S001", region="EAST", at=SWITCH)
    assert {g: p.milli_minor_per_litre for g, p in chosen.items()} == {"92": 762_000, "95": 811_000}


scopes = st.sampled_from(
    [
        (PriceScope.CHAIN, "DEMO"),
        (PriceScope.REGION, "EAST"),
        (PriceScope.REGION, "WEST"),
        (PriceScope.STATION, "S001"),
        (PriceScope.STATION, "S002"),
    ]
)
instants = st.integers(min_value=0, max_value=1000).map(lambda h: JAN + timedelta(hours=h))


@given(
    listed=st.lists(st.tuples(scopes, instants, st.sampled_from(["92", "95"])), max_size=12),
    at=instants,
)
def test_the_chosen_price_is_in_force_applies_and_nothing_more_specific_or_newer_exists(
    listed: list[tuple[tuple[PriceScope, str], datetime, str]], at: datetime
) -> None:
    prices = [
        price(i, when, scope, code, grade) for i, ((scope, code), when, grade) in enumerate(listed)
    ]
    rank = {PriceScope.CHAIN: 0, PriceScope.REGION: 1, PriceScope.STATION: 2}
    applicable = [
        p for p in prices if p.effective_from <= at and p.scope_code in ("DEMO", "EAST", "S001")
    ]
    chosen = effective_prices(prices, station="S001", region="EAST", at=at)
    assert set(chosen) == {p.grade for p in applicable}
    for grade, winner in chosen.items():
        assert winner in applicable
        rivals = [p for p in applicable if p.grade == grade]
        best_rank = max(rank[p.scope] for p in rivals)
        assert rank[winner.scope] == best_rank
        assert winner.effective_from == max(
            p.effective_from for p in rivals if rank[p.scope] == best_rank
        )


# --- Station and equipment checks ---------------------------------------------------------


def station(**overrides: object) -> Station:
    fields: dict[str, object] = {
        "code": "S001",
        "name": "Pudong",
        "region": "EAST",
        "timezone": "Asia/Shanghai",
    }
    fields.update(overrides)
    return Station(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("zone", ["Mars/Olympus", "Asia/Shanghai ", "", "../etc/passwd", "CST+8"])
def test_a_station_in_an_unknown_timezone_is_refused(zone: str) -> None:
    with pytest.raises(NetworkError, match="timezone"):
        station(timezone=zone)


def test_a_cutoff_that_is_not_the_start_of_a_shift_is_refused() -> None:
    with pytest.raises(NetworkError, match="cut-off"):
        station(business_day_cutoff=SIX)  # shifts default to one starting at midnight
    with pytest.raises(NetworkError, match="cut-off"):
        station(business_day_cutoff=SIX, shift_starts=(time(7), time(15), time(23)))


def test_a_station_whose_cutoff_starts_a_shift_is_accepted() -> None:
    accepted = station(business_day_cutoff=SIX, shift_starts=(time(22), SIX, time(14)))
    assert accepted.zone == SHANGHAI


def test_a_price_without_a_timezone_is_refused() -> None:
    with pytest.raises(NetworkError):
        price(762_000, datetime(2026, 1, 1))  # noqa: DTZ001 - the point of the test


@pytest.mark.parametrize(
    "fields",
    [{"amount_resolution_minor": 0}, {"volume_decimals": 4}, {"volume_decimals": -1}],
)
def test_a_dispenser_model_with_impossible_settings_is_refused(fields: dict[str, int]) -> None:
    with pytest.raises(NetworkError):
        DispenserModel(code="X", rounding=Rounding.HALF_UP, **fields)
