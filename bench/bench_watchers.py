"""What open WatchStock streams cost Reserve: Reserve calls per second with 0 and with N watchers.

    python bench/bench_watchers.py                       # 0 vs 200 watchers, 3 runs each
    python bench/bench_watchers.py --watchers 0 200 --seconds 10 --repeat 3 --json out.json

One `reservd serve` with its WAL (group commit, fdatasync) in a temporary directory, seeded with
--skus SKUs of 10^9 units (nothing sells out). Per run, a child process opens --watchers
WatchStock streams, each on --watch-skus SKUs drawn at random (a channel sync worker's share of
the catalogue; --all-sku-watchers of them watch every SKU instead); half of them read every
update, the other half read the first update (the snapshot, so the stream is surely open) and
then never read again. Once every stream is open, --clients tasks of this process call Reserve
(one unit of a random SKU) for --seconds after a one-second warm-up. Runs with different watcher
counts take turns (0, 200, 0, 200, ...) so drifting background load hits them alike; the table
shows the median run of each count and the ratios to the first count (0 watchers): of
Reserve calls per second and of the daemon's CPU time per Reserve (robuster on a busy machine).

Also reported per run: the daemon's CPU (100 % = one core), its RSS at the end, and from its
metrics the updates handed to watchers, the event-loop seconds spent fanning them out, and the
watchers detached (stalled, catching up or in a snapshot). Every process shares the machine's
cores: compare runs of this script with each other, not with other machines.

``--src DIR`` runs the daemon from another source tree (e.g. an export of an older commit with
its built extension) to compare implementations with the same client.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from reservd.metrics import scrape  # noqa: E402
from reservd.v1 import reservd_pb2 as pb  # noqa: E402
from reservd.v1 import reservd_pb2_grpc as pb_grpc  # noqa: E402
from sidebyside import ServerProcess, cpu_seconds_between, free_port, process_tree_cpu  # noqa: E402

ON_HAND = 1_000_000_000
TTL_SECONDS = 86_400
CALL_TIMEOUT_SECONDS = 30
SEED_CONCURRENCY = 64
STREAMS_PER_CHANNEL = 25  # HTTP/2 streams multiplexed on one watcher connection
OPEN_TIMEOUT_SECONDS = 120
WARMUP_SECONDS = 1.0


def sku_name(index: int) -> str:
    return f"sku-{index:05d}"


# -- the watcher child process ----------------------------------------------------------------

async def watchers_child(args) -> None:
    """Open the streams, say "ready" on stdout, keep them until stdin closes, then report."""
    rng = random.Random(args.seed)
    count = args.watchers[0]
    channels = [
        grpc.aio.insecure_channel(args.target)
        for _ in range(max(1, -(-count // STREAMS_PER_CHANNEL)))
    ]
    opened = asyncio.Semaphore(0)
    read = [0]
    calls = []

    async def watch(index: int) -> None:
        if index < args.all_sku_watchers:
            skus = []
        else:
            skus = [sku_name(i) for i in rng.sample(range(args.skus), args.watch_skus)]
        stub = pb_grpc.ReservationsStub(channels[index % len(channels)])
        call = stub.WatchStock(pb.WatchStockRequest(skus=skus))
        calls.append(call)
        await call.read()  # the snapshot: the stream is open
        opened.release()
        if index % 2:
            return  # never reads again
        while True:
            update = await call.read()
            if update is grpc.aio.EOF:
                return
            read[0] += 1

    tasks = [asyncio.create_task(watch(i)) for i in range(count)]
    for _ in range(count):
        await asyncio.wait_for(opened.acquire(), OPEN_TIMEOUT_SECONDS)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for call in calls:
        call.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps({"updates_read": read[0]}), flush=True)


# -- the benchmark ----------------------------------------------------------------------------

class Watchers:
    """The child process holding the streams of one run."""

    def __init__(self, target: str, count: int, args, seed: int) -> None:
        self.command = [
            sys.executable, __file__, "--child", "--target", target, "--watchers", str(count),
            "--watch-skus", str(args.watch_skus), "--skus", str(args.skus),
            "--all-sku-watchers", str(min(args.all_sku_watchers, count)), "--seed", str(seed),
        ]
        self.process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> "Watchers":
        self.process = await asyncio.create_subprocess_exec(
            *self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        line = await asyncio.wait_for(self.process.stdout.readline(), OPEN_TIMEOUT_SECONDS)
        if line.strip() != b"ready":
            raise RuntimeError(f"the watchers did not open: {line!r}")
        return self

    async def __aexit__(self, *exc) -> None:
        self.process.stdin.close()
        try:
            out, _ = await asyncio.wait_for(self.process.communicate(), 60)
            self.report = json.loads(out.decode().strip().splitlines()[-1])
        except (asyncio.TimeoutError, ValueError, IndexError):
            self.process.kill()
            await self.process.wait()
            self.report = {}


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def reserve_for(stub, args, seconds: float, prefix: str) -> int:
    """Reserve calls answered by --clients tasks within ``seconds``."""
    rng = random.Random(prefix)
    deadline = time.monotonic() + seconds
    done = [0]

    async def client(index: int) -> None:
        number = 0
        while time.monotonic() < deadline:
            number += 1
            response = await stub.Reserve(
                pb.ReserveRequest(
                    reservation_id=f"{prefix}-{index}-{number}",
                    lines=[pb.Line(sku=sku_name(rng.randrange(args.skus)), quantity=1)],
                    ttl_seconds=TTL_SECONDS,
                ),
                timeout=CALL_TIMEOUT_SECONDS,
            )
            assert response.granted
            done[0] += 1

    await asyncio.gather(*(client(i) for i in range(args.clients)))
    return done[0]


async def bench(args) -> list[dict]:
    data_dir = Path(tempfile.mkdtemp(prefix="bench-watchers-"))
    metrics_port = free_port()
    env = {"PYTHONPATH": os.pathsep.join([args.src, os.environ.get("PYTHONPATH", "")])}
    server = await ServerProcess(
        "reservd",
        [sys.executable, "-m", "reservd", "serve", "--bind", "127.0.0.1:0",
         "--metrics-port", str(metrics_port), "--data-dir", str(data_dir)],
        env,
    ).start()
    target = f"127.0.0.1:{server.port}"
    channel = grpc.aio.insecure_channel(target)
    runs = []
    try:
        admin, stub = pb_grpc.AdminStub(channel), pb_grpc.ReservationsStub(channel)
        limit = asyncio.Semaphore(SEED_CONCURRENCY)

        async def seed(index: int) -> None:
            async with limit:
                await admin.SetStock(
                    pb.SetStockRequest(sku=sku_name(index), on_hand=ON_HAND,
                                       adjustment_id=f"seed-{index}"),
                    timeout=CALL_TIMEOUT_SECONDS,
                )

        await asyncio.gather(*(seed(i) for i in range(args.skus)))
        for repeat in range(args.repeat):
            for count in args.watchers:
                async with Watchers(target, count, args, seed=repeat) as watchers:
                    await reserve_for(stub, args, WARMUP_SECONDS, f"warm-{repeat}-{count}")
                    before_metrics = scrape(metrics_port)
                    before_cpu = process_tree_cpu(server.pid)
                    started = time.monotonic()
                    done = await reserve_for(stub, args, args.seconds, f"r-{repeat}-{count}")
                    seconds = time.monotonic() - started
                    cpu = cpu_seconds_between(before_cpu, process_tree_cpu(server.pid))
                    after_metrics = scrape(metrics_port)
                    rss = rss_bytes(server.pid)

                def delta(name: str) -> float:
                    return after_metrics.get(name, 0) - before_metrics.get(name, 0)

                run = {
                    "watchers": count, "repeat": repeat,
                    "reserve_per_second": round(done / seconds, 1),
                    "daemon_cpu_percent": round(100 * cpu / seconds, 1),
                    # Robuster than throughput on a shared machine: what one Reserve costs the
                    # daemon, the streams' share included.
                    "daemon_cpu_us_per_reserve": round(1e6 * cpu / max(done, 1), 1),
                    "daemon_rss_mib": round(rss / (1 << 20), 1),
                    "watch_updates_per_second": round(delta("reservd_watch_updates") / seconds),
                    "fanout_us_per_reserve": round(
                        1e6 * delta("reservd_watch_fanout_seconds") / max(done, 1), 2
                    ),
                    "watchers_detached": after_metrics.get("reservd_watchers_detached"),
                    # Over the child's whole life (warm-up included): a liveness check.
                    "updates_read": watchers.report.get("updates_read", 0),
                }
                runs.append(run)
                print(json.dumps(run), flush=True)
    finally:
        await channel.close()
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    return runs


def summary(runs: list[dict], counts: list[int]) -> list[dict]:
    """Per watcher count: the run with the median throughput, the spread of the throughputs
    ((max - min) / median), the median daemon CPU per Reserve, and both against 0 watchers."""
    rows = []
    baseline = None
    for count in counts:
        mine = sorted((r for r in runs if r["watchers"] == count),
                      key=lambda r: r["reserve_per_second"])
        values = [r["reserve_per_second"] for r in mine]
        row = {
            **mine[len(mine) // 2],
            "spread": round((max(values) - min(values)) / statistics.median(values), 3),
            "daemon_cpu_us_per_reserve": statistics.median(
                r["daemon_cpu_us_per_reserve"] for r in mine
            ),
        }
        if baseline is None:
            baseline = row
        row["ratio_to_first"] = round(
            row["reserve_per_second"] / baseline["reserve_per_second"], 3
        )
        row["cpu_ratio_to_first"] = round(
            row["daemon_cpu_us_per_reserve"] / baseline["daemon_cpu_us_per_reserve"], 3
        )
        rows.append(row)
    return rows


COLUMNS = (  # (heading, key, width)
    ("watchers", "watchers", 8), ("reserve/s", "reserve_per_second", 10),
    ("ratio", "ratio_to_first", 6), ("spread", "spread", 7),
    ("cpu us/op", "daemon_cpu_us_per_reserve", 10), ("cpu ratio", "cpu_ratio_to_first", 10),
    ("cpu %", "daemon_cpu_percent", 6), ("rss MiB", "daemon_rss_mib", 8),
    ("updates/s", "watch_updates_per_second", 10), ("read", "updates_read", 8),
    ("fanout us/op", "fanout_us_per_reserve", 13),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--watchers", type=int, nargs="+", default=[0, 200])
    parser.add_argument("--watch-skus", type=int, default=50, help="SKUs per watcher")
    parser.add_argument("--all-sku-watchers", type=int, default=0,
                        help="how many of the watchers watch every SKU")
    parser.add_argument("--skus", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--src", default=str(ROOT / "src"), help="the daemon's source tree")
    parser.add_argument("--json", type=Path, help="write the runs and the summary here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        uvloop.run(watchers_child(args))
        return
    started = time.monotonic()
    runs = uvloop.run(bench(args))
    rows = summary(runs, args.watchers)
    print()
    print(" ".join(f"{heading:>{width}}" for heading, _, width in COLUMNS))
    for row in rows:
        print(" ".join(f"{row[key]!s:>{width}}" for _, key, width in COLUMNS))
    print(f"load average {os.getloadavg()}, {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "runs": runs, "summary": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
