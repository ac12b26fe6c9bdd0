"""The channel model alone (reservd.channels) over a real counter table: the seeds' numbers."""
from __future__ import annotations

import pytest

from reservd.channelpolicy import Enforcement, Level, Policy, ats
from reservd.channels import SHARED, Channels
from reservd.table import Table


def _book(on_hand: int = 1000, sku: str = "s") -> Channels:
    table = Table(shards=4, ring_capacity=1024)
    table.set_on_hand(table.ensure(sku), on_hand, 1)
    return Channels(table, channels_max=16, buckets_per_sku_max=8)


def _buckets(book: Channels, sku: str = "s") -> dict[str, tuple[int, int, int]]:
    return {name: tuple(rest) for name, *rest in book.bucket_rows(sku)}


@pytest.mark.parametrize(
    "share_bp, available, shown",
    [(9000, 100, 90), (9000, 1000, 900), (8500, 100, 85), (10_000, 100, 100), (9500, 100, 95),
     (9000, 99, 89)],
)
def test_share_rounds_down(share_bp, available, shown):
    assert ats(Policy(share_bp=share_bp), available, available) == (shown, Level.NORMAL)


def test_amazon_seven_units_show_six_without_triggers():
    policy = Policy(share_bp=9000, warning_units=0, critical_units=0, emergency_units=0)
    assert ats(policy, 7, 7) == (6, Level.NORMAL)
    # With the default triggers 7 units is level 2: the hold of 3 shows at most 4.
    assert ats(Policy(share_bp=9000), 7, 7) == (4, Level.CRITICAL)


@pytest.mark.parametrize(
    "available, level, shown",
    [(21, Level.NORMAL, 21), (20, Level.WARNING, 20), (11, Level.WARNING, 11),
     (10, Level.CRITICAL, 7), (6, Level.CRITICAL, 3), (5, Level.EMERGENCY, 2),
     (3, Level.EMERGENCY, 0), (1, Level.EMERGENCY, 0), (0, Level.ZERO, 0), (-4, Level.ZERO, 0)],
)
def test_triggers_20_10_5_0_with_a_hold_of_3(available, level, shown):
    assert ats(Policy(), available, max(available, 0)) == (shown, level)


def test_buffer_cap_floor():
    assert ats(Policy(buffer_units=5), 100, 100).ats == 95
    assert ats(Policy(max_units=40), 100, 100).ats == 40
    assert ats(Policy(floor_units=30, share_bp=3000), 100, 100).ats == 0
    assert ats(Policy(floor_units=29, share_bp=3000), 100, 100).ats == 30


def test_tiktok_allocation_of_seed_000():
    book = _book(1000)
    for name, units in [("tiktok-fbt", 300), ("tiktok", 500), ("returns", 100),
                        ("seeding", 30), ("lost-parcel", 20), ("spike", 50)]:
        assert book.check_allocate("s", SHARED, name, units) is None
        book.apply_allocate("s", SHARED, name, units)
    book.apply_set_channel("tiktok", Policy(pool="tiktok"))
    book.apply_set_channel("tiktok-fbt", Policy(pool="tiktok-fbt", pool_only=True))
    book.apply_set_channel("seeding", Policy(reserve="seeding", pool_only=True))
    book.apply_set_channel("amazon", Policy(share_bp=9000))
    assert _buckets(book)[SHARED] == (0, 0, 0)
    before = {c: book.ats_of("s", c).ats for c in ("tiktok", "tiktok-fbt", "seeding", "amazon")}
    assert before == {"tiktok": 500, "tiktok-fbt": 300, "seeding": 30, "amazon": 0}
    # The spike buffer goes to TikTok: only TikTok's ats moves, by 50.
    assert book.check_allocate("s", "spike", "tiktok", 51)[0] == "FAILED_PRECONDITION"
    book.apply_allocate("s", "spike", "tiktok", 50)
    after = {c: book.ats_of("s", c).ats for c in before}
    assert after == {**before, "tiktok": 550}
    assert "spike" not in _buckets(book)


