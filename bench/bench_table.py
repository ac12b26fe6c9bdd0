"""Micro-benchmark of the counter table alone: reserve + release pairs per second.

Two workloads, for the C table and the pure-Python twin:

- one SKU: every pair reserves and releases 1 item of the same SKU (the hottest possible row);
- 100,000 SKUs: every pair picks a SKU from a pre-generated random list (cache misses, dict
  lookups across shards).

Each pair is what the ledger does for a one-line order: ``reserve([sku], [1], False, seq)`` then
``release(handles, granted, seq + 1)``. Each run stops at ``--pairs`` pairs or ``--seconds``
seconds, whichever comes first. Usage::

    PYTHONPATH=src python bench/bench_table.py [--pairs N] [--seconds S] [--json]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time

from reservd import _pytable

try:
    from reservd import _ctable
except ImportError:
    _ctable = None

SKU_COUNT = 100_000
CHECK_EVERY = 1024  # pairs between clock reads, so timing costs ~nothing per pair


def run(
    table_class, stocked: list[str], skus: list[str], pairs_max: int, seconds_max: float
) -> tuple[int, float]:
    """Reserve+release pairs cycling over ``skus``, in a table holding ``stocked``; returns
    (pairs, seconds)."""
    table = table_class()
    seq = 1
    for sku in stocked:
        table.set_on_hand(table.ensure(sku), 1_000_000_000, seq)
    lines = [[sku] for sku in skus]  # pre-built: the benchmark measures the table, not lists
    quantity = [1]
    reserve = table.reserve
    release = table.release
    count = len(lines)
    pairs = 0
    start = time.perf_counter()
    deadline = start + seconds_max
    while pairs < pairs_max:
        for _ in range(min(CHECK_EVERY, pairs_max - pairs)):
            seq += 1
            status, handles, granted, _ = reserve(lines[pairs % count], quantity, False, seq)
            release(handles, granted, seq)
            pairs += 1
        assert status == 0
        if time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - start
    # Every pair released what it reserved: all reserved counters are back to zero.
    assert all(reserved == 0 for _, _, reserved, _ in table.items())
    return pairs, elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1_000_000, help="pairs per run, at most")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per run, at most")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON document instead")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    universe = [f"SKU-{i:06d}" for i in range(SKU_COUNT)]
    workloads = {  # name: (SKUs in the table, SKU of each pair, cycled)
        "1 sku": (universe[:1], universe[:1]),
        f"{SKU_COUNT:,} skus": (
            universe, [rng.choice(universe) for _ in range(min(args.pairs, 1_000_000))]
        ),
    }
    implementations = {"c": _ctable.Table if _ctable else None, "py": _pytable.Table}
    results = []
    for name, table_class in implementations.items():
        if table_class is None:
            print("reservd._ctable is not built: skipping the C table", file=sys.stderr)
            continue
        for workload, (stocked, skus) in workloads.items():
            pairs, elapsed = run(table_class, stocked, skus, args.pairs, args.seconds)
            results.append({
                "implementation": name,
                "workload": workload,
                "pairs": pairs,
                "seconds": round(elapsed, 3),
                "pairs_per_second": round(pairs / elapsed),
            })
            if not args.json:
                print(f"{name:>2} {workload:>12}: {pairs / elapsed:>12,.0f} reserve+release "
                      f"pairs/s ({pairs:,} pairs in {elapsed:.2f} s)")
    if args.json:
        print(json.dumps({"benchmark": "table", "python": sys.version.split()[0],
                          "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
