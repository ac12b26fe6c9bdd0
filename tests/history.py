"""Record the concurrent calls clients make to reservd, and check the history they saw.

A Jepsen-style checker in (near) linear time, as Jepsen checked TigerBeetle: every mutation
reservd acknowledges carries its ``sequence``, so instead of searching for a linearization the
checker *reads* it from the answers and verifies it:

(a) real-time order: if call A completed before call B was invoked, seq(A) < seq(B);
(b) replaying the mutations in sequence order on :class:`history_model.Model` (plain Python,
    written from the README and the shared rules, not from the ledger) gives exactly the
    answers every client saw, and the final GetStock/GetReservation state; a sold-out answer
    (it has no seq) must match the model at one sequence point its call could have observed;
(c) a call that errored or timed out is absent or present as a whole: the sequences nobody was
    acknowledged for are filled from the write-ahead log, whose every record must be an expiry
    that was due, or exactly the command of a call whose outcome the client never learned.
    Every acknowledged seq must hold exactly that call's command in the log.

Typical use::

    recorder = Recorder()
    await recorder.call(client, "reserve", stub.Reserve, request)
    ...
    final = await read_final_state(stub, skus, reservation_ids, seq=daemon.ledger.seq)
    report = check(recorder.ops, wal=read_wal(data_dir), final=final)
    assert report.ok, report
"""
from __future__ import annotations

import asyncio
import bisect
import dataclasses
import io
import time
from pathlib import Path
from typing import Any, Iterable

import grpc

import history_stock
from history_model import EXPIRED, RELEASED, Model

from reservd import records, wal
from reservd.records import RecordType
from reservd.v1 import reservd_pb2 as pb

TTL_SECONDS_DEFAULT = 600
MUTATIONS = ("reserve", "commit", "extend", "release", "fulfil", "set_stock", "adjust_stock",
             *history_stock.KINDS)
_RECORD_KIND = {
    RecordType.RESERVE: "reserve", RecordType.COMMIT: "commit", RecordType.EXTEND: "extend",
    RecordType.RELEASE: "release", RecordType.FULFIL: "fulfil", RecordType.EXPIRE: "expire",
    RecordType.SET_STOCK: "set_stock", RecordType.ADJUST_STOCK: "adjust_stock",
    **history_stock.RECORD_KINDS,
}
# Errors after which the call may or may not have happened; any other status is definite:
# nothing happened.
INDEFINITE = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL,
})


# -- Recording -------------------------------------------------------------------------------


@dataclasses.dataclass
class Op:
    """One call: what was asked, when (monotonic ns), and the answer or the error."""

    client: int
    kind: str  # one of MUTATIONS
    request: Any
    invoked_ns: int
    completed_ns: int | None = None  # None: the client never learned the outcome
    response: Any = None
    code: grpc.StatusCode | None = None
    details: str = ""

    @property
    def acked(self) -> bool:
        return self.response is not None

    @property
    def indefinite(self) -> bool:
        return self.response is None and (self.code is None or self.code in INDEFINITE)

    @property
    def key(self) -> str:
        """The reservation, adjustment, return, write-off, order or receipt id the call is
        about."""
        if self.kind in history_stock.KINDS:
            return history_stock.key(self.kind, self.request)
        if self.kind in ("set_stock", "adjust_stock"):
            return self.request.adjustment_id
        return self.request.reservation_id

    def __str__(self) -> str:
        outcome = (
            f"-> {_short(self.response)}" if self.acked
            else f"-> {self.code.name if self.code else 'no answer'} {self.details[:80]}"
        )
        return f"client {self.client} {self.kind}({_short(self.request)}) {outcome}"


def _short(message) -> str:
    return " ".join(str(message).split())[:240]


class Recorder:
    """Collects :class:`Op` entries for the calls made through :meth:`call` (any number of
    clients and tasks at once)."""

    def __init__(self) -> None:
        self.ops: list[Op] = []

    async def call(self, client: int, kind: str, method, request, *, timeout: float | None = None):
        """Make one gRPC call through ``method`` and record it; returns the response, or None
        when the call failed (the status is recorded). Cancellation records no completion."""
        assert kind in MUTATIONS, kind
        op = Op(client, kind, request, time.monotonic_ns())
        self.ops.append(op)
        try:
            response = await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            op.completed_ns = time.monotonic_ns()
            op.code, op.details = error.code(), error.details() or ""
            return None
        op.completed_ns = time.monotonic_ns()
        op.response = response
        return response


