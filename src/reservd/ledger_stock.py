"""The ledger's stock commands: recounts and adjustments, the stock states and returns (rules in
reservd.stockstates) and incoming stock (reservd.incoming), mixed into reservd.ledger.Ledger."""
from __future__ import annotations

import logging

from reservd import finished, incoming, records, stockstates
from reservd.finished import FinishedAdjustment
from reservd.outcomes import Code, Rejection
from reservd.records import RecordType
from reservd.statehistory import Breakdown
from reservd.store import StockOutcome

log = logging.getLogger("reservd.ledger")


# Any sequence: the change ring's entries up to the newest.
_SEQ_ALL = (1 << 63) - 1


class StockCommands:
    """Needs the Ledger's table, clock, config, finished, states, incoming, state_history,
    channels, planning, alert_rules, stock_dirty, _execute, _unwritable, _retention_full,
    _adjustment_outcome, _ghost_alert and _reorder_alert."""

    def breakdown(self, sku: str) -> Breakdown:
        """``sku``'s units by state now: quarantine, damaged, quality_control, safety_stock
        (on hand, never available) and incoming (not on hand)."""
        return (*self.states.of(sku), self.incoming.of(sku))

    def set_stock(
        self,
        adjustment_id: str,
        sku: str,
        on_hand: int,
        expected_on_hand: int | None,
        reason: str,
        actor: str = "",
    ) -> StockOutcome | Rejection:
        """A recount: on_hand becomes ``on_hand`` (creating the SKU). A recount below
        reserved + committed is accepted (reality wins) and reported as a shortfall.
        ``actor``: the caller's identity, logged with the command (audit)."""
        return self._stock_change(
            RecordType.SET_STOCK, adjustment_id, sku, on_hand, expected_on_hand, reason, actor
        )

    def adjust_stock(
        self,
        adjustment_id: str,
        sku: str,
        delta: int,
        expected_on_hand: int | None,
        reason: str,
        actor: str = "",
    ) -> StockOutcome | Rejection:
        """A receipt (delta > 0), damage or shrinkage (delta < 0) of an existing SKU.
        ``actor``: the caller's identity, logged with the command (audit)."""
        return self._stock_change(
            RecordType.ADJUST_STOCK, adjustment_id, sku, delta, expected_on_hand, reason, actor
        )

    def _stock_change(
        self, kind: RecordType, adjustment_id: str, sku: str, value: int,
        expected_on_hand: int | None, reason: str, actor: str = "",
    ) -> StockOutcome | Rejection:
        request = (kind, sku, value, expected_on_hand)
        record = self.finished.adjustment(adjustment_id)
        if record is not None:
            _, kept = finished.unpack(record)
            if kept.digest != finished.adjustment_digest(request):
                return Rejection(
                    Code.ALREADY_EXISTS,
                    f"adjustment {adjustment_id!r} exists with a different payload",
                )
            return self._adjustment_outcome(kept, True)
        refused = self._retention_full()
        if refused is not None:
            return refused
        handle = self.table.lookup(sku)
        if handle < 0 and kind is RecordType.ADJUST_STOCK:
            return Rejection(Code.NOT_FOUND, f"sku {sku!r} is unknown: SetStock creates it")
        on_hand = self.table.counters(handle)[0] if handle >= 0 else 0
        if expected_on_hand is not None and expected_on_hand != on_hand:
            return Rejection(
                Code.FAILED_PRECONDITION,
                f"sku {sku!r}: on_hand is {on_hand}, not the expected {expected_on_hand}",
            )
        if kind is RecordType.ADJUST_STOCK and on_hand + value < 0:
            return Rejection(
                Code.FAILED_PRECONDITION,
                f"{value} would make on_hand of sku {sku!r} {on_hand + value} (< 0)", "delta",
            )
        on_hand_max = self.config.limits.on_hand_max
        if kind is RecordType.ADJUST_STOCK and on_hand + value > on_hand_max:
            return Rejection(
                Code.FAILED_PRECONDITION,
                f"{value} would make on_hand of sku {sku!r} {on_hand + value} "
                f"(> on_hand_max {on_hand_max})", "delta",
            )
        if kind is RecordType.SET_STOCK and not 0 <= value <= on_hand_max:
            return Rejection(
                Code.FAILED_PRECONDITION,
                f"{value} is not within [0, on_hand_max {on_hand_max}]", "on_hand",
            )
        if handle < 0 and len(self.table) >= self.config.skus_max:
            # Decided here, never in _apply_stock: replay creates what was logged, whatever
            # skus_max is now.
            return Rejection(
                Code.RESOURCE_EXHAUSTED,
                f"sku {sku!r} would be SKU {len(self.table) + 1}: skus_max {self.config.skus_max} "
                "reached", "sku",
            )
        refused = self._unwritable()
        if refused is not None:
            return refused
        command = records.StockChange(
            self.clock.now_ms(), adjustment_id, sku, value, expected_on_hand, reason, actor
        )
        outcome, _ = self._execute(kind, command)
        if outcome.shortfall:
            log.warning(
                "stock shortfall",
                extra={"sku": sku, "on_hand": outcome.on_hand, "reserved": outcome.reserved,
                       "committed": outcome.committed, "shortfall": outcome.shortfall,
                       "reason": reason, "adjustment_id": adjustment_id},
            )
        return outcome

    def receive_return(
        self, return_id: str, sku: str, units: int, reservation_id: str
    ) -> stockstates.StateOutcome | Rejection:
        """Returned ``units`` of ``sku`` arrive into quarantine: on hand, not available."""
        return self._state_command(RecordType.RECEIVE_RETURN, self.states.decide_return(
            return_id, sku, units, reservation_id, self.clock.now_ms(),
            self.config.limits.on_hand_max,
        ))

    def inspect(
        self, return_id: str, sellable_units: int, damaged_units: int
    ) -> stockstates.StateOutcome | Rejection:
        """End a return's quarantine: sellable units become available, damaged ones damaged."""
        return self._state_command(RecordType.INSPECT, self.states.decide_inspect(
            return_id, sellable_units, damaged_units, self.clock.now_ms()
        ))

    def write_off(
        self, change_id: str, sku: str, units: int, state: str
    ) -> stockstates.StateOutcome | Rejection:
        """Remove ``units`` of an unsellable ``state`` (damaged): on_hand falls with it."""
        return self._state_command(RecordType.WRITE_OFF, self.states.decide_write_off(
            change_id, sku, units, state, self.clock.now_ms()
        ))

    def hold_stock(
        self, change_id: str, sku: str, state: str, units: int
    ) -> stockstates.StateOutcome | Rejection:
        """Set ``units`` of ``sku`` aside in a held ``state`` (safety_stock, quality_control)
        from the shared bucket (units > 0), or return them to it (units < 0)."""
        available = self.channels.available(sku)
        shared = None if available is None else self.channels.shared(sku, available)
        return self._state_command(RecordType.HOLD_STOCK, self.states.decide_hold(
            change_id, sku, state, units, shared, self.clock.now_ms()
        ))

    def expect_receipt(
        self, po_id: str, sku: str, units: int, eta_ms: int
    ) -> incoming.IncomingOutcome | Rejection:
        """A purchase order: ``units`` of ``sku`` due at ``eta_ms`` (incoming, not on hand)."""
        return self._state_command(RecordType.EXPECT_RECEIPT, self.incoming.decide_expect(
            po_id, sku, units, eta_ms, self.clock.now_ms()
        ))

    def receive(
        self, receipt_id: str, po_id: str, units: int
    ) -> incoming.IncomingOutcome | Rejection:
        """A (partial) receipt against a purchase order; over-receipt is reported."""
        return self._state_command(RecordType.RECEIVE, self.incoming.decide_receive(
            receipt_id, po_id, units, self.clock.now_ms(), self.config.limits.on_hand_max
        ))

    def _state_command(self, kind: RecordType, decided):
        if isinstance(decided, stockstates.Refusal):
            return Rejection(Code[decided.code], decided.message, decided.field)
        if isinstance(decided, (stockstates.StateOutcome, incoming.IncomingOutcome)):
            return decided  # an idempotent repeat
        refused = self._unwritable()
        if refused is not None:
            return refused
        outcome, _ = self._execute(kind, decided)
        return outcome

    def _apply_stock(
        self, kind: RecordType, command: records.StockChange, seq: int
    ) -> StockOutcome:
        if kind is RecordType.SET_STOCK:
            recount = self.table.lookup(command.sku) >= 0
            handle = self.table.ensure(command.sku)
            previous = self.table.set_on_hand(handle, command.value, seq)
            if recount:  # creating a SKU is not a count
                self.planning.on_count(command.sku, command.at_ms, previous, command.value)
                self._ghost_alert(command.sku)
        else:
            handle = self.table.lookup(command.sku)
            assert handle >= 0, f"adjust of unknown sku {command.sku!r}"
            previous = self.table.adjust_on_hand(handle, command.value, seq) - command.value
        on_hand, reserved, committed = self.table.counters(handle)
        kept = FinishedAdjustment(
            finished.adjustment_digest(
                (kind, command.sku, command.value, command.expected_on_hand)
            ),
            seq, command.at_ms, int(kind), handle, on_hand, reserved, committed, previous,
        )
        self.finished.add(
            finished.pack_adjustment(finished.adjustment_key(command.adjustment_id), kept)
        )
        self.stock_dirty.add(command.sku)
        self.alert_rules.stock_changed(command.sku, on_hand, reserved, committed, command.at_ms)
        return StockOutcome(
            command.sku, on_hand, reserved, committed, previous,
            max(0, reserved + committed - on_hand), seq, False,
        )

    def _apply_state(self, kind: RecordType, command, seq: int):
        """A stock-state or incoming command, live and in replay; records the SKU's breakdown
        before and after it (reservd.statehistory), and gives it a change ring entry when the
        counters do not move (an ExpectReceipt), so watchers and the mirror see it."""
        if kind is RecordType.INSPECT:
            sku = self.states.returns[command.return_id].sku
        elif kind is RecordType.RECEIVE:
            sku = self.incoming.orders[command.po_id].sku
        else:
            sku = command.sku
        before = self.breakdown(sku)
        if kind in (RecordType.EXPECT_RECEIPT, RecordType.RECEIVE):
            outcome = self.incoming.apply(kind, command, seq)
            self._reorder_alert(sku)  # incoming moved, maybe with no table change
        else:
            outcome = self.states.apply(kind, command, seq)
        handle = self.table.lookup(sku)
        if kind is RecordType.EXPECT_RECEIPT and handle >= 0:
            self.table.touch(handle, seq)
        self.state_history.record(sku, seq, before, self.breakdown(sku), self._ring_oldest(seq))
        return outcome

    def _ring_oldest(self, default: int) -> int:
        """The sequence of the change ring's oldest entry (``default`` when it is empty)."""
        _, oldest = self.table.changes(self.table.ring_tail, 1, _SEQ_ALL)
        return oldest[0][0] if oldest else default

    def _prune_state_history(self) -> None:
        """Forget the breakdowns of state commands that left the ring (reservd.statehistory)."""
        self.state_history.prune(self._ring_oldest(0))
