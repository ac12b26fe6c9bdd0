"""The durable encoding of the ledger's state: what a WAL snapshot file (snap-<seq>.snap) holds.

Format 3 is a struct codec, little-endian, readable from any language and stable across Python
versions (strings are a u16 byte length and UTF-8, as in reservd.records)::

    magic "RSVDSTAT" | format u32 | seq i64
    then sections until the end: kind u8 | rows u32 | rows

    stock (1):        sku | on_hand i64 | reserved i64 | committed i64
    reservation (2):  reservation_id | channel | state u8 | allow_partial u8 | ttl_seconds i32 |
                      expires_at_ms i64 | seq i64 | finished_at_ms i64 | committed_present u8 |
                      lines u16, then per request line: sku | requested i64 | granted i64 |
                      committed i64
    owner (4):        reservation_id | owner (only reservations made by an identity; the
                      rows follow the reservations they name; older snapshots have none)
    adjustment (3):   adjustment_id | kind u8 | sku | value i64 | expected_present u8 |
                      expected i64 | on_hand i64 | reserved i64 | committed i64 |
                      previous_on_hand i64 | seq i64 | finished_at_ms i64

Format 2 (pickled chunks of builtin types, written before format 3) is still read, so a data
directory written by an older reservd recovers; it is never written.

Rows cross this module as plain tuples (the shapes of :func:`decode`'s docstring), so it knows
nothing of the ledger's classes.
"""
from __future__ import annotations

import pickle
import struct
from typing import Iterable, Iterator

from reservd.records import Reader, put_str

FORMAT = 3
MAGIC = b"RSVDSTAT"
_HEAD = struct.Struct("<8sIq")
_SECTION = struct.Struct("<BI")
_STOCK = struct.Struct("<qqq")
_RESERVATION = struct.Struct("<BBiqqqBH")
_LINE = struct.Struct("<qqq")
_ADJUSTMENT_HEAD = struct.Struct("<B")
_ADJUSTMENT = struct.Struct("<qBqqqqqqq")
_LEGACY_FORMAT = 2
_LEGACY_CHUNK = struct.Struct("<I")
_SECTION_ROWS_MAX = 4096  # rows per section, so no section header needs a huge count

STOCK = 1
RESERVATION = 2
ADJUSTMENT = 3
OWNER = 4


def encode(
    seq: int,
    stock: Iterable[tuple],
    reservations: Iterable[tuple],
    adjustments: Iterable[tuple],
    owners: Iterable[tuple] = (),
) -> bytes:
    """The state after ``seq`` as format-3 bytes; rows as :func:`decode` yields them.
    ``owners`` is read after ``reservations`` has been consumed."""
    out = bytearray(_HEAD.pack(MAGIC, FORMAT, seq))
    _sections(out, STOCK, stock, _put_stock)
    _sections(out, RESERVATION, reservations, _put_reservation)
    _sections(out, OWNER, owners, _put_owner)
    _sections(out, ADJUSTMENT, adjustments, _put_adjustment)
    return bytes(out)


def decode(payload: bytes) -> tuple[int, Iterator[tuple[int, tuple]]]:
    """(seq, rows): rows yields (kind, row) in file order, one at a time, where row is

    - STOCK: (sku, on_hand, reserved, committed)
    - RESERVATION: (reservation_id, channel, (skus, requested, channel, ttl_seconds,
      allow_partial), held_skus, granted, committed or None, state, expires_at_ms, seq,
      finished_at_ms), held_skus and granted being the lines with granted > 0
    - OWNER: (reservation_id, owner), after that reservation's row
    - ADJUSTMENT: (adjustment_id, kind, (sku, value, expected_on_hand or None),
      (sku, on_hand, reserved, committed, previous_on_hand, shortfall, seq, False),
      finished_at_ms)

    ValueError, naming the offset, for anything that does not parse exactly.
    """
    if payload[: len(MAGIC)] != MAGIC:
        return _decode_legacy(payload)
    try:
        _, version, seq = _HEAD.unpack_from(payload)
    except struct.error:
        raise ValueError("snapshot header is truncated") from None
    if version != FORMAT:
        raise ValueError(
            f"snapshot format {version} is not one this reservd reads ({_LEGACY_FORMAT} or "
            f"{FORMAT}): it was written by a newer reservd"
        )
    return seq, _rows(payload)


def _rows(payload: bytes) -> Iterator[tuple[int, tuple]]:
    reader = Reader(payload)
    reader.offset = _HEAD.size
    readers = {
        STOCK: _read_stock, RESERVATION: _read_reservation, OWNER: _read_owner,
        ADJUSTMENT: _read_adjustment,
    }
    try:
        while reader.offset < len(payload):
            kind, count = reader.unpack(_SECTION)
            read = readers.get(kind)
            if read is None:
                raise ValueError(f"unknown snapshot section kind {kind} at {reader.offset}")
            for _ in range(count):
                yield kind, read(reader)
    except struct.error:
        raise ValueError(f"snapshot is truncated at offset {reader.offset}") from None


def _sections(out: bytearray, kind: int, rows: Iterable[tuple], put) -> None:
    batch: list[tuple] = []
    for row in rows:
        batch.append(row)
        if len(batch) == _SECTION_ROWS_MAX:
            _section(out, kind, batch, put)
            batch = []
    if batch:
        _section(out, kind, batch, put)


