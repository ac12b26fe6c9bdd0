"""Durability under faults, end to end through the gRPC daemon.

The WAL's own unit tests (tests/test_wal.py) cover framing, torn tails at every offset, the
FileLayer seam and power loss at the log level; tests/test_crash.py covers kill -9 under load.
This file covers what only the whole daemon shows:

1. a power loss under concurrent gRPC load (the WAL's file layer drops what was not fsynced),
   and proof that the check catches the WAL's test-only ``ack_before_fsync`` bug;
2. a real ``fdatasync`` returning EIO in a running daemon (fiu-run / fiu-ctrl);
3. a real ENOSPC on a size-limited tmpfs;
4. start-up refusing a corrupt segment or snapshot (naming file and offset) and trimming a torn
   tail, with ``reservd wal verify|dump`` agreeing;
5. WatchStock resume points across restarts.
"""
from __future__ import annotations

import asyncio
import errno
import itertools
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from conftest import aio, cart, eventually, running, test_config
from daemonproc import DaemonProcess, reservd_cli, wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc
from history import Recorder, check, read_final_state, read_wal
from test_crash import SUPPLIED, _worker
from test_wal import frames, segments
from walfaults import FaultyFiles, PowerLossFiles, at_call

from reservd.metrics import scrape
from reservd.server import RESERVATIONS, Daemon
from reservd.v1 import reservd_pb2 as pb
from reservd.v1 import reservd_pb2_grpc as pb_grpc
from reservd.wal import SNAPSHOT_HEAD_BYTES

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


# -- shared helpers ------------------------------------------------------------------------------


async def _health(channel: grpc.aio.Channel, service: str = RESERVATIONS) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)).status


async def _await_health(channel: grpc.aio.Channel, want: int, checks_max: int = 3000) -> int:
    """The health status once it is ``want``, checking every 20 ms; bounded by a count of checks
    (a minute), not a tight wall-clock budget a busy machine could overrun."""
    status = await _health(channel)
    for _ in range(checks_max):
        if status == want:
            break
        await asyncio.sleep(0.02)
        status = await _health(channel)
    return status


async def _reserve_error(stub, rid: str, sku: str) -> grpc.aio.AioRpcError | None:
    """Reserve one unit; the error, or None if it was acknowledged."""
    try:
        await stub.Reserve(cart(rid, (sku, 1), ttl_seconds=3600), timeout=30)
    except grpc.aio.AioRpcError as error:
        return error
    return None


async def _states(stub, rids) -> dict[str, pb.ReservationResponse | None]:
    """GetReservation for each id (None: NOT_FOUND), 256 calls at a time."""
    async def one(rid: str):
        try:
            return await stub.GetReservation(pb.GetReservationRequest(reservation_id=rid),
                                             timeout=10)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND, error
            return None

    rids = list(rids)
    found: dict[str, pb.ReservationResponse | None] = {}
    for start in range(0, len(rids), 256):
        chunk = rids[start:start + 256]
        found.update(zip(chunk, await asyncio.gather(*(one(rid) for rid in chunk))))
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _metric(port: int, name: str) -> float:
    """One value from the daemon's Prometheus endpoint."""
    values = scrape(port)
    assert name in values, f"{name} not in the metrics"
    return values[name]


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


# -- 1. power loss under gRPC load ---------------------------------------------------------------

POWER_WORKERS = 10
# The power goes out at the first matching file call once this many operations were
# acknowledged (at any call when none matched within POWER_CUT_CALLS_MAX calls after that).
POWER_CUT_AFTER_ACKED = (60, 500)
POWER_CUT_CALLS_MAX = 200


def _snapshot_step(rng: random.Random):
    """Matches the k-th snapshot call (open, write, write, fsync, rename, directory fsync,
    unlinks): the power goes out somewhere inside a snapshot."""
    step = rng.randint(1, 7)
    seen = 0

    def matches(op: str, name: str) -> bool:
        nonlocal seen
        if name.startswith("snap-") or op in ("rename", "fsync_dir", "unlink"):
            seen += 1
        return seen >= step

    return matches


# Rotations (16 KiB segments) and snapshots (every 300 records) happen often enough for their
# calls to be hit too.
POWER_CUTS = {
    "any": lambda rng: lambda op, name: True,
    "fdatasync": lambda rng: lambda op, name: op == "fdatasync",
    "write": lambda rng: lambda op, name: op == "write",
    "rotation": lambda rng: lambda op, name: op in ("fsync", "open") and name.startswith("wal-"),
    "snapshot": _snapshot_step,
}
POWER_ROUNDS = 10
# The first deletion of a segment a snapshot covers: the snapshot is durable (its rename and the
# directory fsync came first), every segment it covers is still there. Not one of POWER_CUTS:
# it waits for a snapshot (one every 300 records), so for up to SEGMENT_DELETION_CALLS_MAX
# file calls.
SEGMENT_DELETION = "segment deletion"
SEGMENT_DELETION_CALLS_MAX = 20_000
LOST_ACK = re.compile(r"was acknowledged but is not in the log")


class _PowerCut:
    """A PowerLossFiles trigger armed by a count of acknowledged operations (not by time, so a
    slow machine changes nothing); ``fired`` names the call it hit."""

    def __init__(self, rng: random.Random, kind: str) -> None:
        self.after_acked = rng.randint(*POWER_CUT_AFTER_ACKED)
        if kind == SEGMENT_DELETION:
            self.matches = lambda op, name: op == "unlink" and name.startswith("wal-")
            self.calls_max = SEGMENT_DELETION_CALLS_MAX
        else:
            self.matches = POWER_CUTS[kind](rng)
            self.calls_max = POWER_CUT_CALLS_MAX
        self.acked = 0
        self.calls_armed = 0
        self.fired: list[str] = []

    def on_acked(self) -> None:
        self.acked += 1

    def __call__(self, op: str, name: str) -> bool:
        if self.acked < self.after_acked:
            return False
        self.calls_armed += 1
        if self.calls_armed > self.calls_max or self.matches(op, name):
            self.fired.append(f"{op} {name}")
            return True
        return False


