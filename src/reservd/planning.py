"""Replenishment and cycle counts per SKU, from the ledger's own log (issue 12).

- **Demand**: units *committed* per SKU per UTC day, by the Commit's logged time, in a
  :class:`reservd.replenish.DemandHistory` ring (128 days, 1 KiB per SKU). Committed, not
  fulfilled: a commit is the day the customer bought; fulfilment follows the warehouse's
  shipping days (weekends, batches), which would add variance that is not demand. A committed
  order released later is not taken back: the demand happened, and its units are back in
  ``available``, which the reorder point already reads.
- **Settings** (``Admin.SetReplenishment``, a logged command; config defaults): lead time and
  its sigma in days, a service level or an ABC class, twelve monthly seasonal indices.
- **Counts**: a SetStock on an existing SKU is a recount; the last one per SKU is kept
  (system = on_hand before it, counted = the value set). Ghost stock = (system - counted) /
  system, per SKU and over every SKU's last count.
- **Promotions** (seed 003's campaign case): a promotion scheduled or running on the SKU
  (reservd.promotions) adds ``promotion_units`` -- its ``forecast_units`` spread evenly over its
  duration, for the part of it inside [now, now + lead time) -- to the reorder point (and so
  to the suggested order): measured D knows nothing of a campaign ahead, and the lead time is
  the window a reorder protects (a promotion beyond it can still be ordered for later). The
  safety stock stays the formula's (the forecast is the operator's number, not a measured
  variance). A reorder with ``promotion_units`` > 0 is *urgent*: the alert is raised at level
  3, not 2, naming the promotion. Computed at each command's logged time from logged
  commands only: the same live, in replay and after a snapshot restore.
- **ABC classes**: configured per SKU, else by units committed over the demand window's whole
  days, among the SKUs that sold in it: the top 20% A, the next 30% B, the rest (and SKUs
  without sales) C (seed 001, with units for revenue). Z 1.65 / 1.28 / 1.04 (95/90/85%);
  count every 7 / 30 / 91 days (config).

Bounded by ``replenish_skus_max`` SKUs with any of these: settings beyond it are refused
(RESOURCE_EXHAUSTED); demand and counts of further SKUs are not kept (they are effects of
other commands, which are never refused for it) and counted in ``untracked``.
"""
from __future__ import annotations

import datetime
import math
import statistics
from typing import Callable, Iterable, NamedTuple

from reservd import replenish, stockstates
from reservd.config import Config, ConfigError
from reservd.planning_records import SetReplenishment

CLASSES = ("A", "B", "C")
_SEED_Z = {0.95: 1.65, 0.90: 1.28, 0.85: 1.04, 0.99: 2.33}  # seed 001's rounded Z-scores
_SHARES = (0.2, 0.5)  # cumulative share of SKUs (by units committed) in A, then A + B
# (sku, now_ms, horizon_ms) -> (units, promotion_id): reservd.promotions.Promotions.lead_time_units
PromotionUnits = Callable[[str, int, int], tuple[int, str]]