@dataclasses.dataclass
class FinalState:
    """What GetStock/GetReservation said after the run; ``seq`` is the last mutation applied
    when they were read (None: the end of the history)."""

    stock: dict[str, tuple[int, int, int]]  # sku -> (on_hand, reserved, committed)
    reservations: dict[str, tuple[int, tuple[tuple[str, int], ...]] | None]  # None: NOT_FOUND
    seq: int | None = None


async def read_final_state(stub, skus: Iterable[str], reservation_ids: Iterable[str],
                           seq: int | None = None) -> FinalState:
    """Read every SKU and reservation through a ReservationsStub (256 calls at a time)."""
    skus = sorted(set(skus))
    stock = {}
    for start in range(0, len(skus), 500):
        response = await stub.GetStock(pb.GetStockRequest(skus=skus[start:start + 500]))
        for row in response.stock:
            stock[row.sku] = (row.on_hand, row.reserved, row.committed)

    async def one(reservation_id: str):
        try:
            response = await stub.GetReservation(
                pb.GetReservationRequest(reservation_id=reservation_id)
            )
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return None
        return response.state, tuple((line.sku, line.quantity) for line in response.lines)

    ids = sorted(set(reservation_ids))
    found = []
    for start in range(0, len(ids), 256):
        found += await asyncio.gather(*(one(rid) for rid in ids[start:start + 256]))
    return FinalState(stock, dict(zip(ids, found)), seq)


def read_wal(*directories: Path) -> dict[int, tuple[RecordType, Any]]:
    """Every record in the segments of ``directories`` (read with ``reservd.wal.dump``, the
    reader behind ``reservd wal dump``), decoded: seq -> (type, command). The same seq found
    twice must hold the same bytes (ValueError otherwise)."""
    found: dict[int, tuple[int, bytes]] = {}
    for directory in directories:
        if not any(Path(directory).glob("wal-*.log")):
            continue  # nothing to read (dump refuses a directory that is not a data dir)
        out = io.StringIO()
        wal.dump(directory, out, payload_prefix_bytes=1 << 30)
        for line in out.getvalue().splitlines():
            if line.startswith("#"):
                if line.startswith("# bad frame"):
                    raise ValueError(f"{directory}: {line}")
                continue
            seq, type_, _length, _crc, segment, _offset, payload = line.split("\t")
            entry = (int(type_), bytes.fromhex(payload))
            previous = found.setdefault(int(seq), entry)
            if previous != entry:
                raise ValueError(f"seq {seq} holds two different records ({segment})")
    return {
        seq: (RecordType(type_), records.decode(type_, payload))
        for seq, (type_, payload) in sorted(found.items())
    }


# -- The checker -----------------------------------------------------------------------------


@dataclasses.dataclass
class Report:
    ops: int = 0
    acknowledged: int = 0
    mutations: int = 0  # acknowledged calls that took a new seq
    sold_out: int = 0
    replayed: int = 0
    indefinite: int = 0  # errored or timed out without a definite answer
    indefinite_present: int = 0  # ... of which the log holds the whole command
    indefinite_present_reserves: int = 0  # ... of those, grants
    expiries: int = 0  # expiries read from the log
    last_seq: int = 0
    violations: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def __str__(self) -> str:
        head = (
            f"{self.ops} ops, {self.acknowledged} acknowledged, {self.mutations} mutations, "
            f"{self.sold_out} sold out, "
            f"{self.replayed} replayed, {self.indefinite} indefinite "
            f"({self.indefinite_present} present), {self.expiries} expiries, "
            f"last seq {self.last_seq}: "
        )
        if self.ok:
            return head + "ok"
        shown = self.violations[:20]
        more = len(self.violations) - len(shown)
        return head + f"{len(self.violations)} violations:\n  " + "\n  ".join(shown) + (
            f"\n  ... and {more} more" if more else ""
        )


def _request_tuple(request: pb.ReserveRequest) -> tuple:
    return (
        tuple(line.sku for line in request.lines),
        tuple(line.quantity for line in request.lines),
        request.channel,
        request.ttl_seconds or TTL_SECONDS_DEFAULT,
        request.allow_partial,
    )


