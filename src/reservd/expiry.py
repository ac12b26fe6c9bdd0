"""When held reservations expire: their ids in one list per expiry second.

A heap of (expires_at_ms, id) tuples costs ~100 bytes per hold; a list slot costs 8. The
seconds that have a list form a small heap (at most ttl_seconds_max + 1 distinct seconds are
ever pending at once), so finding what is due is O(log seconds) plus O(1) per id.

An entry is just an id; whether it still stands is asked of the ledger (``deadline_of``: the
held reservation's expires_at_ms, or None once it is no longer held). An entry goes stale when
its hold ends or moves to another second; stale entries are dropped when met and by
:meth:`compact`, which the ledger calls once they outnumber the held reservations.
"""
from __future__ import annotations

import heapq
from typing import Callable

DeadlineOf = Callable[[str], "int | None"]


class Deadlines:
    """Ids of held reservations bucketed by expiry second (unix seconds)."""

    __slots__ = ("_buckets", "_seconds", "_entries")

    def __init__(self) -> None:
        self._buckets: dict[int, list[str]] = {}
        self._seconds: list[int] = []  # heap of the keys of _buckets
        self._entries = 0

    def __len__(self) -> int:
        """Entries, stale ones included."""
        return self._entries

    def push(self, expires_at_ms: int, reservation_id: str) -> None:
        second = expires_at_ms // 1000
        bucket = self._buckets.get(second)
        if bucket is None:
            self._buckets[second] = [reservation_id]
            heapq.heappush(self._seconds, second)
        else:
            bucket.append(reservation_id)
        self._entries += 1

    def due(self, now_ms: int, limit: int, deadline_of: DeadlineOf) -> list[str]:
        """Remove and return up to ``limit`` distinct ids whose deadline is <= now_ms, dropping
        the stale entries met on the way."""
        result: list[str] = []
        seen: set[str] = set()
        seconds, buckets = self._seconds, self._buckets
        while seconds and seconds[0] * 1000 <= now_ms and len(result) < limit:
            second = seconds[0]
            bucket = buckets[second]
            later: list[str] = []
            while bucket and len(result) < limit:
                reservation_id = bucket.pop()
                self._entries -= 1
                expires_at_ms = deadline_of(reservation_id)
                if (
                    expires_at_ms is None
                    or expires_at_ms // 1000 != second
                    or reservation_id in seen
                ):
                    continue  # stale: ended, moved, or a duplicate
                if expires_at_ms <= now_ms:
                    seen.add(reservation_id)
                    result.append(reservation_id)
                else:
                    later.append(reservation_id)  # later within this very second
            bucket.extend(later)
            self._entries += len(later)
            if bucket:
                break  # the limit was reached, or the rest of this second is not due yet
            del buckets[second]
            heapq.heappop(seconds)
        return result

    def next_deadline_ms(self, deadline_of: DeadlineOf) -> int | None:
        """The earliest standing deadline (unix ms), or None. O(entries) in the worst case."""
        for second in sorted(self._seconds):
            standing = [
                expires_at_ms for expires_at_ms in map(deadline_of, self._buckets[second])
                if expires_at_ms is not None and expires_at_ms // 1000 == second
            ]
            if standing:
                return min(standing)
        return None

    def compact(self, deadline_of: DeadlineOf) -> None:
        """Drop every stale entry (and duplicates): afterwards one entry per standing hold."""
        buckets: dict[int, list[str]] = {}
        entries = 0
        for second, bucket in self._buckets.items():
            kept = [
                reservation_id for reservation_id in dict.fromkeys(bucket)
                if (expires_at_ms := deadline_of(reservation_id)) is not None
                and expires_at_ms // 1000 == second
            ]
            if kept:
                buckets[second] = kept
                entries += len(kept)
        self._buckets = buckets
        self._seconds = list(buckets)
        heapq.heapify(self._seconds)
        self._entries = entries
