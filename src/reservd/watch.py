"""WatchStock: streams the table's change ring to watchers, only up to the durable sequence.

Memory is bounded by the ring, not by the watchers: a watcher holds a position in the shared
ring. One that falls so far behind that the ring has overwritten its position (or that resumes
from a sequence no longer retained) gets the current state of its SKUs instead, marked
``snapshot`` and coalesced per SKU, and continues from there. A watcher only ever sees changes
that are durable, so a resume point stays valid across a crash and restart.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

from reservd.futures import SharedFuture
from reservd.table import CounterTable

# (sku, on_hand, reserved, committed, sequence, snapshot)
Update = tuple[str, int, int, int, int, bool]

_SEQ_ALL = (1 << 63) - 1


class WatchHub:
    def __init__(self, table: CounterTable, ledger, batch_max: int = 1024) -> None:
        self.table = table
        self.ledger = ledger
        self.batch_max = batch_max
        self.durable_seq = ledger.seq
        # Sequences at or below this may be missing from the ring (it starts after recovery's
        # snapshot, if any).
        self.floor_seq = 0
        self._changed: asyncio.Future | None = None
        self.closed = False

    def on_durable(self, seq: int) -> None:
        """The log made everything up to ``seq`` durable: wake the watchers."""
        self.durable_seq = seq
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        self._changed = None

    async def _next_change(self) -> None:
        if self._changed is None:
            self._changed = SharedFuture(loop=asyncio.get_running_loop())
        await self._changed

    def _retained(self, from_sequence: int) -> bool:
        table = self.table
        if from_sequence > self.durable_seq:
            return False  # a resume point from the future (another data dir): start over
        if table.ring_tail == 0:
            return from_sequence >= self.floor_seq
        _, oldest = table.changes(table.ring_tail, 1, _SEQ_ALL)
        # Entries of the oldest retained sequence may have been cut in two by the wrap.
        return bool(oldest) and from_sequence >= oldest[0][0]

    async def updates(
        self, skus: frozenset[str] | None, from_sequence: int
    ) -> AsyncIterator[list[Update]]:
        """Batches of updates for ``skus`` (None: every SKU), after ``from_sequence``."""
        table = self.table
        if from_sequence and self._retained(from_sequence):
            position = table.position_after(from_sequence)
        else:
            position, batch = await self._current(skus)
            if batch:
                yield batch
        while not self.closed:
            if position < table.ring_tail:
                position, batch = await self._current(skus)
                if batch:
                    yield batch
                continue
            position, changes = table.changes(position, self.batch_max, self.durable_seq)
            if not changes:
                await self._next_change()
                continue
            batch = [
                (sku, on_hand, reserved, committed, seq, False)
                for seq, sku, on_hand, reserved, committed in changes
                if skus is None or sku in skus
            ]
            if batch:
                yield batch

    async def _current(self, skus: frozenset[str] | None) -> tuple[int, list[Update]]:
        """The current state of ``skus`` and the ring position that follows it, once that
        state is durable."""
        table = self.table
        seq = self.ledger.seq
        position = table.ring_head
        if skus is None:
            rows = list(table.items())
        else:
            ordered = sorted(skus)
            rows = [
                (sku, *counters)
                for sku, counters in zip(ordered, table.stock(ordered))
                if counters is not None
            ]
        while self.durable_seq < seq and not self.closed:
            await self._next_change()
        return position, [
            (sku, on_hand, reserved, committed, seq, True)
            for sku, on_hand, reserved, committed in rows
        ]
