"""Channels, buckets and ``ats``: one rule family beside the ledger.

A SKU's ``available`` units are split into buckets: ``shared`` plus named buckets that an admin
fills with ``Allocate`` (a channel's *pool*, or a *reserve* such as returns or creator seeding).
Only the named buckets are stored, each as ``[free, reserved, committed]``; ``shared`` is what
is left of the counter table's row totals, so the buckets' free units always add up to
``available``, a restock or recount changes ``shared`` alone (a shortfall lands there), and the
table's totals -- what never-oversell rests on -- stay as they are. A SKU without named buckets
costs nothing here.

A reservation draws from the buckets its channel may use: its pool, then the reserve it is bound
to, then ``shared`` (unless the channel is ``pool_only``); never another channel's pool or an
unbound reserve. The draw of a reservation that touched a named bucket is remembered, so release,
expiry, commit and fulfil move the units in the bucket they came from.

``ats`` -- what a channel may show -- has exactly one definition: reservd.channelpolicy.ats,
fed by :meth:`Channels.drawable`.

The ledger calls ``check_*`` (nothing changes; a refusal is ``(code, message)``), then
``apply_*`` (which asserts), then logs the command: the same order as every ledger mutation, so
replay re-applies exactly what was decided.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import NamedTuple

from reservd import stockstates
from reservd.channelpolicy import (
    DEFAULT_POLICY as _DEFAULT, OVERRIDABLE, Ats, Enforcement, Policy, ats, policy_from_row,
    policy_row,
)
from reservd.rules import effective

SHARED = "shared"

_FREE, _RESERVED, _COMMITTED = 0, 1, 2


class Draw(NamedTuple):
    """The units one reservation line took from each bucket, in draw order."""

    sku: str
    parts: tuple[tuple[str, int], ...]  # (bucket, units), bucket may be SHARED


class _Held(NamedTuple):
    committed: bool
    lines: tuple[Draw, ...]

    def parts_of(self, sku: str) -> tuple[tuple[str, int], ...] | None:
        for draw in self.lines:
            if draw.sku == sku:
                return draw.parts
        return None


Refusal = tuple[str, str]  # (ledger Code value, "field: message")


class Channels:
    """Policies, per-SKU overrides, per-SKU buckets and the draws of reservations that touched
    a named bucket."""

    def __init__(self, table, channels_max: int, buckets_per_sku_max: int) -> None:
        self.table = table
        self.channels_max = channels_max
        self.buckets_per_sku_max = buckets_per_sku_max
        self.policies: dict[str, Policy] = {}
        self.overrides: dict[tuple[str, str], dict[str, object]] = {}  # (sku, channel)
        self.buckets: dict[str, dict[str, list[int]]] = {}  # sku -> bucket -> counters
        # sku -> the named buckets' free units together (shared is available minus this).
        self.named_free: dict[str, int] = {}
        self.held: dict[str, _Held] = {}  # reservation id -> its draws
        self._resolved: dict[tuple[str, str], Policy] = {}
        # (sku, channel) -> (share points off, share ceiling, max_units cap) of the velocity
        # rules in force (reservd.rules); set only by the ledger's RULE commands.
        self.rule_effects: dict[tuple[str, str], tuple[int, int, int | None]] = {}
        # Anything to check on a Reserve at all: no channel and no bucket costs nothing.
        self.active = False
        # While WatchAts streams are open: the (sku, channel) pairs a channel command touched
        # (None: every SKU, or every channel), for reservd.atswatch to recompute.
        self.tracking = False
        self.touched: set[tuple[str | None, str | None]] = set()
        # Idempotency of admin changes: change id -> (request, seq, at_ms), kept retention_ms.
        self.changes: dict[str, tuple[tuple, int, int]] = {}
        self._change_order: collections.deque[tuple[int, str]] = collections.deque()

    # -- reading ------------------------------------------------------------------------------

    def policy(self, sku: str, channel: str) -> Policy:
        """The channel's policy with the SKU's overrides (an unknown channel: the default,
        which draws shared only)."""
        if not self.overrides and not self.rule_effects:
            return self.policies.get(channel, _DEFAULT)
        key = (sku, channel)
        resolved = self._resolved.get(key)
        if resolved is not None:
            return resolved
        resolved = self.policies.get(channel, _DEFAULT)
        overrides = self.overrides.get(key)
        effect = self.rule_effects.get(key)
        if not overrides and effect is None:
            return resolved
        if overrides:
            resolved = dataclasses.replace(resolved, **overrides)
        if effect is not None:
            resolved = effective(resolved, effect)
        self._resolved[key] = resolved
        return resolved

    def set_rule_effect(self, sku: str, channel: str, effect) -> None:
        """What the velocity rules in force do to (sku, channel)'s policy (None: nothing);
        reservd.rules.effective applies it after the SKU's overrides."""
        key = (sku, channel)
        if effect is None:
            self.rule_effects.pop(key, None)
        else:
            self.rule_effects[key] = effect
        self._resolved.pop(key, None)
        if self.tracking:
            self.touched.add(key)

    def available(self, sku: str) -> int | None:
        handle = self.table.lookup(sku)
        if handle < 0:
            return None
        return stockstates.available(*self.table.counters(handle), self.table.unsellable(handle))

    def shared(self, sku: str, available: int) -> int:
        """Free units of ``shared``: available minus the named buckets' free units (negative
        under a shortfall)."""
        return available - self.named_free.get(sku, 0)

    def drawable(self, sku: str, policy: Policy, available: int) -> int:
        """Units a channel with ``policy`` may draw from ``sku`` now."""
        if available <= 0:
            return 0
        buckets = self.buckets.get(sku)
        if not buckets:
            return 0 if policy.pool_only else available
        units = 0
        for name in (policy.pool, policy.reserve):
            counters = buckets.get(name) if name else None
            if counters is not None:
                units += counters[_FREE]
        if not policy.pool_only:
            units += max(0, self.shared(sku, available))
        return min(units, available)

    def ats_of(self, sku: str, channel: str, available: int | None = None) -> Ats | None:
        """The channel's ats for ``sku`` now (None: unknown SKU)."""
        if available is None:
            available = self.available(sku)
            if available is None:
                return None
        policy = self.policy(sku, channel)
        return ats(policy, available, self.drawable(sku, policy, available))

    def bucket_rows(self, sku: str) -> list[tuple[str, int, int, int]] | None:
        """(bucket, free, reserved, committed) for ``shared`` then each named bucket by name;
        None for an unknown SKU."""
        handle = self.table.lookup(sku)
        if handle < 0:
            return None
        on_hand, reserved, committed = self.table.counters(handle)
        named = sorted(self.buckets.get(sku, {}).items())
        shared = [
            stockstates.available(on_hand, reserved, committed, self.table.unsellable(handle)),
            reserved - sum(c[_RESERVED] for _, c in named),
            committed - sum(c[_COMMITTED] for _, c in named),
        ]
        shared[_FREE] -= sum(c[_FREE] for _, c in named)
        return [(SHARED, *shared)] + [(name, *counters) for name, counters in named]

    def draws_of(self, reservation_id: str) -> dict[str, tuple[tuple[str, int], ...]]:
        """sku -> (bucket, units) of a live reservation that touched a named bucket."""
        held = self.held.get(reservation_id)
        return {} if held is None else {draw.sku: draw.parts for draw in held.lines}

    # -- Reserve ------------------------------------------------------------------------------

    def limits(
        self, skus: tuple[str, ...], channel: str
    ) -> tuple[int, ...] | None:
        """Per line, the most the channel may take now (None: nothing limits it beyond the
        table's available). Read in the same synchronous step as the table's reserve."""
        if not self.active:
            return None
        policies, buckets = self.policies, self.buckets
        configured = channel in policies
        if not buckets and not configured:
            return None
        out = []
        limited = False
        stock = None
        for i, sku in enumerate(skus):
            policy = self.policy(sku, channel) if configured else _DEFAULT
            strict = policy.enforcement is Enforcement.STRICT
            if not (strict or policy.pool_only or sku in buckets):
                out.append(-1)
                continue
            if stock is None:
                stock = self.table.stock(skus)  # one call into the table for every line
            counters = stock[i]
            if counters is None:
                out.append(-1)  # the table names the unknown SKU
                continue
            available = self.available(sku)
            drawable = self.drawable(sku, policy, available)
            if strict:
                drawable = min(drawable, ats(policy, available, drawable).ats)
            out.append(drawable)
            limited = True
        return tuple(out) if limited else None

    def apply_reserve(
        self, reservation_id: str, channel: str, skus: tuple[str, ...],
        quantities: tuple[int, ...],
    ) -> None:
        """Take granted units from the channel's buckets: pool, reserve, then shared. Also the
        replay path, so it decides nothing that the log does not already say."""
        buckets = self.buckets
        if not buckets:
            return
        policy = self.policies.get(channel, _DEFAULT)  # pool and reserve are not per SKU
        lines = []
        for sku, quantity in zip(skus, quantities):
            named = buckets.get(sku)
            if named is None or quantity == 0:
                continue
            parts = []
            left = quantity
            for name in (policy.pool, policy.reserve):
                counters = named.get(name) if name else None
                if counters is None or left == 0:
                    continue
                take = min(left, counters[_FREE])
                if take:
                    counters[_FREE] -= take
                    self.named_free[sku] -= take
                    counters[_RESERVED] += take
                    parts.append((name, take))
                    left -= take
            if not parts:
                continue
            if left:
                assert not policy.pool_only, (
                    f"reserve {reservation_id!r}: {left} units of {sku!r} beyond the pool of "
                    f"pool-only channel {channel!r}"
                )
                parts.append((SHARED, left))
            lines.append(Draw(sku, tuple(parts)))
        if lines:
            self.held[reservation_id] = _Held(False, tuple(lines))

    def apply_commit(self, reservation_id: str, committed: dict[str, int]) -> None:
        """Held -> committed: ``committed[sku]`` units stay, taken in draw order; the rest goes
        back to the buckets drawn last (shared first)."""
        held = self.held.get(reservation_id)
        if held is None:
            return
        assert not held.committed, f"commit of committed draws of {reservation_id!r}"
        lines = []
        for draw in held.lines:
            named = self.buckets[draw.sku]
            keep = committed.get(draw.sku, sum(units for _, units in draw.parts))
            parts = []
            for name, units in draw.parts:
                stay = min(units, keep)
                keep -= stay
                if name != SHARED:
                    counters = named[name]
                    assert counters[_RESERVED] >= units, (reservation_id, draw, counters)
                    counters[_RESERVED] -= units
                    counters[_COMMITTED] += stay
                    counters[_FREE] += units - stay
                    self.named_free[draw.sku] += units - stay
                if stay:
                    parts.append((name, stay))
            self._drop_empty(draw.sku)
            if any(name != SHARED for name, _ in parts):
                lines.append(Draw(draw.sku, tuple(parts)))
        if lines:
            self.held[reservation_id] = _Held(True, tuple(lines))
        else:
            del self.held[reservation_id]

    def apply_finish(self, reservation_id: str, fulfilled: bool) -> None:
        """Release or expiry (units back to their buckets) or fulfil (committed units leave)."""
        held = self.held.pop(reservation_id, None)
        if held is None:
            return
        assert held.committed or not fulfilled, f"fulfil of held draws of {reservation_id!r}"
        column = _COMMITTED if held.committed else _RESERVED
        for draw in held.lines:
            named = self.buckets[draw.sku]
            for name, units in draw.parts:
                if name == SHARED:
                    continue
                counters = named[name]
                assert counters[column] >= units, (reservation_id, draw, counters)
                counters[column] -= units
                if not fulfilled:
                    counters[_FREE] += units
                    self.named_free[draw.sku] += units
            self._drop_empty(draw.sku)

    # -- Admin --------------------------------------------------------------------------------

    def check_set_channel(self, channel: str, policy: Policy) -> Refusal | None:
        if channel not in self.policies and len(self.policies) >= self.channels_max:
            return (
                "RESOURCE_EXHAUSTED",
                f"channel: {len(self.policies)} channels configured, channels_max reached",
            )
        for field, name in (("policy.pool", policy.pool), ("policy.reserve", policy.reserve)):
            for other, existing in self.policies.items():
                if other != channel and name and existing.pool == name:
                    return (
                        "FAILED_PRECONDITION",
                        f"{field}: bucket {name!r} is channel {other!r}'s pool",
                    )
        if policy.pool:
            for other, existing in self.policies.items():
                if other != channel and existing.reserve == policy.pool:
                    return (
                        "FAILED_PRECONDITION",
                        f"policy.pool: bucket {policy.pool!r} is a reserve of channel {other!r}",
                    )
        return None

    def apply_set_channel(self, channel: str, policy: Policy) -> None:
        self.policies[channel] = policy
        self._resolved.clear()
        self.active = True
        if self.tracking:
            self.touched.add((None, channel))

    def check_sku_policy(self, sku: str, channel: str) -> Refusal | None:
        if self.table.lookup(sku) < 0:
            return ("NOT_FOUND", f"sku: sku {sku!r} is unknown")
        if channel not in self.policies:
            return (
                "FAILED_PRECONDITION",
                f"channel: channel {channel!r} is not configured: SetChannel first",
            )
        return None

    def apply_sku_policy(self, sku: str, channel: str, overrides: dict[str, object]) -> None:
        assert set(overrides) <= set(OVERRIDABLE), overrides
        key = (sku, channel)
        if overrides:
            self.overrides[key] = dict(overrides)
        else:
            self.overrides.pop(key, None)
        self._resolved.pop(key, None)
        if self.tracking:
            self.touched.add(key)

    def check_allocate(
        self, sku: str, from_bucket: str, to_bucket: str, units: int
    ) -> Refusal | None:
        available = self.available(sku)
        if available is None:
            return ("NOT_FOUND", f"sku: sku {sku!r} is unknown")
        named = self.buckets.get(sku, {})
        if from_bucket == SHARED:
            free = self.shared(sku, available)
        else:
            counters = named.get(from_bucket)
            free = 0 if counters is None else counters[_FREE]
        if free < units:
            return (
                "FAILED_PRECONDITION",
                f"from_bucket: bucket {from_bucket!r} of sku {sku!r} has {free} free units, "
                f"not {units}",
            )
        if to_bucket != SHARED and to_bucket not in named:
            if len(named) >= self.buckets_per_sku_max:
                return (
                    "RESOURCE_EXHAUSTED",
                    f"to_bucket: sku {sku!r} has {len(named)} buckets besides shared, "
                    "buckets_per_sku_max reached",
                )
        return None

    def apply_allocate(self, sku: str, from_bucket: str, to_bucket: str, units: int) -> None:
        named = self.buckets.setdefault(sku, {})
        if from_bucket != SHARED:
            counters = named[from_bucket]
            assert counters[_FREE] >= units, (sku, from_bucket, counters, units)
            counters[_FREE] -= units
            self.named_free[sku] -= units
        if to_bucket != SHARED:
            named.setdefault(to_bucket, [0, 0, 0])[_FREE] += units
            self.named_free[sku] = self.named_free.get(sku, 0) + units
        self._drop_empty(sku)
        self.active = True
        if self.tracking:
            self.touched.add((sku, None))

    # -- idempotency of admin changes ---------------------------------------------------------

    def check_change(self, change_id: str, request: tuple) -> Refusal | int | None:
        """None: a new change; the sequence of the earlier identical change; or a refusal."""
        earlier = self.changes.get(change_id)
        if earlier is None:
            return None
        if earlier[0] != request:
            return (
                "ALREADY_EXISTS",
                f"change_id: change {change_id!r} exists with a different payload",
            )
        return earlier[1]

    def note_change(
        self, change_id: str, request: tuple, seq: int, at_ms: int, retention_ms: int
    ) -> None:
        """Remember an applied change; forget those older than ``retention_ms`` (by the
        command's own time, so replay forgets exactly the same)."""
        self.changes[change_id] = (request, seq, at_ms)
        order = self._change_order
        order.append((at_ms, change_id))
        while order and order[0][0] <= at_ms - retention_ms:
            _, old = order.popleft()
            entry = self.changes.get(old)
            if entry is not None and entry[2] <= at_ms - retention_ms:
                del self.changes[old]

    def _drop_empty(self, sku: str) -> None:
        named = self.buckets.get(sku)
        if named is None:
            return
        for name in [name for name, counters in named.items() if not any(counters)]:
            del named[name]
        if not named:
            del self.buckets[sku]
            assert self.named_free.pop(sku) == 0, sku

    # -- snapshots ----------------------------------------------------------------------------

    def snapshot_rows(self) -> dict[str, list]:
        """The whole state as builtin types (the ledger's snapshot carries them)."""
        return {
            "policies": [
                (channel, policy_row(policy)) for channel, policy in self.policies.items()
            ],
            "overrides": [
                (sku, channel, sorted(overrides.items()))
                for (sku, channel), overrides in self.overrides.items()
            ],
            "buckets": [
                (sku, name, *counters)
                for sku, named in self.buckets.items()
                for name, counters in named.items()
            ],
            "held": [
                (reservation_id, held.committed, [(d.sku, list(d.parts)) for d in held.lines])
                for reservation_id, held in self.held.items()
            ],
            "changes": [
                (change_id, request, seq, at_ms)
                for change_id, (request, seq, at_ms) in self.changes.items()
            ],
        }

    def restore_rows(self, kind: str, rows: list) -> None:
        if kind == "policies":
            for channel, row in rows:
                self.policies[channel] = policy_from_row(row)
        elif kind == "overrides":
            for sku, channel, items in rows:
                overrides = dict(items)
                if "enforcement" in overrides:
                    overrides["enforcement"] = Enforcement(overrides["enforcement"])
                self.overrides[(sku, channel)] = overrides
        elif kind == "buckets":
            for sku, name, free, reserved, committed in rows:
                self.buckets.setdefault(sku, {})[name] = [free, reserved, committed]
                self.named_free[sku] = self.named_free.get(sku, 0) + free
        elif kind == "held":
            for reservation_id, committed, lines in rows:
                self.held[reservation_id] = _Held(
                    committed,
                    tuple(Draw(sku, tuple(tuple(p) for p in parts)) for sku, parts in lines),
                )
        elif kind == "changes":
            for change_id, request, seq, at_ms in sorted(rows, key=lambda row: row[3]):
                self.changes[change_id] = (request, seq, at_ms)
                self._change_order.append((at_ms, change_id))
        else:
            raise ValueError(f"unknown channels snapshot part {kind!r}")
        self._resolved.clear()
        self.active = bool(self.policies or self.buckets)
