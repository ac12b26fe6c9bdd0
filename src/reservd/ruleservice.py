"""The gRPC layer of velocity, the velocity rules and the promotion calendar: validates and
translates; the decisions are the ledger's (reservd.ledger_rules). Mixed into AdminService."""
from __future__ import annotations

import grpc

from reservd import validation
from reservd.channelpolicy import BASIS_POINTS
from reservd.promotions import Promotion
from reservd.rules import FIELDS, Rule
from reservd.v1 import reservd_pb2 as pb
from reservd.validation import Invalid
from reservd.velocity import MILLI

_SECONDS_MAX = 10 ** 8
_RATIO_MAX = 10 ** 9


def _range_of(name: str, limits) -> int:
    if name.endswith("_bp"):
        return BASIS_POINTS
    if name == "release_pct":
        return 100
    if name.endswith("_seconds"):
        return _SECONDS_MAX
    if name.endswith("_pct"):
        return _RATIO_MAX
    return limits.on_hand_max


def rule_fields(field: str, message: pb.RulePolicy, limits) -> dict[str, int | None]:
    """The fields set, each within its range."""
    out: dict[str, int | None] = {}
    for name in FIELDS:
        if not message.HasField(name):
            continue
        value = int(getattr(message, name))
        high = 1 if name == "enabled" else _range_of(name, limits)
        if not 0 <= value <= high:
            raise Invalid(f"{field}.{name}", f"must be between 0 and {high}, not {value}")
        out[name] = value
    return out


def rule_policy_message(policy) -> pb.RulePolicy:
    values = {name: getattr(policy, name) for name in FIELDS}
    values["enabled"] = bool(values["enabled"])
    if values["baseline_units_per_hour"] is None:
        del values["baseline_units_per_hour"]
    return pb.RulePolicy(**values)


def rule_messages(in_force) -> list[pb.RuleInForce]:
    return [
        pb.RuleInForce(
            rule=Rule(rule).name.lower(), sku=sku, channel=channel, ref=ref,
            since_ms=active.since_ms, until_ms=active.until_ms, effect=active.effect,
            figures=[pb.Figure(name=name, value=value) for name, value in active.figures],
        )
        for (rule, sku, channel, ref), active in in_force
    ]


def promotion_message(promotion: Promotion, now_ms: int) -> pb.Promotion:
    if promotion.done_at_ms:
        phase = "normalised"
    elif now_ms >= promotion.ends_at_ms:
        phase = "ended"
    elif promotion.overrun:
        phase = "tightened"
    elif now_ms >= promotion.starts_at_ms:
        phase = "running"
    elif promotion.preloaded:
        phase = "preloaded"
    else:
        phase = "scheduled"
    return pb.Promotion(
        promotion_id=promotion.promotion_id, skus=promotion.skus, channels=promotion.channels,
        starts_at_ms=promotion.starts_at_ms, ends_at_ms=promotion.ends_at_ms,
        forecast_units=promotion.forecast_units, set_at_ms=promotion.set_at_ms,
        short_notice=promotion.short_notice, sold=promotion.sold, phase=phase,
    )


