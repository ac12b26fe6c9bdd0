"""Idempotency records of finished reservations and of stock adjustments, kept compactly.

A reservation that was released, expired or fulfilled, and every SetStock/AdjustStock, leaves a
record that answers a retry with the same id for ``retention_seconds``: the same payload replays
the outcome as it stands, another payload is ALREADY_EXISTS. Such records are most of what a busy
reservd keeps (``retained_max``, 20 M by default), so none holds a Python object: each is one
packed record in :class:`FinishedTable` (the C ``reservd._cfinished`` or its twin
``reservd._pyfinished``), keyed by a hash of its id, and the id itself is not kept.

**Keys.** The key is 128 bits of BLAKE2b of the id (the two id spaces apart by personalisation),
computed in C beside the C tables (ext/reservd/blake2b.h) and by hashlib beside their twins.
Two ids kept at once share a key with probability at most n^2 / 2^129 for n records: with the
retained_max of 20 M plus 5 M live reservations, n = 2.5e7, that is 1e-24; checking every new id
against 20 M kept ones at 10,000 ids/s for ten years (3e12 ids) still gives 3e12 * 2e7 / 2^128 =
2e-19. BLAKE2b is collision resistant without a secret (a deliberate collision costs ~2^64
hashes; hitting another client's id, 2^128), so ids chosen by clients change nothing, and the key
is the same in every process: snapshots carry keys, not ids. A collision would make one id answer
as the other (a replay or ALREADY_EXISTS), never grant stock twice.

**Payload digest.** 64 bits of BLAKE2b over the request as the client sent it (SKUs, requested
quantities, channel, TTL, allow_partial; or kind, SKU, value, expected_on_hand): equal digests
replay, different ones are ALREADY_EXISTS. A retry with a different payload passes as a replay
with probability 2^-64.

**Layout** (little-endian, 8-byte aligned; the C table reads only the header)::

    header (48):  kind u8 (1 reservation, 2 adjustment) | state u8 | flags u8 | pad u8 |
                  word u32 | key 16 bytes | digest u64 | seq i64 | finished_at_ms i64
    reservation:  state = ReservationState; flags 1: committed, 2: inline; word = origin
                  (the ledger's interned (channel, owner) index); expires_at_ms i64, then
                  inline (one line): handle u32 | granted u32                   (64 bytes)
                  else: lines u32 | pad u32, per request line: handle u32 | granted u32 |
                        committed u32, padded to 8                  (64 + 12 per line)
    adjustment:   state = RecordType (SET_STOCK, ADJUST_STOCK); word = handle; on_hand i64 |
                  reserved i64 | committed i64 | previous_on_hand i64            (80 bytes)

Lines are kept per request line, in request order, so a replayed Reserve answers each line's
grant, and GetReservation still shows what a finished reservation held or committed. Handles are
the counter table's (valid for one process; snapshots carry SKU names). Quantities fit in u32
(quantity_max is 10^6); a handle past u32 (over 4 billion SKU slots) fails loudly.
"""
from __future__ import annotations

import os
import struct
from typing import Iterator, NamedTuple, Protocol

KIND_RESERVATION = 1
KIND_ADJUSTMENT = 2
_HEADER = struct.Struct("<BBBxI16sQqq")
_INLINE_LINE = struct.Struct("<qII")
_LINES = struct.Struct("<qI4x")
_LINE = struct.Struct("<III")
_ADJUSTMENT = struct.Struct("<qqqq")
_FLAG_COMMITTED = 1
_FLAG_INLINE = 2
_U32_MAX = (1 << 32) - 1


class FinishedTable(Protocol):
    """Packed records by 16-byte key, oldest first (see reservd._cfinished)."""

    reservations: int  # records of kind 1 kept
    adjustments: int  # records of kind 2 kept

    def __len__(self) -> int: ...
    def add(self, record: bytes) -> None: ...
    def get(self, key: bytes) -> bytes | None: ...
    def reservation(self, reservation_id: str) -> bytes | None: ...  # hash and probe at once
    def adjustment(self, adjustment_id: str) -> bytes | None: ...
    def oldest_ms(self) -> int | None: ...
    def forget(self, horizon_ms: int) -> int: ...
    def raw(self) -> bytes: ...


class FinishedReservation(NamedTuple):
    """A finished reservation's record, decoded; ``lines``: (handle, granted, committed) per
    request line (committed 0 when never committed)."""

    digest: int
    seq: int
    finished_at_ms: int
    state: int
    origin: int
    expires_at_ms: int
    committed: bool
    lines: tuple[tuple[int, int, int], ...]


class FinishedAdjustment(NamedTuple):
    """A stock adjustment's record, decoded: its outcome right after it was applied."""

    digest: int
    seq: int
    finished_at_ms: int
    kind: int
    handle: int
    on_hand: int
    reserved: int
    committed: int
    previous_on_hand: int


def _text(parts: list, text: str) -> None:
    data = text.encode()
    parts.append(struct.pack("<I", len(data)))
    parts.append(data)


