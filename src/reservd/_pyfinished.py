"""Pure-Python twin of the C finished-record table (ext/reservd/_cfinished.pyx).

Same class name, behaviour and exceptions as ``reservd._cfinished.FinishedTable``; written for
reading, not memory (a dict of bytes records and a queue of them). The records' layout is in
reservd.finished; this table reads only their header: kind, key and finished_at_ms.
"""
from __future__ import annotations

import hashlib
import struct
from collections import deque

KIND_RESERVATION = 1
KIND_ADJUSTMENT = 2
HEADER_BYTES = 48
RECORD_BYTES_MAX = 1 << 20
_KEY = slice(8, 24)
_FINISHED_AT = struct.Struct("<q")
_FLAG_INLINE = 2


def reservation_key(reservation_id: str) -> bytes:
    """The 16-byte key of a reservation id (reservd.finished)."""
    return hashlib.blake2b(
        reservation_id.encode(), digest_size=16, person=b"reservd.reserve"
    ).digest()


def adjustment_key(adjustment_id: str) -> bytes:
    """The 16-byte key of an adjustment id (reservd.finished)."""
    return hashlib.blake2b(
        adjustment_id.encode(), digest_size=16, person=b"reservd.adjust"
    ).digest()


def payload_digest(data: bytes) -> int:
    """The 64-bit digest (int) of a request's encoded payload (reservd.finished)."""
    return int.from_bytes(
        hashlib.blake2b(data, digest_size=8, person=b"reservd.payload").digest(), "little"
    )


def _record_size(record: bytes) -> int:
    if record[0] == KIND_ADJUSTMENT:
        return 80
    if record[0] != KIND_RESERVATION:
        return 0
    if record[2] & _FLAG_INLINE:
        return 64
    (count,) = struct.unpack_from("<I", record, 56)
    return 64 + (12 * count + 7) // 8 * 8


class FinishedTable:
    """Packed records by 16-byte key, oldest first. Adding a key that is kept already replaces
    its record (log replay does, as it does not repeat the forgetting)."""

    def __init__(self) -> None:
        self._records: dict[bytes, bytes] = {}
        # Records oldest first; one no longer in _records (by identity) was replaced.
        self._order: deque[bytes] = deque()
        self.reservations = 0
        self.adjustments = 0

    def __len__(self) -> int:
        return len(self._records)

    def add(self, record: bytes) -> None:
        """Keep ``record`` (bytes, a packed record) as the newest."""
        if type(record) is not bytes:
            raise TypeError(f"record must be bytes, not {type(record).__name__}")
        size = len(record)
        if (size < HEADER_BYTES or size % 8 or size > RECORD_BYTES_MAX
                or _record_size(record) != size):
            raise ValueError(f"not a finished record ({size} bytes)")
        replaced = self._records.pop(record[_KEY], None)
        if replaced is not None:
            self._count(replaced, -1)
        self._records[record[_KEY]] = record
        self._order.append(record)
        self._count(record, 1)

    def _count(self, record: bytes, change: int) -> None:
        if record[0] == KIND_RESERVATION:
            self.reservations += change
        else:
            self.adjustments += change

    def _live(self, record: bytes) -> bool:
        return self._records.get(record[_KEY]) is record

    def reservation(self, reservation_id: str) -> bytes | None:
        """The record kept for ``reservation_id``, or None."""
        if type(reservation_id) is not str:
            raise TypeError(f"id must be str, not {type(reservation_id).__name__}")
        return self._records.get(reservation_key(reservation_id))

    def adjustment(self, adjustment_id: str) -> bytes | None:
        """The record kept for ``adjustment_id``, or None."""
        if type(adjustment_id) is not str:
            raise TypeError(f"id must be str, not {type(adjustment_id).__name__}")
        return self._records.get(adjustment_key(adjustment_id))

    def get(self, key: bytes) -> bytes | None:
        """The record kept under ``key`` (16 bytes), or None."""
        if type(key) is not bytes or len(key) != 16:
            raise ValueError("key must be 16 bytes")
        return self._records.get(key)

    def oldest_ms(self) -> int | None:
        """finished_at_ms of the oldest record (unix ms), or None when none is kept."""
        for record in self._order:
            if self._live(record):
                return _FINISHED_AT.unpack_from(record, 40)[0]
        return None

    def forget(self, horizon_ms: int) -> int:
        """Forget records oldest first while the oldest finished at or before ``horizon_ms``
        (unix ms); returns how many were forgotten."""
        forgotten = 0
        while self._order:
            record = self._order[0]
            if self._live(record):
                if _FINISHED_AT.unpack_from(record, 40)[0] > horizon_ms:
                    break
                del self._records[record[_KEY]]
                self._count(record, -1)
                forgotten += 1
            self._order.popleft()
        return forgotten

    def raw(self) -> bytes:
        """Every record kept, oldest first, concatenated (bytes): a copy for snapshots."""
        return b"".join(record for record in self._order if self._live(record))
