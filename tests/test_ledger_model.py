"""The ledger against a plain-Python reference model (hypothesis stateful), on both table
implementations. After every step the counters agree and the invariants hold; at the end,
replaying the ledger's own log into a fresh ledger rebuilds exactly the same state."""
from __future__ import annotations

import pytest
from conftest import twins
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from reservd import _pytable, finished_rows
from reservd.clock import ManualClock
from reservd.config import Config, Limits
from reservd.ledger import Code, Ledger, Rejection, State

SKUS = ["a", "b", "c"]
ON_HAND_MAX = 30  # small, so that the bound is reached
CONFIG = Config(limits=Limits(on_hand_max=ON_HAND_MAX))
IDS = [f"r{i}" for i in range(3)]  # few, so that one id meets several rules


class RecordingLog:
    failed = None
    backlogged = False

    def __init__(self) -> None:
        self.last_seq = 0
        self.records: list[tuple[int, int, bytes]] = []

    def append(self, seq: int, type: int, payload: bytes) -> None:
        assert seq == self.last_seq + 1
        self.last_seq = seq
        self.records.append((seq, type, payload))


class Model:
    """What the rules say, written as plainly as possible."""

    def __init__(self) -> None:
        self.stock: dict[str, list[int]] = {}  # sku -> [on_hand, reserved, committed]
        self.reservations: dict[str, dict] = {}

    def available(self, sku: str) -> int:
        on_hand, reserved, committed = self.stock[sku]
        return on_hand - reserved - committed

    def reserve(self, rid, lines, partial, ttl, now):
        request = (tuple(s for s, _ in lines), tuple(q for _, q in lines), ttl, partial)
        if rid in self.reservations:
            if self.reservations[rid]["request"] != request:
                return Code.ALREADY_EXISTS
            self._due(rid, now)
            return "replayed"
        if any(sku not in self.stock for sku, _ in lines):
            return Code.NOT_FOUND
        if partial:
            granted = [(s, min(q, max(self.available(s), 0))) for s, q in lines]
            if sum(q for _, q in granted) == 0:
                return "sold_out"
        else:
            if any(self.available(s) < q for s, q in lines):
                return "sold_out"
            granted = list(lines)
        held = {s: q for s, q in granted if q}
        for sku, quantity in held.items():
            self.stock[sku][1] += quantity
        self.reservations[rid] = dict(
            request=request, held=held, committed=None, state=State.HELD,
            deadline=now + ttl * 1000,
        )
        return "granted"

    def _due(self, rid, now):
        r = self.reservations[rid]
        if r["state"] is State.HELD and r["deadline"] <= now:
            self._expire(rid)

    def _expire(self, rid):
        r = self.reservations[rid]
        for sku, quantity in r["held"].items():
            self.stock[sku][1] -= quantity
        r["state"] = State.EXPIRED

    def commit(self, rid, lines, now):
        if rid not in self.reservations:
            return Code.NOT_FOUND
        self._due(rid, now)
        r = self.reservations[rid]
        if lines is not None and any(s not in r["held"] for s in lines):
            return Code.FAILED_PRECONDITION
        wanted = {s: (lines or {}).get(s, q) for s, q in r["held"].items()}
        if r["state"] is State.COMMITTED:
            return "replayed" if wanted == r["committed"] else Code.FAILED_PRECONDITION
        if r["state"] is not State.HELD or any(wanted[s] > r["held"][s] for s in wanted):
            return Code.FAILED_PRECONDITION
        for sku, quantity in r["held"].items():
            self.stock[sku][1] -= quantity
            self.stock[sku][2] += wanted[sku]
        r["committed"], r["state"] = wanted, State.COMMITTED
        return "ok"

    def extend(self, rid, ttl, now):
        if rid not in self.reservations:
            return Code.NOT_FOUND
        self._due(rid, now)
        r = self.reservations[rid]
        if r["state"] is not State.HELD:
            return Code.FAILED_PRECONDITION
        if now + ttl * 1000 <= r["deadline"]:
            return "replayed"  # not later: changes nothing
        r["deadline"] = now + ttl * 1000
        return "ok"

    def release(self, rid):
        if rid not in self.reservations:
            return Code.NOT_FOUND
        r = self.reservations[rid]
        if r["state"] in (State.RELEASED, State.EXPIRED):
            return "replayed"
        if r["state"] is State.FULFILLED:
            return Code.FAILED_PRECONDITION
        if r["state"] is State.HELD:
            for sku, quantity in r["held"].items():
                self.stock[sku][1] -= quantity
        else:
            for sku, quantity in r["committed"].items():
                self.stock[sku][2] -= quantity
        r["state"] = State.RELEASED
        return "ok"

    def fulfil(self, rid, now):
        if rid not in self.reservations:
            return Code.NOT_FOUND
        self._due(rid, now)
        r = self.reservations[rid]
        if r["state"] is State.FULFILLED:
            return "replayed"
        if r["state"] is not State.COMMITTED:
            return Code.FAILED_PRECONDITION
        for sku, quantity in r["committed"].items():
            # Reality wins: the parcel left the shelf even after a recount below committed.
            self.stock[sku][2] -= quantity
            self.stock[sku][0] -= min(quantity, self.stock[sku][0])
        r["state"] = State.FULFILLED
        return "ok"

    def expire_due(self, now):
        for rid, r in self.reservations.items():
            if r["state"] is State.HELD and r["deadline"] <= now:
                self._expire(rid)


