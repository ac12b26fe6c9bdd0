"""Every channel's ats in one call: reservd.channelpolicy.ats_values (the definition) and its C
twin reservd._atsvalues, which must give the same values on any input; and the mirror's
channel fields built from it equal GetAts's and GetBuckets' numbers."""
from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reservd import channelpolicy
from reservd.channelpolicy import Enforcement, Policy, ats, ats_values, drawable
from reservd.channels import SHARED, Channels
from reservd.table import Table

try:
    from reservd import _atsvalues
except ImportError:  # no C compiler: the definition alone runs
    _atsvalues = None

needs_ext = pytest.mark.skipif(_atsvalues is None, reason="reservd._atsvalues not built")

BUCKETS = ("tiktok", "fbt", "seeding", "returns")
# Mostly everyday numbers, sometimes ones beyond what the C steps hold (the twin then defers).
_units = st.one_of(
    st.integers(-30, 1_000), st.integers(-(1 << 40), 1 << 40), st.integers(-(1 << 70), 1 << 70)
)
_policies = st.builds(
    Policy,
    pool=st.sampled_from(("", *BUCKETS)),
    reserve=st.sampled_from(("", *BUCKETS)),
    pool_only=st.booleans(),
    share_bp=st.one_of(st.integers(0, 10_000), _units),
    buffer_units=_units,
    max_units=st.one_of(st.none(), _units),
    floor_units=_units,
    enforcement=st.sampled_from(Enforcement),
    warning_units=_units,
    critical_units=_units,
    emergency_units=_units,
    zero_units=_units,
    hold_units=_units,
)
_named = st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(BUCKETS), st.lists(_units, min_size=3, max_size=3)),
)


@needs_ext
@settings(max_examples=600, deadline=None)
@given(st.lists(_policies, max_size=6).map(tuple), _units, _named, _units)
def test_c_twin_equals_the_definition(policies, available, named, shared):
    expected = ats_values(policies, available, named, shared)
    assert _atsvalues.ats_values(policies, available, named, shared) == expected
    # Again with the same tuple (its numbers are kept) and with an equal new one.
    assert _atsvalues.ats_values(policies, available, named, shared) == expected
    assert _atsvalues.ats_values(tuple(policies), available, named, shared) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(_policies, max_size=6).map(tuple), _units, _named, _units)
def test_the_definition_is_each_policys_ats_and_the_worst_level(
    policies, available, named, shared
):
    values = ats_values(policies, available, named, shared)
    for i, policy in enumerate(policies):
        shown = ats(policy, available, drawable(policy, available, named, shared))
        assert values[2 * i:2 * i + 2] == (shown.ats, int(shown.level))
    assert values[-1] == max((int(values[2 * i + 1]) for i in range(len(policies))), default=-1)


def test_ats_values_is_the_c_twin_unless_no_ext(monkeypatch):
    if os.environ.get("RESERVD_REQUIRE_EXT") == "1":
        assert channelpolicy.ATS_VALUES is _atsvalues.ats_values
    monkeypatch.setenv("RESERVD_NO_EXT", "1")
    assert channelpolicy._load_ats_values() is ats_values


def test_mirror_fields_equal_ats_of_and_bucket_rows():
    table = Table(shards=4, ring_capacity=64)
    table.set_on_hand(table.ensure("s"), 1_000, 1)
    table.set_on_hand(table.ensure("t"), 8, 2)
    book = Channels(table, channels_max=16, buckets_per_sku_max=8)
    book.apply_set_channel("amazon", Policy(share_bp=9_000))
    book.apply_set_channel("tiktok", Policy(pool="tiktok", buffer_units=5))
    book.apply_set_channel("seeding", Policy(reserve="seeding", pool_only=True))
    book.apply_allocate("s", SHARED, "tiktok", 300)
    book.apply_allocate("s", SHARED, "seeding", 30)
    for step in range(3):
        if step == 1:
            book.apply_sku_policy("s", "amazon", {"max_units": 100})
        if step == 2:
            book.set_rule_effect("t", "tiktok", (1_000, 10_000, None))
        for sku in ("s", "t"):
            fields = dict(book.mirror_fields(sku))
            expected = {}
            for channel in sorted(book.policies):
                shown = book.ats_of(sku, channel)
                expected[f"ats:{channel}"] = shown.ats
                expected[f"level:{channel}"] = int(shown.level)
            expected["level"] = max(v for k, v in expected.items() if k.startswith("level:"))
            expected.update(
                (f"free:{name}", free) for name, free, _, _ in book.bucket_rows(sku)
            )
            assert fields == expected
