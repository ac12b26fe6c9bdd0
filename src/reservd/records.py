"""The commands the ledger writes to the WAL, and their binary payloads.

The log stores commands, not effects (as TigerBeetle does): replay re-applies them through the
same ledger code. Time comes from the record (``at_ms``), never from the clock at replay, and an
expiry is itself a command, so replay is deterministic.

Payloads are little-endian; strings are a u16 byte length and UTF-8. A Reserve's ``owner`` and
a stock change's ``actor`` (the caller's identity, when authorization is on) are optional
trailing strings: written only when set, so records written before them decode unchanged.
"""
from __future__ import annotations

import enum
import struct
from typing import NamedTuple

_Q = struct.Struct("<q")
_H = struct.Struct("<H")
_RESERVE_HEAD = struct.Struct("<qqiB")  # at_ms, expires_at_ms, ttl_seconds, allow_partial
_LINE = struct.Struct("<qq")  # requested, granted
_AT = struct.Struct("<q")
_AT_Q = struct.Struct("<qq")
_STOCK_HEAD = struct.Struct("<qqBq")  # at_ms, value, has_expected, expected
_STATE_HEAD = struct.Struct("<qqq")  # at_ms, units, second count (damaged units; 0 otherwise)


class RecordType(enum.IntEnum):
    RESERVE = 1
    COMMIT = 2
    EXTEND = 3
    RELEASE = 4
    FULFIL = 5
    EXPIRE = 6
    SET_STOCK = 7
    ADJUST_STOCK = 8
    SET_CHANNEL = 9
    SET_SKU_POLICY = 10
    ALLOCATE = 11
    # Stock states (reservd.stockstates); appended so older logs still decode.
    RECEIVE_RETURN = 12
    INSPECT = 13
    WRITE_OFF = 14
    EXPECT_RECEIPT = 15
    RECEIVE = 16
    SET_REPLENISHMENT = 17  # reservd.planning_records
    # HoldStock (safety_stock / quality_control), reservd.stockstates.
    HOLD_STOCK = 18
    # Velocity rules and promotions (reservd.rules_records).
    RULE = 20
    RULE_POLICY = 21
    SET_PROMOTION = 22


class Reserve(NamedTuple):
    at_ms: int
    reservation_id: str
    channel: str
    ttl_seconds: int
    allow_partial: bool
    expires_at_ms: int
    skus: tuple[str, ...]
    requested: tuple[int, ...]
    granted: tuple[int, ...]
    owner: str = ""  # the identity that made it ("" with authorization off)


class Commit(NamedTuple):
    at_ms: int
    reservation_id: str
    committed: tuple[int, ...]


class Extend(NamedTuple):
    at_ms: int
    reservation_id: str
    expires_at_ms: int


class Finish(NamedTuple):
    """Release, Fulfil or Expire: the reservation id is the whole command."""

    at_ms: int
    reservation_id: str


class StockChange(NamedTuple):
    """SetStock (value = on_hand) or AdjustStock (value = delta)."""

    at_ms: int
    adjustment_id: str
    sku: str
    value: int
    expected_on_hand: int | None
    reason: str
    actor: str = ""  # the identity that asked for it ("" with authorization off)


class SetChannel(NamedTuple):
    """A channel's whole policy (reservd.channels.Policy fields, in order)."""

    at_ms: int
    change_id: str
    channel: str
    pool: str
    reserve: str
    numbers: tuple[int | None, ...]  # Policy's fields after pool and reserve; None: no value


class SetSkuPolicy(NamedTuple):
    """A SKU's overrides of a channel's policy; replaces the previous ones (none: cleared)."""

    at_ms: int
    change_id: str
    sku: str
    channel: str
    overrides: tuple[tuple[str, int | None], ...]  # (field, value), value None: no cap


class Allocate(NamedTuple):
    at_ms: int
    change_id: str
    sku: str
    from_bucket: str
    to_bucket: str
    units: int