def _result(outcome) -> object:
    if isinstance(outcome, Rejection):
        return outcome.code
    if hasattr(outcome, "granted") and isinstance(outcome.granted, bool):
        if outcome.replayed:
            return "replayed"
        return "granted" if outcome.granted else "sold_out"
    return "replayed" if outcome.replayed else "ok"


def _machine(table_class):
    class LedgerMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.clock = ManualClock()
            self.log = RecordingLog()
            self.ledger = Ledger(
                table_class(shards=4, ring_capacity=64), self.log, self.clock, CONFIG
            )
            self.model = Model()
            self.adjustments = 0

        @rule(sku=st.sampled_from(SKUS), on_hand=st.integers(0, 20))
        def set_stock(self, sku, on_hand):
            self.adjustments += 1
            outcome = self.ledger.set_stock(f"adj{self.adjustments}", sku, on_hand, None, "")
            self.model.stock.setdefault(sku, [0, 0, 0])[0] = on_hand
            expected_shortfall = max(0, -self.model.available(sku))
            assert outcome.shortfall == expected_shortfall

        @precondition(lambda self: any(r + c for _, r, c in self.model.stock.values()))
        @rule(data=st.data())
        def recount_below_promised(self, data):
            """A shortfall, on purpose: they are rare when recounts are drawn uniformly."""
            promised = sorted(s for s, (_, r, c) in self.model.stock.items() if r + c)
            sku = data.draw(st.sampled_from(promised))
            _, reserved, committed = self.model.stock[sku]
            self.set_stock(sku, data.draw(st.integers(0, reserved + committed - 1)))

        @precondition(lambda self: self.model.stock)
        @rule(data=st.data(), delta=st.integers(-6, 6).filter(bool))
        def adjust_stock(self, data, delta):
            sku = data.draw(st.sampled_from(sorted(self.model.stock)))
            self.adjustments += 1
            outcome = self.ledger.adjust_stock(f"adj{self.adjustments}", sku, delta, None, "")
            if not 0 <= self.model.stock[sku][0] + delta <= ON_HAND_MAX:
                assert isinstance(outcome, Rejection) and outcome.code is Code.FAILED_PRECONDITION
                assert outcome.field == "delta", outcome
            else:
                self.model.stock[sku][0] += delta
                assert outcome.on_hand == self.model.stock[sku][0]

        @rule(
            rid=st.sampled_from(IDS),
            lines=st.lists(
                st.tuples(st.sampled_from(SKUS), st.integers(1, 5)),
                min_size=1, max_size=3, unique_by=lambda line: line[0],
            ),
            partial=st.booleans(),
            ttl=st.integers(1, 100),
        )
        def reserve(self, rid, lines, partial, ttl):
            outcome = self.ledger.reserve(
                rid, tuple(s for s, _ in lines), tuple(q for _, q in lines), "", ttl, partial
            )
            expected = self.model.reserve(rid, lines, partial, ttl, self.clock.now_ms())
            assert _result(outcome) == expected, (outcome, expected)
            if expected == "replayed":
                # Honest: a released or expired reservation is no longer granted.
                r = self.model.reservations[rid]
                assert outcome.state is r["state"]
                assert outcome.granted == (r["state"] not in (State.RELEASED, State.EXPIRED))
                if outcome.granted:
                    assert dict(zip(outcome.skus, outcome.quantities)) == {
                        s: r["held"].get(s, 0) for s, _ in lines
                    }, (outcome, r)
                else:
                    assert not any(outcome.quantities)

        @rule(rid=st.sampled_from(IDS), data=st.data())
        def commit(self, rid, data):
            lines = None
            held = self.model.reservations.get(rid, {}).get("held") or {}
            if held and data.draw(st.booleans()):
                sku = data.draw(st.sampled_from(sorted(held)))
                lines = {sku: data.draw(st.integers(0, held[sku] + 1))}
            outcome = self.ledger.commit(rid, lines)
            assert _result(outcome) == self.model.commit(rid, lines, self.clock.now_ms())

        @rule(rid=st.sampled_from(IDS), ttl=st.integers(1, 100))
        def extend(self, rid, ttl):
            records = len(self.log.records)
            outcome = self.ledger.extend(rid, ttl)
            expected = self.model.extend(rid, ttl, self.clock.now_ms())
            assert _result(outcome) == expected
            if expected == "replayed":
                assert len(self.log.records) == records and outcome.seq == outcome.reservation.seq

        @rule(rid=st.sampled_from(IDS))
        def release(self, rid):
            assert _result(self.ledger.release(rid)) == self.model.release(rid)

        @rule(rid=st.sampled_from(IDS))
        def fulfil(self, rid):
            outcome = self.ledger.fulfil(rid)
            assert _result(outcome) == self.model.fulfil(rid, self.clock.now_ms())

        @rule(milliseconds=st.integers(0, 60_000))
        def expire(self, milliseconds):
            self.clock.advance(milliseconds)
            self.ledger.expire_due(1 << 30)
            self.model.expire_due(self.clock.now_ms())

        @invariant()
        def counters_agree_and_hold(self):
            table = self.ledger.table
            for sku, (on_hand, reserved, committed) in self.model.stock.items():
                handle = table.lookup(sku)
                assert table.counters(handle) == (on_hand, reserved, committed), sku
                assert reserved >= 0 and committed >= 0 and 0 <= on_hand <= ON_HAND_MAX
            assert len(table) == len(self.model.stock)
            live = sum(
                r["state"] in (State.HELD, State.COMMITTED)
                for r in self.model.reservations.values()
            )
            assert self.ledger.live == live
            held = sum(r["state"] is State.HELD for r in self.model.reservations.values())
            assert self.ledger.held == held
            assert self.ledger.deadline_entries <= 2 * held + 64
            for rid, r in self.model.reservations.items():
                assert self.ledger.get(rid).state is r["state"], rid

        def teardown(self):
            replica = Ledger(
                table_class(shards=2, ring_capacity=64), RecordingLog(), self.clock, Config()
            )
            for seq, record_type, payload in self.log.records:
                replica.replay(seq, record_type, payload)
            assert sorted(replica.table.items()) == sorted(self.ledger.table.items())
            assert replica.reservations == {
                rid: r._replace(handles=replica.reservations[rid].handles)
                for rid, r in self.ledger.reservations.items()
            }
            assert _kept(replica) == _kept(self.ledger)
            assert replica.live == self.ledger.live
            # A snapshot of it restores the same state too.
            seq, encode = self.ledger.snapshot_state()
            restored = Ledger(
                table_class(shards=8, ring_capacity=64), RecordingLog(), self.clock, Config()
            )
            restored.restore(encode())
            assert restored.seq == seq
            assert sorted(restored.table.items()) == sorted(self.ledger.table.items())
            assert _kept(restored) == _kept(self.ledger)
            assert restored.live == self.ledger.live

    return LedgerMachine


