"""The SKU counter table: the Cython extension (ext/reservd/_ctable.pyx) or its pure-Python twin.

Both implement :class:`CounterTable`. ``RESERVD_NO_EXT=1`` selects the twin (CI runs once that
way); ``RESERVD_REQUIRE_EXT=1`` makes a missing extension an import error (the test command sets
it so the suite cannot silently test the twin only).
"""
from __future__ import annotations

import os
from typing import Iterator, Protocol, Sequence

# Reserve statuses (business outcomes, not exceptions).
RESERVE_OK = 0
RESERVE_INSUFFICIENT = 1
RESERVE_UNKNOWN_SKU = 2
RESERVE_FINISHED = 3  # the id's finished record is kept (returned instead of handles)

Counters = tuple[int, int, int]  # (on_hand, reserved, committed)
# (sequence, sku, on_hand, reserved, committed, unsellable)
Change = tuple[int, str, int, int, int, int]


class CounterTable(Protocol):
    """Sharded SKU -> (on_hand, reserved, committed) int64 counters.

    ``available`` is always derived, here and only here (reservd.stockstates.available mirrors
    it for the service): ``on_hand - reserved - committed - unsellable``, where ``unsellable``
    counts units on hand but not sellable (quarantine, damaged, quality_control). A *handle* is an int
    naming one SKU's slot; it stays valid for the table's life, so the ledger keeps handles in
    its reservations and never looks a SKU up twice. Every mutation is applied synchronously and
    atomically (there is no await inside), carries the sequence number of the mutation that
    caused it, and appends one entry per SKU it changed to the bounded change ring that
    WatchStock and the mirror read. Invariant violations (a counter going negative) raise
    AssertionError: they are bugs, not outcomes.
    """

    shards: int

    def __len__(self) -> int: ...
    def lookup(self, sku: str) -> int: ...
    def ensure(self, sku: str) -> int: ...
    def sku(self, handle: int) -> str: ...
    def counters(self, handle: int) -> Counters: ...
    def stock(self, skus: Sequence[str]) -> list[Counters | None]: ...
    def reserve(
        self, skus: Sequence[str], quantities: Sequence[int], allow_partial: bool, seq: int,
        finished=None, reservation_id: str | None = None,
    ) -> tuple: ...
    def release(self, handles: Sequence[int], quantities: Sequence[int], seq: int) -> None: ...
    def commit(
        self, handles: Sequence[int], held: Sequence[int], committed: Sequence[int], seq: int
    ) -> None: ...
    def uncommit(self, handles: Sequence[int], quantities: Sequence[int], seq: int) -> None: ...
    def fulfil(self, handles: Sequence[int], quantities: Sequence[int], seq: int) -> None: ...
    def set_on_hand(self, handle: int, on_hand: int, seq: int) -> int: ...
    def adjust_on_hand(self, handle: int, delta: int, seq: int) -> int: ...
    def unsellable(self, handle: int) -> int: ...
    def move_unsellable(
        self, handle: int, on_hand_delta: int, unsellable_delta: int, seq: int
    ) -> tuple[int, int]: ...
    def touch(self, handle: int, seq: int) -> None: ...
    def touch_all(self, seq: int) -> None: ...
    def restore(
        self, sku: str, on_hand: int, reserved: int, committed: int, unsellable: int = 0
    ) -> int: ...
    def items(self) -> Iterator[tuple[str, int, int, int]]: ...

    @property
    def ring_head(self) -> int: ...
    @property
    def ring_tail(self) -> int: ...
    def changes(self, position: int, limit: int, seq_max: int) -> tuple[int, list[Change]]: ...
    def position_after(self, seq: int) -> int: ...


def _load():
    if os.environ.get("RESERVD_NO_EXT") == "1":
        from reservd._pytable import Table

        return Table, False
    try:
        from reservd._ctable import Table
    except ImportError:
        if os.environ.get("RESERVD_REQUIRE_EXT") == "1":
            raise
        from reservd._pytable import Table

        return Table, False
    return Table, True


Table, EXTENSION = _load()
