"""Pure-Python twin of the C counter table (ext/reservd/_ctable.pyx): the fallback without a C compiler.

Same class name, behaviour and exceptions as ``reservd._ctable.Table`` (tests/test_table.py runs
both side by side against a reference model); written for reading, not speed. The design notes
(handles, the three phases of a bulk mutation, which errors are bugs) are in ext/reservd/_ctable.pyx.
All counters are in units of stock items.
"""
from __future__ import annotations

from typing import Iterator, Sequence

RESERVE_OK = 0
RESERVE_INSUFFICIENT = 1
RESERVE_UNKNOWN_SKU = 2
RESERVE_FINISHED = 3

SHARDS_MAX = 1 << 16
RING_CAPACITY_MAX = 1 << 24

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1


def _int64(value: object, name: str) -> int:
    if not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise OverflowError(f"{name} {value} does not fit in int64")
    return value


def _lines(values: Sequence, name: str) -> Sequence:
    # A str is a sequence of characters: reserve("SKU-1", ...) would reserve SKUs "S", "K", ...
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of lines, not {type(values).__name__}")
    return values if isinstance(values, (list, tuple)) else list(values)




class Table:
    """Sharded SKU -> (on_hand, reserved, committed) counters with a bounded change ring.

    ``shards``: a power of two up to SHARDS_MAX; ``ring_capacity``: change entries retained, a
    power of two up to RING_CAPACITY_MAX.
    """

    def __init__(self, shards: int = 64, ring_capacity: int = 65536) -> None:
        shard_count = _int64(shards, "shards")
        capacity = _int64(ring_capacity, "ring_capacity")
        if shard_count < 1 or shard_count > SHARDS_MAX or shard_count & (shard_count - 1):
            raise ValueError(f"shards must be a power of two in [1, {SHARDS_MAX}], not {shards}")
        if capacity < 1 or capacity > RING_CAPACITY_MAX or capacity & (capacity - 1):
            raise ValueError(
                f"ring_capacity must be a power of two in [1, {RING_CAPACITY_MAX}], "
                f"not {ring_capacity}"
            )
        self.shards = shard_count
        self._shard_bits = shard_count.bit_length() - 1
        self._shard_mask = shard_count - 1
        self._index: list[dict[str, int]] = [{} for _ in range(shard_count)]
        self._names: list[list[str]] = [[] for _ in range(shard_count)]
        self._rows: list[list[list[int]]] = [[] for _ in range(shard_count)]
        self._unsellable_rows: list[list[int]] = [[] for _ in range(shard_count)]
        self._ring_capacity = capacity
        self._ring: list[tuple[int, ...]] = []  # grows to capacity, then reused
        self._head = 0
        self._seq_last = INT64_MIN

    def __len__(self) -> int:
        return sum(len(names) for names in self._names)

    # -- internals --------------------------------------------------------------------------

    def _find(self, sku: str) -> int:
        if type(sku) is not str:
            raise TypeError(f"sku must be a str, not {type(sku).__name__}")
        shard = hash(sku) & self._shard_mask
        slot = self._index[shard].get(sku)
        return -1 if slot is None else slot << self._shard_bits | shard

    def _handle(self, handle: int) -> int:
        if not isinstance(handle, int):
            raise TypeError(f"handle must be an int, not {type(handle).__name__}")
        if handle < 0 or handle >> self._shard_bits >= len(self._rows[handle & self._shard_mask]):
            raise IndexError(f"handle {handle} names no SKU")
        return handle

    def _row(self, handle: int) -> list[int]:
        return self._rows[handle & self._shard_mask][handle >> self._shard_bits]

    def _available(self, handle: int) -> int:
        on_hand, reserved, committed = self._row(handle)
        return on_hand - reserved - committed - self._unsellable_of(handle)

    def _unsellable_of(self, handle: int) -> int:
        return self._unsellable_rows[handle & self._shard_mask][handle >> self._shard_bits]

    def _sku_of(self, handle: int) -> str:
        return self._names[handle & self._shard_mask][handle >> self._shard_bits]

    def _begin(self, seq: int) -> int:
        value = _int64(seq, "seq")
        if value < self._seq_last:
            raise AssertionError(f"seq {value} is older than the newest change's {self._seq_last}")
        return value

    def _append(self, seq: int, handle: int) -> None:
        entry = (seq, handle, *self._row(handle), self._unsellable_of(handle))
        if len(self._ring) < self._ring_capacity:
            self._ring.append(entry)
        else:
            self._ring[self._head % self._ring_capacity] = entry
        self._head += 1
        self._seq_last = seq

    def _check_row(self, handle: int) -> None:
        on_hand, reserved, committed = self._row(handle)
        if on_hand < 0 or reserved < 0 or committed < 0:
            raise AssertionError(
                f"counters of SKU {self._sku_of(handle)!r} went negative: on_hand={on_hand}, "
                f"reserved={reserved}, committed={committed}"
            )

    def _available_tuple(self, handles: list[int]) -> tuple[int, ...]:
        return tuple(self._available(h) if h >= 0 else 0 for h in handles)

    def _bulk(self, op: str, handles, amounts, committed, seq) -> None:
        """release / commit / uncommit / fulfil: resolve, check, apply."""
        seq = self._begin(seq)
        name = "held" if op == "commit" else "quantities"
        handles = _lines(handles, "handles")
        amounts = _lines(amounts, name)
        n = len(handles)
        if len(amounts) != n:
            raise ValueError(f"{n} handles but {len(amounts)} {name}")
        if op == "commit":
            committed = _lines(committed, "committed")
            if len(committed) != n:
                raise ValueError(f"{n} handles but {len(committed)} committed")
        # 1. resolve
        lines = []
        for i in range(n):
            handle = self._handle(handles[i])
            amount = _int64(amounts[i], name)
            if amount < 0:
                raise AssertionError(f"{name}[{i}] is negative: {amount}")
            moved = 0
            if op == "commit":
                moved = _int64(committed[i], "committed")
                if moved < 0 or moved > amount:
                    raise AssertionError(
                        f"committed[{i}] = {moved} is not within [0, held = {amount}]"
                    )
            lines.append((handle, amount, moved))
        # 2. check: each op takes amount from reserved or committed.
        pending: dict[int, int] = {}
        for handle, amount, _ in lines:
            on_hand, reserved, committed_now = self._row(handle)
            taken_from = {
                "release": reserved,
                "commit": reserved,
                "uncommit": committed_now,
                "fulfil": committed_now,
            }[op]
            taken = pending.get(handle, 0)
            if taken_from - taken < amount:
                raise AssertionError(
                    f"{op} of {amount} would take a counter of SKU {self._sku_of(handle)!r} "
                    f"below zero: on_hand={on_hand}, reserved={reserved}, "
                    f"committed={committed_now}, taken by earlier lines={taken}"
                )
            pending[handle] = taken + amount
        # 3. apply
        for handle, amount, moved in lines:
            if amount == 0:
                continue  # changes nothing (for commit, moved <= held = 0), appends nothing
            row = self._row(handle)
            if op == "release":
                row[1] -= amount
            elif op == "commit":
                row[1] -= amount
                row[2] += moved
            elif op == "uncommit":
                row[2] -= amount
            else:
                row[2] -= amount
                row[0] -= min(amount, row[0])  # a shortfall: less on_hand than committed
            self._check_row(handle)
            self._append(seq, handle)

    # -- lookups ----------------------------------------------------------------------------

    def lookup(self, sku: str) -> int:
        return self._find(sku)

    def ensure(self, sku: str) -> int:
        handle = self._find(sku)
        if handle >= 0:
            return handle
        sku.encode()  # the C table keeps names as UTF-8: a lone surrogate is UnicodeEncodeError
        shard = hash(sku) & self._shard_mask
        slot = len(self._rows[shard])
        self._rows[shard].append([0, 0, 0])
        self._unsellable_rows[shard].append(0)
        self._names[shard].append(sku)
        self._index[shard][sku] = slot
        return slot << self._shard_bits | shard

    def sku(self, handle: int) -> str:
        return self._sku_of(self._handle(handle))

    def counters(self, handle: int) -> tuple[int, int, int]:
        on_hand, reserved, committed = self._row(self._handle(handle))
        return (on_hand, reserved, committed)

    def stock(self, skus: Sequence[str]) -> list[tuple[int, int, int] | None]:
        result: list[tuple[int, int, int] | None] = []
        for sku in _lines(skus, "skus"):
            handle = self._find(sku)
            result.append(None if handle < 0 else self.counters(handle))
        return result

    def items(self) -> Iterator[tuple[str, int, int, int]]:
        """Every SKU, shard by shard, slot by slot (the C table's order)."""
        for shard in range(self.shards):
            slot = 0
            while slot < len(self._rows[shard]):
                on_hand, reserved, committed = self._rows[shard][slot]
                yield (self._names[shard][slot], on_hand, reserved, committed)
                slot += 1

    # -- mutations ----------------------------------------------------------------------------

    def reserve(
        self, skus: Sequence[str], quantities: Sequence[int], allow_partial: bool, seq: int,
        finished=None, reservation_id: str | None = None,
    ) -> tuple:
        """See Table.reserve in ext/reservd/_ctable.pyx."""
        if finished is not None:
            kept = finished.reservation(reservation_id)
            if kept is not None:
                return (RESERVE_FINISHED, kept, None, None)
        seq = self._begin(seq)
        partial = bool(allow_partial)
        skus = _lines(skus, "skus")
        quantities = _lines(quantities, "quantities")
        n = len(skus)
        if len(quantities) != n:
            raise ValueError(f"{n} skus but {len(quantities)} quantities")
        if n == 0:
            raise ValueError("reserve needs at least one line")
        # 1. resolve
        handles: list[int] = []
        wanted: list[int] = []
        for i in range(n):
            handles.append(self._find(skus[i]))
            quantity = _int64(quantities[i], "quantities")
            if quantity < 1:
                raise AssertionError(f"quantities[{i}] is not positive: {quantity}")
            wanted.append(quantity)
        nothing = (0,) * n
        if -1 in handles:
            return (RESERVE_UNKNOWN_SKU, tuple(handles), nothing, self._available_tuple(handles))
        # 2. check, against what the call's earlier lines take from the same SKU
        pending: dict[int, int] = {}
        granted: list[int] = []
        for handle, quantity in zip(handles, wanted):
            free = self._available(handle) - pending.get(handle, 0)
            if partial:
                grant = min(quantity, max(free, 0))
            elif quantity <= free:
                grant = quantity
            else:
                break
            granted.append(grant)
            pending[handle] = pending.get(handle, 0) + grant
        if len(granted) < n or not any(granted):
            return (RESERVE_INSUFFICIENT, tuple(handles), nothing, self._available_tuple(handles))
        # 3. apply
        for handle, grant in zip(handles, granted):
            if grant == 0:
                continue
            self._row(handle)[1] += grant
            self._check_row(handle)
            self._append(seq, handle)
        return (RESERVE_OK, tuple(handles), tuple(granted), self._available_tuple(handles))

    def release(self, handles: Sequence[int], quantities: Sequence[int], seq: int) -> None:
        self._bulk("release", handles, quantities, None, seq)

    def commit(
        self, handles: Sequence[int], held: Sequence[int], committed: Sequence[int], seq: int
    ) -> None:
        self._bulk("commit", handles, held, committed, seq)

    def uncommit(self, handles: Sequence[int], quantities: Sequence[int], seq: int) -> None:
        self._bulk("uncommit", handles, quantities, None, seq)

    def fulfil(self, handles: Sequence[int], quantities: Sequence[int], seq: int) -> None:
        self._bulk("fulfil", handles, quantities, None, seq)

    def set_on_hand(self, handle: int, on_hand: int, seq: int) -> int:
        seq = self._begin(seq)
        handle = self._handle(handle)
        value = _int64(on_hand, "on_hand")
        row = self._row(handle)
        previous = row[0]
        if value < 0:
            raise ValueError(f"on_hand must be >= 0, not {value}")
        row[0] = value
        self._check_row(handle)
        if value != previous:
            self._append(seq, handle)
        return previous

    def adjust_on_hand(self, handle: int, delta: int, seq: int) -> int:
        seq = self._begin(seq)
        handle = self._handle(handle)
        change = _int64(delta, "delta")
        row = self._row(handle)
        if row[0] + change > INT64_MAX:
            raise OverflowError(f"on_hand {row[0]} + {change} does not fit in int64")
        if row[0] + change < 0:
            raise ValueError(
                f"adjusting on_hand of SKU {self._sku_of(handle)!r} by {change} would make it "
                f"{row[0] + change}"
            )
        row[0] += change
        self._check_row(handle)
        if change != 0:
            self._append(seq, handle)
        return row[0]

    def touch(self, handle: int, seq: int) -> None:
        seq = self._begin(seq)
        self._append(seq, self._handle(handle))

    def touch_all(self, seq: int) -> None:
        seq = self._begin(seq)
        for shard, names in enumerate(self._names):
            for slot in range(len(names)):
                self._append(seq, slot << self._shard_bits | shard)

    def unsellable(self, handle: int) -> int:
        return self._unsellable_of(self._handle(handle))

    def move_unsellable(
        self, handle: int, on_hand_delta: int, unsellable_delta: int, seq: int
    ) -> tuple[int, int]:
        """See Table.move_unsellable in ext/reservd/_ctable.pyx."""
        seq = self._begin(seq)
        handle = self._handle(handle)
        d_on_hand = _int64(on_hand_delta, "on_hand_delta")
        d_unsellable = _int64(unsellable_delta, "unsellable_delta")
        row = self._row(handle)
        on_hand = row[0] + d_on_hand
        unsellable = self._unsellable_of(handle) + d_unsellable
        if on_hand > INT64_MAX or unsellable > INT64_MAX:
            raise OverflowError(
                f"moving stock of SKU {self._sku_of(handle)!r} does not fit in int64"
            )
        if on_hand < 0 or unsellable < 0:
            raise ValueError(
                f"moving stock of SKU {self._sku_of(handle)!r} by on_hand {d_on_hand:+d}, "
                f"unsellable {d_unsellable:+d} would make on_hand={on_hand}, "
                f"unsellable={unsellable}"
            )
        row[0] = on_hand
        self._unsellable_rows[handle & self._shard_mask][handle >> self._shard_bits] = unsellable
        self._check_row(handle)
        if d_on_hand != 0 or d_unsellable != 0:
            self._append(seq, handle)
        return (on_hand, unsellable)

    def restore(
        self, sku: str, on_hand: int, reserved: int, committed: int, unsellable: int = 0
    ) -> int:
        on_hand = _int64(on_hand, "on_hand")
        unsellable = _int64(unsellable, "unsellable")
        reserved = _int64(reserved, "reserved")
        committed = _int64(committed, "committed")
        if on_hand < 0 or reserved < 0 or committed < 0 or unsellable < 0:
            raise ValueError(
                f"negative counters for SKU {sku!r}: on_hand={on_hand}, "
                f"reserved={reserved}, committed={committed}"
            )
        if reserved + committed > INT64_MAX:
            raise ValueError(f"reserved + committed of SKU {sku!r} exceeds int64")
        handle = self.ensure(sku)
        self._row(handle)[:] = [on_hand, reserved, committed]
        self._unsellable_rows[handle & self._shard_mask][handle >> self._shard_bits] = unsellable
        return handle

    # -- change ring --------------------------------------------------------------------------

    @property
    def ring_head(self) -> int:
        return self._head

    @property
    def ring_tail(self) -> int:
        return max(0, self._head - self._ring_capacity)

    def changes(
        self, position: int, limit: int, seq_max: int
    ) -> tuple[int, list[tuple[int, str, int, int, int, int]]]:
        position = _int64(position, "position")
        limit = _int64(limit, "limit")
        seq_max = _int64(seq_max, "seq_max")
        if position > self._head:
            raise ValueError(f"position {position} is beyond ring_head {self._head}")
        if limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        position = max(position, self.ring_tail)
        result = []
        while position < self._head and len(result) < limit:
            seq, handle, *counters = self._ring[position % self._ring_capacity]
            if seq > seq_max:
                break
            result.append((seq, self._sku_of(handle), *counters))
            position += 1
        return position, result

    def position_after(self, seq: int) -> int:
        seq = _int64(seq, "seq")
        low, high = self.ring_tail, self._head
        while low < high:
            middle = (low + high) // 2
            if self._ring[middle % self._ring_capacity][0] > seq:
                high = middle
            else:
                low = middle + 1
        return low