class _KeepingDeletedSegments(PowerLossFiles):
    """PowerLossFiles that keeps, in ``archive``, the durable bytes of every segment the WAL
    deletes once a snapshot covers it: the checker reads every record ever made durable."""

    def __init__(self, directory: Path, archive: Path) -> None:
        super().__init__(directory)
        self.archive = archive
        archive.mkdir(parents=True, exist_ok=True)

    def unlink(self, path):
        name = Path(path).name
        with self._lock:
            inode = self._entries.get(name)
            durable = self._durable_content.get(inode) if inode is not None else None
            super().unlink(path)
        if durable is not None and name.startswith("wal-"):
            (self.archive / name).write_bytes(durable)


async def _power_loss_round(
    directory: Path, round_number: int, rng: random.Random, *, tear: bool,
    ack_before_fsync: bool, cut: str,
) -> tuple[list[str], dict]:
    """One life of an in-process daemon whose WAL sits on PowerLossFiles: stock, concurrent
    reserve/commit/release/fulfil load (tests/test_crash.py's workers), the power cut after a
    random count of acknowledged operations, the daemon abandoned, the disk reduced to what was
    durable, then a fresh daemon on the real files and the history checker over the calls, the
    recovered state and every durable record. Returns the violations it found (empty: every
    acknowledged operation survived) and figures for the report."""
    data = directory / "data"
    files = _KeepingDeletedSegments(data, directory / "deleted-segments")
    config = test_config(data_dir=data, segment_bytes_max=16 << 10, snapshot_records_interval=300)
    daemon = Daemon(config, wal_files=files)
    # A plain attribute, read at every flush: the test-only etcd #14370 bug.
    daemon.log.ack_before_fsync = ack_before_fsync
    port = await daemon.start()
    recorder = Recorder()
    power_cut = _PowerCut(rng, cut)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            admin = pb_grpc.AdminStub(channel)
            for sku, on_hand in SUPPLIED.items():
                await recorder.call(0, "set_stock", admin.SetStock, pb.SetStockRequest(
                    sku=sku, on_hand=on_hand, adjustment_id=f"init-{sku}"))
            files.trigger = power_cut
            stub = pb_grpc.ReservationsStub(channel)
            # Each worker returns at its first failed call, i.e. soon after the power cut.
            await asyncio.gather(*(
                _worker(stub, recorder, w, round_number, random.Random(rng.random()),
                        power_cut.on_acked)
                for w in range(POWER_WORKERS)
            ))
            assert files.dead, "the power was never cut"
            assert daemon.log.failed is not None, "the WAL did not notice the power cut"
            assert await _await_health(channel, NOT_SERVING) == NOT_SERVING
    finally:
        # Abandon it: in-flight calls are cut off, and nothing reaches the disk any more.
        await daemon.stop(grace_seconds=0)
    kept = files.power_loss(rng if tear else None)
    reservation_ids = {op.key for op in recorder.ops if op.kind != "set_stock"}
    # The restarted daemon snapshots and deletes covered segments too: keep them for the check.
    restarted_files = _KeepingDeletedSegments(data, files.archive)
    async with running(test_config(data_dir=data), wal_files=restarted_files) as server:
        final = await read_final_state(server.reservations, SUPPLIED, reservation_ids,
                                       seq=server.daemon.ledger.seq)
    report = check(recorder.ops, wal=read_wal(data, files.archive), final=final)
    figures = {
        "cut": f"{cut}: {power_cut.fired[0] if power_cut.fired else None}",
        "acked": report.acknowledged, "indefinite": report.indefinite,
        "present": report.indefinite_present,
        "torn_bytes": sum(kept.values()), "recovered_seq": final.seq,
    }
    return report.violations, figures


@aio
async def test_power_loss_under_grpc_load_loses_no_acknowledged_operation(tmp_path):
    rng = random.Random(1411)
    started = time.monotonic()
    acked = 0
    for round_number in range(POWER_ROUNDS):
        tear = round_number % 2 == 1
        problems, figures = await _power_loss_round(
            tmp_path / f"round-{round_number}", round_number, rng, tear=tear,
            ack_before_fsync=False, cut=list(POWER_CUTS)[round_number % len(POWER_CUTS)],
        )
        print(f"power loss round {round_number} (tear={tear}): {figures}")
        assert problems == [], (round_number, figures, problems)
        assert figures["acked"] > 50, figures
        acked += figures["acked"]
    print(f"power loss: {POWER_ROUNDS} rounds, {acked} acknowledged operations checked, "
          f"{time.monotonic() - started:.1f} s")


@aio
async def test_power_loss_between_snapshot_and_segment_deletion_loses_nothing(tmp_path):
    """The power goes out once a snapshot is durable but before the segments it covers are
    deleted: the restart recovers from the snapshot with the covered records still on disk
    beside it, and every acknowledged operation is there (torn tail in the second round)."""
    rng = random.Random(6117)
    for round_number in range(2):
        problems, figures = await _power_loss_round(
            tmp_path / f"round-{round_number}", round_number, rng, tear=round_number == 1,
            ack_before_fsync=False, cut=SEGMENT_DELETION,
        )
        print(f"segment deletion round {round_number}: {figures}")
        assert figures["cut"].startswith(f"{SEGMENT_DELETION}: unlink wal-"), figures
        assert problems == [], (round_number, figures, problems)
        assert figures["acked"] > 50, figures


