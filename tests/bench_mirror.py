"""Reserve throughput and latency with the Redis mirror on versus WAL only.

    PYTHONPATH=src python tests/bench_mirror.py [--clients 64] [--seconds 10] [--processes 4]

Runs ``reservd serve`` as a subprocess (WAL in a temporary directory; with ``--redis-url`` to a
redis-server this script starts, then without), and drives it from ``--processes`` client
processes holding ``--clients`` concurrent Reserve calls in total (one unit each, of 100 SKUs
with ample stock, each a new reservation id). Prints Reserve RPCs per second, p50/p99 and the
daemon's CPU time per Reserve (steadier than throughput on a shared machine).
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

SKUS = [f"sku-{i}" for i in range(100)]


def _client_process(target: str, tasks: int, seconds: float, seed: int, queue) -> None:
    import grpc
    import uvloop

    from reservd.v1 import reservd_pb2 as pb
    from reservd.v1 import reservd_pb2_grpc as pb_grpc

    async def main() -> tuple[list[float], list[str]]:
        channel = grpc.aio.insecure_channel(target)
        stub = pb_grpc.ReservationsStub(channel)
        latencies: list[float] = []
        refused: list[str] = []
        deadline = time.monotonic() + seconds
        rng = random.Random(seed)

        async def client(number: int) -> None:
            count = 0
            while time.monotonic() < deadline:
                count += 1
                request = pb.ReserveRequest(
                    reservation_id=f"b{seed}-{number}-{count}",
                    lines=[pb.Line(sku=rng.choice(SKUS), quantity=1)], ttl_seconds=3_600,
                )
                started = time.perf_counter()
                try:
                    await stub.Reserve(request, timeout=10)
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    refused.append(error.details())
                    continue
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(client(i) for i in range(tasks)))
        await channel.close()
        return latencies, refused

    queue.put(uvloop.run(main()))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: list[float], fraction: float) -> float:
    return values[min(len(values) - 1, int(len(values) * fraction))]


async def _prepare(target: str, daemon: subprocess.Popen) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from reservd.v1 import reservd_pb2 as pb
    from reservd.v1 import reservd_pb2_grpc as pb_grpc

    channel = grpc.aio.insecure_channel(target)
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 20
    while True:
        try:
            status = await health.Check(
                health_pb2.HealthCheckRequest(service="reservd.v1.Reservations"), timeout=1
            )
            if status.status == health_pb2.HealthCheckResponse.SERVING:
                break
        except grpc.aio.AioRpcError:
            pass
        if time.monotonic() > deadline or daemon.poll() is not None:
            raise RuntimeError(f"reservd at {target} did not become SERVING")
        await asyncio.sleep(0.05)
    admin = pb_grpc.AdminStub(channel)
    for sku in SKUS:
        await admin.SetStock(
            pb.SetStockRequest(sku=sku, on_hand=1_000_000_000, adjustment_id=f"bench-{sku}")
        )
    await channel.close()


def run(label: str, redis_url: str | None, args) -> None:
    from redisserver import free_port

    with tempfile.TemporaryDirectory() as directory:
        port = free_port()
        command = [
            sys.executable, "-m", "reservd", "--log-level", "warning", "serve",
            "--bind", f"127.0.0.1:{port}", "--data-dir", str(Path(directory) / "data"),
        ]
        if redis_url:
            command += ["--redis-url", redis_url]
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        log_path = Path(directory) / "reservd.log"
        daemon = subprocess.Popen(command, env=env, stderr=log_path.open("wb"))
        try:
            target = f"127.0.0.1:{port}"
            asyncio.run(_prepare(target, daemon))
            queue = multiprocessing.Queue()
            per_process = args.clients // args.processes
            workers = [
                multiprocessing.Process(
                    target=_client_process,
                    args=(target, per_process, args.seconds, seed, queue),
                )
                for seed in range(args.processes)
            ]
            cpu_before = _cpu_seconds(daemon.pid)
            for worker in workers:
                worker.start()
            results = [queue.get() for _ in workers]
            cpu = _cpu_seconds(daemon.pid) - cpu_before
            for worker in workers:
                worker.join()
        finally:
            daemon.terminate()
            daemon.wait(30)
        latencies = sorted(x for result in results for x in result[0])
        refused = [x for result in results for x in result[1]]
        if refused:
            print(f"{label}: {len(refused)} Reserve refused, e.g. {refused[0]!r}; daemon log:")
            print(log_path.read_text()[-4000:])
    print(
        f"{label:<12} {len(latencies) / args.seconds:>9.0f} Reserve/s   "
        f"p50 {_percentile(latencies, 0.50) * 1000:6.2f} ms   "
        f"p99 {_percentile(latencies, 0.99) * 1000:6.2f} ms   "
        f"daemon CPU {cpu / len(latencies) * 1e6:4.0f} us/Reserve   "
        f"({per_process * args.processes} clients, {args.seconds:g} s)"
    )


def main() -> None:
    from redisserver import RedisServer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(Path(directory) / "redis")
        server.start()
        try:
            run("mirror on", server.url, args)
        finally:
            server.close()
    run("WAL only", None, args)


if __name__ == "__main__":
    main()
