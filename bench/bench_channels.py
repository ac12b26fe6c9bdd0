"""What channels cost a Reserve: RPC/s with no channel configured vs the five example channels
with pools and reserves on every SKU, at 64 concurrent clients, against a daemon subprocess.
With ``--compare velocity``: what velocity tracking costs, the five channels with pools and the
velocity rules enabled on each, velocity_tracking off vs on.

    .venv/bin/python bench/bench_channels.py [--ops 6000] [--rounds 3] [--clients 64] [--mirror]
        [--batching] [--compare channels|velocity]

Each round runs both setups (alternating which goes first) on a fresh in-memory daemon, so the
machine's other load hits both alike; prints each round and the median ratio. ``--mirror``: the
daemon keeps its WAL in a temporary directory and mirrors to a redis-server of its own (every
stock hash then also carries each channel's ats and level and each bucket's free units); each
round then also prints Redis's own time in the mirror's script per Reserve (``INFO
commandstats``, EVALSHA), which on a small machine is taken from the daemon too.
``--batching``: the clients share one batching client (reservd.client.ReservdClient), whose
Batch RPCs make reservd cheap per Reserve, so the channels' per-mutation work shows more.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from daemonproc import DaemonProcess  # noqa: E402
from redisserver import RedisServer  # noqa: E402

from reservd.v1 import reservd_pb2 as pb  # noqa: E402
from reservd.v1 import reservd_pb2_grpc as pb_grpc  # noqa: E402

SKUS = 1000
PRESETS = Path(__file__).resolve().parent.parent / "examples" / "channels.json"
CHANNELS = ("amazon", "walmart", "shopify", "ebay", "tiktok")


async def _setup(admin, configured: bool, rules: bool = False) -> None:
    for i in range(SKUS):
        await admin.SetStock(pb.SetStockRequest(sku=f"s{i}", on_hand=1_000_000,
                                                adjustment_id=f"set-{i}"))
    if not configured:
        return
    from google.protobuf.json_format import ParseDict

    for name, policy in json.loads(PRESETS.read_text())["channels"].items():
        await admin.SetChannel(pb.SetChannelRequest(
            channel=name, policy=ParseDict(policy, pb.ChannelPolicy()), change_id=f"c-{name}"))
    for i in range(SKUS):
        for bucket, units in (("tiktok", 300_000), ("tiktok-fbt", 100_000), ("seeding", 5_000)):
            await admin.Allocate(pb.AllocateRequest(
                sku=f"s{i}", from_bucket="shared", to_bucket=bucket, units=units,
                change_id=f"a-{i}-{bucket}"))
    if rules:
        for name in CHANNELS:
            await admin.SetRulePolicy(pb.SetRulePolicyRequest(
                channel=name, policy=pb.RulePolicy(enabled=True), change_id=f"r-{name}"))


def _cpu_seconds(pid: int) -> float:
    """The daemon's user + system CPU time: on a shared machine a steadier measure than wall
    time."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _redis_script_usec(url: str | None, reset: bool = False) -> float:
    """Microseconds Redis spent in EVALSHA since the last reset (0 without a mirror)."""
    if url is None:
        return 0.0
    import redis

    client = redis.Redis.from_url(url)
    try:
        if reset:
            client.config_resetstat()
            return 0.0
        return float(client.info("commandstats").get("cmdstat_evalsha", {}).get("usec", 0))
    finally:
        client.close()


async def _run(target: str, pid: int, configured: bool, ops: int, clients: int,
               rules: bool = False, redis_url: str | None = None, batching: bool = False):
    from reservd.client import ReservdClient

    async with grpc.aio.insecure_channel(target) as channel:
        await _setup(pb_grpc.AdminStub(channel), configured, rules)
        stub = pb_grpc.ReservationsStub(channel)
        batcher = ReservdClient(target, batching=True, attempts_max=1) if batching else None
        counter = iter(range(ops))

        async def client(c: int) -> None:
            for n in counter:
                sku, channel_name = f"s{n % SKUS}", CHANNELS[n % len(CHANNELS)]
                if batcher is not None:
                    result = await batcher.reserve(f"r{n}", ((sku, 1),), channel=channel_name)
                    assert result.error is None and result.granted, result
                    continue
                response = await stub.Reserve(pb.ReserveRequest(
                    reservation_id=f"r{n}", lines=[pb.Line(sku=sku, quantity=1)],
                    channel=channel_name))
                assert response.granted

        _redis_script_usec(redis_url, reset=True)
        started, cpu = time.perf_counter(), _cpu_seconds(pid)
        await asyncio.gather(*(client(c) for c in range(clients)))
        wall = time.perf_counter() - started
        cpu = (_cpu_seconds(pid) - cpu) / ops * 1e6
        if batcher is not None:
            await batcher.close()
        return ops / wall, cpu, _redis_script_usec(redis_url) / ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--mirror", action="store_true",
                        help="WAL and the Redis mirror instead of in memory")
    parser.add_argument("--batching", action="store_true",
                        help="one batching client (Batch RPCs) instead of unary Reserves")
    parser.add_argument("--compare", choices=("channels", "velocity"), default="channels")
    args = parser.parse_args()
    velocity = args.compare == "velocity"
    names = ("velocity off", "velocity on") if velocity else ("none", "five channels with pools")
    ratios, cpu_ratios = [], []
    for round_ in range(args.rounds):
        rates, cpu, script = {}, {}, {}
        order = (False, True) if round_ % 2 == 0 else (True, False)
        for configured in order:
            env = {"RESERVD_VELOCITY_TRACKING": "true" if configured else "false"}
            with tempfile.TemporaryDirectory() as directory:
                options, redis = ["--in-memory"], None
                if args.mirror:
                    redis = RedisServer(Path(directory) / "redis")
                    redis.start()
                    options = ["--data-dir", str(Path(directory) / "data"),
                               "--redis-url", redis.url]
                daemon = DaemonProcess(*options, env=env if velocity else None).start()
                try:
                    rates[configured], cpu[configured], script[configured] = uvloop.run(_run(
                        daemon.target, daemon.process.pid, configured or velocity, args.ops,
                        args.clients, rules=velocity,
                        redis_url=redis.url if redis is not None else None,
                        batching=args.batching))
                finally:
                    daemon.kill()
                    if redis is not None:
                        redis.close()
        ratio = rates[True] / rates[False]
        ratios.append(ratio)
        cpu_ratios.append(cpu[True] / cpu[False])
        print(f"round {round_ + 1}: {names[0]} {rates[False]:.0f} RPC/s ({cpu[False]:.0f} us "
              f"daemon CPU each), {names[1]} {rates[True]:.0f} RPC/s "
              f"({cpu[True]:.0f} us), ratio {ratio:.3f}"
              + (f"; Redis script time per RPC {script[False]:.0f} -> {script[True]:.0f} us"
                 if args.mirror else ""), flush=True)
    print(f"median RPC/s ratio {statistics.median(ratios):.3f}, median daemon CPU per RPC "
          f"ratio {statistics.median(cpu_ratios):.3f} over {args.rounds} rounds "
          f"({args.ops} Reserve RPCs each, {args.clients} clients, {SKUS} SKUs"
          f"{', WAL + Redis mirror' if args.mirror else ', in memory'}"
          f"{', batching client' if args.batching else ''})")


if __name__ == "__main__":
    main()
