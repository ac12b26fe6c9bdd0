"""The ledger alone, in process (no gRPC, no WAL): µs per Reserve of a new id and per Release.

A `Ledger` over the counter table (C, or the twin with RESERVD_NO_EXT=1) and a log that keeps
nothing; 1,000 SKUs; per run, --count Reserves of one unit on new ids, then their Releases (so
each leaves a finished record). Prints the best of --runs runs.

Usage::

    .venv/bin/python bench/bench_ledger.py [--count N] [--runs R]
"""
from __future__ import annotations

import argparse
import gc
import time

from reservd.clock import ManualClock
from reservd.config import Config
from reservd.ledger import Ledger
from reservd.table import Table


class NullLog:
    failed = None
    backlogged = False
    last_seq = 0

    def append(self, seq: int, type: int, payload: bytes) -> None:
        self.last_seq = seq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    count = args.count
    best_reserve = best_release = float("inf")
    for run in range(args.runs):
        ledger = Ledger(Table(), NullLog(), ManualClock(), Config())
        for i in range(1000):
            ledger.set_stock(f"count-{i}", f"sku-{i:08d}", 10**6, None, "")
        skus = [(f"sku-{i % 1000:08d}",) for i in range(count)]
        ids = [f"order-{run}-{i:08d}" for i in range(count)]
        gc.collect()
        started = time.perf_counter()
        for i in range(count):
            ledger.reserve(ids[i], skus[i], (1,), "", 600, False)
        best_reserve = min(best_reserve, (time.perf_counter() - started) / count * 1e6)
        started = time.perf_counter()
        for reservation_id in ids:
            ledger.release(reservation_id)
        best_release = min(best_release, (time.perf_counter() - started) / count * 1e6)
    print(f"Reserve {best_reserve:.2f} µs, Release {best_release:.2f} µs (best of {args.runs})")


if __name__ == "__main__":
    main()
