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


class RecordType(enum.IntEnum):
    RESERVE = 1
    COMMIT = 2
    EXTEND = 3
    RELEASE = 4
    FULFIL = 5
    EXPIRE = 6
    SET_STOCK = 7
    ADJUST_STOCK = 8


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


def _str(parts: list, text: str) -> None:
    data = text.encode()
    parts.append(_H.pack(len(data)))
    parts.append(data)


class _Reader:
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
    _str(parts, command.reservation_id)
    _str(parts, command.channel)
    parts.append(_H.pack(len(command.skus)))
    for sku, requested, granted in zip(command.skus, command.requested, command.granted):
        _str(parts, sku)
        parts.append(_LINE.pack(requested, granted))
    if command.owner:
        _str(parts, command.owner)
    return b"".join(parts)


def encode_commit(command: Commit) -> bytes:
    parts = [_AT.pack(command.at_ms)]
    _str(parts, command.reservation_id)
    parts.append(_H.pack(len(command.committed)))
    parts.extend(_Q.pack(quantity) for quantity in command.committed)
    return b"".join(parts)


def encode_extend(command: Extend) -> bytes:
    parts = [_AT_Q.pack(command.at_ms, command.expires_at_ms)]
    _str(parts, command.reservation_id)
    return b"".join(parts)


def encode_finish(command: Finish) -> bytes:
    parts = [_AT.pack(command.at_ms)]
    _str(parts, command.reservation_id)
    return b"".join(parts)


def encode_stock(command: StockChange) -> bytes:
    expected = command.expected_on_hand
    parts = [
        _STOCK_HEAD.pack(command.at_ms, command.value, expected is not None, expected or 0)
    ]
    _str(parts, command.adjustment_id)
    _str(parts, command.sku)
    _str(parts, command.reason)
    if command.actor:
        _str(parts, command.actor)
    return b"".join(parts)


def decode(record_type: int, payload: bytes):
    """Decode a payload into its command; ValueError if it does not parse exactly."""
    reader = _Reader(payload)
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
