"""The counter table: the C extension and its pure-Python twin, each against the same unit tests,
then side by side against a plain-dict reference model (hypothesis state machine)."""
from __future__ import annotations

import importlib
import os

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import reservd.table
from reservd import _pytable

try:
    from reservd import _ctable
except ImportError:  # no C compiler: the twin alone is tested (the EXTENSION test says so)
    _ctable = None

SEQ_ALL = (1 << 63) - 1
IMPLEMENTATIONS = [
    pytest.param(_ctable.Table if _ctable else None, id="c",
                 marks=pytest.mark.skipif(_ctable is None, reason="reservd._ctable not built")),
    pytest.param(_pytable.Table, id="py"),
]


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request):
    """The Table class under test."""
    return request.param


@pytest.fixture
def table(impl):
    return impl(shards=4, ring_capacity=64)


def stocked(table, sku: str, on_hand: int, seq: int = 0) -> int:
    handle = table.ensure(sku)
    table.set_on_hand(handle, on_hand, seq)
    return handle


def entries(table, position: int = 0) -> list:
    return table.changes(position, 1 << 20, SEQ_ALL)[1]


# -- which implementation ---------------------------------------------------------------------


@pytest.mark.skipif(
    os.environ.get("RESERVD_REQUIRE_EXT") != "1", reason="only asserted when RESERVD_REQUIRE_EXT=1"
)
def test_extension_loaded_when_required():
    assert reservd.table.EXTENSION is True
    assert reservd.table.Table is _ctable.Table


def test_no_ext_selects_the_twin(monkeypatch):
    monkeypatch.setenv("RESERVD_NO_EXT", "1")
    try:
        reloaded = importlib.reload(reservd.table)
        assert reloaded.Table is _pytable.Table and reloaded.EXTENSION is False
    finally:
        monkeypatch.undo()
        importlib.reload(reservd.table)


@pytest.mark.parametrize("module", [_ctable, _pytable], ids=["c", "py"])
def test_status_constants_match_the_protocol(module):
    if module is None:
        pytest.skip("reservd._ctable not built")
    assert (module.RESERVE_OK, module.RESERVE_INSUFFICIENT, module.RESERVE_UNKNOWN_SKU) == (
        reservd.table.RESERVE_OK,
        reservd.table.RESERVE_INSUFFICIENT,
        reservd.table.RESERVE_UNKNOWN_SKU,
    )


# -- construction -----------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [0, -1, 3, 6, 96, (1 << 16) * 2])
def test_shards_must_be_a_power_of_two(impl, shards):
    with pytest.raises(ValueError, match="shards"):
        impl(shards=shards)


@pytest.mark.parametrize("capacity", [0, -4, 12, (1 << 24) * 2])
def test_ring_capacity_must_be_a_power_of_two(impl, capacity):
    with pytest.raises(ValueError, match="ring_capacity"):
        impl(ring_capacity=capacity)


def test_constructor_takes_ints_only(impl):
    with pytest.raises(TypeError):
        impl(shards=4.0)


@pytest.mark.parametrize("shards", [1, 2, 64, 1 << 16])
def test_shards_attribute_and_handle_encoding(impl, shards):
    table = impl(shards=shards)
    assert table.shards == shards
    bits = shards.bit_length() - 1
    for i in range(50):
        sku = f"SKU-{i}"
        handle = table.ensure(sku)
        # handle = slot << shard_bits | shard, shard = hash(sku) & (shards - 1)
        assert handle & (shards - 1) == hash(sku) & (shards - 1)
        assert handle >> bits == sum(
            1 for j in range(i) if hash(f"SKU-{j}") & (shards - 1) == handle & (shards - 1)
        )


# -- lookups ----------------------------------------------------------------------------------


def test_ensure_lookup_sku_len(table):
    assert len(table) == 0
    assert table.lookup("A") == -1
    a = table.ensure("A")
    b = table.ensure("B")
    assert a != b and a >= 0 and b >= 0
    assert table.ensure("A") == a  # idempotent, no new row
    assert table.lookup("A") == a and table.lookup("B") == b
    assert table.sku(a) == "A" and table.sku(b) == "B"
    assert table.counters(a) == (0, 0, 0)
    assert len(table) == 2


def test_many_skus_survive_array_growth(impl):
    table = impl(shards=1)  # one shard: its arrays are regrown many times
    handles = {}
    for i in range(5000):
        handles[f"S{i}"] = stocked(table, f"S{i}", i)
    assert len(table) == 5000
    for sku, handle in handles.items():
        assert table.lookup(sku) == handle
        assert table.counters(handle) == (int(sku[1:]), 0, 0)
        assert table.sku(handle) == sku