def _section(out: bytearray, kind: int, rows: list[tuple], put) -> None:
    parts: list[bytes] = [_SECTION.pack(kind, len(rows))]
    for row in rows:
        put(parts, row)
    out.extend(b"".join(parts))


def _put_stock(parts: list, row: tuple) -> None:
    sku, on_hand, reserved, committed = row
    put_str(parts, sku)
    parts.append(_STOCK.pack(on_hand, reserved, committed))


def _read_stock(reader: Reader) -> tuple:
    return (reader.text(), *reader.unpack(_STOCK))


def _put_owner(parts: list, row: tuple) -> None:
    reservation_id, owner = row
    put_str(parts, reservation_id)
    put_str(parts, owner)


def _read_owner(reader: Reader) -> tuple:
    return (reader.text(), reader.text())


def _put_reservation(parts: list, row: tuple) -> None:
    (reservation_id, channel, request, held_skus, granted, committed, state, expires_at_ms,
     seq, finished_at_ms) = row
    skus, requested, _, ttl_seconds, allow_partial = request
    put_str(parts, reservation_id)
    put_str(parts, channel)
    parts.append(_RESERVATION.pack(
        state, allow_partial, ttl_seconds, expires_at_ms, seq, finished_at_ms,
        committed is not None, len(skus),
    ))
    given = dict(zip(held_skus, granted))
    moved = dict(zip(held_skus, committed)) if committed is not None else {}
    for sku, asked in zip(skus, requested):
        put_str(parts, sku)
        parts.append(_LINE.pack(asked, given.get(sku, 0), moved.get(sku, 0)))


def _read_reservation(reader: Reader) -> tuple:
    reservation_id = reader.text()
    channel = reader.text()
    (state, allow_partial, ttl_seconds, expires_at_ms, seq, finished_at_ms, committed_present,
     count) = reader.unpack(_RESERVATION)
    skus, requested, held_skus, granted, committed = [], [], [], [], []
    for _ in range(count):
        sku = reader.text()
        asked, given, moved = reader.unpack(_LINE)
        skus.append(sku)
        requested.append(asked)
        if given:
            held_skus.append(sku)
            granted.append(given)
            committed.append(moved)
    request = (tuple(skus), tuple(requested), channel, ttl_seconds, bool(allow_partial))
    return (
        reservation_id, channel, request, tuple(held_skus), tuple(granted),
        tuple(committed) if committed_present else None, state, expires_at_ms, seq,
        finished_at_ms,
    )


def _put_adjustment(parts: list, row: tuple) -> None:
    adjustment_id, kind, (sku, value, expected), outcome, finished_at_ms = row
    _, on_hand, reserved, committed, previous_on_hand, _, seq, _ = outcome
    put_str(parts, adjustment_id)
    parts.append(_ADJUSTMENT_HEAD.pack(kind))
    put_str(parts, sku)
    parts.append(_ADJUSTMENT.pack(
        value, expected is not None, expected or 0, on_hand, reserved, committed,
        previous_on_hand, seq, finished_at_ms,
    ))


def _read_adjustment(reader: Reader) -> tuple:
    adjustment_id = reader.text()
    (kind,) = reader.unpack(_ADJUSTMENT_HEAD)
    sku = reader.text()
    (value, expected_present, expected, on_hand, reserved, committed, previous_on_hand, seq,
     finished_at_ms) = reader.unpack(_ADJUSTMENT)
    outcome = (
        sku, on_hand, reserved, committed, previous_on_hand,
        max(0, reserved + committed - on_hand), seq, False,
    )
    return (
        adjustment_id, kind, (sku, value, expected if expected_present else None), outcome,
        finished_at_ms,
    )


def _decode_legacy(payload: bytes) -> tuple[int, Iterator[tuple[int, tuple]]]:
    """Format 2: length-prefixed pickled (kind, rows) chunks of builtin types."""
    chunks = []
    view = memoryview(payload)
    offset = 0
    while offset < len(view):
        (length,) = _LEGACY_CHUNK.unpack_from(view, offset)
        offset += _LEGACY_CHUNK.size
        # Our own checksummed files, holding only builtin types.
        chunks.append(pickle.loads(view[offset : offset + length]))
        offset += length
    if not chunks or chunks[0][0] != "header":
        raise ValueError("snapshot has no header")
    version, seq = chunks[0][1]
    if version != _LEGACY_FORMAT:
        raise ValueError(f"snapshot format {version} is not one this reservd reads")

    def rows() -> Iterator[tuple[int, tuple]]:
        for kind, chunk in chunks[1:]:
            if kind == "stock":
                for row in chunk:
                    yield STOCK, tuple(row)
            elif kind == "reservations":
                for row in chunk:
                    yield RESERVATION, tuple(row)
            elif kind == "adjustments":
                for adjustment_id, record_type, request_tail, outcome, finished_at_ms in chunk:
                    yield ADJUSTMENT, (
                        adjustment_id, record_type, tuple(request_tail), tuple(outcome),
                        finished_at_ms,
                    )
            else:
                raise ValueError(f"unknown snapshot chunk {kind!r}")

    return seq, rows()