@aio
async def test_power_loss_check_catches_ack_before_fsync(tmp_path):
    """With the WAL acknowledging before its fdatasync, the very same round must report lost
    acknowledged operations: the check above is not vacuous."""
    rng = random.Random(14370)
    caught = []
    for round_number in range(3):
        problems, figures = await _power_loss_round(
            tmp_path / f"round-{round_number}", round_number, rng, tear=False,
            ack_before_fsync=True, cut="fdatasync",
        )
        print(f"ack_before_fsync round {round_number}: {figures}, problems: {problems}")
        assert all(LOST_ACK.search(problem) for problem in problems), problems
        caught.append(bool(problems))
    assert any(caught), "the power-loss check never saw the lost acknowledged writes"
    print(f"ack_before_fsync: lost acknowledged writes reported in {sum(caught)} of 3 rounds")


# -- 2. a real fdatasync EIO in a running daemon (libfiu) -------------------------------------

FDATASYNC_POINT = "posix/io/sync/fdatasync"
# failinfo is the errno the posix preload sets (EIO = 5). Without it the preload picks one at
# random from the errnos fdatasync may return (EBADF, EINVAL, EROFS, EIO); failnum is only
# fiu_fail()'s return value.
FDATASYNC_EIO = f"enable name={FDATASYNC_POINT},failnum=1,failinfo=5"
FIU_PRELOAD = Path("/usr/lib/fiu/fiu_posix_preload.so")


def _require_fiu() -> None:
    missing = [tool for tool in ("fiu-run", "fiu-ctrl") if shutil.which(tool) is None]
    if missing or not FIU_PRELOAD.exists():
        pytest.skip(f"fiu-utils is not installed ({', '.join(missing) or FIU_PRELOAD} "
                    "missing): apt-get install fiu-utils")


def _fiu_ctrl(fifo: Path, pid: int, command: str) -> None:
    completed = subprocess.run(
        ["fiu-ctrl", "-f", str(fifo), "-c", command, str(pid)],
        capture_output=True, text=True, timeout=10,
    )
    assert completed.returncode == 0, completed


def test_fdatasync_eio_in_a_running_daemon_fails_closed_and_loses_nothing(tmp_path):
    _require_fiu()
    data = tmp_path / "data"
    fifo = tmp_path / "fiu-ctrl"
    metrics_port = _free_port()
    daemon = DaemonProcess(
        "--data-dir", str(data), "--metrics-port", str(metrics_port),
        wrapper=["fiu-run", "-x", "-f", str(fifo)],
    )
    on_hand = 1_000_000
    # rid -> ("acked", sequence) or ("refused", status, details, sent after a failure was seen)
    outcomes: dict[str, tuple] = {}

    async def life_under_fault() -> dict:
        async with grpc.aio.insecure_channel(daemon.target) as channel:
            stub = pb_grpc.ReservationsStub(channel)
            await pb_grpc.AdminStub(channel).SetStock(
                pb.SetStockRequest(sku="s", on_hand=on_hand, adjustment_id="init")
            )
            failure_seen = asyncio.Event()
            stop = asyncio.Event()
            enough_acked, enough_refused = asyncio.Event(), asyncio.Event()

            def tally() -> None:
                kinds = [outcome[0] for outcome in outcomes.values()]
                if kinds.count("acked") >= 50:
                    enough_acked.set()
                if kinds.count("refused") >= 64:
                    enough_refused.set()

            async def buyer(n: int) -> None:
                for i in range(100_000):
                    if stop.is_set():
                        return
                    rid = f"b{n}-{i}"
                    after_failure = failure_seen.is_set()
                    try:
                        response = await stub.Reserve(cart(rid, ("s", 1), ttl_seconds=3600),
                                                      timeout=30)
                    except grpc.aio.AioRpcError as error:
                        outcomes[rid] = ("refused", error.code(), error.details(), after_failure)
                        failure_seen.set()
                        tally()
                        await asyncio.sleep(0.01)  # a refused client backs off a little
                        continue
                    assert response.granted
                    outcomes[rid] = ("acked", response.sequence, after_failure)
                    tally()

            buyers = [asyncio.create_task(buyer(n)) for n in range(16)]
            await enough_acked.wait()
            assert await _health(channel) == SERVING
            _fiu_ctrl(fifo, daemon.process.pid, FDATASYNC_EIO)
            status = await _await_health(channel, NOT_SERVING)
            await enough_refused.wait()  # every buyer keeps trying after the failure
            stop.set()
            await asyncio.gather(*buyers)
            assert status == NOT_SERVING, "Reservations still SERVING after the fsync failure"

            # The fault clears: a daemon that retried fdatasync (or reopened) would now recover.
            fsyncs = _metric(metrics_port, "reservd_wal_fsyncs")
            durable = _metric(metrics_port, "reservd_durable_sequence")
            _fiu_ctrl(fifo, daemon.process.pid, f"disable name={FDATASYNC_POINT}")
            # Nothing to await: this gives a daemon that (wrongly) retried the chance to. A slow
            # machine can only make the check weaker here, never fail a correct daemon.
            await asyncio.sleep(0.5)
            later = await _reserve_error(stub, "after-the-fault-cleared", "s")
            release = None
            acked = [rid for rid, outcome in outcomes.items() if outcome[0] == "acked"]
            try:
                await stub.Release(pb.ReleaseRequest(reservation_id=acked[0]), timeout=30)
            except grpc.aio.AioRpcError as error:
                release = error
            return {
                "health": await _health(channel), "later": later, "release": release,
                "fsyncs": (fsyncs, _metric(metrics_port, "reservd_wal_fsyncs")),
                "durable": (durable, _metric(metrics_port, "reservd_durable_sequence")),
                "fail_closed": _metric(metrics_port, "reservd_fail_closed"),
                "closed_since": _metric(metrics_port, "reservd_fail_closed_since_timestamp_seconds"),
            }

    daemon.start()
    try:
        after = asyncio.run(life_under_fault())
    finally:
        daemon.kill()
    acked = {rid: o[1] for rid, o in outcomes.items() if o[0] == "acked"}
    refused = {rid: o for rid, o in outcomes.items() if o[0] == "refused"}
    print(f"fiu EIO: {len(acked)} reserves acknowledged before the fault, {len(refused)} "
          "refused after it")
    assert len(acked) > 20 and refused
    for _, code, details, _ in refused.values():
        assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
        assert "write-ahead log failed: fdatasync of" in details and "EIO" in details, details
    # Once a client has seen the failure, nothing sent after it is acknowledged.
    assert not [rid for rid, o in outcomes.items() if o[0] == "acked" and o[2]]
    assert after["later"] is not None and after["later"].code() == grpc.StatusCode.UNAVAILABLE
    assert "reservations are closed" in after["later"].details()
    assert "fdatasync" in after["later"].details() and "EIO" in after["later"].details()
    assert after["release"] is not None
    assert after["release"].code() == grpc.StatusCode.UNAVAILABLE, after["release"]
    assert "writes are closed" in after["release"].details()
    # Never retried: the fault is gone, yet no fdatasync succeeded and nothing became durable.
    assert after["health"] == NOT_SERVING and after["fail_closed"] == 1
    assert 0 < time.time() - after["closed_since"] < 120, "the metric says since when"
    assert after["fsyncs"][0] == after["fsyncs"][1], after["fsyncs"]
    assert after["durable"][0] == after["durable"][1], after["durable"]
    failures = [line for line in daemon.lines
                if str(line.get("msg", "")).startswith("write-ahead log failed")]
    assert len(failures) == 1 and failures[0]["level"] == "error", failures
    assert str(data) in failures[0]["msg"] and "EIO" in failures[0]["msg"]

    # Restart without fiu: recovery reads what reached the files.
    plain = DaemonProcess("--data-dir", str(data)).start()

    async def check() -> None:
        async with grpc.aio.insecure_channel(plain.target) as channel:
            stub = pb_grpc.ReservationsStub(channel)
            found = await _states(stub, outcomes)
            for rid, sequence in acked.items():
                assert found[rid] is not None, f"acknowledged reservation {rid} was lost"
                assert found[rid].state == pb.HELD and found[rid].sequence == sequence
            # The failed batch was written (page cache) but never acknowledged: its records
            # come back, and every acknowledged operation comes before all of them.
            unacked = sorted(found[rid].sequence for rid in refused if found[rid] is not None)
            assert unacked, "the failed batch left no record: was a batch really in flight?"
            assert max(acked.values()) < unacked[0], (max(acked.values()), unacked[:3])
            stock = (await stub.GetStock(pb.GetStockRequest(skus=["s"]))).stock[0]
            present = sum(state is not None for state in found.values())
            assert (stock.on_hand, stock.reserved, stock.committed) == (on_hand, present, 0)
            assert stock.available >= 0  # oversold == 0

    try:
        asyncio.run(check())
    finally:
        plain.kill()


