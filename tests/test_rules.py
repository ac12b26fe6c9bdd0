"""The rules' state in the ledger: snapshots carry velocity, rule policies, the rules in force
and promotions (format 5), and restore the same ats; bad commands are refused before logging."""
from __future__ import annotations

from reservd import state_codec
from reservd.channelpolicy import Policy
from reservd.clock import ManualClock
from reservd.config import Config
from reservd.ledger import Code, Ledger, Rejection
from reservd.memlog import MemoryLog
from reservd.table import Table
from reservd.velocity import HOUR_MS, MINUTE_MS

T0 = 1_700_000_000_000 - 1_700_000_000_000 % HOUR_MS


def _ledger(clock) -> Ledger:
    return Ledger(Table(shards=4, ring_capacity=1 << 12), MemoryLog(), clock,
                  Config(data_dir=None))


def _busy_ledger(clock) -> Ledger:
    ledger = _ledger(clock)
    ledger.set_stock("s1", "hero", 500, None, "")
    ledger.set_channel("c1", "amazon", Policy(share_bp=9000))
    ledger.set_channel("c2", "tiktok", Policy(pool="tiktok"))
    ledger.allocate("a1", "hero", "shared", "tiktok", 100)
    ledger.allocate("a2", "hero", "shared", "spike", 50)
    for channel in ("amazon", "tiktok"):
        ledger.set_rule_policy(f"r-{channel}", "", channel, {"enabled": 1})
    ledger.set_rule_policy("pin", "hero", "", {"baseline_units_per_hour": 5})
    ledger.set_promotion("p", ("hero",), ("amazon",), T0 + 10 * HOUR_MS, T0 + 12 * HOUR_MS, 50)
    for i in range(40):
        clock.advance(15_000)
        ledger.reserve(f"r{i}", ("hero",), (2,), ("amazon", "tiktok")[i % 2], 3600, False)
    assert ledger.evaluate_rules()
    return ledger


def test_snapshots_carry_the_rules_and_restore_the_same_ats():
    clock = ManualClock(T0)
    ledger = _busy_ledger(clock)
    assert {key[0] for key in ledger.rules.active} == {1, 2, 3, 5}  # spike, viral, pool, preload
    seq, encode = ledger.snapshot_state()
    payload = encode()
    restored = _ledger(ManualClock(0))
    restored.restore(payload)
    assert restored.seq == seq
    assert restored.rules.active == ledger.rules.active
    assert restored.rules.policies == ledger.rules.policies
    assert restored.velocity.pairs == ledger.velocity.pairs
    assert restored.promotions.snapshot_rows() == ledger.promotions.snapshot_rows()
    assert restored.channels.rule_effects == ledger.channels.rule_effects
    for channel in ("amazon", "tiktok"):
        assert restored.channels.ats_of("hero", channel) == ledger.channels.ats_of(
            "hero", channel)
    assert restored.channels.bucket_rows("hero") == ledger.channels.bucket_rows("hero")
    # Nothing fires on its own after a restore: the same state decides the same (nothing new).
    clock_seq = restored.seq
    restored.clock = clock
    assert restored.evaluate_rules() == 0 and restored.seq == clock_seq


def test_format_4_snapshots_are_still_read():
    clock = ManualClock(T0)
    ledger = _ledger(clock)
    ledger.set_stock("s1", "hero", 5, None, "")
    payload = state_codec.encode(ledger.seq, list(ledger.table.items()), [], [])
    old = bytearray(payload)
    old[8:12] = (4).to_bytes(4, "little")
    restored = _ledger(clock)
    restored.restore(bytes(old))
    assert restored.table.counters(restored.table.lookup("hero")) == (5, 0, 0)


def test_refusals_change_nothing():
    clock = ManualClock(T0)
    ledger = _busy_ledger(clock)
    seq = ledger.seq
    refused = ledger.set_promotion("q", ("nope",), ("amazon",), T0 + HOUR_MS, T0 + 2 * HOUR_MS, 1)
    assert isinstance(refused, Rejection) and refused.field == "skus[0]"
    refused = ledger.set_promotion("q", ("hero",), ("ebay",), T0 + HOUR_MS, T0 + 2 * HOUR_MS, 1)
    assert refused.code is Code.NOT_FOUND and refused.field == "channels[0]"
    refused = ledger.set_promotion("q", ("hero",), ("amazon",), T0 - 2 * HOUR_MS, T0, 1)
    assert refused.code is Code.FAILED_PRECONDITION and refused.field == "ends_at_ms"
    refused = ledger.set_rule_policy("x", "", "ebay", {"enabled": 1})
    assert refused.code is Code.FAILED_PRECONDITION and refused.field == "channel"
    refused = ledger.set_rule_policy("pin", "hero", "", {"baseline_units_per_hour": 6})
    assert refused.code is Code.ALREADY_EXISTS
    assert ledger.seq == seq


def test_rules_reverse_with_hysteresis_not_at_the_threshold():
    clock = ManualClock(T0)
    ledger = _busy_ledger(clock)
    spike = (1, "hero", "amazon", "")
    since = ledger.rules.active[spike].since_ms
    # 15 minutes of hold, and the rate must fall below half the threshold (25 units/h).
    clock.advance(10 * MINUTE_MS)
    ledger.evaluate_rules()
    assert spike in ledger.rules.active
    clock.advance(6 * MINUTE_MS)
    assert clock.now_ms() - since > 15 * MINUTE_MS
    ledger.evaluate_rules()
    assert spike not in ledger.rules.active
