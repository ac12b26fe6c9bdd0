"""Compact in-memory storage of live (held or committed) reservations: one ``bytes`` record each.

A reservation kept as a NamedTuple of tuples of Python ints and strs costs close to a kilobyte;
as one packed record under its id it costs the record, the id and a dict slot. The store is a
mapping whose values are decoded on access (:class:`Reservation`), so the ledger reads and
writes whole values and never sees the layout. Finished reservations and stock adjustments are
kept smaller still, without their ids (reservd.finished). :class:`Fifo` is the retention queue
of the other id-keyed records (reservd.stockstates, reservd.incoming).

SKUs are kept as counter-table handles (the table keeps each SKU's name once) and the (channel,
owner) pair as an index into an interned list, so no record holds a str of its own. Records are immutable bytes: a
shallow copy of a store's dict (``raw()``) is a consistent snapshot that can be decoded later in
a worker thread (handles and channel indexes never change meaning).

Layouts (little-endian):

- reservation: state u8 | flags u8 (1: allow_partial, 2: committed) | lines u16 |
  (channel, owner) u32 |
  ttl_seconds i32 | expires_at_ms i64 | seq i64 | finished_at_ms i64, then per request line:
  handle i64 | requested i64 | granted i64 | committed i64.
"""
from __future__ import annotations

import enum
import struct
from array import array
from collections.abc import Iterator, MutableMapping
from typing import NamedTuple

_RESERVATION = struct.Struct("<BBHIiqqq")
_LINE = struct.Struct("<qqqq")
_ALLOW_PARTIAL = 1
_COMMITTED = 2


class State(enum.IntEnum):
    """A reservation's life; numbers match reservd.v1.ReservationState."""

    HELD = 1
    COMMITTED = 2
    RELEASED = 3
    EXPIRED = 4
    FULFILLED = 5


_STATES = (None, *State)  # state number -> State, without Enum.__call__ per decode


class Reservation(NamedTuple):
    """One reservation, as decoded from its record. Immutable: a change stores a new one."""

    reservation_id: str
    channel: str
    # (skus, requested, channel, ttl_seconds, allow_partial): the idempotency key. None once
    # finished: a finished reservation keeps only its digest (reservd.finished).
    request: tuple | None
    skus: tuple[str, ...]  # lines that hold units (granted > 0)
    handles: tuple[int, ...]
    quantities: tuple[int, ...]  # units held or, once committed, units granted
    committed: tuple[int, ...] | None
    state: State
    expires_at_ms: int
    seq: int  # sequence of the latest mutation of this reservation
    finished_at_ms: int  # unix ms; 0 while live
    owner: str = ""  # the identity that made it ("" with authorization off)


class StockOutcome(NamedTuple):
    sku: str
    on_hand: int
    reserved: int
    committed: int
    previous_on_hand: int
    shortfall: int
    seq: int
    replayed: bool


