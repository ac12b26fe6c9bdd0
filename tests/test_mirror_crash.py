"""The mirror's safe direction across a crash: after kill -9, Redis never shows more available
than the recovered log has.

A real ``reservd serve`` process (WAL on) mirrors to a real redis-server. The test closes the
WAL's gate (tests/gated_serve.py: log writes wait, as on a disk that stopped taking them), then
sends changes that raise availability (a release, a restock, a commit of fewer units) and a
grant that follows a release of the same SKU in the same batch. None of them can become
durable, but the daemon applies them and the mirror runs. Once the mirror has caught up with
the applied sequence, the daemon is killed (-9), Redis is read, and a fresh daemon recovers the
data directory: per SKU, Redis's ``available`` is at most the recovered one.
"""
from __future__ import annotations

import asyncio
import signal
import sys

import grpc
import pytest
import redis.asyncio as aioredis
from conftest import ROOT, aio, cart
from daemonproc import DaemonProcess
from redisserver import RedisServer, free_port, require_redis_server

from reservd.config import Config
from reservd.metrics import scrape
from reservd.v1 import reservd_pb2 as pb
from reservd.v1 import reservd_pb2_grpc as pb_grpc

pytestmark = pytest.mark.redis

PREFIX = Config().redis_prefix
CATCH_UP_SECONDS_MAX = 10.0


