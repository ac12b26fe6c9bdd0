"""Why a request body is not a valid protobuf message: the first offending field, by path.

Only the failure path runs this: the protobuf runtime says *that* a body does not parse
(``DecodeError``), not *where*. Walking the wire format against the message's descriptor finds
the field (``lines[1].sku: not valid UTF-8``) so the answer can name it, as every other
INVALID_ARGUMENT does.
"""
from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

_VARINT_BYTES_MAX = 10
_NESTING_MAX = 32


class _Malformed(Exception):
    pass


def describe(descriptor: Descriptor, data: bytes) -> str:
    """A one-line reason why ``data`` does not parse as ``descriptor``'s message."""
    try:
        _walk(descriptor, memoryview(data), 0, len(data), "", 0, None)
    except _Malformed as error:
        return str(error)
    return f"not a valid {descriptor.full_name} message"


def _varint(data: memoryview, position: int, end: int, where: str) -> tuple[int, int]:
    value = 0
    for shift in range(0, 7 * _VARINT_BYTES_MAX, 7):
        if position >= end:
            raise _Malformed(f"{where}: truncated varint at byte {position}")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
    raise _Malformed(f"{where}: varint longer than {_VARINT_BYTES_MAX} bytes at byte {position}")


def _walk(
    descriptor: Descriptor | None, data: memoryview, position: int, end: int, prefix: str,
    depth: int, group: int | None,
) -> int:
    """Check fields from ``position`` to ``end`` (or to the end-group of field ``group``);
    returns the position after them."""
    if depth > _NESTING_MAX:
        raise _Malformed(f"{prefix or 'message'}: nested deeper than {_NESTING_MAX}")
    counts: dict[int, int] = {}
    while position < end:
        start = position
        where = prefix or "message"
        key, position = _varint(data, position, end, where)
        number, wire_type = key >> 3, key & 7
        field = descriptor.fields_by_number.get(number) if descriptor is not None else None
        name = f"{prefix}{'.' if prefix else ''}{field.name if field else f'field {number}'}"
        if field is not None and field.is_repeated:
            index = counts.get(number, 0)
            counts[number] = index + 1
            name = f"{name}[{index}]"
        if number == 0:
            raise _Malformed(f"{where}: field number 0 at byte {start}")
        if wire_type == 0:
            _, position = _varint(data, position, end, name)
        elif wire_type in (1, 5):
            position += 8 if wire_type == 1 else 4
            if position > end:
                raise _Malformed(f"{name}: truncated at byte {start}")
        elif wire_type == 2:
            length, position = _varint(data, position, end, name)
            if position + length > end:
                raise _Malformed(f"{name}: length {length} runs past the end of the body")
            _check_bytes(field, data, position, position + length, name, depth)
            position += length
        elif wire_type == 3:
            position = _walk(None, data, position, end, name, depth + 1, number)
        elif wire_type == 4:
            if group != number:
                raise _Malformed(f"{where}: end-group of field {number} without a start")
            return position
        else:
            raise _Malformed(f"{name}: wire type {wire_type} does not exist")
    if group is not None:
        raise _Malformed(f"{prefix}: group not closed")
    return position


def _check_bytes(
    field: FieldDescriptor | None, data: memoryview, start: int, end: int, name: str, depth: int
) -> None:
    if field is None:
        return
    if field.type == FieldDescriptor.TYPE_STRING:
        try:
            bytes(data[start:end]).decode("utf-8")
        except UnicodeDecodeError as error:
            raise _Malformed(f"{name}: not valid UTF-8 (byte {error.start})") from None
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        _walk(field.message_type, data, start, end, name, depth + 1, None)
