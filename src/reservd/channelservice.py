"""The gRPC layer of channels, buckets and ats: validates and translates; the decisions are the
ledger's (reservd.ledger -> reservd.channels). Mixed into the two servicers of reservd.service."""
from __future__ import annotations

import grpc

from reservd import validation
from reservd.atswatch import TooManyAtsWatchers
from reservd.channelpolicy import (
    BASIS_POINTS, DEFAULT_POLICY, OVERRIDABLE, Enforcement, Policy, ats,
)
from reservd.channels import SHARED
from reservd.config import Limits
from reservd.ledger import Code, Rejection
from reservd.ruleservice import rule_messages
from reservd.v1 import reservd_pb2 as pb
from reservd.validation import Invalid

_STATUS = {code: getattr(grpc.StatusCode, code.value) for code in Code}

# ChannelPolicy's optional numbers, each with its default from reservd.channels.Policy.
_NUMBERS = (
    "share_bp", "buffer_units", "max_units", "floor_units", "warning_units", "critical_units",
    "emergency_units", "zero_units", "hold_units",
)
_LEVELS = ("warning_units", "critical_units", "emergency_units", "zero_units")


def _bucket(field: str, value: str, limits: Limits, *, required: bool) -> str:
    name = validation.text(field, value, limits.channel_bytes_max, required=required)
    return name


def _numbers(field: str, message: pb.ChannelPolicy, limits: Limits) -> dict[str, int]:
    """The optional numbers that are set, each within its range."""
    out = {}
    for name in _NUMBERS:
        if not message.HasField(name):
            continue
        value = getattr(message, name)
        high = BASIS_POINTS if name == "share_bp" else limits.on_hand_max
        if not 0 <= value <= high:
            raise Invalid(f"{field}.{name}", f"must be between 0 and {high}, not {value}")
        out[name] = value
    if message.enforcement not in (0, *iter(Enforcement)):
        raise Invalid(f"{field}.enforcement", f"unknown enforcement {message.enforcement}")
    if message.enforcement:
        out["enforcement"] = Enforcement(message.enforcement)
    return out


def policy_of(field: str, message: pb.ChannelPolicy, limits: Limits) -> Policy:
    """A whole policy: unset fields take their defaults."""
    pool = _bucket(f"{field}.pool", message.pool, limits, required=False)
    reserve = _bucket(f"{field}.reserve", message.reserve, limits, required=False)
    for name, value in (("pool", pool), ("reserve", reserve)):
        if value == SHARED:
            raise Invalid(f"{field}.{name}", "must name a bucket other than shared")
    if pool and pool == reserve:
        raise Invalid(f"{field}.reserve", f"must differ from the pool {pool!r}")
    if message.pool_only and not (pool or reserve):
        raise Invalid(f"{field}.pool_only", "needs a pool or a reserve to draw from")
    policy = Policy(pool=pool, reserve=reserve, pool_only=message.pool_only,
                    **_numbers(field, message, limits))
    thresholds = [getattr(policy, name) for name in _LEVELS]
    for (higher, high), (lower, low) in zip(
        zip(_LEVELS, thresholds), zip(_LEVELS[1:], thresholds[1:])
    ):
        if low > high:
            raise Invalid(f"{field}.{lower}", f"must be at most {higher} ({high}), not {low}")
    return policy


def overrides_of(field: str, message: pb.ChannelPolicy, limits: Limits) -> dict[str, object]:
    for name in ("pool", "reserve", "pool_only"):
        if getattr(message, name):
            raise Invalid(f"{field}.{name}", "cannot be overridden per SKU: SetChannel sets it")
    overrides = _numbers(field, message, limits)
    assert set(overrides) <= set(OVERRIDABLE)
    return overrides


def policy_message(policy: Policy) -> pb.ChannelPolicy:
    numbers = {name: getattr(policy, name) for name in _NUMBERS}
    if numbers["max_units"] is None:
        del numbers["max_units"]
    return pb.ChannelPolicy(
        pool=policy.pool, reserve=policy.reserve, pool_only=policy.pool_only,
        enforcement=int(policy.enforcement), **numbers,
    )


