"""Client-side auto-batching: concurrent calls on one client share Batch RPCs.

The way TigerBeetle's clients and ioredis auto-pipelining do it: a call made while the batches
in flight are at their bound joins the next batch; a call made when there is room goes out on
the next turn of the event loop (so calls made in the same turn share it, and a lone call is not
held back). Each batch is bounded in ops and bytes. Each caller gets exactly its own op's answer,
or a ReservdError: the batch RPC failing (deadline, UNAVAILABLE, anything) fails every op in it,
which the client treats as *not reserved* and retries with the same ids.
"""
from __future__ import annotations

import asyncio
import collections
import re
import time

import grpc

from reservd.v1 import reservd_pb2 as pb

_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
# The server names an op's fields "ops[3].reserve.lines[0].sku"; the caller made one call and
# reads the unary RPC's words, "lines[0].sku".
_OP_PREFIX = re.compile(r"ops\[\d+\]\.[a-z]+\.")
# A BatchOp inside BatchRequest costs its own bytes plus a tag and a length prefix.
_FRAMING_BYTES = 4


class ReservdError(Exception):
    """A call that did not succeed: ``code`` is the gRPC status, ``details`` the server's words."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class _Call:
    __slots__ = ("op", "end", "future")

    def __init__(self, op: pb.BatchOp, end: float, future: asyncio.Future) -> None:
        self.op = op
        self.end = end  # the caller's deadline, monotonic seconds
        self.future = future


def _answer(result: pb.BatchResult):
    """The op's own response message, or its own error raised as ReservdError."""
    kind = result.WhichOneof("result")
    if kind == "reserve":
        return result.reserve
    if kind == "reservation":
        return result.reservation
    if kind == "error":
        code = _STATUS_BY_NUMBER.get(result.error.code, grpc.StatusCode.UNKNOWN)
        raise ReservdError(code, _OP_PREFIX.sub("", result.error.message, count=1))
    raise ReservdError(grpc.StatusCode.UNKNOWN, "the server answered an op with no result")


class AutoBatcher:
    """Coalesces ops submitted concurrently into calls of ``batch_method`` (a Batch stub)."""

    def __init__(
        self, batch_method, *, ops_max: int, bytes_max: int, in_flight_max: int
    ) -> None:
        assert ops_max > 0 and bytes_max > 0 and in_flight_max > 0
        self.batch_method = batch_method
        self.ops_max = ops_max
        self.bytes_max = bytes_max
        self.in_flight_max = in_flight_max
        self.in_flight = 0
        self.batches_sent = 0
        self.ops_sent = 0
        self._open: list[_Call] = []  # the batch still taking calls
        self._open_bytes = 0
        self._full: collections.deque[list[_Call]] = collections.deque()  # closed, not sent
        self._flush_scheduled = False
        self._sending: set[asyncio.Task] = set()  # the loop holds tasks weakly: we keep them

    def submit(self, op: pb.BatchOp, size_bytes: int, end: float) -> asyncio.Future:
        """A future for ``op``'s own response (or ReservdError). ``end``: the caller's deadline
        (monotonic seconds); the batch carrying it has the deadline of its earliest caller."""
        loop = asyncio.get_running_loop()
        size_bytes += _FRAMING_BYTES
        if self._open and (
            len(self._open) >= self.ops_max or self._open_bytes + size_bytes > self.bytes_max
        ):
            self._full.append(self._open)
            self._open, self._open_bytes = [], 0
        future = loop.create_future()
        self._open.append(_Call(op, end, future))
        self._open_bytes += size_bytes
        if not self._flush_scheduled and self.in_flight < self.in_flight_max:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        """Send what waits, up to the bound of batches in flight."""
        self._flush_scheduled = False
        while self.in_flight < self.in_flight_max:
            if self._full:
                calls = self._full.popleft()
            elif self._open:
                calls, self._open, self._open_bytes = self._open, [], 0
            else:
                return
            # Callers that gave up (cancelled) are not sent: nobody would read their answer.
            calls = [call for call in calls if not call.future.done()]
            if calls:
                self.in_flight += 1
                task = asyncio.ensure_future(self._send(calls))
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)

    async def _send(self, calls: list[_Call]) -> None:
        try:
            self.batches_sent += 1
            self.ops_sent += len(calls)
            timeout = min(call.end for call in calls) - time.monotonic()
            try:
                if timeout <= 0:
                    raise ReservdError(grpc.StatusCode.DEADLINE_EXCEEDED, "client deadline")
                response = await self.batch_method(
                    pb.BatchRequest(ops=[call.op for call in calls]), timeout=timeout
                )
                if len(response.results) != len(calls):
                    raise ReservdError(
                        grpc.StatusCode.INTERNAL,
                        f"{len(response.results)} results for {len(calls)} ops",
                    )
            except grpc.aio.AioRpcError as error:
                failure = ReservdError(error.code(), error.details() or "")
            except ReservdError as error:
                failure = error
            else:
                for call, result in zip(calls, response.results):
                    if not call.future.done():
                        try:
                            call.future.set_result(_answer(result))
                        except ReservdError as error:
                            call.future.set_exception(error)
                return
            # Not answered: for each caller that is *not reserved*, whatever the server did.
            for call in calls:
                if not call.future.done():
                    call.future.set_exception(ReservdError(failure.code, failure.details))
        finally:
            self.in_flight -= 1
            self._flush()
