"""Customers pay at the counter in the demo: through each edge's POS API as the station's
cashier, by WeChat Pay, Alipay (their simulators in processes of their own) or cash. The
reconciliation adds payments per station, to the fen: HQ's payments (paid less refunded) are
the paid sales' amounts, no sale is paid twice, the providers' trades are HQ's code payments;
a payment HQ loses is seen."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from forecourt.demo import (
    DemoChain,
    DemoOptions,
    PaymentFigures,
    Reconciliation,
    Tally,
    describe_payments,
    report,
)
from forecourt.payments.store import order_t

pytestmark = pytest.mark.e2e


def test_the_payments_agree_only_when_hq_the_edge_and_the_providers_all_do() -> None:
    def agreeing() -> PaymentFigures:
        figures = PaymentFigures(sales=3, paid_at_edge=Tally(3, 30_000))
        figures.hq_paid, figures.hq_paid_fen = Tally(3, 30_000), 30_000
        figures.by_tender = {
            "wechat": Tally(1, 10_000),
            "alipay": Tally(1, 12_000),
            "cash": Tally(1, 8_000),
        }
        figures.at_providers = {"wechat": Tally(1, 10_000), "alipay": Tally(1, 12_000)}
        return figures

    def result(figures: PaymentFigures) -> dict[str, object]:
        rec = Reconciliation(payments_enabled=True, payments={"S001": figures})
        return report(rec, 1, True, 0.0)

    assert result(agreeing())["agree"] is True
    assert report(Reconciliation(), 1, True, 0.0)["payments"] == {"enabled": False, "agree": True}
    one_more_trade = agreeing()
    one_more_trade.at_providers["alipay"].add(1, 500)
    refunded = agreeing()
    refunded.hq_refunded_fen = 1  # HQ holds one fen less than the paid sales
    twice = agreeing()
    twice.paid_twice = 1
    for figures in (one_more_trade, refunded, twice):
        answer = result(figures)
        assert answer["agree"] is False
        assert answer["payments"]["agree"] is False  # type: ignore[index]
    # An unpaid sale (still pumping at the end) is counted, not a disagreement.
    pumping = agreeing()
    pumping.sales, pumping.unpaid = 4, 1
    assert result(pumping)["agree"] is True


async def test_customers_pay_by_three_tenders_and_the_payments_reconcile_to_the_fen(
    tmp_path: Path,
) -> None:
    demo = DemoChain(DemoOptions(duration_s=6, stations=2, workdir=tmp_path, payments=True))
    try:
        await demo.start()
        providers = demo.providers
        assert providers is not None
        for simulator in (providers.wechat, providers.alipay):
            assert simulator.process is not None
            assert simulator.process.poll() is None
        await demo.run_traffic()
        assert await demo.quiesce()
        result = report(await demo.reconcile(), len(demo.stations), True, 0.0)
        pay = result["payments"]

        # Every finished sale was paid, once, at the amount the pump measured
        assert result["agree"] is True, pay
        assert pay["agree"] is True
        assert pay["sales"] == result["sales_at_edges"] >= 20
        assert pay["unpaid_sales"] == 0
        assert pay["paid_sales"] == pay["paid_sales_at_hq"] == pay["sales"]
        assert pay["paid_fen_at_edges"] == result["amount_fen_at_edges"]
        assert pay["net_fen_at_hq"] == pay["paid_fen_at_edges"]
        assert pay["refunded_fen_at_hq"] == 0
        assert (pay["paid_twice"], pay["open_orders"], pay["mismatched_sales"]) == (0, 0, 0)
        assert pay["stray_trades"] == []
        # ...by all three tenders, some codes declined first and paid with a new one
        tenders = pay["by_tender"]
        assert all(tenders[t]["count"] > 0 for t in ("wechat", "alipay", "cash")), tenders
        assert sum(t["fen"] for t in tenders.values()) == pay["net_fen_at_hq"]
        assert pay["declined_codes"] >= len(demo.stations)
        assert pay["declined_at_hq"] == pay["declined_codes"]
        # ...and the providers' own trades are HQ's code payments, in count and fen
        for tender in ("wechat", "alipay"):
            assert pay["at_providers"][tender] == tenders[tender], tender
        for row in result["per_station_payments"]:
            assert row["agree"] is True, row
            assert row["at_providers"]["wechat"] == row["by_tender"]["wechat"]
            assert row["counter"]["paid"]["cash"] == row["by_tender"]["cash"]["count"]
            line = describe_payments(result, row["station"])
            assert line is not None
            assert line.startswith(f"{row['station']} payments: {row['sales']} of {row['sales']}")
            assert "= the paid sales; providers agree" in line

        # Given HQ loses one code payment, the reconciliation names its sale
        assert demo.hq is not None
        async with demo.hq.db.begin() as uow:
            victim = (
                await uow.conn.execute(
                    sa.select(order_t)
                    .where(order_t.c.tender == "wechat", order_t.c.state == "paid")
                    .limit(1)
                )
            ).one()
            await uow.conn.execute(sa.delete(order_t).where(order_t.c.order_id == victim.order_id))
        result = report(await demo.reconcile(), len(demo.stations), True, 0.0)
        pay = result["payments"]
        assert result["agree"] is False
        assert pay["agree"] is False
        assert pay["net_fen_at_hq"] == pay["paid_fen_at_edges"] - victim.amount_fen
        (row,) = [r for r in result["per_station_payments"] if r["station"] == victim.station_code]
        assert row["agree"] is False
        assert row["mismatched_sales"] == [
            {
                "sale_id": str(victim.sale_id),
                "paid_fen_at_edge": victim.amount_fen,
                "net_fen_at_hq": 0,
            }
        ]
        # ...and WeChat Pay holds one trade more than HQ's payments
        sims, held = row["at_providers"]["wechat"], row["by_tender"]["wechat"]
        assert (sims["count"] - held["count"], sims["fen"] - held["fen"]) == (1, victim.amount_fen)
        assert "DISAGREE" in (describe_payments(result, victim.station_code) or "")
    finally:
        await demo.stop()
    assert providers.wechat.process is None
    assert providers.alipay.process is None


async def test_without_payments_the_demo_starts_no_provider_and_reconciles_sales_only(
    tmp_path: Path,
) -> None:
    demo = DemoChain(DemoOptions(duration_s=3, stations=1, workdir=tmp_path, payments=False))
    try:
        await demo.start()
        assert demo.providers is None
        assert demo.counters == {}
        await demo.run_traffic()
        assert await demo.quiesce()
        result = report(await demo.reconcile(), len(demo.stations), True, 0.0)
        assert result["agree"] is True
        assert result["sales_at_hq"] > 0
        assert result["payments"] == {"enabled": False, "agree": True}
        assert result["per_station_payments"] == []
    finally:
        await demo.stop()
