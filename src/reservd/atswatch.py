"""WatchAts: each channel's ``ats`` per SKU, streamed when it or its level changes.

``ats`` is computed only for what somebody watches, and at the one moment the state it belongs
to exists: right after the mutation at ``seq`` was applied (``on_applied``, called by the ledger
synchronously, before anything else runs). A SKU the mutation touched (read from the table's
change ring) or a pair a channel change touched (``Channels.touched``) is recomputed for each
watched channel; a value that differs from the last one computed for that pair goes into a
bounded ring, tagged with ``seq``. ``on_durable`` hands the ring's durable entries to the
watchers, the same ``pb.Ats`` object to every watcher of that pair (encoded once). Nobody
tracked costs one attribute check per mutation (the ledger's hook is unset).

Memory per watcher is bounded: its buffer keeps the latest value per (sku, channel) pair (a slow
reader gets it coalesced: an update replaces the pair's waiting one and moves to the end, so
each pair stays in sequence order); a buffer over ``ats_buffer_updates_max`` pairs is dropped,
and the watcher gets every pair's current value, marked ``snapshot``, once its stream drains.
A watcher resuming after a sequence the ring still holds (and whose pairs were watched since)
gets exactly what it missed; otherwise the current values first.

While reservd fails closed, every value is sent with ``stale`` set: each watcher gets one marker
per channel (``sku`` empty, ``stale`` true) when it closes and one (``stale`` false) when it
reopens.
"""
from __future__ import annotations

import asyncio
import collections
from typing import AsyncIterator

from reservd.futures import SharedFuture
from reservd.v1 import reservd_pb2 as pb
from reservd.watchers import Sleeper, TooManyStreams, admit


class TooManyAtsWatchers(TooManyStreams):
    """``ats_watchers_max`` streams are open already."""


class AtsWatcher(Sleeper):
    __slots__ = ("channels", "skus", "buffer", "needs_snapshot", "floor")

    def __init__(self, channels: frozenset[str], skus: frozenset[str] | None) -> None:
        super().__init__()
        self.channels = channels
        self.skus = skus
        self.buffer: dict[tuple[str, str], pb.Ats] = {}
        self.needs_snapshot = False
        self.floor = 0  # it has every value up to this sequence: older ones are not sent


