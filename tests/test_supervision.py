"""A bug is fatal: a broken invariant or a dying background task closes grants and writes at
once, logs one structured ``fatal`` line, and the daemon exits 70 without a traceback; a restart
recovers to the last acknowledged state."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from conftest import aio, cart, running
from daemonproc import DaemonProcess, reservd_cli

from reservd.supervisor import EXIT_FATAL
from reservd.v1 import reservd_pb2 as pb

LAUNCHER = [str(Path(__file__).with_name("faulty_serve.py"))]


def _json(completed) -> dict:
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.splitlines()[-1])


def _no_traceback(daemon: DaemonProcess) -> None:
    # DaemonProcess keeps a line that is not JSON as {"msg": <the line>}.
    raw = [line["msg"] for line in daemon.lines if set(line) == {"msg"}]
    assert raw == [], raw[:5]
    assert not [line for line in daemon.lines if "Traceback" in json.dumps(line)], daemon.lines


def test_a_broken_invariant_under_an_rpc_stops_the_daemon_and_a_restart_recovers(tmp_path):
    data = str(tmp_path / "data")
    daemon = DaemonProcess(
        "--data-dir", data, launcher=LAUNCHER, env={"RESERVD_TEST_FAULT": "table.commit:3"}
    ).start()
    try:
        target = ["--target", daemon.target]
        _json(reservd_cli("set", *target, "d", "10"))
        for n in (1, 2, 3):
            _json(reservd_cli("reserve", *target, f"r{n}", "d:1", "--ttl", "3600"))
        _json(reservd_cli("commit", *target, "r1"))
        _json(reservd_cli("commit", *target, "r2"))
        broken = reservd_cli("commit", *target, "r3")
        assert broken.returncode == 2
        assert "INTERNAL" in broken.stderr and "UNKNOWN" not in broken.stderr
        after = reservd_cli("reserve", *target, "r4", "d:1", "--deadline", "2")
        assert after.returncode == 2 and "UNAVAILABLE" in after.stderr, after.stderr
        assert daemon.wait() == EXIT_FATAL
    finally:
        daemon.kill()
    fatal = daemon.logged("fatal")
    assert len(fatal) == 1, fatal
    assert fatal[0]["invariant"] == (
        "AssertionError: injected: call 3 of table.commit broke an invariant"
    )
    assert fatal[0]["where"].endswith("/Commit") and fatal[0]["level"] == "critical"
    assert "faulty_serve.py" in fatal[0]["raised_at"]
    _no_traceback(daemon)

    restarted = DaemonProcess("--data-dir", data).start()
    try:
        stock = _json(reservd_cli("get", "--target", restarted.target, "d"))
        # Every acknowledged call is there: r1 and r2 committed, r3 still held (its commit
        # failed in the table, and the ledger logs only what it has applied), r4 never granted.
        counters = (stock["on_hand"], stock["reserved"], stock["committed"])
        assert counters == (10, 1, 2), counters
    finally:
        restarted.kill()
    verified = reservd_cli("wal", "verify", data)
    assert verified.returncode == 0 and verified.stdout.endswith("ok\n"), verified.stdout


def test_a_background_task_dying_stops_the_daemon(tmp_path):
    # expire_due runs once at start-up, then every expiry tick: its 3rd call is in the task.
    daemon = DaemonProcess(
        "--data-dir", str(tmp_path / "data"), launcher=LAUNCHER,
        env={"RESERVD_TEST_FAULT": "ledger.expire_due:3"},
    ).start()
    try:
        assert daemon.wait() == EXIT_FATAL
    finally:
        daemon.kill()
    fatal = daemon.logged("fatal")
    assert len(fatal) == 1, fatal
    assert fatal[0]["where"] == "task expiry"
    assert fatal[0]["invariant"].startswith("AssertionError: injected: call 3 of ledger.")
    _no_traceback(daemon)


def test_a_durable_listener_that_raises_stops_the_daemon(tmp_path):
    """The log tells the WatchStock hub each durable batch; a hub that raises is a bug, not a
    log line while serving goes on (a watcher would miss changes)."""
    daemon = DaemonProcess(
        "--data-dir", str(tmp_path / "data"), launcher=LAUNCHER,
        env={"RESERVD_TEST_FAULT": "hub.on_durable:3"},
    ).start()
    try:
        target = ["--target", daemon.target]
        for n in range(1, 6):
            done = reservd_cli("set", *target, f"s{n}", "10", "--deadline", "2")
            if done.returncode != 0:
                break
        assert daemon.wait() == EXIT_FATAL
    finally:
        daemon.kill()
    fatal = daemon.logged("fatal")
    assert len(fatal) == 1, fatal
    assert fatal[0]["where"] == "durable listener WatchHub.on_durable", fatal
    assert fatal[0]["invariant"].startswith("AssertionError: injected: call 3 of hub.")
    _no_traceback(daemon)


@aio
async def test_a_task_that_raises_or_returns_closes_grants_and_writes(caplog):
    caplog.set_level(logging.INFO, logger="reservd.supervisor")
    async with running() as server:
        supervisor = server.daemon.supervisor
        await server.set_stock("a", 5)
        # In memory-only mode the expiry task runs (no snapshot task).
        tasks = server.daemon.metrics.registry.get_sample_value("reservd_background_tasks")
        assert tasks == supervisor.tasks >= 1

        async def finished_early() -> None:
            return None

        supervisor.spawn(finished_early(), "sync-worker")
        await asyncio.wait_for(supervisor.failed.wait(), 10)
        assert "sync-worker" in str(supervisor.failure)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.reservations.Reserve(cart("r1", ("a", 1)))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.admin.AdjustStock(
                pb.AdjustStockRequest(sku="a", delta=1, adjustment_id="x")
            )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

        async def raises() -> None:
            raise ValueError("second bug")

        # The supervisor's done callback runs before asyncio.wait's: a second failure is
        # recorded nowhere, the first one stands.
        await asyncio.wait([supervisor.spawn(raises(), "other")])
        assert "sync-worker" in str(supervisor.failure)
    fatal = [r for r in caplog.records if r.getMessage() == "fatal"]
    assert len(fatal) == 1 and fatal[0].where == "task sync-worker"


@aio
async def test_stop_reports_a_task_that_fails_while_cancelled():
    async with running() as server:
        supervisor = server.daemon.supervisor
        started = asyncio.Event()

        async def cleanup_bug() -> None:
            try:
                started.set()
                await asyncio.Event().wait()
            finally:
                raise RuntimeError("cleanup broke")

        supervisor.spawn(cleanup_bug(), "cleanup")
        await started.wait()
    assert isinstance(supervisor.failure, RuntimeError)
    assert supervisor.tasks == 0


def test_a_bug_during_start_up_is_one_fatal_line_and_exit_70(tmp_path):
    # expire_due's first call releases the holds that expired while the daemon was down.
    started = subprocess.run(
        [sys.executable, *LAUNCHER, "serve", "--bind", "127.0.0.1:0",
         "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "RESERVD_TEST_FAULT": "ledger.expire_due:1"},
    )
    assert started.returncode == EXIT_FATAL
    lines = [json.loads(line) for line in started.stderr.splitlines()]
    fatal = [line for line in lines if line["msg"] == "fatal"]
    assert len(fatal) == 1 and fatal[0]["where"] == "serve", lines
    assert "Traceback" not in started.stderr
