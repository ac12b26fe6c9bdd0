"""The ledger's own alert rules: reserve-level crossings and recount shortfalls.

Both run inside the command that causes them (reservd.alerts' contract), so replay raises the
same alerts again.

**Reserve levels** (seed 000's triggers, ``reserve_level``): a SKU's ``available`` units against
the default policy's thresholds -- level 1 warning at 20 or fewer, 2 critical at 10, 3 emergency
at 5, 4 zero at 0 (reservd.channelpolicy.level_of; a channel's own thresholds shape its ``ats``,
WatchAts carries that level per channel). After every mutation the SKUs it changed are read
from the table's change ring (and a SKU created by a recount is looked at too, even at 0
units), and an alert is raised when a SKU's level changes, once per change: a fall through
several thresholds at once is one alert at the level reached (the previous level among its
figures). Hysteresis: a worse level is announced at once; a SKU leaves
a level towards normal only once ``available`` exceeds that level's threshold by more than
``alert_level_hysteresis_units`` (default 2) -- so 5 -> 6 -> 5 -> 6 at the emergency threshold
raises nothing after the first alert, and level 0 ("back to normal") comes at 23 available.
The level announced is the alerts feed's latch (in snapshots).

**Shortfalls** (``shortfall``): a recount (or shrinkage) that leaves ``on_hand`` below
``reserved + committed`` is an oversell, graded like seed 001's alert levels. The window is the
last ``alert_shortfall_window_seconds`` (default 3,600) of command time:

- level 3 (widespread): ``alert_shortfall_widespread_skus`` (default 5) or more SKUs short in
  the window, this one included;
- level 2: several SKUs short in the window, or this SKU short by ``alert_shortfall_major_units``
  (default 5) or more;
- level 1: this SKU alone, short by fewer (the seed's 1-2 units; 3-4 are graded 1 too).

The window keeps each SKU's latest shortfall time, at most ``alert_shortfall_widespread_skus``
SKUs (the newest; beyond that the grade is 3 anyway), and travels in snapshots.
"""
from __future__ import annotations

from reservd import stockstates
from reservd.channelpolicy import DEFAULT_POLICY, Level, level_of
from reservd.config import Config, ConfigError

RESERVE_LEVEL = "reserve_level"
SHORTFALL = "shortfall"
SNAPSHOT_KINDS = ("alert_shortfalls",)

# The threshold of each level, in available units (level 0 has none).
_THRESHOLDS = {
    Level.WARNING: DEFAULT_POLICY.warning_units,
    Level.CRITICAL: DEFAULT_POLICY.critical_units,
    Level.EMERGENCY: DEFAULT_POLICY.emergency_units,
    Level.ZERO: DEFAULT_POLICY.zero_units,
}


class AlertRules:
    """Called by the ledger: ``applied(seq)`` after every mutation, ``stock_changed`` from the
    apply of SetStock and AdjustStock."""

    def __init__(self, feed, table, config: Config) -> None:
        for name in ("alert_level_hysteresis_units", "alert_shortfall_window_seconds"):
            if getattr(config, name) < 0:
                raise ConfigError(f"{name}: must be at least 0, not {getattr(config, name)}")
        for name in ("alert_shortfall_major_units", "alert_shortfall_widespread_skus"):
            if getattr(config, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, not {getattr(config, name)}")
        self.feed = feed
        self.table = table
        self.hysteresis_units = config.alert_level_hysteresis_units
        self.window_ms = config.alert_shortfall_window_seconds * 1000
        self.major_units = config.alert_shortfall_major_units
        self.widespread_skus = config.alert_shortfall_widespread_skus
        self._position = table.ring_head
        # sku -> command time (unix ms) of its latest shortfall, oldest first.
        self._short: dict[str, int] = {}

    # -- reserve levels -----------------------------------------------------------------------

    def restart_ring(self) -> None:
        """The table was restored from a snapshot: read the change ring from here on."""
        self._position = self.table.ring_head

    def applied(self, seq: int) -> dict[str, int]:
        """The mutation ``seq`` was just applied: check the level of every SKU it changed;
        returns their ``available`` (for the other rules that read it: replenishment)."""
        position, changes = self.table.changes(self._position, 1 << 30, seq)
        self._position = position
        if not changes:
            return {}
        latest = {}  # a SKU changed twice by one command: its final state only
        for _, sku, on_hand, reserved, committed, unsellable in changes:
            latest[sku] = stockstates.available(on_hand, reserved, committed, unsellable)
        for sku, available in latest.items():
            self._level(sku, available)
        return latest

    def _level(self, sku: str, available: int) -> None:
        feed = self.feed
        current = feed.latched(RESERVE_LEVEL, sku)
        reached = level_of(DEFAULT_POLICY, available)
        if reached < current:
            # Better: leave each level only when clear of its threshold by the hysteresis.
            level = current
            while level > reached and available > _THRESHOLDS[level] + self.hysteresis_units:
                level -= 1
            reached = level
        if reached == current:
            return
        threshold = _THRESHOLDS[Level(reached or Level.WARNING)]
        feed.cross(RESERVE_LEVEL, int(reached), sku=sku, figures={
            "available": available, "threshold_units": threshold, "previous_level": current,
            "hysteresis_units": self.hysteresis_units,
        })

    # -- shortfalls ---------------------------------------------------------------------------

    def stock_changed(self, sku: str, on_hand: int, reserved: int, committed: int,
                      at_ms: int) -> None:
        """A SetStock or AdjustStock was applied at ``at_ms``: grade a shortfall, if any. (Its
        level, too: a SKU created at 0 units changes no counter, so the ring does not show it.)"""
        table = self.table
        self._level(sku, stockstates.available(
            on_hand, reserved, committed, table.unsellable(table.lookup(sku))
        ))
        shortfall = reserved + committed - on_hand
        if shortfall <= 0:
            return
        short = self._short
        short.pop(sku, None)
        short[sku] = at_ms
        horizon_ms = at_ms - self.window_ms
        for other, other_ms in list(short.items()):
            if other_ms > horizon_ms and len(short) <= self.widespread_skus:
                break
            del short[other]
        short[sku] = at_ms  # the window may be 0 s: the SKU itself is always in it
        skus = len(short)
        if skus >= self.widespread_skus:
            level = 3
        elif skus > 1 or shortfall >= self.major_units:
            level = 2
        else:
            level = 1
        self.feed.emit(SHORTFALL, level, sku=sku, figures={
            "shortfall_units": shortfall, "on_hand": on_hand, "reserved": reserved,
            "committed": committed, "skus_short_in_window": skus,
            "window_seconds": self.window_ms // 1000,
        })

    # -- snapshots ----------------------------------------------------------------------------

    def snapshot_rows(self) -> dict[str, list]:
        return {"alert_shortfalls": [[sku, at_ms] for sku, at_ms in self._short.items()]}

    def restore_rows(self, kind: str, rows: list) -> None:
        if kind != "alert_shortfalls":
            raise ValueError(f"unknown alert rules snapshot part {kind!r}")
        for sku, at_ms in rows:
            self._short[sku] = at_ms