# -- 3. a real ENOSPC: a full tmpfs ---------------------------------------------------------------

ENOSPC_SKUS = [f"enospc-{i:03d}-" + "x" * 110 for i in range(100)]  # ~12 KiB Reserve records
ENOSPC_ON_HAND = 10_000


def _mount_tmpfs(mountpoint: Path, size: str) -> None:
    mountpoint.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount(8): the real-ENOSPC test needs a size-limited tmpfs")
    completed = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mountpoint)],
        capture_output=True, text=True, timeout=10,
    )
    if completed.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({completed.stderr.strip() or completed.returncode})"
                    ": the real-ENOSPC test needs root and mount(8)")


def _remount_bigger(mountpoint: Path, size: str) -> None:
    completed = subprocess.run(
        ["mount", "-o", f"remount,size={size}", str(mountpoint)],
        capture_output=True, text=True, timeout=10,
    )
    assert completed.returncode == 0, completed


async def _fill_until_enospc(daemon: DaemonProcess) -> tuple[dict[str, int], dict]:
    """Reserve 1 of each of 100 long-named SKUs from 8 clients until the disk is full; returns
    the acknowledged reservations (id -> sequence) and what the daemon says afterwards."""
    acked: dict[str, int] = {}
    errors: list[grpc.aio.AioRpcError] = []
    async with grpc.aio.insecure_channel(daemon.target) as channel:
        admin = pb_grpc.AdminStub(channel)
        for sku in ENOSPC_SKUS:
            await admin.SetStock(
                pb.SetStockRequest(sku=sku, on_hand=ENOSPC_ON_HAND, adjustment_id=f"init-{sku}")
            )
        stub = pb_grpc.ReservationsStub(channel)

        async def client(n: int) -> None:
            for i in range(ENOSPC_ON_HAND):
                rid = f"fill-{n}-{i}"
                try:
                    response = await stub.Reserve(
                        cart(rid, *((sku, 1) for sku in ENOSPC_SKUS), ttl_seconds=3600),
                        timeout=10,
                    )
                except grpc.aio.AioRpcError as error:
                    errors.append(error)
                    return
                assert response.granted
                acked[rid] = response.sequence

        await asyncio.wait_for(asyncio.gather(*(client(n) for n in range(8))), 30)
        health = await _await_health(channel, NOT_SERVING)
        later = await _reserve_error(stub, "after-enospc", ENOSPC_SKUS[0])
        return acked, {"errors": errors, "later": later, "health": health}


