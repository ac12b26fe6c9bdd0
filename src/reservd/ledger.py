"""The ledger: every business rule of reservd, in one place.

A mutation runs in one order, synchronously (no await in between): check every precondition
-> apply in the counter table as sequence ``self.seq + 1`` (the table asserts its invariants) ->
append the command to the log -> advance ``self.seq``. A command is therefore logged only once it
has been applied, and replay feeds logged commands back through the same ``_apply_*`` code, so
replaying a logged command cannot fail and recovery rebuilds exactly what was acknowledged. The
caller waits for the command's durability before it answers.

Business outcomes are values (:class:`Rejection`, ``granted=False``), not exceptions; a broken
invariant raises AssertionError and stops the daemon, and recovery takes over.
"""
from __future__ import annotations

import logging
from typing import Protocol, Sequence

from reservd import (
    alerts, finished, incoming, planning, planning_records, records, stockstates,
)
from reservd.alertrules import AlertRules
from reservd.channels import Channels
from reservd.config import Config
from reservd.expiry import Deadlines
from reservd.ledger_channels import ChannelCommands
from reservd.ledger_expiry import ExpiryCommands
from reservd.ledger_planning import PlanningCommands
from reservd.ledger_retained import RetainedRecords, different_payload
from reservd.ledger_rules import (
    ENCODERS as _RULE_ENCODERS, RULE_KINDS as _RULE_RECORDS, RuleCommands,
)
from reservd.ledger_snapshot import SnapshotCommands
from reservd.ledger_stock import StockCommands
# The ledger's answers live in reservd.outcomes; importing them from here keeps working.
from reservd.outcomes import Code, Rejection, ReservationOutcome, ReserveOutcome
from reservd.records import RecordType
from reservd.statehistory import StateHistory
from reservd.store import Reservation, ReservationStore, State, StockOutcome
from reservd.table import (
    RESERVE_FINISHED, RESERVE_INSUFFICIENT, RESERVE_UNKNOWN_SKU, CounterTable,
)

__all__ = [
    "Code", "Ledger", "Log", "Rejection", "Reservation", "ReservationOutcome", "ReserveOutcome",
    "State", "StockOutcome",
]

log = logging.getLogger("reservd.ledger")

_ENCODERS = {
    RecordType.COMMIT: records.encode_commit,
    RecordType.EXTEND: records.encode_extend,
    RecordType.RELEASE: records.encode_finish,
    RecordType.FULFIL: records.encode_finish,
    RecordType.EXPIRE: records.encode_finish,
    RecordType.SET_STOCK: records.encode_stock,
    RecordType.ADJUST_STOCK: records.encode_stock,
    RecordType.SET_CHANNEL: records.encode_set_channel,
    RecordType.SET_SKU_POLICY: records.encode_sku_policy,
    RecordType.ALLOCATE: records.encode_allocate,
    RecordType.RECEIVE_RETURN: records.encode_receive_return,
    RecordType.INSPECT: records.encode_inspect,
    RecordType.WRITE_OFF: records.encode_write_off,
    RecordType.HOLD_STOCK: records.encode_hold_stock,
    RecordType.EXPECT_RECEIPT: records.encode_expect_receipt,
    RecordType.RECEIVE: records.encode_receive,
    RecordType.SET_REPLENISHMENT: planning_records.encode,
    **_RULE_ENCODERS,
}
_STATE_KINDS = (RecordType.RECEIVE_RETURN, RecordType.INSPECT, RecordType.WRITE_OFF,
                RecordType.HOLD_STOCK)
_INCOMING_KINDS = (RecordType.EXPECT_RECEIPT, RecordType.RECEIVE)


class Log(Protocol):
    """Where the ledger appends its commands (the WAL, or nothing in memory-only mode)."""

    last_seq: int
    failed: BaseException | None  # set for good once a write or fsync failed
    backlogged: bool  # the disk is too far behind to take more now

    def append(self, seq: int, type: int, payload: bytes) -> None: ...


