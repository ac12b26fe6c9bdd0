"""The user's exact CLI sequence through a real daemon and data directory: a recount to zero
after a commit, then the fulfil still succeeds ("reality wins"), survives a restart, and the
log verifies clean."""
from __future__ import annotations

import json
import signal

from daemonproc import DaemonProcess, reservd_cli


def _json(completed) -> dict:
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.splitlines()[-1])


def _counters(stock: dict) -> tuple[int, int, int, int]:
    return stock["on_hand"], stock["reserved"], stock["committed"], stock["available"]


def test_set_reserve_commit_recount_to_zero_fulfil_restart_verify(tmp_path):
    data = str(tmp_path / "data")
    daemon = DaemonProcess("--data-dir", data).start()
    try:
        target = ["--target", daemon.target]
        _json(reservd_cli("set", *target, "d", "1"))
        assert _json(reservd_cli("reserve", *target, "rd", "d:1"))["granted"] is True
        assert _json(reservd_cli("commit", *target, "rd"))["state"] == "COMMITTED"
        recount = _json(reservd_cli("set", *target, "d", "0"))
        assert recount["stock"]["on_hand"] == 0
        fulfilled = _json(reservd_cli("fulfil", *target, "rd"))
        assert fulfilled["state"] == "FULFILLED"
        before = _counters(_json(reservd_cli("get", *target, "d")))
        assert before == (0, 0, 0, 0)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
        daemon.start()
        after = _counters(_json(reservd_cli("get", "--target", daemon.target, "d")))
        assert after == before
    finally:
        daemon.kill()
    verified = reservd_cli("wal", "verify", data)
    assert verified.returncode == 0, verified.stdout
    assert verified.stdout.endswith("ok\n")
