"""The stock-state commands through the CLI and a real daemon process: `reservd return`,
`inspect`, `writeoff`; kill -9 after they were acknowledged loses none of them, and the log
verifies clean."""
from __future__ import annotations

import json
import signal

from daemonproc import DaemonProcess, reservd_cli


def _json(completed) -> dict:
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.splitlines()[-1])


def _stock(target: list[str], sku: str) -> tuple:
    s = _json(reservd_cli("get", *target, sku))
    return tuple(s.get(k, 0) for k in (
        "on_hand", "reserved", "available", "quarantine", "damaged", "incoming"))


def test_return_inspect_writeoff_survive_kill_9(tmp_path):
    data = str(tmp_path / "data")
    daemon = DaemonProcess("--data-dir", data).start()
    try:
        target = ["--target", daemon.target]
        _json(reservd_cli("set", *target, "boot", "2"))
        answer = _json(reservd_cli("return", *target, "rma-1", "boot", "4",
                                   "--reservation-id", "o-1"))
        assert answer["stock"]["quarantine"] == 4 and answer["stock"]["available"] == 2
        _json(reservd_cli("return", *target, "rma-2", "boot", "1"))
        _json(reservd_cli("inspect", *target, "rma-1", "3", "1"))
        _json(reservd_cli("writeoff", *target, "boot", "1", "--change-id", "wo-1"))
        assert _json(reservd_cli("reserve", *target, "r1", "boot:5"))["granted"] is True
        assert _json(reservd_cli("expect", *target, "po-1", "boot", "7"))["incoming"] == 7
        received = _json(reservd_cli("receive", *target, "po-1", "2", "--receipt-id", "rc-1"))
        assert received["incoming"] == 5 and received["on_hand"] == 8
        refused = reservd_cli("writeoff", *target, "boot", "1", "--change-id", "wo-2")
        assert refused.returncode != 0 and "units" in refused.stderr
        before = _stock(target, "boot")
        assert before == (8, 5, 2, 1, 0, 5)
        daemon.signal(signal.SIGKILL)
        daemon.wait()
        daemon.start()
        assert _stock(["--target", daemon.target], "boot") == before
        again = _json(reservd_cli("inspect", "--target", daemon.target, "rma-1", "3", "1"))
        assert again["replayed"] is True
    finally:
        daemon.kill()
    verified = reservd_cli("wal", "verify", data)
    assert verified.returncode == 0, verified.stdout
    assert verified.stdout.endswith("ok\n")
