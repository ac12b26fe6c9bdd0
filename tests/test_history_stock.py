"""The history checker over the stock-state and incoming-stock commands: returns, inspections,
write-offs, holds in safety_stock and quality_control, purchase orders and receipts from an admin client racing 16 buyers, read back from
the WAL and checked against the model written from the README."""
from __future__ import annotations

import asyncio
import random

import grpc
from conftest import aio, eventually, running, test_config
from history import Recorder, check, read_final_state, read_wal
from test_history import SKUS, _buyer

from reservd.clock import ManualClock
from reservd.ledger import State
from reservd.v1 import reservd_pb2 as pb
from reservd.v1 import reservd_pb2_grpc as pb_grpc

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
    rng = random.Random(20261204)
    clock = ManualClock()
    recorder = Recorder()
    data = tmp_path / "data"
    async with running(test_config(data), clock=clock) as server:
        for sku in SKUS:
            await recorder.call(0, "set_stock", server.admin.SetStock, pb.SetStockRequest(
                sku=sku, on_hand=12, adjustment_id=f"init-{sku}"))
        channels = [grpc.aio.insecure_channel(server.target) for _ in range(4)]
        stubs = [pb_grpc.ReservationsStub(channel) for channel in channels]
        await asyncio.gather(
            _stock_admin(recorder, server.admin, clock, random.Random(rng.random())),
            *(_buyer(recorder, client, stubs[client % 4], random.Random(rng.random()))
              for client in range(1, BUYERS + 1)),
        )
        for channel in channels:
            await channel.close()
        clock.advance(3_600_000)
        ledger = server.daemon.ledger
        await eventually(
            lambda: not any(r.state is State.HELD for r in ledger.reservations.values()),
            "every hold expired",
        )
        await server.daemon.log.commit()
        seq = ledger.seq
        reservation_ids = {op.request.reservation_id for op in recorder.ops
                           if op.kind in ("reserve", "commit", "extend", "release", "fulfil")}
        final = await read_final_state(server.reservations, SKUS, reservation_ids, seq=seq)
        assert ledger.seq == seq, "nothing moved while the final state was read"
    report = check(recorder.ops, wal=read_wal(data), final=final)
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
