"""The history checker over the stock-state and incoming-stock commands: returns, inspections,
write-offs, holds in safety_stock and quality_control, purchase orders and receipts from an admin client racing 16 buyers, read back from
the WAL and checked against the model written from the README."""
from __future__ import annotations

import asyncio
import random

import grpc
from conftest import aio
from history import Recorder
from test_history import SKUS, checked_run

from reservd.clock import ManualClock
from reservd.v1 import reservd_pb2 as pb

BUYERS = 16
ADMIN_OPS = 160


async def _stock_admin(recorder: Recorder, admin, clock: ManualClock, rng: random.Random):
    """Returns into quarantine, inspections (some splitting off damaged units), write-offs
    (some of more than is damaged: refused), purchase orders and (partial, over) receipts,
    with retries; 250 ms of the manual clock per operation."""
    open_returns: list[str] = []
    returned: dict[str, int] = {}  # return id -> units, from the answers this client saw
    orders: list[str] = []
    held: dict[tuple[str, str], int] = {}  # (sku, state) -> units, from the answers seen
    for n in range(ADMIN_OPS):
        clock.advance(250)
        sku = rng.choice(SKUS)
        roll = rng.random()
        if roll < 0.3 or (roll < 0.5 and not open_returns):
            request = pb.ReceiveReturnRequest(return_id=f"rma-{n}", sku=sku,
                                              units=rng.randint(1, 3), reservation_id=f"o{n}")
            kind, method = "receive_return", admin.ReceiveReturn
        elif roll < 0.5:
            return_id = open_returns.pop(rng.randrange(len(open_returns)))
            units = returned[return_id]
            damaged = rng.randint(0, units)
            request = pb.InspectRequest(return_id=return_id, sellable_units=units - damaged,
                                        damaged_units=damaged)
            kind, method = "inspect", admin.Inspect
        elif roll < 0.65:
            request = pb.WriteOffRequest(change_id=f"wo-{n}", sku=sku,
                                         units=rng.randint(1, 2), state="damaged")
            kind, method = "write_off", admin.WriteOff
        elif roll < 0.72:
            state = rng.choice(("safety_stock", "quality_control"))
            units = rng.randint(1, 3)
            if held.get((sku, state)) and rng.random() < 0.5:
                units = -rng.randint(1, held[(sku, state)] + 1)  # sometimes more than held
            request = pb.HoldStockRequest(change_id=f"h-{n}", sku=sku, state=state, units=units)
            kind, method = "hold_stock", admin.HoldStock
        elif roll < 0.8 or not orders:
            request = pb.ExpectReceiptRequest(po_id=f"po-{n}", sku=sku, units=rng.randint(2, 9),
                                              eta_ms=clock.now_ms() + 86_400_000)
            kind, method = "expect_receipt", admin.ExpectReceipt
            orders.append(request.po_id)
        else:
            request = pb.ReceiveRequest(receipt_id=f"rc-{n}", po_id=rng.choice(orders),
                                        units=rng.randint(1, 6))
            kind, method = "receive", admin.Receive
        response = await recorder.call(0, kind, method, request)
        if kind == "receive_return" and response is not None:
            returned[request.return_id] = request.units
            open_returns.append(request.return_id)
        if kind == "hold_stock" and response is not None:
            key = (request.sku, request.state)
            held[key] = held.get(key, 0) + request.units
        if rng.random() < 0.1:  # an admin retry: replayed
            await recorder.call(0, kind, method, request)
        await asyncio.sleep(0)


@aio
async def test_returns_and_receipts_racing_buyers_check_out(tmp_path):
    recorder, report = await checked_run(
        tmp_path / "data", random.Random(20261204), 12, _stock_admin, BUYERS
    )
    print(f"stock states and incoming, 17 clients: {report}")
    assert report.ok, report
    kinds = {op.kind for op in recorder.ops if op.acked and not op.response.replayed}
    assert {"receive_return", "inspect", "write_off", "hold_stock", "expect_receipt",
            "receive"} <= kinds
    assert any(op.kind == "write_off" and op.code == grpc.StatusCode.FAILED_PRECONDITION
               for op in recorder.ops), "a write-off of more than is damaged was refused"
    assert any(op.acked and op.kind == "receive" and op.response.over_received
               for op in recorder.ops), "a receipt beyond its order"
    assert report.replayed > 0 and report.sold_out > 0, report
