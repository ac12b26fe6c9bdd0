"""Each SKU's stock states at any sequence the change ring still holds, for WatchStock updates
and the Redis mirror, which read the ring after the fact.

A ring entry carries a SKU's counters and the sum of its unsellable states as of its sequence;
the breakdown (quarantine, damaged, quality_control, safety_stock, incoming) changes only by a
state command (ReceiveReturn, Inspect, WriteOff, HoldStock, ExpectReceipt, Receive), never by a
Reserve. So the ledger records, at each state command, the SKU's breakdown before and after it,
and a reader asks for the breakdown at an entry's sequence. Nothing is recorded on the Reserve
path.

A SKU with nothing recorded has no units in any state (every state command records, and a
snapshot's restore records each SKU's states as of the snapshot), so the mirror and watchers
pay no lookup of the live states for the SKUs that never had any (most of them).

Bound: an entry older than the ring's oldest entry can never be asked for (a reader behind the
ring re-reads the current state instead), so each SKU keeps its entries from the last one at or
before the ring's oldest sequence on: at most one per SKU that ever changed state plus one per
state command the ring still holds (``watch_ring_capacity``); ``reservd_state_history_entries``.
Every SKU is pruned, not only the one of the next state command (a SKU that gets none keeps
one entry), at each state command and on the expiry tick (reservd.ledger._prune).
"""
from __future__ import annotations

from collections import deque

Breakdown = tuple[int, int, int, int, int]  # quarantine, damaged, quality_control, safety_stock, incoming
NONE: Breakdown = (0, 0, 0, 0, 0)
NONE_TEXT = "0,0,0,0,0"


class StateHistory:
    """``at(sku, seq)``: the SKU's breakdown right after ``seq`` (any ``seq`` at or after the
    ring's oldest entry); :data:`NONE` for a SKU with nothing recorded."""

    def __init__(self) -> None:
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

    def seed(self, sku: str, breakdown: Breakdown) -> None:
        """A snapshot's restore: ``sku`` has ``breakdown`` as of the snapshot (before any
        sequence a reader can ask for), the one entry the SKU keeps until its next command."""
        assert sku not in self._by_sku, f"sku {sku!r} seeded twice"
        self._by_sku[sku] = deque([(0, breakdown, breakdown)])
        self.entries += 1

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
            return NONE
        for entry_seq, before, after in reversed(kept):
            if entry_seq <= seq:
                return after
        return kept[0][1]  # before the oldest change kept: what it started from

    def text_at(self, sku: str, seq: int) -> str:
        """:meth:`at` as the mirror sends it: "quarantine,damaged,quality_control,
        safety_stock,incoming"."""
        if sku not in self._by_sku:
            return NONE_TEXT
        return "%d,%d,%d,%d,%d" % self.at(sku, seq)
