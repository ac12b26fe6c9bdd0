"""What the stock states add to the mirror's argument building per row
(reservd.mirrorwrite.batch_command over 1,000 ring rows of 500 SKUs, 50 of them with states).

    .venv/bin/python tests/bench_state_fields.py
"""
from __future__ import annotations

import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from test_ledger_model import RecordingLog  # noqa: E402

from reservd.clock import ManualClock  # noqa: E402
from reservd.config import Config  # noqa: E402
from reservd.ledger import Ledger  # noqa: E402
from reservd.mirrorwrite import batch_command  # noqa: E402
from reservd.table import Table  # noqa: E402

ROWS = 1_000


def main() -> None:
    ledger = Ledger(Table(ring_capacity=4096), RecordingLog(), ManualClock(), Config())
    for n in range(0, 500, 10):
        ledger.set_stock(f"s-{n}", f"sku-{n}", 100, None, "")
        ledger.hold_stock(f"h-{n}", f"sku-{n}", "safety_stock", 1)
    rows = [(n, f"sku-{n % 500}", 100, 3, 1, 0) for n in range(ROWS)]
    for name, states in (("without states", None),
                         ("with states", ledger.state_history.text_at)):
        seconds = min(timeit.repeat(
            lambda: batch_command("p:", "apply", 1, 1, 0, 0, 1, rows, (), None, states),
            number=50, repeat=5,
        ))
        print(f"{name}: {seconds / 50 / ROWS * 1e9:,.0f} ns/row")


if __name__ == "__main__":
    main()