async def _check_acked_reservations(target: str, acked: dict[str, int], skus, on_hand: int,
                                    units: int = 1) -> int:
    """Every acknowledged reservation is HELD at its sequence; the counters balance against the
    reservations found; nothing is oversold. Returns the reservations found."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ReservationsStub(channel)
        found = await _states(stub, acked)
        lost = [rid for rid, state in found.items() if state is None]
        assert not lost, f"{len(lost)} acknowledged reservations lost: {lost[:5]}"
        for rid, sequence in acked.items():
            assert (found[rid].state, found[rid].sequence) == (pb.HELD, sequence), found[rid]
        stock = (await stub.GetStock(pb.GetStockRequest(skus=list(skus)))).stock
        # Unacknowledged reserves that landed anyway (the failed batch's whole frames) hold
        # units too: the totals must match what is live, and nothing may be oversold.
        live = (await stub.GetStock(pb.GetStockRequest(skus=[skus[0]]))).stock[0].reserved
        assert live >= len(acked) * units
        for counters in stock:
            assert (counters.on_hand, counters.reserved, counters.committed) == (
                on_hand, live, 0), counters
            assert counters.available >= 0  # oversold == 0
        return live


def test_real_enospc_on_a_full_tmpfs_fails_closed_and_loses_nothing(tmp_path):
    mountpoint = tmp_path / "tmpfs"
    _mount_tmpfs(mountpoint, "2m")
    data = mountpoint / "data"
    copy = tmp_path / "copy"
    daemons: list[DaemonProcess] = []
    try:
        daemon = DaemonProcess("--data-dir", str(data), "--segment-bytes-max", str(192 << 10))
        daemons.append(daemon)
        daemon.start()
        acked, after = asyncio.run(_fill_until_enospc(daemon))
        segment_count = len(segments(data))
        daemon.signal(signal.SIGTERM)
        exit_code = daemon.wait(20)
        print(f"ENOSPC: {len(acked)} reserves of 100 lines acknowledged, "
              f"{segment_count} segments")
        assert segment_count > 1, "the log never rotated: --segment-bytes-max is too big"
        assert len(acked) > 50 and after["errors"]
        for error in [*after["errors"], after["later"]]:
            assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE, error
            assert "write-ahead log failed" in error.details(), error.details()
            assert "ENOSPC" in error.details(), error.details()
        assert "reservations are closed" in after["later"].details()
        assert after["health"] == NOT_SERVING
        failures = [line for line in daemon.lines
                    if str(line.get("msg", "")).startswith("write-ahead log failed")]
        assert len(failures) == 1, failures
        assert "No space left on device" in failures[0]["msg"], failures
        assert exit_code == 0, daemon.lines[-5:]  # a failed log still shuts down cleanly

        # Restart on a real disk (a copy), then in place once the tmpfs has room again.
        shutil.copytree(data, copy)
        for where, directory in (("copy", copy), ("remounted", data)):
            if where == "remounted":
                _remount_bigger(mountpoint, "8m")
            restarted = DaemonProcess("--data-dir", str(directory))
            daemons.append(restarted)
            restarted.start()
            live = asyncio.run(_check_acked_reservations(
                restarted.target, acked, ENOSPC_SKUS, ENOSPC_ON_HAND
            ))
            restarted.signal(signal.SIGTERM)
            assert restarted.wait(20) == 0
            trimmed = [line["msg"] for line in restarted.lines
                       if "torn tail" in line.get("msg", "")]
            print(f"ENOSPC restart ({where}): {live} reservations live ({live - len(acked)} "
                  f"unacknowledged that landed), torn tail: {[m[:150] for m in trimmed]}")
    finally:
        for daemon in daemons:
            daemon.kill()
        subprocess.run(["umount", str(mountpoint)], capture_output=True, timeout=30)



@aio
async def test_a_failed_snapshot_is_logged_and_retried_while_reservations_go_on(tmp_path, caplog):
    """ENOSPC on a snapshot's fsync fails that snapshot only: the log carries on, nothing is
    deleted, the error is logged, and a later interval writes a good snapshot (the loop used
    to die silently on the first failure, and no snapshot was ever taken again)."""
    files = FaultyFiles()
    files.fail("fsync", errno.ENOSPC, at_call(1, "fsync", name_prefix="snap-"))
    data = tmp_path / "data"
    daemon = Daemon(test_config(data_dir=data, snapshot_records_interval=20), wal_files=files)
    port = await daemon.start()
    acked: dict[str, int] = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await pb_grpc.AdminStub(channel).SetStock(
                pb.SetStockRequest(sku="a", on_hand=1_000, adjustment_id="init"))
            stub = pb_grpc.ReservationsStub(channel)
            def snapshot_failures() -> list:
                return [r for r in caplog.records if r.getMessage() == "snapshot failed"]

            for i in range(120):
                acked[f"r{i}"] = (await stub.Reserve(cart(f"r{i}", ("a", 1)))).sequence
                if i % 20 == 19:
                    # The snapshot loop takes its turn (the failed one, then good ones).
                    attempts = (i + 1) // 20
                    await eventually(
                        lambda: len(snapshot_failures()) + daemon.log.stats.snapshots >= attempts,
                        f"{attempts} snapshot attempts made",
                    )
    finally:
        await daemon.stop(grace_seconds=1)
    failed = [r for r in caplog.records if r.getMessage() == "snapshot failed"]
    assert len(failed) == 1 and "No space left on device" in failed[0].error, failed
    assert files.calls["fsync"] > 1 and daemon.log.failed is None
    snapshots = sorted(data.glob("snap-*.snap"))
    assert snapshots, "no snapshot was written after the failed one"
    assert not list(data.glob("*.tmp"))
    async with running(test_config(data_dir=data)) as server:
        assert server.daemon.hub.floor_seq == int(snapshots[-1].name[5:25])
        found = await _states(server.reservations, acked)
        assert all(found[rid] is not None and found[rid].sequence == seq
                   for rid, seq in acked.items())
        assert (await server.stock("a")).reserved == len(acked)

# -- 4. start-up refuses corruption; a torn tail is trimmed ---------------------------------------

CORRUPTION_SKUS = [f"c-{i}" for i in range(5)]
CORRUPTION_ON_HAND = 10_000


class Pristine:
    """A data directory written by a real daemon, and what its clients were told."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.lines: dict[str, dict[str, int]] = {}
        self.expected: dict[str, tuple[int, int]] = {}  # rid -> (state, latest sequence)
        self.snapshots: list[dict] = []


