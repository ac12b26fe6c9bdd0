"""Stock states beside on_hand, and the returns flow: the rules of issue 12's first part.

Vocabulary (all in units of stock items, per SKU):

- ``quarantine``: returned units awaiting inspection. On hand, never available.
- ``damaged``: units inspected as unsellable, until written off. On hand, never available.
- ``quality_control``: units held for checks. On hand, never available.
- ``safety_stock``: units an operator sets aside (Shopify's state of that name). On hand, never
  available to any channel.
- ``unsellable`` = quarantine + damaged + quality_control + safety_stock: the one row counter
  the table keeps, so ``available = on_hand - reserved - committed - unsellable`` is checked
  atomically by every Reserve (reservd.table; :func:`available` is the same formula for the
  service).

Returns flow: ``ReceiveReturn`` puts units in quarantine (on_hand and unsellable rise together,
available does not move); ``Inspect`` ends a return's quarantine: sellable units leave
``unsellable`` and so become available, damaged ones move to ``damaged``; ``WriteOff`` removes
damaged units (on_hand and unsellable fall together). Each is idempotent by its id.

Held states: ``HoldStock`` moves units from the ``shared`` bucket into ``safety_stock`` or
``quality_control`` (units > 0) or back (units < 0); on_hand does not move, unsellable moves by
the units. Taking from ``shared`` only keeps the named buckets' free units whole (their sum
with shared is ``available``). Its change ids share the write-offs' idempotency records (and
``write_offs_max``): the state tells the two apart (WRITE_OFF_STATES and HOLD_STATES are
disjoint).

This module decides (checks every precondition, returning a :class:`Refusal` value) and applies
(the table asserts); the ledger orders decide -> apply -> log, so replay reuses :meth:`apply`.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

from reservd import records
from reservd.records import RecordType
from reservd.store import Fifo

QUARANTINE, DAMAGED, QUALITY_CONTROL, SAFETY_STOCK = 0, 1, 2, 3
STATE_NAMES = ("quarantine", "damaged", "quality_control", "safety_stock")
WRITE_OFF_STATES = ("damaged",)
HOLD_STATES = ("safety_stock", "quality_control")


def available(on_hand: int, reserved: int, committed: int, unsellable: int) -> int:
    """Units a Reserve may grant: the table's formula, for readers outside the table."""
    return on_hand - reserved - committed - unsellable


class Refusal(NamedTuple):
    """A refused request: the ledger turns it into a Rejection (code is a ledger.Code name)."""

    code: str
    message: str
    field: str = ""


class StateOutcome(NamedTuple):
    """What a state command left: the SKU's counters and states right after it."""

    sku: str
    on_hand: int
    reserved: int
    committed: int
    quarantine: int
    damaged: int
    quality_control: int
    safety_stock: int
    seq: int
    replayed: bool


class Return(NamedTuple):
    sku: str
    units: int
    reservation_id: str
    at_ms: int  # received, unix ms
    inspected: bool
    sellable_units: int
    damaged_units: int
    outcome: StateOutcome  # of the last command on this return (receive, then inspect)
    inspected_at_ms: int = 0  # unix ms; the retention clock of an inspected return starts here


class WrittenOff(NamedTuple):
    request: tuple  # (sku, units, state): the idempotency key
    outcome: StateOutcome
    at_ms: int


