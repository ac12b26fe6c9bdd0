"""The ledger's velocity rules and promotion calendar: velocity kept per Reserve, and the
commands RULE, RULE_POLICY and SET_PROMOTION. Mixed into reservd.ledger.Ledger, so they follow
its one order (check every precondition -> apply -> append -> advance the sequence).

Rules never fire in replay on their own: ``evaluate_rules`` runs only live (a supervised task of
reservd.server calls it every ``rules_evaluate_ms``); it reads the velocity and stock as they are,
asks reservd.rules and reservd.promotions what should change, checks each change (a pool release
needs the reserve's free units) and logs it as a RULE command carrying the rule, the measured
figures and the effect. Replay re-applies those commands and nothing else, so the policies and
``ats`` are the same at every sequence.
"""
from __future__ import annotations

from typing import NamedTuple

from reservd import rules_records
from reservd.promotions import Promotion, Promotions, SetOutcome, Timing
from reservd.records import RecordType
from reservd.rules import FIELDS, Decision, Measure, Op, Rule, Rules
from reservd.rules_records import RuleChange, RulePolicyChange, SetPromotion
from reservd.velocity import MILLI, Velocity

RULE_KINDS = (RecordType.RULE, RecordType.RULE_POLICY, RecordType.SET_PROMOTION)
ENCODERS = {
    RecordType.RULE: rules_records.encode_rule,
    RecordType.RULE_POLICY: rules_records.encode_rule_policy,
    RecordType.SET_PROMOTION: rules_records.encode_promotion,
}


# Alert levels of a firing or reassessment (its reversal is 0): a release of the spike reserve
# and a promotion's phases inform; tightening warns; a viral cap is the emergency brake.
_ALERT_LEVELS = {
    Rule.POOL_RELEASE: 1, Rule.PROMOTION_PRELOAD: 1, Rule.PROMOTION_RUNNING: 1,
    Rule.SPIKE: 2, Rule.LOW_STOCK: 2, Rule.PROMOTION_OVERRUN: 2, Rule.VIRAL: 3,
}


class RuleOutcome(NamedTuple):
    seq: int
    replayed: bool


