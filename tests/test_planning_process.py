"""Replenishment and cycle counts through the CLI and a real daemon process: `reservd
replenish-set`, `replenish`, `audit`; kill -9 after they were acknowledged loses none of the
settings, demand or counts, and the log verifies clean."""
from __future__ import annotations

import json
import signal
import time

from daemonproc import DaemonProcess, reservd_cli


def _ok(completed) -> str:
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def _rows(completed) -> list[dict]:
    return [json.loads(line) for line in _ok(completed).splitlines()]


def test_replenish_and_audit_survive_kill_9(tmp_path):
    data = str(tmp_path / "data")
    daemon = DaemonProcess("--data-dir", data).start()
    try:
        target = ["--target", daemon.target]
        _ok(reservd_cli("set", *target, "boot", "100"))
        _ok(reservd_cli("set", *target, "hat", "10"))
        for i in range(3):
            _ok(reservd_cli("reserve", *target, f"r{i}", "boot:4"))
            _ok(reservd_cli("commit", *target, f"r{i}"))
        _ok(reservd_cli("replenish-set", *target, "boot", "--lead-time-days", "10",
                        "--lead-time-sigma-days", "2", "--abc-class", "A"))
        _ok(reservd_cli("expect", *target, "po-1", "boot", "30"))
        _ok(reservd_cli("set", *target, "hat", "9", "--adjustment-id", "count-hat"))
        table = _ok(reservd_cli("--format", "table", "replenish", *target))
        header = table.splitlines()[0].split()
        for column in ("sku", "daily_demand", "demand_sigma", "lead_time_days", "safety_stock",
                       "reorder_point", "on_hand", "incoming", "days_of_cover"):
            assert column in header, header
        day = time.time() // 86_400  # D reads whole UTC days before today
        before = _rows(reservd_cli("replenish", *target, "boot"))
        assert before[0]["incoming"] == 30 and before[0]["abc_class"] == "A"
        audit = _rows(reservd_cli("audit", *target, "--all"))
        hat = next(row for row in audit if row["sku"] == "hat")
        assert (hat["system"], hat["counted"], hat["due"]) == (10, 9, False)
        assert abs(hat["ghost"] - 0.1) < 1e-9
        daemon.signal(signal.SIGKILL)
        daemon.wait()
        daemon.start()
        target = ["--target", daemon.target]
        after = _rows(reservd_cli("replenish", *target, "boot"))
        if time.time() // 86_400 == day:  # else D moved on with the date, not the restart
            assert after == before
        assert _rows(reservd_cli("audit", *target, "--all")) == audit
    finally:
        daemon.kill()
    verified = reservd_cli("wal", "verify", data)
    assert verified.returncode == 0, verified.stdout
    assert verified.stdout.endswith("ok\n")
