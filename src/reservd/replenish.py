"""Replenishment: demand history per SKU and the seeds' safety-stock and reorder-point formulas.

Formulas (seed 001; units of stock items, days):

- safety stock = Z * sqrt(LT * sigma_D^2 + D^2 * sigma_LT^2) * seasonal index, rounded up
  (sneaker: D 20, sigma_D 5, LT 10, sigma_LT 2, Z 1.65 -> 71; holiday candle: D 50, sigma_D 20,
  LT 21, sigma_LT 5 -> 440)
- reorder point = D * LT + safety stock (sneaker 271, candle 1,490)
- seed 003's days form: reorder point = (LT + safety days) * D ((20 + 5) * 100 = 2,500)

D and sigma_D are measured from :class:`DemandHistory`: units committed per day, in a fixed
ring of day buckets (``DAYS_KEPT`` days, >= 90), by the time the command carries (the injected
clock), so a replay of the log rebuilds the same history.
"""
from __future__ import annotations

import math
from array import array
from typing import NamedTuple, Sequence

DAY_MS = 86_400_000
DAYS_KEPT = 128  # day buckets per SKU: 1 KiB, at least the 90 days the formulas read
Z_BY_CLASS = {"A": 1.65, "B": 1.28, "C": 1.04}  # service level 95% / 90% / 85%
# Seed 001's monthly seasonal indices, January to December (the default).
SEASONAL_INDEX = (0.8, 0.7, 0.9, 1.0, 1.0, 1.1, 1.1, 1.2, 1.3, 1.5, 2.5, 2.0)
_ROUNDING = 1e-9  # a product that is whole up to float error is not rounded up past it


def safety_stock(
    daily_demand: float, demand_sigma: float, lead_time_days: float,
    lead_time_sigma_days: float, z: float, seasonal_index: float = 1.0,
) -> int:
    """Units held back for variability: Z * sqrt(LT * sigma_D^2 + D^2 * sigma_LT^2) * index,
    rounded up to a whole unit."""
    variance = lead_time_days * demand_sigma ** 2 + daily_demand ** 2 * lead_time_sigma_days ** 2
    return math.ceil(z * math.sqrt(variance) * seasonal_index - _ROUNDING)


def reorder_point(daily_demand: float, lead_time_days: float, safety_units: int) -> int:
    """Units (available + incoming) at which to reorder: D * LT + safety stock."""
    return math.ceil(daily_demand * lead_time_days - _ROUNDING) + safety_units


def reorder_point_days(daily_demand: float, lead_time_days: float, safety_days: float) -> int:
    """Seed 003's form: (lead time + safety days) * daily demand, in units."""
    return math.ceil((lead_time_days + safety_days) * daily_demand - _ROUNDING)


def days_of_cover(units: int, daily_demand: float) -> float:
    """Days ``units`` last at ``daily_demand`` (infinite without demand)."""
    return math.inf if daily_demand <= 0 else max(units, 0) / daily_demand


class Demand(NamedTuple):
    mean: float  # units per day
    sigma: float  # sample standard deviation, units per day
    days: int


class DemandHistory:
    """One SKU's units of demand per day over the last ``DAYS_KEPT`` days, fixed size."""

    __slots__ = ("_units", "_newest_day")

    def __init__(self) -> None:
        self._units = array("q", bytes(8 * DAYS_KEPT))
        self._newest_day: int | None = None

    def add(self, at_ms: int, units: int) -> None:
        """Count ``units`` of demand on the day of ``at_ms``; days older than the ring are
        dropped (time only moves on: the log's times are non-decreasing)."""
        day = at_ms // DAY_MS
        newest = self._newest_day
        if newest is None:
            newest = self._newest_day = day
        if day > newest:
            for gap in range(newest + 1, min(day, newest + DAYS_KEPT) + 1):
                self._units[gap % DAYS_KEPT] = 0
            self._newest_day = newest = day
        if day <= newest - DAYS_KEPT:
            return
        self._units[day % DAYS_KEPT] += units

    def entries(self) -> tuple[int, list[tuple[int, int]]]:
        """(newest day, [(day, units) of the days kept with demand]), days since the epoch:
        the compact form a snapshot carries."""
        newest = self._newest_day
        if newest is None:
            return -1, []
        days = range(newest - DAYS_KEPT + 1, newest + 1)
        return newest, [(day, self._units[day % DAYS_KEPT]) for day in days
                        if self._units[day % DAYS_KEPT]]

    def restore(self, newest_day: int, entries: list[tuple[int, int]]) -> None:
        """Load :meth:`entries`' output into an empty history."""
        self._newest_day = None if newest_day < 0 else newest_day
        for day, units in entries:
            self._units[day % DAYS_KEPT] = units

    def daily(self, now_ms: int, days: int) -> list[int]:
        """Units per day of the ``days`` whole days before the day of ``now_ms``, oldest
        first (days without demand count as 0)."""
        if not 1 <= days < DAYS_KEPT:
            raise ValueError(f"days must be within [1, {DAYS_KEPT - 1}], not {days}")
        today = now_ms // DAY_MS
        newest = self._newest_day
        out = []
        for day in range(today - days, today):
            kept = newest is not None and newest - DAYS_KEPT < day <= newest
            out.append(self._units[day % DAYS_KEPT] if kept else 0)
        return out

    def window_units(self, now_ms: int, days: int) -> int:
        """Units of the ``days`` whole days before the day of ``now_ms``: ``sum(daily(...))``,
        summed over slices of the ring (C loops: cheap enough to rank every SKU once a day)."""
        newest = self._newest_day
        if newest is None:
            return 0
        today = now_ms // DAY_MS
        low, high = max(today - days, newest - DAYS_KEPT + 1), min(today - 1, newest)
        if low > high:
            return 0
        first, last = low % DAYS_KEPT, high % DAYS_KEPT
        if first <= last:
            return sum(self._units[first:last + 1])
        return sum(self._units[first:]) + sum(self._units[:last + 1])

    def demand(self, now_ms: int, days: int = 90) -> Demand:
        """Mean and sample standard deviation of daily demand over ``days`` whole days."""
        values = self.daily(now_ms, days)
        mean = sum(values) / days
        variance = sum((v - mean) ** 2 for v in values) / (days - 1) if days > 1 else 0.0
        return Demand(mean, math.sqrt(variance), days)


def seasonal_index(month: int, indices: Sequence[float] = SEASONAL_INDEX) -> float:
    """The index of ``month`` (1-12)."""
    if not 1 <= month <= 12:
        raise ValueError(f"month must be within [1, 12], not {month}")
    return indices[month - 1]
