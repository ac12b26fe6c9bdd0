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
from reservd.store import Fifo


class Order(NamedTuple):
    sku: str
    units: int
    eta_ms: int
    received: int
    # Unix ms of the last receipt once received >= units (0 while open): the order's
    # retention clock, so it outlives every receipt against it.
    closed_at_ms: int = 0


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

    def __init__(self, table, orders_max: int = 1 << 62, receipts_max: int = 1 << 62) -> None:
        self.table = table
        # Open orders and, for retention_seconds after their last receipt, received ones; and
        # receipts (idempotency records, kept retention_seconds). Each bounded: a new one beyond
        # its bound is refused RESOURCE_EXHAUSTED before anything is logged.
        self.orders: dict[str, Order] = {}
        # receipt_id -> ((po_id, units), seq, at_ms)
        self.receipts: dict[str, tuple[tuple[str, int], int, int]] = {}
        self.by_sku: dict[str, int] = {}
        self.orders_max = orders_max
        self.receipts_max = receipts_max
        self._closed = Fifo()  # (closed_at_ms, po_id), one entry per receipt on a closed order
        self._received = Fifo()  # (at_ms, receipt_id)

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
        if len(self.orders) >= self.orders_max:
            return Refusal("RESOURCE_EXHAUSTED", f"{len(self.orders)} purchase orders are kept: "
                           "purchase_orders_max reached")
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
        if len(self.receipts) >= self.receipts_max:
            return Refusal("RESOURCE_EXHAUSTED", f"{len(self.receipts)} receipts are kept for "
                           "their idempotency window: receipts_max reached")
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
        received = order.received + command.units
        closed_at_ms = command.at_ms if received >= order.units else 0
        self.orders[command.po_id] = order._replace(received=received, closed_at_ms=closed_at_ms)
        if closed_at_ms:
            self._closed.append(closed_at_ms, command.po_id)
        self.receipts[command.receipt_id] = ((command.po_id, command.units), seq, command.at_ms)
        self._received.append(command.at_ms, command.receipt_id)
        return self._outcome(command.po_id, seq)

    def prune(self, horizon_ms: int) -> None:
        """Forget receipts, and received orders, whose last command was at or before
        ``horizon_ms`` (retention_seconds over). Receipts go first: an order is closed at its
        last receipt, so no receipt kept names a forgotten order."""
        while len(self._received) and self._received.oldest_ms() <= horizon_ms:
            at_ms, receipt_id = self._received.popleft()
            entry = self.receipts.get(receipt_id)
            if entry is not None and entry[2] == at_ms:
                del self.receipts[receipt_id]
        while len(self._closed) and self._closed.oldest_ms() <= horizon_ms:
            at_ms, po_id = self._closed.popleft()
            order = self.orders.get(po_id)
            if order is not None and order.closed_at_ms == at_ms:
                del self.orders[po_id]

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
        receipts = [(receipt_id, po_id, units, seq, at_ms)
                    for receipt_id, ((po_id, units), seq, at_ms) in self.receipts.items()]
        return orders, receipts

    def restore_order(self, row: tuple, now_ms: int) -> None:
        """``now_ms``: the retention start of a received order from a format-4 snapshot (no
        times there: kept a whole window from the restart, never too short)."""
        po_id, sku, units, eta_ms, received, closed_at_ms = row
        if received >= units and not closed_at_ms:
            closed_at_ms = now_ms
        self.orders[po_id] = Order(sku, units, eta_ms, received, closed_at_ms or 0)
        self.by_sku[sku] = self.of(sku) + max(0, units - received)
        if closed_at_ms:
            self._closed.append(closed_at_ms, po_id)

    def restore_receipt(self, row: tuple, now_ms: int) -> None:
        receipt_id, po_id, units, seq, at_ms = row
        at_ms = at_ms or now_ms
        self.receipts[receipt_id] = ((po_id, units), seq, at_ms)
        self._received.append(at_ms, receipt_id)

    def restored(self) -> None:
        """After a snapshot restore: order the retention queues by time."""
        self._closed.sort()
        self._received.sort()
