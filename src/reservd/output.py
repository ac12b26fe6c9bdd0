"""How the `reservd` command prints responses: JSON (one object per line, integers as numbers,
UTF-8 unescaped, keys in the proto's field order) or an aligned table."""
from __future__ import annotations

import json
import sys
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message


def plain(message: Message) -> dict[str, Any]:
    """A message as builtins in field order. Unlike protobuf's JSON mapping, int64 values stay
    numbers; an unset optional field or message is left out; enums print by name."""
    result: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        repeated = field.is_repeated
        if not repeated and field.has_presence and not message.HasField(field.name):
            continue
        value = getattr(message, field.name)
        if repeated:
            result[field.name] = [_value(field, item) for item in value]
        else:
            result[field.name] = _value(field, value)
    return result


def _value(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return plain(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        known = field.enum_type.values_by_number.get(value)
        return known.name if known is not None else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return value.hex()
    return value


def _cell(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def emit_all(messages: list[Message], format_: str = "json", file=None) -> None:
    """Print several messages of one type: one JSON line each, or one table."""
    file = file or sys.stdout
    rows = [plain(message) for message in messages]
    if format_ == "json":
        for row in rows:
            print(json.dumps(row, ensure_ascii=False), file=file, flush=True)
        return
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    cells = [[_cell(row.get(key, "")) for key in columns] for row in rows]
    widths = [max([len(key)] + [len(line[i]) for line in cells]) for i, key in enumerate(columns)]
    print("  ".join(key.ljust(width) for key, width in zip(columns, widths)).rstrip(), file=file)
    for line in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip(),
              file=file, flush=True)


def emit(message: Message, format_: str = "json", file=None) -> None:
    emit_all([message], format_, file)
