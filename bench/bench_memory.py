"""Memory per SKU, per finished reservation id and per live reservation, through the proto.

Starts `reservd serve --in-memory` as a subprocess on an ephemeral loopback port, then, with a
grpc.aio client, in four phases of N each (N = --count):

1. SKUs: N SetStock calls, each creating a SKU (and its adjustment id's idempotency record);
2. first Reserve of a SKU: N Reserve + Release pairs, one on each SKU of phase 1: the SKU's
   velocity state on the channel (reservd.velocity) plus a finished id;
3. finished ids: N Reserve + Release pairs of one line each on SKUs reserved before (what
   idempotency keeps);
4. live reservations: N Reserve calls of one line each, TTL 1 h (held).

After each phase it reads the daemon's RSS (/proc/PID/status VmRSS) and prints the delta per
item, in bytes. Ids and SKUs look like real ones (``order-l-00012345``, ``sku-00012345``).

The daemon runs with a change ring of ``--watch-ring-capacity`` entries (1,024 by default, not
the daemon's 262,144): the ring is one fixed allocation of 48 bytes per entry whose pages become
resident as it first fills, so with the default ring each mutation of the run would add 48 bytes
that are not per item (a SetStock, 96 a Reserve + Release). ``--watch-ring-capacity 262144``
measures that way.
Usage::

    .venv/bin/python bench/bench_memory.py [--count N] [--concurrency C] [--watch-ring-capacity E] [--json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import grpc

from reservd.v1 import reservd_pb2 as pb
from reservd.v1 import reservd_pb2_grpc as pb_grpc

WARMUP = 2_000  # items per phase before the baseline, so pools and dicts exist already


def start_daemon(ring_entries: int) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "reservd", "serve", "--bind", "127.0.0.1:0", "--in-memory"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env={**os.environ, "RESERVD_WATCH_RING_CAPACITY": str(ring_entries)},
    )
    port: list[int] = []
    ready = threading.Event()

    def read() -> None:
        for raw in process.stderr:
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if entry.get("msg") == "serving":
                port.append(entry["port"])
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(60) or not port:
        process.kill()
        raise SystemExit("reservd did not start")
    return process, port[0]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def run_all(calls, concurrency: int) -> None:
    """Await each call factory in ``calls`` with at most ``concurrency`` in flight."""
    iterator = iter(calls)

    async def worker() -> None:
        for call in iterator:
            await call()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def measure(port: int, pid: int, count: int, concurrency: int) -> dict:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        admin = pb_grpc.AdminStub(channel)
        reservations = pb_grpc.ReservationsStub(channel)

        def set_stock(prefix: str, i: int):
            return lambda: admin.SetStock(pb.SetStockRequest(
                sku=f"sku-{prefix}{i:08d}", on_hand=1_000_000, reason="bench",
                adjustment_id=f"count-{prefix}{i:08d}",
            ))

        def reserve(prefix: str, i: int, sku_count: int):
            return lambda: reservations.Reserve(pb.ReserveRequest(
                reservation_id=f"order-{prefix}{i:08d}", channel="web", ttl_seconds=3_600,
                lines=[pb.Line(sku=f"sku-{i % sku_count:08d}", quantity=1)],
            ))

        def reserve_release(prefix: str, i: int, sku_count: int):
            async def call() -> None:
                granted = await reserve(prefix, i, sku_count)()
                assert granted.granted, granted
                await reservations.Release(
                    pb.ReleaseRequest(reservation_id=f"order-{prefix}{i:08d}")
                )
            return call

        await run_all((set_stock("w", i) for i in range(WARMUP)), concurrency)
        await run_all((set_stock("", i) for i in range(WARMUP)), concurrency)
        await run_all((reserve_release("wf", i, WARMUP) for i in range(WARMUP)), concurrency)
        await run_all((reserve("wl", i, WARMUP) for i in range(WARMUP)), concurrency)
        figures = {"count": count}
        started = time.monotonic()
        before = rss_bytes(pid)
        await run_all((set_stock("", i) for i in range(WARMUP, WARMUP + count)), concurrency)
        after = rss_bytes(pid)
        figures["bytes_per_sku"] = (after - before) / count
        before = after
        sku_count = WARMUP + count
        # The first Reserve of a SKU on a channel also makes its velocity state (reservd.velocity,
        # per (sku, channel) pair): measured apart, so the next phase counts finished ids only.
        await run_all(
            (reserve_release("s", i, sku_count) for i in range(WARMUP, sku_count)), concurrency
        )
        after = rss_bytes(pid)
        figures["bytes_per_first_reserve_of_sku"] = (after - before) / count
        before = after
        await run_all((reserve_release("f", i, sku_count) for i in range(count)), concurrency)
        after = rss_bytes(pid)
        figures["bytes_per_finished_id"] = (after - before) / count
        before = after
        await run_all((reserve("l", i, sku_count) for i in range(count)), concurrency)
        after = rss_bytes(pid)
        figures["bytes_per_live_reservation"] = (after - before) / count
        figures["rss_bytes"] = after
        figures["seconds"] = round(time.monotonic() - started, 1)
        return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50_000, help="items per phase")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--watch-ring-capacity", type=int, default=1024,
                        help="change ring entries of the daemon (a power of two)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    process, port = start_daemon(args.watch_ring_capacity)
    try:
        figures = asyncio.run(measure(port, process.pid, args.count, args.concurrency))
    finally:
        process.kill()
        process.wait(10)
    if args.json:
        print(json.dumps(figures))
        return
    print(f"N = {args.count} per phase, {figures['seconds']} s, final RSS "
          f"{figures['rss_bytes'] / 2**20:.0f} MiB")
    for name in ("sku", "first_reserve_of_sku", "finished_id", "live_reservation"):
        print(f"  {name:>20}: {figures['bytes_per_' + name]:7.0f} B")


if __name__ == "__main__":
    main()
