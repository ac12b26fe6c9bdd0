"""The history checker's model of channels, buckets and ``ats``, written from the README
("Channels, buckets and ats"), never from reservd.channels or reservd.channelpolicy.

A SKU's available units are split into buckets: ``shared`` plus named ones an admin fills with
Allocate (a channel's pool, or a reserve); ``shared`` is what is left, so the buckets' free
units add up to available. A Reserve draws its channel's pool, then its bound reserve, then
shared (never with ``pool_only``); a channel without a policy draws shared only. Release and
expiry give units back to the bucket they came from; commit and fulfil consume them there (a
partial commit keeps the first-drawn units). ``ats``: drawable x share rounded down, minus the
buffer, capped, at levels 2-3 at most ``available - hold``, 0 at or below the floor, 0 at level
4. A ``strict`` channel's Reserve beyond its ats is sold out.

:class:`ChannelModel` hangs off history_model.Model (``model.channels``); the Model calls its
hooks on every reservation and every change of a SKU, and it keeps the state of each SKU and
of the policies at every sequence, for answers that may have been read at any point of a
range (sold out, admin answers read after their wait)."""
from __future__ import annotations

import bisect
from typing import NamedTuple

SHARED = "shared"
DISPLAY, STRICT = 1, 2
DEFAULTS = {
    "pool": "", "reserve": "", "pool_only": False, "share_bp": 10_000, "buffer_units": 0,
    "max_units": None, "floor_units": 0, "enforcement": DISPLAY, "warning_units": 20,
    "critical_units": 10, "emergency_units": 5, "zero_units": 0, "hold_units": 3,
}
NUMBERS = ("share_bp", "buffer_units", "max_units", "floor_units", "warning_units",
           "critical_units", "emergency_units", "zero_units", "hold_units")


class SkuView(NamedTuple):
    """One SKU as of one sequence."""

    available: int
    named: tuple[tuple[str, int, int, int], ...]  # (bucket, free, reserved, committed) by name
    reserved: int
    committed: int

    def free(self, bucket: str) -> int | None:
        """A bucket's free units (None: no such named bucket)."""
        if bucket == SHARED:
            return self.available - sum(row[1] for row in self.named)
        return next((row[1] for row in self.named if row[0] == bucket), None)

    def rows(self) -> tuple[tuple[str, int, int, int], ...]:
        """GetBuckets' rows: shared (what is left of the totals), then each named bucket."""
        shared = (SHARED, self.free(SHARED), self.reserved - sum(r[2] for r in self.named),
                  self.committed - sum(r[3] for r in self.named))
        return (shared, *self.named)


def level_of(policy: dict, available: int) -> int:
    """Seed 000's levels on the SKU's available: 4 zero, 3 emergency, 2 critical, 1 warning."""
    for level, name in ((4, "zero_units"), (3, "emergency_units"), (2, "critical_units"),
                        (1, "warning_units")):
        if available <= policy[name]:
            return level
    return 0


def drawable(policy: dict, view: SkuView) -> int:
    """The free units of the buckets the channel may draw (a shared bucket below zero, under a
    shortfall, gives none), never more than available."""
    if view.available <= 0:
        return 0
    units = 0
    for bucket in (policy["pool"], policy["reserve"]):
        if bucket:
            units += view.free(bucket) or 0
    if not policy["pool_only"]:
        units += max(0, view.free(SHARED))
    return min(units, view.available)


def ats(policy: dict, view: SkuView) -> tuple[int, int]:
    """(ats, level): share, buffer, cap, the hold at levels 2-3, the floor; 0 at level 4."""
    level = level_of(policy, view.available)
    if level == 4:
        return 0, level
    units = drawable(policy, view) * policy["share_bp"] // 10_000 - policy["buffer_units"]
    if policy["max_units"] is not None:
        units = min(units, policy["max_units"])
    if level >= 2:
        units = min(units, view.available - policy["hold_units"])
    return (0 if units <= policy["floor_units"] else units), level


class Policies(NamedTuple):
    channels: dict  # channel -> policy (every field)
    overrides: dict  # (sku, channel) -> {field: value}

    def of(self, sku: str, channel: str) -> dict:
        """The channel's policy with the SKU's overrides; no policy: the defaults."""
        policy = self.channels.get(channel, DEFAULTS)
        overrides = self.overrides.get((sku, channel))
        return {**policy, **overrides} if overrides else policy


