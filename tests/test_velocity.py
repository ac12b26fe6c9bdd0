"""Velocity per (sku, channel): fixed buckets from the records' own time, the learned baseline,
the bound on tracked pairs, and the same buckets after replay and after a snapshot."""
from __future__ import annotations

import tracemalloc

from reservd.clock import ManualClock
from reservd.config import Config
from reservd.ledger import Ledger
from reservd.memlog import MemoryLog
from reservd.table import Table
from reservd.velocity import HOUR_MS, MINUTE_MS, Velocity

T0 = 1_700_000_000_000 - 1_700_000_000_000 % HOUR_MS  # an hour boundary


def test_rate_over_the_detection_window():
    velocity = Velocity(window_minutes=10, baseline_hours=24, pairs_max=10)
    for minute in range(10):
        velocity.record("hero", "amazon", 5, T0 + minute * MINUTE_MS)
    now = T0 + 9 * MINUTE_MS
    assert velocity.window_units("hero", "amazon", now) == 50
    assert velocity.rate("hero", "amazon", now) == 300_000  # 50 in 10 min = 300 units/h
    # A minute later the oldest bucket has left the window; ten minutes later all have.
    assert velocity.window_units("hero", "amazon", now + MINUTE_MS) == 45
    assert velocity.window_units("hero", "amazon", now + 10 * MINUTE_MS) == 0
    # A sale after a long silence starts from empty buckets.
    velocity.record("hero", "amazon", 2, now + 30 * MINUTE_MS)
    assert velocity.window_units("hero", "amazon", now + 30 * MINUTE_MS) == 2
    assert velocity.rate("hero", "other", now) == 0


def test_learned_baseline_is_the_median_of_complete_hours():
    velocity = Velocity(window_minutes=10, baseline_hours=24, pairs_max=10)
    assert velocity.learned("hero", "amazon", T0) is None
    for hour, units in enumerate((5, 5, 5, 50, 200)):
        for i in range(units):
            velocity.record("hero", "amazon", 1, T0 + hour * HOUR_MS + i * 1000)
    assert velocity.learned("hero", "amazon", T0 + HOUR_MS - 1) is None  # nothing complete
    assert velocity.learned("hero", "amazon", T0 + HOUR_MS) == 5_000
    assert velocity.learned("hero", "amazon", T0 + 5 * HOUR_MS) == 5_000  # spikes don't drag it
    # Hours without a sale count as 0: after a quiet day the baseline is 0 again.
    assert velocity.learned("hero", "amazon", T0 + 40 * HOUR_MS) == 0


def test_pairs_are_bounded_and_idle_ones_make_room():
    velocity = Velocity(window_minutes=10, baseline_hours=2, pairs_max=2)
    velocity.record("a", "x", 1, T0)
    velocity.record("b", "x", 1, T0)
    velocity.record("c", "x", 1, T0 + HOUR_MS)
    assert len(velocity) == 2 and velocity.untracked == 1
    velocity.record("c", "x", 1, T0 + 4 * HOUR_MS)  # a and b idle beyond the baseline window
    assert len(velocity) == 1 and velocity.window_units("c", "x", T0 + 4 * HOUR_MS) == 1


def test_bytes_per_tracked_pair():
    velocity = Velocity(window_minutes=10, baseline_hours=24, pairs_max=1 << 30)
    skus = [f"sku-{i:08d}" for i in range(20_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for sku in skus:
            velocity.record(sku, "amazon", 1, T0)
        per_pair = (tracemalloc.get_traced_memory()[0] - before) / len(skus)
    finally:
        tracemalloc.stop()
    assert per_pair < 450, per_pair  # measured 378 (array of 37 int32 + key + dict slot)


def _ledger(clock, log=None) -> Ledger:
    return Ledger(Table(shards=4, ring_capacity=1 << 12), log or MemoryLog(), clock,
                  Config(data_dir=None))


class _Recorder(MemoryLog):
    def __init__(self) -> None:
        super().__init__()
        self.records = []

    def append(self, seq, type, payload):
        super().append(seq, type, payload)
        self.records.append((seq, type, payload))


def test_replay_and_snapshot_rebuild_the_same_buckets():
    clock = ManualClock(T0)
    log = _Recorder()
    ledger = _ledger(clock, log)
    ledger.set_stock("s", "hero", 10_000, None, "")
    for i in range(300):
        clock.advance(37_000)
        ledger.reserve(f"r{i}", ("hero",), (1 + i % 3,), ("amazon", "tiktok")[i % 2], 60, False)
        ledger.expire_due(100)
    replayed = _ledger(ManualClock(0))
    for seq, kind, payload in log.records:
        replayed.replay(seq, kind, payload)
    assert replayed.velocity.pairs == ledger.velocity.pairs
    _, encode = ledger.snapshot_state()
    restored = _ledger(ManualClock(0))
    restored.restore(encode())
    assert restored.velocity.pairs == ledger.velocity.pairs
    now = clock.now_ms()
    for other in (replayed, restored):
        for channel in ("amazon", "tiktok"):
            assert other.velocity.rate("hero", channel, now) == ledger.velocity.rate(
                "hero", channel, now)
            assert other.velocity.learned("hero", channel, now) == ledger.velocity.learned(
                "hero", channel, now)