def _record_matches(op: Op, kind: str, command) -> bool:
    """Whether the log record ``command`` is exactly the command ``op`` asked for."""
    if op.kind != kind:
        return False
    request = op.request
    if kind in history_stock.KINDS:
        return history_stock.record_matches(op, command)
    if kind == "reserve":
        return (command.reservation_id == request.reservation_id and (
            command.skus, command.requested, command.channel, command.ttl_seconds,
            command.allow_partial,
        ) == _request_tuple(request))
    if kind in ("set_stock", "adjust_stock"):
        value = request.on_hand if kind == "set_stock" else request.delta
        expected = request.expected_on_hand if request.HasField("expected_on_hand") else None
        return (command.adjustment_id, command.sku, command.value, command.expected_on_hand) == (
            request.adjustment_id, request.sku, value, expected
        )
    return command.reservation_id == request.reservation_id


def _real_time_bounds(ops: list[Op], new: list[Op], last_seq: int) -> tuple[dict, dict]:
    """For every op: lo = the highest seq of a new mutation that completed before it was
    invoked; hi = one less than the lowest seq of a new mutation invoked after it completed."""
    by_completion = sorted(new, key=lambda op: op.completed_ns)
    lo: dict[int, int] = {}
    index, highest = 0, 0
    for op in sorted(ops, key=lambda op: op.invoked_ns):
        while index < len(by_completion) and by_completion[index].completed_ns < op.invoked_ns:
            highest = max(highest, by_completion[index].response.sequence)
            index += 1
        lo[id(op)] = highest
    by_invocation = sorted(new, key=lambda op: op.invoked_ns, reverse=True)
    hi: dict[int, int] = {}
    index, lowest = 0, last_seq + 1
    finished = [op for op in ops if op.completed_ns is not None]
    for op in sorted(finished, key=lambda op: op.completed_ns, reverse=True):
        while index < len(by_invocation) and by_invocation[index].invoked_ns > op.completed_ns:
            lowest = min(lowest, by_invocation[index].response.sequence)
            index += 1
        hi[id(op)] = lowest - 1
    return lo, hi


def check(ops: list[Op], wal: dict[int, tuple[RecordType, Any]] | None = None,
          final: FinalState | None = None) -> Report:
    """Check a recorded history (see the module docstring); the report lists violations."""
    report = Report(ops=len(ops))
    bad = report.violations.append
    new: list[Op] = []
    by_seq: dict[int, Op] = {}
    for op in ops:
        if not op.acked:
            report.indefinite += op.indefinite
            continue
        report.acknowledged += 1
        response = op.response
        if response.replayed:
            report.replayed += 1
        elif op.kind == "reserve" and not response.granted:
            report.sold_out += 1
            if response.sequence:
                bad(f"a sold-out answer carries seq {response.sequence}: {op}")
        elif response.sequence <= 0:
            bad(f"acknowledged without a sequence: {op}")
        elif response.sequence in by_seq:
            bad(f"seq {response.sequence} given twice: {by_seq[response.sequence]} / {op}")
        else:
            by_seq[response.sequence] = op
            new.append(op)
    report.mutations = len(new)
    last_seq = max([*by_seq, *(wal or {})], default=0)
    report.last_seq = last_seq

    # (a) real time: scanning by invocation, every new seq exceeds all completed before it.
    lo, hi = _real_time_bounds(ops, new, last_seq)
    for op in new:
        if lo[id(op)] >= op.response.sequence:
            bad(f"real-time order: seq {op.response.sequence} of {op} was invoked after "
                f"seq {lo[id(op)]} completed")

    # (b) and (c): walk every seq in order.
    model = Model()
    unplaced: dict[tuple[str, str], list[Op]] = {}
    for op in ops:
        if op.indefinite:
            unplaced.setdefault((op.kind, op.key), []).append(op)

    def step(seq: int) -> None:
        op = by_seq.get(seq)
        record = wal.get(seq) if wal is not None else None
        if record is not None:
            kind, command = _RECORD_KIND[record[0]], record[1]
        if op is None:
            if record is None:
                bad(f"seq {seq}: acknowledged to nobody and not in the log"
                    + ("" if wal is not None else " (no log given)"))
                return
            if kind == "expire":
                report.expiries += 1
                outcome = model.apply_release(seq, command.reservation_id, True, command.at_ms)
                if isinstance(outcome, str):
                    bad(f"seq {seq}: {outcome}")
                return
            if kind in history_stock.KINDS:
                key = history_stock.key(kind, command)
            elif kind in ("set_stock", "adjust_stock"):
                key = command.adjustment_id
            else:
                key = command.reservation_id
            candidates = unplaced.get((kind, key), [])
            match = next((c for c in candidates if _record_matches(c, kind, command)), None)
            if match is None:
                bad(f"seq {seq}: the log holds {kind} {command} that no unanswered call asked "
                    "for (invented, partial, or a definite error that was applied)")
                return
            candidates.remove(match)
            if seq <= lo[id(match)]:
                bad(f"real-time order: seq {seq} of {match} was invoked after seq "
                    f"{lo[id(match)]} completed")
            report.indefinite_present += 1
            report.indefinite_present_reserves += kind == "reserve"
            op = match
        elif wal is not None:
            if record is None:
                bad(f"seq {seq} was acknowledged but is not in the log: {op}")
            elif not _record_matches(op, kind, command):
                bad(f"seq {seq}: the log holds {kind} {command}, not the acknowledged {op}")
                return
        at_ms = command.at_ms if record is not None else None
        expected = _apply(model, seq, op, record[1] if record is not None else None, at_ms)
        if isinstance(expected, str):
            bad(f"seq {seq}: {expected}: {op}")
            return
        if record is not None and op.kind == "reserve":
            granted = tuple(line[2] for line in expected["lines"])
            if command.granted != granted:
                bad(f"seq {seq}: the log grants {command.granted}, the model {granted}: {op}")
        if op.acked:
            mismatch = _compare(op, expected)
            if mismatch:
                bad(f"seq {seq}: answered {mismatch}: {op}")

    for seq in range(1, last_seq + 1):
        step(seq)
        if final is not None and final.seq == seq:
            _check_final(model, final, bad)

    # Answers without a seq of their own: sold out, replayed.
    new_ids = {id(op) for op in new}
    for op in ops:
        if not op.acked or id(op) in new_ids:
            continue
        response = op.response
        if response.replayed:
            _check_replay(model, op, lo.get(id(op), 0), hi.get(id(op), last_seq), bad)
        elif op.kind == "reserve" and not response.granted:
            # A sold-out answer waits for the grants it saw to be durable, so none of them can
            # be lost to a crash after it: it must agree with the model like any other answer.
            why = _check_sold_out(model, op, lo.get(id(op), 0), hi.get(id(op), last_seq))
            if why:
                bad(why)

    if final is not None and (final.seq is None or final.seq > last_seq or final.seq == 0):
        _check_final(model, final, bad)
    return report


