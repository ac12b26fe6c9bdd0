"""WatchStock: fans the table's change ring out to watchers, only up to the durable sequence.

One pass per durable batch: the hub reads the newly durable range of the ring once, builds one
``pb.StockUpdate`` per change that somebody watches, and appends that same object to the buffer of
each watcher of its SKU (an index SKU -> watchers, plus the all-SKU watchers). A watcher costs
nothing for changes to SKUs it does not watch.

Memory is bounded per watcher: its buffer holds at most ``watch_buffer_updates_max`` updates. A
watcher whose buffer is full (its client stopped reading, so its stream stopped taking messages)
is detached from the index and remembers its ring position; it costs nothing until its stream
drains the buffer. Then it reads on from that position by itself until it reaches the hub and is
attached again, or, if the ring has overwritten its position (it was lapped, or it resumes from a
sequence no longer retained), it gets the current state of its SKUs, marked ``snapshot`` (one per
SKU, earlier changes folded in), and continues from there. The current state of every SKU is read
once and shared by the all-SKU watchers that need it, never copied per watcher. A watcher only
ever sees durable changes, so a resume point stays valid across a crash and restart.
"""
from __future__ import annotations

import asyncio
import time
import weakref
from typing import AsyncIterator

from reservd import stockstates
from reservd.config import Config
from reservd.futures import SharedFuture
from reservd.statehistory import Breakdown
from reservd.table import CounterTable
from reservd.v1 import reservd_pb2 as pb
from reservd.watchers import Sleeper, TooManyStreams, admit

_SEQ_ALL = (1 << 63) - 1


class TooManyWatchers(TooManyStreams):
    """``watchers_max`` streams are open already."""


def _update(seq: int, sku: str, on_hand: int, reserved: int, committed: int,
            unsellable: int, snapshot: bool, states: Breakdown) -> pb.StockUpdate:
    quarantine, damaged, quality_control, safety_stock, incoming = states
    return pb.StockUpdate(
        sku=sku, on_hand=on_hand, reserved=reserved, committed=committed,
        available=stockstates.available(on_hand, reserved, committed, unsellable),
        sequence=seq, snapshot=snapshot, quarantine=quarantine, damaged=damaged,
        quality_control=quality_control, safety_stock=safety_stock, incoming=incoming,
    )


class _Snapshot:
    """The current state of every SKU at ``seq``, encoded once; the ring goes on at ``position``.
    Shared by all the all-SKU watchers that need a snapshot while one of them still streams it
    and ``position`` is retained; freed when the last of them is done with it."""

    __slots__ = ("seq", "position", "updates", "__weakref__")

    def __init__(self, seq: int, position: int, updates: list[pb.StockUpdate]) -> None:
        self.seq = seq
        self.position = position
        self.updates = updates


class Watcher(Sleeper):
    """One WatchStock stream: its SKUs (None: all), its buffer and, while detached, its ring
    position (the first entry it has not been given)."""

    __slots__ = ("skus", "buffer", "position", "attached", "needs_snapshot")

    def __init__(self, skus: frozenset[str] | None, position: int, needs_snapshot: bool) -> None:
        super().__init__()
        self.skus = skus
        self.buffer: list[pb.StockUpdate] = []
        self.position = position
        self.attached = False
        self.needs_snapshot = needs_snapshot


