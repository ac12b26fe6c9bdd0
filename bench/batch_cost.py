"""Server CPU per Reserve as a function of the batch size: the per-RPC cost a batch shares.

    python bench/batch_cost.py [--sizes 1 10 100 1000] [--ops 20000] [--in-memory]

Starts `reservd serve` (WAL on unless --in-memory), then for each size sends Batch RPCs of that
many one-unit Reserves of distinct ids, --pipeline of them in flight at once, and reports the
server's CPU microseconds per Reserve (from /proc/PID/schedstat), reservations per second and
WAL records per fsync. Unary Reserve (size "unary") is the baseline.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import shutil
import sys
import tempfile
import time
from pathlib import Path

import grpc
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sidebyside import (  # noqa: E402
    ROOT, ServerProcess, cpu_seconds_between, free_port, pb, pb_grpc, process_tree_cpu, scrape,
)

SKUS = 1_000


def _reserve(reservation_id: str, sku: str) -> pb.ReserveRequest:
    return pb.ReserveRequest(
        reservation_id=reservation_id, lines=[pb.Line(sku=sku, quantity=1)], ttl_seconds=86_400
    )


async def measure(
    stub, pid: int, metrics_port: int, size: str, ops: int, pipeline: int, label: str
) -> dict:
    """``ops`` one-unit Reserves in Batch RPCs of ``size`` (or unary), ids prefixed ``label``."""
    ids = itertools.count()
    batch = 1 if size == "unary" else int(size)
    calls = ops // batch

    async def worker() -> None:
        while (n := next(ids)) < calls:
            if size == "unary":
                await stub.Reserve(_reserve(f"{label}-{n}", f"sku-{n % SKUS}"))
                continue
            request = pb.BatchRequest(ops=[
                pb.BatchOp(reserve=_reserve(f"{label}-{n}-{i}", f"sku-{(n + i) % SKUS}"))
                for i in range(batch)
            ])
            response = await stub.Batch(request)
            assert all(result.reserve.granted for result in response.results)

    wal = scrape(metrics_port, prefix="reservd_wal_")
    cpu = process_tree_cpu(pid)
    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(pipeline)))
    elapsed = time.monotonic() - started
    server_cpu = cpu_seconds_between(cpu, process_tree_cpu(pid))
    wal_after = scrape(metrics_port, prefix="reservd_wal_")
    done = calls * batch
    fsyncs = wal_after.get("reservd_wal_fsyncs", 0) - wal.get("reservd_wal_fsyncs", 0)
    records = wal_after.get("reservd_wal_records", 0) - wal.get("reservd_wal_records", 0)
    return {
        "size": size, "reservations": done,
        "reservations_per_second": round(done / elapsed),
        "server_cpu_us_per_op": round(1e6 * server_cpu / done, 1),
        "records_per_fsync": round(records / fsyncs, 1) if fsyncs else None,
    }


async def main(args) -> None:
    data_dir = None if args.in_memory else Path(tempfile.mkdtemp(prefix="bench-batch-cost-"))
    metrics_port = free_port()
    command = [sys.executable, "-m", "reservd", "serve", "--bind", "127.0.0.1:0",
               "--metrics-port", str(metrics_port)]
    command += ["--in-memory"] if data_dir is None else ["--data-dir", str(data_dir)]
    env = {"PYTHONPATH": str(ROOT / "src")}
    server = await ServerProcess("reservd", command, env).start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    reservations, admin = pb_grpc.ReservationsStub(channel), pb_grpc.AdminStub(channel)
    try:
        for i in range(SKUS):
            await admin.SetStock(pb.SetStockRequest(
                sku=f"sku-{i}", on_hand=10_000_000, adjustment_id=f"seed-{i}"
            ))
        await measure(reservations, server.pid, metrics_port, "10", 2_000, args.pipeline, "warm")
        print(f"{'batch':>6} {'res/s':>9} {'srv us/op':>10} {'rec/fsync':>10}  "
              f"({'in memory' if data_dir is None else 'WAL'}, {args.pipeline} RPCs in flight)")
        for size in args.sizes:
            row = await measure(reservations, server.pid, metrics_port, size, args.ops,
                                args.pipeline, f"size-{size}")
            print(f"{row['size']:>6} {row['reservations_per_second']:>9} "
                  f"{row['server_cpu_us_per_op']:>10} {row['records_per_fsync'] or '-':>10}",
                  flush=True)
    finally:
        await channel.close()
        server.stop()
        if data_dir is not None:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["unary", "1", "10", "100", "1000"])
    parser.add_argument("--ops", type=int, default=20_000, help="reservations per size")
    parser.add_argument("--pipeline", type=int, default=2, help="RPCs in flight")
    parser.add_argument("--in-memory", action="store_true")
    uvloop.run(main(parser.parse_args()))
