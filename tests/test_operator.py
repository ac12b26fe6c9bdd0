"""Operator mistakes get one clear line and a non-zero status, never a traceback; a log the
ledger cannot replay stops start-up with one line that says what to do; `reservd wal verify`
replays through the ledger and says the same. Everything through the CLI, as a subprocess."""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import aio
from daemonproc import DaemonProcess, reservd_cli

from reservd import records
from reservd.cli import _parser
from reservd.records import RecordType
from reservd.wal import WriteAheadLog


def _serve(*args: str) -> subprocess.CompletedProcess:
    return reservd_cli("serve", "--bind", "127.0.0.1:0", *args)


def _one_line(completed: subprocess.CompletedProcess) -> dict:
    """The single JSON line a refused start-up writes."""
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, completed.stderr
    return json.loads(lines[0])


def test_a_data_directory_in_use_is_refused_in_one_line(tmp_path):
    data = str(tmp_path / "data")
    daemon = DaemonProcess("--data-dir", data).start()
    try:
        second = _serve("--data-dir", data)
        assert second.returncode == 1
        line = _one_line(second)
        assert line["msg"] == "start-up refused: the data directory is in use"
        assert "in use by another reservd" in line["error"]
        # The first daemon is unharmed.
        assert reservd_cli("set", "--target", daemon.target, "a", "1").returncode == 0
    finally:
        daemon.kill()


def test_a_port_in_use_is_refused_in_one_line_before_touching_the_data_dir(tmp_path):
    daemon = DaemonProcess("--in-memory").start()
    try:
        second = reservd_cli(
            "serve", "--bind", daemon.target, "--data-dir", str(tmp_path / "other")
        )
    finally:
        daemon.kill()
    assert second.returncode == 1
    line = _one_line(second)
    assert line["msg"] == "start-up failed"
    assert f"cannot listen on {daemon.target}" in line["error"]
    assert not (tmp_path / "other").exists()


def test_a_malformed_redis_url_refuses_to_start(tmp_path):
    refused = _serve("--data-dir", str(tmp_path / "data"), "--redis-url", "localhost:6379")
    assert refused.returncode == 1
    line = _one_line(refused)
    assert line["msg"] == "start-up refused: --redis-url is malformed"
    assert line["redis_url"] == "localhost:6379"
    assert not (tmp_path / "data").exists()


def test_an_unreachable_redis_starts_closed_with_one_line(tmp_path):
    # Port 1 on loopback: nothing listens, the connection is refused at once.
    daemon = DaemonProcess(
        "--data-dir", str(tmp_path / "data"), "--redis-url", "redis://127.0.0.1:1/0"
    ).start()
    try:
        first = reservd_cli(
            "reserve", "--target", daemon.target, "r1", "a:1", "--deadline", "1"
        )
        second = reservd_cli(
            "reserve", "--target", daemon.target, "r2", "a:1", "--deadline", "1"
        )
    finally:
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
    for refused in (first, second):
        assert refused.returncode == 2 and "UNAVAILABLE" in refused.stderr
        assert "Redis mirror is unreachable" in refused.stderr
    closed = daemon.logged("failing closed")
    # One line, however many times the mirror retried meanwhile.
    assert len(closed) == 1 and closed[0]["source"] == "mirror", closed
    assert "127.0.0.1:1" in closed[0]["why"]
    assert not [line for line in daemon.lines if set(line) == {"msg"}]


@pytest.mark.parametrize("kind", ["file", "empty", "missing"])
def test_wal_verify_on_something_else_says_not_a_data_directory(tmp_path, kind):
    path = tmp_path / "thing"
    if kind == "file":
        path.write_text("not a log\n")
    elif kind == "empty":
        path.mkdir()
    for command in ("verify", "dump"):
        completed = reservd_cli("wal", command, str(path))
        assert completed.returncode == 2
        assert completed.stdout == ""
        assert completed.stderr.splitlines() == [
            completed.stderr.strip()
        ] and "not a data directory" in completed.stderr


@aio
async def _write_log(directory: Path, commands: list[tuple[RecordType, bytes]]) -> None:
    log_ = WriteAheadLog(directory)
    log_.recover()
    log_.open()
    await log_.start()
    for seq, (kind, payload) in enumerate(commands, start=1):
        log_.append(seq, kind, payload)
    await log_.commit()
    await log_.close()