async def _mirror_caught_up(metrics_port: int, seq: int) -> None:
    """Until the daemon's mirror has handled every change up to ``seq`` (its metric)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CATCH_UP_SECONDS_MAX
    while True:
        values = await asyncio.to_thread(scrape, metrics_port)
        if values["reservd_sequence"] >= seq and values["reservd_mirror_sequence"] >= seq:
            return
        assert loop.time() < deadline, values
        await asyncio.sleep(0.01)


async def _redis_available(client: aioredis.Redis, skus) -> dict[str, int]:
    shown = {}
    for sku in skus:
        stored = await client.hgetall(PREFIX + "stock:" + sku)
        shown[sku] = int(stored[b"available"]) if stored else 0  # no key: nothing shown
    return shown


@aio
async def test_kill_9_with_changes_not_durable_redis_never_shows_more_than_recovery(tmp_path):
    require_redis_server()
    server = RedisServer(tmp_path / "redis")
    server.start()
    gate = tmp_path / "gate"
    metrics_port = free_port()
    daemon = DaemonProcess(
        "--data-dir", str(tmp_path / "data"), "--redis-url", server.url,
        "--metrics-port", str(metrics_port),
        wrapper=[sys.executable, str(ROOT / "tests" / "gated_serve.py"), str(gate)],
    )
    direct = aioredis.Redis(port=server.port)
    pending: list[asyncio.Task] = []
    try:
        daemon.start()
        channel = grpc.aio.insecure_channel(daemon.target)
        reservations = pb_grpc.ReservationsStub(channel)
        admin = pb_grpc.AdminStub(channel)
        for sku in ("release", "restock", "commit", "mixed"):
            await admin.SetStock(pb.SetStockRequest(sku=sku, on_hand=10, adjustment_id=sku))
        for sku in ("release", "commit", "mixed"):
            assert (await reservations.Reserve(cart(f"held-{sku}", (sku, 5)))).granted
        last = await reservations.Reserve(cart("held-restock", ("restock", 2)))
        seq = last.sequence

        gate.touch()  # from here on nothing reaches the disk
        calls = [
            reservations.Release(pb.ReleaseRequest(reservation_id="held-release")),
            admin.AdjustStock(
                pb.AdjustStockRequest(sku="restock", delta=20, adjustment_id="more")
            ),
            reservations.Commit(pb.CommitRequest(
                reservation_id="held-commit", lines=[pb.Line(sku="commit", quantity=1)]
            )),
            # One batch, one SKU: a release (+5), then a grant (-1) carrying it in its values.
            reservations.Release(pb.ReleaseRequest(reservation_id="held-mixed")),
            reservations.Reserve(cart("after-release", ("mixed", 1))),
        ]
        for call in calls:
            pending.append(asyncio.ensure_future(call))
            await asyncio.sleep(0)  # in this order
        await _mirror_caught_up(metrics_port, seq + len(calls))
        # The grant is held (Redis shows no more than the table after it: 4 or 9, depending
        # on which call the daemon took first), the release is not shown (10).
        shown_before_kill = await _redis_available(direct, ["mixed"])
        assert shown_before_kill["mixed"] <= 5, shown_before_kill

        daemon.signal(signal.SIGKILL)
        daemon.wait()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await channel.close()
        shown = await _redis_available(direct, ("release", "restock", "commit", "mixed"))

        gate.unlink()
        recovered_daemon = DaemonProcess("--data-dir", str(tmp_path / "data")).start()
        try:
            async with grpc.aio.insecure_channel(recovered_daemon.target) as again:
                stock = await pb_grpc.ReservationsStub(again).GetStock(
                    pb.GetStockRequest(skus=list(shown))
                )
        finally:
            recovered_daemon.signal(signal.SIGTERM)
            recovered_daemon.wait()
        recovered = {line.sku: line.available for line in stock.stock}
        # None of the gated changes is durable: recovery has the state before them.
        assert recovered == {"release": 5, "restock": 8, "commit": 5, "mixed": 5}, recovered
        for sku, available in shown.items():
            assert available <= recovered[sku], (
                f"after kill -9 Redis shows {available} available of {sku!r}, recovery has "
                f"{recovered[sku]}: {shown} vs {recovered}"
            )
    finally:
        daemon.kill()
        gate.unlink(missing_ok=True)
        await direct.aclose()
        server.close()


def _channel_fields(stored: dict[bytes, bytes]) -> dict[str, int]:
    return {
        key.decode(): int(value) for key, value in stored.items()
        if key.decode().split(":")[0] in ("ats", "level", "free")
    }


@aio
async def test_kill_9_with_channel_changes_not_durable_redis_never_shows_more_than_recovery(
    tmp_path,
):
    """The same with channels: releases into a pool, an allocation out of a reserve, policy
    changes that raise a channel's ats and a release that lowers a SKU's level are applied,
    mirrored (in the safe direction only) and lost by kill -9: Redis shows no ats and no
    bucket's free units above what recovery has, and no level below."""
    require_redis_server()
    server = RedisServer(tmp_path / "redis")
    server.start()
    gate = tmp_path / "gate"
    metrics_port = free_port()
    daemon = DaemonProcess(
        "--data-dir", str(tmp_path / "data"), "--redis-url", server.url,
        "--metrics-port", str(metrics_port),
        wrapper=[sys.executable, str(ROOT / "tests" / "gated_serve.py"), str(gate)],
    )
    direct = aioredis.Redis(port=server.port)
    pending: list[asyncio.Task] = []
    skus = ("hero", "plain")
    channels = ("amazon", "ebay", "tiktok")
    try:
        daemon.start()
        channel = grpc.aio.insecure_channel(daemon.target)
        reservations = pb_grpc.ReservationsStub(channel)
        admin = pb_grpc.AdminStub(channel)
        for sku, units in (("hero", 100), ("plain", 30)):
            await admin.SetStock(pb.SetStockRequest(sku=sku, on_hand=units, adjustment_id=sku))
        for name, policy in (("amazon", pb.ChannelPolicy(share_bp=9000)),
                             ("ebay", pb.ChannelPolicy(share_bp=9000, max_units=50)),
                             ("tiktok", pb.ChannelPolicy(pool="tiktok"))):
            await admin.SetChannel(pb.SetChannelRequest(
                channel=name, policy=policy, change_id=f"set-{name}"))
        for bucket, units in (("tiktok", 40), ("spike", 10)):
            await admin.Allocate(pb.AllocateRequest(
                sku="hero", from_bucket="shared", to_bucket=bucket, units=units,
                change_id=f"to-{bucket}"))
        assert (await reservations.Reserve(
            cart("pooled", ("hero", 5), channel="tiktok"))).granted
        assert (await reservations.Reserve(
            cart("plain-held", ("plain", 20), channel="amazon"))).granted
        last = await reservations.Reserve(cart("hero-held", ("hero", 10), channel="amazon"))
        seq = last.sequence

        gate.touch()  # from here on nothing reaches the disk
        calls = [
            reservations.Release(pb.ReleaseRequest(reservation_id="pooled")),  # tiktok +5
            admin.Allocate(pb.AllocateRequest(  # amazon's and ebay's ats +
                sku="hero", from_bucket="spike", to_bucket="shared", units=10,
                change_id="from-spike")),
            admin.SetChannel(pb.SetChannelRequest(  # ebay's cap and share up
                channel="ebay", policy=pb.ChannelPolicy(share_bp=10000, max_units=80),
                change_id="ebay-up")),
            admin.SetSkuPolicy(pb.SetSkuPolicyRequest(  # amazon's share of hero up
                sku="hero", channel="amazon", overrides=pb.ChannelPolicy(share_bp=10000),
                change_id="hero-amazon-up")),
            reservations.Release(pb.ReleaseRequest(reservation_id="plain-held")),  # level down
            reservations.Reserve(cart("late", ("hero", 3), channel="amazon")),  # a grant after
        ]
        for call in calls:
            pending.append(asyncio.ensure_future(call))
            await asyncio.sleep(0)  # in this order
        await _mirror_caught_up(metrics_port, seq + len(calls))

        daemon.signal(signal.SIGKILL)
        daemon.wait()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await channel.close()
        shown = {sku: _channel_fields(await direct.hgetall(PREFIX + "stock:" + sku))
                 for sku in skus}

        gate.unlink()
        recovered_daemon = DaemonProcess("--data-dir", str(tmp_path / "data")).start()
        try:
            async with grpc.aio.insecure_channel(recovered_daemon.target) as again:
                ats = await pb_grpc.ReservationsStub(again).GetAts(
                    pb.GetAtsRequest(skus=list(skus), channels=list(channels)))
                buckets = await pb_grpc.AdminStub(again).GetBuckets(
                    pb.GetBucketsRequest(skus=list(skus)))
        finally:
            recovered_daemon.signal(signal.SIGTERM)
            recovered_daemon.wait()
        recovered: dict[str, dict[str, int]] = {sku: {} for sku in skus}
        for value in ats.ats:
            recovered[value.sku]["ats:" + value.channel] = value.ats
            recovered[value.sku]["level:" + value.channel] = value.level
            recovered[value.sku]["level"] = max(
                recovered[value.sku].get("level", 0), value.level)
        for row in buckets.skus:
            for bucket in row.buckets:
                recovered[row.sku]["free:" + bucket.bucket] = bucket.free
        # None of the gated changes is durable: recovery has the state before them.
        assert recovered["hero"]["ats:tiktok"] == 35 + 40, recovered  # pool 35 + shared 40
        assert recovered["hero"]["free:spike"] == 10 and recovered["plain"]["level"] == 2
        for sku in skus:
            assert set(shown[sku]) == set(recovered[sku]), (shown, recovered)
            for name, value in shown[sku].items():
                truth = recovered[sku][name]
                if name.startswith("level"):
                    assert value >= truth, (sku, name, shown, recovered)
                else:
                    assert value <= truth, (
                        f"after kill -9 Redis shows {name} {value} of {sku!r}, recovery has "
                        f"{truth}: {shown} vs {recovered}"
                    )
    finally:
        daemon.kill()
        gate.unlink(missing_ok=True)
        await direct.aclose()
        server.close()
