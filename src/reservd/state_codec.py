"""The durable encoding of the ledger's state: what a WAL snapshot file (snap-<seq>.snap) holds.

Format 3 is a struct codec, little-endian, readable from any language and stable across Python
versions (strings are a u16 byte length and UTF-8, as in reservd.records)::

    magic "RSVDSTAT" | format u32 | seq i64
    then sections until the end: kind u8 | rows u32 | rows

    stock (1):        sku | on_hand i64 | reserved i64 | committed i64
    reservation (2):  (live ones, held or committed; formats 3 to 6 also finished ones)
                      reservation_id | channel | state u8 | allow_partial u8 | ttl_seconds i32 |
                      expires_at_ms i64 | seq i64 | finished_at_ms i64 | committed_present u8 |
                      lines u16, then per request line: sku | requested i64 | granted i64 |
                      committed i64
    owner (9):        reservation_id | owner (only reservations made by an identity; the
                      rows follow the reservations they name; older snapshots have none)
    finished (17):    idempotency records, oldest first (reservd.finished: the key and digest
                      are hashes of the id and of the request):
                      kind u8 | key 16 bytes | digest u64 | seq i64 | finished_at_ms i64, then
                      kind 1, a finished reservation: state u8 | committed_present u8 |
                      expires_at_ms i64 | channel | owner | lines u16, per request line:
                      sku | granted i64 | committed i64;
                      kind 2, an adjustment: record_type u8 | sku | on_hand i64 | reserved i64 |
                      committed i64 | previous_on_hand i64
    states (4):       sku | quarantine i64 | damaged i64 | quality_control i64
    return (5):       return_id | sku | units i64 | reservation_id | at_ms i64 | inspected u8 |
                      sellable_units i64 | damaged_units i64 | quarantine i64 | damaged i64 |
                      quality_control i64 | seq i64 (the last three and seq: right after the
                      return's last command, for an idempotent repeat's answer)
                      | inspected_at_ms i64 (format 5)
    write-off (6):    change_id | sku | units i64 | state | at_ms i64 | seq i64
    order (7):        po_id | sku | units i64 | eta_ms i64 | received i64 | closed_at_ms i64
                      (format 5)
    receipt (8):      receipt_id | po_id | units i64 | seq i64 | at_ms i64 (format 5)

    demand (10):      sku | newest_day i64 | days u16, then per day with demand: age u8 (days
                      before newest_day) | units i64 (reservd.planning: units committed per
                      UTC day, days since the epoch)
    replenishment (11): sku | lead_time_days f64 | lead_time_sigma_days f64 |
                      service_level f64 | abc_class | indices u8 | seasonal index f64 each
    count (12):       sku | at_ms i64 | system i64 | counted i64 (the SKU's last recount)

Format 5 added the retention times (the fields marked format 5) and sections 10-12; format 4
(sections 4-8 without those times: read as None, and the ledger keeps such records a whole
retention window from the restore) and format 3 (without sections 4-8) are still read.

Format 6 added sections 13-16 (reservd.rules_records: velocity buckets, rule policies, rules in
force, promotions).

Format 7 keeps finished reservations and adjustments as FINISHED rows (section 17, by key,
without their ids). Formats 3 to 6 are still read: their finished reservations were RESERVATION
rows and their adjustments ADJUSTMENT rows (3):

    adjustment (3):   adjustment_id | kind u8 | sku | value i64 | expected_present u8 |
                      expected i64 | on_hand i64 | reserved i64 | committed i64 |
                      previous_on_hand i64 | seq i64 | finished_at_ms i64

Format 8 added section 18, the ``safety_stock`` state; the states section keeps its shape.
Formats 3 to 7 are still read (no units in safety_stock).

    safety stock (18): sku | safety_stock i64

Format 2 (pickled chunks of builtin types, written before format 3) is still read, so a data
directory written by an older reservd recovers; it is never written.

Rows cross this module as plain tuples (the shapes of :func:`decode`'s docstring), so it knows
nothing of the ledger's classes.
"""
from __future__ import annotations

import pickle
import struct
from typing import Iterable, Iterator

from reservd import rules_records
from reservd.records import Reader, put_str

