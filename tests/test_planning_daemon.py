"""Replenishment and cycle counts through a real daemon, on the injected clock: 90 days of
simulated Poisson demand measured back within a stated tolerance; the table the seed's formulas
give; a restart (log replay, snapshots) rebuilds the same table; recounts give ghost stock and
the SKUs due for a count."""
from __future__ import annotations

import math
import random

import grpc
import pytest
from conftest import aio, cart, running, test_config

from reservd.clock import ManualClock
from reservd.replenish import DAY_MS
from reservd.v1 import reservd_pb2 as pb

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
MEAN = 20.0  # units per day, Poisson: sigma sqrt(20) = 4.47


def _poisson(rng: random.Random, mean: float) -> int:
    """Knuth's method (deterministic with a seeded generator)."""
    limit, k, product = math.exp(-mean), 0, rng.random()
    while product > limit:
        k += 1
        product *= rng.random()
    return k


async def _sell(server, clock: ManualClock, days: int, seed: int = 12,
                sku: str = "tent") -> list[int]:
    """Orders of 1-3 units through Reserve and Commit, Poisson(MEAN) units a day, spread over
    each day by the clock; returns the units of each day."""
    rng = random.Random(seed)
    sold = []
    for day in range(days):
        units = _poisson(rng, MEAN)
        sold.append(units)
        left, order = units, 0
        while left:
            quantity = min(left, rng.randint(1, 3))
            rid = f"d{day}-o{order}"
            assert (await server.reservations.Reserve(cart(rid, (sku, quantity)))).granted
            await server.reservations.Commit(pb.CommitRequest(reservation_id=rid))
            left -= quantity
            order += 1
            clock.advance(60_000)
        clock.advance(DAY_MS - order * 60_000)
    return sold


def _table(response) -> list[tuple]:
    return [(r.sku, round(r.daily_demand, 6), round(r.demand_sigma, 6), r.safety_stock,
             r.reorder_point, r.on_hand, r.incoming, r.reorder, r.suggested_units)
            for r in response.rows]


@pytest.mark.parametrize("snapshot_records_interval", [1_000_000, 97])
@aio
async def test_ninety_days_of_poisson_demand_are_measured_and_survive_a_restart(
    tmp_path, snapshot_records_interval
):
    clock = ManualClock(START_MS)
    config = test_config(tmp_path / "data", snapshot_records_interval=snapshot_records_interval)
    async with running(config, clock=clock) as server:
        await server.set_stock("tent", 100_000)
        sold = await _sell(server, clock, 90)
        await server.admin.SetReplenishment(pb.SetReplenishmentRequest(
            sku="tent", lead_time_days=10, lead_time_sigma_days=2, abc_class="A"))
        await server.admin.ExpectReceipt(pb.ExpectReceiptRequest(po_id="po", sku="tent",
                                                                  units=50))
        row = (await server.admin.GetReplenishment(
            pb.GetReplenishmentRequest(skus=["tent"]))).rows[0]
        before = _table(await server.admin.GetReplenishment(pb.GetReplenishmentRequest()))
    # The daemon's D and sigma_D are the sample's exactly (one definition) ...
    mean = sum(sold) / 90
    sigma = math.sqrt(sum((u - mean) ** 2 for u in sold) / 89)
    assert row.daily_demand == pytest.approx(mean) and row.demand_sigma == pytest.approx(sigma)
    # ... and the sample's are within the stated tolerance of the truth: D within 10% of 20,
    # sigma_D within 25% of sqrt(20) (4 and 3 standard errors at 90 days).
    assert abs(row.daily_demand - MEAN) <= 0.10 * MEAN
    assert abs(row.demand_sigma - math.sqrt(MEAN)) <= 0.25 * math.sqrt(MEAN)
    # April (the clock is at 2026-04-01): seasonal index 1.0; class A: Z 1.65; seed formula.
    assert (row.z, row.seasonal_index, row.abc_class) == (1.65, 1.0, "A")
    variance = 10 * row.demand_sigma ** 2 + row.daily_demand ** 2 * 2 ** 2
    assert row.safety_stock == math.ceil(1.65 * math.sqrt(variance) - 1e-9)
    assert row.reorder_point == math.ceil(row.daily_demand * 10 - 1e-9) + row.safety_stock
    assert (row.on_hand, row.available, row.incoming) == (100_000, 100_000 - sum(sold), 50)
    assert row.days_of_cover == pytest.approx(row.available / row.daily_demand)
    assert not row.reorder and row.suggested_units == 0
    # A restart rebuilds the same table, from the log alone or from snapshots and the log.
    async with running(config, clock=clock) as server:
        after = _table(await server.admin.GetReplenishment(pb.GetReplenishmentRequest()))
    assert after == before