def seasonal_indices(text: str) -> tuple[float, ...]:
    """Config ``replenish_seasonal_indices``: twelve numbers, January first, commas between."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 12 or not all(0 < v <= 100 for v in values):
        raise ConfigError(
            f"replenish_seasonal_indices: expected 12 numbers in (0, 100] separated by commas, "
            f"got {text!r}"
        )
    return values


def z_of(service_level: float) -> float:
    """Z-score of a service level (seed 001's rounded values for 85/90/95/99%)."""
    for level, z in _SEED_Z.items():
        if abs(service_level - level) < 1e-9:
            return z
    return round(statistics.NormalDist().inv_cdf(service_level), 2)


class Count(NamedTuple):
    at_ms: int
    system: int  # on_hand before the recount
    counted: int


class Plan:
    """One SKU's demand history, settings and last count (any may be absent)."""

    __slots__ = ("demand", "settings", "count", "point")

    def __init__(self) -> None:
        self.demand: replenish.DemandHistory | None = None
        self.settings: SetReplenishment | None = None
        self.count: Count | None = None
        self.point: tuple | None = None  # ((day, settings version), Point): a cache


class Point(NamedTuple):
    """A SKU's reorder figures for one day (units; days)."""

    demand: replenish.Demand
    lead_time_days: float
    lead_time_sigma_days: float
    abc_class: str
    z: float
    seasonal_index: float
    safety_stock: int
    reorder_point: int
    cycle_units: int  # demand of one order cycle (replenish_order_cycle_days)

    def reorder(self, position: int, promotion_units: int = 0) -> tuple[bool, int]:
        """(at or below the reorder point plus ``promotion_units``, with demand or a
        promotion; the suggested order) for ``position`` = available + incoming."""
        point = self.reorder_point + promotion_units
        if (self.demand.mean > 0 or promotion_units > 0) and position <= point:
            return True, max(0, point + self.cycle_units - position)
        return False, 0


class Row(NamedTuple):
    """One SKU's line of ``reservd replenish`` (units; days)."""

    sku: str
    daily_demand: float
    demand_sigma: float
    lead_time_days: float
    lead_time_sigma_days: float
    abc_class: str
    z: float
    seasonal_index: float
    safety_stock: int
    reorder_point: int  # D * LT + safety stock + promotion_units
    on_hand: int
    available: int
    incoming: int
    days_of_cover: float  # available / daily demand (inf without demand)
    reorder: bool  # available + incoming at or below the reorder point
    suggested_units: int
    promotion_units: int  # forecast of the promotions within the lead time from now
    promotion_id: str  # the one contributing most ("" when none)
    urgent: bool  # reorder with promotion_units > 0 (the alert's level 3)


class Planning:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.seasonal = seasonal_indices(config.replenish_seasonal_indices)
        if not 2 <= config.replenish_demand_days < replenish.DAYS_KEPT:
            raise ConfigError(f"replenish_demand_days: must be within [2, "
                              f"{replenish.DAYS_KEPT - 1}], not {config.replenish_demand_days}")
        self.plans: dict[str, Plan] = {}
        self.untracked = 0  # demand or counts not kept: replenish_skus_max reached
        self._ghost_system = 0  # sums over every SKU's last count
        self._ghost_missing = 0
        self._ranked_day: int | None = None  # the day self._ranked was computed for
        self._ranked: dict[str, str] = {}
        self._settings_version = 0  # invalidates the cached points

    def _plan(self, sku: str) -> Plan | None:
        plan = self.plans.get(sku)
        if plan is None:
            if len(self.plans) >= self.config.replenish_skus_max:
                self.untracked += 1
                return None
            plan = self.plans[sku] = Plan()
        return plan

    # -- effects of other commands (live and replay) --------------------------------------------

    def on_commit(self, skus: Iterable[str], units: Iterable[int], at_ms: int) -> None:
        for sku, quantity in zip(skus, units):
            if quantity <= 0:
                continue
            plan = self._plan(sku)
            if plan is None:
                continue
            if plan.demand is None:
                plan.demand = replenish.DemandHistory()
            plan.demand.add(at_ms, quantity)

    def on_count(self, sku: str, at_ms: int, system: int, counted: int) -> None:
        plan = self._plan(sku)
        if plan is not None:
            self._set_count(plan, Count(at_ms, system, counted))

    def _set_count(self, plan: Plan, count: Count) -> None:
        if plan.count is not None:
            self._ghost_system -= plan.count.system
            self._ghost_missing -= plan.count.system - plan.count.counted
        plan.count = count
        self._ghost_system += count.system
        self._ghost_missing += count.system - count.counted

    # -- settings: a logged command ---------------------------------------------------------------

    def decide_settings(self, command: SetReplenishment, known: bool):
        """The command itself, or a Refusal (``known``: the SKU is in the counter table)."""
        if not known:
            return stockstates.Refusal(
                "NOT_FOUND", f"sku {command.sku!r} is unknown: SetStock creates it", "sku")
        if command.sku not in self.plans and len(self.plans) >= self.config.replenish_skus_max:
            return stockstates.Refusal(
                "RESOURCE_EXHAUSTED",
                f"{len(self.plans)} SKUs are planned: replenish_skus_max reached")
        return command

    def apply_settings(self, command: SetReplenishment) -> SetReplenishment:
        plan = self.plans.get(command.sku)
        if plan is None:  # decide checked the bound; replay applies what was decided
            plan = self.plans[command.sku] = Plan()
        plan.settings = command
        self._settings_version += 1
        return command

    # -- reading ----------------------------------------------------------------------------------

    def demand(self, sku: str, now_ms: int) -> replenish.Demand:
        plan = self.plans.get(sku)
        days = self.config.replenish_demand_days
        if plan is None or plan.demand is None:
            return replenish.Demand(0.0, 0.0, days)
        return plan.demand.demand(now_ms, days)

    def class_of(self, sku: str, now_ms: int) -> str:
        """The SKU's ABC class: configured, else by units committed over the demand window's
        whole days, ranked among the SKUs that sold in it (top 20% A, next 30% B; no sales: C;
        ties broken by SKU). Those days and SKUs do not change during a day, so the ranking is
        computed once a day, and is the same live, in replay and after a snapshot restore."""
        plan = self.plans.get(sku)
        if plan is not None and plan.settings is not None and plan.settings.abc_class:
            return plan.settings.abc_class
        day = now_ms // replenish.DAY_MS
        if self._ranked_day != day:
            self._ranked = self._rank(now_ms)
            self._ranked_day = day
        return self._ranked.get(sku, "C")

    def _rank(self, now_ms: int) -> dict[str, str]:
        days = self.config.replenish_demand_days
        sold = []
        for sku, plan in self.plans.items():
            if plan.demand is not None:
                units = plan.demand.window_units(now_ms, days)
                if units:
                    sold.append((-units, sku))
        sold.sort()
        ranked = {}
        for rank, (_, sku) in enumerate(sold):
            share = rank / len(sold)
            ranked[sku] = "A" if share < _SHARES[0] else "B" if share < _SHARES[1] else "C"
        return ranked

    def _point(self, sku: str, now_ms: int) -> Point:
        """The SKU's reorder figures on the day of ``now_ms``. They read only past days, the
        month, the class and the settings, so they are cached per SKU for the day (until its
        settings change): exactly what a fresh computation gives, live and in replay."""
        plan = self.plans.get(sku)
        day = now_ms // replenish.DAY_MS
        if plan is not None and plan.point is not None and plan.point[0] == (
            day, self._settings_version
        ):
            return plan.point[1]
        config = self.config
        settings = plan.settings if plan is not None else None
        lead_time = config.replenish_lead_time_days
        lead_sigma = config.replenish_lead_time_sigma_days
        seasonal = self.seasonal
        level = 0.0
        if settings is not None:
            lead_time, lead_sigma = settings.lead_time_days, settings.lead_time_sigma_days
            seasonal = settings.seasonal or seasonal
            level = settings.service_level
        abc_class = self.class_of(sku, now_ms)
        z = z_of(level) if level else replenish.Z_BY_CLASS[abc_class]
        index = replenish.seasonal_index(_month(now_ms), seasonal)
        demand = self.demand(sku, now_ms)
        safety = replenish.safety_stock(demand.mean, demand.sigma, lead_time, lead_sigma, z,
                                        index)
        # Orders bring available + incoming to the reorder point plus one order cycle.
        cycle = math.ceil(demand.mean * config.replenish_order_cycle_days - 1e-9)
        point = Point(demand, lead_time, lead_sigma, abc_class, z, index, safety,
                      replenish.reorder_point(demand.mean, lead_time, safety), cycle)
        if plan is not None:
            plan.point = ((day, self._settings_version), point)
        return point

    def row(self, sku: str, now_ms: int, stock: tuple[int, int, int, int],
            incoming: int, promotions: PromotionUnits) -> Row:
        """``stock``: (on_hand, reserved, committed, unsellable); ``promotions``: see
        :meth:`reservd.promotions.Promotions.lead_time_units`."""
        p = self._point(sku, now_ms)
        units, promotion_id = promotions(sku, now_ms, _days_ms(p.lead_time_days))
        available = stockstates.available(*stock)
        reorder, suggested = p.reorder(available + incoming, units)
        return Row(sku, p.demand.mean, p.demand.sigma, p.lead_time_days,
                   p.lead_time_sigma_days, p.abc_class, p.z, p.seasonal_index, p.safety_stock,
                   p.reorder_point + units, stock[0], available, incoming,
                   replenish.days_of_cover(available, p.demand.mean), reorder, suggested,
                   units, promotion_id, reorder and units > 0)

    def reorder_alert(self, sku: str, at_ms: int, available: int, incoming: int,
                      promotions: PromotionUnits) -> tuple[int, dict[str, int | str]]:
        """(level, figures) of the SKU's reorder alert after a command at ``at_ms``: level 2
        once available + incoming is at or below the reorder point (with demand), 3 (urgent)
        when a promotion within the lead time raised that point, else 0."""
        p = self._point(sku, at_ms)
        units, promotion_id = promotions(sku, at_ms, _days_ms(p.lead_time_days))
        reorder, suggested = p.reorder(available + incoming, units)
        figures: dict[str, int | str] = {
            "available": available, "incoming": incoming,
            "reorder_point": p.reorder_point + units, "safety_stock": p.safety_stock,
            "suggested_units": suggested,
            "daily_demand_milliunits": round(p.demand.mean * 1000)}
        if units:
            figures.update(promotion_units=units, promotion_id=promotion_id)
        return (0 if not reorder else 3 if units else 2), figures

    def ghost(self, sku: str) -> float | None:
        """(system - counted) / system of the SKU's last count, or None (never counted, or
        counted from a system figure of 0)."""
        plan = self.plans.get(sku)
        if plan is None or plan.count is None or plan.count.system == 0:
            return None
        return (plan.count.system - plan.count.counted) / plan.count.system

    def ghost_overall(self) -> float:
        """Sum of (system - counted) over sum of system, every SKU's last count (0 when none)."""
        if self._ghost_system <= 0:
            return 0.0
        return self._ghost_missing / self._ghost_system

    def count_days(self, abc_class: str) -> int:
        config = self.config
        return {"A": config.count_days_a, "B": config.count_days_b,
                "C": config.count_days_c}[abc_class]

    def last_count(self, sku: str) -> Count | None:
        plan = self.plans.get(sku)
        return None if plan is None else plan.count

    # -- snapshots --------------------------------------------------------------------------------

    def snapshot_rows(self) -> tuple[list, list, list]:
        """(demand rows, settings rows, count rows) as plain tuples for reservd.state_codec."""
        demand, settings, counts = [], [], []
        for sku, plan in self.plans.items():
            if plan.demand is not None:
                demand.append((sku, *plan.demand.entries()))
            if plan.settings is not None:
                settings.append((sku, *plan.settings[2:]))
            if plan.count is not None:
                counts.append((sku, *plan.count))
        return demand, settings, counts

    def restore_demand(self, row: tuple) -> None:
        sku, newest_day, entries = row
        plan = self.plans.setdefault(sku, Plan())
        plan.demand = replenish.DemandHistory()
        plan.demand.restore(newest_day, entries)

    def restore_settings(self, row: tuple) -> None:
        sku, *fields = row
        self.plans.setdefault(sku, Plan()).settings = SetReplenishment(0, sku, *fields)

    def restore_count(self, row: tuple) -> None:
        sku, at_ms, system, counted = row
        self._set_count(self.plans.setdefault(sku, Plan()), Count(at_ms, system, counted))


def _days_ms(days: float) -> int:
    """A lead time in days as whole milliseconds (rounded down: never a window longer than
    the lead time)."""
    return int(days * replenish.DAY_MS)


def _month(now_ms: int) -> int:
    """The UTC month (1-12) of a unix ms time."""
    return datetime.datetime.fromtimestamp(now_ms / 1000, datetime.timezone.utc).month
