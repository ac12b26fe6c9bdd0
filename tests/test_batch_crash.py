"""kill -9 with batches in flight, a fixed number of times; restart; then check the whole
history with the history checker (tests/history.py) against the write-ahead log: every op
acknowledged in a batch's answer is there, each unanswered one is absent or whole, the answers
and the final counters replay exactly on the reference model, and oversold == 0.

Once with raw Batch RPCs (each op recorded as its own call, invoked and completed with its
batch), once through the auto-batching client (each caller's call recorded as made)."""
from __future__ import annotations

import asyncio
import random
import signal
import time

import grpc
from daemonproc import DaemonProcess
from history import Op, Recorder, check, read_final_state, read_wal

from reservd.client import ReservdClient, ReservdError
from reservd.v1 import reservd_pb2 as pb
from reservd.v1 import reservd_pb2_grpc as pb_grpc

CYCLES = 6
SUITE_SECONDS_MAX = 90
BUYERS = 12
BATCH_OPS_MAX = 20
SKUS = ("hot", "cold-0", "cold-1", "cold-2", "cold-3", "cold-4")
SUPPLIED = {"hot": 40, **{sku: 500 for sku in SKUS[1:]}}
_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
_REQUEST = {"commit": pb.CommitRequest, "release": pb.ReleaseRequest, "fulfil": pb.FulfilRequest}


class Buyer:
    """Chooses the next operation from what its own answers told it."""

    def __init__(self, name: str, rng: random.Random) -> None:
        self.name = name
        self.rng = rng
        self.mine: dict[str, int] = {}  # reservation id -> the state last seen
        self.busy: set[str] = set()  # ids with a call in flight
        self.n = 0

    def next(self) -> tuple[str, object] | None:
        """(kind, request), or None when the chosen reservation is busy."""
        rng = self.rng
        live = [rid for rid, state in self.mine.items()
                if state in (pb.HELD, pb.COMMITTED) and rid not in self.busy]
        if not live or rng.random() < 0.5:
            self.n += 1
            skus = ["hot"] if rng.random() < 0.4 else rng.sample(SKUS[1:], rng.randint(1, 3))
            request = pb.ReserveRequest(
                reservation_id=f"{self.name}-{self.n}", ttl_seconds=3600,
                lines=[pb.Line(sku=sku, quantity=rng.randint(1, 2)) for sku in skus],
            )
            return "reserve", request
        rid = rng.choice(live)
        if self.mine[rid] == pb.HELD:
            kind = "commit" if rng.random() < 0.6 else "release"
        else:
            kind = "fulfil" if rng.random() < 0.7 else "release"
        return kind, _REQUEST[kind](reservation_id=rid)

    def learned(self, kind: str, request, response) -> None:
        if response is None:
            self.mine.pop(request.reservation_id, None)  # unknown now: leave it alone
        elif kind == "reserve":
            if response.granted:
                self.mine[request.reservation_id] = pb.HELD
        else:
            self.mine[request.reservation_id] = response.state


async def _raw_batches(recorder: Recorder, number: int, buyer: Buyer, stub,
                       stop: asyncio.Event) -> None:
    while not stop.is_set():
        ops: list[Op] = []
        buyer.busy.clear()
        for _ in range(buyer.rng.randint(1, BATCH_OPS_MAX)):
            planned = buyer.next()
            if planned[1].reservation_id in buyer.busy:
                continue
            buyer.busy.add(planned[1].reservation_id)
            ops.append(Op(number, planned[0], planned[1], time.monotonic_ns()))
        request = pb.BatchRequest(ops=[pb.BatchOp(**{op.kind: op.request}) for op in ops])
        recorder.ops.extend(ops)
        try:
            response = await stub.Batch(request, timeout=5)
        except grpc.aio.AioRpcError as error:
            for op in ops:
                op.completed_ns = time.monotonic_ns()
                op.code, op.details = error.code(), error.details() or ""
            return  # the daemon died
        assert len(response.results) == len(ops)
        for op, result in zip(ops, response.results):
            op.completed_ns = time.monotonic_ns()
            kind = result.WhichOneof("result")
            if kind == "error":
                op.code = _STATUS_BY_NUMBER[result.error.code]
                op.details = result.error.message
            else:
                op.response = getattr(result, kind)
            buyer.learned(op.kind, op.request, op.response)


