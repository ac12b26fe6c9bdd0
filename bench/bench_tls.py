"""Reserve RPC/s with mutual TLS vs plain text: `python bench/bench_tls.py [--ops N] [--clients 64]`.

Starts `reservd serve --in-memory` (so the log's fsync does not hide the transport's cost) once
in plain text and once with mTLS plus roles, on loopback, taking turns for --repeat rounds; each
round sends --ops Reserves of one unit from --clients concurrent callers over --channels
channels. Prints one line per run and the medians. Certificates are made with `cryptography`.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from certs import Authority  # noqa: E402
from daemonproc import DaemonProcess  # noqa: E402

from reservd.tls import channel_credentials  # noqa: E402
from reservd.v1 import reservd_pb2 as pb  # noqa: E402
from reservd.v1 import reservd_pb2_grpc as pb_grpc  # noqa: E402


async def run(target: str, credentials, ops: int, clients: int, channels: int, tag: str) -> float:
    opened = [
        grpc.aio.secure_channel(target, credentials) if credentials
        else grpc.aio.insecure_channel(target)
        for _ in range(channels)
    ]
    await pb_grpc.AdminStub(opened[0]).SetStock(
        pb.SetStockRequest(sku="a", on_hand=10**9, adjustment_id=f"seed-{tag}")
    )
    stubs = [pb_grpc.ReservationsStub(channel) for channel in opened]
    counter = iter(range(ops))
    failures = 0

    async def client(k: int) -> None:
        nonlocal failures
        stub = stubs[k % channels]
        for n in counter:
            request = pb.ReserveRequest(
                reservation_id=f"{tag}-{n}", lines=[pb.Line(sku="a", quantity=1)]
            )
            try:
                await stub.Reserve(request, timeout=30)
            except grpc.aio.AioRpcError:
                failures += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    seconds = time.perf_counter() - started
    for channel in opened:
        await channel.close()
    assert failures == 0, f"{failures} failed calls"
    return ops / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ops", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="reservd-bench-tls-"))
    ca = Authority(directory)
    cert, key, _ = ca.server()
    client_cert, client_key, _ = ca.issue("bench", "bench.example", dns=("bench.example",))
    (directory / "reservd.toml").write_text(
        f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"\n'
        f'tls_client_ca_file = "{ca.ca_file}"\ntls_require_client_auth = true\n'
        '[auth_roles]\n"bench.example" = ["checkout", "admin"]\n'
    )
    modes = {
        "plain text": (("--in-memory",), None),
        "mTLS + roles": (
            ("--in-memory", "--config", str(directory / "reservd.toml")),
            channel_credentials(ca.ca_file, client_cert, client_key),
        ),
    }
    results: dict[str, list[float]] = {mode: [] for mode in modes}
    for round_ in range(args.repeat):
        for mode, (flags, credentials) in modes.items():
            daemon = DaemonProcess(*flags).start()
            try:
                rate = uvloop.run(run(
                    daemon.target, credentials, args.ops, args.clients, args.channels,
                    f"r{round_}",
                ))
            finally:
                daemon.kill()
            results[mode].append(rate)
            print(f"round {round_ + 1} {mode:13s} {rate:8.0f} Reserve/s", flush=True)
    for mode, rates in results.items():
        print(f"median  {mode:13s} {statistics.median(rates):8.0f} Reserve/s "
              f"({args.clients} clients, {args.ops} ops, runs {[round(r) for r in rates]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