def test_a_command_that_cannot_be_replayed_stops_start_up_with_one_line(tmp_path):
    data = tmp_path / "data"
    _write_log(data, [
        (RecordType.SET_STOCK,
         records.encode_stock(records.StockChange(1, "adj-1", "a", 5, None, "recount"))),
        # A commit of a reservation the log never created: a buggier version, or damage the
        # checksum cannot see.
        (RecordType.COMMIT, records.encode_commit(records.Commit(2, "ghost", (1,)))),
    ])
    refused = _serve("--data-dir", str(data))
    assert refused.returncode == 1
    lines = [json.loads(line) for line in refused.stderr.splitlines()]
    assert "Traceback" not in refused.stderr
    errors = [line for line in lines if line["level"] == "error"]
    assert len(errors) == 1, lines
    line = errors[0]
    assert line["msg"] == "start-up refused: a logged command cannot be replayed"
    assert line["seq"] == 2 and line["file"].endswith("wal-00000000000000000001.log")
    assert line["offset"] > 0 and "ghost" in line["command"] and "KeyError" in line["why"]
    assert f"reservd wal verify {data}" in line["hint"]

    verified = reservd_cli("wal", "verify", str(data))
    assert verified.returncode == 1
    assert f"offset {line['offset']}: seq 2 cannot be replayed" in verified.stdout
    assert "ghost" in verified.stdout and "what to do:" in verified.stdout
    # Nothing was dropped or trimmed: the operator still has every record.
    dumped = reservd_cli("wal", "dump", str(data))
    assert [row.split("\t")[0] for row in dumped.stdout.splitlines()
            if not row.startswith("#")] == ["1", "2"]


def test_wal_verify_of_a_clean_directory_replays_it(tmp_path):
    data = tmp_path / "data"
    _write_log(data, [
        (RecordType.SET_STOCK,
         records.encode_stock(records.StockChange(1, "adj-1", "a", 5, None, "recount"))),
    ])
    verified = reservd_cli("wal", "verify", str(data))
    assert verified.returncode == 0, verified.stdout
    assert "replayed 1 records through the ledger: 1 skus" in verified.stdout
    assert verified.stdout.endswith("ok\n")


def test_watch_honours_its_deadline_and_answers_not_found_for_an_unknown_sku(tmp_path):
    daemon = DaemonProcess("--in-memory").start()
    try:
        target = ["--target", daemon.target]
        assert reservd_cli("set", *target, "a", "1").returncode == 0
        started = time.monotonic()
        watched = reservd_cli("watch", *target, "a", "--deadline", "1")
        took = time.monotonic() - started
        assert watched.returncode == 0, watched.stderr
        assert json.loads(watched.stdout.splitlines()[0])["sku"] == "a"
        assert took < 10 and watched.stderr == ""
        short = reservd_cli("watch", *target, "a", "--deadline", "1", "--count", "2")
        assert short.returncode == 2 and "DEADLINE_EXCEEDED" in short.stderr
        unknown = reservd_cli("watch", *target, "nope", "--deadline", "5")
        assert unknown.returncode == 2
        assert unknown.stderr.startswith("reservd: NOT_FOUND: ") and "nope" in unknown.stderr
        assert len(unknown.stderr.splitlines()) == 1
    finally:
        daemon.kill()


def test_ctrl_c_on_watch_exits_130_without_a_traceback():
    daemon = DaemonProcess("--in-memory").start()
    try:
        assert reservd_cli("set", "--target", daemon.target, "a", "1").returncode == 0
        watch = subprocess.Popen(
            [sys.executable, "-m", "reservd", "watch", "--target", daemon.target, "a"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            # The current state comes first: once it is printed, the watch is streaming.
            assert json.loads(watch.stdout.readline())["sku"] == "a"
            watch.send_signal(signal.SIGINT)
            assert watch.wait(30) == 130
            assert watch.stderr.read() == ""
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.wait(10)
    finally:
        daemon.kill()


def _options(parser: argparse.ArgumentParser, path: str = "reservd"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_help_option_has_a_description_and_shows_its_default():
    parser = _parser()
    checked = 0
    for path, action in _options(parser):
        assert action.help, f"{path} {action.dest}: no description"
        if action.option_strings:
            formatter = parser.formatter_class("reservd")
            assert "(default:" in formatter._get_help_string(action) % {
                "default": action.default
            }, f"{path} {action.option_strings[0]}"
            checked += 1
    assert checked > 20
    shown = reservd_cli("serve", "--help")
    assert shown.returncode == 0
    assert "(default: 127.0.0.1:50051)" in " ".join(shown.stdout.split())
