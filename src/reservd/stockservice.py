"""Admin RPCs of the stock states (ReceiveReturn, Inspect, WriteOff, HoldStock) and incoming
stock (ExpectReceipt, Receive): validate and translate;
the rules are in reservd.stockstates, reached through the ledger."""
from __future__ import annotations

from reservd import stockstates, validation
from reservd.refusals import invalid
from reservd.v1 import reservd_pb2 as pb
from reservd.validation import Invalid


def stock_message(sku: str, on_hand: int, reserved: int, committed: int,
                  states: tuple[int, int, int, int], incoming: int = 0) -> pb.Stock:
    """A Stock message with the states (reservd.stockstates.STATE_NAMES' order), incoming and
    the one ``available``."""
    quarantine, damaged, quality_control, safety_stock = states
    return pb.Stock(
        sku=sku, on_hand=on_hand, reserved=reserved, committed=committed,
        available=stockstates.available(on_hand, reserved, committed, sum(states)),
        quarantine=quarantine, damaged=damaged, quality_control=quality_control,
        safety_stock=safety_stock, incoming=incoming,
    )


def _positive(field: str, value: int, limits) -> int:
    validation.on_hand(field, value, limits)
    if value == 0:
        raise Invalid(field, "must be at least 1")
    return value


class StockStateRpcs:
    """Mixed into AdminService (needs ledger, durability, guard, limits, _decided)."""

    async def _state_answer(self, decide, context) -> pb.StockStateResponse:
        outcome = await self._decided(decide, context)
        return pb.StockStateResponse(
            stock=stock_message(
                outcome.sku, outcome.on_hand, outcome.reserved, outcome.committed,
                (outcome.quarantine, outcome.damaged, outcome.quality_control,
                 outcome.safety_stock),
            ),
            sequence=outcome.seq, replayed=outcome.replayed,
        )

    async def ReceiveReturn(self, request: pb.ReceiveReturnRequest, context):
        limits = self.limits
        try:
            return_id = validation.text("return_id", request.return_id, limits.id_bytes_max)
            sku = validation.text("sku", request.sku, limits.id_bytes_max)
            units = _positive("units", request.units, limits)
            reservation_id = validation.text(
                "reservation_id", request.reservation_id, limits.id_bytes_max, required=False
            )
        except Invalid as error:
            await invalid(context, error)
        return await self._state_answer(
            lambda: self.ledger.receive_return(return_id, sku, units, reservation_id), context
        )

    async def Inspect(self, request: pb.InspectRequest, context):
        limits = self.limits
        try:
            return_id = validation.text("return_id", request.return_id, limits.id_bytes_max)
            sellable = validation.on_hand("sellable_units", request.sellable_units, limits)
            damaged = validation.on_hand("damaged_units", request.damaged_units, limits)
        except Invalid as error:
            await invalid(context, error)
        return await self._state_answer(
            lambda: self.ledger.inspect(return_id, sellable, damaged), context
        )

    async def WriteOff(self, request: pb.WriteOffRequest, context):
        limits = self.limits
        try:
            change_id = validation.text("change_id", request.change_id, limits.id_bytes_max)
            sku = validation.text("sku", request.sku, limits.id_bytes_max)
            units = _positive("units", request.units, limits)
            state = validation.text("state", request.state, limits.id_bytes_max)
        except Invalid as error:
            await invalid(context, error)
        return await self._state_answer(
            lambda: self.ledger.write_off(change_id, sku, units, state), context
        )

    async def HoldStock(self, request: pb.HoldStockRequest, context):
        limits = self.limits
        try:
            change_id = validation.text("change_id", request.change_id, limits.id_bytes_max)
            sku = validation.text("sku", request.sku, limits.id_bytes_max)
            state = validation.text("state", request.state, limits.id_bytes_max)
            if state not in stockstates.HOLD_STATES:
                raise Invalid("state", f"must be one of {', '.join(stockstates.HOLD_STATES)}, "
                              f"not {state!r}")
            units = validation.delta("units", request.units, limits)  # < 0 returns them
        except Invalid as error:
            await invalid(context, error)
        return await self._state_answer(
            lambda: self.ledger.hold_stock(change_id, sku, state, units), context
        )

    async def ExpectReceipt(self, request: pb.ExpectReceiptRequest, context):
        limits = self.limits
        try:
            po_id = validation.text("po_id", request.po_id, limits.id_bytes_max)
            sku = validation.text("sku", request.sku, limits.id_bytes_max)
            units = _positive("units", request.units, limits)
            if request.eta_ms < 0:
                raise Invalid("eta_ms", f"must be >= 0, not {request.eta_ms}")
        except Invalid as error:
            await invalid(context, error)
        outcome = await self._decided(
            lambda: self.ledger.expect_receipt(po_id, sku, units, request.eta_ms), context
        )
        return _incoming_message(outcome)

    async def Receive(self, request: pb.ReceiveRequest, context):
        limits = self.limits
        try:
            receipt_id = validation.text("receipt_id", request.receipt_id, limits.id_bytes_max)
            po_id = validation.text("po_id", request.po_id, limits.id_bytes_max)
            units = _positive("units", request.units, limits)
        except Invalid as error:
            await invalid(context, error)
        outcome = await self._decided(
            lambda: self.ledger.receive(receipt_id, po_id, units), context
        )
        return _incoming_message(outcome)


def _incoming_message(outcome) -> pb.IncomingResponse:
    return pb.IncomingResponse(
        po_id=outcome.po_id, sku=outcome.sku, units=outcome.units, received=outcome.received,
        over_received=outcome.over_received, incoming=outcome.incoming, on_hand=outcome.on_hand,
        eta_ms=outcome.eta_ms, sequence=outcome.seq, replayed=outcome.replayed,
    )