FORMAT = 8
_FORMATS_READ = (3, 4, 5, 6, 7, 8)
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
_STATES = struct.Struct("<qqq")
_RETURN_HEAD = struct.Struct("<q")
_RETURN = struct.Struct("<qBqqqqqq")
_WRITE_OFF = struct.Struct("<qqq")
_ORDER = struct.Struct("<qqq")
_RECEIPT = struct.Struct("<qq")
_FINISHED_HEAD = struct.Struct("<B16sQqq")
_FINISHED_RESERVATION = struct.Struct("<BBq")
_FINISHED_LINES = struct.Struct("<H")
_FINISHED_LINE = struct.Struct("<qq")
_FINISHED_ADJUSTMENT_KIND = struct.Struct("<B")
_FINISHED_ADJUSTMENT = struct.Struct("<qqqq")
_TIME = struct.Struct("<q")
_DEMAND_HEAD = struct.Struct("<qH")
_DEMAND_DAY = struct.Struct("<Bq")
_SETTINGS = struct.Struct("<ddd")
_U8 = struct.Struct("<B")
_F64 = struct.Struct("<d")
_COUNT = struct.Struct("<qqq")
_SAFETY_STOCK = struct.Struct("<q")
_SECTION_ROWS_MAX = 4096  # rows per section, so no section header needs a huge count

STOCK = 1
RESERVATION = 2
ADJUSTMENT = 3
STATES = 4
RETURN = 5
WRITE_OFF = 6
ORDER = 7
RECEIPT = 8
OWNER = 9
DEMAND = 10
REPLENISHMENT = 11
COUNT = 12
FIRST_RULES_SECTION = rules_records.VELOCITY
FINISHED = 17
SAFETY_STOCK = 18


