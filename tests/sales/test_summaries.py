"""Sales summaries, on SQLite and PostgreSQL: amounts never added across currencies, pump
tests, own use and drive-offs reported apart from sales, and a meter transaction stored twice
(a natural-key collision) counted once."""

from __future__ import annotations

from datetime import date
from typing import Any

from forecourt.sales.handlers import sales_summary
from forecourt.sales.store import SalesStore
from tests.sales.conftest import Hq, make_sale


async def summary(hq: Hq, **filters: Any) -> dict[str, Any]:
    query = {"station": "S001", "business_date": None, "grade": None, **filters}
    return await sales_summary(hq.office.db, **query)


def key(group: dict[str, Any]) -> tuple[Any, ...]:
    return (group["currency"], group["dispense_type"], group["quarantined"])


async def test_amounts_in_two_currencies_are_never_added(hq: Hq) -> None:
    cny = make_sale(nozzle=9)  # quarantined too (unknown nozzle): the same group but for currency
    eur = make_sale(currency="EUR", amount_minor=4_000)
    eur_too = make_sale(currency="EUR", amount_minor=5_000)
    response = await hq.upload("S001", [cny, eur, eur_too])
    assert {r["status"] for r in response.json()["results"]} == {"quarantined"}
    groups = {key(g): g for g in (await summary(hq))["groups"]}
    assert set(groups) == {("CNY", "sale", True), ("EUR", "sale", True)}
    assert (groups["CNY", "sale", True]["sales"], groups["CNY", "sale", True]["amount_minor"]) == (
        1,
        30_200,
    )
    assert (groups["EUR", "sale", True]["sales"], groups["EUR", "sale", True]["amount_minor"]) == (
        2,
        9_000,
    )


async def test_the_store_groups_by_currency_and_dispense_type(hq: Hq) -> None:
    await hq.upload("S001", [make_sale(currency="EUR"), make_sale(nozzle=9)])
    async with hq.office.db.connection() as conn:
        rows = await SalesStore(conn).summary(station="S001", business_date=None, grade=None)
    assert sorted((r.currency, r.dispense_type, int(r.amount_minor)) for r in rows) == [
        ("CNY", "sale", 30_200),
        ("EUR", "sale", 30_200),
    ]


async def test_pump_tests_own_use_and_drive_offs_are_reported_apart_from_sales(hq: Hq) -> None:
    sales = [
        make_sale(),
        make_sale(),
        make_sale(dispense_type="pump_test"),
        make_sale(dispense_type="own_use"),
        make_sale(dispense_type="drive_off"),
    ]
    response = await hq.upload("S001", sales)
    assert {r["status"] for r in response.json()["results"]} == {"created"}
    result = await summary(hq)
    groups = {g["dispense_type"]: g for g in result["groups"]}
    assert set(groups) == {"sale", "pump_test", "own_use", "drive_off"}
    assert {t: (g["sales"], g["dispensings"]) for t, g in groups.items()} == {
        "sale": (2, 2),
        "pump_test": (0, 1),
        "own_use": (0, 1),
        "drive_off": (0, 1),
    }
    assert groups["sale"]["volume_ml"] == 80_000
    assert groups["pump_test"]["volume_ml"] == 40_000
    assert result["totals"] == [
        {"currency": "CNY", "sales": 2, "volume_ml": 80_000, "amount_minor": 60_400}
    ]


async def test_a_natural_key_collision_is_counted_once(hq: Hq) -> None:
    first = make_sale()
    twin = make_sale(  # the same meter transaction under another sale_id
        device_txn=first["device_txn"],
        totalizer_start_ml=first["totalizer_start_ml"],
        totalizer_end_ml=first["totalizer_end_ml"],
    )
    other = make_sale()
    await hq.upload("S001", [first, other])
    response = await hq.upload("S001", [twin])
    assert response.json()["results"][0]["flags"] == ["natural_key_collision"]
    result = await summary(hq)
    (group,) = result["groups"]
    assert (group["sales"], group["volume_ml"], group["amount_minor"]) == (2, 80_000, 60_400)
    assert result["natural_key_duplicates"] == 1
    assert result["totals"] == [
        {"currency": "CNY", "sales": 2, "volume_ml": 80_000, "amount_minor": 60_400}
    ]


async def test_summaries_filter_and_keep_grades_and_quarantine_apart(hq: Hq) -> None:
    await hq.upload(
        "S001",
        [
            make_sale(),
            make_sale(nozzle=2, grade="95", unit_price_mmu=803_000, amount_minor=32_120),
            make_sale(nozzle=9),  # quarantined
            make_sale(business_date="2026-11-24"),
        ],
    )
    result = await summary(hq, business_date=None)
    assert sorted((g["grade"], g["quarantined"], g["sales"]) for g in result["groups"]) == [
        ("92", False, 2),
        ("92", True, 1),
        ("95", False, 1),
    ]
    assert result["totals"] == [
        {"currency": "CNY", "sales": 3, "volume_ml": 120_000, "amount_minor": 92_520}
    ]
    one_day = await summary(hq, business_date=date(2026, 11, 24), grade="92")
    assert [(g["grade"], g["sales"]) for g in one_day["groups"]] == [("92", 1)]
