"""Velocity rules: when a channel's velocity or a SKU's stock calls for tighter buffers (seed 001's
velocity-based auto-throttling, seed 000's dynamic buffer adjustment).

| rule | fires when | effect on the channel's policy | reverses when |
|---|---|---|---|
| spike | rate >= spike_ratio x baseline | share_bp lowered by spike_points_bp | rate < release_pct of the threshold, after hold_seconds |
| viral | rate >= viral_ratio x baseline | max_units capped at viral_cap_bp of available, re-decided every viral_reassess_seconds | at a reassessment, rate < release_pct of the threshold |
| pool_release | rate >= pool_release_ratio x baseline, the channel has a pool and the SKU a free spike reserve | the reserve's free units move into the pool | as spike; what is still free in the pool (at most what came) moves back |
| low_stock | available < low_stock_units | share_bp at most 10,000 - low_stock_buffer_bp | available >= low_stock_release_units |
| promotion_preload, promotion_overrun | reservd.promotions | share_bp lowered by their points | reservd.promotions |
| promotion_running | a promotion's start (one per promotion) | none: it marks the start and end | its end |

A channel's rate and baseline are in milli-units per hour (reservd.velocity); the baseline is the
SKU's pinned ``baseline_units_per_hour`` or the learned one, never less than one unit an hour.
Nothing fires on fewer than ``velocity_units_min`` units in the detection window.

Rules act only on channels whose rule policy is ``enabled`` (SetRulePolicy): an operator turns the
automation on per channel. Every firing, reassessment and reversal is a WAL command
(reservd.ledger_rules), decided before it is logged; this module holds their state and says what
each rule would do now, and the ledger decides and logs.

Several rules on one pair combine on the safe side: the largest share reduction, the lowest cap.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import NamedTuple

from reservd.channelpolicy import BASIS_POINTS, Policy

MILLI = 1000


class Rule(enum.IntEnum):
    SPIKE = 1
    VIRAL = 2
    POOL_RELEASE = 3
    LOW_STOCK = 4
    PROMOTION_PRELOAD = 5
    PROMOTION_OVERRUN = 6
    PROMOTION_RUNNING = 7  # one per promotion (sku and channel ""): from its start to its end


class Op(enum.IntEnum):
    FIRE = 1
    REASSESS = 2  # the same rule, new effect and until
    END = 3


@dataclasses.dataclass(frozen=True, slots=True)
class RulePolicy:
    """Thresholds of the velocity rules for one channel (and SKU). Ratios are percent of the
    baseline (1,000 = 10x), shares basis points, times seconds. Defaults: seeds 000 and 001."""

    enabled: int = 0  # 1: rules act on this channel
    baseline_units_per_hour: int | None = None  # pinned by an operator (None: learned)
    velocity_units_min: int = 5
    spike_ratio_pct: int = 1_000
    spike_points_bp: int = 2_500
    viral_ratio_pct: int = 4_000
    viral_cap_bp: int = 4_000
    viral_reassess_seconds: int = 900
    pool_release_ratio_pct: int = 300
    release_pct: int = 50
    hold_seconds: int = 900
    low_stock_units: int = 100
    low_stock_release_units: int = 120
    low_stock_buffer_bp: int = 3_000


FIELDS = tuple(field.name for field in dataclasses.fields(RulePolicy))
DEFAULT = RulePolicy()


class Active(NamedTuple):
    """A rule in force on (sku, channel, ref)."""

    since_ms: int
    until_ms: int  # reassessment (viral), earliest reversal, or the promotion's normalisation
    effect: int  # bp off the share, a cap in units, units moved, or the share's ceiling in bp
    figures: tuple[tuple[str, int], ...]


Key = tuple[int, str, str, str]  # (rule, sku, channel, ref)


class Decision(NamedTuple):
    op: Op
    rule: Rule
    sku: str
    channel: str
    ref: str
    effect: int
    until_ms: int
    figures: tuple[tuple[str, int], ...]


class Measure(NamedTuple):
    """What the evaluator measured for one (sku, channel)."""

    rate: int  # milli-units/hour over the detection window
    baseline: int  # milli-units/hour, at least one unit an hour
    window_units: int
    available: int

    @property
    def ratio_pct(self) -> int:
        return self.rate * 100 // self.baseline

    def figures(self, **more: int) -> tuple[tuple[str, int], ...]:
        return (
            ("rate_milli_per_hour", self.rate), ("baseline_milli_per_hour", self.baseline),
            ("ratio_pct", self.ratio_pct), ("window_units", self.window_units),
            ("available", self.available), *more.items(),
        )


class Rules:
    """Rule policies, the rules in force, and the effect each (sku, channel) gets from them."""

    def __init__(self) -> None:
        # (sku, channel) -> fields set; sku "" = the channel's, channel "" = every channel's.
        self.policies: dict[tuple[str, str], dict[str, int | None]] = {}
        self._resolved: dict[tuple[str, str], RulePolicy] = {}
        self.active: dict[Key, Active] = {}
        self.by_pair: dict[tuple[str, str], set[Key]] = {}  # (sku, channel) -> its rules
        self.enabled: set[str] = set()  # channels with enabled = 1 at the channel level
        self.fired = 0  # metrics: firings and reversals logged since start (not replayed ones)
        self.ended = 0

    # -- policies -----------------------------------------------------------------------------

    def policy(self, sku: str, channel: str) -> RulePolicy:
        key = (sku, channel)
        resolved = self._resolved.get(key)
        if resolved is None:
            fields: dict[str, int | None] = {}
            for layer in (("", channel), (sku, ""), (sku, channel)):
                fields.update(self.policies.get(layer, {}))
            resolved = dataclasses.replace(DEFAULT, **fields)
            if len(self._resolved) < 65_536:  # a cache, bounded; a miss only costs a merge
                self._resolved[key] = resolved
        return resolved

    def apply_policy(self, sku: str, channel: str, items: dict[str, int | None]) -> None:
        assert set(items) <= set(FIELDS), items
        if items:
            self.policies[(sku, channel)] = dict(items)
        else:
            self.policies.pop((sku, channel), None)
        self._resolved.clear()
        self.enabled = {
            channel for (sku, channel), fields in self.policies.items()
            if not sku and channel and fields.get("enabled")
        }

    # -- the rules in force -------------------------------------------------------------------

    def apply(self, decision: Decision, at_ms: int) -> None:
        """Record a firing, reassessment or reversal (live and in replay)."""
        key = (int(decision.rule), decision.sku, decision.channel, decision.ref)
        pair = (decision.sku, decision.channel)
        if decision.op is Op.END:
            assert key in self.active, f"end of a rule not in force: {key}"
            del self.active[key]
            keys = self.by_pair[pair]
            keys.discard(key)
            if not keys:
                del self.by_pair[pair]
            return
        if decision.op is Op.FIRE:
            assert key not in self.active, f"rule fired twice: {key}"
            since = at_ms
            self.by_pair.setdefault(pair, set()).add(key)
        else:
            assert key in self.active, f"reassessment of a rule not in force: {key}"
            since = self.active[key].since_ms
        self.active[key] = Active(since, decision.until_ms, decision.effect, decision.figures)

    def in_force(self, sku: str, channel: str) -> list[tuple[Key, Active]]:
        """The rules on (sku, channel), by rule then ref."""
        return sorted((key, self.active[key]) for key in self.by_pair.get((sku, channel), ()))

    def effect(self, sku: str, channel: str) -> tuple[int, int, int | None] | None:
        """(share points off, share ceiling, max_units cap) from every rule on the pair."""
        points, ceiling, cap = 0, BASIS_POINTS, None
        found = False
        for (rule, *_), active in self.in_force(sku, channel):
            found = True
            if rule in (Rule.SPIKE, Rule.PROMOTION_PRELOAD, Rule.PROMOTION_OVERRUN):
                points = max(points, active.effect)
            elif rule == Rule.LOW_STOCK:
                ceiling = min(ceiling, BASIS_POINTS - active.effect)
            elif rule == Rule.VIRAL:
                cap = active.effect if cap is None else min(cap, active.effect)
        return (points, ceiling, cap) if found else None

    # -- decisions (nothing changes here) -----------------------------------------------------

    def decide_velocity(
        self, sku: str, channel: str, policy: Policy, rules: RulePolicy, measure: Measure,
        spike_free: int, spike_bucket: str, now_ms: int,
    ) -> list[Decision]:
        """What spike, viral and pool_release should do on (sku, channel) now."""
        out: list[Decision] = []
        ratio = measure.ratio_pct
        busy = measure.window_units >= rules.velocity_units_min
        hold_ms = rules.hold_seconds * 1000

        def calm(threshold_pct: int) -> bool:
            return ratio * 100 < threshold_pct * rules.release_pct

        spike = self.active.get((Rule.SPIKE, sku, channel, ""))
        if spike is None and busy and ratio >= rules.spike_ratio_pct:
            out.append(Decision(Op.FIRE, Rule.SPIKE, sku, channel, "", rules.spike_points_bp,
                                now_ms + hold_ms, measure.figures(
                                    share_bp=max(0, policy.share_bp - rules.spike_points_bp))))
        elif spike is not None and now_ms >= spike.until_ms and calm(rules.spike_ratio_pct):
            out.append(Decision(Op.END, Rule.SPIKE, sku, channel, "", 0, now_ms,
                                measure.figures(share_bp=policy.share_bp)))
        viral = self.active.get((Rule.VIRAL, sku, channel, ""))
        reassess_ms = rules.viral_reassess_seconds * 1000
        cap = max(0, measure.available) * rules.viral_cap_bp // BASIS_POINTS
        if viral is None and busy and ratio >= rules.viral_ratio_pct:
            out.append(Decision(Op.FIRE, Rule.VIRAL, sku, channel, "", cap,
                                now_ms + reassess_ms, measure.figures(max_units=cap)))
        elif viral is not None and now_ms >= viral.until_ms:
            if calm(rules.viral_ratio_pct):
                out.append(Decision(Op.END, Rule.VIRAL, sku, channel, "", 0, now_ms,
                                    measure.figures()))
            else:
                out.append(Decision(Op.REASSESS, Rule.VIRAL, sku, channel, "", cap,
                                    now_ms + reassess_ms, measure.figures(max_units=cap)))
        if policy.pool:
            # The reserve's name is the rule's ref: a reversal returns the units to it.
            release = self.active.get((Rule.POOL_RELEASE, sku, channel, spike_bucket))
            if (release is None and busy and ratio >= rules.pool_release_ratio_pct
                    and spike_free > 0):
                out.append(Decision(Op.FIRE, Rule.POOL_RELEASE, sku, channel, spike_bucket,
                                    spike_free, now_ms + hold_ms,
                                    measure.figures(units=spike_free)))
            elif (release is not None and now_ms >= release.until_ms
                  and calm(rules.pool_release_ratio_pct)):
                out.append(Decision(Op.END, Rule.POOL_RELEASE, sku, channel, spike_bucket, 0,
                                    now_ms, measure.figures()))
        return out

    def decide_low_stock(
        self, sku: str, channel: str, rules: RulePolicy, available: int, now_ms: int
    ) -> Decision | None:
        active = self.active.get((Rule.LOW_STOCK, sku, channel, ""))
        figures = (("available", available), ("low_stock_units", rules.low_stock_units))
        if active is None and available < rules.low_stock_units:
            return Decision(Op.FIRE, Rule.LOW_STOCK, sku, channel, "", rules.low_stock_buffer_bp,
                            0, figures + (("share_bp_max",
                                           BASIS_POINTS - rules.low_stock_buffer_bp),))
        if active is not None and available >= rules.low_stock_release_units:
            return Decision(Op.END, Rule.LOW_STOCK, sku, channel, "", 0, now_ms, figures)
        return None

    # -- snapshots ----------------------------------------------------------------------------

    def snapshot_rows(self) -> tuple[list, list]:
        policies = [
            (sku, channel, tuple(sorted(fields.items())))
            for (sku, channel), fields in self.policies.items()
        ]
        active = [(*key, *active) for key, active in self.active.items()]
        return policies, active

    def restore_policy(self, row: tuple) -> None:
        sku, channel, items = row
        self.apply_policy(sku, channel, dict(items))

    def restore_active(self, row: tuple) -> None:
        rule, sku, channel, ref, since_ms, until_ms, effect, figures = row
        key = (rule, sku, channel, ref)
        self.active[key] = Active(since_ms, until_ms, effect, tuple(figures))
        self.by_pair.setdefault((sku, channel), set()).add(key)


def effective(policy: Policy, effect: tuple[int, int, int | None]) -> Policy:
    """``policy`` with the rules' effect: only ever lower (the safe side)."""
    points, ceiling, cap = effect
    share = min(max(0, policy.share_bp - points), ceiling)
    max_units = policy.max_units
    if cap is not None:
        max_units = cap if max_units is None else min(max_units, cap)
    return dataclasses.replace(policy, share_bp=share, max_units=max_units)
