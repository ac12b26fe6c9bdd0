"""The gRPC layer: validates and translates requests, asks the ledger, waits for durability,
answers. It holds no business rule: outcomes come from reservd.ledger."""
from __future__ import annotations

import logging

import grpc

from reservd import auth, stockstates, validation
from reservd.alertservice import AlertRpcs
from reservd.channelservice import AtsRpcs, ChannelAdminRpcs, line_extras
from reservd.ruleservice import RuleAdminRpcs
from reservd.config import Limits
from reservd.guard import Guard
from reservd.planningservice import PlanningRpcs
from reservd.stockservice import StockStateRpcs, stock_message
from reservd.mirror import MirrorSlow, MirrorUnavailable
from reservd.ledger import Ledger, Rejection, Reservation, ReservationOutcome, State
from reservd.refusals import invalid, reject, writable
from reservd.v1 import reservd_pb2 as pb
from reservd.v1 import reservd_pb2_grpc as pb_grpc
from reservd.validation import Invalid
from reservd.wal import WalFailed
from reservd.watch import TooManyWatchers, WatchHub

audit = logging.getLogger("reservd.audit")

class Durability:
    """Waits until a mutation may be acknowledged: its WAL record is durable and, for a grant
    (anything that makes stock less available), the Redis mirror holds it too. Both waits run
    side by side: the mirror write is pipelined with the fsync. A grant waits for the mirror at
    most ``mirror_grant_wait_ms_max`` (UNAVAILABLE beyond, without closing reservd)."""

    def __init__(self, log_, mirror=None) -> None:
        self.log = log_
        self.mirror = mirror

    async def wait(self, seq: int, context, *, grant: bool = False) -> None:
        log_, mirror = self.log, self.mirror
        need_log = seq > log_.durable_seq
        need_mirror = grant and mirror is not None and seq > mirror.mirrored_seq
        if not (need_log or need_mirror):
            return
        try:
            # Both are started before either is awaited: the mirror write runs alongside the
            # fsync, and awaiting one after the other costs no extra latency.
            durable = log_.commit() if need_log else None
            mirrored = mirror.wait(seq) if need_mirror else None  # bounded by grant wait
            if durable is not None:
                await durable
            if mirrored is not None:
                await mirrored
        except MirrorSlow as error:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"not acknowledged: the Redis mirror is slow ({error}); retry with the same id",
            )
        except MirrorUnavailable as error:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"not acknowledged: the Redis mirror is unreachable ({error}); "
                "retry with the same id once it is back",
            )
        except WalFailed as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"not acknowledged: {error}")


def _reservation_response(outcome: ReservationOutcome) -> pb.ReservationResponse:
    reservation: Reservation = outcome.reservation
    quantities = reservation.committed or reservation.quantities
    return pb.ReservationResponse(
        reservation_id=reservation.reservation_id,
        state=int(reservation.state),
        lines=[pb.Line(sku=sku, quantity=q) for sku, q in zip(reservation.skus, quantities)],
        expires_at_ms=reservation.expires_at_ms if reservation.state is State.HELD else 0,
        sequence=outcome.seq,
        replayed=outcome.replayed,
    )


