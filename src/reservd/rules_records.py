"""The WAL commands of the velocity rules and the promotion calendar, and their snapshot rows.

Payloads follow reservd.records (little-endian, strings as a u16 length and UTF-8)::

    RULE (20):          at_ms i64 | op u8 | rule u8 | effect i64 | until_ms i64 | sku | channel |
                        ref | figures u16, then per figure: name | value i64
    RULE_POLICY (21):   at_ms i64 | change_id | sku | channel | fields u16, then per field:
                        name | value i64 (i64 min: unset)
    SET_PROMOTION (22): at_ms i64 | starts_at_ms i64 | ends_at_ms i64 | forecast_units i64 |
                        short_notice u8 | promotion_id | skus u16, then sku each |
                        channels u16, then channel each

Snapshot sections (reservd.state_codec, format 6): velocity (13), rule policy (14), rule in
force (15), promotion (16).
"""
from __future__ import annotations

import struct
from typing import NamedTuple

from reservd.records import Reader, put_str

_AT = struct.Struct("<q")
_Q = struct.Struct("<q")
_H = struct.Struct("<H")
_RULE_HEAD = struct.Struct("<qBBqq")
_PROMOTION_HEAD = struct.Struct("<qqqqB")
_NONE = -(1 << 63)


class RuleChange(NamedTuple):
    """A rule fired, was reassessed or ended on (sku, channel): the measured figures and the
    effect (reservd.rules)."""

    at_ms: int
    op: int
    rule: int
    sku: str
    channel: str
    ref: str  # the promotion id for promotion rules, "" otherwise
    effect: int
    until_ms: int
    figures: tuple[tuple[str, int], ...]


class RulePolicyChange(NamedTuple):
    """Replaces the rule policy fields set for (sku, channel); sku "" is the channel's own,
    channel "" every channel's for that SKU."""

    at_ms: int
    change_id: str
    sku: str
    channel: str
    fields: tuple[tuple[str, int | None], ...]


class SetPromotion(NamedTuple):
    at_ms: int
    promotion_id: str
    skus: tuple[str, ...]
    channels: tuple[str, ...]
    starts_at_ms: int
    ends_at_ms: int
    forecast_units: int
    short_notice: bool


def _pairs(parts: list, items) -> None:
    parts.append(_H.pack(len(items)))
    for name, value in items:
        put_str(parts, name)
        parts.append(_Q.pack(_NONE if value is None else int(value)))


def _read_pairs(reader: Reader) -> tuple:
    (count,) = reader.unpack(_H)
    out = []
    for _ in range(count):
        name = reader.text()
        (value,) = reader.unpack(_Q)
        out.append((name, None if value == _NONE else value))
    return tuple(out)


def _texts(parts: list, texts) -> None:
    parts.append(_H.pack(len(texts)))
    for text in texts:
        put_str(parts, text)


def _read_texts(reader: Reader) -> tuple[str, ...]:
    (count,) = reader.unpack(_H)
    return tuple(reader.text() for _ in range(count))


def encode_rule(command: RuleChange) -> bytes:
    parts = [_RULE_HEAD.pack(command.at_ms, command.op, command.rule, command.effect,
                             command.until_ms)]
    for text in (command.sku, command.channel, command.ref):
        put_str(parts, text)
    _pairs(parts, command.figures)
    return b"".join(parts)


def encode_rule_policy(command: RulePolicyChange) -> bytes:
    parts = [_AT.pack(command.at_ms)]
    for text in (command.change_id, command.sku, command.channel):
        put_str(parts, text)
    _pairs(parts, command.fields)
    return b"".join(parts)


def encode_promotion(command: SetPromotion) -> bytes:
    parts = [_PROMOTION_HEAD.pack(command.at_ms, command.starts_at_ms, command.ends_at_ms,
                                  command.forecast_units, command.short_notice)]
    put_str(parts, command.promotion_id)
    _texts(parts, command.skus)
    _texts(parts, command.channels)
    return b"".join(parts)