@pytest.mark.parametrize("sku", [b"A", 1, None, type("Sub", (str,), {})("A")])
def test_sku_must_be_exactly_str(table, sku):
    table.ensure("A")
    for call in (table.lookup, table.ensure):
        with pytest.raises(TypeError):
            call(sku)
    with pytest.raises(TypeError):
        table.stock([sku])
    with pytest.raises(TypeError):
        table.reserve([sku], [1], False, 1)


def test_bad_handles_raise(table):
    a = table.ensure("A")
    # -1 is lookup's "unknown"; the others name no row (slot too high, or past int64).
    for handle in (-1, a + (1 << 10) * 4, 1 << 70, -(1 << 70)):
        for call in (table.sku, table.counters):
            with pytest.raises(IndexError):
                call(handle)
        with pytest.raises(IndexError):
            table.release([handle], [0], 1)
        with pytest.raises(IndexError):
            table.set_on_hand(handle, 1, 1)
    with pytest.raises(TypeError):
        table.counters(float(a))
    assert table.counters(a) == (0, 0, 0)
    assert table.ring_head == 0


def test_stock(table):
    stocked(table, "A", 10)
    b = stocked(table, "B", 4)
    table.reserve(["B"], [3], False, 1)
    assert table.stock(["A", "X", "B"]) == [(10, 0, 0), None, (4, 3, 0)]
    assert table.stock(("B",)) == [table.counters(b)]
    assert table.stock([]) == []
    with pytest.raises(TypeError):
        table.stock("A")  # a str is not a list of SKUs


