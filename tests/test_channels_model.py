"""Channels, buckets and allocations in the ledger against a plain-Python reference model
(hypothesis stateful), on both table implementations. After every step the table's counters,
every bucket and every channel's ats agree with the model, and never is a bucket or the total
oversold; at the end, replaying the log and restoring a snapshot rebuild exactly the same."""
from __future__ import annotations

import dataclasses

import pytest
from conftest import twins
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from test_ledger_model import RecordingLog

from reservd import _pytable
from reservd.channelpolicy import Enforcement, Policy, ats
from reservd.channels import SHARED
from reservd.clock import ManualClock
from reservd.config import Config
from reservd.ledger import Code, Ledger, Rejection, State

SKUS = ["a", "b"]
# Each channel keeps its buckets; the numbers vary.
BASES = {
    "tiktok": Policy(pool="tp"),
    "fbt": Policy(pool="fp", pool_only=True),
    "seed": Policy(reserve="rs", pool_only=True),
    "ebay": Policy(share_bp=5000, max_units=4, enforcement=Enforcement.STRICT),
}
CHANNELS = [*BASES, "web"]  # web: no policy
BUCKETS = [SHARED, "tp", "fp", "rs", "spare"]
NUMBERS = st.fixed_dictionaries({}, optional={
    "share_bp": st.sampled_from([10_000, 9000, 5000, 0]),
    "buffer_units": st.integers(0, 3),
    "max_units": st.sampled_from([None, 0, 2, 6]),
    "floor_units": st.integers(0, 3),
    "enforcement": st.sampled_from(list(Enforcement)),
    "hold_units": st.integers(0, 4),
})
CONFIG = Config()


