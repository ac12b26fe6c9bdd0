"""The alerts feed through the `reservd alerts` command against a daemon subprocess: filters,
--follow, the structured log line, and the same feed after kill -9 and a restart."""
from __future__ import annotations

import json

from daemonproc import DaemonProcess, reservd_cli, wait_for


def _cli(*args: str) -> list[dict]:
    done = reservd_cli(*args)
    assert done.returncode == 0, (args, done.returncode, done.stderr)
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_alerts_cli_and_the_same_feed_after_kill_9(tmp_path):
    data_dir = tmp_path / "data"
    daemon = DaemonProcess("--data-dir", str(data_dir)).start()
    try:
        target = ("--target", daemon.target)
        _cli("set", "a", "15", *target)
        _cli("set", "b", "3", *target)
        alerts = _cli("alerts", *target)
        assert [(a["kind"], a["sku"], a["level"]) for a in alerts] == [
            ("reserve_level", "a", 1), ("reserve_level", "b", 3)]
        assert alerts[1]["figures"][0] == {"name": "available", "number": 3}
        assert _cli("alerts", "--level-min", "3", *target) == alerts[1:]
        assert _cli("alerts", "--kind", "shortfall", *target) == []
        assert _cli("alerts", "--limit", "1", *target) == alerts[1:]
        followed = _cli(
            "alerts", "--follow", "--count", "1", "--from-sequence", str(alerts[0]["sequence"]),
            *target,
        )
        assert followed == alerts[1:]
        refused = reservd_cli("alerts", "--level-min", "9", *target)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1
        assert refused.stderr.startswith("reservd: INVALID_ARGUMENT: level_min")
        assert wait_for(lambda: len(daemon.logged("alert")) == 2)
        line = daemon.logged("alert")[1]
        assert (line["alert_id"], line["kind"], line["alert_level"], line["figures"]) == (
            alerts[1]["id"], "reserve_level", 3,
            {"available": 3, "threshold_units": 5, "previous_level": 0, "hysteresis_units": 2})
        daemon.kill()
        daemon = DaemonProcess("--data-dir", str(data_dir)).start()
        assert _cli("alerts", "--target", daemon.target) == alerts
        assert daemon.logged("alert") == []  # replayed, not raised again
    finally:
        daemon.kill()