_NONE = -(1 << 63)  # an absent optional number (max_units None: no cap)


class ReceiveReturn(NamedTuple):
    """Returned units arrive into quarantine: on hand, not available."""

    at_ms: int
    return_id: str
    sku: str
    units: int
    reservation_id: str  # the order they came from; "" when unknown


class Inspect(NamedTuple):
    """A return's quarantined units leave quarantine: sellable ones become available,
    damaged ones move to damaged."""

    at_ms: int
    return_id: str
    sellable_units: int
    damaged_units: int


class WriteOff(NamedTuple):
    """Units of an unsellable state leave the building: on_hand and the state both drop."""

    at_ms: int
    change_id: str
    sku: str
    units: int
    state: str


class HoldStock(NamedTuple):
    """Units move between the shared bucket and a held state (units > 0: into the state,
    units < 0: back to shared); on_hand does not move."""

    at_ms: int
    change_id: str
    sku: str
    units: int
    state: str


class ExpectReceipt(NamedTuple):
    """A purchase order: ``units`` of ``sku`` on the way, due at ``eta_ms`` (not on hand)."""

    at_ms: int
    po_id: str
    sku: str
    units: int
    eta_ms: int


class Receive(NamedTuple):
    """A (partial) receipt against a purchase order: on_hand rises, incoming falls."""

    at_ms: int
    receipt_id: str
    po_id: str
    units: int


def encode_expect_receipt(command: ExpectReceipt) -> bytes:
    parts = [_STATE_HEAD.pack(command.at_ms, command.units, command.eta_ms)]
    put_str(parts, command.po_id)
    put_str(parts, command.sku)
    return b"".join(parts)


def encode_receive(command: Receive) -> bytes:
    parts = [_STATE_HEAD.pack(command.at_ms, command.units, 0)]
    put_str(parts, command.receipt_id)
    put_str(parts, command.po_id)
    return b"".join(parts)


def encode_receive_return(command: ReceiveReturn) -> bytes:
    parts = [_STATE_HEAD.pack(command.at_ms, command.units, 0)]
    put_str(parts, command.return_id)
    put_str(parts, command.sku)
    put_str(parts, command.reservation_id)
    return b"".join(parts)


def encode_inspect(command: Inspect) -> bytes:
    parts = [_STATE_HEAD.pack(command.at_ms, command.sellable_units, command.damaged_units)]
    put_str(parts, command.return_id)
    return b"".join(parts)


def encode_write_off(command: WriteOff) -> bytes:
    parts = [_STATE_HEAD.pack(command.at_ms, command.units, 0)]
    put_str(parts, command.change_id)
    put_str(parts, command.sku)
    put_str(parts, command.state)
    return b"".join(parts)


def encode_hold_stock(command: HoldStock) -> bytes:
    parts = [_STATE_HEAD.pack(command.at_ms, command.units, 0)]
    put_str(parts, command.change_id)
    put_str(parts, command.sku)
    put_str(parts, command.state)
    return b"".join(parts)


def put_str(parts: list, text: str) -> None:
    """Append ``text`` as a u16 byte length and UTF-8."""
    data = text.encode()
    parts.append(_H.pack(len(data)))
    parts.append(data)


class Reader:
    """Reads a payload front to back (struct layouts and strings); ``done()`` checks the end."""

    __slots__ = ("data", "offset")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def unpack(self, layout: struct.Struct) -> tuple:
        values = layout.unpack_from(self.data, self.offset)
        self.offset += layout.size
        return values

    def text(self) -> str:
        (length,) = self.unpack(_H)
        end = self.offset + length
        if end > len(self.data):
            raise ValueError("string runs past the end of the payload")
        value = self.data[self.offset : end].decode()
        self.offset = end
        return value

    def optional_text(self) -> str:
        """A trailing optional string: "" when the payload ends here."""
        return self.text() if self.offset < len(self.data) else ""

    def done(self) -> None:
        if self.offset != len(self.data):
            raise ValueError(f"{len(self.data) - self.offset} trailing bytes in payload")


