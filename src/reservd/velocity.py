"""Velocity: units reserved per hour, per (sku, channel), over sliding windows of fixed buckets.

Each tracked pair is one flat ``array('i')`` (32-bit: minute and hour numbers since 1970 fit,
and a bucket saturates at 2**31 - 1 units): three indexes (the newest minute, the newest hour,
the first hour seen) then ``window_minutes`` minute buckets (detection) then ``baseline_hours``
hour buckets (the learned baseline), each a ring indexed by ``minute % window_minutes`` and
``hour % baseline_hours``. A Reserve adds its granted units to one minute and one hour bucket,
zeroing the buckets it rolls past: O(1), no per-event lists. Time is the Reserve record's own
``at_ms``, so replaying the log (and a snapshot's rows) rebuilds exactly the same buckets.

- ``rate``: the units of the last ``window_minutes`` minute buckets (the current one included)
  scaled to an hour, in milli-units per hour (integers: the figures logged with a rule are exact).
- ``learned``: the median of the completed hours the ring holds since the pair was first seen
  (hours without a sale count as 0); None before one hour is complete. The median keeps a spike
  hour or two from dragging the baseline up with it.

At most ``pairs_max`` pairs: a new pair when full first drops the pairs idle for longer than the
baseline window (they carry nothing any more); if none can go, the sample is not tracked and
counted in ``untracked``.
"""
from __future__ import annotations

from array import array
MINUTE_MS = 60_000
HOUR_MS = 3_600_000
MILLI = 1000

_MINUTE, _HOUR, _FIRST_HOUR, _HEAD = 0, 1, 2, 3
_BUCKET_MAX = (1 << 31) - 1


class Velocity:
    """Minute and hour buckets per (sku, channel). Integers throughout (milli-units/hour)."""

    def __init__(self, window_minutes: int, baseline_hours: int, pairs_max: int) -> None:
        assert window_minutes >= 1 and baseline_hours >= 1 and pairs_max >= 0
        self.window_minutes = window_minutes
        self.baseline_hours = baseline_hours
        self.pairs_max = pairs_max
        self.pairs: dict[tuple[str, str], array] = {}
        self.untracked = 0  # samples dropped because pairs_max pairs were busy
        self._blank = array("i", bytes(4 * (_HEAD + window_minutes + baseline_hours)))
        # SKUs with samples since the rule evaluator last looked (reservd.ledger_rules).
        self.dirty: set[str] = set()

    def __len__(self) -> int:
        return len(self.pairs)

    # -- writing (live and in replay) ---------------------------------------------------------

    def record(self, sku: str, channel: str, units: int, at_ms: int) -> None:
        """``units`` granted to ``channel`` for ``sku`` at ``at_ms`` (unix ms)."""
        buckets = self.pairs.get((sku, channel))
        minute = at_ms // MINUTE_MS
        if buckets is None:
            buckets = self._new(sku, channel, minute)
            if buckets is None:
                return
        self.dirty.add(sku)
        window = self.window_minutes
        if minute != buckets[_MINUTE]:
            self._roll(buckets, minute)
            if minute <= buckets[_MINUTE] - window:
                return  # a clock stepped back beyond the window: nothing to count it in
        # The same minute as the newest (the common case), or one within the window.
        slot = _HEAD + minute % window
        value = buckets[slot] + units
        buckets[slot] = value if value < _BUCKET_MAX else _BUCKET_MAX
        hour = minute // 60
        if hour > buckets[_HOUR] - self.baseline_hours:
            slot = _HEAD + window + hour % self.baseline_hours
            value = buckets[slot] + units
            buckets[slot] = value if value < _BUCKET_MAX else _BUCKET_MAX

    def _new(self, sku: str, channel: str, minute: int) -> array | None:
        if len(self.pairs) >= self.pairs_max and not self._sweep(minute * MINUTE_MS):
            self.untracked += 1
            return None
        buckets = array("i", self._blank)
        hour = minute // 60
        buckets[_MINUTE], buckets[_HOUR], buckets[_FIRST_HOUR] = minute, hour, hour
        self.pairs[(sku, channel)] = buckets
        return buckets

    def _roll(self, buckets: array, minute: int) -> None:
        """Move the newest minute (and hour) forward to ``minute``, zeroing the buckets passed
        over; a minute before the newest moves nothing."""
        window, hours = self.window_minutes, self.baseline_hours
        newest = buckets[_MINUTE]
        if minute <= newest:
            return
        for skipped in range(max(newest + 1, minute - window + 1), minute + 1):
            buckets[_HEAD + skipped % window] = 0
        buckets[_MINUTE] = minute
        hour, newest_hour = minute // 60, buckets[_HOUR]
        if hour > newest_hour:
            for skipped in range(max(newest_hour + 1, hour - hours + 1), hour + 1):
                buckets[_HEAD + window + skipped % hours] = 0
            buckets[_HOUR] = hour

    def _sweep(self, at_ms: int) -> bool:
        """Drop pairs idle for longer than the baseline window; True if any went."""
        horizon = at_ms // HOUR_MS - self.baseline_hours
        idle = [key for key, buckets in self.pairs.items() if buckets[_HOUR] < horizon]
        for key in idle:
            del self.pairs[key]
        return bool(idle)

    # -- reading ------------------------------------------------------------------------------

    def window_units(self, sku: str, channel: str, now_ms: int) -> int:
        """Units granted in the last ``window_minutes`` minute buckets (current one included)."""
        buckets = self.pairs.get((sku, channel))
        if buckets is None:
            return 0
        window = self.window_minutes
        newest = buckets[_MINUTE]
        oldest = max(newest, now_ms // MINUTE_MS) - window + 1
        return sum(buckets[_HEAD + m % window] for m in range(max(oldest, newest - window + 1),
                                                                 newest + 1))

    def rate(self, sku: str, channel: str, now_ms: int) -> int:
        """Milli-units per hour over the detection window."""
        return self.window_units(sku, channel, now_ms) * 60 * MILLI // self.window_minutes

    def learned(self, sku: str, channel: str, now_ms: int) -> int | None:
        """The learned baseline in milli-units per hour, or None before a complete hour."""
        buckets = self.pairs.get((sku, channel))
        if buckets is None:
            return None
        hours, window = self.baseline_hours, self.window_minutes
        current = now_ms // HOUR_MS
        first = max(buckets[_FIRST_HOUR], current - hours)
        newest = buckets[_HOUR]
        counts = []
        for hour in range(first, current):
            held = newest - hours < hour <= newest
            counts.append(buckets[_HEAD + window + hour % hours] if held else 0)
        if not counts:
            return None
        counts.sort()
        middle = len(counts) // 2
        if len(counts) % 2:
            return counts[middle] * MILLI
        return (counts[middle - 1] + counts[middle]) * MILLI // 2

    def channels_of(self, sku: str) -> list[str]:
        """Channels with a tracked pair for ``sku`` (a scan: for the operator's view only)."""
        return sorted(channel for key_sku, channel in self.pairs if key_sku == sku)

    # -- snapshots ----------------------------------------------------------------------------

    def snapshot_rows(self) -> list[tuple]:
        """(sku, channel, buckets as a tuple of ints) per pair; copied now, encoded later."""
        return [(sku, channel, tuple(buckets)) for (sku, channel), buckets in self.pairs.items()]

    def restore_row(self, row: tuple) -> None:
        sku, channel, values = row
        if len(values) != len(self._blank):
            # Another window or baseline size than when it was written: start this pair over.
            return
        self.pairs[(sku, channel)] = array("i", values)