class Model:
    """What the rules say, as plainly as possible."""

    def __init__(self) -> None:
        self.stock: dict[str, list[int]] = {}  # sku -> [on_hand, reserved, committed]
        self.buckets: dict[str, dict[str, list[int]]] = {}  # sku -> name -> [free, res, com]
        self.policies: dict[str, Policy] = {}
        self.overrides: dict[tuple[str, str], dict] = {}
        self.reservations: dict[str, dict] = {}

    def available(self, sku: str) -> int:
        on_hand, reserved, committed = self.stock[sku]
        return on_hand - reserved - committed

    def named(self, sku: str) -> dict[str, list[int]]:
        return self.buckets.setdefault(sku, {})

    def shared_free(self, sku: str) -> int:
        return self.available(sku) - sum(c[0] for c in self.named(sku).values())

    def policy(self, sku: str, channel: str) -> Policy:
        base = self.policies.get(channel, Policy())
        return dataclasses.replace(base, **self.overrides.get((sku, channel), {}))

    def order(self, channel: str) -> list[str]:
        policy = self.policies.get(channel, Policy())
        names = [name for name in (policy.pool, policy.reserve) if name]
        return names if policy.pool_only else names + [SHARED]

    def drawable(self, sku: str, channel: str) -> int:
        available = self.available(sku)
        if available <= 0:
            return 0
        units = 0
        for name in self.order(channel):
            if name == SHARED:
                units += max(0, self.shared_free(sku))
            elif name in self.named(sku):
                units += self.named(sku)[name][0]
        return min(units, available)

    def ats(self, sku: str, channel: str):
        return ats(self.policy(sku, channel), self.available(sku), self.drawable(sku, channel))

    def limit(self, sku: str, channel: str) -> int:
        limit = self.drawable(sku, channel)
        if self.policy(sku, channel).enforcement is Enforcement.STRICT:
            limit = min(limit, self.ats(sku, channel).ats)
        return limit

    def reserve(self, rid, channel, lines, partial):
        if rid in self.reservations:
            return "exists"
        if any(sku not in self.stock for sku, _ in lines):
            return Code.NOT_FOUND
        if partial:
            granted = [(s, min(q, max(0, self.limit(s, channel)))) for s, q in lines]
            if not any(q for _, q in granted):
                return "sold_out"
        else:
            if any(q > self.limit(s, channel) for s, q in lines):
                return "sold_out"
            granted = list(lines)
        draws = {}
        for sku, quantity in granted:
            if not quantity:
                continue
            parts, left = [], quantity
            for name in self.order(channel):
                if name == SHARED:
                    take = left
                else:
                    counters = self.named(sku).get(name)
                    take = min(left, counters[0]) if counters else 0
                    if take:
                        counters[0] -= take
                        counters[1] += take
                if take:
                    parts.append([name, take])
                    left -= take
            assert left == 0
            self.stock[sku][1] += quantity
            draws[sku] = parts
        self.reservations[rid] = dict(state=State.HELD, draws=draws)
        return "granted"

    def commit(self, rid, keep_by_sku):
        r = self.reservations.get(rid)
        if r is None or r["state"] is not State.HELD:
            return "refused"
        for sku, parts in r["draws"].items():
            total = sum(units for _, units in parts)
            keep = keep_by_sku.get(sku, total)
            if keep > total:
                return "refused"
        for sku, parts in r["draws"].items():
            total = sum(units for _, units in parts)
            keep = keep_by_sku.get(sku, total)
            self.stock[sku][1] -= total
            self.stock[sku][2] += keep
            kept = []
            for name, units in parts:
                stay = min(units, keep)
                keep -= stay
                if name != SHARED:
                    counters = self.named(sku)[name]
                    counters[1] -= units
                    counters[2] += stay
                    counters[0] += units - stay
                if stay:
                    kept.append([name, stay])
            r["draws"][sku] = kept
        r["state"] = State.COMMITTED
        return "ok"

    def finish(self, rid, how):
        r = self.reservations.get(rid)
        if r is None:
            return "refused"
        state = r["state"]
        if how == "fulfil" and state is not State.COMMITTED:
            return "refused"
        if how in ("release", "expire") and state not in (State.HELD, State.COMMITTED):
            return "refused"
        if how == "expire" and state is not State.HELD:
            return "refused"
        column = 1 if state is State.HELD else 2
        for sku, parts in r["draws"].items():
            units_total = sum(units for _, units in parts)
            row = self.stock[sku]
            row[column] -= units_total
            if how == "fulfil":
                row[0] -= min(units_total, row[0])
            for name, units in parts:
                if name == SHARED:
                    continue
                counters = self.named(sku)[name]
                counters[column] -= units
                if how != "fulfil":
                    counters[0] += units
        r["state"] = {"release": State.RELEASED, "expire": State.EXPIRED,
                      "fulfil": State.FULFILLED}[how]
        return "ok"

    def allocate(self, sku, source, to, units):
        if sku not in self.stock:
            return Code.NOT_FOUND
        free = self.shared_free(sku) if source == SHARED else (
            self.named(sku).get(source, [0])[0])
        if free < units:
            return Code.FAILED_PRECONDITION
        if source != SHARED:
            self.named(sku)[source][0] -= units
        if to != SHARED:
            self.named(sku).setdefault(to, [0, 0, 0])[0] += units
        return "ok"

    def rows(self, sku):
        on_hand, reserved, committed = self.stock[sku]
        named = {name: c for name, c in self.named(sku).items() if any(c)}
        shared = (
            self.shared_free(sku),
            reserved - sum(c[1] for c in named.values()),
            committed - sum(c[2] for c in named.values()),
        )
        return [(SHARED, *shared)] + [(name, *named[name]) for name in sorted(named)]


def _result(outcome) -> str:
    if isinstance(outcome, Rejection):
        return outcome.code
    return "ok"