class ReservationsService(AtsRpcs, AlertRpcs, pb_grpc.ReservationsServicer):
    def __init__(
        self, ledger: Ledger, durability: Durability, guard: Guard, hub: WatchHub,
        limits: Limits, metrics, ats_hub=None, alert_hub=None,
    ) -> None:
        self.ledger = ledger
        self.durability = durability
        self.guard = guard
        self.hub = hub
        self.limits = limits
        self.metrics = metrics
        self.ats_hub = ats_hub
        self.alert_hub = alert_hub
        # Imported here: reservd.batch builds on this module's translation helpers.
        from reservd.batch import BatchService

        self.batches = BatchService(ledger, durability, guard, limits, metrics)

    async def Batch(self, request: pb.BatchRequest, context) -> pb.BatchResponse:
        return await self.batches.batch(request, context)

    async def BatchStream(self, requests, context):
        async for response in self.batches.stream(requests, context):
            yield response

    async def Reserve(self, request: pb.ReserveRequest, context) -> pb.ReserveResponse:
        try:
            reservation_id, skus, quantities, channel, ttl_seconds = (
                validation.reserve_request(request, self.limits)
            )
        except Invalid as error:
            self.metrics.reserve_rejected.inc()
            await invalid(context, error)
        if self.guard.grant_reason is not None:
            self.metrics.reserve_unavailable.inc()
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"reservations are closed: {self.guard.grant_reason}",
            )
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            # The caller has already given up: a grant now would be a phantom hold.
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before apply")
        outcome = self.ledger.reserve(
            reservation_id, skus, quantities, channel, ttl_seconds, request.allow_partial,
            auth.caller.get() or "",
        )
        if isinstance(outcome, Rejection):
            self.metrics.reserve_rejected.inc()
            await reject(context, outcome)
        # Built before any await: each line's buckets and ats belong to this very outcome.
        book = self.ledger.channels
        lines = [
            pb.LineOutcome(
                sku=sku, requested=asked, granted=given, available=available,
                **line_extras(book, reservation_id, channel, sku, given, available),
            )
            for sku, asked, given, available in zip(
                outcome.skus, outcome.requested, outcome.quantities, outcome.available
            )
        ]
        # A sold-out answer logs nothing, but it saw grants that may not be durable yet: it waits
        # for them, or a crash could lose the grants that made the buyer hear "sold out".
        seq = outcome.seq or self.ledger.seq
        if seq:
            await self.durability.wait(seq, context, grant=outcome.granted)
        if outcome.granted:
            self.metrics.reserve_granted.inc()
        else:
            self.metrics.reserve_sold_out.inc()
        return pb.ReserveResponse(
            granted=outcome.granted,
            lines=lines,
            expires_at_ms=outcome.expires_at_ms if outcome.state is State.HELD else 0,
            state=outcome.state or 0,
            sequence=outcome.seq,
            replayed=outcome.replayed,
        )

    async def _finish(self, outcome, context) -> pb.ReservationResponse:
        if isinstance(outcome, Rejection):
            await reject(context, outcome)
        if outcome.seq:
            await self.durability.wait(outcome.seq, context)
        return _reservation_response(outcome)

    def _reservation_id(self, request) -> str:
        return validation.reservation_id(request, self.limits)

    async def _owned(self, reservation_id: str, verb: str, context) -> None:
        """PERMISSION_DENIED unless the caller made the reservation (or is an admin)."""
        reservation = self.ledger.get(reservation_id)
        if reservation is not None:
            denial = auth.denied(reservation.owner, reservation_id, verb)
            if denial is not None:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, denial)

    async def _change(self, context, verb: str, parse, change) -> pb.ReservationResponse:
        """The prelude of Commit, Extend, Release and Fulfil, in this order: the request is
        valid (``parse()``: reservation_id, then the rest), the caller owns the reservation,
        writes are open; then ``change(reservation_id, *rest)`` on the ledger."""
        try:
            reservation_id, *rest = parse()
        except Invalid as error:
            await invalid(context, error)
        await self._owned(reservation_id, verb, context)
        await writable(self.guard, context)
        return await self._finish(change(reservation_id, *rest), context)

    async def Commit(self, request: pb.CommitRequest, context) -> pb.ReservationResponse:
        return await self._change(
            context, "commit", lambda: validation.commit_request(request, self.limits),
            self.ledger.commit,
        )

    async def Extend(self, request: pb.ExtendRequest, context) -> pb.ReservationResponse:
        return await self._change(
            context, "extend", lambda: validation.extend_request(request, self.limits),
            self.ledger.extend,
        )

    async def Release(self, request: pb.ReleaseRequest, context) -> pb.ReservationResponse:
        return await self._change(
            context, "release", lambda: (self._reservation_id(request),), self.ledger.release
        )

    async def Fulfil(self, request: pb.FulfilRequest, context) -> pb.ReservationResponse:
        return await self._change(
            context, "fulfil", lambda: (self._reservation_id(request),), self.ledger.fulfil
        )

    async def GetReservation(
        self, request: pb.GetReservationRequest, context
    ) -> pb.ReservationResponse:
        try:
            reservation_id = self._reservation_id(request)
        except Invalid as error:
            await invalid(context, error)
        await self._owned(reservation_id, "read", context)
        reservation = self.ledger.get(reservation_id)
        if reservation is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"reservation {reservation_id!r} is unknown"
            )
        return _reservation_response(ReservationOutcome(reservation, reservation.seq, False))

    async def GetStock(self, request: pb.GetStockRequest, context) -> pb.GetStockResponse:
        try:
            skus = validation.skus("skus", request.skus, self.limits, self.limits.get_skus_max)
        except Invalid as error:
            await invalid(context, error)
        stock = []
        for i, (sku, counters) in enumerate(zip(skus, self.ledger.stock_rows(skus))):
            if counters is None:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND, f"skus[{i}]: sku {sku!r} is unknown"
                )
            stock.append(stock_message(
                sku, *counters[:3], self.ledger.states.of(sku), self.ledger.incoming.of(sku)
            ))
        return pb.GetStockResponse(stock=stock)

    async def WatchStock(self, request: pb.WatchStockRequest, context):
        try:
            skus = validation.skus(
                "skus", request.skus, self.limits, self.limits.watch_skus_max, required=False
            )
        except Invalid as error:
            await invalid(context, error)
        for i, counters in enumerate(self.ledger.table.stock(skus)):
            if counters is None:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"skus[{i}]: sku {skus[i]!r} is unknown: SetStock creates it",
                )
        try:
            watcher = self.hub.open(frozenset(skus) or None, request.from_sequence)
        except TooManyWatchers as error:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"watchers: {error}")
        try:
            async for batch in self.hub.updates_of(watcher):
                # The same StockUpdate objects go to every watcher of their SKU: built once.
                for update in batch:
                    yield update
        finally:
            self.hub.release(watcher)