def buckets_message(sku: str, rows) -> pb.SkuBuckets:
    return pb.SkuBuckets(sku=sku, buckets=[
        pb.Bucket(bucket=name, free=free, reserved=reserved, committed=committed)
        for name, free, reserved, committed in rows
    ])


def line_extras(book, reservation_id: str, channel: str, sku: str, granted: int,
                available: int) -> dict:
    """What a Reserve answer adds per line: where its units came from (no buckets listed: all
    from shared), and the channel's ats."""
    if not book.active:
        value = ats(DEFAULT_POLICY, available, max(available, 0))
        return {"ats": value.ats, "level": value.level}
    value = book.ats_of(sku, channel, available)
    held = book.held.get(reservation_id)
    parts = held.parts_of(sku) if held is not None else None
    if parts is None:
        return {"ats": value.ats, "level": value.level}
    return {
        "buckets": [pb.BucketUnits(bucket=name, units=units) for name, units in parts],
        "ats": value.ats, "level": value.level,
    }


def fill_lines(lines, book, reservation_id: str, channel: str) -> None:
    """The same as :func:`line_extras`, written into LineOutcome messages in place (Batch)."""
    for line in lines:
        extras = line_extras(
            book, reservation_id, channel, line.sku, line.granted, line.available
        )
        line.ats = extras["ats"]
        line.level = extras["level"]
        for part in extras.get("buckets", ()):
            line.buckets.append(part)


class AtsRpcs:
    """GetAts and WatchAts, mixed into ReservationsService (needs ledger, guard, limits,
    ats_hub)."""

    async def _channels(self, field: str, values, context, *, required: bool) -> tuple[str, ...]:
        limits = self.limits
        try:
            if required and not values:
                raise Invalid(field, "must name at least one channel")
            if len(values) > limits.ats_channels_max:
                raise Invalid(
                    field, f"must name at most {limits.ats_channels_max} channels, "
                    f"not {len(values)}"
                )
            channels = tuple(
                validation.text(f"{field}[{i}]", value, limits.channel_bytes_max)
                for i, value in enumerate(values)
            )
        except Invalid as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        policies = self.ledger.channels.policies
        for i, channel in enumerate(channels):
            if channel not in policies:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"{field}[{i}]: channel {channel!r} is not configured: SetChannel first",
                )
        return channels

    async def _known_skus(self, values, context, count_max: int, *, required: bool):
        try:
            skus = validation.skus("skus", values, self.limits, count_max, required=required)
        except Invalid as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        for i, counters in enumerate(self.ledger.table.stock(skus)):
            if counters is None:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND, f"skus[{i}]: sku {skus[i]!r} is unknown"
                )
        return skus

    async def GetAts(self, request: pb.GetAtsRequest, context) -> pb.GetAtsResponse:
        skus = await self._known_skus(
            request.skus, context, self.limits.get_skus_max, required=True
        )
        channels = await self._channels("channels", request.channels, context, required=True)
        book, seq, rules = self.ledger.channels, self.ledger.seq, self.ledger.rules
        stale = self.guard.grant_reason is not None
        out = []
        for sku in skus:
            available = book.available(sku)
            for channel in channels:
                value = book.ats_of(sku, channel, available)
                out.append(pb.Ats(
                    sku=sku, channel=channel, ats=value.ats, level=int(value.level),
                    sequence=seq, stale=stale,
                    rules=rule_messages(rules.in_force(sku, channel)) if rules.active else (),
                ))
        return pb.GetAtsResponse(ats=out)

    async def WatchAts(self, request: pb.WatchAtsRequest, context):
        channels = await self._channels("channels", request.channels, context, required=True)
        skus = await self._known_skus(
            request.skus, context, self.limits.watch_skus_max, required=False
        )
        try:
            watcher = self.ats_hub.open(
                frozenset(channels), frozenset(skus) or None, request.from_sequence
            )
        except TooManyAtsWatchers as error:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"watchers: {error}")
        try:
            async for batch in self.ats_hub.updates_of(watcher):
                for update in batch:
                    yield update
        finally:
            self.ats_hub.release(watcher)