def decode(kind: int, reader: Reader):
    """The command of record type ``kind`` (20-22) from ``reader``."""
    if kind == 20:
        at_ms, op, rule, effect, until_ms = reader.unpack(_RULE_HEAD)
        sku, channel, ref = reader.text(), reader.text(), reader.text()
        figures = tuple((name, value or 0) for name, value in _read_pairs(reader))
        return RuleChange(at_ms, op, rule, sku, channel, ref, effect, until_ms, figures)
    if kind == 21:
        (at_ms,) = reader.unpack(_AT)
        change_id, sku, channel = reader.text(), reader.text(), reader.text()
        return RulePolicyChange(at_ms, change_id, sku, channel, _read_pairs(reader))
    assert kind == 22, kind
    at_ms, starts_at_ms, ends_at_ms, forecast_units, short_notice = reader.unpack(
        _PROMOTION_HEAD)
    promotion_id = reader.text()
    skus = _read_texts(reader)
    channels = _read_texts(reader)
    return SetPromotion(at_ms, promotion_id, skus, channels, starts_at_ms, ends_at_ms,
                        forecast_units, bool(short_notice))


# -- snapshot rows ------------------------------------------------------------------------------

VELOCITY = 13
RULE_POLICY = 14
RULE_ACTIVE = 15
PROMOTION = 16


def put_velocity(parts: list, row: tuple) -> None:
    sku, channel, values = row
    put_str(parts, sku)
    put_str(parts, channel)
    parts.append(_H.pack(len(values)))
    parts.append(struct.pack(f"<{len(values)}q", *values))


def read_velocity(reader: Reader) -> tuple:
    sku, channel = reader.text(), reader.text()
    (count,) = reader.unpack(_H)
    return (sku, channel, reader.unpack(struct.Struct(f"<{count}q")))


def put_rule_policy(parts: list, row: tuple) -> None:
    sku, channel, items = row
    put_str(parts, sku)
    put_str(parts, channel)
    _pairs(parts, items)


def read_rule_policy(reader: Reader) -> tuple:
    return (reader.text(), reader.text(), _read_pairs(reader))


def put_rule_active(parts: list, row: tuple) -> None:
    rule, sku, channel, ref, since_ms, until_ms, effect, figures = row
    parts.append(_RULE_HEAD.pack(since_ms, 0, rule, effect, until_ms))
    for text in (sku, channel, ref):
        put_str(parts, text)
    _pairs(parts, figures)


def read_rule_active(reader: Reader) -> tuple:
    since_ms, _, rule, effect, until_ms = reader.unpack(_RULE_HEAD)
    sku, channel, ref = reader.text(), reader.text(), reader.text()
    figures = tuple((name, value or 0) for name, value in _read_pairs(reader))
    return (rule, sku, channel, ref, since_ms, until_ms, effect, figures)


def put_promotion(parts: list, row: tuple) -> None:
    (promotion_id, skus, channels, starts_at_ms, ends_at_ms, forecast_units, set_at_ms,
     short_notice, sold, preloaded, overrun, done_at_ms) = row
    put_str(parts, promotion_id)
    _texts(parts, skus)
    _texts(parts, channels)
    parts.append(struct.pack("<qqqqBqBBq", starts_at_ms, ends_at_ms, forecast_units, set_at_ms,
                             short_notice, sold, preloaded, overrun, done_at_ms))


def read_promotion(reader: Reader) -> tuple:
    promotion_id = reader.text()
    skus, channels = _read_texts(reader), _read_texts(reader)
    numbers = reader.unpack(struct.Struct("<qqqqBqBBq"))
    return (promotion_id, skus, channels, *numbers)


SECTIONS = {
    VELOCITY: (put_velocity, read_velocity),
    RULE_POLICY: (put_rule_policy, read_rule_policy),
    RULE_ACTIVE: (put_rule_active, read_rule_active),
    PROMOTION: (put_promotion, read_promotion),
}