def _kept(ledger: Ledger) -> list[tuple]:
    """The finished records of a ledger, oldest first, with SKU names (handles differ)."""
    return list(finished_rows.snapshot_rows(
        ledger.finished.raw(), ledger.table.sku, ledger.reservations.origin_of
    ))




@pytest.mark.parametrize("table_class", twins(_pytable.Table, "_ctable", "Table"))
def test_ledger_agrees_with_the_reference_model(table_class):
    machine = _machine(table_class)
    machine.TestCase.settings = settings(
        max_examples=300, stateful_step_count=50, deadline=None
    )
    machine.TestCase().runTest()


def _replica(log: RecordingLog) -> Ledger:
    from reservd.table import Table

    replica = Ledger(Table(), RecordingLog(), ManualClock(), CONFIG)
    for seq, record_type, payload in log.records:
        replica.replay(seq, record_type, payload)
    return replica


def test_fulfil_after_a_recount_below_committed_succeeds_and_replays():
    """The user's sequence: set d 1, reserve rd d:1, commit rd, set d 0, fulfil rd. The fulfil
    used to be logged and then refused by the table, bricking the data directory."""
    from reservd.table import Table

    log = RecordingLog()
    ledger = Ledger(Table(), log, ManualClock(), CONFIG)
    ledger.set_stock("count-1", "d", 1, None, "")
    assert ledger.reserve("rd", ("d",), (1,), "", 60, False).granted
    assert not isinstance(ledger.commit("rd", None), Rejection)
    recount = ledger.set_stock("count-2", "d", 0, None, "")
    assert (recount.on_hand, recount.committed, recount.shortfall) == (0, 1, 1)
    fulfilled = ledger.fulfil("rd")
    assert fulfilled.reservation.state is State.FULFILLED and not fulfilled.replayed
    assert ledger.table.counters(ledger.table.lookup("d")) == (0, 0, 0)
    again = ledger.fulfil("rd")
    assert again.replayed and again.seq == fulfilled.seq
    assert [seq for seq, _, _ in log.records] == [1, 2, 3, 4, 5]
    replica = _replica(log)
    assert replica.seq == 5 and sorted(replica.table.items()) == sorted(ledger.table.items())
    assert replica.get("rd").state is State.FULFILLED


