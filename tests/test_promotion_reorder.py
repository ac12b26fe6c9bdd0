"""Seed 003's campaign case through a real daemon on the injected clock: a promotion scheduled on
a SKU raises its reorder point by the forecast inside the lead time and marks the reorder alert
urgent (level 3) naming the promotion; one beyond the lead time changes nothing; the figures
are the same after a restart (log replay, snapshots); `reservd replenish` shows them."""
from __future__ import annotations

import asyncio
import json

import pytest
from conftest import aio, cart, running, test_config
from daemonproc import reservd_cli

from reservd.clock import ManualClock
from reservd.promotions import Promotion, Promotions, Timing
from reservd.replenish import DAY_MS
from reservd.v1 import reservd_pb2 as pb

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


async def _alerts(server) -> list[tuple]:
    response = await server.reservations.GetAlerts(pb.GetAlertsRequest(kinds=["reorder"]))
    return [(a.sku, a.level, {f.name: getattr(f, f.WhichOneof("value")) for f in a.figures})
            for a in response.alerts]


async def _row(server) -> tuple:
    r = (await server.admin.GetReplenishment(pb.GetReplenishmentRequest(skus=["tent"]))).rows[0]
    return (r.daily_demand, r.safety_stock, r.reorder_point, r.available, r.reorder,
            r.suggested_units, r.promotion_units, r.promotion_id, r.urgent)


def _promotion(promotion_id: str, starts_in_days: int, days: int, forecast_units: int):
    starts = START_MS + 10 * DAY_MS + starts_in_days * DAY_MS
    return pb.SetPromotionRequest(
        promotion_id=promotion_id, skus=["tent"], channels=["web"], starts_at_ms=starts,
        ends_at_ms=starts + days * DAY_MS, forecast_units=forecast_units)


@pytest.mark.parametrize("snapshot_records_interval", [1_000_000, 7])
@aio
async def test_a_promotion_in_the_lead_time_raises_the_reorder_point_and_is_urgent(
    tmp_path, snapshot_records_interval
):
    clock = ManualClock(START_MS)
    # The rule evaluator is ticked by nobody here: the promotion's phases are not at issue.
    config = test_config(tmp_path / "data", replenish_demand_days=10,
                         snapshot_records_interval=snapshot_records_interval,
                         rules_evaluate_ms=3_600_000)
    async with running(config, clock=clock) as server:
        await server.set_stock("tent", 500)
        for day in range(10):  # D 20 units a day, sigma 0
            assert (await server.reservations.Reserve(cart(f"d{day}", ("tent", 20)))).granted
            await server.reservations.Commit(pb.CommitRequest(reservation_id=f"d{day}"))
            clock.advance(DAY_MS)
        await server.admin.SetReplenishment(pb.SetReplenishmentRequest(
            sku="tent", lead_time_days=10, lead_time_sigma_days=0, abc_class="A"))
        await server.admin.SetChannel(pb.SetChannelRequest(
            channel="web", policy=pb.ChannelPolicy(), change_id="web"))
        # D * LT = 200 (safety stock 0 with no variance); available 300: no reorder (the
        # config's defaults raised and ended reorder alerts while the history grew).
        assert await _row(server) == (20.0, 0, 200, 300, False, 0, 0, "", False)
        earlier = await _alerts(server)
        assert earlier[-1][1] == 0
        # 20 days ahead: outside the 10-day lead time, nothing changes.
        await server.admin.SetPromotion(_promotion("spring", 20, 4, 400))
        assert await _row(server) == (20.0, 0, 200, 300, False, 0, 0, "", False)
        assert await _alerts(server) == earlier
        # 8 days ahead for 4 days, 400 forecast: 2 of its 4 days are inside the lead time, so
        # 200 units join the reorder point (400 >= 300): an urgent reorder naming it.
        await server.admin.SetPromotion(_promotion("bfcm", 8, 4, 400))
        # order: up to the point plus a 30-day cycle (600) = 400 + 600 - 300
        assert await _row(server) == (20.0, 0, 400, 300, True, 700, 200, "bfcm", True)
        urgent = [("tent", 3, {
            "available": 300, "incoming": 0, "reorder_point": 400, "safety_stock": 0,
            "suggested_units": 700, "daily_demand_milliunits": 20_000,
            "promotion_units": 200, "promotion_id": "bfcm"})]
        assert await _alerts(server) == earlier + urgent
        shown = json.loads((await asyncio.to_thread(
            reservd_cli, "replenish", "--target", server.target, "tent")).stdout)
        assert (shown["promotion_units"], shown["promotion_id"], shown["urgent"]) == (
            200, "bfcm", True)
    async with running(config, clock=clock) as server:
        assert await _alerts(server) == earlier + urgent
        assert await _row(server) == (20.0, 0, 400, 300, True, 700, 200, "bfcm", True)
        # A day on, 3 of its 4 days are inside: 300 units; the same crossing (no new alert).
        # D now reads days 1-10 (the last one without sales): 18 a day, with a variance.
        clock.advance(DAY_MS)
        assert (await server.reservations.Reserve(cart("one", ("tent", 1)))).granted
        d, safety, point, available, reorder, suggested, units, name, urgent_now = \
            await _row(server)
        assert (d, available, units, name, reorder, urgent_now) == (
            18.0, 299, 300, "bfcm", True, True)
        assert point == 18 * 10 + safety + 300 and safety > 0
        assert suggested == point + 18 * 30 - 299
        assert len(await _alerts(server)) == len(earlier) + 1
        # An order on the way lifts available + incoming above it: back to normal.
        await server.admin.ExpectReceipt(pb.ExpectReceiptRequest(
            po_id="po-1", sku="tent", units=suggested))
        assert [(sku, level) for sku, level, _ in await _alerts(server)][len(earlier):] == [
            ("tent", 3), ("tent", 0)]


def test_lead_time_units_pro_rates_each_promotion_inside_the_window():
    calendar = Promotions(Timing(), promotions_max=10)
    hour = 3_600_000

    def add(promotion_id, starts, ends, forecast):
        calendar.apply_set(Promotion(promotion_id, ("tent",), ("web",), starts, ends, forecast,
                                     0, False), retention_ms=0)

    add("running", -2 * hour, 2 * hour, 100)  # half of it is still ahead: 50
    add("ahead", 9 * hour, 12 * hour, 10)  # 1 of its 3 hours inside 10 h: 3.33 -> 4
    add("beyond", 10 * hour, 20 * hour, 1_000)  # starts as the window ends: 0
    assert calendar.lead_time_units("tent", 0, 10 * hour) == (54, "running")
    assert calendar.lead_time_units("other", 0, 10 * hour) == (0, "")
    add("tie", 0, 4 * hour, 100)  # 100 inside, as the second one below
    add("also", 0, 4 * hour, 100)
    assert calendar.lead_time_units("tent", 0, 10 * hour) == (254, "also")
