"""kill -9 with Batch RPCs in flight: after each restart, every op acknowledged in a batch's
answer is there, nothing was invented beyond what was in flight, and oversold == 0 (the same
checks as test_crash.py, whose client records and checker this reuses)."""
from __future__ import annotations

import asyncio
import random
import signal
import time

import grpc
from daemonproc import DaemonProcess
from test_crash import AFTER, COLD_SKUS, History, Tracked, _check

from reservd.v1 import reservd_pb2 as pb
from reservd.v1 import reservd_pb2_grpc as pb_grpc

CYCLES = 8
SUITE_SECONDS_MAX = 90
WORKERS = 6
BATCH_OPS_MAX = 20
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


def _plan_op(history: History, mine: list[str], busy: set[str], rid_prefix: str,
             rng: random.Random) -> tuple[str, str, pb.BatchOp] | None:
    """The next op of a batch, recorded as in flight: (operation, reservation id, op)."""
    if rng.random() < 0.5 or not mine:
        skus = ["hot"] if rng.random() < 0.4 else rng.sample(COLD_SKUS, rng.randint(1, 3))
        lines = {sku: rng.randint(1, 2) for sku in skus}
        history.reservations[rid_prefix] = Tracked(lines, unsure_reserve=True)
        request = pb.ReserveRequest(
            reservation_id=rid_prefix, ttl_seconds=3600,
            lines=[pb.Line(sku=s, quantity=q) for s, q in lines.items()],
        )
        return "reserve", rid_prefix, pb.BatchOp(reserve=request)
    rid = rng.choice(mine)
    if rid in busy:  # one op per reservation in flight, so its outcome is unambiguous
        return None
    tracked = history.reservations[rid]
    if tracked.acked == pb.HELD:
        operation = "commit" if rng.random() < 0.6 else "release"
    elif tracked.acked == pb.COMMITTED:
        operation = "fulfil" if rng.random() < 0.7 else "release"
    else:
        mine.remove(rid)
        return None
    tracked.in_flight = AFTER[operation]
    request_type = {"commit": pb.CommitRequest, "release": pb.ReleaseRequest,
                    "fulfil": pb.FulfilRequest}[operation]
    return operation, rid, pb.BatchOp(**{operation: request_type(reservation_id=rid)})


async def _batch_worker(stub, history: History, worker: int, cycle: int, rng: random.Random,
                        stop: asyncio.Event) -> None:
    mine: list[str] = []
    n = 0
    while not stop.is_set():
        plan, busy = [], set()
        for _ in range(rng.randint(1, BATCH_OPS_MAX)):
            n += 1
            planned = _plan_op(history, mine, busy, f"b{cycle}-w{worker}-{n}", rng)
            if planned is not None:
                plan.append(planned)
                busy.add(planned[1])
        if not plan:
            continue
        try:
            response = await stub.Batch(pb.BatchRequest(ops=[op for *_, op in plan]), timeout=5)
        except grpc.aio.AioRpcError:
            return  # the daemon died: everything of this batch stays in flight
        assert len(response.results) == len(plan)
        for (operation, rid, _), result in zip(plan, response.results):
            tracked = history.reservations[rid]
            kind = result.WhichOneof("result")
            if kind == "error":
                # Not acknowledged (failing closed): it stays in flight, maybe applied.
                assert result.error.code == UNAVAILABLE, result.error
                continue
            history.acked_operations += 1
            if operation == "reserve":
                tracked.unsure_reserve = False
                if result.reserve.granted:
                    tracked.acked = pb.HELD
                    mine.append(rid)
                else:
                    del history.reservations[rid]
                continue
            assert result.reservation.state == AFTER[operation]
            tracked.acked, tracked.in_flight = AFTER[operation], None


def test_kill_9_with_batches_in_flight_loses_no_acknowledged_operation(tmp_path):
    rng = random.Random(20261203)
    history = History()
    daemon = DaemonProcess(
        "--data-dir", str(tmp_path / "data"),
        "--snapshot-records-interval", "2000", "--segment-bytes-max", "262144",
    )
    started = time.monotonic()
    cycles = 0

    async def cycle(number: int) -> None:
        async with grpc.aio.insecure_channel(daemon.target) as channel:
            stub = pb_grpc.ReservationsStub(channel)
            if number == 0:
                admin = pb_grpc.AdminStub(channel)
                for sku, on_hand in history.supplied.items():
                    await admin.SetStock(
                        pb.SetStockRequest(sku=sku, on_hand=on_hand, adjustment_id=f"init-{sku}")
                    )
            else:
                await _check(stub, history)
            stop = asyncio.Event()
            workers = [
                asyncio.create_task(_batch_worker(stub, history, w, number, rng, stop))
                for w in range(WORKERS)
            ]
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            daemon.signal(signal.SIGKILL)
            stop.set()
            await asyncio.gather(*workers)

    try:
        for number in range(CYCLES):
            if time.monotonic() - started > SUITE_SECONDS_MAX:
                break
            daemon.start()
            asyncio.run(cycle(number))
            daemon.wait()
            cycles += 1
        daemon.start()

        async def final() -> None:
            async with grpc.aio.insecure_channel(daemon.target) as channel:
                await _check(pb_grpc.ReservationsStub(channel), history)

        asyncio.run(final())
    finally:
        daemon.kill()
    print(f"batch crash cycles: {cycles}, acknowledged ops checked: {history.acked_operations}")
    assert cycles >= CYCLES
    assert history.acked_operations > 500