def test_a_refused_apply_logs_nothing():
    """A bug caught by the table's assertion leaves the log and the sequence as they were."""
    from reservd.table import Table

    log = RecordingLog()
    ledger = Ledger(Table(), log, ManualClock(), CONFIG)
    ledger.set_stock("count-1", "d", 5, None, "")
    ledger.reserve("rd", ("d",), (2,), "", 60, False)
    handle = ledger.table.lookup("d")
    ledger.table.release([handle], [2], ledger.seq + 1)  # the table and the ledger now disagree
    with pytest.raises(AssertionError):
        ledger.commit("rd", None)
    assert ledger.seq == 2 and len(log.records) == 2
    assert ledger.reservations["rd"].state is State.HELD


def test_adjust_stock_keeps_on_hand_within_its_bound():
    from reservd.table import Table

    ledger = Ledger(Table(), RecordingLog(), ManualClock(), CONFIG)
    ledger.set_stock("count-1", "d", ON_HAND_MAX, None, "")
    refused = ledger.adjust_stock("more", "d", 1, None, "")
    assert refused.code is Code.FAILED_PRECONDITION and refused.text().startswith("delta: ")
    refused = ledger.adjust_stock("less", "d", -ON_HAND_MAX - 1, None, "")
    assert refused.code is Code.FAILED_PRECONDITION and refused.text().startswith("delta: ")
    assert ledger.seq == 1 and ledger.table.counters(ledger.table.lookup("d"))[0] == ON_HAND_MAX
    assert ledger.adjust_stock("some", "d", -ON_HAND_MAX, None, "").on_hand == 0