class ReservationStore(MutableMapping):
    """reservation_id -> :class:`Reservation`, stored as one bytes record each."""

    def __init__(self, table) -> None:
        self._table = table
        self._records: dict[str, bytes] = {}
        # Interned (channel, owner) pairs: few distinct ones, so a record keeps one u32 for both.
        self._origins: list[tuple[str, str]] = []
        self._origin_index: dict[tuple[str, str], int] = {}
        # The last record decoded and its view: a mutation reads the same record two or three
        # times (find, apply, answer). Records are immutable, so identity is enough. One
        # attribute holding a pair, read and replaced whole: snapshot encoding decodes in a
        # worker thread.
        self._cached: tuple[bytes | None, Reservation | None] = (None, None)

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __contains__(self, reservation_id: object) -> bool:
        return reservation_id in self._records

    def __getitem__(self, reservation_id: str) -> Reservation:
        return self.decode(reservation_id, self._records[reservation_id])

    def get(self, reservation_id: str, default=None):
        data = self._records.get(reservation_id)
        return default if data is None else self.decode(reservation_id, data)

    def __setitem__(self, reservation_id: str, reservation: Reservation) -> None:
        assert reservation.state in (State.HELD, State.COMMITTED), reservation
        self._records[reservation_id] = self._encode(reservation)

    def __delitem__(self, reservation_id: str) -> None:
        del self._records[reservation_id]

    def raw(self) -> list[tuple[str, bytes]]:
        """A consistent copy of the records (cheap); decode each with :meth:`decode`."""
        return list(self._records.items())

    def request_lines(self, reservation_id: str) -> tuple[tuple[int, int, int], ...]:
        """(handle, granted, committed) per request line, in request order."""
        data = self._records[reservation_id]
        return tuple(
            (handle, given, moved)
            for handle, _, given, moved in _LINE.iter_unpack(memoryview(data)[_RESERVATION.size:])
        )

    def origin_of(self, index: int) -> tuple[str, str]:
        """The (channel, owner) pair interned as ``index`` (finished records keep the index)."""
        return self._origins[index]

    def origin(self, channel: str, owner: str) -> int:
        """The index of the (channel, owner) pair, interning it."""
        return self._origin(channel, owner)

    def _origin(self, channel: str, owner: str) -> int:
        origin = (channel, owner)
        index = self._origin_index.get(origin)
        if index is None:
            index = len(self._origins)
            self._origins.append(origin)
            self._origin_index[origin] = index
        return index

    def _encode(self, reservation: Reservation) -> bytes:
        skus, requested, channel, ttl_seconds, allow_partial = reservation.request
        flags = (_ALLOW_PARTIAL if allow_partial else 0) | (
            _COMMITTED if reservation.committed is not None else 0
        )
        parts = [
            _RESERVATION.pack(
                reservation.state, flags, len(skus), self._origin(channel, reservation.owner),
                ttl_seconds,
                reservation.expires_at_ms, reservation.seq, reservation.finished_at_ms,
            )
        ]
        committed = reservation.committed or (0,) * len(reservation.skus)
        if reservation.skus == skus:  # every line holds units: the common case
            pack = _LINE.pack
            parts.extend(
                pack(handle, asked, given, moved)
                for handle, asked, given, moved in zip(
                    reservation.handles, requested, reservation.quantities, committed
                )
            )
            return b"".join(parts)
        held = {
            sku: line
            for sku, *line in zip(
                reservation.skus, reservation.handles, reservation.quantities, committed
            )
        }
        lookup = self._table.lookup
        for sku, asked in zip(skus, requested):
            handle, given, moved = held.get(sku) or (lookup(sku), 0, 0)
            assert handle >= 0, f"reservation {reservation.reservation_id!r}: unknown sku {sku!r}"
            parts.append(_LINE.pack(handle, asked, given, moved))
        return b"".join(parts)

    def decode(self, reservation_id: str, data: bytes) -> Reservation:
        cached_data, cached_view = self._cached
        if data is cached_data and cached_view.reservation_id == reservation_id:
            return cached_view
        (state, flags, count, origin_index, ttl_seconds, expires_at_ms, seq,
         finished_at_ms) = _RESERVATION.unpack_from(data)
        sku_of = self._table.sku
        skus, requested, held_skus, handles, granted, committed = [], [], [], [], [], []
        for handle, asked, given, moved in _LINE.iter_unpack(
            memoryview(data)[_RESERVATION.size:]
        ):
            sku = sku_of(handle)
            skus.append(sku)
            requested.append(asked)
            if given:
                held_skus.append(sku)
                handles.append(handle)
                granted.append(given)
                committed.append(moved)
        assert len(skus) == count, (reservation_id, len(skus), count)
        channel, owner = self._origins[origin_index]
        view = Reservation(
            reservation_id, channel,
            (tuple(skus), tuple(requested), channel, ttl_seconds, bool(flags & _ALLOW_PARTIAL)),
            tuple(held_skus), tuple(handles), tuple(granted),
            tuple(committed) if flags & _COMMITTED else None,
            _STATES[state], expires_at_ms, seq, finished_at_ms, owner,
        )
        self._cached = (data, view)
        return view


class Fifo:
    """Ids in the order they finished, with their unix ms: the retention queue.

    Two flat arrays and a head index instead of a deque of tuples: 16 bytes per entry (the id
    str is the one the store keys by). Popping is O(1) amortised: the consumed prefix is cut off
    once it is the larger half.
    """

    __slots__ = ("_times", "_keys", "_head")

    def __init__(self) -> None:
        self._times = array("q")
        self._keys: list[str] = []
        self._head = 0

    def __len__(self) -> int:
        return len(self._keys) - self._head

    def append(self, at_ms: int, key: str) -> None:
        self._times.append(at_ms)
        self._keys.append(key)

    def oldest_ms(self) -> int | None:
        return self._times[self._head] if self._head < len(self._keys) else None

    def oldest_key(self) -> str | None:
        return self._keys[self._head] if self._head < len(self._keys) else None

    def popleft(self) -> tuple[int, str]:
        head = self._head
        entry = (self._times[head], self._keys[head])
        self._keys[head] = ""  # drop the reference now
        self._head = head + 1
        if self._head * 2 >= len(self._keys) and self._head >= 1024:
            del self._times[: self._head]
            del self._keys[: self._head]
            self._head = 0
        return entry

    def sort(self) -> None:
        """Order by time (after a snapshot restore appended in any order)."""
        entries = sorted(zip(self._times[self._head :], self._keys[self._head :]))
        self._times = array("q", (at_ms for at_ms, _ in entries))
        self._keys = [key for _, key in entries]
        self._head = 0