class RuleAdminRpcs:
    """SetRulePolicy, GetVelocity, SetPromotion, ListPromotions (needs ledger, limits,
    _decided)."""

    async def SetRulePolicy(self, request: pb.SetRulePolicyRequest, context):
        limits = self.limits
        try:
            channel = validation.text("channel", request.channel, limits.channel_bytes_max,
                                      required=False)
            sku = validation.text("sku", request.sku, limits.id_bytes_max, required=False)
            if not channel and not sku:
                raise Invalid("channel", "a channel, a sku or both must be named")
            fields = rule_fields("policy", request.policy, limits)
            change_id = validation.text("change_id", request.change_id, limits.id_bytes_max)
        except Invalid as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        outcome = await self._decided(
            lambda: self.ledger.set_rule_policy(change_id, sku, channel, fields), context
        )
        return pb.RulePolicyResponse(
            channel=channel, sku=sku,
            policy=rule_policy_message(self.ledger.rules.policy(sku, channel)),
            sequence=outcome.seq, replayed=outcome.replayed,
        )

    async def GetVelocity(self, request: pb.GetVelocityRequest, context):
        try:
            sku = validation.text("sku", request.sku, self.limits.id_bytes_max)
        except Invalid as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        ledger = self.ledger
        if ledger.table.lookup(sku) < 0:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"sku: sku {sku!r} is unknown")
        now_ms = ledger.clock.now_ms()
        velocity, rules = ledger.velocity, ledger.rules
        channels = set(velocity.channels_of(sku)) if velocity is not None else set()
        channels.update(rules.enabled)
        out = []
        for channel in sorted(channels):
            pinned = rules.policy(sku, channel).baseline_units_per_hour
            learned = velocity.learned(sku, channel, now_ms) if velocity is not None else None
            baseline = pinned * MILLI if pinned is not None else learned
            out.append(pb.ChannelVelocity(
                channel=channel,
                units_per_hour=(velocity.rate(sku, channel, now_ms) / MILLI
                                if velocity is not None else 0.0),
                window_units=(velocity.window_units(sku, channel, now_ms)
                              if velocity is not None else 0),
                baseline_units_per_hour=(baseline or 0) / MILLI,
                baseline_pinned=pinned is not None, baseline_learned=learned is not None,
            ))
        in_force = sorted(
            (key, active) for key, active in rules.active.items() if key[1] == sku
        )
        return pb.GetVelocityResponse(sku=sku, channels=out, rules=rule_messages(in_force))

    async def SetPromotion(self, request: pb.SetPromotionRequest, context):
        limits = self.limits
        try:
            promotion_id = validation.text("promotion_id", request.promotion_id,
                                           limits.id_bytes_max)
            skus = validation.skus("skus", request.skus, limits, limits.get_skus_max)
            if not request.channels:
                raise Invalid("channels", "must name at least one channel")
            if len(request.channels) > limits.ats_channels_max:
                raise Invalid("channels", f"must name at most {limits.ats_channels_max} "
                              f"channels, not {len(request.channels)}")
            channels = tuple(
                validation.text(f"channels[{i}]", value, limits.channel_bytes_max)
                for i, value in enumerate(request.channels)
            )
            if len(set(channels)) != len(channels):
                raise Invalid("channels", "names a channel twice")
            if request.starts_at_ms <= 0:
                raise Invalid("starts_at_ms", "must be a unix time in milliseconds")
            if request.ends_at_ms <= request.starts_at_ms:
                raise Invalid("ends_at_ms", f"must be after starts_at_ms "
                              f"({request.starts_at_ms}), not {request.ends_at_ms}")
            if not 0 <= request.forecast_units <= limits.on_hand_max:
                raise Invalid("forecast_units", f"must be between 0 and {limits.on_hand_max}")
        except Invalid as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        outcome = await self._decided(
            lambda: self.ledger.set_promotion(
                promotion_id, tuple(skus), channels, request.starts_at_ms, request.ends_at_ms,
                request.forecast_units,
            ), context,
        )
        return pb.PromotionResponse(
            promotion=promotion_message(outcome.promotion, self.ledger.clock.now_ms()),
            sequence=outcome.seq, replayed=outcome.replayed,
        )

    async def ListPromotions(self, request: pb.ListPromotionsRequest, context):
        try:
            sku = validation.text("sku", request.sku, self.limits.id_bytes_max, required=False)
        except Invalid as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        ledger = self.ledger
        now_ms = ledger.clock.now_ms()
        return pb.ListPromotionsResponse(promotions=[
            promotion_message(promotion, now_ms)
            for promotion in sorted(ledger.promotions.by_id.values(),
                                    key=lambda p: (p.starts_at_ms, p.promotion_id))
            if not sku or sku in promotion.skus
        ])
