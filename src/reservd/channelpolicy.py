"""What a channel may show: its policy and the one definition of ``ats``.

A policy turns ``drawable`` -- the units a channel may draw from a SKU now (reservd.channels
says which) -- into what it shows, in this order: share (basis points, rounded down), minus a
buffer, capped, at reserve levels 2 and 3 at most ``available - hold_units``, and 0 at or below
a floor; level 4 (no stock) shows 0. Every step only lowers, so the order is the safe one.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Mapping, NamedTuple, Sequence

from reservd.extension import compiled

BASIS_POINTS = 10_000


class Enforcement(enum.IntEnum):
    """Numbers match reservd.v1.Enforcement."""

    DISPLAY = 1  # the policy shapes what the channel shows; an order may draw every usable unit
    STRICT = 2  # a Reserve beyond the channel's current ats is sold out


class Level(enum.IntEnum):
    """Reserve-level triggers on a SKU's available units (seed 000)."""

    NORMAL = 0
    WARNING = 1
    CRITICAL = 2  # shows at most available - hold_units
    EMERGENCY = 3  # still at most available - hold_units
    ZERO = 4  # shows 0


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    """How one channel draws and what it shows. Units are SKU units; ``share_bp`` is basis
    points (10,000 = 100 %). Defaults: show everything the channel may draw, triggers at
    20/10/5/0 available units with a hold of 3."""

    pool: str = ""  # the channel's own bucket, drawn first ("" none)
    reserve: str = ""  # a reserve the channel is bound to, drawn next ("" none)
    pool_only: bool = False  # never draws shared
    share_bp: int = BASIS_POINTS
    buffer_units: int = 0
    max_units: int | None = None  # None: no cap
    floor_units: int = 0  # an ats at or below this shows 0
    enforcement: Enforcement = Enforcement.DISPLAY
    warning_units: int = 20
    critical_units: int = 10
    emergency_units: int = 5
    zero_units: int = 0
    hold_units: int = 3


# The fields a per-SKU override may set (everything but the buckets a channel draws from).
OVERRIDABLE = (
    "share_bp", "buffer_units", "max_units", "floor_units", "enforcement", "warning_units",
    "critical_units", "emergency_units", "zero_units", "hold_units",
)
DEFAULT_POLICY = Policy()


class Ats(NamedTuple):
    ats: int
    level: Level


def level_of(policy: Policy, available: int) -> Level:
    if available <= policy.zero_units:
        return Level.ZERO
    if available <= policy.emergency_units:
        return Level.EMERGENCY
    if available <= policy.critical_units:
        return Level.CRITICAL
    if available <= policy.warning_units:
        return Level.WARNING
    return Level.NORMAL


def ats(policy: Policy, available: int, drawable: int) -> Ats:
    """What a channel shows: ``drawable`` (the units it may draw now) through its policy, in
    this order: share (rounded down), minus buffer, capped, the level's hold, the floor."""
    level = level_of(policy, available)
    if level is Level.ZERO:
        return Ats(0, level)
    units = drawable * policy.share_bp // BASIS_POINTS - policy.buffer_units
    if policy.max_units is not None and units > policy.max_units:
        units = policy.max_units
    if level >= Level.CRITICAL and units > available - policy.hold_units:
        units = available - policy.hold_units
    if units <= policy.floor_units:
        units = 0
    return Ats(units, level)


def drawable(
    policy: Policy, available: int, named: Mapping[str, Sequence[int]] | None, shared: int
) -> int:
    """Units a channel with ``policy`` may draw from a SKU now: the free units of its pool and
    of its bound reserve among the SKU's ``named`` buckets (name -> [free, reserved,
    committed]; None or empty: none), plus ``shared``'s free units unless ``pool_only``; never
    more than ``available``."""
    if available <= 0:
        return 0
    if not named:
        return 0 if policy.pool_only else available
    units = 0
    for name in (policy.pool, policy.reserve):
        counters = named.get(name) if name else None
        if counters is not None:
            units += counters[0]
    if not policy.pool_only:
        units += max(0, shared)
    return min(units, available)


def ats_values(
    policies: Sequence[Policy], available: int, named: Mapping[str, Sequence[int]] | None,
    shared: int,
) -> tuple[int, ...]:
    """Each policy's :func:`ats` and level for one SKU (``named``, ``shared`` as
    :func:`drawable` takes them), then the most severe level (-1 without policies):
    ``(ats, level, ats, level, ..., level)``. The definition; reservd._atsvalues computes the
    same in C (tests/test_channels_ext.py checks them equal), which :data:`ATS_VALUES` is
    unless ``RESERVD_NO_EXT=1``."""
    values: list[int] = []
    worst = -1
    for policy in policies:
        units, level = ats(policy, available, drawable(policy, available, named, shared))
        values += (units, int(level))
        if level > worst:
            worst = int(level)
    values.append(worst)
    return tuple(values)


def _load_ats_values():
    return compiled("reservd._atsvalues", "ats_values", ats_values)


# What the hot paths call (reservd.channels.Channels.mirror_fields): the C twin when built.
ATS_VALUES = _load_ats_values()


def policy_row(policy: Policy) -> tuple:
    return tuple(
        int(value) if isinstance(value, enum.IntEnum) else value
        for value in dataclasses.astuple(policy)
    )


def policy_from_row(row) -> Policy:
    policy = Policy(*row)
    return dataclasses.replace(policy, enforcement=Enforcement(policy.enforcement))