class AtsHub:
    """Every WatchAts stream: ``open``, iterate ``updates_of``, ``release``."""

    def __init__(self, ledger, channels, table, config, guard) -> None:
        self.ledger = ledger
        self.channels = channels
        self.table = table
        self.guard = guard
        self.watchers_max = config.ats_watchers_max
        self.buffer_max = config.ats_buffer_updates_max
        self.ring: collections.deque[tuple[int, str, str, int, int]] = collections.deque(
            maxlen=config.ats_ring_capacity
        )
        self.durable_seq = ledger.seq
        self.closed = False
        self.stale = False
        self._position = table.ring_head
        self._sent = 0  # ring entries (by count ever appended) already handed out
        self._appended = 0
        self._watchers: set[AtsWatcher] = set()
        # What is tracked: channels for every SKU, and sku -> channels. A pair stays tracked
        # after its last watcher leaves, so a sync worker that reconnects resumes without a
        # snapshot; beyond ats_tracked_pairs_max only what is watched now stays tracked.
        self.tracked_max = config.ats_tracked_pairs_max
        self._all: set[str] = set()
        self._by_sku: dict[str, set[str]] = {}
        # The last value computed per tracked pair, and since which sequence it is tracked.
        self._last: dict[tuple[str, str], tuple[int, int]] = {}
        self._since: dict[tuple[str, str], int] = {}
        self._durable: asyncio.Future | None = None
        self.updates = 0  # metrics: reservd_ats_updates_total, reservd_ats_snapshots_total
        self.snapshots = 0
        guard.add_listener(self._serving_changed)

    def __len__(self) -> int:
        return len(self._watchers)

    @property
    def tracked(self) -> int:
        return len(self._last)

    @property
    def buffered(self) -> int:
        return sum(len(watcher.buffer) for watcher in self._watchers)

    # -- the ledger's side --------------------------------------------------------------------

    def on_applied(self, seq: int) -> None:
        """The mutation ``seq`` was just applied (nothing else ran since)."""
        table = self.table
        position, changes = table.changes(self._position, 1 << 30, seq)
        self._position = position
        touched = self.channels.touched
        pairs: set[tuple[str | None, str | None]] = {(sku, None) for _, sku, *_ in changes}
        pairs.update(touched)
        touched.clear()
        for sku, channel in sorted(pairs, key=lambda pair: (pair[0] or "", pair[1] or "")):
            if sku is not None:
                self._recompute(seq, sku, channel)
            elif channel in self._all:
                for every_sku, _ in table_skus(table):
                    self._recompute(seq, every_sku, channel)
            else:
                for watched_sku, watched in self._by_sku.items():
                    if channel in watched:
                        self._recompute(seq, watched_sku, channel)

    def _recompute(self, seq: int, sku: str, only: str | None) -> None:
        channels = set(self._all)
        by_sku = self._by_sku.get(sku)
        if by_sku:
            channels.update(by_sku)
        if only is not None:
            channels &= {only}
        if not channels:
            return
        book, last = self.channels, self._last
        available = book.available(sku)
        if available is None:
            return
        for channel in sorted(channels):
            value = book.ats_of(sku, channel, available)
            key = (sku, channel)
            now = (value.ats, int(value.level))
            if last.get(key) != now:
                last[key] = now
                self.ring.append((seq, sku, channel, value.ats, int(value.level)))
                self._appended += 1

    def on_durable(self, seq: int) -> None:
        self.durable_seq = seq
        ring = self.ring
        pending = self._appended - self._sent
        if pending > len(ring):
            # More changed at once than the ring holds: everyone starts over from a snapshot.
            self._sent = self._appended - len(ring)
            for watcher in self._watchers:
                self._overflow(watcher)
            pending = len(ring)
        start = len(ring) - pending
        index = start
        woken: set[AtsWatcher] = set()
        while index < len(ring) and ring[index][0] <= seq:
            entry_seq, sku, channel, ats, level = ring[index]
            update = pb.Ats(
                sku=sku, channel=channel, ats=ats, level=level, sequence=entry_seq,
                stale=self.stale,
            )
            for watcher in self._watchers:
                if channel in watcher.channels and (watcher.skus is None or sku in watcher.skus):
                    self._offer(watcher, update)
                    woken.add(watcher)
            index += 1
        self._sent += index - start
        for watcher in woken:
            watcher._wake()
        durable, self._durable = self._durable, None
        if durable is not None and not durable.done():
            durable.set_result(None)

    def _offer(self, watcher: AtsWatcher, update: pb.Ats) -> None:
        if watcher.needs_snapshot or (update.sku and update.sequence <= watcher.floor):
            return  # its snapshot carries (or carried) this value or a newer one
        buffer = watcher.buffer
        key = (update.sku, update.channel)
        buffer.pop(key, None)
        buffer[key] = update
        self.updates += 1
        if len(buffer) > self.buffer_max:
            self._overflow(watcher)

    def _overflow(self, watcher: AtsWatcher) -> None:
        watcher.buffer = {}
        watcher.needs_snapshot = True
        watcher._wake()

    def _serving_changed(self, serving: bool) -> None:
        self.stale = not serving
        seq = self.ledger.seq
        for watcher in self._watchers:
            for channel in sorted(watcher.channels):
                self._offer(watcher, pb.Ats(channel=channel, sequence=seq, stale=self.stale))
            watcher._wake()

    def close(self) -> None:
        self.closed = True
        for watcher in self._watchers:
            watcher._wake()
        durable, self._durable = self._durable, None
        if durable is not None and not durable.done():
            durable.set_result(None)

    # -- watchers -----------------------------------------------------------------------------

    def open(
        self, channels: frozenset[str], skus: frozenset[str] | None, from_sequence: int
    ) -> AtsWatcher:
        admit(len(self._watchers), self.watchers_max, "WatchAts", "ats_watchers_max",
              TooManyAtsWatchers)
        watcher = AtsWatcher(channels, skus)
        resumable = 0 < from_sequence <= self.durable_seq and self._retained(
            watcher, from_sequence
        )
        self._watch(watcher, self.ledger.seq)
        if resumable:
            watcher.floor = from_sequence
            for entry_seq, sku, channel, ats, level in self.ring:
                if from_sequence < entry_seq <= self.durable_seq and channel in channels and (
                    skus is None or sku in skus
                ):
                    self._offer(watcher, pb.Ats(
                        sku=sku, channel=channel, ats=ats, level=level, sequence=entry_seq,
                        stale=self.stale,
                    ))
        else:
            watcher.needs_snapshot = True
        self._watchers.add(watcher)
        self._tracking(True)
        return watcher

    def _retained(self, watcher: AtsWatcher, from_sequence: int) -> bool:
        """Every change after ``from_sequence`` to the watcher's pairs is in the ring."""
        ring = self.ring
        # Once the ring has dropped entries, only a resume point at or after its oldest
        # sequence is sure to have lost nothing after it.
        if self._appended > len(ring) and (not ring or ring[0][0] > from_sequence):
            return False
        since = self._since
        if watcher.skus is None:
            return all(
                since.get((None, channel), 1 << 63) <= from_sequence
                for channel in watcher.channels
            )
        return all(
            min(since.get((sku, channel), 1 << 63), since.get((None, channel), 1 << 63))
            <= from_sequence
            for sku in watcher.skus for channel in watcher.channels
        )

    def _watch(self, watcher: AtsWatcher, seq: int) -> None:
        since = self._since
        if watcher.skus is None:
            self._all.update(watcher.channels)
            for channel in watcher.channels:
                since.setdefault((None, channel), seq)
        else:
            for sku in watcher.skus:
                self._by_sku.setdefault(sku, set()).update(watcher.channels)
                for channel in watcher.channels:
                    since.setdefault((sku, channel), seq)
        self._seed_last(watcher)

    def _seed_last(self, watcher: AtsWatcher) -> None:
        """Start tracking the watcher's pairs from their current values (no ring entry: a
        watcher that needs a value it has not seen gets a snapshot)."""
        book, last = self.channels, self._last
        skus = watcher.skus if watcher.skus is not None else [s for s, _ in table_skus(self.table)]
        for sku in skus:
            available = book.available(sku)
            if available is None:
                continue
            for channel in watcher.channels:
                key = (sku, channel)
                if key not in last:
                    value = book.ats_of(sku, channel, available)
                    last[key] = (value.ats, int(value.level))

    def release(self, watcher: AtsWatcher) -> None:
        """The stream ended; its pairs stay tracked (within ats_tracked_pairs_max)."""
        if watcher not in self._watchers:
            return
        self._watchers.discard(watcher)
        watcher.buffer = {}
        if len(self._last) > self.tracked_max:
            self._untrack()

    def _untrack(self) -> None:
        """Track only what is watched now (a resume of anything else gets a snapshot)."""
        self._all.clear()
        self._by_sku.clear()
        self._since.clear()
        self._last.clear()
        for watcher in self._watchers:
            self._watch(watcher, self.ledger.seq)
        self._tracking(bool(self._last))

    def _tracking(self, on: bool) -> None:
        """Hook into the ledger only while something is tracked: otherwise a mutation costs
        nothing here."""
        ledger = self.ledger
        if on and ledger.on_applied is None:
            self._position = self.table.ring_head
            ledger.on_applied = self.on_applied
        elif not on:
            ledger.on_applied = None
            self.channels.touched.clear()
        self.channels.tracking = on

    async def _until_durable(self, seq: int) -> None:
        while self.durable_seq < seq and not self.closed:
            if self._durable is None:
                self._durable = SharedFuture(loop=asyncio.get_running_loop())
            await self._durable

    async def updates_of(self, watcher: AtsWatcher) -> AsyncIterator[list[pb.Ats]]:
        """Batches for ``watcher`` until the hub closes; each batch is the caller's to send
        before asking again."""
        while not self.closed:
            if watcher.needs_snapshot:
                watcher.needs_snapshot = False
                watcher.buffer = {}
                watcher.floor = self.ledger.seq
                async for batch in self._snapshot_of(watcher):
                    yield batch
                continue
            if watcher.buffer:
                batch, watcher.buffer = list(watcher.buffer.values()), {}
                yield batch
                continue
            await watcher.sleep()

    async def _snapshot_of(self, watcher: AtsWatcher) -> AsyncIterator[list[pb.Ats]]:
        """Every pair's current value at ``seq``, sent once ``seq`` is durable; changes after
        it arrive through the buffer."""
        book, seq = self.channels, self.ledger.seq
        self.snapshots += 1
        skus = sorted(watcher.skus) if watcher.skus is not None else [
            sku for sku, _ in table_skus(self.table)
        ]
        channels = sorted(watcher.channels)
        updates = []
        for sku in skus:
            available = book.available(sku)
            if available is None:
                continue
            for channel in channels:
                value = book.ats_of(sku, channel, available)
                updates.append(pb.Ats(
                    sku=sku, channel=channel, ats=value.ats, level=int(value.level),
                    sequence=seq, stale=self.stale, snapshot=True,
                ))
        await self._until_durable(seq)
        for start in range(0, len(updates), self.buffer_max):
            if self.closed:
                return
            yield updates[start:start + self.buffer_max]


def table_skus(table):
    """(sku, None) for every SKU of the table (a policy change touches them all)."""
    return ((sku, None) for sku, *_ in table.items())