def _build(directory: Path, *extra_args: str) -> Pristine:
    """~360 operations (reserve, commit, release) through `reservd serve`, then SIGTERM; the
    last operation is the reserve of "last". Small segments, so there are several."""
    built = Pristine(directory)
    daemon = DaemonProcess("--data-dir", str(directory), "--segment-bytes-max", "4096",
                           *extra_args)

    async def operations() -> None:
        async with grpc.aio.insecure_channel(daemon.target) as channel:
            admin = pb_grpc.AdminStub(channel)
            stub = pb_grpc.ReservationsStub(channel)
            for sku in CORRUPTION_SKUS:
                await admin.SetStock(pb.SetStockRequest(
                    sku=sku, on_hand=CORRUPTION_ON_HAND, adjustment_id=f"init-{sku}"))

            async def reserve(rid: str, lines: dict[str, int]) -> None:
                response = await stub.Reserve(cart(rid, *lines.items(), ttl_seconds=3600))
                assert response.granted
                built.lines[rid] = lines
                built.expected[rid] = (pb.HELD, response.sequence)

            for i in range(240):
                rid = f"r{i}"
                lines = {CORRUPTION_SKUS[i % 5]: 1}
                if i % 4 == 0:
                    lines[CORRUPTION_SKUS[(i + 1) % 5]] = 2
                await reserve(rid, lines)
                for every, call, request in ((3, stub.Commit, pb.CommitRequest),
                                             (7, stub.Release, pb.ReleaseRequest)):
                    if i % every == 0:
                        response = await call(request(reservation_id=rid))
                        built.expected[rid] = (response.state, response.sequence)
            if "--snapshot-records-interval" in extra_args:
                assert await asyncio.to_thread(wait_for, lambda: daemon.logged("snapshot"))
            await reserve("last", {CORRUPTION_SKUS[0]: 1})

    daemon.start()
    try:
        asyncio.run(operations())
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
    finally:
        daemon.kill()
    built.snapshots = daemon.logged("snapshot")
    return built


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Pristine]:
    base = tmp_path_factory.mktemp("pristine")
    return {
        "log": _build(base / "log"),
        "snapshot": _build(base / "snapshot", "--snapshot-records-interval", "100"),
    }


def _copy(built: Pristine, directory: Path) -> Path:
    shutil.copytree(built.directory, directory, ignore=shutil.ignore_patterns("LOCK"))
    return directory


def _serve_refused(directory: Path) -> subprocess.CompletedProcess:
    """`reservd serve` on a damaged directory: it must exit by itself (not serve)."""
    return subprocess.run(
        [sys.executable, "-m", "reservd", "serve", "--bind", "127.0.0.1:0",
         "--data-dir", str(directory)],
        capture_output=True, text=True, timeout=20,
    )


def _contents(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())
            if path.name != "LOCK"}


def _dumped_records(stdout: str) -> list[list[str]]:
    return [line.split("\t") for line in stdout.splitlines() if line and line[0] != "#"]


def _check_refusal(directory: Path, path: Path, offset: int, reason: str) -> str:
    """serve exits non-zero and verify exits 1, both naming ``path: offset N``; nothing on disk
    is changed by either. Returns dump's output."""
    before = _contents(directory)
    where = f"{path}: offset {offset}: {reason}"
    served = _serve_refused(directory)
    assert served.returncode != 0, served.stderr[-2000:]
    assert where in served.stderr, served.stderr[-2000:]
    assert not any('"msg": "serving"' in line for line in served.stderr.splitlines())
    verified = reservd_cli("wal", "verify", str(directory))
    assert verified.returncode == 1, verified
    assert f"ERROR {where}" in verified.stdout, verified.stdout
    dumped = reservd_cli("wal", "dump", str(directory))
    assert dumped.returncode == 0, dumped.stderr
    assert _contents(directory) == before, "a refused start-up must not modify the directory"
    return dumped.stdout