def reserve_digest(request: tuple) -> int:
    """Digest of a Reserve's payload: ``(skus, requested, channel, ttl_seconds, allow_partial)``."""
    skus, requested, channel, ttl_seconds, allow_partial = request
    parts: list[bytes] = [struct.pack("<I", len(skus))]
    for sku, quantity in zip(skus, requested):
        _text(parts, sku)
        parts.append(struct.pack("<q", quantity))
    _text(parts, channel)
    parts.append(struct.pack("<qB", ttl_seconds, bool(allow_partial)))
    return _digest(parts)


def adjustment_digest(request: tuple) -> int:
    """Digest of a stock change's payload: ``(kind, sku, value, expected_on_hand or None)``."""
    kind, sku, value, expected = request
    parts: list[bytes] = [struct.pack("<B", int(kind))]
    _text(parts, sku)
    parts.append(struct.pack("<qBq", value, expected is not None, expected or 0))
    return _digest(parts)


def _digest(parts: list[bytes]) -> int:
    return payload_digest(b"".join(parts))


def pack_reservation(key: bytes, record: FinishedReservation) -> bytes:
    lines = record.lines
    flags = _FLAG_COMMITTED if record.committed else 0
    if len(lines) == 1 and lines[0][0] <= _U32_MAX and (
        not record.committed or lines[0][2] == lines[0][1]
    ):
        handle, granted, _ = lines[0]
        return _HEADER.pack(
            KIND_RESERVATION, record.state, flags | _FLAG_INLINE, record.origin, key,
            record.digest, record.seq, record.finished_at_ms,
        ) + _INLINE_LINE.pack(record.expires_at_ms, handle, granted)
    parts = [
        _HEADER.pack(
            KIND_RESERVATION, record.state, flags, record.origin, key, record.digest,
            record.seq, record.finished_at_ms,
        ),
        _LINES.pack(record.expires_at_ms, len(lines)),
    ]
    parts.extend(_LINE.pack(*line) for line in lines)
    parts.append(bytes(-12 * len(lines) % 8))
    return b"".join(parts)


def pack_adjustment(key: bytes, record: FinishedAdjustment) -> bytes:
    return _HEADER.pack(
        KIND_ADJUSTMENT, record.kind, 0, record.handle, key, record.digest, record.seq,
        record.finished_at_ms,
    ) + _ADJUSTMENT.pack(
        record.on_hand, record.reserved, record.committed, record.previous_on_hand
    )


def unpack(record: bytes) -> tuple[bytes, FinishedReservation | FinishedAdjustment]:
    """(key, the decoded record)."""
    kind, state, flags, word, key, digest, seq, finished_at_ms = _HEADER.unpack_from(record)
    if kind == KIND_ADJUSTMENT:
        return key, FinishedAdjustment(
            digest, seq, finished_at_ms, state, word,
            *_ADJUSTMENT.unpack_from(record, _HEADER.size),
        )
    if flags & _FLAG_INLINE:
        expires_at_ms, handle, granted = _INLINE_LINE.unpack_from(record, _HEADER.size)
        lines: tuple = ((handle, granted, granted if flags & _FLAG_COMMITTED else 0),)
    else:
        expires_at_ms, count = _LINES.unpack_from(record, _HEADER.size)
        offset = _HEADER.size + _LINES.size
        lines = tuple(
            _LINE.unpack_from(record, offset + i * _LINE.size) for i in range(count)
        )
    return key, FinishedReservation(
        digest, seq, finished_at_ms, state, word, expires_at_ms,
        bool(flags & _FLAG_COMMITTED), lines,
    )


def record_size(record: bytes, offset: int = 0) -> int:
    """Bytes of the record starting at ``offset``, from its header."""
    kind, flags = record[offset], record[offset + 2]
    if kind == KIND_ADJUSTMENT:
        return _HEADER.size + _ADJUSTMENT.size
    if flags & _FLAG_INLINE:
        return _HEADER.size + _INLINE_LINE.size
    (count,) = struct.unpack_from("<I", record, offset + _HEADER.size + 8)
    return _HEADER.size + _LINES.size + (12 * count + 7) // 8 * 8


def records(raw: bytes) -> Iterator[tuple[bytes, FinishedReservation | FinishedAdjustment]]:
    """(key, record) for each record of ``raw`` (:meth:`FinishedTable.raw`), oldest first."""
    view = memoryview(raw)
    offset = 0
    while offset < len(raw):
        size = record_size(raw, offset)
        yield unpack(view[offset : offset + size])
        offset += size


def _load():
    if os.environ.get("RESERVD_NO_EXT") == "1":
        from reservd import _pyfinished as implementation

        return implementation
    try:
        from reservd import _cfinished as implementation
    except ImportError:
        if os.environ.get("RESERVD_REQUIRE_EXT") == "1":
            raise
        from reservd import _pyfinished as implementation
    return implementation


_implementation = _load()
Table = _implementation.FinishedTable
# BLAKE2b: in C beside the C table, hashlib beside its twin (the same bytes either way).
reservation_key = _implementation.reservation_key
adjustment_key = _implementation.adjustment_key
payload_digest = _implementation.payload_digest