class RuleCommands:
    """Needs the Ledger's channels, table, clock, config, seq and its _execute, _unwritable and
    _rejection."""

    def _init_rules(self, config) -> None:
        self.velocity = Velocity(
            config.velocity_window_minutes, config.velocity_baseline_hours,
            config.velocity_tracked_pairs_max,
        ) if config.velocity_tracking else None
        self.rules = Rules()
        self.promotions = Promotions(Timing(
            config.promotion_preload_seconds, config.promotion_preload_points_bp,
            config.promotion_overrun_pct, config.promotion_overrun_units_min,
            config.promotion_normalize_seconds, config.promotion_notice_seconds,
        ), config.promotions_max)
        self.stock_dirty: set[str] = set()  # SKUs whose on_hand moved since the last evaluation
        self.rules_evaluated_seq = 0  # the state the last evaluation saw (tests wait on it)
        self.rules_refused = 0  # firings not logged: rules_active_max in force

    def _track_reserve(self, channel: str, skus, quantities, at_ms: int) -> None:
        """A Reserve's granted units (live and in replay): velocity, promotions' sales."""
        velocity = self.velocity
        if velocity is not None:
            for sku, units in zip(skus, quantities):
                velocity.record(sku, channel, units, at_ms)
        if self.promotions.by_sku:
            for sku, units in zip(skus, quantities):
                self.promotions.count_sale(sku, channel, units, at_ms)

    # -- what an operator sets ----------------------------------------------------------------

    def set_rule_policy(
        self, change_id: str, sku: str, channel: str, fields: dict[str, int | None]
    ) -> RuleOutcome:
        """Replace the rule policy fields set for (sku, channel) (reservd.rules.RulePolicy)."""
        items = tuple(sorted(fields.items()))
        request = ("rule_policy", sku, channel, items)
        earlier = self.channels.check_change(change_id, request)
        if isinstance(earlier, tuple):
            return self._rejection(*earlier)
        if earlier is not None:
            return RuleOutcome(earlier, True)
        refused = self._unwritable()
        if refused is not None:
            return refused
        if sku and self.table.lookup(sku) < 0:
            return self._rejection("NOT_FOUND", f"sku: sku {sku!r} is unknown")
        if channel and channel not in self.channels.policies:
            return self._rejection(
                "FAILED_PRECONDITION", f"channel: channel {channel!r} is not configured: "
                "SetChannel first")
        command = RulePolicyChange(self.clock.now_ms(), change_id, sku, channel, items)
        _, seq = self._execute(RecordType.RULE_POLICY, command)
        return RuleOutcome(seq, False)

    def set_promotion(
        self, promotion_id: str, skus: tuple[str, ...], channels: tuple[str, ...],
        starts_at_ms: int, ends_at_ms: int, forecast_units: int,
    ) -> SetOutcome:
        """Add a promotion to the calendar; idempotent by ``promotion_id``."""
        promotions = self.promotions
        existing = promotions.by_id.get(promotion_id)
        request = (skus, channels, starts_at_ms, ends_at_ms, forecast_units)
        if existing is not None:
            if existing.request != request:
                return self._rejection(
                    "ALREADY_EXISTS", f"promotion_id: promotion {promotion_id!r} exists with "
                    "a different payload")
            return SetOutcome(existing, 0, True)
        refused = self._unwritable()
        if refused is not None:
            return refused
        now_ms = self.clock.now_ms()
        for i, sku in enumerate(skus):
            if self.table.lookup(sku) < 0:
                return self._rejection("NOT_FOUND", f"skus[{i}]: sku {sku!r} is unknown")
        for i, channel in enumerate(channels):
            if channel not in self.channels.policies:
                return self._rejection(
                    "NOT_FOUND", f"channels[{i}]: channel {channel!r} is not configured")
        if ends_at_ms <= now_ms:
            return self._rejection(
                "FAILED_PRECONDITION", f"ends_at_ms: {ends_at_ms} is not in the future "
                f"(now {now_ms})")
        live = sum(1 for p in promotions.by_id.values() if not p.done_at_ms)
        if live >= promotions.promotions_max:
            return self._rejection(
                "RESOURCE_EXHAUSTED", f"promotion_id: {live} promotions kept, promotions_max "
                "reached")
        command = SetPromotion(
            now_ms, promotion_id, skus, channels, starts_at_ms, ends_at_ms, forecast_units,
            promotions.short_notice(starts_at_ms, now_ms),
        )
        _, seq = self._execute(RecordType.SET_PROMOTION, command)
        return SetOutcome(promotions.by_id[promotion_id], seq, False)

    # -- the evaluator (live only) ------------------------------------------------------------

    def evaluate_rules(self) -> int:
        """Decide and log what the rules call for now; returns the last sequence logged (0:
        none)."""
        if self._unwritable() is not None:
            return 0
        now_ms = self.clock.now_ms()
        last = 0
        velocity, rules, book = self.velocity, self.rules, self.channels
        skus = set(self.stock_dirty)
        self.stock_dirty.clear()
        if velocity is not None:
            skus |= velocity.dirty
            velocity.dirty.clear()
        skus.update(key[1] for key in rules.active if key[0] <= Rule.LOW_STOCK)
        enabled = sorted(rules.enabled & book.policies.keys())
        spike_bucket = self.config.rules_spike_reserve
        for sku in sorted(skus) if enabled else ():
            available = book.available(sku)
            if available is None:
                continue
            spike = book.buckets.get(sku, {}).get(spike_bucket)
            for channel in enabled:
                policy = rules.policy(sku, channel)
                if not policy.enabled:
                    continue
                decisions = []
                measure = self._measure(sku, channel, policy, available, now_ms)
                if measure is not None:
                    decisions = rules.decide_velocity(
                        sku, channel, book.policy(sku, channel), policy, measure,
                        spike[0] if spike else 0, spike_bucket, now_ms)
                low = rules.decide_low_stock(sku, channel, policy, available, now_ms)
                if low is not None:
                    decisions.append(low)
                for decision in decisions:
                    last = self._rule_command(decision, now_ms) or last
        for promotion in sorted(self.promotions.by_id.values(), key=lambda p: p.promotion_id):
            for decision in self.promotions.decide(
                promotion, lambda sku, ch: rules.policy(sku, ch).spike_points_bp,
                lambda *key: (int(key[0]), *key[1:]) in rules.active, now_ms,
            ):
                last = self._rule_command(decision, now_ms) or last
        self.rules_evaluated_seq = self.seq
        return last

    def _measure(self, sku, channel, policy, available, now_ms) -> Measure | None:
        velocity = self.velocity
        if velocity is None:
            return None
        if policy.baseline_units_per_hour is not None:
            baseline = policy.baseline_units_per_hour * MILLI
        else:
            baseline = velocity.learned(sku, channel, now_ms)
            if baseline is None:
                return None  # nothing learned yet: no ratio to act on
        return Measure(
            velocity.rate(sku, channel, now_ms), max(baseline, MILLI),
            velocity.window_units(sku, channel, now_ms), available,
        )

    def _rule_command(self, decision: Decision, now_ms: int) -> int:
        """Check ``decision`` against the state now and log it; 0 if it cannot happen."""
        book = self.channels
        if decision.op is Op.FIRE and len(self.rules.active) >= self.config.rules_active_max:
            self.rules_refused += 1
            return 0
        if decision.rule == Rule.POOL_RELEASE:
            pool = book.policies[decision.channel].pool
            if decision.op is Op.FIRE:
                source, target, units = decision.ref, pool, decision.effect
            else:
                counters = book.buckets.get(decision.sku, {}).get(pool)
                fired = self.rules.active[(int(decision.rule), decision.sku, decision.channel,
                                           decision.ref)]
                units = min(fired.effect, counters[0] if counters else 0)
                source, target = pool, decision.ref
                decision = decision._replace(
                    effect=units, figures=decision.figures + (("reclaimed", units),))
            if units and book.check_allocate(decision.sku, source, target, units) is not None:
                return 0
        command = RuleChange(
            now_ms, int(decision.op), int(decision.rule), decision.sku, decision.channel,
            decision.ref, decision.effect, decision.until_ms, decision.figures,
        )
        _, seq = self._execute(RecordType.RULE, command)
        if decision.op is Op.FIRE:
            self.rules.fired += 1
        elif decision.op is Op.END:
            self.rules.ended += 1
        return seq

    # -- apply (live and in replay) -----------------------------------------------------------

    def _apply_rules(self, kind: RecordType, command, seq: int) -> None:
        if kind is RecordType.RULE_POLICY:
            assert set(name for name, _ in command.fields) <= set(FIELDS), command
            self.rules.apply_policy(command.sku, command.channel, dict(command.fields))
            self.channels.note_change(
                command.change_id, ("rule_policy", command.sku, command.channel,
                                    command.fields),
                seq, command.at_ms, self.config.retention_seconds * 1000)
            return
        if kind is RecordType.SET_PROMOTION:
            self.promotions.apply_set(Promotion(
                command.promotion_id, command.skus, command.channels, command.starts_at_ms,
                command.ends_at_ms, command.forecast_units, command.at_ms, command.short_notice,
            ), self.config.retention_seconds * 1000)
            self.alerts.emit("promotion", 2 if command.short_notice else 1, figures={
                "promotion_id": command.promotion_id, "op": "scheduled",
                "skus": ",".join(command.skus), "channels": ",".join(command.channels),
                "starts_at_ms": command.starts_at_ms, "ends_at_ms": command.ends_at_ms,
                "forecast_units": command.forecast_units,
                "short_notice": int(command.short_notice),
            })
            for sku in command.skus:  # the reorder point rises by the promotion's forecast
                self._reorder_alert(sku)
            return
        assert kind is RecordType.RULE, kind
        decision = Decision(Op(command.op), Rule(command.rule), command.sku, command.channel,
                            command.ref, command.effect, command.until_ms, command.figures)
        book = self.channels
        if decision.rule == Rule.POOL_RELEASE and command.effect and decision.op is not \
                Op.REASSESS:
            pool = book.policies[command.channel].pool
            source, target = (command.ref, pool) if decision.op is Op.FIRE else (pool,
                                                                                command.ref)
            book.apply_allocate(command.sku, source, target, command.effect)
        self.rules.apply(decision, command.at_ms)
        if command.ref and decision.rule >= Rule.PROMOTION_PRELOAD:
            self.promotions.apply(decision, command.at_ms)
            # A phase change is a logged time to look again at the promotion's reorder
            # alerts (how much of it is inside the lead time moves with time).
            for sku in self.promotions.by_id[command.ref].skus:
                self._reorder_alert(sku)
        if decision.rule != Rule.PROMOTION_RUNNING:
            book.set_rule_effect(command.sku, command.channel,
                                 self.rules.effect(command.sku, command.channel))
            # A change ring entry: the rule moved the channel's ats (and maybe buckets), which
            # the Redis mirror and WatchAts read from the ring.
            handle = self.table.lookup(command.sku)
            assert handle >= 0, f"RULE on unknown sku {command.sku!r}"
            self.table.touch(handle, seq)
        self._rule_alert(decision, command)

    def _rule_alert(self, decision: Decision, command: RuleChange) -> None:
        """Every firing, reassessment and reversal is an alert (reservd.alerts): kind ``rule``
        or ``promotion``, level 0 when it ends."""
        promotion = decision.rule >= Rule.PROMOTION_PRELOAD
        figures: dict[str, int | str] = {
            "rule": decision.rule.name.lower(), "op": decision.op.name.lower(),
        }
        if decision.ref:
            figures["promotion_id" if promotion else "reserve"] = decision.ref
        figures.update(effect=command.effect, until_ms=command.until_ms)
        figures.update(command.figures)
        level = 0 if decision.op is Op.END else _ALERT_LEVELS[decision.rule]
        self.alerts.emit("promotion" if promotion else "rule", level, sku=command.sku,
                         channel=command.channel, figures=figures)

    # -- snapshots ----------------------------------------------------------------------------

    def _rule_sections(self) -> list[tuple[int, list]]:
        """(section kind, rows) copied now, encoded later (reservd.state_codec)."""
        policies, active = self.rules.snapshot_rows()
        return [
            (rules_records.VELOCITY,
             self.velocity.snapshot_rows() if self.velocity is not None else []),
            (rules_records.RULE_POLICY, policies),
            (rules_records.RULE_ACTIVE, active),
            (rules_records.PROMOTION, self.promotions.snapshot_rows()),
        ]

    def _restore_rule_row(self, kind: int, row: tuple) -> None:
        if kind == rules_records.VELOCITY:
            if self.velocity is not None:
                self.velocity.restore_row(row)
        elif kind == rules_records.RULE_POLICY:
            self.rules.restore_policy(row)
        elif kind == rules_records.RULE_ACTIVE:
            self.rules.restore_active(row)
            rule, sku, channel, *_ = row
            if rule != Rule.PROMOTION_RUNNING:
                self.channels.set_rule_effect(sku, channel, self.rules.effect(sku, channel))
        else:
            assert kind == rules_records.PROMOTION, kind
            self.promotions.restore_row(row)
