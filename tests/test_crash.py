"""kill -9 under concurrent load, restart, and check every acknowledged operation from the
clients' own records: acked operations are all there, nothing was invented beyond what was in
flight, the counters balance against the reservations, and oversold == 0."""
from __future__ import annotations

import asyncio
import dataclasses
import random
import signal
import time

import grpc
from daemonproc import DaemonProcess

from reservd.v1 import reservd_pb2 as pb
from reservd.v1 import reservd_pb2_grpc as pb_grpc

CYCLES = 20
SUITE_SECONDS_MAX = 150
HOT_STOCK = 40
COLD_SKUS = [f"cold-{i}" for i in range(30)]
COLD_STOCK = 1_000
WORKERS = 12

# Which states an operation leads to, once acknowledged.
AFTER = {"commit": pb.COMMITTED, "release": pb.RELEASED, "fulfil": pb.FULFILLED}


@dataclasses.dataclass
class Tracked:
    lines: dict[str, int]
    acked: int | None = None  # last acknowledged state
    in_flight: int | None = None  # state an unacknowledged call may or may not have reached
    unsure_reserve: bool = False  # the Reserve itself was never acknowledged


class History:
    def __init__(self) -> None:
        self.reservations: dict[str, Tracked] = {}
        self.acked_operations = 0
        self.supplied = {"hot": HOT_STOCK, **dict.fromkeys(COLD_SKUS, COLD_STOCK)}


async def _worker(stub, history: History, worker: int, cycle: int, rng: random.Random, stop):
    mine: list[str] = []
    n = 0
    while not stop.is_set():
        n += 1
        action = rng.random()
        if action < 0.5 or not mine:
            rid = f"c{cycle}-w{worker}-{n}"
            skus = ["hot"] if rng.random() < 0.4 else rng.sample(COLD_SKUS, rng.randint(1, 3))
            lines = {sku: rng.randint(1, 2) for sku in skus}
            tracked = Tracked(lines, unsure_reserve=True)
            history.reservations[rid] = tracked
            request = pb.ReserveRequest(
                reservation_id=rid, ttl_seconds=3600,
                lines=[pb.Line(sku=s, quantity=q) for s, q in lines.items()],
            )
            try:
                response = await stub.Reserve(request, timeout=5)
            except grpc.aio.AioRpcError:
                return
            history.acked_operations += 1
            tracked.unsure_reserve = False
            if response.granted:
                tracked.acked = pb.HELD
                mine.append(rid)
            else:
                del history.reservations[rid]
            continue
        rid = rng.choice(mine)
        tracked = history.reservations[rid]
        if tracked.acked == pb.HELD:
            operation = "commit" if rng.random() < 0.6 else "release"
        elif tracked.acked == pb.COMMITTED:
            operation = "fulfil" if rng.random() < 0.7 else "release"
        else:
            mine.remove(rid)
            continue
        tracked.in_flight = AFTER[operation]
        method = {"commit": stub.Commit, "release": stub.Release, "fulfil": stub.Fulfil}[operation]
        request_type = {"commit": pb.CommitRequest, "release": pb.ReleaseRequest,
                        "fulfil": pb.FulfilRequest}[operation]
        try:
            response = await method(request_type(reservation_id=rid), timeout=5)
        except grpc.aio.AioRpcError:
            return
        history.acked_operations += 1
        assert response.state == AFTER[operation]
        tracked.acked, tracked.in_flight = AFTER[operation], None


async def _check(stub, history: History) -> None:
    """Compare the recovered daemon with the clients' records."""
    held = dict.fromkeys(history.supplied, 0)
    committed = dict.fromkeys(history.supplied, 0)
    shipped = dict.fromkeys(history.supplied, 0)
    async def state_of(rid: str) -> int | None:
        try:
            return (await stub.GetReservation(pb.GetReservationRequest(reservation_id=rid))).state
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND, error
            return None

    items = list(history.reservations.items())
    states = []
    for start in range(0, len(items), 256):
        states += await asyncio.gather(*(state_of(rid) for rid, _ in items[start:start + 256]))
    for (rid, tracked), state in zip(items, states):
        if state is None:
            assert tracked.unsure_reserve, f"acknowledged reservation {rid} was lost"
            del history.reservations[rid]
            continue
        if tracked.unsure_reserve:
            # It landed without an ack: it is whatever the unacked Reserve made it.
            assert state == pb.HELD, (rid, state)
            tracked.unsure_reserve, tracked.acked = False, pb.HELD
        allowed = {tracked.acked, tracked.in_flight} - {None}
        assert state in allowed, f"{rid}: state {state}, acked {tracked.acked}, in flight {tracked.in_flight}"
        tracked.acked, tracked.in_flight = state, None
        for sku, quantity in tracked.lines.items():
            if state == pb.HELD:
                held[sku] += quantity
            elif state == pb.COMMITTED:
                committed[sku] += quantity
            elif state == pb.FULFILLED:
                shipped[sku] += quantity
    response = await stub.GetStock(pb.GetStockRequest(skus=list(history.supplied)))
    for stock in response.stock:
        supplied = history.supplied[stock.sku]
        assert stock.reserved == held[stock.sku], stock
        assert stock.committed == committed[stock.sku], stock
        assert stock.on_hand == supplied - shipped[stock.sku], stock
        granted = held[stock.sku] + committed[stock.sku] + shipped[stock.sku]
        oversold = max(0, granted - supplied)
        assert oversold == 0, stock


def test_kill_9_under_load_loses_no_acknowledged_operation(tmp_path):
    rng = random.Random(20261126)
    history = History()
    daemon = DaemonProcess(
        "--data-dir", str(tmp_path / "data"),
        "--snapshot-records-interval", "500", "--segment-bytes-max", "65536",
    )
    started = time.monotonic()
    cycles = 0
    snapshots = 0

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
                asyncio.create_task(_worker(stub, history, w, number, rng, stop))
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
            snapshots += len(daemon.logged("snapshot"))
        daemon.start()
        asyncio.run(_final_check(daemon, history))
    finally:
        daemon.kill()
    print(f"crash cycles: {cycles}, acknowledged operations checked: {history.acked_operations}, "
          f"reservations tracked: {len(history.reservations)}, snapshots: {snapshots}, oversold: 0")
    assert cycles >= CYCLES
    assert history.acked_operations > 1000
    assert snapshots > 0, "snapshots were taken (and crashed around) during the run"


async def _final_check(daemon: DaemonProcess, history: History) -> None:
    async with grpc.aio.insecure_channel(daemon.target) as channel:
        await _check(pb_grpc.ReservationsStub(channel), history)
