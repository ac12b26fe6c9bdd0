"""kill -9 mid-flow of returns, inspections, write-offs, purchase orders and receipts racing
buyers, a fixed number of times; restart; the history checker (tests/history.py) then finds
every acknowledged command in the log, each unanswered one absent or whole, and every answer
and the final counters as the model (written from the README) says."""
from __future__ import annotations

import asyncio
import random
import signal

import grpc
from daemonproc import DaemonProcess
from history import Recorder, check, read_final_state, read_wal
from test_crash import SegmentTap, _worker

from reservd.v1 import reservd_pb2 as pb
from reservd.v1 import reservd_pb2_grpc as pb_grpc

CYCLES = 4
SKUS = {"hot": 40, **{f"cold-{i}": 1_000 for i in range(30)}}
WORKERS = 6
ACKED_PER_CYCLE = (150, 400)


async def _stock_admin(admin, recorder: Recorder, cycle: int, rng: random.Random, acked,
                       returned: dict[str, int], orders: list[str]) -> None:
    """Returns, inspections, write-offs, orders and receipts on "hot" and a cold SKU until the
    daemon dies under it. Knows only what its answers told it (``returned``: open returns)."""
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
        elif roll < 0.65:
            request = pb.WriteOffRequest(change_id=f"wo-{cycle}-{n}", sku=sku, units=1,
                                         state="damaged")
            kind, method = "write_off", admin.WriteOff
        elif roll < 0.8 or not orders:
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
            continue  # refused (a write-off of more than is damaged): nothing happened
        if kind == "receive_return":
            returned[request.return_id] = request.units
        elif kind == "expect_receipt":
            orders.append(request.po_id)
        acked()


def test_kill_9_mid_flow_of_returns_and_receipts_loses_nothing_acknowledged(tmp_path):
    rng = random.Random(20261204)
    recorder = Recorder()
    data = tmp_path / "data"
    tap = SegmentTap(data, tmp_path / "archive")
    daemon = DaemonProcess("--data-dir", str(data), "--snapshot-records-interval", "300")
    returned: dict[str, int] = {}
    orders: list[str] = []

    async def cycle(number: int) -> None:
        async with grpc.aio.insecure_channel(daemon.target) as channel:
            stub, admin = pb_grpc.ReservationsStub(channel), pb_grpc.AdminStub(channel)
            if number == 0:
                for sku, on_hand in SKUS.items():
                    await recorder.call(0, "set_stock", admin.SetStock, pb.SetStockRequest(
                        sku=sku, on_hand=on_hand, adjustment_id=f"init-{sku}"))
            target = rng.randint(*ACKED_PER_CYCLE)
            done = asyncio.Event()
            count = 0

            def acked() -> None:
                nonlocal count
                count += 1
                if count >= target:
                    done.set()

            tasks = [
                asyncio.create_task(_worker(stub, recorder, w, number,
                                            random.Random(rng.random()), acked))
                for w in range(WORKERS)
            ]
            tasks.append(asyncio.create_task(_stock_admin(
                admin, recorder, number, random.Random(rng.random()), acked, returned, orders)))
            await asyncio.wait_for(done.wait(), 120)
            daemon.signal(signal.SIGKILL)
            await asyncio.to_thread(daemon.wait)
            await asyncio.gather(*tasks)

    try:
        for number in range(CYCLES):
            tap.start(number)
            daemon.start()
            asyncio.run(cycle(number))
            tap.stop()
        tap.start(CYCLES)
        daemon.start()
        reservation_ids = {op.key for op in recorder.ops
                           if op.kind in ("reserve", "commit", "release", "fulfil")}

        async def read_final():
            async with grpc.aio.insecure_channel(daemon.target) as channel:
                return await read_final_state(
                    pb_grpc.ReservationsStub(channel), SKUS, reservation_ids
                )

        final = asyncio.run(read_final())
    finally:
        daemon.kill()
        tap.stop()
    report = check(recorder.ops, wal=read_wal(*tap.lives), final=final)
    print(f"kill -9 mid-flow of returns and receipts, {CYCLES} cycles: {report}")
    assert report.ok, report
    kinds = {op.kind for op in recorder.ops if op.acked}
    assert {"receive_return", "inspect", "expect_receipt", "receive"} <= kinds
    assert report.indefinite > 0, "calls were cut by the kills"