def _machine(table_class):
    class ChannelMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.clock = ManualClock()
            self.log = RecordingLog()
            self.ledger = Ledger(
                table_class(shards=4, ring_capacity=64), self.log, self.clock, CONFIG
            )
            self.model = Model()
            self.changes = 0
            self.reservations = 0
            for channel, policy in BASES.items():
                self.ledger.set_channel(self._change_id(), channel, policy)
                self.model.policies[channel] = policy

        def _change_id(self) -> str:
            self.changes += 1
            return f"c{self.changes}"

        @rule(sku=st.sampled_from(SKUS), on_hand=st.integers(0, 25))
        def set_stock(self, sku, on_hand):
            self.ledger.set_stock(self._change_id(), sku, on_hand, None, "")
            self.model.stock.setdefault(sku, [0, 0, 0])[0] = on_hand

        @rule(channel=st.sampled_from(list(BASES)), numbers=NUMBERS)
        def set_channel(self, channel, numbers):
            policy = dataclasses.replace(BASES[channel], **numbers)
            outcome = self.ledger.set_channel(self._change_id(), channel, policy)
            assert not isinstance(outcome, Rejection), outcome
            self.model.policies[channel] = policy

        @rule(sku=st.sampled_from(SKUS), channel=st.sampled_from(list(BASES)), numbers=NUMBERS)
        def set_sku_policy(self, sku, channel, numbers):
            outcome = self.ledger.set_sku_policy(self._change_id(), sku, channel, numbers)
            if sku not in self.model.stock:
                assert outcome.code is Code.NOT_FOUND
            elif channel not in self.model.policies:
                assert outcome.code is Code.FAILED_PRECONDITION
            else:
                assert not isinstance(outcome, Rejection), outcome
                self.model.overrides[(sku, channel)] = numbers

        @rule(
            sku=st.sampled_from(SKUS), source=st.sampled_from(BUCKETS),
            to=st.sampled_from(BUCKETS), units=st.integers(1, 8),
        )
        def allocate(self, sku, source, to, units):
            if source == to:
                return  # the service refuses it (INVALID_ARGUMENT)
            outcome = self.ledger.allocate(self._change_id(), sku, source, to, units)
            expected = self.model.allocate(sku, source, to, units)
            assert _result(outcome) == expected, (outcome, expected)

        @precondition(lambda self: self.model.stock)
        @rule(data=st.data(), to=st.sampled_from(["tp", "fp", "rs"]), units=st.integers(1, 8))
        def fill(self, data, to, units):
            """Filling a pool or reserve from shared: common, so that draws from them are."""
            sku = data.draw(st.sampled_from(sorted(self.model.stock)))
            self.allocate(sku, SHARED, to, min(units, max(1, self.model.shared_free(sku))))

        @rule(
            channel=st.sampled_from(CHANNELS),
            lines=st.lists(
                st.tuples(st.sampled_from(SKUS), st.integers(1, 6)),
                min_size=1, max_size=2, unique_by=lambda line: line[0],
            ),
            partial=st.booleans(),
        )
        def reserve(self, channel, lines, partial):
            # Always a new id (idempotency is test_ledger_model's).
            self.reservations += 1
            rid = f"r{self.reservations}"
            outcome = self.ledger.reserve(
                rid, tuple(s for s, _ in lines), tuple(q for _, q in lines), channel, 100,
                partial,
            )
            expected = self.model.reserve(rid, channel, lines, partial)
            if isinstance(outcome, Rejection):
                assert outcome.code == expected, (outcome, expected)
            else:
                assert ("granted" if outcome.granted else "sold_out") == expected, (
                    outcome, expected)
                if outcome.granted:
                    draws = self.model.reservations[rid]["draws"]
                    assert dict(zip(outcome.skus, outcome.quantities)) == {
                        s: sum(u for _, u in draws.get(s, ())) for s, _ in lines}

        def _pick(self, data) -> str:
            live = [rid for rid, r in self.model.reservations.items()
                    if r["state"] in (State.HELD, State.COMMITTED)]
            return data.draw(st.sampled_from(live or sorted(self.model.reservations) or ["x"]))

        @rule(data=st.data())
        def commit(self, data):
            rid = self._pick(data)
            r = self.model.reservations.get(rid)
            keep = {}
            if r is not None and r["draws"] and data.draw(st.booleans()):
                sku = data.draw(st.sampled_from(sorted(r["draws"])))
                keep = {sku: data.draw(st.integers(0, sum(u for _, u in r["draws"][sku])))}
            outcome = self.ledger.commit(rid, keep or None)
            if not isinstance(outcome, Rejection) and outcome.replayed:
                assert r["state"] is State.COMMITTED  # idempotent: nothing changes
                return
            expected = self.model.commit(rid, keep)
            assert (not isinstance(outcome, Rejection)) == (expected == "ok"), (outcome, r)

        @rule(data=st.data(), how=st.sampled_from(["release", "fulfil"]))
        def finish(self, data, how):
            rid = self._pick(data)
            r = self.model.reservations.get(rid)
            if r is not None and how == "release" and r["state"] in (
                State.RELEASED, State.EXPIRED
            ):
                return  # an idempotent answer, nothing changes
            outcome = getattr(self.ledger, how)(rid)
            if not isinstance(outcome, Rejection) and outcome.replayed:
                assert r["state"] is State.FULFILLED  # idempotent: nothing changes
                return
            expected = self.model.finish(rid, how)
            assert (not isinstance(outcome, Rejection)) == (expected == "ok"), (outcome, r)

        @precondition(lambda self: any(
            r["state"] is State.HELD for r in self.model.reservations.values()))
        @rule()
        def expire(self):
            self.clock.advance(100_000)
            self.ledger.expire_due(1 << 30)
            for rid, r in self.model.reservations.items():
                if r["state"] is State.HELD:
                    self.model.finish(rid, "expire")

        @invariant()
        def buckets_and_ats_agree(self):
            ledger, model = self.ledger, self.model
            for sku in model.stock:
                handle = ledger.table.lookup(sku)
                assert ledger.table.counters(handle) == tuple(model.stock[sku]), sku
                rows = ledger.channels.bucket_rows(sku)
                assert rows == model.rows(sku), (sku, rows, model.rows(sku))
                # Never oversold: per named bucket, and the free units add up to available.
                assert all(free >= 0 and res >= 0 and com >= 0
                           for name, free, res, com in rows if name != SHARED), rows
                assert sum(free for _, free, _, _ in rows) == model.available(sku)
                for channel in CHANNELS:
                    assert ledger.channels.ats_of(sku, channel) == model.ats(sku, channel), (
                        sku, channel)

        def teardown(self):
            state = _state(self.ledger)
            replica = Ledger(
                table_class(shards=2, ring_capacity=64), RecordingLog(), self.clock, CONFIG
            )
            for seq, record_type, payload in self.log.records:
                replica.replay(seq, record_type, payload)
            assert _state(replica) == state
            seq, encode = self.ledger.snapshot_state()
            restored = Ledger(
                table_class(shards=8, ring_capacity=64), RecordingLog(), self.clock, CONFIG
            )
            restored.restore(encode())
            assert restored.seq == seq
            assert _state(restored) == state

    return ChannelMachine


def _state(ledger: Ledger) -> tuple:
    channels = ledger.channels
    skus = sorted(sku for sku, *_ in ledger.table.items())
    return (
        sorted(ledger.table.items()),
        {sku: channels.bucket_rows(sku) for sku in skus},
        {(sku, c): channels.ats_of(sku, c) for sku in skus for c in CHANNELS},
        channels.policies, channels.overrides, channels.held,
        {change_id: (request, seq) for change_id, (request, seq, _) in channels.changes.items()},
    )


@pytest.mark.parametrize("table_class", twins(_pytable.Table, "_ctable", "Table"))
def test_channels_agree_with_the_reference_model(table_class):
    machine = _machine(table_class)
    machine.TestCase.settings = settings(
        max_examples=300, stateful_step_count=50, deadline=None
    )
    machine.TestCase().runTest()