class WatchHub:
    """Every WatchStock stream of the daemon: ``open`` one, iterate ``updates_of`` it,
    ``release`` it; the WAL calls ``on_durable`` after each durable batch."""

    def __init__(self, table: CounterTable, ledger, config: Config | None = None) -> None:
        config = config or Config()
        self.table = table
        self.ledger = ledger
        self.watchers_max = config.watchers_max
        self.buffer_max = config.watch_buffer_updates_max
        if self.watchers_max < 0 or self.buffer_max < 1:
            raise ValueError(
                f"watchers_max must be >= 0 (not {self.watchers_max}) and "
                f"watch_buffer_updates_max >= 1 (not {self.buffer_max})"
            )
        self.durable_seq = ledger.seq
        # Sequences at or below this may be missing from the ring (it starts after recovery's
        # snapshot, if any).
        self.floor_seq = 0
        # Every ring entry before this position is durable and has been handed to the attached
        # watchers; those at or after it are not (yet) durable.
        self.position = table.ring_head
        self.closed = False
        self._watchers: set[Watcher] = set()
        self._by_sku: dict[str, set[Watcher]] = {}
        self._all: set[Watcher] = set()
        self._attached = 0
        self._durable: asyncio.Future | None = None
        # Only the watchers streaming it keep it alive: at most one table copy at a time while
        # the ring does not lap them.
        self._snapshot: weakref.ref[_Snapshot] | None = None
        # Counters read by the metrics (reservd_watch_*).
        self.lapped = 0
        self.table_snapshots = 0
        self.updates = 0
        self.fanout_seconds = 0.0

    def __len__(self) -> int:
        return len(self._watchers)

    @property
    def detached(self) -> int:
        """Watchers off the fan-out: stalled, catching up or in a snapshot."""
        return len(self._watchers) - self._attached

    @property
    def buffered(self) -> int:
        """Updates waiting in the watchers' buffers (each at most ``watch_buffer_updates_max``)."""
        return sum(len(watcher.buffer) for watcher in self._watchers)

    # -- the durable side ---------------------------------------------------------------------

    def on_durable(self, seq: int) -> None:
        """The log made everything up to ``seq`` durable: hand it to the attached watchers."""
        self.durable_seq = seq
        if self._attached:
            # CPU time of this thread, not wall time: on a busy machine the loop may be preempted.
            started = time.thread_time()
            self._fan_out()
            self.fanout_seconds += time.thread_time() - started
        else:
            # Nobody attached: detached watchers read on from their own positions.
            self.position = self.table.position_after(seq)
        durable, self._durable = self._durable, None
        if durable is not None and not durable.done():
            durable.set_result(None)

    def close(self) -> None:
        """The daemon stops: every stream ends."""
        self.closed = True
        for watcher in self._watchers:
            watcher._wake()
        durable, self._durable = self._durable, None
        if durable is not None and not durable.done():
            durable.set_result(None)

    def _fan_out(self) -> None:
        table = self.table
        by_sku, everyone, buffer_max = self._by_sku, self._all, self.buffer_max
        if self.position < table.ring_tail:
            # More became durable at once than the ring holds: every attached watcher is lapped.
            for watcher in list(everyone) + list({w for ws in by_sku.values() for w in ws}):
                self._detach(watcher, self.position)
                watcher._wake()
            self.position = table.position_after(self.durable_seq)
            return
        woken: set[Watcher] = set()
        full: list[Watcher] = []
        delivered = 0
        while by_sku or everyone:
            start = self.position
            self.position, changes = table.changes(start, buffer_max, self.durable_seq)
            if not changes:
                break
            states_at = self.ledger.state_history.at
            for offset, (seq, sku, on_hand, reserved, committed, unsellable) in enumerate(
                changes
            ):
                watchers = by_sku.get(sku)
                if watchers is None and not everyone:
                    continue
                update = _update(seq, sku, on_hand, reserved, committed, unsellable, False,
                                 states_at(sku, seq))
                for group in (watchers, everyone):
                    if not group:
                        continue
                    for watcher in group:
                        buffer = watcher.buffer
                        buffer.append(update)
                        if len(buffer) >= buffer_max:
                            full.append(watcher)
                    delivered += len(group)
                    woken.update(group)
                if full:
                    # Their streams stopped taking updates: they cost nothing from here on and
                    # read on from the next entry once they have drained their buffers.
                    for watcher in full:
                        self._detach(watcher, start + offset + 1)
                    full.clear()
        if not by_sku and not everyone:
            self.position = table.position_after(self.durable_seq)
        self.updates += delivered
        for watcher in woken:
            watcher._wake()

    # -- watchers -----------------------------------------------------------------------------

    def open(self, skus: frozenset[str] | None, from_sequence: int) -> Watcher:
        """A new watcher of ``skus`` (None: every SKU), after ``from_sequence`` (0: the current
        state first). TooManyWatchers beyond ``watchers_max``; once the hub is closed the
        watcher's updates end at once."""
        admit(len(self._watchers), self.watchers_max, "WatchStock", "watchers_max",
              TooManyWatchers)
        if from_sequence and self._retained(from_sequence):
            watcher = Watcher(skus, self.table.position_after(from_sequence), False)
        else:
            watcher = Watcher(skus, self.position, True)
        self._watchers.add(watcher)
        return watcher

    def release(self, watcher: Watcher) -> None:
        """The stream ended (the client went away or the daemon stops)."""
        if watcher in self._watchers:
            self._watchers.discard(watcher)
            if watcher.attached:
                self._detach(watcher, self.position)
            watcher.buffer = []

    def _attach(self, watcher: Watcher) -> None:
        assert not watcher.attached and watcher.position == self.position, (
            watcher.position, self.position
        )
        watcher.attached = True
        self._attached += 1
        if watcher.skus is None:
            self._all.add(watcher)
        else:
            by_sku = self._by_sku
            for sku in watcher.skus:
                watchers = by_sku.get(sku)
                if watchers is None:
                    by_sku[sku] = {watcher}
                else:
                    watchers.add(watcher)

    def _detach(self, watcher: Watcher, position: int) -> None:
        if not watcher.attached:
            return
        watcher.attached = False
        self._attached -= 1
        watcher.position = position
        if watcher.skus is None:
            self._all.discard(watcher)
        else:
            by_sku = self._by_sku
            for sku in watcher.skus:
                watchers = by_sku[sku]
                watchers.discard(watcher)
                if not watchers:
                    del by_sku[sku]

    def _retained(self, from_sequence: int) -> bool:
        table = self.table
        if from_sequence > self.durable_seq:
            return False  # a resume point from the future (another data dir): start over
        if table.ring_tail == 0:
            return from_sequence >= self.floor_seq
        _, oldest = table.changes(table.ring_tail, 1, _SEQ_ALL)
        # Entries of the oldest retained sequence may have been cut in two by the wrap.
        return bool(oldest) and from_sequence >= oldest[0][0]

    async def _until_durable(self, seq: int) -> None:
        while self.durable_seq < seq and not self.closed:
            if self._durable is None:
                self._durable = SharedFuture(loop=asyncio.get_running_loop())
            await self._durable

    async def updates_of(self, watcher: Watcher) -> AsyncIterator[list[pb.StockUpdate]]:
        """Batches of at most ``watch_buffer_updates_max`` updates for ``watcher``, in ring
        order, until the hub closes. Each batch is the caller's to send before asking again."""
        table = self.table
        while not self.closed:
            if watcher.buffer:
                batch, watcher.buffer = watcher.buffer, []
                yield batch
                continue
            if watcher.attached:
                await watcher.sleep()
                continue
            if watcher.needs_snapshot or watcher.position < table.ring_tail:
                if not watcher.needs_snapshot:
                    self.lapped += 1
                watcher.needs_snapshot = False
                async for batch in self._snapshot_of(watcher):
                    yield batch
                continue
            if watcher.position >= self.position:
                self._attach(watcher)
                continue
            # Behind the hub (resumed, or back from a stall): read on by itself, one bounded
            # step at a time, so a long way back does not hold the event loop.
            position, changes = table.changes(watcher.position, self.buffer_max, self.durable_seq)
            watcher.position = position
            skus, states_at = watcher.skus, self.ledger.state_history.at
            batch = [
                _update(seq, sku, on_hand, reserved, committed, unsellable, False,
                        states_at(sku, seq))
                for seq, sku, on_hand, reserved, committed, unsellable in changes
                if skus is None or sku in skus
            ]
            self.updates += len(batch)
            if batch:
                yield batch
            else:
                await asyncio.sleep(0)  # a yield point between steps, not a wait for time

    async def _snapshot_of(self, watcher: Watcher) -> AsyncIterator[list[pb.StockUpdate]]:
        """The current state of the watcher's SKUs, then its position is where the ring goes
        on after that state (which is durable before any of it is sent)."""
        table, ledger = self.table, self.ledger
        if watcher.skus is None:
            snapshot = self._snapshot() if self._snapshot is not None else None
            if snapshot is None or snapshot.position < table.ring_tail:
                seq = ledger.seq
                snapshot = _Snapshot(seq, table.ring_head, [
                    _update(seq, sku, on_hand, reserved, committed,
                            table.unsellable(table.lookup(sku)), True, ledger.breakdown(sku))
                    for sku, on_hand, reserved, committed in table.items()
                ])
                self._snapshot = weakref.ref(snapshot)
                self.table_snapshots += 1
            seq, position, updates = snapshot.seq, snapshot.position, snapshot.updates
        else:
            seq, position = ledger.seq, table.ring_head
            ordered = sorted(watcher.skus)
            updates = [
                _update(seq, sku, *counters, table.unsellable(table.lookup(sku)), True,
                        ledger.breakdown(sku))
                for sku, counters in zip(ordered, table.stock(ordered))
                if counters is not None
            ]
        await self._until_durable(seq)
        for start in range(0, len(updates), self.buffer_max):
            if self.closed:
                return
            yield updates[start:start + self.buffer_max]
        watcher.position = position