def _apply(model: Model, seq: int, op: Op, command, at_ms):
    """Apply op's command at seq; ``command`` is its log record when the log was given."""
    request = op.request
    kind = op.kind
    if kind in history_stock.KINDS:
        return history_stock.apply(model, seq, op)
    if kind == "reserve":
        if command is not None:
            expires_at_ms = command.expires_at_ms
        elif op.acked:
            expires_at_ms = op.response.expires_at_ms
        else:
            return "an unanswered reserve with no log record cannot be placed"
        return model.apply_reserve(seq, request.reservation_id, _request_tuple(request),
                                   expires_at_ms)
    if kind == "commit":
        lines = {line.sku: line.quantity for line in request.lines} or None
        if command is not None and lines is None:
            held = model.reservations.get(request.reservation_id)
            if held is not None and tuple(command.committed) != tuple(q for _, q in held.lines):
                return f"the log commits {command.committed}, not everything held"
        return model.apply_commit(seq, request.reservation_id, lines, at_ms)
    if kind == "extend":
        current = model.reservations.get(request.reservation_id)
        if command is not None:
            expires_at_ms = command.expires_at_ms
            if current is not None and expires_at_ms != max(
                current.expires_at_ms, at_ms + request.ttl_seconds * 1000
            ):
                return f"the log extends to {expires_at_ms}, not max(expiry, now + ttl)"
        elif op.acked:
            expires_at_ms = op.response.expires_at_ms
        else:
            return "an unanswered extend with no log record cannot be placed"
        return model.apply_extend(seq, request.reservation_id, expires_at_ms, at_ms)
    if kind == "release":
        return model.apply_release(seq, request.reservation_id)
    if kind == "fulfil":
        return model.apply_fulfil(seq, request.reservation_id)
    value = request.on_hand if kind == "set_stock" else request.delta
    expected = request.expected_on_hand if request.HasField("expected_on_hand") else None
    return model.apply_stock(seq, kind, request.adjustment_id, request.sku, value, expected)


