"""Replenishment formulas with the seeds' worked examples, and demand measured from simulated
Poisson history with the injected clock."""
from __future__ import annotations

import math
import random

import pytest

from reservd.replenish import (
    DAY_MS, DAYS_KEPT, Z_BY_CLASS, DemandHistory, days_of_cover, reorder_point,
    reorder_point_days, safety_stock, seasonal_index,
)


def test_the_sneaker():
    ss = safety_stock(20, 5, 10, 2, 1.65)
    assert ss == 71 and reorder_point(20, 10, ss) == 271


def test_the_holiday_candle():
    ss = safety_stock(50, 20, 21, 5, Z_BY_CLASS["A"])
    assert ss == 440 and reorder_point(50, 21, ss) == 1_490


def test_seed_003_days_form():
    assert reorder_point_days(100, 20, 5) == 2_500


def test_seasonal_index_scales_safety_stock():
    assert seasonal_index(11) == 2.5 and seasonal_index(2) == 0.7
    assert safety_stock(20, 5, 10, 2, 1.65, seasonal_index(11)) == math.ceil(70.968 * 2.5)
    with pytest.raises(ValueError):
        seasonal_index(13)


def test_days_of_cover():
    assert days_of_cover(271, 20) == 13.55 and days_of_cover(5, 0) == math.inf


def _poisson(rng: random.Random, mean: float) -> int:
    # Knuth's method: fine for means around 20 (exp(-20) is far from underflow).
    limit, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


@pytest.mark.parametrize("seed", range(5))
def test_demand_measured_from_90_days_of_poisson_sales(seed):
    """90 days of Poisson sales around 20 a day, several sales a day at clock times: the
    measured mean lands within 1.5 units (3.2 standard errors) of 20 and sigma within 1.3 of
    sqrt(20)."""
    rng = random.Random(seed)
    history = DemandHistory()
    start_ms = 1_767_225_600_000  # 2026-01-01 00:00 UTC
    for day in range(90):
        units = _poisson(rng, 20)
        for sale in range(units):  # one unit per sale, spread over the day
            history.add(start_ms + day * DAY_MS + sale * 60_000, 1)
    now_ms = start_ms + 90 * DAY_MS + 5
    demand = history.demand(now_ms, 90)
    assert abs(demand.mean - 20) < 1.5, demand
    assert abs(demand.sigma - math.sqrt(20)) < 1.3, demand


def test_history_is_a_fixed_ring_of_days():
    history = DemandHistory()
    history.add(10 * DAY_MS, 7)
    history.add(10 * DAY_MS + 1, 3)
    history.add(12 * DAY_MS, 5)
    assert history.daily(13 * DAY_MS, 4) == [0, 10, 0, 5]
    history.add((12 + DAYS_KEPT) * DAY_MS, 1)  # a full ring later: the old days are gone
    assert history.daily((13 + DAYS_KEPT) * DAY_MS, 4) == [0, 0, 0, 1]
    history.add(5 * DAY_MS, 9)  # older than the ring: dropped
    assert sum(history.daily((13 + DAYS_KEPT) * DAY_MS, DAYS_KEPT - 1)) == 1
    with pytest.raises(ValueError):
        history.daily(0, DAYS_KEPT)


def test_window_units_and_entries_agree_with_the_days():
    rng = random.Random(7)
    history = DemandHistory()
    for day in range(300):
        if rng.random() < 0.6:
            history.add(day * DAY_MS + rng.randrange(DAY_MS), rng.randint(1, 9))
        for now_day in (day, day + 1, day + 5, day + 200):
            for days in (1, 30, 90, DAYS_KEPT - 1):
                assert history.window_units(now_day * DAY_MS, days) == sum(
                    history.daily(now_day * DAY_MS, days))
    copy = DemandHistory()
    copy.restore(*history.entries())
    assert copy.daily(301 * DAY_MS, DAYS_KEPT - 1) == history.daily(301 * DAY_MS, DAYS_KEPT - 1)


def test_abc_classes_rank_the_skus_that_sold():
    from reservd.config import Config
    from reservd.planning import Planning

    planning = Planning(Config())
    for i in range(10):  # sku-0 sold most
        planning.on_commit([f"sku-{i}"], [100 - i], 0)
    planning.on_commit(["today"], [500], 5 * DAY_MS)  # today's sales count from tomorrow
    now = 5 * DAY_MS
    classes = [planning.class_of(f"sku-{i}", now) for i in range(10)]
    assert classes == ["A"] * 2 + ["B"] * 3 + ["C"] * 5
    assert planning.class_of("today", now) == "C" and planning.class_of("never", now) == "C"
    assert planning.class_of("today", now + DAY_MS) == "A"