class StockStates:
    """Per-SKU state counters, returns by id and write-offs by id, over the counter table."""

    def __init__(self, table, returns_max: int = 1 << 62, write_offs_max: int = 1 << 62) -> None:
        self.table = table
        # sku -> [quarantine, damaged, quality_control, safety_stock]
        self.counts: dict[str, list[int]] = {}
        # Returns (in quarantine, or inspected and kept retention_seconds for an idempotent
        # repeat) and write-offs (idempotency records, kept retention_seconds): each bounded, a
        # new one beyond its bound is refused RESOURCE_EXHAUSTED before anything is logged.
        self.returns: dict[str, Return] = {}
        self.write_offs: dict[str, WrittenOff] = {}
        self.returns_max = returns_max
        self.write_offs_max = write_offs_max
        self._inspected = Fifo()  # (inspected_at_ms, return_id)
        # Returns awaiting inspection, by arrival: the head is the oldest still waiting once
        # inspect has dropped the inspected ones before it (metrics and the backlog alert read
        # it from other threads and tasks, without a scan).
        self._quarantined = Fifo()  # (at_ms, return_id)
        self.awaiting = 0  # returns in quarantine
        self._written_off = Fifo()  # (at_ms, change_id)

    def of(self, sku: str) -> tuple[int, int, int, int]:
        """(quarantine, damaged, quality_control, safety_stock) of ``sku``, zeros if none."""
        row = self.counts.get(sku)
        return (0, 0, 0, 0) if row is None else (row[0], row[1], row[2], row[3])

    # -- decide ---------------------------------------------------------------------------------

    def decide_return(
        self, return_id: str, sku: str, units: int, reservation_id: str, now_ms: int,
        on_hand_max: int,
    ) -> records.ReceiveReturn | StateOutcome | Refusal:
        previous = self.returns.get(return_id)
        if previous is not None:
            if (previous.sku, previous.units, previous.reservation_id) != (
                sku, units, reservation_id
            ):
                return Refusal("ALREADY_EXISTS", f"return {return_id!r} exists with a different "
                               "payload")
            return previous.outcome._replace(replayed=True)
        handle = self.table.lookup(sku)
        if handle < 0:
            return Refusal("NOT_FOUND", f"sku {sku!r} is unknown: SetStock creates it", "sku")
        if len(self.returns) >= self.returns_max:
            return Refusal("RESOURCE_EXHAUSTED", f"{len(self.returns)} returns are kept: "
                           "returns_max reached (inspect returns, or raise returns_max)")
        on_hand = self.table.counters(handle)[0]
        if on_hand + units > on_hand_max:
            return Refusal(
                "FAILED_PRECONDITION",
                f"{units} returned units would make on_hand of sku {sku!r} {on_hand + units} "
                f"(> on_hand_max {on_hand_max})", "units",
            )
        return records.ReceiveReturn(now_ms, return_id, sku, units, reservation_id)

    def decide_inspect(
        self, return_id: str, sellable_units: int, damaged_units: int, now_ms: int
    ) -> records.Inspect | StateOutcome | Refusal:
        entry = self.returns.get(return_id)
        if entry is None:
            return Refusal("NOT_FOUND", f"return {return_id!r} is unknown", "return_id")
        if entry.inspected:
            if (entry.sellable_units, entry.damaged_units) != (sellable_units, damaged_units):
                return Refusal(
                    "ALREADY_EXISTS",
                    f"return {return_id!r} was inspected as {entry.sellable_units} sellable, "
                    f"{entry.damaged_units} damaged",
                )
            return entry.outcome._replace(replayed=True)
        if sellable_units + damaged_units != entry.units:
            return Refusal(
                "FAILED_PRECONDITION",
                f"return {return_id!r} holds {entry.units} units in quarantine: sellable_units "
                f"+ damaged_units must be {entry.units}, not {sellable_units + damaged_units}",
                "sellable_units",
            )
        return records.Inspect(now_ms, return_id, sellable_units, damaged_units)

    def decide_write_off(
        self, change_id: str, sku: str, units: int, state: str, now_ms: int
    ) -> records.WriteOff | StateOutcome | Refusal:
        repeat = self._repeat(change_id, (sku, units, state), WRITE_OFF_STATES)
        if repeat is not None:
            return repeat
        if state not in WRITE_OFF_STATES:
            return Refusal(
                "FAILED_PRECONDITION", f"state must be one of {', '.join(WRITE_OFF_STATES)}, "
                f"not {state!r}", "state",
            )
        held = self.of(sku)[STATE_NAMES.index(state)]
        on_hand = self._on_hand(sku)
        if units > held or units > on_hand:
            return Refusal(
                "FAILED_PRECONDITION",
                f"sku {sku!r} has {held} {state} units and {on_hand} on hand: cannot write off "
                f"{units}", "units",
            )
        return records.WriteOff(now_ms, change_id, sku, units, state)

    def decide_hold(
        self, change_id: str, sku: str, state: str, units: int, shared: int | None, now_ms: int
    ) -> records.HoldStock | StateOutcome | Refusal:
        """``units`` > 0 into a held ``state`` from the shared bucket, which has ``shared``
        free units (None: unknown SKU); < 0 back to shared."""
        repeat = self._repeat(change_id, (sku, units, state), HOLD_STATES)
        if repeat is not None:
            return repeat
        if state not in HOLD_STATES:
            return Refusal("FAILED_PRECONDITION", f"state must be one of "
                           f"{', '.join(HOLD_STATES)}, not {state!r}", "state")
        if shared is None:
            return Refusal("NOT_FOUND", f"sku {sku!r} is unknown: SetStock creates it", "sku")
        held = self.of(sku)[STATE_NAMES.index(state)]
        if units > max(shared, 0):
            return Refusal("FAILED_PRECONDITION", f"sku {sku!r} has {max(shared, 0)} free units "
                           f"in the shared bucket: cannot hold {units} in {state}", "units")
        if -units > held:
            return Refusal("FAILED_PRECONDITION", f"sku {sku!r} has {held} {state} units: "
                           f"cannot return {-units}", "units")
        return records.HoldStock(now_ms, change_id, sku, units, state)

    def _repeat(self, change_id: str, request: tuple, states: tuple[str, ...]
                ) -> StateOutcome | Refusal | None:
        """A repeat of a write-off or hold (the same change id): its outcome, or ALREADY_EXISTS
        for a different payload; RESOURCE_EXHAUSTED when a new one would pass the bound."""
        previous = self.write_offs.get(change_id)
        if previous is not None:
            if previous.request != request or request[2] not in states:
                return Refusal("ALREADY_EXISTS", f"change {change_id!r} exists with a different "
                               "payload", "change_id")
            return previous.outcome._replace(replayed=True)
        if len(self.write_offs) >= self.write_offs_max:
            return Refusal("RESOURCE_EXHAUSTED", f"{len(self.write_offs)} write-offs and holds "
                           "are kept for their idempotency window: write_offs_max reached")
        return None

    # -- apply (live and replay) ----------------------------------------------------------------

    def apply(self, kind: RecordType, command, seq: int) -> StateOutcome:
        """Apply a decided command as mutation ``seq``; asserts (a bug) if it does not fit."""
        if kind is RecordType.RECEIVE_RETURN:
            self._move(command.sku, command.units, QUARANTINE, command.units, seq)
            outcome = self._outcome(command.sku, seq)
            self.returns[command.return_id] = Return(
                command.sku, command.units, command.reservation_id, command.at_ms, False, 0, 0,
                outcome,
            )
            self._quarantined.append(command.at_ms, command.return_id)
            self.awaiting += 1
            return outcome
        if kind is RecordType.INSPECT:
            entry = self.returns[command.return_id]
            assert not entry.inspected, f"return {command.return_id!r} inspected twice"
            assert command.sellable_units + command.damaged_units == entry.units
            row = self.counts[entry.sku]
            assert row[QUARANTINE] >= entry.units, (entry.sku, row)
            row[QUARANTINE] -= entry.units
            row[DAMAGED] += command.damaged_units
            self._table_move(entry.sku, 0, -command.sellable_units, seq)
            outcome = self._outcome(entry.sku, seq)
            self.returns[command.return_id] = entry._replace(
                inspected=True, sellable_units=command.sellable_units,
                damaged_units=command.damaged_units, outcome=outcome,
                inspected_at_ms=command.at_ms,
            )
            self._inspected.append(command.at_ms, command.return_id)
            self.awaiting -= 1
            self._drop_inspected()
            return outcome
        index = STATE_NAMES.index(command.state)
        if kind is RecordType.HOLD_STOCK:
            assert command.state in HOLD_STATES, command
            self._move(command.sku, 0, index, command.units, seq)
        else:
            assert kind is RecordType.WRITE_OFF, kind
            self._move(command.sku, -command.units, index, -command.units, seq)
        outcome = self._outcome(command.sku, seq)
        self.write_offs[command.change_id] = WrittenOff(
            (command.sku, command.units, command.state), outcome, command.at_ms
        )
        self._written_off.append(command.at_ms, command.change_id)
        return outcome

    def prune(self, horizon_ms: int) -> None:
        """Forget inspected returns and write-offs done at or before ``horizon_ms`` (their
        retention_seconds are over); returns still in quarantine are never forgotten."""
        while len(self._inspected) and self._inspected.oldest_ms() <= horizon_ms:
            at_ms, return_id = self._inspected.popleft()
            entry = self.returns.get(return_id)
            if entry is not None and entry.inspected and entry.inspected_at_ms == at_ms:
                del self.returns[return_id]
        while len(self._written_off) and self._written_off.oldest_ms() <= horizon_ms:
            at_ms, change_id = self._written_off.popleft()
            entry = self.write_offs.get(change_id)
            if entry is not None and entry.at_ms == at_ms:
                del self.write_offs[change_id]

    def oldest_quarantine_ms(self) -> int | None:
        """When the oldest return still awaiting inspection arrived (unix ms), or None."""
        return self._quarantined.oldest_ms()

    def oldest_quarantine_id(self) -> str | None:
        return self._quarantined.oldest_key()

    def _drop_inspected(self) -> None:
        queue = self._quarantined
        while len(queue):
            entry = self.returns.get(queue.oldest_key())
            if entry is not None and not entry.inspected:
                return
            queue.popleft()

    def _move(self, sku: str, on_hand_delta: int, state: int, units: int, seq: int) -> None:
        row = self.counts.setdefault(sku, [0, 0, 0, 0])
        assert row[state] + units >= 0, f"{STATE_NAMES[state]} of sku {sku!r} would go negative"
        self._table_move(sku, on_hand_delta, units, seq)
        row[state] += units

    def _table_move(self, sku: str, on_hand_delta: int, unsellable_delta: int, seq: int) -> None:
        handle = self.table.lookup(sku)
        assert handle >= 0, f"state change of unknown sku {sku!r}"
        try:
            self.table.move_unsellable(handle, on_hand_delta, unsellable_delta, seq)
        except ValueError as error:  # decide checked it: not fitting is a bug
            raise AssertionError(str(error)) from None

    def _on_hand(self, sku: str) -> int:
        handle = self.table.lookup(sku)
        return self.table.counters(handle)[0] if handle >= 0 else 0

    def _outcome(self, sku: str, seq: int) -> StateOutcome:
        on_hand, reserved, committed = self.table.counters(self.table.lookup(sku))
        return StateOutcome(sku, on_hand, reserved, committed, *self.of(sku), seq, False)

    # -- snapshots ------------------------------------------------------------------------------

    def unsellable_of(self, sku: str) -> int:
        return sum(self.of(sku))

    def snapshot_rows(self) -> tuple[list, list, list, list]:
        """(state rows, return rows, write-off rows, safety-stock rows) as plain tuples for
        reservd.state_codec (safety_stock has its own section: format 8)."""
        states = [(sku, *row[:3]) for sku, row in self.counts.items() if any(row[:3])]
        safety = [(sku, row[3]) for sku, row in self.counts.items() if row[3]]
        returns = [(return_id, *entry[:7], *entry.outcome[4:7], entry.outcome.seq,
                    entry.inspected_at_ms)
                   for return_id, entry in self.returns.items()]
        write_offs = [(change_id, *w.request, w.at_ms, w.outcome.seq)
                      for change_id, w in self.write_offs.items()]
        return states, returns, write_offs, safety

    def restore_state(self, row: tuple) -> None:
        sku, quarantine, damaged, quality_control = row
        self._restore_counts(sku, (QUARANTINE, DAMAGED, QUALITY_CONTROL),
                             (quarantine, damaged, quality_control))

    def restore_safety_stock(self, row: tuple) -> None:
        sku, units = row
        self._restore_counts(sku, (SAFETY_STOCK,), (units,))

    def _restore_counts(self, sku: str, indexes: tuple[int, ...], values: tuple[int, ...]
                        ) -> None:
        handle = self.table.lookup(sku)
        if handle < 0:
            raise ValueError(f"snapshot has states for sku {sku!r} but no stock row")
        row = self.counts.setdefault(sku, [0, 0, 0, 0])
        for index, value in zip(indexes, values):
            row[index] = value
        self.table.restore(sku, *self.table.counters(handle), sum(row))

    def restore_return(self, row: tuple, now_ms: int) -> None:
        """``now_ms``: the retention start of an inspected return from a format-4 snapshot,
        which has no inspection time (kept a whole window from the restart: never too short)."""
        (return_id, sku, units, reservation_id, at_ms, inspected, sellable, damaged,
         quarantine_then, damaged_then, quality_control_then, seq, inspected_at_ms) = row
        if inspected and inspected_at_ms is None:
            inspected_at_ms = now_ms
        handle = self.table.lookup(sku)
        counters = self.table.counters(handle) if handle >= 0 else (0, 0, 0)
        outcome = StateOutcome(sku, *counters, quarantine_then, damaged_then,
                               quality_control_then, self.of(sku)[SAFETY_STOCK], seq, False)
        self.returns[return_id] = Return(sku, units, reservation_id, at_ms, bool(inspected),
                                         sellable, damaged, outcome, inspected_at_ms or 0)
        if inspected:
            self._inspected.append(inspected_at_ms, return_id)
        else:
            self._quarantined.append(at_ms, return_id)
            self.awaiting += 1

    def restore_write_off(self, row: tuple) -> None:
        change_id, sku, units, state, at_ms, seq = row
        handle = self.table.lookup(sku)
        counters = self.table.counters(handle) if handle >= 0 else (0, 0, 0)
        outcome = StateOutcome(sku, *counters, *self.of(sku), seq, False)
        self.write_offs[change_id] = WrittenOff((sku, units, state), outcome, at_ms)
        self._written_off.append(at_ms, change_id)

    def restored(self) -> None:
        """After a snapshot restore: order the retention queues by time."""
        self._inspected.sort()
        self._written_off.sort()
        self._quarantined.sort()

    def items(self) -> Iterator[tuple[str, int, int, int, int]]:
        return ((sku, *row) for sku, row in self.counts.items())
