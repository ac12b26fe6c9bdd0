"""kill -9 under concurrent load, a fixed number of times; restart; then check the whole
history with the history checker (tests/history.py) against the write-ahead log: every
acknowledged operation is there, each unanswered one is absent or whole, the answers and the
final counters replay exactly on the reference model, and oversold == 0."""
from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
from pathlib import Path

import grpc

from conftest import eventually
from daemonproc import DaemonProcess
from history import Recorder, check, read_final_state, read_wal
from history_model import COMMITTED, FULFILLED, HELD

from reservd.v1 import reservd_pb2 as pb
from reservd.v1 import reservd_pb2_grpc as pb_grpc

CYCLES = 20
HOT_STOCK = 40
COLD_SKUS = [f"cold-{i}" for i in range(30)]
COLD_STOCK = 1_000
SUPPLIED = {"hot": HOT_STOCK, **dict.fromkeys(COLD_SKUS, COLD_STOCK)}
WORKERS = 12
SNAPSHOT_RECORDS_INTERVAL = 500
# Acknowledged operations before the kill, per cycle; every SNAPSHOT_EVERY-th cycle instead
# runs until a snapshot was written (and crashes just after it).
ACKED_PER_CYCLE = (100, 700)
SNAPSHOT_EVERY = 4


class SegmentTap:
    """Hard-links every WAL segment of ``data`` into ``archive/<life>/`` as soon as it appears,
    so the records a snapshot lets the daemon delete stay readable for the checker (a link
    keeps the inode, and the daemon's later appends show through it)."""

    def __init__(self, data: Path, archive: Path) -> None:
        self.data, self.archive = data, archive
        self.lives: list[Path] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, life: int) -> None:
        directory = self.archive / str(life)
        directory.mkdir(parents=True)
        self.lives.append(directory)
        self.data.mkdir(parents=True, exist_ok=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(directory,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the tap (the daemon is dead); one last pass links what is left."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._link(self.lives[-1])

    def _run(self, directory: Path) -> None:
        while not self._stop.wait(0.002):
            self._link(directory)

    def _link(self, directory: Path) -> None:
        for name in os.listdir(self.data):
            if name.startswith("wal-") and name.endswith(".log") \
                    and not (directory / name).exists():
                try:
                    os.link(self.data / name, directory / name)
                except FileNotFoundError:
                    pass  # deleted after a snapshot; it was linked when it was created


async def _worker(stub, recorder: Recorder, worker: int, cycle: int, rng: random.Random,
                  acked) -> None:
    """Reserves (hot or 1-3 cold lines), then commits, releases and fulfils its own
    reservations, until the daemon dies under it."""
    client = cycle * WORKERS + worker
    mine: dict[str, int] = {}
    for n in range(1_000_000):
        if rng.random() < 0.5 or not mine:
            rid = f"c{cycle}-w{worker}-{n}"
            skus = ["hot"] if rng.random() < 0.4 else rng.sample(COLD_SKUS, rng.randint(1, 3))
            request = pb.ReserveRequest(
                reservation_id=rid, ttl_seconds=3600,
                lines=[pb.Line(sku=sku, quantity=rng.randint(1, 2)) for sku in skus],
            )
            response = await recorder.call(client, "reserve", stub.Reserve, request, timeout=30)
            if response is None:
                return
            if response.granted:
                mine[rid] = HELD
            acked()
            continue
        rid = rng.choice(list(mine))
        if mine[rid] == HELD:
            kind = "commit" if rng.random() < 0.6 else "release"
        else:
            kind = "fulfil" if rng.random() < 0.7 else "release"
        method, request_type = {
            "commit": (stub.Commit, pb.CommitRequest), "release": (stub.Release, pb.ReleaseRequest),
            "fulfil": (stub.Fulfil, pb.FulfilRequest),
        }[kind]
        response = await recorder.call(client, kind, method, request_type(reservation_id=rid),
                                       timeout=30)
        if response is None:
            return
        if response.state in (HELD, COMMITTED):
            mine[rid] = response.state
        else:
            del mine[rid]
        acked()


def kill_9_cycles(tmp_path, daemon_args: tuple[str, ...], rng: random.Random, recorder: Recorder,
                  supplied: dict[str, int], cycles: int, acked_per_cycle: tuple[int, int],
                  tasks, snapshot_every: int = 0):
    """``cycles`` lives of a daemon on tmp_path/data (``daemon_args`` besides --data-dir), its
    WAL segments tapped: the first life sets ``supplied`` stock; in each, ``tasks(stub, admin,
    number, acked)`` makes the coroutines of the load, and the daemon is killed -9 once
    ``acked()`` was called a random number of times within ``acked_per_cycle`` (every
    ``snapshot_every``-th life instead: once a snapshot was written). Then one more start reads
    the final state of ``supplied`` and of every reservation the history names. Returns
    (report, snapshots written)."""
    data = tmp_path / "data"
    tap = SegmentTap(data, tmp_path / "archive")
    daemon = DaemonProcess("--data-dir", str(data), *daemon_args)
    snapshots = 0

    async def cycle(number: int) -> None:
        async with grpc.aio.insecure_channel(daemon.target) as channel:
            stub, admin = pb_grpc.ReservationsStub(channel), pb_grpc.AdminStub(channel)
            if number == 0:
                for sku, on_hand in supplied.items():
                    await recorder.call(0, "set_stock", admin.SetStock, pb.SetStockRequest(
                        sku=sku, on_hand=on_hand, adjustment_id=f"init-{sku}"))
            target = rng.randint(*acked_per_cycle)
            done = asyncio.Event()
            count = 0

            def acked() -> None:
                nonlocal count
                count += 1
                if count >= target:
                    done.set()

            loads = [asyncio.create_task(load) for load in tasks(stub, admin, number, acked)]
            if snapshot_every and number % snapshot_every == snapshot_every - 1:
                await eventually(lambda: daemon.logged("snapshot"), "snapshot written")
            else:
                await asyncio.wait_for(done.wait(), 120)
            daemon.signal(signal.SIGKILL)
            await asyncio.to_thread(daemon.wait)
            await asyncio.gather(*loads)

    try:
        for number in range(cycles):
            tap.start(number)
            daemon.start()
            asyncio.run(cycle(number))
            tap.stop()
            snapshots += len(daemon.logged("snapshot"))
        tap.start(cycles)
        daemon.start()
        reservation_ids = {op.key for op in recorder.ops
                           if op.kind in ("reserve", "commit", "release", "fulfil")}

        async def read_final():
            async with grpc.aio.insecure_channel(daemon.target) as channel:
                return await read_final_state(
                    pb_grpc.ReservationsStub(channel), supplied, reservation_ids
                )

        final = asyncio.run(read_final())
    finally:
        daemon.kill()
        tap.stop()
    return check(recorder.ops, wal=read_wal(*tap.lives), final=final), final, snapshots


def test_kill_9_under_load_loses_no_acknowledged_operation(tmp_path):
    rng = random.Random(20261126)
    recorder = Recorder()

    def tasks(stub, admin, number, acked):
        return [_worker(stub, recorder, w, number, random.Random(rng.random()), acked)
                for w in range(WORKERS)]

    report, final, snapshots = kill_9_cycles(
        tmp_path, ("--snapshot-records-interval", str(SNAPSHOT_RECORDS_INTERVAL),
                   "--segment-bytes-max", "65536"),
        rng, recorder, SUPPLIED, CYCLES, ACKED_PER_CYCLE, tasks, SNAPSHOT_EVERY,
    )
    granted = dict.fromkeys(SUPPLIED, 0)
    for state_lines in final.reservations.values():
        if state_lines is not None and state_lines[0] in (HELD, COMMITTED, FULFILLED):
            for sku, quantity in state_lines[1]:
                granted[sku] += quantity
    oversold = sum(max(0, granted[sku] - SUPPLIED[sku]) for sku in SUPPLIED)
    print(f"kill -9: {CYCLES} cycles, snapshots {snapshots}, history: {report}, "
          f"oversold {oversold}")
    assert report.ok, report
    assert oversold == 0
    assert report.acknowledged > CYCLES * ACKED_PER_CYCLE[0] // 2
    assert report.indefinite > 0, "calls were cut by the kills"
    assert snapshots >= CYCLES // SNAPSHOT_EVERY, "snapshots were taken (and crashed around)"

