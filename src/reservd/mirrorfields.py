"""The channel fields of each change ring entry, for the Redis mirror.

The mirror shows, per SKU and per field, the least of every state a recovery could bring back
(reservd.mirrorwrite.plan). The change ring holds each entry's counters, but a channel's ``ats``
and a bucket's free units also depend on the buckets and policies of that moment, which exist
only right after the mutation. So the ledger calls :meth:`FieldJournal.on_applied` after every
mutation, and while channels are active (a channel or a bucket exists) the fields of each SKU
the mutation changed (reservd.channels.Channels.mirror_fields) are recorded by ring position.
The mirror drops what it has settled (:meth:`FieldJournal.settle`); entries that fell out of the
ring are dropped too (the mirror rewrites everything then), so the journal never holds more
than ``watch_ring_capacity`` entries. With no channel and no bucket nothing is recorded and
every entry has no channel fields.

Which way is safe, per field (:func:`safest`): ``ats:<channel>`` and ``free:<bucket>`` the
lower, ``level`` and ``level:<channel>`` the higher (more severe). A bucket missing from a state
has 0 free units there; a channel missing from a state was not configured then (nothing to show
for it).
"""
from __future__ import annotations

import collections
from typing import Iterable

from reservd.extension import compiled

Fields = tuple[tuple[str, int], ...]  # (name, value) pairs, as Channels.mirror_fields gives


class FieldsDropped(LookupError):
    """The fields of a ring position the mirror asks for are no longer kept."""


class FieldJournal:
    """Ring position -> the channel fields of that change ring entry."""

    def __init__(self, table, channels) -> None:
        self.table = table
        self.channels = channels
        self.fields: collections.deque[Fields] = collections.deque()
        self.first = table.ring_head  # ring position of fields[0]
        # Entries before this position have no fields: applied while no channel and no bucket
        # existed, or before the mirror started (recovery; its first write rewrites them all).
        self.fieldless_before = table.ring_head
        self._position = table.ring_head

    def __len__(self) -> int:
        return len(self.fields)

    def begin(self) -> None:
        """Start recording at the ring's head (the mirror starts after recovery)."""
        self.fields.clear()
        self.first = self.fieldless_before = self._position = self.table.ring_head

    def on_applied(self, seq: int) -> None:
        """The mutation ``seq`` was just applied (nothing else ran since)."""
        table = self.table
        if not self.channels.active:
            if not self.fields:
                self.first = self.fieldless_before = self._position = table.ring_head
            return
        start = max(self._position, table.ring_tail)
        if start != self.first + len(self.fields):
            self.fields.clear()  # the ring overtook us: the mirror rewrites everything
            self.first = start
        position, changes = table.changes(start, 1 << 62, seq)
        mirror_fields = self.channels.mirror_fields
        self.fields.extend(mirror_fields(change[1]) for change in changes)
        self._position = position
        self.settle(table.ring_tail)

    def at(self, position: int) -> Fields:
        """The channel fields of the ring entry at ``position``."""
        if position < self.fieldless_before:
            return ()
        index = position - self.first
        if not 0 <= index < len(self.fields):
            raise FieldsDropped(
                f"the channel fields of ring position {position} are gone (kept "
                f"{self.first}..{self.first + len(self.fields)})"
            )
        return self.fields[index]

    def keeps(self, position: int) -> bool:
        """Whether the fields of every entry from ``position`` on are still here."""
        return position >= self.first or self.fieldless_before == self.first

    def settle(self, position: int) -> None:
        """Forget the fields of every position before ``position``."""
        fields = self.fields
        while fields and self.first < position:
            fields.popleft()
            self.first += 1


def safest(states: Iterable[Fields]) -> dict[str, int]:
    """Per field, the value no higher (``level``: no lower) than in any of ``states``."""
    merged: dict[str, int] = {}
    seen: collections.Counter[str] = collections.Counter()
    count = 0
    for fields in states:
        count += 1
        for name, value in fields:
            seen[name] += 1
            old = merged.get(name)
            if old is None:
                merged[name] = value
            elif name.startswith("level"):
                merged[name] = max(old, value)
            else:
                merged[name] = min(old, value)
    for name, times in seen.items():
        if times < count and name.startswith("free:"):
            merged[name] = min(merged[name], 0)
    return merged


def safest_fields(states: list[Fields]) -> Fields:
    """:func:`safest` of two or more states as the (name, value) pairs a write sends, in the
    order the names first appear. The definition; :data:`SAFEST_FIELDS` is its C twin when
    built (reservd._mirrorargs): a hot SKU's write merges every state since its last durable
    one, dozens under a batching client."""
    return tuple(safest(states).items())


# What the mirror's plan calls: the C twin when built.
SAFEST_FIELDS = compiled("reservd._mirrorargs", "safest_fields", safest_fields)
