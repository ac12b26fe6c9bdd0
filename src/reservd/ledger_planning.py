"""The ledger's replenishment and cycle-count commands and reports (rules in reservd.planning,
formulas in reservd.replenish), mixed into reservd.ledger.Ledger."""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

from reservd import stockstates
from reservd.planning import Row
from reservd.planning_records import SetReplenishment
from reservd.records import RecordType
from reservd.replenish import DAY_MS


class SettingsOutcome(NamedTuple):
    settings: SetReplenishment
    seq: int
    replayed: bool = False


class AuditRow(NamedTuple):
    """One SKU's cycle-count status (units; unix ms)."""

    sku: str
    abc_class: str
    count_days: int
    last_count_at_ms: int  # 0: never counted
    system: int
    counted: int
    ghost: float  # (system - counted) / system of the last count; NaN when not measurable
    due_at_ms: int  # 0: due now (never counted)
    due: bool


class PlanningCommands:
    """Needs the Ledger's table, clock, planning, incoming, states, _execute and _unwritable."""

    def set_replenishment(
        self, sku: str, lead_time_days: float, lead_time_sigma_days: float,
        service_level: float, abc_class: str, seasonal: tuple[float, ...],
    ):
        """Replace ``sku``'s replenishment settings (validated by the service: days >= 0, a
        level in (0, 1) or 0, a class A/B/C or "", 12 indices or none). Setting the same
        values again is harmless, so no id is needed."""
        from reservd.ledger import Code, Rejection

        command = SetReplenishment(
            self.clock.now_ms(), sku, lead_time_days, lead_time_sigma_days, service_level,
            abc_class, tuple(seasonal),
        )
        decided = self.planning.decide_settings(command, self.table.lookup(sku) >= 0)
        if isinstance(decided, stockstates.Refusal):
            return Rejection(Code[decided.code], decided.message, decided.field)
        refused = self._unwritable()
        if refused is not None:
            return refused
        _, seq = self._execute(RecordType.SET_REPLENISHMENT, command)
        return SettingsOutcome(command, seq)

    # -- alerts (from inside applies: reservd.alerts' contract) ----------------------------------

    def _reorder_alerts(self, changed: dict[str, int]) -> None:
        """After a command: the reorder alert of each SKU whose ``available`` it changed."""
        for sku, available in changed.items():
            if self._plans_reorder(sku):
                self._cross_reorder(sku, available)

    def _plans_reorder(self, sku: str) -> bool:
        """The SKU has a reorder alert to keep: demand history or a promotion ahead."""
        plan = self.planning.plans.get(sku)
        return (plan is not None and plan.demand is not None) or sku in self.promotions.by_sku

    def _reorder_alert(self, sku: str) -> None:
        """The reorder alert of ``sku`` after a command that moved its incoming units or its
        reorder point, or a promotion on it (no table change to read)."""
        handle = self.table.lookup(sku)
        if handle < 0 or not (self._plans_reorder(sku) or self.alerts.latched("reorder", sku)):
            return
        stock = (*self.table.counters(handle), self.table.unsellable(handle))
        self._cross_reorder(sku, stockstates.available(*stock))

    def _cross_reorder(self, sku: str, available: int) -> None:
        """``reorder``: level 2 once available + incoming is at or below the reorder point
        (figures: the suggested order), 3 when a promotion raised the point (urgent), 0 once
        above it again; once per crossing."""
        level, figures = self.planning.reorder_alert(
            sku, self.alerts.command_at_ms, available, self.incoming.of(sku),
            self.promotions.lead_time_units)
        if level != self.alerts.latched("reorder", sku):
            self.alerts.cross("reorder", level, sku=sku, figures=figures)

    def _ghost_alert(self, sku: str) -> None:
        """``ghost_stock`` after a recount: level 2 above ghost_stock_warning_bp (seed 001's
        2% target), 3 above ghost_stock_critical_bp (5%: a data integrity problem), else 0."""
        count = self.planning.last_count(sku)
        if count is None or count.system <= 0:
            return
        basis_points = (count.system - count.counted) * 10_000 // count.system
        config = self.config
        level = (3 if basis_points > config.ghost_stock_critical_bp else
                 2 if basis_points > config.ghost_stock_warning_bp else 0)
        self.alerts.cross("ghost_stock", level, sku=sku, figures={
            "ghost_bp": basis_points, "system": count.system, "counted": count.counted,
        })

    def replenishment_rows(self, skus: Sequence[str], after_sku: str, limit: int) -> list[Row]:
        """The replenishment table of ``skus`` (unknown ones left out), or, when empty, of the
        planned SKUs (with demand, settings or a count) after ``after_sku``, at most ``limit``,
        in SKU order."""
        now_ms = self.clock.now_ms()
        planning = self.planning
        if not skus:
            skus = sorted(sku for sku in planning.plans if sku > after_sku)[:limit]
        rows = []
        for sku in skus:
            handle = self.table.lookup(sku)
            if handle < 0:
                continue
            stock = (*self.table.counters(handle), self.table.unsellable(handle))
            rows.append(planning.row(sku, now_ms, stock, self.incoming.of(sku),
                                     self.promotions.lead_time_units))
        return rows

    def audit_rows(self, due_only: bool, limit: int) -> list[AuditRow]:
        """Every SKU's cycle-count status (or those due only), most urgent first: by class,
        then the time they fell due, then SKU; at most ``limit``. SKUs without demand or a
        configured class are C (reservd.planning.Planning.class_of). A scan of the table: an operator's command, not a hot path."""
        now_ms = self.clock.now_ms()
        planning = self.planning
        rows = []
        for sku, *_ in self.table.items():
            abc_class = planning.class_of(sku, now_ms)
            days = planning.count_days(abc_class)
            last = planning.last_count(sku)
            due_at_ms = 0 if last is None else last.at_ms + days * DAY_MS
            due = due_at_ms <= now_ms
            if due_only and not due:
                continue
            ghost = planning.ghost(sku)
            rows.append(AuditRow(
                sku, abc_class, days, 0 if last is None else last.at_ms,
                0 if last is None else last.system, 0 if last is None else last.counted,
                math.nan if ghost is None else ghost, due_at_ms, due,
            ))
        rows.sort(key=lambda row: (row.abc_class, row.due_at_ms, row.sku))
        return rows[:limit]