def encode(
    seq: int,
    stock: Iterable[tuple],
    reservations: Iterable[tuple],
    adjustments: Iterable[tuple],
    states: Iterable[tuple] = (),
    returns: Iterable[tuple] = (),
    write_offs: Iterable[tuple] = (),
    orders: Iterable[tuple] = (),
    receipts: Iterable[tuple] = (),
    owners: Iterable[tuple] = (),
    demand: Iterable[tuple] = (),
    replenishment: Iterable[tuple] = (),
    counts: Iterable[tuple] = (),
    extra: Iterable[tuple[int, Iterable[tuple]]] = (),
    finished: Iterable[tuple] = (),
    safety_stock: Iterable[tuple] = (),
) -> bytes:
    """The state after ``seq`` as format-8 bytes; rows as :func:`decode` yields them.
    ``owners`` is read after ``reservations`` has been consumed; ``extra`` is (kind, rows) of
    reservd.rules_records' sections."""
    out = bytearray(_HEAD.pack(MAGIC, FORMAT, seq))
    _sections(out, STOCK, stock, _put_stock)
    _sections(out, RESERVATION, reservations, _put_reservation)
    _sections(out, OWNER, owners, _put_owner)
    _sections(out, ADJUSTMENT, adjustments, _put_adjustment)
    _sections(out, FINISHED, finished, _put_finished)
    _sections(out, STATES, states, _put_states)
    _sections(out, SAFETY_STOCK, safety_stock, _put_safety_stock)
    _sections(out, RETURN, returns, _put_return)
    _sections(out, WRITE_OFF, write_offs, _put_write_off)
    _sections(out, ORDER, orders, _put_order)
    _sections(out, RECEIPT, receipts, _put_receipt)
    _sections(out, DEMAND, demand, _put_demand)
    _sections(out, REPLENISHMENT, replenishment, _put_replenishment)
    _sections(out, COUNT, counts, _put_count)
    for kind, rows in extra:
        _sections(out, kind, rows, rules_records.SECTIONS[kind][0])
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
    - STATES: (sku, quarantine, damaged, quality_control), after the SKU's STOCK row
    - SAFETY_STOCK: (sku, safety_stock), after the SKU's STOCK row (format 8)
    - RETURN: (return_id, sku, units, reservation_id, at_ms, inspected, sellable_units,
      damaged_units, quarantine, damaged, quality_control, seq, inspected_at_ms or None)
    - WRITE_OFF: (change_id, sku, units, state, at_ms, seq)
    - ORDER: (po_id, sku, units, eta_ms, received, closed_at_ms or None)
    - RECEIPT: (receipt_id, po_id, units, seq, at_ms or None)
    - FINISHED: (1, key, digest, seq, finished_at_ms, state, committed_present, expires_at_ms,
      channel, owner, ((sku, granted, committed), ...) per request line) or
      (2, key, digest, seq, finished_at_ms, record_type, sku, on_hand, reserved, committed,
      previous_on_hand)

    - DEMAND: (sku, newest_day, [(day, units), ...])
    - REPLENISHMENT: (sku, lead_time_days, lead_time_sigma_days, service_level, abc_class,
      seasonal indices tuple)
    - COUNT: (sku, at_ms, system, counted)

    (None: a format-4 snapshot, which has no such time.)
    - rules_records.VELOCITY, RULE_POLICY, RULE_ACTIVE, PROMOTION: the rows of
      reservd.velocity, reservd.rules and reservd.promotions

    ValueError, naming the offset, for anything that does not parse exactly.
    """
    if payload[: len(MAGIC)] != MAGIC:
        return _decode_legacy(payload)
    try:
        _, version, seq = _HEAD.unpack_from(payload)
    except struct.error:
        raise ValueError("snapshot header is truncated") from None
    if version not in _FORMATS_READ:
        raise ValueError(
            f"snapshot format {version} is not one this reservd reads ({_LEGACY_FORMAT} to "
            f"{FORMAT}): it was written by a newer reservd"
        )
    return seq, _rows(payload, version)


class _SnapshotReader(Reader):
    __slots__ = ("timed",)


def _rows(payload: bytes, version: int) -> Iterator[tuple[int, tuple]]:
    reader = _SnapshotReader(payload)
    reader.timed = version >= 5  # rows carry their retention times
    reader.offset = _HEAD.size
    readers = {
        STOCK: _read_stock, RESERVATION: _read_reservation, OWNER: _read_owner,
        ADJUSTMENT: _read_adjustment,
        STATES: _read_states, SAFETY_STOCK: _read_safety_stock, RETURN: _read_return,
        WRITE_OFF: _read_write_off, ORDER: _read_order, RECEIPT: _read_receipt,
        FINISHED: _read_finished,
        DEMAND: _read_demand, REPLENISHMENT: _read_replenishment, COUNT: _read_count,
        **{kind: read for kind, (_, read) in rules_records.SECTIONS.items()},
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


def _put_finished(parts: list, row: tuple) -> None:
    kind, key, digest, seq, finished_at_ms, *rest = row
    parts.append(_FINISHED_HEAD.pack(kind, key, digest, seq, finished_at_ms))
    if kind == 1:
        state, committed_present, expires_at_ms, channel, owner, lines = rest
        parts.append(_FINISHED_RESERVATION.pack(state, committed_present, expires_at_ms))
        put_str(parts, channel)
        put_str(parts, owner)
        parts.append(_FINISHED_LINES.pack(len(lines)))
        for sku, granted, committed in lines:
            put_str(parts, sku)
            parts.append(_FINISHED_LINE.pack(granted, committed))
    else:
        record_type, sku, on_hand, reserved, committed, previous_on_hand = rest
        parts.append(_FINISHED_ADJUSTMENT_KIND.pack(record_type))
        put_str(parts, sku)
        parts.append(_FINISHED_ADJUSTMENT.pack(on_hand, reserved, committed, previous_on_hand))


def _read_finished(reader: Reader) -> tuple:
    head = reader.unpack(_FINISHED_HEAD)
    if head[0] == 1:
        state, committed_present, expires_at_ms = reader.unpack(_FINISHED_RESERVATION)
        channel = reader.text()
        owner = reader.text()
        (count,) = reader.unpack(_FINISHED_LINES)
        lines = tuple((reader.text(), *reader.unpack(_FINISHED_LINE)) for _ in range(count))
        return (*head, state, bool(committed_present), expires_at_ms, channel, owner, lines)
    if head[0] != 2:
        raise ValueError(f"unknown finished record kind {head[0]} at {reader.offset}")
    (record_type,) = reader.unpack(_FINISHED_ADJUSTMENT_KIND)
    sku = reader.text()
    return (*head, record_type, sku, *reader.unpack(_FINISHED_ADJUSTMENT))


def _put_states(parts: list, row: tuple) -> None:
    sku, quarantine, damaged, quality_control = row
    put_str(parts, sku)
    parts.append(_STATES.pack(quarantine, damaged, quality_control))


def _read_states(reader: Reader) -> tuple:
    return (reader.text(), *reader.unpack(_STATES))


def _put_safety_stock(parts: list, row: tuple) -> None:
    sku, units = row
    put_str(parts, sku)
    parts.append(_SAFETY_STOCK.pack(units))


def _read_safety_stock(reader: Reader) -> tuple:
    return (reader.text(), *reader.unpack(_SAFETY_STOCK))


def _put_return(parts: list, row: tuple) -> None:
    (return_id, sku, units, reservation_id, at_ms, inspected, sellable, damaged, quarantine_then,
     damaged_then, quality_control_then, seq, inspected_at_ms) = row
    put_str(parts, return_id)
    put_str(parts, sku)
    parts.append(_RETURN_HEAD.pack(units))
    put_str(parts, reservation_id)
    parts.append(_RETURN.pack(at_ms, inspected, sellable, damaged, quarantine_then,
                              damaged_then, quality_control_then, seq))
    parts.append(_TIME.pack(inspected_at_ms))


def _read_return(reader: Reader) -> tuple:
    return_id = reader.text()
    sku = reader.text()
    (units,) = reader.unpack(_RETURN_HEAD)
    reservation_id = reader.text()
    at_ms, inspected, *rest = reader.unpack(_RETURN)
    return (return_id, sku, units, reservation_id, at_ms, bool(inspected), *rest,
            _time(reader))


def _time(reader: _SnapshotReader) -> int | None:
    """A format-5 retention time (unix ms), None in a format-4 row."""
    return reader.unpack(_TIME)[0] if reader.timed else None


def _put_write_off(parts: list, row: tuple) -> None:
    change_id, sku, units, state, at_ms, seq = row
    put_str(parts, change_id)
    put_str(parts, sku)
    put_str(parts, state)
    parts.append(_WRITE_OFF.pack(units, at_ms, seq))


def _read_write_off(reader: Reader) -> tuple:
    change_id = reader.text()
    sku = reader.text()
    state = reader.text()
    units, at_ms, seq = reader.unpack(_WRITE_OFF)
    return (change_id, sku, units, state, at_ms, seq)


def _put_order(parts: list, row: tuple) -> None:
    po_id, sku, units, eta_ms, received, closed_at_ms = row
    put_str(parts, po_id)
    put_str(parts, sku)
    parts.append(_ORDER.pack(units, eta_ms, received))
    parts.append(_TIME.pack(closed_at_ms))


def _read_order(reader: Reader) -> tuple:
    return (reader.text(), reader.text(), *reader.unpack(_ORDER), _time(reader))


def _put_receipt(parts: list, row: tuple) -> None:
    receipt_id, po_id, units, seq, at_ms = row
    put_str(parts, receipt_id)
    put_str(parts, po_id)
    parts.append(_RECEIPT.pack(units, seq))
    parts.append(_TIME.pack(at_ms))


def _read_receipt(reader: Reader) -> tuple:
    return (reader.text(), reader.text(), *reader.unpack(_RECEIPT), _time(reader))


def _put_demand(parts: list, row: tuple) -> None:
    sku, newest_day, entries = row
    put_str(parts, sku)
    parts.append(_DEMAND_HEAD.pack(newest_day, len(entries)))
    parts.extend(_DEMAND_DAY.pack(newest_day - day, units) for day, units in entries)


def _read_demand(reader: Reader) -> tuple:
    sku = reader.text()
    newest_day, count = reader.unpack(_DEMAND_HEAD)
    entries = []
    for _ in range(count):
        age, units = reader.unpack(_DEMAND_DAY)
        entries.append((newest_day - age, units))
    return (sku, newest_day, entries)


def _put_replenishment(parts: list, row: tuple) -> None:
    sku, lead_time, lead_sigma, level, abc_class, seasonal = row
    put_str(parts, sku)
    parts.append(_SETTINGS.pack(lead_time, lead_sigma, level))
    put_str(parts, abc_class)
    parts.append(_U8.pack(len(seasonal)))
    parts.extend(_F64.pack(value) for value in seasonal)


def _read_replenishment(reader: Reader) -> tuple:
    sku = reader.text()
    lead_time, lead_sigma, level = reader.unpack(_SETTINGS)
    abc_class = reader.text()
    (count,) = reader.unpack(_U8)
    seasonal = tuple(reader.unpack(_F64)[0] for _ in range(count))
    return (sku, lead_time, lead_sigma, level, abc_class, seasonal)


def _put_count(parts: list, row: tuple) -> None:
    sku, at_ms, system, counted = row
    put_str(parts, sku)
    parts.append(_COUNT.pack(at_ms, system, counted))


def _read_count(reader: Reader) -> tuple:
    return (reader.text(), *reader.unpack(_COUNT))


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