async def _through_client(recorder: Recorder, number: int, buyer: Buyer,
                          client: ReservdClient, stop: asyncio.Event) -> None:
    while not stop.is_set():
        kind, request = buyer.next()
        op = Op(number, kind, request, time.monotonic_ns())
        recorder.ops.append(op)
        rid = request.reservation_id
        try:
            if kind == "reserve":
                lines = [(line.sku, line.quantity) for line in request.lines]
                result = await client.reserve(rid, lines, ttl_seconds=request.ttl_seconds)
                if result.error is not None:
                    raise result.error
                response = result.response
            else:
                response = await getattr(client, kind)(rid)
        except ReservdError as error:
            op.completed_ns = time.monotonic_ns()
            op.code, op.details = error.code, error.details
            buyer.learned(kind, request, None)
            continue
        op.completed_ns = time.monotonic_ns()
        op.response = response
        buyer.learned(kind, request, response)


def _crash_cycles(tmp_path, seed: int, batching_client: bool) -> None:
    rng = random.Random(seed)
    recorder = Recorder()
    data = tmp_path / "data"
    daemon = DaemonProcess("--data-dir", str(data))
    buyers = [Buyer(f"b{i}", random.Random(rng.random())) for i in range(BUYERS)]
    crashes_ns: list[int] = []
    started = time.monotonic()

    async def cycle(number: int) -> None:
        async with ReservdClient(
            daemon.target, batching=True, deadline_seconds=1.0, attempts_max=2
        ) as client:
            if number == 0:
                admin = pb_grpc.AdminStub(client.channel)
                for sku, on_hand in SUPPLIED.items():
                    await recorder.call(0, "set_stock", admin.SetStock, pb.SetStockRequest(
                        sku=sku, on_hand=on_hand, adjustment_id=f"init-{sku}"))
            stop = asyncio.Event()
            if batching_client:
                tasks = [_through_client(recorder, number + 1, buyer, client, stop)
                         for buyer in buyers]
            else:
                tasks = [_raw_batches(recorder, number + 1, buyer, client.reservations, stop)
                         for buyer in buyers]
            running = [asyncio.create_task(task) for task in tasks]
            await asyncio.sleep(rng.uniform(0.3, 1.0))
            daemon.signal(signal.SIGKILL)
            stop.set()
            await asyncio.gather(*running)

    try:
        for number in range(CYCLES):
            if time.monotonic() - started > SUITE_SECONDS_MAX:
                break
            daemon.start()
            asyncio.run(cycle(number))
            daemon.wait()
            crashes_ns.append(time.monotonic_ns())
        daemon.start()

        async def final():
            async with ReservdClient(daemon.target) as client:
                ids = {op.request.reservation_id for op in recorder.ops if op.kind != "set_stock"}
                return await read_final_state(client.reservations, SUPPLIED, ids)

        final_state = asyncio.run(final())
    finally:
        daemon.kill()
    report = check(recorder.ops, wal=read_wal(data), final=final_state)
    print(f"{'batching client' if batching_client else 'Batch RPCs'}, "
          f"kill -9 x{len(crashes_ns)}: {report}")
    assert report.ok, report
    assert len(crashes_ns) >= CYCLES
    assert report.acknowledged > 300, report
    if not batching_client:
        # Raw batches are always mid-air at a kill. The batching client's calls are caught
        # mid-air only when a kill lands while a batch is on the wire (0 of 30,786 once in a
        # CI run): there the check is that whatever was in flight is absent or whole.
        assert report.indefinite > 0, report


def test_kill_9_with_batch_rpcs_in_flight_checks_out(tmp_path):
    _crash_cycles(tmp_path, 20261203, batching_client=False)


def test_kill_9_under_the_batching_client_checks_out(tmp_path):
    _crash_cycles(tmp_path, 20261204, batching_client=True)