def test_a_flipped_byte_mid_log_stops_start_up_naming_file_and_offset(pristine, tmp_path):
    data = _copy(pristine["log"], tmp_path / "data")
    all_segments = segments(data)
    assert len(all_segments) >= 3, all_segments
    segment = all_segments[len(all_segments) // 2]
    segment_frames = frames(segment)
    offset, frame_bytes, seq = segment_frames[len(segment_frames) // 2]
    _flip_byte(segment, offset + frame_bytes // 2)

    dumped = _check_refusal(data, segment, offset, "checksum mismatch")
    records = _dumped_records(dumped)
    total = sum(len(frames(path)) for path in all_segments)
    assert len(records) == total - 1  # every record but the damaged one, for forensics
    assert seq not in {int(record[0]) for record in records}
    assert f"# bad frame in {segment.name} at offset {offset}: checksum mismatch" in dumped


def test_a_corrupt_snapshot_stops_start_up_naming_file_and_offset(pristine, tmp_path):
    built = pristine["snapshot"]
    assert built.snapshots, "the daemon took no snapshot"
    data = _copy(built, tmp_path / "data")
    snapshot = sorted(data.glob("snap-*.snap"))[-1]
    _flip_byte(snapshot, SNAPSHOT_HEAD_BYTES + (snapshot.stat().st_size - SNAPSHOT_HEAD_BYTES) // 2)

    dumped = _check_refusal(data, snapshot, SNAPSHOT_HEAD_BYTES, "snapshot checksum mismatch")
    assert f"# snapshot {snapshot.name} CORRUPT: {snapshot}: offset {SNAPSHOT_HEAD_BYTES}" in dumped
    assert _dumped_records(dumped)


def test_a_torn_tail_is_trimmed_at_start_up_and_logged_with_its_offset(pristine, tmp_path):
    built = pristine["log"]
    data = _copy(built, tmp_path / "data")
    last_segment = segments(data)[-1]
    offset, frame_bytes, seq = frames(last_segment)[-1]
    assert seq == built.expected["last"][1]  # the tail frame is the reserve of "last"
    cut = offset + frame_bytes // 2
    os.truncate(last_segment, cut)

    verified = reservd_cli("wal", "verify", str(data))
    assert verified.returncode == 0, verified.stdout
    assert f"torn tail (recovery trims it): {last_segment}: offset {offset}" in verified.stdout
    daemon = DaemonProcess("--data-dir", str(data)).start()
    try:
        trims = [line for line in daemon.lines
                 if line.get("msg", "").startswith("trimmed the torn tail")]
        assert len(trims) == 1 and trims[0]["level"] == "warning", daemon.lines
        assert f"{last_segment} at offset {offset} ({cut - offset} bytes" in trims[0]["msg"]
        assert (data / f"{last_segment.name}.broken-{offset}").stat().st_size == cut - offset
        assert last_segment.stat().st_size == offset

        async def check() -> None:
            async with grpc.aio.insecure_channel(daemon.target) as channel:
                stub = pb_grpc.ReservationsStub(channel)
                found = await _states(stub, built.expected)
                assert found.pop("last") is None  # the torn record, and nothing else, is gone
                held = dict.fromkeys(CORRUPTION_SKUS, 0)
                committed = dict.fromkeys(CORRUPTION_SKUS, 0)
                for rid, response in found.items():
                    assert response is not None, f"acknowledged reservation {rid} was lost"
                    assert (response.state, response.sequence) == built.expected[rid], rid
                    target = {pb.HELD: held, pb.COMMITTED: committed}.get(response.state)
                    for sku, quantity in built.lines[rid].items():
                        if target is not None:
                            target[sku] += quantity
                stock = await stub.GetStock(pb.GetStockRequest(skus=CORRUPTION_SKUS))
                for counters in stock.stock:
                    assert (counters.on_hand, counters.reserved, counters.committed) == (
                        CORRUPTION_ON_HAND, held[counters.sku], committed[counters.sku])
                    assert counters.available >= 0
                # The log goes on from the trimmed point.
                again = await stub.Reserve(cart("last", (CORRUPTION_SKUS[0], 1),
                                                ttl_seconds=3600))
                assert again.granted and not again.replayed and again.sequence == seq

        asyncio.run(check())
    finally:
        daemon.kill()


# -- 5. WatchStock resume points survive restarts ---------------------------------------------

WATCH_SKUS = ["w-a", "w-b", "w-c"]


def _update(update: pb.StockUpdate) -> tuple:
    return (update.sku, update.on_hand, update.reserved, update.committed, update.available,
            update.sequence, update.snapshot)


class Watcher:
    """A WatchStock stream on its own channel, read with bounded waits."""

    def __init__(self, target: str, from_sequence: int) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.call = pb_grpc.ReservationsStub(self.channel).WatchStock(
            pb.WatchStockRequest(skus=WATCH_SKUS, from_sequence=from_sequence)
        )
        self.seen: list[tuple] = []

    async def read(self, count: int) -> list[tuple]:
        got = []
        for _ in range(count):
            update = await asyncio.wait_for(self.call.read(), 60)
            assert update is not grpc.aio.EOF
            got.append(_update(update))
        self.seen += got
        return got

    async def read_through(self, sequence: int) -> list[tuple]:
        """Everything up to and including every update of ``sequence``."""
        got = []
        while not got or got[-1][5] < sequence:
            got += await self.read(1)
        while True:  # the other SKUs of that mutation, if any
            try:
                update = await asyncio.wait_for(self.call.read(), 0.2)
            except asyncio.TimeoutError:
                break
            got.append(_update(update))
            self.seen.append(got[-1])
            assert got[-1][5] == sequence, got[-1]
        return got

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


async def _mutate(target: str, prefix: str, count: int, rng: random.Random) -> int:
    """``count`` mutations of the watched SKUs (single and multi-line reserves, commits,
    releases); returns the last sequence."""
    last = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ReservationsStub(channel)
        held: list[str] = []
        for i in range(count):
            if held and rng.random() < 0.4:
                rid = held.pop(rng.randrange(len(held)))
                call, request = rng.choice(((stub.Commit, pb.CommitRequest),
                                            (stub.Release, pb.ReleaseRequest)))
                last = (await call(request(reservation_id=rid))).sequence
                continue
            rid = f"{prefix}-{i}"
            skus = rng.sample(WATCH_SKUS, rng.randint(1, 2))
            response = await stub.Reserve(cart(rid, *((sku, 1) for sku in skus),
                                               ttl_seconds=3600))
            assert response.granted
            held.append(rid)
            last = response.sequence
    return last


async def _stock_now(target: str) -> dict[str, tuple]:
    async with grpc.aio.insecure_channel(target) as channel:
        stock = (await pb_grpc.ReservationsStub(channel).GetStock(
            pb.GetStockRequest(skus=WATCH_SKUS))).stock
    return {s.sku: (s.on_hand, s.reserved, s.committed, s.available) for s in stock}


def test_watch_resumes_across_restarts_from_the_log_or_a_snapshot(tmp_path):
    rng = random.Random(77)
    data = tmp_path / "data"
    args = ("--data-dir", str(data), "--snapshot-records-interval", "40")
    daemon = DaemonProcess(*args)
    probes = itertools.count()

    async def first_life() -> tuple[list[tuple], int]:
        async with grpc.aio.insecure_channel(daemon.target) as channel:
            admin = pb_grpc.AdminStub(channel)
            for sku in WATCH_SKUS:
                await admin.SetStock(pb.SetStockRequest(sku=sku, on_hand=1_000,
                                                        adjustment_id=f"init-{sku}"))
        continuous = Watcher(daemon.target, 0)
        initial = await continuous.read(len(WATCH_SKUS))
        assert all(update[6] for update in initial)  # from 0: the current state first
        last = await _mutate(daemon.target, "one", 30, rng)  # fewer than a snapshot's worth
        await continuous.read_through(last)
        await continuous.close()
        return continuous.seen[len(WATCH_SKUS):], last

    async def resumed(target: str, from_sequence: int, count: int) -> list[tuple]:
        watcher = Watcher(target, from_sequence)
        try:
            got = await watcher.read(count)
            # Then exactly the next change, nothing replayed twice or skipped.
            last = await _mutate(target, f"probe-{next(probes)}", 1, rng)
            probe = await watcher.read(1)
            assert probe[0][5] == last and not probe[0][6], (probe, last)
            return got
        finally:
            await watcher.close()

    try:
        daemon.start()
        changes, last_one = asyncio.run(first_life())
        assert not daemon.logged("snapshot")
        assert not any(update[6] for update in changes)
        sequences = sorted({update[5] for update in changes})
        resume_at = sequences[len(sequences) // 2]  # a watcher read up to here and remembered it
        after = [update for update in changes if update[5] > resume_at]

        # SIGKILL; the resumed watcher gets exactly what the continuous one saw after its point.
        daemon.signal(signal.SIGKILL)
        daemon.wait()
        daemon.start()
        assert asyncio.run(resumed(daemon.target, resume_at, len(after))) == after

        # Enough changes for a snapshot and a few after it, then SIGTERM and a restart.
        async def second_life() -> list[tuple]:
            watcher = Watcher(daemon.target, last_one + 1)  # after the probe above
            await _mutate(daemon.target, "two", 60, rng)
            assert await asyncio.to_thread(wait_for, lambda: daemon.logged("snapshot"))
            last = await _mutate(daemon.target, "three", 12, rng)
            await watcher.read_through(last)
            await watcher.close()
            return watcher.seen

        changes_two = asyncio.run(second_life())
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
        snapshot_seq = max(int(path.name[5:25]) for path in data.glob("snap-*.snap"))
        assert snapshot_seq > resume_at
        daemon.start()

        # A resume point still in the log (at or after the snapshot): the exact changes again.
        after_snapshot = [update for update in changes_two if update[5] > snapshot_seq]
        assert after_snapshot, (snapshot_seq, changes_two[-1])
        assert asyncio.run(resumed(daemon.target, snapshot_seq, len(after_snapshot))) == (
            after_snapshot)

        # A resume point older than the snapshot: the current state first, marked snapshot.
        async def from_before_snapshot() -> tuple[list[tuple], dict]:
            now = await _stock_now(daemon.target)
            return await resumed(daemon.target, resume_at, len(WATCH_SKUS)), now

        state, now = asyncio.run(from_before_snapshot())
        current_seq = changes_two[-1][5] + 1  # the probe of the previous resume
        assert sorted(state) == sorted(
            (sku, *now[sku], current_seq, True) for sku in WATCH_SKUS
        ), (state, now, current_seq)
        print(f"watch: resumed at seq {resume_at} after SIGKILL ({len(after)} changes), at "
              f"snapshot seq {snapshot_seq} ({len(after_snapshot)} changes), and from before "
              "the snapshot (current state)")
    finally:
        daemon.kill()


@aio
async def test_an_idle_watcher_survives_another_watcher_going_away():
    """Regression: idle watchers once shared one wake-up future; a client that disconnected
    cancelled it, and every other idle watcher's stream then hung without a word. (Each watcher
    now waits on its own; the check stays.)"""
    async with running() as server:
        await server.set_stock("a", 100)
        seq = (await server.reservations.Reserve(cart("r1", ("a", 1)))).sequence
        request = pb.WatchStockRequest(skus=["a"], from_sequence=seq - 1)
        staying = server.reservations.WatchStock(request)
        leaving = server.reservations.WatchStock(request)
        hub = server.daemon.hub
        # Both streams are served (each got r1's change); then they wait at the ring's head,
        # attached to the hub's fan-out.
        for call in (staying, leaving):
            assert (await call.read()).sequence == seq
        await eventually(lambda: len(hub) == 2 and hub.detached == 0, "both watchers idle")
        leaving.cancel()
        await eventually(lambda: len(hub) == 1, "the server noticed the cancel")
        later = await server.reservations.Reserve(cart("r2", ("a", 1)))
        update = await asyncio.wait_for(staying.read(), 60)  # a hang guard, not a latency bound
        assert (update.sequence, update.reserved, update.snapshot) == (later.sequence, 2, False)
        staying.cancel()
