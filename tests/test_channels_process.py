"""Channels through the `reservd` command against a daemon subprocess: the CLI commands, and
kill -9 then restart giving the same ats and buckets."""
from __future__ import annotations

import json
from pathlib import Path

from daemonproc import DaemonProcess, reservd_cli

PRESETS = Path(__file__).resolve().parent.parent / "examples" / "channels.json"


def _cli(*args: str) -> list[dict]:
    done = reservd_cli(*args)
    assert done.returncode == 0, (args, done.returncode, done.stderr)
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_cli_and_kill_9_restart_give_the_same_ats(tmp_path):
    data_dir = tmp_path / "data"
    daemon = DaemonProcess("--data-dir", str(data_dir)).start()
    try:
        target = ("--target", daemon.target)
        applied = _cli("channel", "apply", str(PRESETS), *target)
        assert {c["channel"]["channel"] for c in applied} == {
            "amazon", "walmart", "shopify", "ebay", "tiktok", "tiktok-fbt", "seeding"}
        broken = tmp_path / "broken.json"
        broken.write_text('{"channels": {"x": {"shareBp": "lots"}}}')
        refused = reservd_cli("channel", "apply", str(broken), *target)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
        assert "channels.x" in refused.stderr
        again = _cli("channel", "apply", str(PRESETS), *target)
        assert all(c["replayed"] for c in again)  # the same file twice changes nothing
        _cli("set", "hero", "1000", *target)
        _cli("allocate", "hero", "shared", "tiktok", "500", *target)
        _cli("allocate", "hero", "shared", "tiktok-fbt", "300", *target)
        _cli("allocate", "hero", "shared", "seeding", "30", *target)
        _cli("channel", "set", "ebay", "--share-bp", "9500", "--max-units", "100", *target)
        assert reservd_cli("reserve", "r1", "hero:30", "--channel", "tiktok",
                           *target).returncode == 0
        ats = _cli("ats", "hero", *target)
        assert {a["channel"]: int(a["ats"]) for a in ats} == {
            "amazon": 153, "ebay": 100, "seeding": 30, "shopify": 170, "tiktok": 640,
            "tiktok-fbt": 300, "walmart": 144, }
        watched = _cli("watch-ats", "hero", "--channel", "tiktok", "--count", "1", *target)
        assert (watched[0]["ats"], watched[0]["snapshot"]) == (640, True)
        buckets = _cli("buckets", "hero", *target)
        listed = _cli("channel", "list", *target)
        daemon.kill()
        assert daemon.process.returncode == -9
        refused = reservd_cli("allocate", "hero", "shared", "x", "1000", "--target",
                              daemon.target, "--deadline", "1")
        assert refused.returncode == 2
    finally:
        daemon.kill()
    daemon = DaemonProcess("--data-dir", str(data_dir)).start()
    try:
        target = ("--target", daemon.target)
        assert _cli("ats", "hero", *target) == ats
        assert _cli("buckets", "hero", *target) == buckets
        assert _cli("channel", "list", *target) == listed
        bad = reservd_cli("allocate", "hero", "shared", "tiktok", "1000", *target)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1
        assert "FAILED_PRECONDITION" in bad.stderr and "from_bucket" in bad.stderr
    finally:
        daemon.kill()
