"""Incoming stock: purchase orders with an ETA and (partial) receipts against them.

``incoming`` (per SKU) is the units of open purchase orders not yet received: on the way, not
on hand, never available. ``ExpectReceipt`` opens an order (idempotent by po_id); ``Receive``
books a receipt (idempotent by receipt_id): on_hand rises by the units received and the SKU's
incoming falls by at most what the order still expects; units beyond it are reported as
``over_received`` (the receipt is still booked: the units are on the shelf, reality wins).
"""
from __future__ import annotations

from typing import NamedTuple

from reservd import records
from reservd.records import RecordType
from reservd.stockstates import Refusal


class Order(NamedTuple):
    sku: str
    units: int
    eta_ms: int
    received: int


class IncomingOutcome(NamedTuple):
    """A purchase order right after a command on it, and its SKU's counters."""

    po_id: str
    sku: str
    units: int  # ordered
    received: int
    over_received: int  # received beyond units
    incoming: int  # of the SKU, every open order together
    on_hand: int
    eta_ms: int
    seq: int
    replayed: bool


class Incoming:
    """Purchase orders by po_id, receipts by receipt_id, incoming units per SKU."""

    def __init__(self, table) -> None:
        self.table = table
        self.orders: dict[str, Order] = {}
        self.receipts: dict[str, tuple[tuple[str, int], int]] = {}  # id -> ((po, units), seq)
        self.by_sku: dict[str, int] = {}

    def of(self, sku: str) -> int:
        """Units of ``sku`` on open purchase orders, not yet received."""
        return self.by_sku.get(sku, 0)

    def decide_expect(
        self, po_id: str, sku: str, units: int, eta_ms: int, now_ms: int
    ) -> records.ExpectReceipt | IncomingOutcome | Refusal:
        order = self.orders.get(po_id)
        if order is not None:
            if (order.sku, order.units, order.eta_ms) != (sku, units, eta_ms):
                return Refusal("ALREADY_EXISTS", f"po {po_id!r} exists with a different payload")
            return self._outcome(po_id, 0)._replace(replayed=True)
        if self.table.lookup(sku) < 0:
            return Refusal("NOT_FOUND", f"sku {sku!r} is unknown: SetStock creates it", "sku")
        return records.ExpectReceipt(now_ms, po_id, sku, units, eta_ms)

    def decide_receive(
        self, receipt_id: str, po_id: str, units: int, now_ms: int, on_hand_max: int
    ) -> records.Receive | IncomingOutcome | Refusal:
        previous = self.receipts.get(receipt_id)
        if previous is not None:
            if previous[0] != (po_id, units):
                return Refusal(
                    "ALREADY_EXISTS", f"receipt {receipt_id!r} exists with a different payload"
                )
            return self._outcome(po_id, previous[1])._replace(replayed=True)
        order = self.orders.get(po_id)
        if order is None:
            return Refusal("NOT_FOUND", f"po {po_id!r} is unknown", "po_id")
        on_hand = self.table.counters(self.table.lookup(order.sku))[0]
        if on_hand + units > on_hand_max:
            return Refusal(
                "FAILED_PRECONDITION",
                f"{units} received units would make on_hand of sku {order.sku!r} "
                f"{on_hand + units} (> on_hand_max {on_hand_max})", "units",
            )
        return records.Receive(now_ms, receipt_id, po_id, units)

    def apply(self, kind: RecordType, command, seq: int) -> IncomingOutcome:
        if kind is RecordType.EXPECT_RECEIPT:
            self.orders[command.po_id] = Order(command.sku, command.units, command.eta_ms, 0)
            self.by_sku[command.sku] = self.of(command.sku) + command.units
            return self._outcome(command.po_id, seq)
        assert kind is RecordType.RECEIVE, kind
        order = self.orders[command.po_id]
        handle = self.table.lookup(order.sku)
        assert handle >= 0, f"receipt for unknown sku {order.sku!r}"
        self.table.adjust_on_hand(handle, command.units, seq)
        expected_now = max(0, order.units - order.received)
        self.by_sku[order.sku] = self.of(order.sku) - min(command.units, expected_now)
        assert self.by_sku[order.sku] >= 0, (order, self.by_sku[order.sku])
        self.orders[command.po_id] = order._replace(received=order.received + command.units)
        self.receipts[command.receipt_id] = ((command.po_id, command.units), seq)
        return self._outcome(command.po_id, seq)

    def _outcome(self, po_id: str, seq: int) -> IncomingOutcome:
        order = self.orders[po_id]
        on_hand = self.table.counters(self.table.lookup(order.sku))[0]
        return IncomingOutcome(
            po_id, order.sku, order.units, order.received, max(0, order.received - order.units),
            self.of(order.sku), on_hand, order.eta_ms, seq, False,
        )

    # -- snapshots ------------------------------------------------------------------------------

    def snapshot_rows(self) -> tuple[list, list]:
        """(order rows, receipt rows) as plain tuples for reservd.state_codec."""
        orders = [(po_id, *order) for po_id, order in self.orders.items()]
        receipts = [(receipt_id, po_id, units, seq)
                    for receipt_id, ((po_id, units), seq) in self.receipts.items()]
        return orders, receipts

    def restore_order(self, row: tuple) -> None:
        po_id, sku, units, eta_ms, received = row
        self.orders[po_id] = Order(sku, units, eta_ms, received)
        self.by_sku[sku] = self.of(sku) + max(0, units - received)

    def restore_receipt(self, row: tuple) -> None:
        receipt_id, po_id, units, seq = row
        self.receipts[receipt_id] = ((po_id, units), seq)