def _stocked_ledger(log: RecordingLog | None = None, clock: ManualClock | None = None) -> Ledger:
    from reservd.table import Table

    ledger = Ledger(Table(), log or RecordingLog(), clock or ManualClock(), CONFIG)
    ledger.set_stock("count-a", "a", 10, None, "")
    ledger.set_stock("count-b", "b", 10, None, "")
    return ledger


@pytest.mark.parametrize("end", ["release", "expire", "commit", "fulfil"])
def test_a_replayed_reserve_answers_what_the_reservation_is_now(end):
    clock = ManualClock()
    ledger = _stocked_ledger(clock=clock)
    first = ledger.reserve("r", ("a", "b"), (2, 3), "web", 60, False)
    assert first.granted and first.quantities == (2, 3)
    if end == "release":
        ledger.release("r")
    elif end == "expire":
        clock.advance(60_000)  # due, not yet swept: the retry itself finds it expired
    else:
        ledger.commit("r", None)
        if end == "fulfil":
            ledger.fulfil("r")
    retry = ledger.reserve("r", ("a", "b"), (2, 3), "web", 60, False)
    assert retry.replayed and retry.seq == ledger.get("r").seq
    assert retry.state is ledger.get("r").state
    if end in ("release", "expire"):
        assert not retry.granted and retry.quantities == (0, 0)
        assert retry.state is (State.RELEASED if end == "release" else State.EXPIRED)
    else:
        assert retry.granted and retry.quantities == (2, 3)


def test_an_unknown_sku_names_its_line():
    ledger = _stocked_ledger()
    refused = ledger.reserve("r", ("a", "nope"), (1, 1), "", 60, False)
    assert refused.code is Code.NOT_FOUND and refused.text().startswith("lines[1].sku: ")


def test_an_extend_that_changes_nothing_logs_nothing():
    log, clock = RecordingLog(), ManualClock()
    ledger = _stocked_ledger(log, clock)
    held = ledger.reserve("r", ("a",), (1,), "", 600, False)
    records = len(log.records)
    same = ledger.extend("r", 300)  # now + 300 s is earlier than the current expiry
    assert same.replayed and same.seq == held.seq and len(log.records) == records
    assert same.reservation.expires_at_ms == held.expires_at_ms
    clock.advance(400_000)
    later = ledger.extend("r", 300)
    assert not later.replayed and later.seq == ledger.seq and len(log.records) == records + 1
    assert later.reservation.expires_at_ms == clock.now_ms() + 300_000


def test_the_expiry_heap_is_bounded_by_the_held_reservations():
    """Commit, release and extend used to leave their heap entries behind: rate x TTL."""
    from reservd.table import Table

    clock = ManualClock()
    ledger = Ledger(Table(), RecordingLog(), clock, Config())
    ledger.set_stock("count-c", "c", 1_000_000, None, "")
    peak = 0
    for i in range(6_000):
        assert ledger.reserve(f"r{i}", ("c",), (1,), "", 3_600, False).granted
        if i % 3 == 0:
            ledger.commit(f"r{i}", None)
        elif i % 3 == 1:
            ledger.release(f"r{i}")
        for _ in range(i % 4):
            clock.advance(1_000)
            ledger.extend(f"r{i}" if i % 3 == 2 else f"r{i - 1}", 3_600)
        assert ledger.deadline_entries <= 2 * ledger.held + 64, (i, ledger.held)
        peak = max(peak, ledger.deadline_entries)
    assert ledger.held == 2_000 and peak <= 4_064
    for i in range(2, 6_000, 3):
        ledger.release(f"r{i}")
        assert ledger.deadline_entries <= 2 * ledger.held + 64
    assert ledger.held == 0 and ledger.deadline_entries <= 64
    clock.advance(7_200_000)
    assert ledger.expire_due(1 << 30) == 0 and ledger.deadline_entries == 0


