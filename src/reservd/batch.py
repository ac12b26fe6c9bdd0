"""Batch and BatchStream: many Reserve/Commit/Extend/Release/Fulfil operations in one round trip.

Each op is validated, checked against the guard and applied through the ledger exactly as its
unary RPC would be (same statuses, same messages, field names prefixed ``ops[i].<kind>.``), in
the order of the request, with no await in between. Then one durability wait covers the whole
batch: the WAL up to the highest sequence any op needs and, for grants, the Redis mirror up to
the highest granted sequence. An op whose sequence did not become durable (or, for a grant, was
not mirrored) is answered UNAVAILABLE on its own; the others keep their answers.

The per-RPC cost of Python gRPC (~250 us of server CPU) is what a batch shares between its ops.
"""
from __future__ import annotations

import asyncio
import dataclasses

import grpc

from reservd import auth, validation
from reservd.channelservice import fill_lines
from reservd.config import Limits
from reservd.guard import Guard
from reservd.ledger import Ledger, Rejection, ReserveOutcome, State
from reservd.mirror import MirrorUnavailable
from reservd.refusals import STATUS
from reservd.service import Durability, _reservation_response
from reservd.v1 import reservd_pb2 as pb
from reservd.validation import Invalid
from reservd.wal import WalFailed

_INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
_PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]
_CODES = {code: status.value[0] for code, status in STATUS.items()}
_KINDS = "reserve, commit, extend, release, fulfil"


def _error(result: pb.BatchResult, code: int, message: str) -> None:
    """Answer the op with an error (replacing whatever the result held)."""
    error = result.error
    error.code = code
    error.message = message


def fill_reserve_response(response: pb.ReserveResponse, outcome: ReserveOutcome) -> None:
    """Write a ledger outcome into ``response`` (what the unary Reserve answers). Filled in
    place: building the nested messages from keyword arguments copies each one again, which
    costs about twice as much."""
    response.granted = outcome.granted
    lines = response.lines
    for sku, asked, given, available in zip(
        outcome.skus, outcome.requested, outcome.quantities, outcome.available
    ):
        lines.add(sku=sku, requested=asked, granted=given, available=available)
    if outcome.state is State.HELD:
        response.expires_at_ms = outcome.expires_at_ms
    response.state = outcome.state or 0
    response.sequence = outcome.seq
    response.replayed = outcome.replayed


@dataclasses.dataclass(slots=True)
class _Applied:
    """A batch applied in the ledger, waiting to become durable."""

    response: pb.BatchResponse
    # (index in results, sequence, is a grant, the metric to count once acknowledged)
    logged: list[tuple[int, int, bool, object]]
    log_seq: int = 0  # the highest sequence any op needs durable
    grant_seq: int = 0  # the highest sequence of a grant (needs the mirror too)


