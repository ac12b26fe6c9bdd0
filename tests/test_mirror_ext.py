"""The mirror's per-row work in C (reservd._mirrorargs) equals its Python definitions
(reservd.mirrorwrite.fields_text, reservd.mirrorshown.channel_delta,
reservd.mirrorfields.safest_fields) on any fields."""
from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reservd import mirrorfields, mirrorshown, mirrorwrite
from reservd.mirrorfields import safest_fields
from reservd.mirrorshown import channel_delta
from reservd.mirrorwrite import fields_text

try:
    from reservd import _mirrorargs
except ImportError:  # RESERVD_NO_EXT runs, or a build without a compiler
    _mirrorargs = None

pytestmark = pytest.mark.skipif(_mirrorargs is None, reason="reservd._mirrorargs not built")

_names = st.sampled_from(("ats:a", "ats:b", "level:a", "level", "levels", "free:shared",
                          "free:p", "lev"))
_values = st.one_of(st.integers(-5, 5), st.integers(-(1 << 70), 1 << 70))
_fields = st.lists(st.tuples(_names, _values), max_size=8).map(tuple)


@settings(max_examples=400, deadline=None)
@given(_fields)
def test_fields_text_is_its_definition(fields):
    assert _mirrorargs.fields_text(fields) == fields_text(fields)


@settings(max_examples=400, deadline=None)
@given(_fields, st.data(), st.booleans(), st.integers(0, 9), st.integers(0, 1))
def test_channel_delta_is_its_definition(fields, data, lower, seq, exact):
    # A base with the same names (mostly other values), or with other fields altogether.
    if data.draw(st.booleans()):
        held = tuple((name, data.draw(_values) if data.draw(st.booleans()) else value)
                     for name, value in fields)
    else:
        held = data.draw(_fields)
    row, base = (seq + 1, 0, fields), (seq, exact, held)
    assert _mirrorargs.channel_delta(row, lower, base) == channel_delta(row, lower, base)


@settings(max_examples=400, deadline=None)
@given(_fields, st.data(), st.integers(1, 5))
def test_safest_fields_is_its_definition(first, data, more):
    # Mostly states with the first one's names (a SKU's pending entries), sometimes others.
    states = [first]
    for _ in range(more):
        if data.draw(st.integers(0, 4)):
            states.append(tuple((name, data.draw(_values)) for name, _ in first))
        else:
            states.append(data.draw(_fields))
    assert _mirrorargs.safest_fields(states) == safest_fields(states)


def test_the_mirror_calls_the_c_twins_unless_no_ext():
    if os.environ.get("RESERVD_NO_EXT") == "1":
        assert mirrorshown.CHANNEL_DELTA is channel_delta
        assert mirrorwrite.FIELDS_TEXT is fields_text
        assert mirrorfields.SAFEST_FIELDS is safest_fields
    else:
        assert mirrorshown.CHANNEL_DELTA is _mirrorargs.channel_delta
        assert mirrorwrite.FIELDS_TEXT is _mirrorargs.fields_text
        assert mirrorfields.SAFEST_FIELDS is _mirrorargs.safest_fields