class ChannelAdminRpcs:
    """SetChannel, ListChannels, SetSkuPolicy, Allocate, GetBuckets, mixed into AdminService
    (needs ledger, durability, guard, limits)."""

    async def _decided(self, decide, context):
        """Run the ledger's decision while writes are open; answer a refusal; wait until the
        change is durable."""
        if self.guard.write_reason is not None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"writes are closed: {self.guard.write_reason}"
            )
        outcome = decide()
        if isinstance(outcome, Rejection):
            await context.abort(_STATUS[outcome.code], outcome.text())
        if outcome.seq:
            await self.durability.wait(outcome.seq, context)
        return outcome

    def _change_id(self, request) -> str:
        return validation.text("change_id", request.change_id, self.limits.id_bytes_max)

    async def SetChannel(self, request: pb.SetChannelRequest, context) -> pb.ChannelResponse:
        try:
            channel = validation.text("channel", request.channel, self.limits.channel_bytes_max)
            policy = policy_of("policy", request.policy, self.limits)
            change_id = self._change_id(request)
        except Invalid as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        outcome = await self._decided(
            lambda: self.ledger.set_channel(change_id, channel, policy), context
        )
        current = self.ledger.channels.policies[channel]
        return pb.ChannelResponse(
            channel=pb.Channel(channel=channel, policy=policy_message(current)),
            sequence=outcome.seq, replayed=outcome.replayed,
        )

    async def ListChannels(self, request: pb.ListChannelsRequest, context):
        limits = self.limits
        try:
            names = tuple(
                validation.text(f"channels[{i}]", value, limits.channel_bytes_max)
                for i, value in enumerate(request.channels)
            )
        except Invalid as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        policies = self.ledger.channels.policies
        for i, channel in enumerate(names):
            if channel not in policies:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND, f"channels[{i}]: channel {channel!r} is unknown"
                )
        return pb.ListChannelsResponse(channels=[
            pb.Channel(channel=channel, policy=policy_message(policies[channel]))
            for channel in (names or sorted(policies))
        ])

    async def SetSkuPolicy(self, request: pb.SetSkuPolicyRequest, context):
        limits = self.limits
        try:
            sku = validation.text("sku", request.sku, limits.id_bytes_max)
            channel = validation.text("channel", request.channel, limits.channel_bytes_max)
            overrides = overrides_of("overrides", request.overrides, limits)
            change_id = self._change_id(request)
        except Invalid as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        outcome = await self._decided(
            lambda: self.ledger.set_sku_policy(change_id, sku, channel, overrides), context
        )
        policy = self.ledger.channels.policy(sku, channel)
        return pb.SkuPolicyResponse(
            sku=sku, channel=pb.Channel(channel=channel, policy=policy_message(policy)),
            sequence=outcome.seq, replayed=outcome.replayed,
        )

    async def Allocate(self, request: pb.AllocateRequest, context) -> pb.AllocateResponse:
        limits = self.limits
        try:
            sku = validation.text("sku", request.sku, limits.id_bytes_max)
            from_bucket = _bucket("from_bucket", request.from_bucket, limits, required=True)
            to_bucket = _bucket("to_bucket", request.to_bucket, limits, required=True)
            if from_bucket == to_bucket:
                raise Invalid("to_bucket", f"must differ from from_bucket {from_bucket!r}")
            if not 1 <= request.units <= limits.on_hand_max:
                raise Invalid(
                    "units", f"must be between 1 and {limits.on_hand_max}, not {request.units}"
                )
            change_id = self._change_id(request)
        except Invalid as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        outcome = await self._decided(
            lambda: self.ledger.allocate(change_id, sku, from_bucket, to_bucket, request.units),
            context,
        )
        return pb.AllocateResponse(
            buckets=buckets_message(sku, self.ledger.channels.bucket_rows(sku)),
            sequence=outcome.seq, replayed=outcome.replayed,
        )

    async def GetBuckets(self, request: pb.GetBucketsRequest, context):
        try:
            skus = validation.skus("skus", request.skus, self.limits, self.limits.get_skus_max)
        except Invalid as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        book = self.ledger.channels
        out = []
        for i, sku in enumerate(skus):
            rows = book.bucket_rows(sku)
            if rows is None:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND, f"skus[{i}]: sku {sku!r} is unknown"
                )
            out.append(buckets_message(sku, rows))
        return pb.GetBucketsResponse(skus=out)
