"""Each SKU's stock states at any sequence the change ring still holds, for WatchStock updates
and the Redis mirror, which read the ring after the fact.

A ring entry carries a SKU's counters and the sum of its unsellable states as of its sequence;
the breakdown (quarantine, damaged, quality_control, safety_stock, incoming) changes only by a
state command (ReceiveReturn, Inspect, WriteOff, HoldStock, ExpectReceipt, Receive), never by a
Reserve. So the ledger records, at each state command, the SKU's breakdown before and after it,
and a reader asks for the breakdown at an entry's sequence. Nothing is recorded on the Reserve
path.

Bound: an entry older than the ring's oldest entry can never be asked for (a reader behind the
ring re-reads the current state instead), so each SKU keeps its entries from the last one at or
before the ring's oldest sequence on: at most one per SKU that ever changed state plus one per
state command the ring still holds (``watch_ring_capacity``); ``reservd_state_history_entries``.
Every SKU is pruned, not only the one of the next state command (a SKU that gets none keeps
one entry), at each state command and on the expiry tick (reservd.ledger._prune).
"""
from __future__ import annotations

from collections import deque
from typing import Callable

Breakdown = tuple[int, int, int, int, int]  # quarantine, damaged, quality_control, safety_stock, incoming
NONE: Breakdown = (0, 0, 0, 0, 0)


class StateHistory:
    """``at(sku, seq)``: the SKU's breakdown right after ``seq`` (any ``seq`` at or after the
    ring's oldest entry); ``current(sku)`` answers for a SKU with nothing recorded."""

    def __init__(self, current: Callable[[str], Breakdown]) -> None:
        self.current = current
        self._by_sku: dict[str, deque[tuple[int, Breakdown, Breakdown]]] = {}
        # (seq, sku) of each entry newer than the last pruning's horizon, oldest first: pruning
        # walks it, so a SKU that gets no more state commands is pruned too.
        self._order: deque[tuple[int, str]] = deque()
        self.entries = 0

    def record(self, sku: str, seq: int, before: Breakdown, after: Breakdown,
               horizon_seq: int) -> None:
        """The state command ``seq`` took ``sku`` from ``before`` to ``after``;
        ``horizon_seq``: the sequence of the oldest entry the ring still holds."""
        kept = self._by_sku.get(sku)
        if kept is None:
            kept = self._by_sku[sku] = deque()
        kept.append((seq, before, after))
        self._order.append((seq, sku))
        self.entries += 1
        self.prune(horizon_seq)

    def prune(self, horizon_seq: int) -> None:
        """Forget what no reader can ask for any more: no sequence before ``horizon_seq`` (the
        ring's oldest entry) is asked for. Per SKU, the last entry at or before it stays: it
        answers from ``horizon_seq`` to the next one."""
        order, by_sku = self._order, self._by_sku
        while order and order[0][0] <= horizon_seq:
            kept = by_sku[order.popleft()[1]]
            while len(kept) > 1 and kept[1][0] <= horizon_seq:
                kept.popleft()
                self.entries -= 1

    def at(self, sku: str, seq: int) -> Breakdown:
        kept = self._by_sku.get(sku)
        if kept is None:
            return self.current(sku)
        for entry_seq, before, after in reversed(kept):
            if entry_seq <= seq:
                return after
        return kept[0][1]  # before the oldest change kept: what it started from
