"""The locust suite must not rot: a few seconds of the last-unit scenario through loadtest/run.py,
end to end (a fresh daemon with its WAL, locust headless, the invariant checks)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

# Never `import locust` here: it monkey-patches the whole pytest process with gevent, and every
# grpc.aio test after it hangs. Locust runs in its own process (loadtest/run.py).
assert importlib.util.find_spec("locust"), "locust is missing: ./dev test installs it"

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(90)
def test_last_unit_smoke_run_keeps_every_invariant(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "loadtest" / "run.py"), "--scenario", "last-unit",
         "--users", "6", "--spawn-rate", "6", "--time", "4s", "--stop-timeout", "3",
         "--reports", str(tmp_path)],
        capture_output=True, text=True, timeout=80,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "verdict for last-unit: PASS" in run.stdout, output
    assert "oversold == 0 units" in run.stdout, output
    assert "0 sequence gaps" in run.stdout, output
    # The buyers really fought over the hot SKU: some carts were granted, some sold out.
    assert "Reserve (sold out)" in run.stdout, output
    for report in ("last-unit.html", "last-unit_stats.csv", "last-unit-tallies.json"):
        assert (tmp_path / report).exists(), report


@pytest.mark.timeout(120)
def test_viral_smoke_run_tightens_buffers_and_deploys_the_spike_reserve(tmp_path: Path) -> None:
    """16 s of the viral scenario (4 s a phase): a low pinned baseline so that the daemon's
    1-minute buckets cross the 10x and 40x thresholds in seconds."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "loadtest" / "run.py"), "--scenario", "viral",
         "--users", "26", "--spawn-rate", "26", "--time", "16s", "--stop-timeout", "3",
         "--viral-baseline", "30", "--reports", str(tmp_path)],
        capture_output=True, text=True, timeout=110,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "verdict for viral: PASS" in run.stdout, output
    assert "oversold == 0 units" in run.stdout, output
    assert "spike reserve deployed: 200 units" in run.stdout, output
    assert "spike survival" in run.stdout, output


def test_the_watchers_check_finds_a_gap_but_not_a_sequence_cut_short():
    """A multi-line cart is one sequence in several updates; a stream cut at the end of the run
    may have shown some of them only, which is no gap. A change missing before the last
    sequence a stream showed is one. (In a process of its own: locust patches with gevent.)"""
    code = """
import array, sys
sys.path.insert(0, sys.argv[1])
from locustfile import WatchView
from reservd.v1 import reservd_pb2 as pb

def stream(*seqs):
    view = WatchView(("a", "b"))
    view.see(pb.StockUpdate(sku="a", sequence=5, on_hand=3, available=3, snapshot=True))
    for seq in seqs:
        view.see(pb.StockUpdate(sku="a", sequence=seq, on_hand=3, reserved=1, available=2))
    return view

acknowledged = {"a": array.array("q", [9, 12]), "b": array.array("q", [9])}
assert stream(9).gaps(acknowledged) == (0, 0)  # cut after a@9, before b@9
assert stream(9, 12).gaps(acknowledged) == (2, 1)  # b@9 missing before a@12
"""
    run = subprocess.run([sys.executable, "-c", code, str(ROOT / "loadtest")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
