"""The history checker's part for the stock-state and incoming-stock commands (ReceiveReturn,
Inspect, WriteOff, HoldStock, ExpectReceipt, Receive): which log record is which call, and what the model
(history_model.Model, written from the README) says each answer must be."""
from __future__ import annotations

from reservd.records import RecordType

# kind -> (record type, the id the call is about)
KINDS = {
    "receive_return": (RecordType.RECEIVE_RETURN, "return_id"),
    "inspect": (RecordType.INSPECT, "return_id"),
    "write_off": (RecordType.WRITE_OFF, "change_id"),
    "hold_stock": (RecordType.HOLD_STOCK, "change_id"),
    "expect_receipt": (RecordType.EXPECT_RECEIPT, "po_id"),
    "receive": (RecordType.RECEIVE, "receipt_id"),
}
RECORD_KINDS = {record_type: kind for kind, (record_type, _) in KINDS.items()}


def key(kind: str, message) -> str:
    """The id of a request or of a logged command of ``kind``."""
    return getattr(message, KINDS[kind][1])


def record_matches(op, command) -> bool:
    """Every field of the request is the logged command's field of the same name."""
    request = op.request
    return all(getattr(command, field.name) == getattr(request, field.name)
               for field in request.DESCRIPTOR.fields)


def apply(model, seq: int, op):
    r = op.request
    if op.kind == "receive_return":
        return model.apply_receive_return(seq, r.return_id, r.sku, r.units)
    if op.kind == "inspect":
        return model.apply_inspect(seq, r.return_id, r.sellable_units, r.damaged_units)
    if op.kind == "write_off":
        return model.apply_write_off(seq, r.change_id, r.sku, r.units, r.state)
    if op.kind == "hold_stock":
        return model.apply_hold(seq, r.change_id, r.sku, r.units, r.state)
    if op.kind == "expect_receipt":
        return model.apply_expect_receipt(seq, r.po_id, r.sku, r.units)
    return model.apply_receive(seq, r.receipt_id, r.po_id, r.units)


def seen(op) -> dict:
    """The answer the client saw, in the model's terms."""
    response = op.response
    if op.kind in ("expect_receipt", "receive"):
        return {"incoming": response.incoming, "on_hand": response.on_hand,
                "received": response.received, "over_received": response.over_received}
    s = response.stock
    return {"stock": (s.sku, s.on_hand, s.reserved, s.committed, s.available, s.quarantine,
                      s.damaged, s.quality_control, s.safety_stock)}


def check_replay(model, op, bad) -> None:
    """A replayed answer: the model applied that id, with that payload (the figures of a
    repeat are the outcome as recorded then, checked when it was first answered)."""
    r = op.request
    if op.kind == "receive_return":
        entry = model.returns.get(r.return_id)
        ok = entry is not None and tuple(entry[:2]) == (r.sku, r.units)
    elif op.kind == "inspect":
        entry = model.returns.get(r.return_id)
        ok = entry is not None and entry[2]
    elif op.kind in ("write_off", "hold_stock"):
        ok = model.write_offs.get(r.change_id) == (r.sku, r.units, r.state)
    elif op.kind == "expect_receipt":
        entry = model.orders.get(r.po_id)
        ok = entry is not None and tuple(entry[:2]) == (r.sku, r.units)
    else:
        ok = model.receipts.get(r.receipt_id) == (r.po_id, r.units)
    if not ok:
        bad(f"replayed a {op.kind} the model never applied with that payload: {op}")