@aio
async def test_the_reorder_point_crossed_suggests_an_order():
    clock = ManualClock(START_MS)
    async with running(test_config(), clock=clock) as server:
        await server.set_stock("mug", 10_000)
        await _sell(server, clock, 30, sku="mug")
        await server.admin.SetReplenishment(pb.SetReplenishmentRequest(
            sku="mug", lead_time_days=10, lead_time_sigma_days=2, service_level=0.95))
        row = (await server.admin.GetReplenishment(
            pb.GetReplenishmentRequest(skus=["mug"]))).rows[0]
        assert not row.reorder
        low = row.reorder_point - 10
        committed = row.on_hand - row.available  # sold, not yet shipped
        await server.admin.SetStock(pb.SetStockRequest(sku="mug", on_hand=committed + low,
                                                       adjustment_id="count-mug"))
        row = (await server.admin.GetReplenishment(
            pb.GetReplenishmentRequest(skus=["mug"]))).rows[0]
        assert row.reorder and row.available == low
        cycle = math.ceil(row.daily_demand * 30 - 1e-9)  # replenish_order_cycle_days
        assert row.suggested_units == row.reorder_point + cycle - low


@aio
async def test_settings_are_validated_and_refused_for_unknown_skus():
    async with running() as server:
        await server.set_stock("cap", 5)
        for field, request in (
            ("lead_time_days", pb.SetReplenishmentRequest(sku="cap", lead_time_days=-1)),
            ("service_level", pb.SetReplenishmentRequest(sku="cap", service_level=1.2)),
            ("abc_class", pb.SetReplenishmentRequest(sku="cap", abc_class="D")),
            ("seasonal_indices", pb.SetReplenishmentRequest(sku="cap",
                                                            seasonal_indices=[1.0] * 11)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await server.admin.SetReplenishment(request)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert field in caught.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.admin.SetReplenishment(pb.SetReplenishmentRequest(sku="nope"))
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND


@aio
async def test_recounts_give_ghost_stock_and_the_skus_due_for_a_count(tmp_path):
    clock = ManualClock(START_MS)
    config = test_config(tmp_path / "data")
    async with running(config, clock=clock) as server:
        for sku in ("a", "b", "c"):
            await server.set_stock(sku, 100)
        await server.admin.SetReplenishment(pb.SetReplenishmentRequest(sku="a", abc_class="A"))
        await server.admin.SetReplenishment(pb.SetReplenishmentRequest(sku="b", abc_class="B"))
        # Never counted: every SKU is due, A first.
        audit = await server.admin.GetAudit(pb.GetAuditRequest())
        assert [s.sku for s in audit.skus] == ["a", "b", "c"] and all(s.due for s in audit.skus)
        await server.admin.SetStock(pb.SetStockRequest(sku="a", on_hand=97, adjustment_id="ca"))
        await server.admin.SetStock(pb.SetStockRequest(sku="b", on_hand=94, adjustment_id="cb"))
        await server.admin.SetStock(pb.SetStockRequest(sku="c", on_hand=100, adjustment_id="cc"))
        audit = await server.admin.GetAudit(pb.GetAuditRequest(all=True))
        ghost = {s.sku: s.ghost for s in audit.skus}
        assert ghost == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.0})
        assert audit.ghost_overall == pytest.approx(9 / 300)
        assert not (await server.admin.GetAudit(pb.GetAuditRequest())).skus
        clock.advance(7 * DAY_MS)  # A is counted weekly
        due = await server.admin.GetAudit(pb.GetAuditRequest())
        assert [s.sku for s in due.skus] == ["a"]
        clock.advance(23 * DAY_MS)  # B monthly (30 days)
        due = await server.admin.GetAudit(pb.GetAuditRequest())
        assert [s.sku for s in due.skus] == ["a", "b"]
    async with running(config, clock=clock) as server:  # the counts are rebuilt by replay
        audit = await server.admin.GetAudit(pb.GetAuditRequest(all=True))
        assert {s.sku: s.ghost for s in audit.skus} == pytest.approx(ghost)
        assert [s.sku for s in audit.skus if s.due] == ["a", "b"]
