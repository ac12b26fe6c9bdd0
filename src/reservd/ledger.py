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

import collections
import enum
import heapq
import logging
import pickle
import struct
from typing import NamedTuple, Protocol, Sequence

from reservd import records
from reservd.config import Config
from reservd.records import RecordType
from reservd.table import RESERVE_INSUFFICIENT, RESERVE_UNKNOWN_SKU, CounterTable

log = logging.getLogger("reservd.ledger")

SNAPSHOT_FORMAT = 2
_SNAPSHOT_CHUNK_ROWS = 4096
_CHUNK = struct.Struct("<I")
_ENCODERS = {
    RecordType.COMMIT: records.encode_commit,
    RecordType.EXTEND: records.encode_extend,
    RecordType.RELEASE: records.encode_finish,
    RecordType.FULFIL: records.encode_finish,
    RecordType.EXPIRE: records.encode_finish,
    RecordType.SET_STOCK: records.encode_stock,
    RecordType.ADJUST_STOCK: records.encode_stock,
}


class State(enum.IntEnum):
    """A reservation's life; numbers match reservd.v1.ReservationState."""

    HELD = 1
    COMMITTED = 2
    RELEASED = 3
    EXPIRED = 4
    FULFILLED = 5


class Code(enum.Enum):
    """Why a request was refused (mapped one to one onto gRPC status codes)."""

    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"


class Rejection(NamedTuple):
    """A refused request: ``code``, the rule it broke, and the request ``field`` it names
    (empty when it concerns the request as a whole)."""

    code: Code
    message: str
    field: str = ""

    def text(self, prefix: str = "") -> str:
        """The answer's message: ``field: message``, the field under ``prefix`` (a batch's
        ``ops[3].reserve.``)."""
        return f"{prefix}{self.field}: {self.message}" if self.field else self.message


class Reservation(NamedTuple):
    """One reservation. Immutable: a change replaces it, so a shallow copy of the ledger's
    dict is a consistent snapshot."""

    reservation_id: str
    channel: str
    request: tuple  # (skus, requested, channel, ttl_seconds, allow_partial): the idempotency key
    skus: tuple[str, ...]  # lines that hold units (granted > 0)
    handles: tuple[int, ...]
    quantities: tuple[int, ...]  # units held or, once committed, units granted
    committed: tuple[int, ...] | None
    state: State
    expires_at_ms: int
    seq: int  # sequence of the latest mutation of this reservation
    finished_at_ms: int
    owner: str = ""  # the identity that made it ("" with authorization off)


class ReserveOutcome(NamedTuple):
    granted: bool
    skus: tuple[str, ...]
    requested: tuple[int, ...]
    quantities: tuple[int, ...]  # granted per line (0 when refused)
    available: tuple[int, ...]
    expires_at_ms: int
    state: State | None
    seq: int
    replayed: bool


class ReservationOutcome(NamedTuple):
    reservation: Reservation
    seq: int  # the mutation to wait for before answering (0: nothing to wait for)
    replayed: bool


class StockOutcome(NamedTuple):
    sku: str
    on_hand: int
    reserved: int
    committed: int
    previous_on_hand: int
    shortfall: int
    seq: int
    replayed: bool


class _Adjustment(NamedTuple):
    request: tuple
    outcome: StockOutcome
    finished_at_ms: int


class Log(Protocol):
    """Where the ledger appends its commands (the WAL, or nothing in memory-only mode)."""

    last_seq: int
    failed: BaseException | None  # set for good once a write or fsync failed
    backlogged: bool  # the disk is too far behind to take more now

    def append(self, seq: int, type: int, payload: bytes) -> None: ...


