"""Async Python client for checkout services. It fails closed: a Reserve that ends in a deadline,
UNAVAILABLE or any other error is *not reserved*; retries reuse the same reservation_id, so a
retry of a grant that did land returns that grant instead of taking more stock."""
from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from typing import AsyncIterator, Iterable

import grpc

from reservd.v1 import reservd_pb2 as pb
from reservd.v1 import reservd_pb2_grpc as pb_grpc

# Worth retrying: the server did not (or may not have) answered. Everything else is final.
_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class ReservdError(Exception):
    """A call that did not succeed: ``code`` is the gRPC status, ``details`` the server's words."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclasses.dataclass(frozen=True, slots=True)
class ReserveResult:
    """``granted`` is True only when the server said so; ``error`` says why not, if it failed."""

    granted: bool
    response: pb.ReserveResponse | None = None
    error: ReservdError | None = None


def _lines(lines: dict[str, int] | Iterable[tuple[str, int]]) -> list[pb.Line]:
    items = lines.items() if isinstance(lines, dict) else lines
    return [pb.Line(sku=sku, quantity=quantity) for sku, quantity in items]


class ReservdClient:
    """One channel to reservd. ``deadline_seconds`` bounds each call including its retries."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        deadline_seconds: float = 2.0,
        attempts_max: int = 3,
        backoff_seconds_max: float = 0.2,
    ) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.reservations = pb_grpc.ReservationsStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)
        self.deadline_seconds = deadline_seconds
        self.attempts_max = attempts_max
        self.backoff_seconds_max = backoff_seconds_max

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "ReservdClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _call(self, method, request):
        """Call with retries on transient failures, all within one deadline."""
        end = time.monotonic() + self.deadline_seconds
        attempt = 0
        while True:
            attempt += 1
            remaining = end - time.monotonic()
            try:
                if remaining <= 0:
                    raise ReservdError(grpc.StatusCode.DEADLINE_EXCEEDED, "client deadline")
                return await method(request, timeout=remaining)
            except grpc.aio.AioRpcError as error:
                failure = ReservdError(error.code(), error.details() or "")
            if failure.code not in _TRANSIENT or attempt >= self.attempts_max:
                raise failure
            backoff = min(self.backoff_seconds_max, 0.01 * 2**attempt) * random.random()
            if time.monotonic() + backoff >= end:
                raise failure
            await asyncio.sleep(backoff)

    async def reserve(
        self,
        reservation_id: str,
        lines: dict[str, int] | Iterable[tuple[str, int]],
        *,
        channel: str = "",
        ttl_seconds: int = 0,
        allow_partial: bool = False,
    ) -> ReserveResult:
        """Reserve a cart. Never raises for the server's or the network's sake: anything but
        an explicit grant is ``granted=False``."""
        request = pb.ReserveRequest(
            reservation_id=reservation_id, lines=_lines(lines), channel=channel,
            ttl_seconds=ttl_seconds, allow_partial=allow_partial,
        )
        try:
            response = await self._call(self.reservations.Reserve, request)
        except ReservdError as error:
            return ReserveResult(False, None, error)
        return ReserveResult(response.granted, response, None)

    async def commit(
        self, reservation_id: str, lines: dict[str, int] | None = None
    ) -> pb.ReservationResponse:
        request = pb.CommitRequest(reservation_id=reservation_id, lines=_lines(lines or {}))
        return await self._call(self.reservations.Commit, request)

    async def extend(self, reservation_id: str, ttl_seconds: int) -> pb.ReservationResponse:
        request = pb.ExtendRequest(reservation_id=reservation_id, ttl_seconds=ttl_seconds)
        return await self._call(self.reservations.Extend, request)

    async def release(self, reservation_id: str) -> pb.ReservationResponse:
        request = pb.ReleaseRequest(reservation_id=reservation_id)
        return await self._call(self.reservations.Release, request)

    async def fulfil(self, reservation_id: str) -> pb.ReservationResponse:
        request = pb.FulfilRequest(reservation_id=reservation_id)
        return await self._call(self.reservations.Fulfil, request)

    async def get_reservation(self, reservation_id: str) -> pb.ReservationResponse:
        request = pb.GetReservationRequest(reservation_id=reservation_id)
        return await self._call(self.reservations.GetReservation, request)

    async def get_stock(self, skus: Iterable[str]) -> dict[str, pb.Stock]:
        response = await self._call(self.reservations.GetStock, pb.GetStockRequest(skus=skus))
        return {stock.sku: stock for stock in response.stock}

    async def set_stock(
        self, sku: str, on_hand: int, *, adjustment_id: str, reason: str = "",
        expected_on_hand: int | None = None,
    ) -> pb.StockAdjustmentResponse:
        request = pb.SetStockRequest(
            sku=sku, on_hand=on_hand, adjustment_id=adjustment_id, reason=reason,
            expected_on_hand=expected_on_hand,
        )
        return await self._call(self.admin.SetStock, request)

    async def adjust_stock(
        self, sku: str, delta: int, *, adjustment_id: str, reason: str = "",
        expected_on_hand: int | None = None,
    ) -> pb.StockAdjustmentResponse:
        request = pb.AdjustStockRequest(
            sku=sku, delta=delta, adjustment_id=adjustment_id, reason=reason,
            expected_on_hand=expected_on_hand,
        )
        return await self._call(self.admin.AdjustStock, request)

    async def watch(
        self, skus: Iterable[str] = (), from_sequence: int = 0,
        deadline_seconds: float | None = None,
    ) -> AsyncIterator[pb.StockUpdate]:
        """Stream stock updates; a watch is long-lived, so it has no deadline unless given one
        (seconds: the stream then ends with DEADLINE_EXCEEDED)."""
        call = self.reservations.WatchStock(
            pb.WatchStockRequest(skus=list(skus), from_sequence=from_sequence),
            timeout=deadline_seconds,
        )
        try:
            async for update in call:
                yield update
        except grpc.aio.AioRpcError as error:
            raise ReservdError(error.code(), error.details() or "") from None
        finally:
            call.cancel()