def encode_reserve(command: Reserve) -> bytes:
    parts = [
        _RESERVE_HEAD.pack(
            command.at_ms, command.expires_at_ms, command.ttl_seconds, command.allow_partial
        )
    ]
    put_str(parts, command.reservation_id)
    put_str(parts, command.channel)
    parts.append(_H.pack(len(command.skus)))
    for sku, requested, granted in zip(command.skus, command.requested, command.granted):
        put_str(parts, sku)
        parts.append(_LINE.pack(requested, granted))
    if command.owner:
        put_str(parts, command.owner)
    return b"".join(parts)


def encode_commit(command: Commit) -> bytes:
    parts = [_AT.pack(command.at_ms)]
    put_str(parts, command.reservation_id)
    parts.append(_H.pack(len(command.committed)))
    parts.extend(_Q.pack(quantity) for quantity in command.committed)
    return b"".join(parts)


def encode_extend(command: Extend) -> bytes:
    parts = [_AT_Q.pack(command.at_ms, command.expires_at_ms)]
    put_str(parts, command.reservation_id)
    return b"".join(parts)


def encode_finish(command: Finish) -> bytes:
    parts = [_AT.pack(command.at_ms)]
    put_str(parts, command.reservation_id)
    return b"".join(parts)


def encode_stock(command: StockChange) -> bytes:
    expected = command.expected_on_hand
    parts = [
        _STOCK_HEAD.pack(command.at_ms, command.value, expected is not None, expected or 0)
    ]
    put_str(parts, command.adjustment_id)
    put_str(parts, command.sku)
    put_str(parts, command.reason)
    if command.actor:
        put_str(parts, command.actor)
    return b"".join(parts)


def _numbers(parts: list, values) -> None:
    parts.append(_H.pack(len(values)))
    parts.extend(_Q.pack(_NONE if value is None else int(value)) for value in values)


def _read_numbers(reader: Reader) -> tuple[int | None, ...]:
    (count,) = reader.unpack(_H)
    values = (reader.unpack(_Q)[0] for _ in range(count))
    return tuple(None if value == _NONE else value for value in values)


def encode_set_channel(command: SetChannel) -> bytes:
    parts = [_AT.pack(command.at_ms)]
    for text in (command.change_id, command.channel, command.pool, command.reserve):
        put_str(parts, text)
    _numbers(parts, command.numbers)
    return b"".join(parts)


def encode_sku_policy(command: SetSkuPolicy) -> bytes:
    parts = [_AT.pack(command.at_ms)]
    for text in (command.change_id, command.sku, command.channel):
        put_str(parts, text)
    parts.append(_H.pack(len(command.overrides)))
    for field, value in command.overrides:
        put_str(parts, field)
        parts.append(_Q.pack(_NONE if value is None else int(value)))
    return b"".join(parts)


def encode_allocate(command: Allocate) -> bytes:
    parts = [_AT_Q.pack(command.at_ms, command.units)]
    for text in (command.change_id, command.sku, command.from_bucket, command.to_bucket):
        put_str(parts, text)
    return b"".join(parts)


def _decode_channels(kind: RecordType, reader: Reader):
    if kind is RecordType.SET_CHANNEL:
        (at_ms,) = reader.unpack(_AT)
        texts = [reader.text() for _ in range(4)]
        return SetChannel(at_ms, *texts, _read_numbers(reader))
    if kind is RecordType.SET_SKU_POLICY:
        (at_ms,) = reader.unpack(_AT)
        change_id, sku, channel = reader.text(), reader.text(), reader.text()
        (count,) = reader.unpack(_H)
        overrides = []
        for _ in range(count):
            field = reader.text()
            (value,) = reader.unpack(_Q)
            overrides.append((field, None if value == _NONE else value))
        return SetSkuPolicy(at_ms, change_id, sku, channel, tuple(overrides))
    at_ms, units = reader.unpack(_AT_Q)
    texts = [reader.text() for _ in range(4)]
    return Allocate(at_ms, texts[0], texts[1], texts[2], texts[3], units)


