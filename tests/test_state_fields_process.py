"""Every stock state in WatchStock and the Redis mirror across kill -9: a real ``reservd serve``
process mirroring to a real redis-server runs the state commands, is killed (-9) and restarted
on the same data directory (the log replayed, or a snapshot restored and the log after it): the
hash and a resuming watcher show the same states at the same sequences as before the kill."""
from __future__ import annotations

import asyncio
import signal
from types import SimpleNamespace

import grpc
import pytest
import redis.asyncio as aioredis
from conftest import aio
from daemonproc import DaemonProcess
from redisserver import RedisServer, free_port, require_redis_server
from test_mirror_crash import _mirror_caught_up
from test_state_fields import PREFIX, STATES, _flow, _states

from reservd.v1 import reservd_pb2 as pb
from reservd.v1 import reservd_pb2_grpc as pb_grpc

pytestmark = pytest.mark.redis


async def _watched(reservations, start: int, last: int) -> list[tuple[int, bool, tuple]]:
    """(sequence, snapshot, states) of every update of "hat" from ``start`` up to ``last``."""
    stream = reservations.WatchStock(pb.WatchStockRequest(skus=["hat"], from_sequence=start))
    seen = []
    async for update in stream:
        seen.append((update.sequence, update.snapshot, _states(update)))
        if update.sequence >= last:
            break
    stream.cancel()
    return seen


async def _observe(target: str, metrics_port: int, client, start: int, last: int):
    """The hash's (seq, states) once the mirror has everything, and the watched updates."""
    await _mirror_caught_up(metrics_port, last)
    async with grpc.aio.insecure_channel(target) as channel:
        watched = await asyncio.wait_for(
            _watched(pb_grpc.ReservationsStub(channel), start, last), 10
        )
    stored = await client.hgetall(PREFIX + "stock:hat")
    return (int(stored[b"seq"]), tuple(int(stored[name.encode()]) for name in STATES)), watched


@pytest.mark.parametrize("snapshot_records_interval", [1_000_000, 3])
@aio
async def test_states_survive_kill_9(tmp_path, snapshot_records_interval):
    require_redis_server()
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    metrics_port = free_port()
    daemon = DaemonProcess(
        "--data-dir", str(tmp_path / "data"), "--redis-url", redis.url,
        "--metrics-port", str(metrics_port),
        "--snapshot-records-interval", str(snapshot_records_interval),
    )
    client = aioredis.Redis(port=redis.port)
    try:
        daemon.start()
        async with grpc.aio.insecure_channel(daemon.target) as channel:
            server = SimpleNamespace(
                admin=pb_grpc.AdminStub(channel),
                reservations=pb_grpc.ReservationsStub(channel),
            )
            start = (await server.admin.SetStock(pb.SetStockRequest(
                sku="hat", on_hand=10, adjustment_id="set-hat"))).sequence
            steps = await _flow(server)
        last, final = steps[-1]
        hash_before, watched_before = await _observe(
            daemon.target, metrics_port, client, start, last)
        assert hash_before == (last, final)
        assert [(seq, states) for seq, _, states in watched_before] == steps

        daemon.signal(signal.SIGKILL)
        daemon.wait()
        await client.delete(PREFIX + "stock:hat")  # what the hash shows now, the new daemon wrote
        daemon.start()
        hash_after, watched_after = await _observe(
            daemon.target, metrics_port, client, start, last)
        assert hash_after == hash_before
        at_sequence = dict(steps)
        # Replayed, the ring has every step again; restored from a snapshot, the watcher
        # starts from the current state (marked snapshot), then the ring after it.
        for seq, snapshot, states in watched_after:
            assert states == (final if snapshot else at_sequence[seq]), watched_after
        if snapshot_records_interval == 1_000_000:
            assert watched_after == watched_before
    finally:
        daemon.kill()
        await client.aclose()
        redis.close()
