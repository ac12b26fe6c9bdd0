"""Held reservations' expiry: their ids bucketed by expiry second (reservd.expiry), what is
due, and the bound on stale entries. A mixin of reservd.ledger.Ledger.
"""
from __future__ import annotations

from reservd import records
from reservd.records import RecordType
from reservd.store import Reservation, State

# Stale expiry entries allowed beyond 2 * held before they are dropped.
_DEADLINES_SLACK = 64


class ExpiryCommands:
    """Expiring held reservations when their deadline passes."""

    def expire_due(self, limit: int) -> int:
        """Expire up to ``limit`` held reservations whose deadline has passed; returns the last
        sequence used (0 if none). O(1) amortised per expiry (reservd.expiry), never a scan."""
        if self._unwritable() is not None:
            return 0
        now_ms = self.clock.now_ms()
        last_seq = 0
        for reservation_id in self._deadlines.due(now_ms, limit, self._deadline_of):
            last_seq = self._expire(self.reservations[reservation_id], now_ms)
        self._prune(now_ms)
        return last_seq

    def _deadline_of(self, reservation_id: str) -> int | None:
        current = self.reservations.get(reservation_id)
        if current is None or current.state is not State.HELD:
            return None
        return current.expires_at_ms

    def next_deadline_ms(self) -> int | None:
        """The earliest deadline of a held reservation (unix ms), or None."""
        return self._deadlines.next_deadline_ms(self._deadline_of)

    @property
    def deadline_entries(self) -> int:
        """Entries in the expiry buckets (stale ones included): at most 2 * held + 64."""
        return len(self._deadlines)

    def _hold_ended_or_moved(self) -> None:
        """A hold's expiry entry just went stale: drop stale entries once they outnumber the
        held reservations."""
        if len(self._deadlines) <= 2 * self.held + _DEADLINES_SLACK:
            return
        self._deadlines.compact(self._deadline_of)
        assert len(self._deadlines) <= self.held, (len(self._deadlines), self.held)

    def _expire(self, current: Reservation, now_ms: int) -> int:
        _, seq = self._execute(RecordType.EXPIRE, records.Finish(now_ms, current.reservation_id))
        return seq