class BatchService:
    """The logic of Reservations.Batch and BatchStream; service.py delegates to it."""

    def __init__(
        self, ledger: Ledger, durability: Durability, guard: Guard, limits: Limits, metrics
    ) -> None:
        self.ledger = ledger
        self.durability = durability
        self.guard = guard
        self.limits = limits
        self.metrics = metrics

    async def batch(self, request: pb.BatchRequest, context) -> pb.BatchResponse:
        refusal = self._refusal(request, context)
        if refusal is not None:
            await context.abort(*refusal)
        return await self._settle(self._apply(request.ops))

    async def stream(self, requests, context):
        """Answer each batch of the stream in order. Batches are applied as they arrive, so up to
        ``batch_stream_in_flight_max`` of them wait for durability at once (one fsync can cover
        several); reading stops while that many are unanswered."""
        answers: asyncio.Queue = asyncio.Queue(self.limits.batch_stream_in_flight_max)
        end = object()

        async def read() -> None:
            # Only this handler's own task may abort the RPC (grpc refuses a status sent while
            # a response is being written), so a refusal travels through the queue, in order.
            try:
                async for request in requests:
                    refusal = self._refusal(request, context)
                    if refusal is not None:
                        await answers.put(refusal)
                        return
                    applied = self._apply(request.ops)
                    await answers.put(asyncio.ensure_future(self._settle(applied)))
            except asyncio.CancelledError:
                raise
            except Exception as error:
                failed = asyncio.get_running_loop().create_future()
                failed.set_exception(error)
                await answers.put(failed)
                return
            await answers.put(end)

        reader = asyncio.ensure_future(read())
        try:
            while (answer := await answers.get()) is not end:
                if isinstance(answer, tuple):
                    await context.abort(*answer)
                yield await answer
        finally:
            reader.cancel()
            while not answers.empty():
                leftover = answers.get_nowait()
                if isinstance(leftover, asyncio.Future):
                    leftover.cancel()

    def _refusal(self, request: pb.BatchRequest, context) -> tuple[grpc.StatusCode, str] | None:
        """Refuse a whole batch only for what no single op can answer: its size, the deadline."""
        count = len(request.ops)
        if count == 0:
            return grpc.StatusCode.INVALID_ARGUMENT, "ops: must have at least one op"
        if count > self.limits.batch_ops_max:
            return (
                grpc.StatusCode.INVALID_ARGUMENT,
                f"ops: must have at most {self.limits.batch_ops_max} ops, not {count}",
            )
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            # The caller has already given up: a grant now would be a phantom hold.
            return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before apply"
        return None

    def _apply(self, ops) -> _Applied:
        """Validate and apply every op in order: synchronous, so no other call interleaves."""
        applied = _Applied(pb.BatchResponse(), [])
        metrics = self.metrics
        metrics.batches.inc()
        metrics.batch_ops.inc(len(ops))
        add = applied.response.results.add
        for index, op in enumerate(ops):
            kind = op.WhichOneof("op")
            result = add()
            if kind == "reserve":
                self._reserve(index, op.reserve, result, applied)
            elif kind is None:
                _error(result, _INVALID, f"ops[{index}]: must set one of {_KINDS}")
            else:
                self._reservation(index, kind, getattr(op, kind), result, applied)
        return applied

    def _reserve(
        self, index: int, request: pb.ReserveRequest, result: pb.BatchResult, applied: _Applied
    ) -> None:
        metrics = self.metrics
        prefix = f"ops[{index}].reserve."
        try:
            reservation_id, skus, quantities, channel, ttl_seconds = (
                validation.reserve_request(request, self.limits, prefix)
            )
        except Invalid as error:
            metrics.reserve_rejected.inc()
            return _error(result, _INVALID, str(error))
        if self.guard.grant_reason is not None:
            metrics.reserve_unavailable.inc()
            return _error(
                result, _UNAVAILABLE, f"reservations are closed: {self.guard.grant_reason}"
            )
        outcome = self.ledger.reserve(
            reservation_id, skus, quantities, channel, ttl_seconds, request.allow_partial,
            auth.caller.get() or "",
        )
        if isinstance(outcome, Rejection):
            metrics.reserve_rejected.inc()
            return _error(result, _CODES[outcome.code], outcome.text(prefix))
        metric = metrics.reserve_granted if outcome.granted else metrics.reserve_sold_out
        # Sold out waits for the grants it saw (as the unary Reserve does).
        self._needs(applied, outcome.seq or self.ledger.seq, outcome.granted, metric)
        fill_reserve_response(result.reserve, outcome)
        # Each line's buckets and ats belong to this very outcome: filled before any await.
        fill_lines(result.reserve.lines, self.ledger.channels, reservation_id, channel)

    def _reservation(
        self, index: int, kind: str, request, result: pb.BatchResult, applied: _Applied
    ) -> None:
        prefix = f"ops[{index}].{kind}."
        try:
            if kind == "commit":
                reservation_id, lines = validation.commit_request(request, self.limits, prefix)
            elif kind == "extend":
                reservation_id, ttl_seconds = validation.extend_request(
                    request, self.limits, prefix
                )
            else:
                reservation_id = validation.reservation_id(request, self.limits, prefix)
        except Invalid as error:
            return _error(result, _INVALID, str(error))
        ledger = self.ledger
        reservation = ledger.get(reservation_id)
        if reservation is not None:
            denial = auth.denied(reservation.owner, reservation_id, kind)
            if denial is not None:
                return _error(result, _PERMISSION_DENIED, denial)
        if self.guard.write_reason is not None:
            return _error(result, _UNAVAILABLE, f"writes are closed: {self.guard.write_reason}")
        if kind == "commit":
            outcome = ledger.commit(reservation_id, lines)
        elif kind == "extend":
            outcome = ledger.extend(reservation_id, ttl_seconds)
        elif kind == "release":
            outcome = ledger.release(reservation_id)
        else:
            outcome = ledger.fulfil(reservation_id)
        if isinstance(outcome, Rejection):
            return _error(result, _CODES[outcome.code], outcome.text(prefix))
        self._needs(applied, outcome.seq, False, None)
        result.reservation.CopyFrom(_reservation_response(outcome))

    @staticmethod
    def _needs(applied: _Applied, seq: int, grant: bool, metric) -> None:
        """Record what the last op added must wait for before it is acknowledged."""
        if seq:
            applied.logged.append((len(applied.response.results) - 1, seq, grant, metric))
            applied.log_seq = max(applied.log_seq, seq)
            if grant:
                applied.grant_seq = max(applied.grant_seq, seq)
        elif metric is not None:
            metric.inc()

    async def _settle(self, applied: _Applied) -> pb.BatchResponse:
        """One wait for the whole batch; ops it could not make durable answer UNAVAILABLE."""
        log_, mirror = self.durability.log, self.durability.mirror
        wal_error = mirror_error = None
        need_mirror = mirror is not None and applied.grant_seq > mirror.mirrored_seq
        # Both are started before either is awaited: the mirror write runs alongside the fsync.
        durable = log_.commit() if applied.log_seq > log_.durable_seq else None
        mirrored = mirror.wait(applied.grant_seq) if need_mirror else None
        if durable is not None:
            try:
                await durable
            except WalFailed as error:
                wal_error = f"not acknowledged: {error}"
        if mirrored is not None:
            try:
                await mirrored
            except MirrorUnavailable as error:
                mirror_error = (
                    f"not acknowledged: the Redis mirror is unreachable ({error}); "
                    "retry with the same id once it is back"
                )
        results = applied.response.results
        counted: dict[object, int] = {}  # one inc() per metric and batch: each takes a lock
        for index, seq, grant, metric in applied.logged:
            if wal_error is not None and seq > log_.durable_seq:
                _error(results[index], _UNAVAILABLE, wal_error)
            elif mirror_error is not None and grant and seq > mirror.mirrored_seq:
                _error(results[index], _UNAVAILABLE, mirror_error)
            elif metric is not None:
                counted[metric] = counted.get(metric, 0) + 1
        for metric, count in counted.items():
            metric.inc(count)
        return applied.response
