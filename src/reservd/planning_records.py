"""The replenishment settings command (WAL record 17) and its payload:
at_ms i64 | lead_time_days f64 | lead_time_sigma_days f64 | service_level f64 | sku |
abc_class | seasonal count u8 | seasonal f64 each (0 of them: the configured default)."""
from __future__ import annotations

import struct
from typing import NamedTuple

from reservd.records import Reader, put_str

_HEAD = struct.Struct("<qddd")
_COUNT = struct.Struct("<B")
_INDEX = struct.Struct("<d")


class SetReplenishment(NamedTuple):
    """One SKU's replenishment settings, replacing the previous ones (days; a service level in
    (0, 1), 0 for the ABC class's; abc_class "" for the class by units sold; twelve monthly
    seasonal indices, January first, or () for the configured default)."""

    at_ms: int
    sku: str
    lead_time_days: float
    lead_time_sigma_days: float
    service_level: float
    abc_class: str
    seasonal: tuple[float, ...]


def encode(command: SetReplenishment) -> bytes:
    parts = [_HEAD.pack(command.at_ms, command.lead_time_days, command.lead_time_sigma_days,
                        command.service_level)]
    put_str(parts, command.sku)
    put_str(parts, command.abc_class)
    parts.append(_COUNT.pack(len(command.seasonal)))
    parts.extend(_INDEX.pack(value) for value in command.seasonal)
    return b"".join(parts)


def decode(reader: Reader) -> SetReplenishment:
    at_ms, lead_time, lead_sigma, level = reader.unpack(_HEAD)
    sku = reader.text()
    abc_class = reader.text()
    (count,) = reader.unpack(_COUNT)
    seasonal = tuple(reader.unpack(_INDEX)[0] for _ in range(count))
    return SetReplenishment(at_ms, sku, lead_time, lead_sigma, level, abc_class, seasonal)