def decode(record_type: int, payload: bytes):
    """Decode a payload into its command; ValueError if it does not parse exactly."""
    reader = Reader(payload)
    kind = RecordType(record_type)
    try:
        if kind is RecordType.RESERVE:
            at_ms, expires_at_ms, ttl_seconds, allow_partial = reader.unpack(_RESERVE_HEAD)
            reservation_id = reader.text()
            channel = reader.text()
            (count,) = reader.unpack(_H)
            skus, requested, granted = [], [], []
            for _ in range(count):
                skus.append(reader.text())
                asked, given = reader.unpack(_LINE)
                requested.append(asked)
                granted.append(given)
            command = Reserve(
                at_ms, reservation_id, channel, ttl_seconds, bool(allow_partial),
                expires_at_ms, tuple(skus), tuple(requested), tuple(granted),
                reader.optional_text(),
            )
        elif kind is RecordType.COMMIT:
            (at_ms,) = reader.unpack(_AT)
            reservation_id = reader.text()
            (count,) = reader.unpack(_H)
            command = Commit(
                at_ms, reservation_id, tuple(reader.unpack(_Q)[0] for _ in range(count))
            )
        elif kind is RecordType.EXTEND:
            at_ms, expires_at_ms = reader.unpack(_AT_Q)
            command = Extend(at_ms, reader.text(), expires_at_ms)
        elif kind in (RecordType.RELEASE, RecordType.FULFIL, RecordType.EXPIRE):
            (at_ms,) = reader.unpack(_AT)
            command = Finish(at_ms, reader.text())
        elif kind is RecordType.RECEIVE_RETURN:
            at_ms, units, _ = reader.unpack(_STATE_HEAD)
            command = ReceiveReturn(at_ms, reader.text(), reader.text(), units, reader.text())
        elif kind is RecordType.INSPECT:
            at_ms, sellable, damaged = reader.unpack(_STATE_HEAD)
            command = Inspect(at_ms, reader.text(), sellable, damaged)
        elif kind is RecordType.WRITE_OFF:
            at_ms, units, _ = reader.unpack(_STATE_HEAD)
            command = WriteOff(at_ms, reader.text(), reader.text(), units, reader.text())
        elif kind is RecordType.HOLD_STOCK:
            at_ms, units, _ = reader.unpack(_STATE_HEAD)
            command = HoldStock(at_ms, reader.text(), reader.text(), units, reader.text())
        elif kind is RecordType.EXPECT_RECEIPT:
            at_ms, units, eta_ms = reader.unpack(_STATE_HEAD)
            command = ExpectReceipt(at_ms, reader.text(), reader.text(), units, eta_ms)
        elif kind is RecordType.RECEIVE:
            at_ms, units, _ = reader.unpack(_STATE_HEAD)
            command = Receive(at_ms, reader.text(), reader.text(), units)
        elif kind is RecordType.SET_REPLENISHMENT:
            from reservd import planning_records  # it builds on this module's Reader

            command = planning_records.decode(reader)
        elif kind >= RecordType.RULE:
            from reservd import rules_records  # it builds on this module's Reader

            command = rules_records.decode(kind, reader)
        elif kind >= RecordType.SET_CHANNEL:
            command = _decode_channels(kind, reader)
        else:
            at_ms, value, has_expected, expected = reader.unpack(_STOCK_HEAD)
            adjustment_id = reader.text()
            sku = reader.text()
            reason = reader.text()
            command = StockChange(
                at_ms, adjustment_id, sku, value, expected if has_expected else None, reason,
                reader.optional_text(),
            )
    except struct.error as error:
        raise ValueError(f"{kind.name} payload too short: {error}") from None
    reader.done()
    return command