def test_draw_order_release_commit_fulfil():
    book = _book(100)
    book.apply_allocate("s", SHARED, "tiktok", 10)
    book.apply_set_channel("tiktok", Policy(pool="tiktok"))
    table = book.table
    assert book.limits(("s",), "tiktok") == (100,)
    assert book.limits(("s",), "amazon") == (90,)  # unconfigured: shared only
    table.reserve(("s",), (15,), False, 2)
    book.apply_reserve("r1", "tiktok", ("s",), (15,))
    assert book.draws_of("r1") == {"s": (("tiktok", 10), (SHARED, 5))}
    assert _buckets(book) == {SHARED: (85, 5, 0), "tiktok": (0, 10, 0)}
    # Commit 12 of 15: the 3 going back return to shared, drawn last.
    handle = table.lookup("s")
    table.commit((handle,), (15,), (12,), 3)
    book.apply_commit("r1", {"s": 12})
    assert _buckets(book) == {SHARED: (88, 0, 2), "tiktok": (0, 0, 10)}
    table.fulfil((handle,), (12,), 4)
    book.apply_finish("r1", fulfilled=True)
    assert _buckets(book) == {SHARED: (88, 0, 0)}  # the empty pool is gone
    assert not book.held


def test_pool_only_and_strict_limits():
    book = _book(100)
    book.apply_allocate("s", SHARED, "fbt", 30)
    book.apply_set_channel("fbt", Policy(pool="fbt", pool_only=True))
    book.apply_set_channel("ebay", Policy(share_bp=9000, max_units=20,
                                          enforcement=Enforcement.STRICT))
    assert book.limits(("s",), "fbt") == (30,)
    assert book.limits(("s",), "ebay") == (20,)
    book.table.reserve(("s",), (5,), False, 2)
    book.apply_reserve("r", "ebay", ("s",), (5,))
    assert "r" not in book.held  # all from shared: nothing to remember
    assert _buckets(book)[SHARED] == (65, 5, 0)


def test_release_returns_units_to_their_bucket_and_shortfall_lands_in_shared():
    book = _book(50)
    book.apply_allocate("s", SHARED, "seeding", 30)
    book.apply_set_channel("seeding", Policy(reserve="seeding"))
    table, handle = book.table, book.table.lookup("s")
    table.reserve(("s",), (40,), False, 2)
    book.apply_reserve("r", "seeding", ("s",), (40,))
    assert _buckets(book) == {SHARED: (10, 10, 0), "seeding": (0, 30, 0)}
    table.set_on_hand(handle, 20, 3)  # a recount below what is promised
    assert _buckets(book)[SHARED] == (-20, 10, 0)
    table.release((handle,), (40,), 4)
    book.apply_finish("r", fulfilled=False)
    assert _buckets(book) == {SHARED: (-10, 0, 0), "seeding": (30, 0, 0)}
    assert book.limits(("s",), "seeding") == (20,)  # never beyond available
    assert book.limits(("s",), "other") == (0,)


def test_snapshot_rows_round_trip():
    book = _book(100)
    book.apply_allocate("s", SHARED, "tiktok", 10)
    book.apply_set_channel("tiktok", Policy(pool="tiktok", max_units=5,
                                            enforcement=Enforcement.STRICT))
    book.apply_sku_policy("s", "tiktok", {"share_bp": 5000})
    book.table.reserve(("s",), (12,), False, 2)
    book.apply_reserve("r", "tiktok", ("s",), (12,))
    book.note_change("c1", ("allocate", "s", SHARED, "tiktok", 10), 2, 1000, 10_000)
    copy = Channels(book.table, 16, 8)
    for kind, rows in book.snapshot_rows().items():
        copy.restore_rows(kind, rows)
    assert copy.snapshot_rows() == book.snapshot_rows()
    assert copy.policy("s", "tiktok") == book.policy("s", "tiktok")
    assert copy.ats_of("s", "tiktok") == book.ats_of("s", "tiktok")
