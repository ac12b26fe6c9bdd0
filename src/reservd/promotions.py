"""The promotion calendar (seed 001's promotion-aware buffers).

A promotion names SKUs, channels, a start, an end and a forecast of the units it sells. Around it,
on every (sku, channel) it names:

- ``preload_seconds`` (24 h) before the start: the buffer rises, share_bp lowered by
  ``preload_points_bp`` (2,000: 20 points, within the seed's 15-25 %) -- rule promotion_preload;
- during it: once the units sold since the start reach ``overrun_pct`` (150 %) of the forecast
  pro-rated to the time elapsed, and at least ``overrun_units_min``, the buffers tighten like a
  spike (the channel's ``spike_points_bp``) -- rule promotion_overrun;
- ``normalize_seconds`` (3 h, within the seed's 2-4 h) after the end: both rules end.

Its start and end are a rule too, promotion_running (one per promotion, no effect), so each is a
logged command (and an alert) at its time.

Announced less than ``notice_seconds`` (48 h) before its start, a promotion is accepted and
flagged ``short_notice`` (and its preload starts at once when the 24 h have begun).

The units sold are counted as Reserves are applied (the record's own time), so replay counts the
same. The phase changes are RULE commands the ledger logs (reservd.ledger_rules).

Replenishment reads the calendar too (seed 003's campaign case, :meth:`Promotions.lead_time_units`):
a promotion scheduled or running on a SKU adds its forecast, spread evenly over its duration, for
the part of it inside the lead time from now, to the reorder point, and marks the reorder alert
urgent (reservd.planning).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

from reservd.rules import Decision, Op, Rule


@dataclasses.dataclass(frozen=True, slots=True)
class Timing:
    """From reservd.config.Config (promotion_*)."""

    preload_seconds: int = 86_400
    preload_points_bp: int = 2_000
    overrun_pct: int = 150
    overrun_units_min: int = 10
    normalize_seconds: int = 10_800
    notice_seconds: int = 172_800


class Promotion:
    __slots__ = ("promotion_id", "skus", "channels", "starts_at_ms", "ends_at_ms",
                 "forecast_units", "set_at_ms", "short_notice", "sold", "preloaded",
                 "overrun", "done_at_ms")

    def __init__(self, promotion_id: str, skus: tuple[str, ...], channels: tuple[str, ...],
                 starts_at_ms: int, ends_at_ms: int, forecast_units: int, set_at_ms: int,
                 short_notice: bool) -> None:
        self.promotion_id = promotion_id
        self.skus = skus
        self.channels = channels
        self.starts_at_ms = starts_at_ms
        self.ends_at_ms = ends_at_ms
        self.forecast_units = forecast_units
        self.set_at_ms = set_at_ms
        self.short_notice = short_notice
        self.sold = 0  # units reserved on its (sku, channel) pairs between start and end
        self.preloaded = False
        self.overrun = False
        self.done_at_ms = 0  # normalised at (0: not yet)

    @property
    def request(self) -> tuple:
        return (self.skus, self.channels, self.starts_at_ms, self.ends_at_ms,
                self.forecast_units)

    def pairs(self):
        return [(sku, channel) for sku in self.skus for channel in self.channels]

    def row(self) -> tuple:
        return (self.promotion_id, self.skus, self.channels, self.starts_at_ms, self.ends_at_ms,
                self.forecast_units, self.set_at_ms, int(self.short_notice), self.sold,
                int(self.preloaded), int(self.overrun), self.done_at_ms)


class SetOutcome(NamedTuple):
    promotion: Promotion
    seq: int
    replayed: bool


class Promotions:
    def __init__(self, timing: Timing, promotions_max: int) -> None:
        self.timing = timing
        self.promotions_max = promotions_max
        self.by_id: dict[str, Promotion] = {}
        self.by_sku: dict[str, list[Promotion]] = {}  # only promotions not yet normalised

    def __len__(self) -> int:
        return len(self.by_id)

    def short_notice(self, starts_at_ms: int, now_ms: int) -> bool:
        return starts_at_ms - now_ms < self.timing.notice_seconds * 1000

    def apply_set(self, promotion: Promotion, retention_ms: int) -> None:
        # Normalised promotions are forgotten retention_ms after their end (the command's own
        # time decides, so replay forgets the same ones).
        for old in [p for p in self.by_id.values()
                    if p.done_at_ms and p.done_at_ms <= promotion.set_at_ms - retention_ms]:
            del self.by_id[old.promotion_id]
        assert promotion.promotion_id not in self.by_id, promotion.promotion_id
        self.by_id[promotion.promotion_id] = promotion
        for sku in promotion.skus:
            self.by_sku.setdefault(sku, []).append(promotion)

    def count_sale(self, sku: str, channel: str, units: int, at_ms: int) -> None:
        """A Reserve's granted units (live and in replay)."""
        for promotion in self.by_sku.get(sku, ()):
            if (channel in promotion.channels
                    and promotion.starts_at_ms <= at_ms < promotion.ends_at_ms):
                promotion.sold += units

    def apply(self, decision: Decision, at_ms: int) -> None:
        """A promotion's RULE command was applied: its phase moves with it."""
        promotion = self.by_id[decision.ref]
        if decision.rule == Rule.PROMOTION_PRELOAD:
            if decision.op is Op.FIRE:
                promotion.preloaded = True
            elif decision.op is Op.END and not promotion.done_at_ms:
                promotion.done_at_ms = at_ms
                for sku in promotion.skus:
                    left = [p for p in self.by_sku.get(sku, ()) if p is not promotion]
                    if left:
                        self.by_sku[sku] = left
                    else:
                        self.by_sku.pop(sku, None)
        elif decision.rule == Rule.PROMOTION_OVERRUN and decision.op is Op.FIRE:
            promotion.overrun = True

    def prorated_pct(self, promotion: Promotion, now_ms: int) -> int:
        """Units sold as a percent of the forecast pro-rated to the time elapsed."""
        duration = promotion.ends_at_ms - promotion.starts_at_ms
        elapsed = min(max(0, now_ms - promotion.starts_at_ms), duration)
        expected_milli = promotion.forecast_units * 1000 * elapsed // duration
        if expected_milli <= 0:
            return 0 if promotion.sold == 0 else 1 << 31
        return promotion.sold * 100_000 // expected_milli

    def decide(self, promotion: Promotion, spike_points_bp, active, now_ms: int
               ) -> list[Decision]:
        """What the promotion's pairs need now. ``active(rule, sku, channel, ref)`` says
        whether a rule is in force; ``spike_points_bp(sku, channel)`` the channel's spike
        tightening."""
        timing, ref = self.timing, promotion.promotion_id
        if promotion.done_at_ms:
            return []
        out: list[Decision] = []
        figures = (("forecast_units", promotion.forecast_units), ("sold", promotion.sold),
                   ("sold_pct_of_prorated", self.prorated_pct(promotion, now_ms)),
                   ("short_notice", int(promotion.short_notice)))
        normal_at = promotion.ends_at_ms + timing.normalize_seconds * 1000
        running = active(Rule.PROMOTION_RUNNING, "", "", ref)
        if running and now_ms >= promotion.ends_at_ms:
            out.append(Decision(Op.END, Rule.PROMOTION_RUNNING, "", "", ref, 0, now_ms, figures))
        elif (not running and promotion.starts_at_ms <= now_ms < promotion.ends_at_ms):
            out.append(Decision(Op.FIRE, Rule.PROMOTION_RUNNING, "", "", ref, 0,
                                promotion.ends_at_ms, figures))
        if now_ms >= normal_at:
            for sku, channel in promotion.pairs():
                for rule in (Rule.PROMOTION_OVERRUN, Rule.PROMOTION_PRELOAD):
                    if active(rule, sku, channel, ref):
                        out.append(Decision(Op.END, rule, sku, channel, ref, 0, now_ms, figures))
            return out
        if now_ms >= promotion.starts_at_ms - timing.preload_seconds * 1000:
            for sku, channel in promotion.pairs():
                if not active(Rule.PROMOTION_PRELOAD, sku, channel, ref):
                    out.append(Decision(Op.FIRE, Rule.PROMOTION_PRELOAD, sku, channel, ref,
                                        timing.preload_points_bp, normal_at, figures))
        running = promotion.starts_at_ms <= now_ms < promotion.ends_at_ms
        if (running and promotion.sold >= timing.overrun_units_min
                and self.prorated_pct(promotion, now_ms) >= timing.overrun_pct):
            for sku, channel in promotion.pairs():
                if not active(Rule.PROMOTION_OVERRUN, sku, channel, ref):
                    out.append(Decision(Op.FIRE, Rule.PROMOTION_OVERRUN, sku, channel, ref,
                                        spike_points_bp(sku, channel), normal_at, figures))
        return out

    def lead_time_units(self, sku: str, now_ms: int, horizon_ms: int) -> tuple[int, str]:
        """(units, promotion_id): what the promotions scheduled or running on ``sku`` (not yet
        normalised) are forecast to sell in [now_ms, now_ms + horizon_ms) -- each one's
        ``forecast_units`` spread evenly over [starts_at_ms, ends_at_ms), times the share of
        that span inside the window, rounded up to a unit -- and the promotion contributing
        the most (ties: the smaller id; "" when none). Reads only logged commands' data, so it
        is the same live, in replay and after a snapshot restore for the same ``now_ms``."""
        total, top_units, top_id = 0, 0, ""
        window_end = now_ms + horizon_ms
        for promotion in self.by_sku.get(sku, ()):
            duration = promotion.ends_at_ms - promotion.starts_at_ms
            inside = min(promotion.ends_at_ms, window_end) - max(promotion.starts_at_ms, now_ms)
            if duration <= 0 or inside <= 0 or promotion.forecast_units <= 0:
                continue
            units = -(-promotion.forecast_units * inside // duration)  # ceil, integers only
            total += units
            if units > top_units or (units == top_units and promotion.promotion_id < top_id):
                top_units, top_id = units, promotion.promotion_id
        return total, top_id

    # -- snapshots ----------------------------------------------------------------------------

    def snapshot_rows(self) -> list[tuple]:
        return [promotion.row() for promotion in self.by_id.values()]

    def restore_row(self, row: tuple) -> None:
        (promotion_id, skus, channels, starts_at_ms, ends_at_ms, forecast_units, set_at_ms,
         short_notice, sold, preloaded, overrun, done_at_ms) = row
        promotion = Promotion(promotion_id, tuple(skus), tuple(channels), starts_at_ms,
                              ends_at_ms, forecast_units, set_at_ms, bool(short_notice))
        promotion.sold, promotion.preloaded = sold, bool(preloaded)
        promotion.overrun, promotion.done_at_ms = bool(overrun), done_at_ms
        self.by_id[promotion_id] = promotion
        if not done_at_ms:
            for sku in promotion.skus:
                self.by_sku.setdefault(sku, []).append(promotion)