def test_items_every_sku_in_a_stable_order(table):
    for i in range(20):
        table.restore(f"S{i}", i, i // 2, i // 4)
    first = list(table.items())
    assert first == list(table.items())
    assert sorted(first) == sorted((f"S{i}", i, i // 2, i // 4) for i in range(20))


def test_touch_appends_the_counters_as_they_are(table):
    a = stocked(table, "A", 10, 1)
    stocked(table, "B", 4, 2)
    table.reserve(["A"], [3], False, 3)
    head = table.ring_head
    table.touch(a, 4)
    assert entries(table, head) == [(4, "A", 10, 3, 0, 0)]
    assert table.counters(a) == (10, 3, 0)
    table.touch_all(5)
    assert sorted(entries(table, head + 1)) == [(5, "A", 10, 3, 0, 0), (5, "B", 4, 0, 0, 0)]
    with pytest.raises(AssertionError):
        table.touch(a, 4)  # an older sequence
    with pytest.raises(IndexError):
        table.touch(99, 6)
    assert table.ring_head == head + 3


# -- reserve ----------------------------------------------------------------------------------


def test_reserve_all_or_nothing_ok(table):
    a = stocked(table, "A", 10)
    b = stocked(table, "B", 5)
    head = table.ring_head
    result = table.reserve(["A", "B"], [4, 5], False, 7)
    assert result == (reservd.table.RESERVE_OK, (a, b), (4, 5), (6, 0))
    assert table.counters(a) == (10, 4, 0) and table.counters(b) == (5, 5, 0)
    assert entries(table, head) == [(7, "A", 10, 4, 0, 0), (7, "B", 5, 5, 0, 0)]


def test_reserve_insufficient_applies_nothing(table):
    a = stocked(table, "A", 10)
    b = stocked(table, "B", 5)
    head = table.ring_head
    result = table.reserve(["A", "B"], [4, 6], False, 7)
    assert result == (reservd.table.RESERVE_INSUFFICIENT, (a, b), (0, 0), (10, 5))
    assert table.counters(a) == (10, 0, 0) and table.counters(b) == (5, 0, 0)
    assert table.ring_head == head


def test_reserve_unknown_sku_applies_nothing(table):
    a = stocked(table, "A", 10)
    head = table.ring_head
    # Unknown wins over insufficient: the caller reports NOT_FOUND.
    result = table.reserve(["A", "X", "Y"], [100, 1, 1], True, 7)
    assert result == (reservd.table.RESERVE_UNKNOWN_SKU, (a, -1, -1), (0, 0, 0), (10, 0, 0))
    assert table.counters(a) == (10, 0, 0)
    assert table.ring_head == head
    assert len(table) == 1  # reserve never creates SKUs


def test_reserve_partial_clamps_each_line(table):
    a = stocked(table, "A", 10)
    b = stocked(table, "B", 3)
    c = stocked(table, "C", 0)
    head = table.ring_head
    result = table.reserve(["A", "B", "C"], [4, 5, 2], True, 9)
    assert result == (reservd.table.RESERVE_OK, (a, b, c), (4, 3, 0), (6, 0, 0))
    # The line granted 0 appends no entry.
    assert entries(table, head) == [(9, "A", 10, 4, 0, 0), (9, "B", 3, 3, 0, 0)]


def test_reserve_partial_nothing_granted_is_insufficient(table):
    a = stocked(table, "A", 2)
    b = stocked(table, "B", 0)
    table.reserve(["A"], [2], False, 1)
    head = table.ring_head
    result = table.reserve(["A", "B"], [1, 1], True, 2)
    assert result == (reservd.table.RESERVE_INSUFFICIENT, (a, b), (0, 0), (0, 0))
    assert table.ring_head == head and table.counters(a) == (2, 2, 0)


def test_reserve_reports_a_shortfall_raw(table):
    a = stocked(table, "A", 10)
    table.reserve(["A"], [8], False, 1)
    table.set_on_hand(a, 5, 2)  # recount: 3 short
    assert table.counters(a) == (5, 8, 0)
    assert table.reserve(["A"], [1], False, 3) == (1, (a,), (0,), (-3,))
    assert table.reserve(["A"], [1], True, 3) == (1, (a,), (0,), (-3,))
    b = stocked(table, "B", 1, seq=3)
    # Partial: the short SKU is granted nothing (not a negative amount), the other line goes on.
    assert table.reserve(["A", "B"], [1, 1], True, 4) == (0, (a, b), (0, 1), (-3, 0))
    assert table.counters(a) == (5, 8, 0)
    table.release([a], [4], 5)
    assert table.reserve(["A"], [2], True, 6) == (0, (a,), (1,), (0,))


def test_reserve_repeated_sku_sees_earlier_lines(table):
    a = stocked(table, "A", 5)
    head = table.ring_head
    assert table.reserve(["A", "A"], [3, 3], False, 1) == (1, (a, a), (0, 0), (5, 5))
    assert table.counters(a) == (5, 0, 0) and table.ring_head == head
    assert table.reserve(["A", "A"], [4, 4], True, 2) == (0, (a, a), (4, 1), (0, 0))
    assert table.counters(a) == (5, 5, 0)
    # One entry per line that changed the SKU, each with the counters right after that line.
    assert entries(table, head) == [(2, "A", 5, 4, 0, 0), (2, "A", 5, 5, 0, 0)]


def test_reserve_arguments(table):
    stocked(table, "A", 5)
    with pytest.raises(ValueError):
        table.reserve(["A"], [1, 1], False, 1)
    with pytest.raises(ValueError):
        table.reserve([], [], False, 1)
    with pytest.raises(TypeError):
        table.reserve("A", [1], False, 1)
    with pytest.raises(TypeError):
        table.reserve(["A"], [1.0], False, 1)
    with pytest.raises(OverflowError):
        table.reserve(["A"], [1 << 63], False, 1)
    for quantity in (0, -1):
        with pytest.raises(AssertionError, match=r"quantities\[1\]"):
            table.reserve(["A", "A"], [1, quantity], True, 1)
    assert table.counters(table.lookup("A")) == (5, 0, 0) and table.ring_head == 1


def test_reserve_accepts_any_sequence(table):
    a = stocked(table, "A", 5)
    assert table.reserve(("A",), (1,), False, 1)[0] == 0
    assert table.reserve((s for s in ["A"]), range(1, 2), False, 2)[0] == 0
    assert table.counters(a) == (5, 2, 0)


# -- release, commit, uncommit, fulfil ---------------------------------------------------------


def test_release(table):
    a = stocked(table, "A", 10)
    b = stocked(table, "B", 10)
    table.reserve(["A", "B"], [4, 2], False, 1)
    head = table.ring_head
    table.release([a, b], [3, 0], 2)
    assert table.counters(a) == (10, 1, 0) and table.counters(b) == (10, 2, 0)
    assert entries(table, head) == [(2, "A", 10, 1, 0, 0)]  # a zero line changes nothing


def test_release_more_than_reserved_asserts_and_changes_nothing(table):
    a = stocked(table, "A", 10)
    b = stocked(table, "B", 10)
    table.reserve(["A", "B"], [4, 2], False, 1)
    head = table.ring_head
    with pytest.raises(AssertionError, match=r"'B'.*reserved=2"):
        table.release([a, b], [4, 3], 2)
    with pytest.raises(AssertionError, match="'A'"):
        table.release([a, a], [3, 3], 2)  # each fits alone, not together
    with pytest.raises(AssertionError, match=r"quantities\[0\] is negative"):
        table.release([a], [-1], 2)
    assert table.counters(a) == (10, 4, 0) and table.counters(b) == (10, 2, 0)
    assert table.ring_head == head


def test_commit(table):
    a = stocked(table, "A", 10)
    b = stocked(table, "B", 10)
    table.reserve(["A", "B"], [4, 2], False, 1)
    head = table.ring_head
    table.commit([a, b], [4, 2], [3, 0], 2)  # A partly committed, B voided
    assert table.counters(a) == (10, 0, 3) and table.counters(b) == (10, 0, 0)
    assert entries(table, head) == [(2, "A", 10, 0, 3, 0), (2, "B", 10, 0, 0, 0)]


def test_commit_arguments(table):
    a = stocked(table, "A", 10)
    table.reserve(["A"], [4], False, 1)
    with pytest.raises(AssertionError, match="committed"):
        table.commit([a], [4], [5], 2)  # more committed than held
    with pytest.raises(AssertionError, match="committed"):
        table.commit([a], [4], [-1], 2)
    with pytest.raises(AssertionError, match="'A'"):
        table.commit([a], [5], [5], 2)  # more held than reserved
    with pytest.raises(ValueError):
        table.commit([a], [4], [1, 1], 2)
    with pytest.raises(ValueError):
        table.commit([a], [4, 1], [1], 2)
    assert table.counters(a) == (10, 4, 0) and table.ring_head == 2


def test_uncommit(table):
    a = stocked(table, "A", 10)
    table.reserve(["A"], [4], False, 1)
    table.commit([a], [4], [4], 2)
    with pytest.raises(AssertionError, match=r"'A'.*committed=4"):
        table.uncommit([a], [5], 3)
    table.uncommit([a], [3], 3)
    assert table.counters(a) == (10, 0, 1)
    assert entries(table, table.ring_head - 1) == [(3, "A", 10, 0, 1, 0)]


def test_fulfil(table):
    a = stocked(table, "A", 10)
    table.reserve(["A"], [4], False, 1)
    table.commit([a], [4], [4], 2)
    with pytest.raises(AssertionError, match="'A'"):
        table.fulfil([a], [5], 3)  # more than committed
    table.fulfil([a], [3], 3)
    assert table.counters(a) == (7, 0, 1)
    assert entries(table, table.ring_head - 1) == [(3, "A", 7, 0, 1, 0)]
    table.set_on_hand(a, 0, 4)  # everything lost in a recount: a shortfall of 1
    table.fulfil([a], [1], 5)  # the parcel left anyway: committed drops, on_hand stays at 0
    assert table.counters(a) == (0, 0, 0)
    assert entries(table, table.ring_head - 1) == [(5, "A", 0, 0, 0, 0)]


def test_fulfil_under_a_shortfall_takes_on_hand_down_to_zero_only(table):
    a = stocked(table, "A", 10)
    table.reserve(["A"], [6], False, 1)
    table.commit([a], [6], [6], 2)
    table.set_on_hand(a, 4, 3)  # 2 short
    table.fulfil([a], [6], 4)
    assert table.counters(a) == (0, 0, 0)
    with pytest.raises(AssertionError, match="committed=0"):
        table.fulfil([a], [1], 5)  # nothing committed is left
    assert table.counters(a) == (0, 0, 0)


def test_bulk_length_mismatch_and_empty(table):
    a = stocked(table, "A", 10)
    for call in (table.release, table.uncommit, table.fulfil):
        with pytest.raises(ValueError):
            call([a], [], 1)
        with pytest.raises(TypeError):
            call(a, [1], 1)  # not a sequence
        head = table.ring_head
        call([], [], 1)  # an empty call is a no-op
        assert table.ring_head == head


# -- on_hand and restore ----------------------------------------------------------------------


def test_set_on_hand(table):
    a = table.ensure("A")
    assert table.set_on_hand(a, 10, 1) == 0
    assert table.set_on_hand(a, 7, 2) == 10
    head = table.ring_head
    assert table.set_on_hand(a, 7, 3) == 7  # unchanged: no entry
    assert table.ring_head == head
    with pytest.raises(ValueError):
        table.set_on_hand(a, -1, 4)
    assert table.counters(a) == (7, 0, 0)
    assert entries(table) == [(1, "A", 10, 0, 0, 0), (2, "A", 7, 0, 0, 0)]


def test_adjust_on_hand(table):
    a = stocked(table, "A", 5, seq=1)
    assert table.adjust_on_hand(a, 3, 2) == 8
    assert table.adjust_on_hand(a, -8, 3) == 0
    head = table.ring_head
    with pytest.raises(ValueError, match="'A'"):
        table.adjust_on_hand(a, -1, 4)
    assert table.counters(a) == (0, 0, 0) and table.ring_head == head
    assert table.adjust_on_hand(a, 0, 4) == 0 and table.ring_head == head
    table.adjust_on_hand(a, (1 << 63) - 1, 5)
    with pytest.raises(OverflowError):
        table.adjust_on_hand(a, 1, 6)
    assert table.counters(a) == ((1 << 63) - 1, 0, 0)


def test_adjust_can_leave_a_shortfall(table):
    a = stocked(table, "A", 5)
    table.reserve(["A"], [5], False, 1)
    assert table.adjust_on_hand(a, -2, 2) == 3
    assert table.stock(["A"]) == [(3, 5, 0)]


def test_restore(table):
    head = table.ring_head
    a = table.restore("A", 10, 3, 2)
    assert table.lookup("A") == a and table.counters(a) == (10, 3, 2)
    assert table.restore("A", 1, 0, 0) == a and table.counters(a) == (1, 0, 0)
    assert table.ring_head == head  # snapshot load appends no change
    with pytest.raises(ValueError):
        table.restore("B", 1, -1, 0)
    with pytest.raises(ValueError):
        table.restore("B", 0, 1 << 62, 1 << 62)  # reserved + committed beyond int64
    assert table.lookup("B") == -1


def test_unsellable_is_on_hand_but_never_available(table):
    a = stocked(table, "A", 5, seq=1)
    assert table.unsellable(a) == 0
    # A return of 3 arrives into quarantine: on hand, not available.
    assert table.move_unsellable(a, 3, 3, 2) == (8, 3)
    assert table.counters(a) == (8, 0, 0) and table.unsellable(a) == 3
    status, _, granted, available = table.reserve(["A"], [6], False, 3)
    assert status == reservd.table.RESERVE_INSUFFICIENT and available == (5,)
    status, _, granted, available = table.reserve(["A"], [6], True, 3)
    assert granted == (5,) and available == (0,)
    # Inspection passes 2: they become available; the damaged one stays unsellable.
    assert table.move_unsellable(a, 0, -2, 4) == (8, 1)
    assert table.reserve(["A"], [2], False, 5)[3] == (0,)
    # Write-off of the damaged unit leaves on_hand and unsellable together.
    assert table.move_unsellable(a, -1, -1, 6) == (7, 0)
    assert table.reserve(["A"], [1], False, 7)[3] == (0,)
    assert [e[2:] for e in entries(table)] == [
        (5, 0, 0, 0), (8, 0, 0, 3), (8, 5, 0, 3), (8, 5, 0, 1), (8, 7, 0, 1), (7, 7, 0, 0)]


def test_move_unsellable_refuses_and_changes_nothing(table):
    a = stocked(table, "A", 5, seq=1)
    table.move_unsellable(a, 0, 2, 2)
    head = table.ring_head
    for on_hand_delta, unsellable_delta in [(0, -3), (-6, 0), (-6, -2), (-1, -3)]:
        with pytest.raises(ValueError, match="'A'"):
            table.move_unsellable(a, on_hand_delta, unsellable_delta, 3)
    assert table.counters(a) == (5, 0, 0) and table.unsellable(a) == 2
    assert table.move_unsellable(a, 0, 0, 3) == (5, 2) and table.ring_head == head
    with pytest.raises(OverflowError):
        table.move_unsellable(a, (1 << 63) - 1, 0, 3)
    with pytest.raises(TypeError):
        table.move_unsellable(a, 1.0, 0, 3)
    with pytest.raises(AssertionError, match="seq 0"):
        table.move_unsellable(a, 1, 1, 0)
    assert table.counters(a) == (5, 0, 0) and table.unsellable(a) == 2


def test_restore_unsellable(table):
    a = table.restore("A", 10, 3, 2, 4)
    assert table.unsellable(a) == 4 and table.reserve(["A"], [2], False, 1)[3] == (1,)
    with pytest.raises(ValueError):
        table.restore("B", 1, 0, 0, -1)
    assert table.unsellable(table.restore("A", 1, 0, 0)) == 0


# -- sequence order and invariants -------------------------------------------------------------


def test_seq_going_backwards_asserts_and_changes_nothing(table):
    a = stocked(table, "A", 10, seq=5)
    with pytest.raises(AssertionError, match="seq 4"):
        table.reserve(["A"], [1], False, 4)
    with pytest.raises(AssertionError):
        table.adjust_on_hand(a, 1, 4)
    assert table.counters(a) == (10, 0, 0)
    table.adjust_on_hand(a, 1, 5)  # equal seq: several mutations may share one
    assert table.counters(a) == (11, 0, 0)


# -- the change ring --------------------------------------------------------------------------


def test_changes_limit_and_seq_max(table):
    a = table.ensure("A")
    for seq in range(1, 11):
        table.set_on_hand(a, seq, seq)
    assert table.ring_head == 10 and table.ring_tail == 0
    position, got = table.changes(0, 3, SEQ_ALL)
    assert position == 3 and [e[0] for e in got] == [1, 2, 3]
    position, got = table.changes(position, 100, 6)  # stops at the first entry newer than 6
    assert position == 6 and [e[0] for e in got] == [4, 5, 6]
    assert table.changes(6, 0, SEQ_ALL) == (6, [])
    assert table.changes(10, 5, SEQ_ALL) == (10, [])
    with pytest.raises(ValueError):
        table.changes(11, 5, SEQ_ALL)
    with pytest.raises(ValueError):
        table.changes(0, -1, SEQ_ALL)


def test_ring_wraps(impl):
    table = impl(shards=2, ring_capacity=8)
    a = table.ensure("A")
    b = table.ensure("B")
    assert table.position_after(0) == 0  # empty ring: head
    for seq in range(1, 11):  # 20 entries, two per seq: 1, 1, 2, 2, ..., 10, 10
        table.set_on_hand(a, seq, seq)
        table.set_on_hand(b, 100 + seq, seq)
    assert table.ring_head == 20 and table.ring_tail == 12
    # Positions older than the tail are clamped up to it: the reader sees what was lost.
    position, got = table.changes(0, 100, SEQ_ALL)
    assert position == 20
    assert got == [
        (seq, sku, on_hand, 0, 0, 0)
        for seq in range(7, 11)
        for sku, on_hand in (("A", seq), ("B", 100 + seq))
    ]
    assert table.changes(15, 2, SEQ_ALL) == (17, [(8, "B", 108, 0, 0, 0), (9, "A", 9, 0, 0, 0)])
    assert table.position_after(0) == 12  # older than everything retained: the tail
    assert table.position_after(6) == 12
    assert table.position_after(7) == 14
    assert table.position_after(9) == 18
    assert table.position_after(10) == 20  # nothing newer: the head
    assert table.position_after(SEQ_ALL) == 20
    position, got = table.changes(table.position_after(8), 100, 9)
    assert position == 18 and [e[0] for e in got] == [9, 9]


def test_every_mutation_appends_its_changes(table):
    a = stocked(table, "A", 10, seq=1)
    b = stocked(table, "B", 10, seq=1)
    table.reserve(["A", "B"], [2, 3], False, 2)
    table.commit([a, b], [2, 3], [2, 1], 3)
    table.uncommit([b], [1], 4)
    table.fulfil([a], [2], 5)
    table.release([], [], 6)
    table.adjust_on_hand(b, -4, 7)
    assert entries(table) == [
        (1, "A", 10, 0, 0, 0),
        (1, "B", 10, 0, 0, 0),
        (2, "A", 10, 2, 0, 0),
        (2, "B", 10, 3, 0, 0),
        (3, "A", 10, 0, 2, 0),
        (3, "B", 10, 0, 1, 0),
        (4, "B", 10, 0, 0, 0),
        (5, "A", 8, 0, 0, 0),
        (7, "B", 6, 0, 0, 0),
    ]


# -- model-based: C table, twin and a plain-dict model, side by side --------------------------

SKUS = [f"sku-{i}" for i in range(6)]
LINES = st.lists(st.tuples(st.sampled_from(SKUS), st.integers(0, 12)), max_size=4)


class Model:
    """The reference: counters in a dict, every rule spelled out the plainest way."""

    def __init__(self):
        self.counters: dict[str, list[int]] = {}
        self.entries: list[tuple] = []
        # The lowest available a SKU may show: min(0, what the last recount left).
        self.floor: dict[str, int] = {}
        self.unsellable: dict[str, int] = {}

    def available(self, sku):
        on_hand, reserved, committed = self.counters[sku]
        return on_hand - reserved - committed - self.unsellable[sku]

    def reserve(self, lines, partial, seq):
        if any(sku not in self.counters for sku, _ in lines):
            return reservd.table.RESERVE_UNKNOWN_SKU, [0] * len(lines)
        free = {sku: self.available(sku) for sku, _ in lines}
        granted = []
        for sku, quantity in lines:
            if partial:
                grant = min(quantity, max(free[sku], 0))
            elif quantity <= free[sku]:
                grant = quantity
            else:
                return reservd.table.RESERVE_INSUFFICIENT, [0] * len(lines)
            free[sku] -= grant
            granted.append(grant)
        if not any(granted):
            return reservd.table.RESERVE_INSUFFICIENT, [0] * len(lines)
        for (sku, _), grant in zip(lines, granted):
            if grant:
                self.counters[sku][1] += grant
                self.entries.append((seq, sku, *self.counters[sku], self.unsellable[sku]))
        return reservd.table.RESERVE_OK, granted

    @staticmethod
    def take(row, op, amount, moved):
        if op == "release":
            row[1] -= amount
        elif op == "commit":
            row[1] -= amount
            row[2] += moved
        elif op == "uncommit":
            row[2] -= amount
        else:  # fulfil: the parcel left the shelf; on_hand stops at zero under a shortfall
            row[2] -= amount
            row[0] -= min(amount, row[0])

    def bulk(self, op, lines, seq):
        """Apply release/commit/uncommit/fulfil lines (sku, amount, moved); False if any line
        would take a counter below zero (then nothing is applied)."""
        trial = {sku: list(self.counters[sku]) for sku, _, _ in lines}
        for sku, amount, moved in lines:
            self.take(trial[sku], op, amount, moved)
            if min(trial[sku]) < 0:
                return False
        for sku, amount, moved in lines:
            if amount:
                self.take(self.counters[sku], op, amount, moved)
                self.entries.append((seq, sku, *self.counters[sku], self.unsellable[sku]))
        return True

    def recount(self, sku, on_hand, seq):
        row = self.counters[sku]
        if on_hand != row[0]:
            row[0] = on_hand
            self.entries.append((seq, sku, *row, self.unsellable[sku]))
        self.floor[sku] = min(0, self.available(sku))


def outcome(call):
    """(result, None) or (None, exception type): what a table did with one call."""
    try:
        return call(), None
    except (AssertionError, ValueError) as error:
        return None, type(error)


class TableMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.tables = [_ctable.Table(shards=4, ring_capacity=16), _pytable.Table(4, 16)]
        self.model = Model()
        self.seq = 0
        self.position = 0  # ring position read up to (the same in both tables)
        self.entries_read = 0  # model entries compared so far

    def next_seq(self, same: bool) -> int:
        if not same:
            self.seq += 1
        return self.seq

    def both(self, method, *args):
        """Call ``method`` on both tables; they must agree; return the shared outcome."""
        results = [outcome(lambda t=t: getattr(t, method)(*args)) for t in self.tables]
        assert results[0] == results[1], (method, args, results)
        return results[0]

    def handle(self, sku):
        handles = [t.lookup(sku) for t in self.tables]
        assert handles[0] == handles[1]
        return handles[0]

    def known(self, lines):
        return [line for line in lines if line[0] in self.model.counters]

    @initialize(skus=st.lists(st.sampled_from(SKUS), min_size=1, max_size=3, unique=True))
    def stock_some(self, skus):
        for sku in skus:
            self.ensure(sku)
            self.set_on_hand(sku, 10)

    @rule(sku=st.sampled_from(SKUS))
    def ensure(self, sku):
        result, error = self.both("ensure", sku)
        assert error is None and self.tables[0].sku(result) == sku
        if sku not in self.model.counters:
            self.model.counters[sku] = [0, 0, 0]
            self.model.floor[sku] = 0
            self.model.unsellable[sku] = 0

    @rule(lines=LINES, partial=st.booleans(), same_seq=st.booleans())
    def reserve(self, lines, partial, same_seq):
        lines = [(sku, max(quantity, 1)) for sku, quantity in lines] or [(SKUS[0], 1)]
        seq = self.next_seq(same_seq)
        result, error = self.both(
            "reserve", [s for s, _ in lines], [q for _, q in lines], partial, seq
        )
        assert error is None
        status, handles, granted, available = result
        expected_status, expected_granted = self.model.reserve(lines, partial, seq)
        assert (status, list(granted)) == (expected_status, expected_granted)
        event(f"reserve {'partial' if partial else 'all-or-nothing'}: status {status}")
        for (sku, _), handle, free in zip(lines, handles, available):
            if sku in self.model.counters:
                assert handle == self.handle(sku) and free == self.model.available(sku)
            else:
                assert handle == -1 and free == 0

    @rule(op=st.sampled_from(["release", "uncommit", "fulfil"]), lines=LINES)
    def take(self, op, lines):
        lines = self.known(lines)
        seq = self.next_seq(False)
        _, error = self.both(
            op, [self.handle(sku) for sku, _ in lines], [q for _, q in lines], seq
        )
        applied = self.model.bulk(op, [(sku, q, 0) for sku, q in lines], seq)
        assert (error is None) == applied, (op, lines, error)
        assert error in (None, AssertionError)
        event(f"{op}: {'applied' if applied else 'refused'}")

    @rule(lines=LINES, data=st.data())
    def commit(self, lines, data):
        lines = [
            (sku, held, data.draw(st.integers(0, held), label="committed"))
            for sku, held in self.known(lines)
        ]
        seq = self.next_seq(False)
        _, error = self.both(
            "commit", [self.handle(sku) for sku, _, _ in lines], [h for _, h, _ in lines],
            [c for _, _, c in lines], seq,
        )
        applied = self.model.bulk("commit", lines, seq)
        assert (error is None) == applied and error in (None, AssertionError)
        event(f"commit: {'applied' if applied else 'refused'}")

    @rule(sku=st.sampled_from(SKUS), on_hand=st.integers(-1, 25))
    def set_on_hand(self, sku, on_hand):
        if sku not in self.model.counters:
            return
        seq = self.next_seq(False)
        result, error = self.both("set_on_hand", self.handle(sku), on_hand, seq)
        if on_hand < 0:
            assert error is ValueError
            return
        assert error is None and result == self.model.counters[sku][0]
        self.model.recount(sku, on_hand, seq)

    @rule(sku=st.sampled_from(SKUS), delta=st.integers(-15, 15))
    def adjust_on_hand(self, sku, delta):
        if sku not in self.model.counters:
            return
        seq = self.next_seq(False)
        result, error = self.both("adjust_on_hand", self.handle(sku), delta, seq)
        on_hand = self.model.counters[sku][0] + delta
        if on_hand < 0:
            assert error is ValueError
            return
        assert error is None and result == on_hand
        self.model.recount(sku, on_hand, seq)

    @rule(sku=st.sampled_from(SKUS), units=st.integers(0, 8),
          shape=st.sampled_from(["return", "hold", "pass", "write_off"]))
    def move_unsellable(self, sku, units, shape):
        """The stock-state moves: a return into quarantine (+u, +u), a hold of sellable units
        (0, +u, only from available, as reservd.stockstates checks), an inspection passing
        units (0, -u), a write-off of damaged units (-u, -u)."""
        if sku not in self.model.counters:
            return
        if shape == "hold":
            units = min(units, max(self.model.available(sku), 0))
        deltas = {"return": (units, units), "hold": (0, units), "pass": (0, -units),
                  "write_off": (-units, -units)}[shape]
        seq = self.next_seq(False)
        result, error = self.both("move_unsellable", self.handle(sku), *deltas, seq)
        row = self.model.counters[sku]
        on_hand, unsellable = row[0] + deltas[0], self.model.unsellable[sku] + deltas[1]
        if on_hand < 0 or unsellable < 0:
            assert error is ValueError
            return
        assert error is None and result == (on_hand, unsellable)
        event(f"move_unsellable {shape}")
        if deltas != (0, 0):
            row[0] = on_hand
            self.model.unsellable[sku] = unsellable
            self.model.entries.append((seq, sku, *row, self.model.unsellable[sku]))

    @rule(seq=st.integers(-1, 60))
    def position_after(self, seq):
        positions = [t.position_after(seq) for t in self.tables]
        assert positions[0] == positions[1]
        head = len(self.model.entries)
        tail = max(0, head - 16)
        newer = [i for i in range(tail, head) if self.model.entries[i][0] > seq]
        assert positions[0] == (newer[0] if newer else head)

    @invariant()
    def tables_match_the_model(self):
        expected = sorted((sku, *row) for sku, row in self.model.counters.items())
        for table in self.tables:
            assert sorted(table.items()) == expected
            assert len(table) == len(expected)
            assert table.ring_head == len(self.model.entries)
            for sku, unsellable in self.model.unsellable.items():
                assert table.unsellable(table.lookup(sku)) == unsellable
        for sku, (on_hand, reserved, committed) in self.model.counters.items():
            assert on_hand >= 0 and reserved >= 0 and committed >= 0
            assert self.model.available(sku) >= self.model.floor[sku], sku

    @invariant()
    def the_rings_hold_the_model_entries(self):
        reads = [t.changes(self.position, 1000, SEQ_ALL) for t in self.tables]
        assert reads[0] == reads[1]
        position, got = reads[0]
        assert got == self.model.entries[self.entries_read:]
        self.position = position
        self.entries_read = len(self.model.entries)


TableMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_table_machine = pytest.mark.skipif(_ctable is None, reason="reservd._ctable not built")(
    TableMachine.TestCase
)
