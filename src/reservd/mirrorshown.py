"""What the Redis mirror knows each stock hash's channel fields to be, so that a write sends
only the fields that changed.

A SKU's channel fields (reservd.mirrorfields) are a dozen or more with several channels and
buckets; a Reserve changes a few ``ats`` and one bucket's free units. Parsing and writing every
field on every write was most of what channels cost Redis (204-228 µs of script time per
Reserve against 39-70 without channels, `bench/bench_channels.py --mirror`). The script
(reservd.mirrorwrite.BATCH_SCRIPT) tells, per row, whether the hash's channel fields are now
exactly what was written; :class:`ShownFields` keeps those, and the next write of the SKU sends
a *delta* over them with their version as its *base*. The script takes the delta only when the
hash is still at that base (same epoch and version, hence the same names and values), so a
wrong guess costs the full write, never a wrong value. The full fields always travel too.

Bound: ``mirror_shown_skus_max`` SKUs, least recently written forgotten first
(``reservd_mirror_shown_skus``); forgotten all at once whenever the mirror resynchronises or a
write fails (Redis may then hold anything at or below what was sent).
"""
from __future__ import annotations

from typing import Container

from reservd.extension import compiled
from reservd.mirrorwrite import ChannelRow, Delta
from reservd.table import Change

_EXACT = ord("x")  # the script's letters: its channel fields are now exactly the written ones
_KEPT = ord("k")  # not touched, still the base


def channel_delta(row: ChannelRow, lower: bool, base: ChannelRow) -> Delta | None:
    """The delta of channel fields ``row`` over ``base``, what Redis's hash holds: the fields
    the rule changes (by "lower": each the safe way over the base, the lower ``ats`` or free
    units, the higher level) and the fields the hash then holds (``row``'s own tuple when the
    rule took each value as it is). None when the names differ (the script takes the full
    fields then, and removes the stale ones). The definition; :data:`CHANNEL_DELTA` is its C
    twin when built (reservd._mirrorargs)."""
    fields, held = row[2], base[2]
    if len(fields) != len(held) or not fields:
        return None
    result: list[tuple[str, int]] | None = None
    changed: list[str] = []
    for i, ((name, value), (held_name, before)) in enumerate(zip(fields, held)):
        if name != held_name:
            return None
        if value == before:
            continue
        if lower:
            safe = max(value, before) if name.startswith("level") else min(value, before)
            if safe != value:
                if result is None:
                    result = list(fields)
                result[i] = (name, safe)
                value = safe
            if value == before:
                continue
        changed += (name, str(value))
    return (f"{base[0]},{base[1]}", "\n".join(changed),
            fields if result is None else tuple(result))


# What the mirror calls: the C twin when built.
CHANNEL_DELTA = compiled("reservd._mirrorargs", "channel_delta", channel_delta)


class ShownFields:
    """SKU -> the channel fields (a ChannelRow) its Redis hash holds exactly."""

    def __init__(self, skus_max: int) -> None:
        self.skus_max = skus_max
        self._rows: dict[str, ChannelRow] = {}  # least recently written first
        self.deltas_sent = 0  # rows whose channel fields went as a delta

    def __len__(self) -> int:
        return len(self._rows)

    def forget(self) -> None:
        """Redis may hold anything at or below what was sent: know nothing."""
        self._rows.clear()

    def deltas(
        self, rows: list[Change], lower: Container[str], channels: dict[str, ChannelRow],
    ) -> dict[str, Delta]:
        """Per SKU of ``rows`` whose hash is known, its delta (reservd.mirrorwrite.batch_command
        ``deltas``)."""
        known = self._rows
        deltas: dict[str, Delta] = {}
        if not known:
            return deltas
        for row in rows:
            sku = row[1]
            base, fields = known.get(sku), channels.get(sku)
            if base is not None and fields is not None:
                delta = CHANNEL_DELTA(fields, sku in lower, base)
                if delta is not None:
                    deltas[sku] = delta
        self.deltas_sent += len(deltas)
        return deltas

    def note(
        self, rows: list[Change], codes: bytes, lower: Container[str],
        channels: dict[str, ChannelRow], deltas: dict[str, Delta],
    ) -> None:
        """After a successful write of ``rows``: remember each hash's channel fields by the
        script's letter for it (``codes``, one per row)."""
        assert len(codes) == len(rows), f"{len(codes)} letters for {len(rows)} rows"
        known, skus_max = self._rows, self.skus_max
        for row, code in zip(rows, codes):
            if code == _KEPT:
                continue
            sku = row[1]
            base = known.pop(sku, None)
            fields = channels.get(sku)
            if code != _EXACT or fields is None or skus_max <= 0:
                continue
            if sku in lower:
                # Exact after a "lower" write only when it went as a delta over a known base.
                delta = deltas.get(sku)
                assert delta is not None and base is not None, (
                    f"a lower write of {sku!r} reported exact without a base")
                fields = (fields[0], fields[1], delta[2])
            known[sku] = fields
            if len(known) > skus_max:
                del known[next(iter(known))]