def _compare(op: Op, expected: dict) -> str:
    """What differs between the answer the client saw and the model's ("" if nothing)."""
    response = op.response
    if op.kind in history_stock.KINDS:
        seen = history_stock.seen(op)
    elif op.kind == "reserve":
        seen = {
            "granted": response.granted,
            "lines": tuple((l.sku, l.requested, l.granted, l.available) for l in response.lines),
            "state": response.state,
            "expires_at_ms": response.expires_at_ms,
        }
    elif op.kind in ("set_stock", "adjust_stock"):
        stock = response.stock
        seen = {
            "stock": (stock.sku, stock.on_hand, stock.reserved, stock.committed, stock.available),
            "previous_on_hand": response.previous_on_hand,
            "shortfall": response.shortfall,
        }
    else:
        seen = {
            "state": response.state,
            "lines": tuple((line.sku, line.quantity) for line in response.lines),
            "expires_at_ms": response.expires_at_ms,
        }
    return "; ".join(
        f"{name} {seen[name]!r}, the model says {value!r}"
        for name, value in expected.items() if seen[name] != value
    )


def _check_replay(model: Model, op: Op, lo: int, hi: int, bad) -> None:
    """A replayed answer repeats an earlier outcome for the same id as it stood when the call
    was served, at one seq in [lo, hi]: the reservation's latest seq and state then (and for a
    Reserve, granted as long as the hold was not released or expired)."""
    response = op.response
    if op.kind in history_stock.KINDS:
        history_stock.check_replay(model, op, bad)
        return
    if op.kind in ("set_stock", "adjust_stock"):
        entry = model.adjustments.get(op.key)
        if entry is None:
            bad(f"replayed an adjustment the model never applied: {op}")
            return
        stock = response.stock
        seen = {"stock": (stock.sku, stock.on_hand, stock.reserved, stock.committed,
                          stock.available),
                "previous_on_hand": response.previous_on_hand, "shortfall": response.shortfall}
        if seen != entry[1]:
            bad(f"replayed {seen}, the original answer was {entry[1]}: {op}")
        return
    current = model.reservations.get(op.key)
    if current is None:
        bad(f"replayed a reservation the model never granted: {op}")
        return
    if op.kind == "reserve" and current.request != _request_tuple(op.request):
        bad(f"replayed a reserve with another payload: {op}")
        return
    start = bisect.bisect_right(current.seqs, lo)
    points = {max(lo, current.seqs[0]), *current.seqs[start:bisect.bisect_right(current.seqs, hi)]}
    for point in points:
        seq, state = current.at(point)
        if (seq, state) != (response.sequence, response.state):
            continue
        if op.kind != "reserve":
            return
        # A released or expired hold is no longer granted (quantities 0): a retry never takes
        # a lost hold for a live one. Otherwise the answer repeats the grant.
        live = state not in (RELEASED, EXPIRED)
        held = dict(current.lines) if live else {}
        granted = tuple(line.granted for line in response.lines)
        if response.granted == live and granted == tuple(
            held.get(sku, 0) for sku in current.request[0]
        ):
            return
    bad(f"replayed seq {response.sequence}, state {response.state}, granted "
        f"{response.granted}: {op.key!r} had no such outcome between seq {lo} and {hi} "
        f"(its seqs {current.seqs}, states {current.states}): {op}")


def _check_sold_out(model: Model, op: Op, lo: int, hi: int) -> str:
    """A sold-out answer must be the model's at one seq in [lo, hi] (the states the call could
    have seen), with the very ``available`` figures reported; returns why not ("" if so)."""
    request = op.request
    skus, requested = _request_tuple(request)[:2]
    seen = tuple(line.available for line in op.response.lines)
    points = {lo}
    for sku in skus:
        seqs, _ = model.available_history.get(sku, ((), ()))
        start = bisect.bisect_right(seqs, lo)
        end = bisect.bisect_right(seqs, hi)
        points.update(seqs[start:end])
    for point in sorted(points):
        available = tuple(model.available_at(sku, point) for sku in skus)
        if None in available or available != seen:
            continue
        if request.allow_partial:
            refused = all(free <= 0 for free in available)
        else:
            refused = any(asked > free for asked, free in zip(requested, available))
        if refused:
            return ""
    return (f"sold out with available {seen}, which the model never had with a refusal "
            f"between seq {lo} and {hi}: {op}")


def _check_final(model: Model, final: FinalState, bad) -> None:
    for sku, counters in final.stock.items():
        row = model.stock.get(sku)
        if row is None or tuple(row) != tuple(counters):
            bad(f"final stock of {sku!r}: reservd {counters}, the model {row}")
    for reservation_id, seen in final.reservations.items():
        current = model.reservations.get(reservation_id)
        want = None if current is None else (current.state, current.answer_lines())
        if seen != want:
            bad(f"final state of {reservation_id!r}: reservd {seen}, the model {want}")

