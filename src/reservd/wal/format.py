"""The on-disk formats: frames in segments, snapshot files, file names; and reading one frame.

Frame layout (little-endian; every frame starts at an 8-byte aligned offset of its segment)::

    0   u32  crc     zlib.crc32 of bytes [4, frame end): length, seq, type, magic, payload, padding
    4   u32  length  payload bytes
    8   u64  seq
    16  u32  type
    20  u32  magic   b"rWAL"
    24  payload, then 0-7 zero bytes of padding to the next 8-byte boundary

As in etcd's WAL, frames are 8-byte aligned, so the first word (crc and length) always lies
inside one 512-byte sector: a torn write leaves it whole or absent, never half-written. Unlike
etcd, the CRC is not chained over earlier records: the sequence numbers catch reordering and
loss, and an independent CRC lets recovery look past a bad frame for a later valid one.

Snapshot layout: a 32-byte header ``b"RSVDSNAP", u32 version, u32 crc, u64 seq, u64 length``
then the payload; the crc is zlib.crc32 of ``seq, length, payload``.
"""
from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path


FRAME_ALIGN_BYTES = 8
FRAME_HEAD = struct.Struct("<IIQII")  # crc, length, seq, type, magic
FRAME_HEAD_BYTES = FRAME_HEAD.size
RECORD_MAGIC_BYTES = b"rWAL"
RECORD_MAGIC = int.from_bytes(RECORD_MAGIC_BYTES, "little")
RECORD_PAYLOAD_BYTES_MAX = 16 << 20
_MAGIC_OFFSET = 20
_FRAME_BODY = struct.Struct("<IQII")  # the header after the crc: length, seq, type, magic
_CRC = struct.Struct("<I")
_LENGTH = struct.Struct("<I")
_SEQ = struct.Struct("<Q")
_PADDING = tuple(b"\0" * (-length & 7) for length in range(8))

SNAPSHOT_MAGIC = b"RSVDSNAP"
SNAPSHOT_VERSION = 1
SNAPSHOT_HEAD = struct.Struct("<8sIIQQ")  # magic, version, crc, seq, length
SNAPSHOT_HEAD_BYTES = SNAPSHOT_HEAD.size
_SNAPSHOT_CRC_FIELDS = struct.Struct("<QQ")  # seq, length
SNAPSHOTS_KEPT = 2

_SEGMENT_NAME = re.compile(r"wal-(\d{20})\.log")
_SNAPSHOT_NAME = re.compile(r"snap-(\d{20})\.snap")
_SNAPSHOT_TMP_NAME = re.compile(r"snap-(\d{20})\.snap\.tmp")
LOCK_NAME = "LOCK"


def segment_name(first_seq: int) -> str:
    return f"wal-{first_seq:020d}.log"


def snapshot_name(seq: int) -> str:
    return f"snap-{seq:020d}.snap"


@dataclass(frozen=True, slots=True)
class Record:
    seq: int
    type: int
    payload: bytes
    # Where the frame starts, for error messages (not part of the record's value).
    path: Path | None = field(default=None, compare=False)
    offset: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Snapshot:
    seq: int
    payload: bytes
    path: Path


def encode_frame(seq: int, type: int, payload: bytes) -> bytes:
    """One frame (see the module docstring). The WAL inlines this in ``append``."""
    length = len(payload)
    body = _FRAME_BODY.pack(length, seq, type, RECORD_MAGIC) + payload + _PADDING[length & 7]
    return _CRC.pack(zlib.crc32(body)) + body


def _frame_error(data: bytes, offset: int) -> tuple[str, int, int, int]:
    """Check the frame at ``offset``: ``("", seq, type, frame_bytes)`` if valid, else
    ``(reason, 0, 0, 0)``."""
    present = len(data) - offset
    if present < FRAME_HEAD_BYTES:
        return f"truncated frame header ({present} of {FRAME_HEAD_BYTES} bytes)", 0, 0, 0
    crc, length, seq, type_, magic = FRAME_HEAD.unpack_from(data, offset)
    if magic != RECORD_MAGIC:
        return "no frame here (bad magic: zeroed or garbage bytes)", 0, 0, 0
    if length > RECORD_PAYLOAD_BYTES_MAX:
        return f"length {length} exceeds the record limit {RECORD_PAYLOAD_BYTES_MAX}", 0, 0, 0
    frame_bytes = FRAME_HEAD_BYTES + length + (-length & 7)
    if frame_bytes > present:
        return f"truncated record (frame of {frame_bytes} bytes, {present} present)", 0, 0, 0
    if zlib.crc32(memoryview(data)[offset + 4 : offset + frame_bytes]) != crc:
        return "checksum mismatch", 0, 0, 0
    return "", seq, type_, frame_bytes


def _find_valid_frame(data: bytes, start: int) -> tuple[int, int] | None:
    """The first valid frame at an aligned offset >= ``start``: ``(offset, seq)``, or None."""
    start += -start & (FRAME_ALIGN_BYTES - 1)
    index = data.find(RECORD_MAGIC_BYTES, start + _MAGIC_OFFSET)
    while index != -1:
        offset = index - _MAGIC_OFFSET
        if offset % FRAME_ALIGN_BYTES == 0:
            reason, seq, _, _ = _frame_error(data, offset)
            if not reason:
                return offset, seq
        index = data.find(RECORD_MAGIC_BYTES, index + 1)
    return None