def test_the_idempotency_window_is_a_time_and_retained_max_refuses_new_work():
    """A count cap used to forget released ids early, and a retry then reserved twice."""
    from reservd.table import Table

    clock = ManualClock()
    config = Config(retention_seconds=60, retained_max=4)
    ledger = Ledger(Table(), RecordingLog(), clock, config)
    ledger.set_stock("count-a", "a", 100, None, "")
    for i in range(3):
        assert ledger.reserve(f"r{i}", ("a",), (1,), "", 600, False).granted
        ledger.release(f"r{i}")
    assert ledger.retained == 4 and ledger.retained_adjustments == 1
    refused = ledger.reserve("r9", ("a",), (1,), "", 600, False)
    assert refused.code is Code.RESOURCE_EXHAUSTED and "retained_max" in refused.message
    refused = ledger.adjust_stock("more", "a", 1, None, "")
    assert refused.code is Code.RESOURCE_EXHAUSTED and "retained_max" in refused.message
    clock.advance(59_000)
    ledger.expire_due(1 << 30)
    retry = ledger.reserve("r0", ("a",), (1,), "", 600, False)  # still remembered: no new hold
    assert retry.replayed and not retry.granted and retry.state is State.RELEASED
    assert ledger.table.counters(ledger.table.lookup("a")) == (100, 0, 0)
    assert ledger.retained_oldest_seconds() == 59
    clock.advance(1_000)
    ledger.expire_due(1 << 30)  # 60 s old now: forgotten, and new work is taken again
    assert ledger.retained == 0 and ledger.retained_oldest_seconds() == 0
    assert ledger.reserve("r9", ("a",), (1,), "", 600, False).granted


def test_deadlines_wait_for_the_millisecond_and_drop_stale_entries():
    from reservd.expiry import Deadlines

    standing = {"a": 5_100, "b": 5_900, "c": 7_000}
    deadlines = Deadlines()
    for key, at_ms in standing.items():
        deadlines.push(at_ms, key)
    deadlines.push(5_100, "b")  # b moved from 5.100 to 5.900: a stale duplicate in second 5
    assert deadlines.next_deadline_ms(standing.get) == 5_100
    assert deadlines.due(5_500, 10, standing.get) == ["a"]  # b is due only at 5.900
    assert deadlines.due(5_900, 10, standing.get) == ["b"]
    del standing["a"], standing["b"]
    assert deadlines.due(6_999, 10, standing.get) == [] and len(deadlines) == 1
    standing["d"] = 7_500
    deadlines.push(7_500, "d")
    assert deadlines.due(8_000, 1, standing.get) in (["c"], ["d"])
    assert len(deadlines.due(8_000, 1, standing.get)) == 1 and len(deadlines) == 0
    for i in range(10):
        deadlines.push(9_000 + i, "e")
    standing["e"] = 9_009
    deadlines.compact(standing.get)
    assert len(deadlines) == 1 and deadlines.next_deadline_ms(standing.get) == 9_009


