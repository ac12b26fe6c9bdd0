"""What channels cost a Reserve: RPC/s with no channel configured vs the five example channels
with pools and reserves on every SKU, at 64 concurrent clients, against a daemon subprocess.
With ``--compare velocity``: what velocity tracking costs, the five channels with pools and the
velocity rules enabled on each, velocity_tracking off vs on.

    .venv/bin/python bench/bench_channels.py [--ops 6000] [--rounds 3] [--clients 64]
        [--compare channels|velocity]

Each round runs both setups (alternating which goes first) on a fresh in-memory daemon, so the
machine's other load hits both alike; prints each round and the median ratio.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import grpc
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from daemonproc import DaemonProcess  # noqa: E402

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


async def _run(target: str, pid: int, configured: bool, ops: int, clients: int,
               rules: bool = False):
    async with grpc.aio.insecure_channel(target) as channel:
        await _setup(pb_grpc.AdminStub(channel), configured, rules)
        stub = pb_grpc.ReservationsStub(channel)
        counter = iter(range(ops))

        async def client(c: int) -> None:
            for n in counter:
                response = await stub.Reserve(pb.ReserveRequest(
                    reservation_id=f"r{n}", lines=[pb.Line(sku=f"s{n % SKUS}", quantity=1)],
                    channel=CHANNELS[n % len(CHANNELS)]))
                assert response.granted

        started, cpu = time.perf_counter(), _cpu_seconds(pid)
        await asyncio.gather(*(client(c) for c in range(clients)))
        wall = time.perf_counter() - started
        return ops / wall, (_cpu_seconds(pid) - cpu) / ops * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--compare", choices=("channels", "velocity"), default="channels")
    args = parser.parse_args()
    velocity = args.compare == "velocity"
    names = ("velocity off", "velocity on") if velocity else ("none", "five channels with pools")
    ratios, cpu_ratios = [], []
    for round_ in range(args.rounds):
        rates, cpu = {}, {}
        order = (False, True) if round_ % 2 == 0 else (True, False)
        for configured in order:
            env = {"RESERVD_VELOCITY_TRACKING": "true" if configured else "false"}
            daemon = DaemonProcess("--in-memory", env=env if velocity else None).start()
            try:
                rates[configured], cpu[configured] = uvloop.run(_run(
                    daemon.target, daemon.process.pid, configured or velocity, args.ops,
                    args.clients, rules=velocity))
            finally:
                daemon.kill()
        ratio = rates[True] / rates[False]
        ratios.append(ratio)
        cpu_ratios.append(cpu[True] / cpu[False])
        print(f"round {round_ + 1}: {names[0]} {rates[False]:.0f} RPC/s ({cpu[False]:.0f} us "
              f"daemon CPU each), {names[1]} {rates[True]:.0f} RPC/s "
              f"({cpu[True]:.0f} us), ratio {ratio:.3f}", flush=True)
    print(f"median RPC/s ratio {statistics.median(ratios):.3f}, median daemon CPU per RPC "
          f"ratio {statistics.median(cpu_ratios):.3f} over {args.rounds} rounds "
          f"({args.ops} Reserve RPCs each, {args.clients} clients, {SKUS} SKUs)")


if __name__ == "__main__":
    main()
