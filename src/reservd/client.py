"""Async Python client for checkout services. It fails closed: a Reserve that ends in a deadline,
UNAVAILABLE or any other error is *not reserved*; retries reuse the same reservation_id, so a
retry of a grant that did land returns that grant instead of taking more stock.

With ``batching=True`` the mutations (reserve, commit, extend, release, fulfil) made concurrently
on one client are coalesced into Batch RPCs (reservd.autobatch): each caller still gets exactly
its own answer, with the same fail-closed rules."""
from __future__ import annotations

import asyncio
import functools
import dataclasses
import random
import time
from typing import AsyncIterator, Awaitable, Callable, Iterable

import grpc

from reservd.autobatch import AutoBatcher, ReservdError
from reservd.v1 import reservd_pb2 as pb
from reservd.v1 import reservd_pb2_grpc as pb_grpc

# Worth retrying: the server did not (or may not have) answered. Everything else is final.
_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

__all__ = ["ReservdClient", "ReservdError", "ReserveResult"]


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
    """One channel to reservd. ``deadline_seconds`` bounds each call including its retries.

    ``batching``: coalesce concurrent mutations into Batch RPCs of at most ``batch_ops_max``
    ops and ``batch_bytes_max`` bytes, with at most ``batches_in_flight_max`` RPCs at once; a
    call made while they are all in flight joins the next batch, a lone call goes at once.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        deadline_seconds: float = 2.0,
        attempts_max: int = 3,
        backoff_seconds_max: float = 0.2,
        batching: bool = False,
        batch_ops_max: int = 1_000,
        batch_bytes_max: int = 512 << 10,
        batches_in_flight_max: int = 2,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        token: str | None = None,
        server_name: str | None = None,
        tls: bool = False,
    ) -> None:
        """TLS when ``tls`` or any of ``ca_file`` (trusted roots, PEM; None: the system's),
        ``cert_file`` + ``key_file`` (a client certificate for mutual TLS) is given;
        ``server_name`` overrides the name checked in the server's certificate. ``token`` is
        sent as ``authorization: Bearer`` with every call."""
        if tls or ca_file or cert_file or key_file:
            from reservd.tls import channel_credentials

            options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
            self.channel = grpc.aio.secure_channel(
                target, channel_credentials(ca_file, cert_file, key_file), options=options
            )
        else:
            self.channel = grpc.aio.insecure_channel(target)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.reservations = pb_grpc.ReservationsStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)
        self.deadline_seconds = deadline_seconds
        self.attempts_max = attempts_max
        self.backoff_seconds_max = backoff_seconds_max
        self.batcher = (
            AutoBatcher(
                functools.partial(self.reservations.Batch, metadata=self._metadata),
                ops_max=batch_ops_max, bytes_max=batch_bytes_max,
                in_flight_max=batches_in_flight_max,
            )
            if batching
            else None
        )

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "ReservdClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _call(self, method, request):
        """Call with retries on transient failures, all within one deadline."""
        return await self._retrying(
            lambda end: method(request, timeout=end - time.monotonic(), metadata=self._metadata)
        )

    async def _mutate(self, kind: str, method, request):
        """A mutation: through the auto-batcher when batching, else its unary RPC."""
        if self.batcher is None:
            return await self._call(method, request)
        op = pb.BatchOp(**{kind: request})
        size = op.ByteSize()
        return await self._retrying(lambda end: self.batcher.submit(op, size, end))

    async def _retrying(self, attempt_once: Callable[[float], Awaitable]):
        """``attempt_once(end)`` (monotonic seconds) until it succeeds, fails for good, or the
        attempts or the deadline run out. The same request every time: retries are idempotent."""
        end = time.monotonic() + self.deadline_seconds
        attempt = 0
        while True:
            attempt += 1
            try:
                if end - time.monotonic() <= 0:
                    raise ReservdError(grpc.StatusCode.DEADLINE_EXCEEDED, "client deadline")
                return await attempt_once(end)
            except grpc.aio.AioRpcError as error:
                failure = ReservdError(error.code(), error.details() or "")
            except ReservdError as error:
                failure = error
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
            response = await self._mutate("reserve", self.reservations.Reserve, request)
        except ReservdError as error:
            return ReserveResult(False, None, error)
        return ReserveResult(response.granted, response, None)

    async def commit(
        self, reservation_id: str, lines: dict[str, int] | None = None
    ) -> pb.ReservationResponse:
        request = pb.CommitRequest(reservation_id=reservation_id, lines=_lines(lines or {}))
        return await self._mutate("commit", self.reservations.Commit, request)

    async def extend(self, reservation_id: str, ttl_seconds: int) -> pb.ReservationResponse:
        request = pb.ExtendRequest(reservation_id=reservation_id, ttl_seconds=ttl_seconds)
        return await self._mutate("extend", self.reservations.Extend, request)

    async def release(self, reservation_id: str) -> pb.ReservationResponse:
        request = pb.ReleaseRequest(reservation_id=reservation_id)
        return await self._mutate("release", self.reservations.Release, request)

    async def fulfil(self, reservation_id: str) -> pb.ReservationResponse:
        request = pb.FulfilRequest(reservation_id=reservation_id)
        return await self._mutate("fulfil", self.reservations.Fulfil, request)

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
            metadata=self._metadata,
        )
        try:
            async for update in call:
                yield update
        except grpc.aio.AioRpcError as error:
            raise ReservdError(error.code(), error.details() or "") from None
        finally:
            call.cancel()

    # -- channels, buckets and ats -----------------------------------------------------------

    async def set_channel(
        self, channel: str, policy: pb.ChannelPolicy, change_id: str
    ) -> pb.ChannelResponse:
        request = pb.SetChannelRequest(channel=channel, policy=policy, change_id=change_id)
        return await self._call(self.admin.SetChannel, request)

    async def list_channels(self) -> list[pb.Channel]:
        response = await self._call(self.admin.ListChannels, pb.ListChannelsRequest())
        return list(response.channels)

    async def set_sku_policy(
        self, sku: str, channel: str, overrides: pb.ChannelPolicy, change_id: str
    ) -> pb.SkuPolicyResponse:
        request = pb.SetSkuPolicyRequest(
            sku=sku, channel=channel, overrides=overrides, change_id=change_id
        )
        return await self._call(self.admin.SetSkuPolicy, request)

    async def allocate(
        self, sku: str, from_bucket: str, to_bucket: str, units: int, change_id: str
    ) -> pb.AllocateResponse:
        request = pb.AllocateRequest(
            sku=sku, from_bucket=from_bucket, to_bucket=to_bucket, units=units,
            change_id=change_id,
        )
        return await self._call(self.admin.Allocate, request)

    async def receive_return(
        self, return_id: str, sku: str, units: int, *, reservation_id: str = ""
    ) -> pb.StockStateResponse:
        request = pb.ReceiveReturnRequest(
            return_id=return_id, sku=sku, units=units, reservation_id=reservation_id
        )
        return await self._call(self.admin.ReceiveReturn, request)

    async def inspect(
        self, return_id: str, sellable_units: int, damaged_units: int
    ) -> pb.StockStateResponse:
        request = pb.InspectRequest(
            return_id=return_id, sellable_units=sellable_units, damaged_units=damaged_units
        )
        return await self._call(self.admin.Inspect, request)

    async def write_off(
        self, sku: str, units: int, state: str, *, change_id: str
    ) -> pb.StockStateResponse:
        request = pb.WriteOffRequest(change_id=change_id, sku=sku, units=units, state=state)
        return await self._call(self.admin.WriteOff, request)

    async def hold_stock(
        self, sku: str, state: str, units: int, *, change_id: str
    ) -> pb.StockStateResponse:
        """``units`` > 0 into a held ``state`` from the shared bucket, < 0 back."""
        request = pb.HoldStockRequest(change_id=change_id, sku=sku, state=state, units=units)
        return await self._call(self.admin.HoldStock, request)

    async def expect_receipt(
        self, po_id: str, sku: str, units: int, eta_ms: int
    ) -> pb.IncomingResponse:
        request = pb.ExpectReceiptRequest(po_id=po_id, sku=sku, units=units, eta_ms=eta_ms)
        return await self._call(self.admin.ExpectReceipt, request)

    async def receive(self, po_id: str, units: int, *, receipt_id: str) -> pb.IncomingResponse:
        request = pb.ReceiveRequest(receipt_id=receipt_id, po_id=po_id, units=units)
        return await self._call(self.admin.Receive, request)

    async def set_rule_policy(self, request: pb.SetRulePolicyRequest) -> pb.RulePolicyResponse:
        return await self._call(self.admin.SetRulePolicy, request)

    async def get_velocity(self, sku: str) -> pb.GetVelocityResponse:
        return await self._call(self.admin.GetVelocity, pb.GetVelocityRequest(sku=sku))

    async def set_promotion(self, request: pb.SetPromotionRequest) -> pb.PromotionResponse:
        return await self._call(self.admin.SetPromotion, request)

    async def list_promotions(self, sku: str = "") -> list[pb.Promotion]:
        response = await self._call(self.admin.ListPromotions, pb.ListPromotionsRequest(sku=sku))
        return list(response.promotions)
    async def set_replenishment(
        self, sku: str, lead_time_days: float, lead_time_sigma_days: float = 0.0,
        service_level: float = 0.0, abc_class: str = "", seasonal: Iterable[float] = (),
    ) -> pb.SetReplenishmentResponse:
        request = pb.SetReplenishmentRequest(
            sku=sku, lead_time_days=lead_time_days, lead_time_sigma_days=lead_time_sigma_days,
            service_level=service_level, abc_class=abc_class, seasonal_indices=list(seasonal),
        )
        return await self._call(self.admin.SetReplenishment, request)

    async def get_replenishment(
        self, skus: Iterable[str] = (), after_sku: str = "", limit: int = 0
    ) -> list[pb.Replenishment]:
        request = pb.GetReplenishmentRequest(skus=list(skus), after_sku=after_sku, limit=limit)
        return list((await self._call(self.admin.GetReplenishment, request)).rows)

    async def get_audit(self, all_skus: bool = False, limit: int = 0) -> pb.GetAuditResponse:
        request = pb.GetAuditRequest(all=all_skus, limit=limit)
        return await self._call(self.admin.GetAudit, request)

    async def get_buckets(self, skus: Iterable[str]) -> list[pb.SkuBuckets]:
        response = await self._call(self.admin.GetBuckets, pb.GetBucketsRequest(skus=skus))
        return list(response.skus)

    async def get_ats(self, skus: Iterable[str], channels: Iterable[str]) -> list[pb.Ats]:
        request = pb.GetAtsRequest(skus=list(skus), channels=list(channels))
        return list((await self._call(self.reservations.GetAts, request)).ats)

    async def watch_ats(
        self, channels: Iterable[str], skus: Iterable[str] = (), from_sequence: int = 0,
        deadline_seconds: float | None = None,
    ) -> AsyncIterator[pb.Ats]:
        """Stream ats changes (as ``watch``: no deadline unless given one, in seconds)."""
        call = self.reservations.WatchAts(
            pb.WatchAtsRequest(
                channels=list(channels), skus=list(skus), from_sequence=from_sequence
            ),
            timeout=deadline_seconds,
        )
        try:
            async for update in call:
                yield update
        except grpc.aio.AioRpcError as error:
            raise ReservdError(error.code(), error.details() or "") from None
        finally:
            call.cancel()

    # -- alerts -------------------------------------------------------------------------------

    async def get_alerts(
        self, kinds: Iterable[str] = (), sku: str = "", level_min: int = 0, limit: int = 0
    ) -> list[pb.Alert]:
        """The newest retained alerts that match, oldest first (limit 0: the server's most)."""
        request = pb.GetAlertsRequest(
            kinds=list(kinds), sku=sku, level_min=level_min, limit=limit
        )
        return list((await self._call(self.reservations.GetAlerts, request)).alerts)

    async def watch_alerts(
        self, from_sequence: int = 0, deadline_seconds: float | None = None
    ) -> AsyncIterator[pb.Alert]:
        """Stream alerts after ``from_sequence`` (0: every retained alert first); as ``watch``:
        no deadline unless given one, in seconds."""
        call = self.reservations.WatchAlerts(
            pb.WatchAlertsRequest(from_sequence=from_sequence),
            timeout=deadline_seconds,
            metadata=self._metadata,
        )
        try:
            async for alert in call:
                yield alert
        except grpc.aio.AioRpcError as error:
            raise ReservdError(error.code(), error.details() or "") from None
        finally:
            call.cancel()