def test_a_format_2_snapshot_still_restores():
    """Data directories written before the struct codec (pickled chunks) still recover."""
    import pickle
    import struct

    from reservd import state_codec
    from reservd.records import RecordType
    from reservd.table import Table

    def chunk(kind, rows):
        data = pickle.dumps((kind, rows), protocol=5)
        return struct.pack("<I", len(data)) + data

    payload = b"".join([
        chunk("header", [2, 7]),
        chunk("stock", [("a", 10, 2, 3), ("b", 5, 0, 0)]),
        chunk("reservations", [
            ("held", "web", (("a",), (2,), "web", 60, False), ("a",), (2,), None, 1, 90_000, 5, 0),
            ("paid", "", (("a", "b"), (3, 1), "", 60, True), ("a",), (3,), (3,), 2, 80_000, 6, 0),
            ("gone", "", (("a",), (1,), "", 60, False), ("a",), (1,), None, 3, 70_000, 4, 1_000),
        ]),
        chunk("adjustments", [(
            "count-a", int(RecordType.SET_STOCK), ("a", 10, None),
            ("a", 10, 0, 0, 0, 0, 1, False), 500,
        )]),
    ])
    ledger = Ledger(Table(), RecordingLog(), ManualClock(), CONFIG)
    ledger.restore(payload)
    assert ledger.seq == 7 and (ledger.live, ledger.held, ledger.retained) == (2, 1, 2)
    assert ledger.reservations["paid"].committed == (3,)
    assert ledger.reservations["paid"].request == (("a", "b"), (3, 1), "", 60, True)
    assert ledger.adjustment("count-a")[0].on_hand == 10
    gone = ledger.get("gone")
    assert (gone.state, gone.skus, gone.quantities, gone.finished_at_ms) == (
        State.RELEASED, ("a",), (1,), 1_000
    )
    assert ledger.reserve("gone", ("a",), (1,), "", 60, False).replayed
    assert ledger.reserve("gone", ("a",), (2,), "", 60, False).code is Code.ALREADY_EXISTS
    seq, encode = ledger.snapshot_state()
    encoded = encode()
    assert encoded.startswith(state_codec.MAGIC)
    again = Ledger(Table(), RecordingLog(), ManualClock(), CONFIG)
    again.restore(encoded)
    assert dict(again.reservations.items()) == {
        rid: r._replace(handles=again.reservations[rid].handles)
        for rid, r in ledger.reservations.items()
    }
    assert _kept(again) == _kept(ledger) and len(_kept(again)) == 2


def test_a_damaged_or_newer_snapshot_is_refused_with_a_clear_error():
    import struct

    from reservd import state_codec
    from reservd.ledger_channels import unwrap
    from reservd.table import Table

    ledger = _stocked_ledger()
    ledger.reserve("r", ("a",), (1,), "", 60, False)
    _, encode = ledger.snapshot_state()
    wrapped = encode()
    # Its SKUs are at 10 units: the alerts feed's JSON section follows the ledger's bytes.
    with pytest.raises(ValueError, match="truncated or damaged"):
        Ledger(Table(), RecordingLog(), ManualClock(), CONFIG).restore(wrapped[:-3])
    payload, _ = unwrap(wrapped)
    with pytest.raises(ValueError, match="truncated"):
        Ledger(Table(), RecordingLog(), ManualClock(), CONFIG).restore(payload[:-3])
    newer = payload[:8] + struct.pack("<I", state_codec.FORMAT + 1) + payload[12:]
    with pytest.raises(ValueError, match="newer reservd"):
        Ledger(Table(), RecordingLog(), ManualClock(), CONFIG).restore(newer)


def test_a_snapshot_of_many_chunks_restores_the_same_state():
    from reservd.table import Table

    clock = ManualClock()
    ledger = Ledger(Table(), RecordingLog(), clock, Config())
    for i in range(5_000):
        ledger.set_stock(f"count-{i}", f"sku-{i}", 10, None, "")
    for i in range(10_000):
        sku = f"sku-{i % 5_000}"
        assert ledger.reserve(f"r{i}", (sku,), (1,), "web", 60 + i % 7, False).granted
        if i % 3 == 0:
            ledger.commit(f"r{i}", None)
        elif i % 3 == 1:
            ledger.release(f"r{i}")
    seq, encode = ledger.snapshot_state()
    log_after_recovery = RecordingLog()
    log_after_recovery.last_seq = seq
    restored = Ledger(Table(), log_after_recovery, clock, Config())
    restored.restore(encode())
    assert restored.seq == seq
    assert sorted(restored.table.items()) == sorted(ledger.table.items())
    assert restored.live == ledger.live
    assert restored.next_deadline_ms() == ledger.next_deadline_ms()
    for reservation_id, reservation in ledger.reservations.items():
        again = restored.reservations[reservation_id]
        assert again._replace(handles=reservation.handles) == reservation
    assert _kept(restored) == _kept(ledger)
    assert (restored.retained, restored.retained_adjustments, restored.held) == (
        ledger.retained, ledger.retained_adjustments, ledger.held
    )
    clock.advance(3_600_000)
    assert restored.expire_due(1 << 30) and ledger.expire_due(1 << 30)
    assert sorted(restored.table.items()) == sorted(ledger.table.items())
