"""kill -9 mid-flow of returns, inspections, write-offs, holds, purchase orders and receipts racing
buyers, a fixed number of times; restart; the history checker (tests/history.py) then finds
every acknowledged command in the log, each unanswered one absent or whole, and every answer
and the final counters as the model (written from the README) says."""
from __future__ import annotations

import random

from history import Recorder
from test_crash import _worker, kill_9_cycles

from reservd.v1 import reservd_pb2 as pb

CYCLES = 4
SKUS = {"hot": 40, **{f"cold-{i}": 1_000 for i in range(30)}}
WORKERS = 6
ACKED_PER_CYCLE = (150, 400)


async def _stock_admin(admin, recorder: Recorder, cycle: int, rng: random.Random, acked,
                       returned: dict[str, int], orders: list[str]) -> None:
    """Returns, inspections, write-offs, holds (safety_stock, quality_control, and their return),
    orders and receipts on "hot" and a cold SKU until the daemon dies under it. Knows only what
    its answers told it (``returned``: open returns)."""
    client = 1_000 + cycle
    for n in range(1_000_000):
        sku = "hot" if rng.random() < 0.5 else "cold-0"
        roll = rng.random()
        if roll < 0.3 or (roll < 0.5 and not returned):
            request = pb.ReceiveReturnRequest(return_id=f"rma-{cycle}-{n}", sku=sku,
                                              units=rng.randint(1, 3))
            kind, method = "receive_return", admin.ReceiveReturn
        elif roll < 0.5:
            return_id = rng.choice(sorted(returned))
            units = returned.pop(return_id)
            damaged = rng.randint(0, units)
            request = pb.InspectRequest(return_id=return_id, sellable_units=units - damaged,
                                        damaged_units=damaged)
            kind, method = "inspect", admin.Inspect
        elif roll < 0.6:
            request = pb.WriteOffRequest(change_id=f"wo-{cycle}-{n}", sku=sku, units=1,
                                         state="damaged")
            kind, method = "write_off", admin.WriteOff
        elif roll < 0.7:
            # A hold races the buyers for the shared units; a return of held units may find
            # fewer held than it asks (refused, nothing happens).
            request = pb.HoldStockRequest(
                change_id=f"h-{cycle}-{n}", sku=sku,
                state=rng.choice(("safety_stock", "quality_control")),
                units=rng.choice((1, 2, -1)))
            kind, method = "hold_stock", admin.HoldStock
        elif roll < 0.82 or not orders:
            request = pb.ExpectReceiptRequest(po_id=f"po-{cycle}-{n}", sku=sku,
                                              units=rng.randint(2, 9))
            kind, method = "expect_receipt", admin.ExpectReceipt
        else:
            request = pb.ReceiveRequest(receipt_id=f"rc-{cycle}-{n}", po_id=rng.choice(orders),
                                        units=rng.randint(1, 6))
            kind, method = "receive", admin.Receive
        response = await recorder.call(client, kind, method, request, timeout=30)
        if response is None:
            if recorder.ops[-1].indefinite:
                return  # the daemon died under this call
            continue  # refused (more than is damaged, held or free): nothing happened
        if kind == "receive_return":
            returned[request.return_id] = request.units
        elif kind == "expect_receipt":
            orders.append(request.po_id)
        acked()


def test_kill_9_mid_flow_of_returns_and_receipts_loses_nothing_acknowledged(tmp_path):
    rng = random.Random(20261204)
    recorder = Recorder()
    returned: dict[str, int] = {}
    orders: list[str] = []

    def tasks(stub, admin, number, acked):
        workers = [_worker(stub, recorder, w, number, random.Random(rng.random()), acked)
                   for w in range(WORKERS)]
        return workers + [_stock_admin(admin, recorder, number, random.Random(rng.random()),
                                       acked, returned, orders)]

    report, _, _ = kill_9_cycles(
        tmp_path, ("--snapshot-records-interval", "300"), rng, recorder, SKUS, CYCLES,
        ACKED_PER_CYCLE, tasks,
    )
    print(f"kill -9 mid-flow of returns, holds and receipts, {CYCLES} cycles: {report}")
    assert report.ok, report
    kinds = {op.kind for op in recorder.ops if op.acked}
    assert {"receive_return", "inspect", "hold_stock", "expect_receipt", "receive"} <= kinds
    assert report.indefinite > 0, "calls were cut by the kills"