class Ledger:
    """Reservations, their expiry and idempotency, over a counter table."""

    def __init__(self, table: CounterTable, log_: Log, clock, config: Config) -> None:
        self.table = table
        self.log = log_
        self.clock = clock
        self.config = config
        self.seq = log_.last_seq
        self.reservations: dict[str, Reservation] = {}
        self.adjustments: dict[str, _Adjustment] = {}
        self.live = 0  # held + committed
        self._deadlines: list[tuple[int, str]] = []  # heap; stale entries skipped on pop
        self._finished: collections.deque[tuple[int, bool, str]] = collections.deque()

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
                return Rejection(
                    Code.ALREADY_EXISTS,
                    f"reservation {reservation_id!r} exists with a different payload",
                )
            if existing.state is State.HELD and existing.expires_at_ms <= self.clock.now_ms():
                # Due but not yet swept: the honest answer is that it expired.
                refused = self._unwritable()
                if refused is not None:
                    return refused
                self._expire(existing, self.clock.now_ms())
                existing = self.reservations[reservation_id]
            return self._replayed_reserve(existing)
        refused = self._unwritable()
        if refused is not None:
            return refused
        if self.live >= self.config.reservations_max:
            return Rejection(
                Code.RESOURCE_EXHAUSTED,
                f"{self.live} live reservations: reservations_max reached",
            )
        seq = self.seq + 1
        status, handles, granted, available = self.table.reserve(
            skus, quantities, allow_partial, seq
        )
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
        current = self.reservations.get(reservation_id)
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

    def expire_due(self, limit: int) -> int:
        """Expire up to ``limit`` held reservations whose deadline has passed; returns the last
        sequence used (0 if none). O(log n) per expiry: a heap, never a scan."""
        if self._unwritable() is not None:
            return 0
        now_ms = self.clock.now_ms()
        deadlines = self._deadlines
        last_seq = 0
        while deadlines and deadlines[0][0] <= now_ms and limit > 0:
            expires_at_ms, reservation_id = heapq.heappop(deadlines)
            current = self.reservations.get(reservation_id)
            if (
                current is None
                or current.state is not State.HELD
                or current.expires_at_ms != expires_at_ms
            ):
                continue  # committed, released or extended since: a stale heap entry
            last_seq = self._expire(current, now_ms)
            limit -= 1
        self._prune(now_ms)
        return last_seq

    def next_deadline_ms(self) -> int | None:
        return self._deadlines[0][0] if self._deadlines else None

    # -- Stock ---------------------------------------------------------------------------------

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
        previous = self.adjustments.get(adjustment_id)
        if previous is not None:
            if previous.request != request:
                return Rejection(
                    Code.ALREADY_EXISTS,
                    f"adjustment {adjustment_id!r} exists with a different payload",
                )
            return previous.outcome._replace(replayed=True)
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

    # -- Replay and snapshots -------------------------------------------------------------------

    def replay(self, seq: int, record_type: int, payload: bytes) -> None:
        """Re-apply one logged command during recovery. A command that no longer applies means
        the log and the rules disagree: that is corruption, so it raises."""
        assert seq == self.seq + 1, f"replay out of order: {seq} after {self.seq}"
        command = records.decode(record_type, payload)
        kind = RecordType(record_type)
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

    def snapshot_state(self):
        """Capture the state after ``self.seq`` now (cheap copies, no encoding); returns
        (seq, encode) where ``encode()`` builds the bytes and may run in a worker thread.

        The encoding is a sequence of pickled chunks of builtin types (never our classes), each
        prefixed by its length: pickling a chunk at a time lets the event loop run in between.
        """
        seq = self.seq
        stock = list(self.table.items())
        reservations = list(self.reservations.values())
        adjustments = list(self.adjustments.items())

        def encode() -> bytes:
            out = bytearray()

            def put(kind: str, rows: list) -> None:
                data = pickle.dumps((kind, rows), protocol=5)
                out.extend(_CHUNK.pack(len(data)))
                out.extend(data)

            put("header", [SNAPSHOT_FORMAT, seq])
            for start in range(0, len(stock), _SNAPSHOT_CHUNK_ROWS):
                put("stock", stock[start : start + _SNAPSHOT_CHUNK_ROWS])
            for start in range(0, len(reservations), _SNAPSHOT_CHUNK_ROWS):
                put("reservations", [
                    (r.reservation_id, r.channel, r.request, r.skus, r.quantities, r.committed,
                     int(r.state), r.expires_at_ms, r.seq, r.finished_at_ms, r.owner)
                    for r in reservations[start : start + _SNAPSHOT_CHUNK_ROWS]
                ])
            for start in range(0, len(adjustments), _SNAPSHOT_CHUNK_ROWS):
                put("adjustments", [
                    (adjustment_id, a.request[0].value, a.request[1:], tuple(a.outcome),
                     a.finished_at_ms)
                    for adjustment_id, a in adjustments[start : start + _SNAPSHOT_CHUNK_ROWS]
                ])
            return bytes(out)

        return seq, encode

    def restore(self, payload: bytes) -> None:
        """Load a snapshot into an empty ledger (before replaying the records after it)."""
        assert not self.reservations and len(self.table) == 0, "restore into a fresh ledger"
        view = memoryview(payload)
        offset = 0
        seq = None
        while offset < len(view):
            (length,) = _CHUNK.unpack_from(view, offset)
            offset += _CHUNK.size
            # Snapshots are our own checksummed files holding only builtin types.
            kind, rows = pickle.loads(view[offset : offset + length])
            offset += length
            if kind == "header":
                if rows[0] != SNAPSHOT_FORMAT:
                    raise ValueError(f"snapshot format {rows[0]} is not {SNAPSHOT_FORMAT}")
                seq = rows[1]
            elif kind == "stock":
                for sku, on_hand, reserved, committed in rows:
                    self.table.restore(sku, on_hand, reserved, committed)
            elif kind == "reservations":
                self._restore_reservations(rows)
            elif kind == "adjustments":
                for adjustment_id, record_type, request_tail, outcome, finished_at_ms in rows:
                    self.adjustments[adjustment_id] = _Adjustment(
                        (RecordType(record_type), *request_tail), StockOutcome(*outcome),
                        finished_at_ms,
                    )
                    self._finished.append((finished_at_ms, True, adjustment_id))
            else:
                raise ValueError(f"unknown snapshot chunk {kind!r}")
        if seq is None:
            raise ValueError("snapshot has no header")
        heapq.heapify(self._deadlines)
        self._finished = collections.deque(sorted(self._finished))
        self.seq = seq

    def _restore_reservations(self, rows: list) -> None:
        lookup = self.table.lookup
        # Rows written before owners were recorded have 10 fields: their owner is "".
        for (reservation_id, channel, request, skus, quantities, committed, state_value,
             expires_at_ms, seq, finished_at_ms, *owner) in rows:
            state = State(state_value)
            self.reservations[reservation_id] = Reservation(
                reservation_id, channel, request, skus, tuple(lookup(sku) for sku in skus),
                quantities, committed, state, expires_at_ms, seq, finished_at_ms, *owner,
            )
            if state is State.HELD:
                self._deadlines.append((expires_at_ms, reservation_id))
            if state in (State.HELD, State.COMMITTED):
                self.live += 1
            else:
                self._finished.append((finished_at_ms, False, reservation_id))

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
        result = self._apply(kind, command, seq)
        self._append(seq, kind, _ENCODERS[kind](command))
        return result, seq

    def _append(self, seq: int, kind: RecordType, payload: bytes) -> None:
        self.log.append(seq, kind, payload)
        self.seq = seq

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
        assert kind in (RecordType.SET_STOCK, RecordType.ADJUST_STOCK), kind
        return self._apply_stock(kind, command, seq)

    def _find(self, reservation_id: str, action: str) -> Reservation | Rejection:
        current = self.reservations.get(reservation_id)
        if current is None:
            return Rejection(Code.NOT_FOUND, f"reservation {reservation_id!r} is unknown")
        if current.state is State.HELD and current.expires_at_ms <= self.clock.now_ms():
            # Due but not yet swept by the expiry loop: it is expired, and says so.
            refused = self._unwritable()
            if refused is not None:
                return refused
            self._expire(current, self.clock.now_ms())
            return self._finished_rejection(self.reservations[reservation_id], action)
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

    def _expire(self, current: Reservation, now_ms: int) -> int:
        _, seq = self._execute(RecordType.EXPIRE, records.Finish(now_ms, current.reservation_id))
        return seq

    def _replayed_reserve(self, existing: Reservation) -> ReserveOutcome:
        """The original outcome of a Reserve retried with the same payload, as it stands now: a
        held, committed or fulfilled reservation is still granted; a released or expired one is
        not (granted False, quantities 0), so a retry never mistakes a lost hold for a live one."""
        skus, requested = existing.request[0], existing.request[1]
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

    def _available(self, skus: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(
            counters[0] - counters[1] - counters[2] if counters else 0
            for counters in self.table.stock(skus)
        )

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
        heapq.heappush(self._deadlines, (command.expires_at_ms, command.reservation_id))
        self.live += 1

    def _apply_commit(self, command: records.Commit, seq: int) -> Reservation:
        current = self.reservations[command.reservation_id]
        assert current.state is State.HELD, f"commit of {current.state.name} {current}"
        self.table.commit(current.handles, current.quantities, command.committed, seq)
        updated = current._replace(state=State.COMMITTED, committed=command.committed, seq=seq)
        self.reservations[command.reservation_id] = updated
        return updated

    def _apply_extend(self, command: records.Extend, seq: int) -> Reservation:
        current = self.reservations[command.reservation_id]
        assert current.state is State.HELD, f"extend of {current.state.name} {current}"
        updated = current._replace(expires_at_ms=command.expires_at_ms, seq=seq)
        self.reservations[command.reservation_id] = updated
        heapq.heappush(self._deadlines, (command.expires_at_ms, command.reservation_id))
        return updated

    def _apply_release(self, command: records.Finish, seq: int) -> Reservation:
        current = self.reservations[command.reservation_id]
        if current.state is State.HELD:
            self.table.release(current.handles, current.quantities, seq)
        else:
            assert current.state is State.COMMITTED, f"release of {current.state.name}"
            self.table.uncommit(current.handles, current.committed, seq)
        return self._finish(current, State.RELEASED, command.at_ms, seq)

    def _apply_fulfil(self, command: records.Finish, seq: int) -> Reservation:
        current = self.reservations[command.reservation_id]
        assert current.state is State.COMMITTED, f"fulfil of {current.state.name}"
        self.table.fulfil(current.handles, current.committed, seq)
        return self._finish(current, State.FULFILLED, command.at_ms, seq)

    def _apply_expire(self, command: records.Finish, seq: int) -> Reservation:
        current = self.reservations[command.reservation_id]
        assert current.state is State.HELD, f"expiry of {current.state.name}"
        self.table.release(current.handles, current.quantities, seq)
        return self._finish(current, State.EXPIRED, command.at_ms, seq)

    def _finish(self, current: Reservation, state: State, at_ms: int, seq: int) -> Reservation:
        updated = current._replace(state=state, seq=seq, finished_at_ms=at_ms)
        self.reservations[current.reservation_id] = updated
        self._finished.append((at_ms, False, current.reservation_id))
        self.live -= 1
        assert self.live >= 0
        return updated

    def _apply_stock(
        self, kind: RecordType, command: records.StockChange, seq: int
    ) -> StockOutcome:
        if kind is RecordType.SET_STOCK:
            handle = self.table.ensure(command.sku)
            previous = self.table.set_on_hand(handle, command.value, seq)
        else:
            handle = self.table.lookup(command.sku)
            assert handle >= 0, f"adjust of unknown sku {command.sku!r}"
            previous = self.table.adjust_on_hand(handle, command.value, seq) - command.value
        on_hand, reserved, committed = self.table.counters(handle)
        outcome = StockOutcome(
            command.sku, on_hand, reserved, committed, previous,
            max(0, reserved + committed - on_hand), seq, False,
        )
        self.adjustments[command.adjustment_id] = _Adjustment(
            (kind, command.sku, command.value, command.expected_on_hand), outcome, command.at_ms
        )
        self._finished.append((command.at_ms, True, command.adjustment_id))
        return outcome

    def _prune(self, now_ms: int) -> None:
        """Forget idempotency records older than retention_seconds, or beyond retained_max."""
        horizon_ms = now_ms - self.config.retention_seconds * 1000
        finished = self._finished
        while finished and (
            finished[0][0] <= horizon_ms or len(finished) > self.config.retained_max
        ):
            at_ms, is_adjustment, key = finished.popleft()
            if is_adjustment:
                entry = self.adjustments.get(key)
                if entry is not None and entry.finished_at_ms == at_ms:
                    del self.adjustments[key]
            else:
                entry = self.reservations.get(key)
                if entry is not None and entry.finished_at_ms == at_ms and entry.state in (
                    State.RELEASED, State.EXPIRED, State.FULFILLED
                ):
                    del self.reservations[key]