class Ledger(
    RetainedRecords, ExpiryCommands, StockCommands, SnapshotCommands, ChannelCommands,
    PlanningCommands, RuleCommands,
):
    """Reservations over a counter table. Beside it, each a mixin of one concern: finished
    records and idempotency (reservd.ledger_retained), expiry (reservd.ledger_expiry), stock and
    its states (reservd.ledger_stock), snapshots (reservd.ledger_snapshot), channels and buckets
    (reservd.ledger_channels), replenishment (reservd.ledger_planning), velocity, rules and
    promotions (reservd.ledger_rules)."""

    def __init__(self, table: CounterTable, log_: Log, clock, config: Config) -> None:
        self.table = table
        self.log = log_
        self.clock = clock
        self.config = config
        self.seq = log_.last_seq
        # Live (held or committed) reservations: compact records, decoded on access
        # (reservd.store).
        self.reservations = ReservationStore(table)
        # Idempotency records of finished reservations and of adjustments, oldest first, by a
        # hash of their id (reservd.finished). Forgotten only once retention_seconds old.
        self.finished = finished.Table()
        self.states = stockstates.StockStates(table, config.returns_max, config.write_offs_max)
        self.incoming = incoming.Incoming(table, config.purchase_orders_max, config.receipts_max)
        self.planning = planning.Planning(config)
        # Each SKU's states at the sequences the change ring still holds (WatchStock, mirror).
        self.state_history = StateHistory()
        self.live = 0  # held + committed
        self.held = 0
        # Held reservations' ids by expiry second. An entry goes stale when its hold ends or
        # moves; stale entries are dropped once they outnumber the held reservations, so there
        # are at most 2 * held + 64 entries (O(1) amortised: dropping costs what making the
        # stale entries cost; reservd.ledger_expiry).
        self._deadlines = Deadlines()
        self.channels = Channels(table, config.channels_max, config.buckets_per_sku_max)
        self._init_rules(config)
        # Alerts raised inside applies (reservd.alerts), and the ledger's own alert rules.
        self.alerts = alerts.AlertFeed(config, clock)
        self.alert_rules = AlertRules(self.alerts, table, config)
        # Called with the sequence of every mutation right after it is applied and logged
        # (reservd.atswatch computes the ats of what is watched at that very state).
        self.on_applied = None
        # The Redis mirror's reservd.mirrorfields.FieldJournal, told the same.
        self.field_journal = None

    # -- Reservations ------------------------------------------------------------------------

    def reserve(
        self,
        reservation_id: str,
        skus: tuple[str, ...],
        quantities: tuple[int, ...],
        channel: str,
        ttl_seconds: int,
        allow_partial: bool,
        owner: str = "",
    ) -> ReserveOutcome | Rejection:
        """Hold units for a cart: all-or-nothing, or clamped per line with allow_partial.
        ``owner``: the caller's identity, recorded with it (authorization on)."""
        request = (skus, quantities, channel, ttl_seconds, allow_partial)
        existing = self.reservations.get(reservation_id)
        if existing is not None:
            if existing.request != request:
                return different_payload(reservation_id)
            if existing.state is State.HELD and existing.expires_at_ms <= self.clock.now_ms():
                # Due but not yet swept: the honest answer is that it expired.
                refused = self._unwritable()
                if refused is not None:
                    return refused
                self._expire(existing, self.clock.now_ms())
                existing = self.get(reservation_id)
            return self._replayed_reserve(existing, skus, quantities)
        refused = self._unwritable() or self._retention_full()
        if refused is None and self.live >= self.config.reservations_max:
            refused = Rejection(
                Code.RESOURCE_EXHAUSTED,
                f"{self.live} live reservations: reservations_max reached",
            )
        if refused is not None:
            # A retry of a finished reservation is answered even so (it changes nothing).
            record = self.finished.reservation(reservation_id)
            if record is None:
                return refused
            return self._replayed_finished(reservation_id, record, request)
        seq = self.seq + 1
        # The finished records are probed within the table's call (reservd._ctable).
        status, handles, granted, available = self._reserve_in_table(
            skus, quantities, channel, allow_partial, seq, reservation_id
        )
        if status == RESERVE_FINISHED:
            return self._replayed_finished(reservation_id, handles, request)
        if status == RESERVE_UNKNOWN_SKU:
            line = handles.index(-1)
            return Rejection(
                Code.NOT_FOUND, f"sku {skus[line]!r} is unknown", f"lines[{line}].sku"
            )
        if status == RESERVE_INSUFFICIENT:
            return ReserveOutcome(
                False, skus, quantities, granted, available, 0, None, 0, False
            )
        now_ms = self.clock.now_ms()
        command = records.Reserve(
            now_ms, reservation_id, channel, ttl_seconds, allow_partial,
            now_ms + ttl_seconds * 1000, skus, quantities, granted, owner,
        )
        self.alerts.begin(seq, now_ms)
        if all(granted):
            self._apply_reserve(command, skus, handles, granted, seq)
        else:
            kept = [i for i, quantity in enumerate(granted) if quantity]
            self._apply_reserve(
                command, tuple(skus[i] for i in kept), tuple(handles[i] for i in kept),
                tuple(granted[i] for i in kept), seq,
            )
        self._append(seq, RecordType.RESERVE, records.encode_reserve(command))
        return ReserveOutcome(
            True, skus, quantities, granted, available, command.expires_at_ms, State.HELD,
            seq, False,
        )

    def commit(
        self, reservation_id: str, lines: dict[str, int] | None
    ) -> ReservationOutcome | Rejection:
        """Soft to hard allocation. ``lines`` commits fewer units of the SKUs it names; the rest
        of those lines returns to available."""
        current = self._find(reservation_id, "commit")
        if isinstance(current, Rejection):
            return current
        if lines is not None:
            for sku in lines:
                if sku not in current.skus:
                    return Rejection(
                        Code.FAILED_PRECONDITION,
                        f"reservation {reservation_id!r} holds no units of sku {sku!r}",
                    )
        committed = tuple(
            current.quantities[i] if lines is None else lines.get(sku, current.quantities[i])
            for i, sku in enumerate(current.skus)
        )
        if current.state is State.COMMITTED:
            if committed != current.committed:
                return Rejection(
                    Code.FAILED_PRECONDITION,
                    f"reservation {reservation_id!r} is already committed with other quantities",
                )
            return ReservationOutcome(current, current.seq, True)
        if current.state is not State.HELD:
            return self._finished_rejection(current, "commit")
        for sku, quantity, held in zip(current.skus, committed, current.quantities):
            if quantity > held:
                return Rejection(
                    Code.FAILED_PRECONDITION,
                    f"cannot commit {quantity} of sku {sku!r}: reservation "
                    f"{reservation_id!r} holds {held}",
                )
        refused = self._unwritable()
        if refused is not None:
            return refused
        command = records.Commit(self.clock.now_ms(), reservation_id, committed)
        updated, seq = self._execute(RecordType.COMMIT, command)
        return ReservationOutcome(updated, seq, False)

    def extend(self, reservation_id: str, ttl_seconds: int) -> ReservationOutcome | Rejection:
        """Push a held reservation's expiry to at least now + ttl_seconds."""
        current = self._find(reservation_id, "extend")
        if isinstance(current, Rejection):
            return current
        if current.state is not State.HELD:
            return self._finished_rejection(current, "extend")
        refused = self._unwritable()
        if refused is not None:
            return refused
        now_ms = self.clock.now_ms()
        expires_at_ms = now_ms + ttl_seconds * 1000
        if expires_at_ms <= current.expires_at_ms:
            # Not later: nothing changes, so nothing is logged or mirrored.
            return ReservationOutcome(current, current.seq, True)
        command = records.Extend(now_ms, reservation_id, expires_at_ms)
        updated, seq = self._execute(RecordType.EXTEND, command)
        return ReservationOutcome(updated, seq, False)

    def release(self, reservation_id: str) -> ReservationOutcome | Rejection:
        """Cancel a held or committed reservation; its units return to available. Idempotent:
        releasing a released or expired reservation answers its state."""
        current = self.get(reservation_id)
        if current is None:
            return Rejection(Code.NOT_FOUND, f"reservation {reservation_id!r} is unknown")
        if current.state in (State.RELEASED, State.EXPIRED):
            return ReservationOutcome(current, current.seq, True)
        if current.state is State.FULFILLED:
            return self._finished_rejection(current, "release")
        refused = self._unwritable()
        if refused is not None:
            return refused
        command = records.Finish(self.clock.now_ms(), reservation_id)
        updated, seq = self._execute(RecordType.RELEASE, command)
        return ReservationOutcome(updated, seq, False)

    def fulfil(self, reservation_id: str) -> ReservationOutcome | Rejection:
        """The committed units shipped: they leave on_hand. Idempotent."""
        current = self._find(reservation_id, "fulfil")
        if isinstance(current, Rejection):
            return current
        if current.state is State.FULFILLED:
            return ReservationOutcome(current, current.seq, True)
        if current.state is State.HELD:
            return Rejection(
                Code.FAILED_PRECONDITION,
                f"reservation {reservation_id!r} is held, not committed: commit it first",
            )
        if current.state is not State.COMMITTED:
            return self._finished_rejection(current, "fulfil")
        refused = self._unwritable()
        if refused is not None:
            return refused
        command = records.Finish(self.clock.now_ms(), reservation_id)
        updated, seq = self._execute(RecordType.FULFIL, command)
        return ReservationOutcome(updated, seq, False)

    # -- Replay and snapshots -------------------------------------------------------------------

    def replay(self, seq: int, record_type: int, payload: bytes) -> None:
        """Re-apply one logged command during recovery. A command that no longer applies means
        the log and the rules disagree: that is corruption, so it raises."""
        assert seq == self.seq + 1, f"replay out of order: {seq} after {self.seq}"
        command = records.decode(record_type, payload)
        kind = RecordType(record_type)
        self.alerts.begin(seq, command.at_ms, replayed=True)
        if kind is RecordType.RESERVE:
            lines = [
                (sku, granted) for sku, granted in zip(command.skus, command.granted) if granted
            ]
            skus = tuple(sku for sku, _ in lines)
            granted = tuple(quantity for _, quantity in lines)
            status, handles, _, _ = self.table.reserve(skus, granted, False, seq)
            if status != 0:
                raise AssertionError(
                    f"replay of reserve {command.reservation_id!r} at seq {seq} was refused "
                    f"(status {status}): the log does not match the table"
                )
            self._apply_reserve(command, skus, handles, granted, seq)
        else:
            self._apply(kind, command, seq)
        self.seq = seq
        self._alerts_after(seq)

    def _alerts_after(self, seq: int) -> None:
        """The command ``seq`` is applied: the rules that read its result, then no more alerts
        for it."""
        changed = self.alert_rules.applied(seq)
        if changed:
            self._reorder_alerts(changed)
        self.alerts.end(seq)

    # -- Internals ------------------------------------------------------------------------------

    def _unwritable(self) -> Rejection | None:
        """Checked before anything is applied: a change the log cannot take must not happen."""
        log_ = self.log
        if log_.failed is not None:
            return Rejection(Code.UNAVAILABLE, str(log_.failed))
        if log_.backlogged:
            return Rejection(
                Code.UNAVAILABLE, "write-ahead log is backlogged: the disk is behind; retry"
            )
        return None

    def _execute(self, kind: RecordType, command) -> tuple:
        """Apply ``command`` as the next sequence, then log it; returns (result, seq).

        Every precondition has been checked by the caller; if applying still fails (a bug: the
        table or an apply asserts), it raises before anything is logged, so the log never holds
        a command that replay could not apply.
        """
        seq = self.seq + 1
        self.alerts.begin(seq, command.at_ms)
        result = self._apply(kind, command, seq)
        self._append(seq, kind, _ENCODERS[kind](command))
        return result, seq

    def _append(self, seq: int, kind: RecordType, payload: bytes) -> None:
        self.log.append(seq, kind, payload)
        self.seq = seq
        self._alerts_after(seq)
        if self.on_applied is not None:
            self.on_applied(seq)
        if self.field_journal is not None:
            self.field_journal.on_applied(seq)

    def _rejection(self, code: str, text: str) -> Rejection:
        """A reservd.channels refusal, ``(code, "field: message")``, as a Rejection."""
        field, _, message = text.partition(": ")
        return Rejection(Code(code), message, field)

    def _apply(self, kind: RecordType, command, seq: int):
        """The one apply path of every command but Reserve, live and in replay."""
        if kind is RecordType.COMMIT:
            return self._apply_commit(command, seq)
        if kind is RecordType.EXTEND:
            return self._apply_extend(command, seq)
        if kind is RecordType.RELEASE:
            return self._apply_release(command, seq)
        if kind is RecordType.FULFIL:
            return self._apply_fulfil(command, seq)
        if kind is RecordType.EXPIRE:
            return self._apply_expire(command, seq)
        if kind in _STATE_KINDS or kind in _INCOMING_KINDS:
            return self._apply_state(kind, command, seq)
        if kind is RecordType.SET_REPLENISHMENT:
            self.planning.apply_settings(command)
            self._reorder_alert(command.sku)  # the reorder point moved
            return command
        if kind in _RULE_RECORDS:
            return self._apply_rules(kind, command, seq)
        if kind >= RecordType.SET_CHANNEL:
            return self._apply_channels(kind, command, seq)
        assert kind in (RecordType.SET_STOCK, RecordType.ADJUST_STOCK), kind
        return self._apply_stock(kind, command, seq)

    def _find(self, reservation_id: str, action: str) -> Reservation | Rejection:
        current = self.get(reservation_id)
        if current is None:
            return Rejection(Code.NOT_FOUND, f"reservation {reservation_id!r} is unknown")
        if current.state is State.HELD and current.expires_at_ms <= self.clock.now_ms():
            # Due but not yet swept by the expiry loop: it is expired, and says so.
            refused = self._unwritable()
            if refused is not None:
                return refused
            self._expire(current, self.clock.now_ms())
            return self._finished_rejection(self.get(reservation_id), action)
        return current

    def _finished_rejection(self, current: Reservation, action: str) -> Rejection:
        if current.state is State.EXPIRED:
            why = f"it expired at {current.expires_at_ms} (unix ms): reserve again"
        elif current.state is State.COMMITTED:
            why = "it is committed, and committed reservations no longer expire"
        else:
            why = f"it is {current.state.name.lower()}"
        return Rejection(
            Code.FAILED_PRECONDITION,
            f"cannot {action} reservation {current.reservation_id!r}: {why}",
        )

    def _available(self, skus: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(
            stockstates.available(*row) if row else 0 for row in self.stock_rows(skus)
        )

    def stock_rows(self, skus: Sequence[str]) -> list[tuple[int, int, int, int] | None]:
        """(on_hand, reserved, committed, unsellable) per SKU, None for an unknown one."""
        table = self.table
        rows: list[tuple[int, int, int, int] | None] = []
        for sku, counters in zip(skus, table.stock(skus)):
            rows.append(None if counters is None else (*counters, table.unsellable(
                table.lookup(sku))))
        return rows

    def _apply_reserve(
        self, command: records.Reserve, skus: tuple[str, ...], handles: tuple[int, ...],
        quantities: tuple[int, ...], seq: int,
    ) -> None:
        request = (
            command.skus, command.requested, command.channel, command.ttl_seconds,
            command.allow_partial,
        )
        self.reservations[command.reservation_id] = Reservation(
            command.reservation_id, command.channel, request, skus, handles, quantities, None,
            State.HELD, command.expires_at_ms, seq, 0, command.owner,
        )
        self._deadlines.push(command.expires_at_ms, command.reservation_id)
        self.live += 1
        self.held += 1
        self.channels.apply_reserve(command.reservation_id, command.channel, skus, quantities)
        self._track_reserve(command.channel, skus, quantities, command.at_ms)

    def _apply_commit(self, command: records.Commit, seq: int) -> Reservation:
        current = self.reservations[command.reservation_id]
        assert current.state is State.HELD, f"commit of {current.state.name} {current}"
        self.table.commit(current.handles, current.quantities, command.committed, seq)
        self.planning.on_commit(current.skus, command.committed, command.at_ms)
        self.channels.apply_commit(
            command.reservation_id, dict(zip(current.skus, command.committed))
        )
        updated = current._replace(state=State.COMMITTED, committed=command.committed, seq=seq)
        self.reservations[command.reservation_id] = updated
        self.held -= 1
        self._hold_ended_or_moved()
        return updated

    def _apply_extend(self, command: records.Extend, seq: int) -> Reservation:
        current = self.reservations[command.reservation_id]
        assert current.state is State.HELD, f"extend of {current.state.name} {current}"
        updated = current._replace(expires_at_ms=command.expires_at_ms, seq=seq)
        self.reservations[command.reservation_id] = updated
        # Logs written before no-op extends were skipped may hold one that moves nothing.
        if command.expires_at_ms != current.expires_at_ms:
            self._deadlines.push(command.expires_at_ms, command.reservation_id)
            self._hold_ended_or_moved()
        return updated

    def _apply_release(self, command: records.Finish, seq: int) -> Reservation:
        current = self.reservations[command.reservation_id]
        if current.state is State.HELD:
            self.table.release(current.handles, current.quantities, seq)
        else:
            assert current.state is State.COMMITTED, f"release of {current.state.name}"
            self.table.uncommit(current.handles, current.committed, seq)
        self.channels.apply_finish(command.reservation_id, fulfilled=False)
        return self._finish(current, State.RELEASED, command.at_ms, seq)

    def _apply_fulfil(self, command: records.Finish, seq: int) -> Reservation:
        current = self.reservations[command.reservation_id]
        assert current.state is State.COMMITTED, f"fulfil of {current.state.name}"
        self.table.fulfil(current.handles, current.committed, seq)
        self.channels.apply_finish(command.reservation_id, fulfilled=True)
        return self._finish(current, State.FULFILLED, command.at_ms, seq)

    def _apply_expire(self, command: records.Finish, seq: int) -> Reservation:
        current = self.reservations[command.reservation_id]
        assert current.state is State.HELD, f"expiry of {current.state.name}"
        self.table.release(current.handles, current.quantities, seq)
        self.channels.apply_finish(command.reservation_id, fulfilled=False)
        return self._finish(current, State.EXPIRED, command.at_ms, seq)

