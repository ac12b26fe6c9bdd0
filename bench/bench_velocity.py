"""What velocity tracking costs the ledger's Reserve, in process: CPU time per Reserve with
velocity_tracking off and on (three channels with the rules on, 1,000 SKUs, one line each),
best of --runs runs of --ops Reserves each. The RPC-level figure is
``bench/bench_channels.py --compare velocity``.

    .venv/bin/python bench/bench_velocity.py [--ops 40000] [--runs 3]
"""
from __future__ import annotations

import argparse
import time

from reservd.channelpolicy import Policy
from reservd.clock import ManualClock
from reservd.config import Config
from reservd.ledger import Ledger
from reservd.memlog import MemoryLog
from reservd.table import Table

CHANNELS = ("amazon", "shopify", "tiktok")
SKUS = 1000


def run(tracking: bool, ops: int) -> float:
    """Microseconds of CPU per Reserve."""
    clock = ManualClock()
    ledger = Ledger(Table(shards=64, ring_capacity=1 << 16), MemoryLog(), clock,
                    Config(data_dir=None, velocity_tracking=tracking))
    for i in range(SKUS):
        ledger.set_stock(f"a{i}", f"s{i}", 10**9, None, "")
    for channel in CHANNELS:
        ledger.set_channel(f"c-{channel}", channel, Policy(
            share_bp=9000, pool="tiktok" if channel == "tiktok" else ""))
        ledger.set_rule_policy(f"r-{channel}", "", channel, {"enabled": 1})
    started = time.process_time()
    for i in range(ops):
        clock.advance(1)
        ledger.reserve(f"r{i}", (f"s{i % SKUS}",), (1,), CHANNELS[i % 3], 600, False)
    return (time.process_time() - started) / ops * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=40_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    off = min(run(False, args.ops) for _ in range(args.runs))
    on = min(run(True, args.ops) for _ in range(args.runs))
    print(f"ledger Reserve: velocity off {off:.1f} us CPU, on {on:.1f} us "
          f"(+{on - off:.1f} us; best of {args.runs} runs of {args.ops})")


if __name__ == "__main__":
    main()