class AdminService(
    ChannelAdminRpcs, StockStateRpcs, PlanningRpcs, RuleAdminRpcs, pb_grpc.AdminServicer
):
    def __init__(self, ledger: Ledger, durability: Durability, guard: Guard, limits: Limits):
        self.ledger = ledger
        self.durability = durability
        self.guard = guard
        self.limits = limits

    def _common(self, request) -> tuple[str, str, str, int | None]:
        limits = self.limits
        sku = validation.text("sku", request.sku, limits.id_bytes_max)
        adjustment_id = validation.text(
            "adjustment_id", request.adjustment_id, limits.id_bytes_max
        )
        reason = validation.text("reason", request.reason, limits.reason_bytes_max, required=False)
        expected = None
        if request.HasField("expected_on_hand"):
            expected = validation.on_hand("expected_on_hand", request.expected_on_hand, limits)
        return sku, adjustment_id, reason, expected

    async def _answer(self, outcome, context, method: str, adjustment_id: str):
        if isinstance(outcome, Rejection):
            await reject(context, outcome)
        if outcome.seq:
            # A lower on_hand makes stock less available: the mirror must hold it first.
            grant = outcome.on_hand < outcome.previous_on_hand
            await self.durability.wait(outcome.seq, context, grant=grant)
            # Audit: who changed stock (the same identity is in the logged command).
            audit.info(
                "stock changed",
                extra={"identity": auth.caller.get(), "method": method, "sku": outcome.sku,
                       "adjustment_id": adjustment_id, "on_hand": outcome.on_hand,
                       "previous_on_hand": outcome.previous_on_hand, "seq": outcome.seq},
            )
        return pb.StockAdjustmentResponse(
            stock=pb.Stock(
                sku=outcome.sku, on_hand=outcome.on_hand, reserved=outcome.reserved,
                committed=outcome.committed,
                available=stockstates.available(
                    outcome.on_hand, outcome.reserved, outcome.committed,
                    self.ledger.states.unsellable_of(outcome.sku),
                ),
            ),
            previous_on_hand=outcome.previous_on_hand,
            shortfall=outcome.shortfall,
            sequence=outcome.seq,
            replayed=outcome.replayed,
        )

    async def SetStock(self, request: pb.SetStockRequest, context):
        try:
            sku, adjustment_id, reason, expected = self._common(request)
            on_hand = validation.on_hand("on_hand", request.on_hand, self.limits)
        except Invalid as error:
            await invalid(context, error)
        await writable(self.guard, context)
        outcome = self.ledger.set_stock(
            adjustment_id, sku, on_hand, expected, reason, auth.caller.get() or ""
        )
        return await self._answer(outcome, context, "SetStock", adjustment_id)

    async def AdjustStock(self, request: pb.AdjustStockRequest, context):
        try:
            sku, adjustment_id, reason, expected = self._common(request)
            delta = validation.delta("delta", request.delta, self.limits)
        except Invalid as error:
            await invalid(context, error)
        await writable(self.guard, context)
        outcome = self.ledger.adjust_stock(
            adjustment_id, sku, delta, expected, reason, auth.caller.get() or ""
        )
        return await self._answer(outcome, context, "AdjustStock", adjustment_id)
