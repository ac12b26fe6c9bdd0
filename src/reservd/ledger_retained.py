"""What the ledger keeps once a reservation or an adjustment is finished: its idempotency
record (reservd.finished), so that a retry with the same id gets the original outcome for
``retention_seconds``, and the bound on how many are kept (``retained_max``). A mixin of
reservd.ledger.Ledger.
"""
from __future__ import annotations

from reservd import finished
from reservd.finished import FinishedAdjustment, FinishedReservation
from reservd.outcomes import Code, Rejection, ReserveOutcome
from reservd.store import Reservation, State, StockOutcome


class RetainedRecords:
    """Finished reservations and adjustments: their views, their replays, their retention."""

    def get(self, reservation_id: str) -> Reservation | None:
        """The reservation as it stands (a view decoded from its compact record), live or
        finished and still retained, or None."""
        live = self.reservations.get(reservation_id)
        if live is not None:
            return live
        record = self.finished.reservation(reservation_id)
        if record is None:
            return None
        return self._finished_view(reservation_id, finished.unpack(record)[1])

    def _replayed_finished(
        self, reservation_id: str, record: bytes, request: tuple
    ) -> ReserveOutcome | Rejection:
        """A Reserve of an id whose finished ``record`` is kept: its replay, or ALREADY_EXISTS
        for another payload."""
        kept = finished.unpack(record)[1]
        if kept.digest != finished.reserve_digest(request):
            return different_payload(reservation_id)
        return self._replayed_reserve(
            self._finished_view(reservation_id, kept), request[0], request[1]
        )

    def _finished_view(self, reservation_id: str, kept: FinishedReservation) -> Reservation:
        """A finished record as a Reservation: the lines it held or committed (request None)."""
        held = [line for line in kept.lines if line[1]]
        sku_of = self.table.sku
        channel, owner = self.reservations.origin_of(kept.origin)
        return Reservation(
            reservation_id, channel, None, tuple(sku_of(line[0]) for line in held),
            tuple(line[0] for line in held), tuple(line[1] for line in held),
            tuple(line[2] for line in held) if kept.committed else None, State(kept.state),
            kept.expires_at_ms, kept.seq, kept.finished_at_ms, owner,
        )

    def adjustment(self, adjustment_id: str) -> tuple[StockOutcome, int] | None:
        """The outcome of a retained adjustment and its finished_at_ms, or None."""
        record = self.finished.adjustment(adjustment_id)
        if record is None:
            return None
        kept = finished.unpack(record)[1]
        return self._adjustment_outcome(kept, False), kept.finished_at_ms

    def _adjustment_outcome(self, kept: FinishedAdjustment, replayed: bool) -> StockOutcome:
        return StockOutcome(
            self.table.sku(kept.handle), kept.on_hand, kept.reserved, kept.committed,
            kept.previous_on_hand, max(0, kept.reserved + kept.committed - kept.on_hand),
            kept.seq, replayed,
        )

    def _retention_full(self) -> Rejection | None:
        """New reservations and adjustments are refused rather than forgetting an idempotency
        record before its retention_seconds: a retry after an early forget would apply twice.
        (Holds that finish meanwhile are still retained: at most retained_max + live.)"""
        if self.retained < self.config.retained_max:
            return None
        return Rejection(
            Code.RESOURCE_EXHAUSTED,
            f"{self.retained} finished reservations and adjustments are kept for their "
            f"{self.config.retention_seconds} s idempotency window: retained_max reached "
            f"(raise retained_max or lower retention_seconds)",
        )

    @property
    def retained(self) -> int:
        """Idempotency records kept: finished reservations plus adjustments."""
        return len(self.finished)

    @property
    def retained_adjustments(self) -> int:
        return self.finished.adjustments

    def retained_oldest_seconds(self) -> float:
        """Age of the oldest idempotency record kept (0 when none), in seconds."""
        oldest = self.finished.oldest_ms()
        if oldest is None:
            return 0.0
        return max(0, self.clock.now_ms() - oldest) / 1000

    def _replayed_reserve(
        self, existing: Reservation, skus: tuple[str, ...], requested: tuple[int, ...]
    ) -> ReserveOutcome:
        """The original outcome of a Reserve retried with the same payload (``skus``,
        ``requested``), as it stands now: a held, committed or fulfilled reservation is still
        granted; a released or expired one is not (granted False, quantities 0), so a retry
        never mistakes a lost hold for a live one."""
        if existing.state in (State.RELEASED, State.EXPIRED):
            return ReserveOutcome(
                False, skus, requested, (0,) * len(skus), self._available(skus), 0,
                existing.state, existing.seq, True,
            )
        held = dict(zip(existing.skus, existing.quantities))
        granted = tuple(held.get(sku, 0) for sku in skus)
        return ReserveOutcome(
            True, skus, requested, granted, self._available(skus), existing.expires_at_ms,
            existing.state, existing.seq, True,
        )

    def _finish(self, current: Reservation, state: State, at_ms: int, seq: int) -> Reservation:
        """The reservation leaves the live store for a finished record (reservd.finished)."""
        reservation_id = current.reservation_id
        self.finished.add(finished.pack_reservation(
            finished.reservation_key(reservation_id),
            FinishedReservation(
                finished.reserve_digest(current.request), seq, at_ms, int(state),
                self.reservations.origin(current.channel, current.owner),
                current.expires_at_ms, current.committed is not None,
                self.reservations.request_lines(reservation_id),
            ),
        ))
        del self.reservations[reservation_id]
        updated = current._replace(state=state, seq=seq, finished_at_ms=at_ms, request=None)
        self.live -= 1
        assert self.live >= 0
        if current.state is State.HELD:
            self.held -= 1
            self._hold_ended_or_moved()
        return updated

    def _prune(self, now_ms: int) -> None:
        """Forget idempotency records older than retention_seconds (and only those: the window
        is the promise; retained_max refuses new work instead of cutting it)."""
        horizon_ms = now_ms - self.config.retention_seconds * 1000
        self.finished.forget(horizon_ms)
        self.states.prune(horizon_ms)
        self.incoming.prune(horizon_ms)
        self._prune_state_history()


def different_payload(reservation_id: str) -> Rejection:
    """A Reserve that reuses an id with another payload."""
    return Rejection(
        Code.ALREADY_EXISTS, f"reservation {reservation_id!r} exists with a different payload"
    )