def limit(policies: Policies, view: SkuView, sku: str, channel: str) -> int:
    """The most a Reserve from ``channel`` may take of ``sku``: what it may draw, and for a
    strict channel no more than its ats."""
    policy = policies.of(sku, channel)
    units = drawable(policy, view)
    if policy["enforcement"] == STRICT:
        units = min(units, ats(policy, view)[0])
    return units


def decide(views, policies: Policies, request) -> list[int] | str:
    """Units granted per line of ``request`` (skus, requested, channel, ttl, allow_partial)
    against ``views`` (one SkuView per line; None: unknown SKU), or why it is refused."""
    skus, requested, channel, _ttl, allow_partial = request
    for sku, view in zip(skus, views):
        if view is None:
            return f"sku {sku!r} is unknown"
    granted = []
    for sku, quantity, view in zip(skus, requested, views):
        free = min(view.available, limit(policies, view, sku, channel))
        if allow_partial:
            granted.append(min(quantity, max(free, 0)))
        elif quantity <= free:
            granted.append(quantity)
        else:
            return "sold out"
    return granted if any(granted) else "sold out"


class ChannelModel:
    """Policies, buckets and draws, with their history by sequence."""

    def __init__(self, model) -> None:
        self.model = model  # history_model.Model: stock counters and available
        self.policies = Policies({}, {})
        self.buckets: dict[str, dict[str, list[int]]] = {}  # sku -> bucket -> [free, res, com]
        self.draws: dict[str, tuple[bool, list]] = {}  # id -> (committed, [(sku, parts)])
        self.changes: dict[str, tuple[tuple, int]] = {}  # change id -> (request, seq)
        self.sku_history: dict[str, tuple[list[int], list[SkuView]]] = {}
        self.policy_history: tuple[list[int], list[Policies]] = ([0], [Policies({}, {})])
        self.strict_grants = 0  # strict channels' grants checked against their ats
        self.lowest_free: dict[str, int] = {}  # "sku/bucket" -> its fewest free units

    # -- reading ------------------------------------------------------------------------------

    def view(self, sku: str) -> SkuView | None:
        row = self.model.stock.get(sku)
        if row is None:
            return None
        named = tuple((name, *counters) for name, counters in sorted(
            self.buckets.get(sku, {}).items()))
        return SkuView(self.model.available(sku), named, row[1], row[2])

    def view_at(self, sku: str, seq: int) -> SkuView | None:
        seqs, views = self.sku_history.get(sku, ((), ()))
        index = bisect.bisect_right(seqs, seq) - 1
        return None if index < 0 else views[index]

    def policies_at(self, seq: int) -> Policies:
        seqs, values = self.policy_history
        return values[bisect.bisect_right(seqs, seq) - 1]

    def points(self, skus, lo: int, hi: int) -> set[int]:
        """lo and every sequence in (lo, hi] that changed one of ``skus`` or a policy."""
        found = {lo}
        for seqs in [self.sku_history.get(sku, ((),))[0] for sku in skus] + [
            self.policy_history[0]
        ]:
            found.update(seqs[bisect.bisect_right(seqs, lo):bisect.bisect_right(seqs, hi)])
        return found

    def ats_of(self, sku: str, channel: str) -> tuple[int, int]:
        return ats(self.policies.of(sku, channel), self.view(sku))

    # -- hooks of history_model.Model ---------------------------------------------------------

    def decide(self, request) -> list[int] | str:
        return decide([self.view(sku) for sku in request[0]], self.policies, request)

    def changed(self, seq: int, skus) -> None:
        for sku in skus:
            seqs, views = self.sku_history.setdefault(sku, ([], []))
            view = self.view(sku)
            seqs.append(seq)
            views.append(view)
            for bucket, free, _, _ in view.rows():
                name = f"{sku}/{bucket}"
                self.lowest_free[name] = min(free, self.lowest_free.get(name, free))

    def reserve(self, reservation_id: str, channel: str, skus, granted) -> list[tuple]:
        """Take the granted units: pool, bound reserve, then shared. Returns each line's
        draw, ((bucket, units), ...), in draw order."""
        policy = self.policies.channels.get(channel, DEFAULTS)  # pool and reserve: not per SKU
        lines, out = [], []
        for sku, quantity in zip(skus, granted):
            named = self.buckets.get(sku, {})
            parts, left = [], quantity
            for bucket in (policy["pool"], policy["reserve"]):
                counters = named.get(bucket) if bucket else None
                take = min(left, counters[0]) if counters else 0
                if take > 0:
                    counters[0] -= take
                    counters[1] += take
                    parts.append((bucket, take))
                    left -= take
            if left:
                parts.append((SHARED, left))
            out.append(tuple(parts))
            if quantity:
                lines.append((sku, tuple(parts)))
                self.strict_grants += self.policies.of(sku, channel)["enforcement"] == STRICT
        self.draws[reservation_id] = (False, lines)
        return out

    def commit(self, reservation_id: str, committed: dict[str, int]) -> None:
        """Keep ``committed[sku]`` units in draw order; the last-drawn go back first."""
        _, lines = self.draws[reservation_id]
        kept = []
        for sku, parts in lines:
            keep = committed[sku]
            stays = []
            for bucket, units in parts:
                stay = min(units, keep)
                keep -= stay
                if bucket != SHARED:
                    counters = self.buckets[sku][bucket]
                    counters[1] -= units
                    counters[2] += stay
                    counters[0] += units - stay
                if stay:
                    stays.append((bucket, stay))
            kept.append((sku, tuple(stays)))
            self._drop_empty(sku)
        self.draws[reservation_id] = (True, kept)

    def finish(self, reservation_id: str, fulfilled: bool) -> None:
        """Release or expiry (units back to their buckets), or fulfil (they leave)."""
        committed, lines = self.draws.pop(reservation_id)
        for sku, parts in lines:
            for bucket, units in parts:
                if bucket == SHARED:
                    continue
                counters = self.buckets[sku][bucket]
                counters[2 if committed else 1] -= units
                if not fulfilled:
                    counters[0] += units
            self._drop_empty(sku)

    def _drop_empty(self, sku: str) -> None:
        named = self.buckets.get(sku, {})
        for bucket in [b for b, counters in named.items() if not any(counters)]:
            del named[bucket]

    # -- the channel commands -----------------------------------------------------------------

    def _change(self, seq: int, change_id: str, request: tuple) -> str:
        if change_id in self.changes:
            return f"change {change_id!r} applied twice"
        self.changes[change_id] = (request, seq)
        return ""

    def _policies_changed(self, seq: int) -> None:
        self.policy_history[0].append(seq)
        self.policy_history[1].append(self.policies)

    def set_channel(self, seq: int, change_id: str, channel: str, policy: dict):
        why = self._change(seq, change_id, ("set_channel", channel, tuple(sorted(policy.items()))))
        if why:
            return why
        self.policies = Policies({**self.policies.channels, channel: policy},
                                 self.policies.overrides)
        self._policies_changed(seq)
        return {}

    def set_sku_policy(self, seq: int, change_id: str, sku: str, channel: str, overrides: dict):
        if sku not in self.model.stock or channel not in self.policies.channels:
            return f"a policy of {sku!r} on {channel!r}: unknown sku or channel"
        why = self._change(seq, change_id,
                           ("set_sku_policy", sku, channel, tuple(sorted(overrides.items()))))
        if why:
            return why
        others = {key: value for key, value in self.policies.overrides.items()
                  if key != (sku, channel)}
        if overrides:
            others[(sku, channel)] = dict(overrides)
        self.policies = Policies(self.policies.channels, others)
        self._policies_changed(seq)
        return {}

    def allocate(self, seq: int, change_id: str, sku: str, source: str, target: str, units: int):
        view = self.view(sku)
        if view is None:
            return f"allocate of unknown sku {sku!r}"
        free = view.free(source) or 0
        if free < units:
            return f"allocated {units} of {sku!r} from {source!r}, which had {free} free"
        why = self._change(seq, change_id, ("allocate", sku, source, target, units))
        if why:
            return why
        named = self.buckets.setdefault(sku, {})
        if source != SHARED:
            named[source][0] -= units
        if target != SHARED:
            named.setdefault(target, [0, 0, 0])[0] += units
        self._drop_empty(sku)
        self.changed(seq, [sku])
        return {}
