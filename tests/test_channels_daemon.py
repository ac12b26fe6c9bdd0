"""Channels, buckets and ats through a real daemon: the seeds' examples, strict enforcement,
restarts, and races over the last units."""
from __future__ import annotations

import asyncio
import random

import grpc
import pytest
from conftest import aio, cart, running, test_config

from reservd import records, wal
from reservd.clock import SystemClock
from reservd.config import Config
from reservd.ledger import Ledger
from reservd.memlog import MemoryLog
from reservd.records import RecordType
from reservd.table import Table
from reservd.v1 import reservd_pb2 as pb
from reservd.v1 import reservd_pb2_grpc as pb_grpc

_changes = iter(range(1, 1 << 30))


def _id(prefix: str) -> str:
    return f"{prefix}-{next(_changes)}"


async def _channel(server, name: str, **policy) -> pb.ChannelResponse:
    return await server.admin.SetChannel(pb.SetChannelRequest(
        channel=name, policy=pb.ChannelPolicy(**policy), change_id=_id("channel")
    ))


async def _allocate(server, sku: str, source: str, target: str, units: int):
    return await server.admin.Allocate(pb.AllocateRequest(
        sku=sku, from_bucket=source, to_bucket=target, units=units, change_id=_id("allocate")
    ))


async def _buckets(server, sku: str) -> dict[str, tuple[int, int, int]]:
    response = await server.admin.GetBuckets(pb.GetBucketsRequest(skus=[sku]))
    return {b.bucket: (b.free, b.reserved, b.committed) for b in response.skus[0].buckets}


async def _ats(server, sku: str, *channels: str) -> dict[str, tuple[int, int]]:
    response = await server.reservations.GetAts(
        pb.GetAtsRequest(skus=[sku], channels=list(channels))
    )
    return {a.channel: (a.ats, a.level) for a in response.ats}


async def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), caught.value.details()


async def _tiktok_setup(server, sku: str = "hero") -> None:
    """Seed 000: 1,000 units -> TikTok 800 (FBT 300 + self-fulfilled 500), buffer 200."""
    await server.set_stock(sku, 1000)
    await _channel(server, "tiktok", pool="tiktok")
    await _channel(server, "tiktok-fbt", pool="tiktok-fbt", pool_only=True)
    await _channel(server, "seeding", reserve="seeding", pool_only=True)
    await _channel(server, "amazon", share_bp=9000)
    for bucket, units in [("tiktok-fbt", 300), ("tiktok", 500), ("returns", 100),
                          ("seeding", 30), ("lost-parcel", 20), ("spike", 50)]:
        await _allocate(server, sku, "shared", bucket, units)


@aio
async def test_tiktok_allocation_and_spike_release():
    async with running() as server:
        await _tiktok_setup(server)
        assert await _buckets(server, "hero") == {
            "shared": (0, 0, 0), "lost-parcel": (20, 0, 0), "returns": (100, 0, 0),
            "seeding": (30, 0, 0), "spike": (50, 0, 0), "tiktok": (500, 0, 0),
            "tiktok-fbt": (300, 0, 0),
        }
        channels = ("tiktok", "tiktok-fbt", "seeding", "amazon")
        before = await _ats(server, "hero", *channels)
        assert before == {"tiktok": (500, 0), "tiktok-fbt": (300, 0), "seeding": (30, 0),
                          "amazon": (0, 0)}
        # Too few free units in the source: refused, nothing changes.
        code, details = await _code(_allocate(server, "hero", "spike", "tiktok", 51))
        assert code is grpc.StatusCode.FAILED_PRECONDITION and "from_bucket" in details
        # A viral spike: the 50 spike units go to TikTok.
        await _allocate(server, "hero", "spike", "tiktok", 50)
        after = await _ats(server, "hero", *channels)
        assert after == {**before, "tiktok": (550, 0)}
        # Amazon has nothing to draw: shared is empty; the seeding channel only its reserve.
        response = await server.reservations.Reserve(cart("a1", ("hero", 1), channel="amazon"))
        assert not response.granted
        response = await server.reservations.Reserve(cart("s1", ("hero", 31), channel="seeding"))
        assert not response.granted
        response = await server.reservations.Reserve(cart("s2", ("hero", 30), channel="seeding"))
        assert response.granted
        assert [(b.bucket, b.units) for b in response.lines[0].buckets] == [("seeding", 30)]
        assert response.lines[0].available == 970 and response.lines[0].ats == 0
        # TikTok draws its pool; release gives the units back to the same bucket.
        response = await server.reservations.Reserve(cart("t1", ("hero", 60), channel="tiktok"))
        assert [(b.bucket, b.units) for b in response.lines[0].buckets] == [("tiktok", 60)]
        assert response.lines[0].ats == 490
        assert (await _buckets(server, "hero"))["tiktok"] == (490, 60, 0)
        await server.reservations.Release(pb.ReleaseRequest(reservation_id="t1"))
        assert (await _buckets(server, "hero"))["tiktok"] == (550, 0, 0)
        # Commit and fulfil consume the units in their bucket.
        await server.reservations.Reserve(cart("t2", ("hero", 10), channel="tiktok-fbt"))
        await server.reservations.Commit(pb.CommitRequest(reservation_id="t2"))
        assert (await _buckets(server, "hero"))["tiktok-fbt"] == (290, 0, 10)
        await server.reservations.Fulfil(pb.FulfilRequest(reservation_id="t2"))
        buckets = await _buckets(server, "hero")
        assert buckets["tiktok-fbt"] == (290, 0, 0)
        assert sum(free for free, _, _ in buckets.values()) == (await server.stock("hero")).available


@aio
async def test_four_channel_split_of_seed_000():
    async with running() as server:
        await server.set_stock("sku", 1000)
        split = {"amazon": 320, "shopify": 250, "tiktok": 200, "ebay": 100}
        for name, units in split.items():
            await _channel(server, name, pool=name, pool_only=True)
            await _allocate(server, "sku", "shared", name, units)
        await _allocate(server, "sku", "shared", "buffer", 130)
        assert await _ats(server, "sku", *split) == {name: (u, 0) for name, u in split.items()}
        assert (await _buckets(server, "sku"))["shared"] == (0, 0, 0)
        response = await server.reservations.Reserve(cart("a", ("sku", 321), channel="amazon"))
        assert not response.granted
        response = await server.reservations.Reserve(cart("b", ("sku", 320), channel="amazon"))
        assert response.granted and response.lines[0].ats == 0
        assert await _ats(server, "sku", *split) == {
            **{name: (u, 0) for name, u in split.items()}, "amazon": (0, 0)
        }


@aio
async def test_amazon_90_walmart_85_of_100_units_and_seven_units():
    async with running() as server:
        await server.set_stock("sku", 100)
        await _channel(server, "amazon", share_bp=9000)
        await _channel(server, "walmart", share_bp=8500)
        await _channel(server, "shopify")
        assert await _ats(server, "sku", "amazon", "walmart", "shopify") == {
            "amazon": (90, 0), "walmart": (85, 0), "shopify": (100, 0)
        }
        await server.set_stock("sku", 7)
        # Share first (6), then the level-2 hold (7 - 3 = 4).
        assert await _ats(server, "sku", "amazon") == {"amazon": (4, 2)}
        # Without triggers for this SKU, 90 % of 7 rounds down to 6.
        await server.admin.SetSkuPolicy(pb.SetSkuPolicyRequest(
            sku="sku", channel="amazon", change_id=_id("override"),
            overrides=pb.ChannelPolicy(warning_units=0, critical_units=0, emergency_units=0),
        ))
        assert await _ats(server, "sku", "amazon") == {"amazon": (6, 0)}
        channels = (await server.admin.ListChannels(pb.ListChannelsRequest())).channels
        assert [c.channel for c in channels] == ["amazon", "shopify", "walmart"]
        assert channels[0].policy.share_bp == 9000 and channels[0].policy.hold_units == 3


@aio
async def test_triggers_20_10_5_0_with_a_hold_of_3():
    async with running() as server:
        await _channel(server, "shopify")
        expected = {25: (25, 0), 20: (20, 1), 11: (11, 1), 10: (7, 2), 6: (3, 2), 5: (2, 3),
                    3: (0, 3), 0: (0, 4)}
        for on_hand, shown in expected.items():
            await server.set_stock("sku", on_hand)
            assert (await _ats(server, "sku", "shopify"))["shopify"] == shown, on_hand
        # A configurable hold.
        await _channel(server, "shopify", hold_units=1)
        await server.admin.SetStock(pb.SetStockRequest(sku="sku", on_hand=10,
                                                       adjustment_id="ten-again"))
        assert (await _ats(server, "sku", "shopify"))["shopify"] == (9, 2)


@aio
async def test_strict_channel_never_beyond_its_ats_display_channel_may():
    async with running() as server:
        await server.set_stock("sku", 100)
        await _channel(server, "ebay", share_bp=9000, max_units=20,
                       enforcement=pb.STRICT)
        await _channel(server, "amazon", share_bp=9000, max_units=20)
        response = await server.reservations.Reserve(cart("e1", ("sku", 21), channel="ebay"))
        assert not response.granted
        response = await server.reservations.Reserve(
            cart("e2", ("sku", 25), channel="ebay", allow_partial=True))
        assert response.granted and response.lines[0].granted == 20
        # Display: the buffer shapes what amazon shows, an order may still draw every unit.
        response = await server.reservations.Reserve(cart("a1", ("sku", 50), channel="amazon"))
        assert response.granted


@aio
async def test_errors_name_the_field_and_change_nothing():
    async with running() as server:
        await server.set_stock("sku", 10)
        cases = [
            (server.admin.SetChannel(pb.SetChannelRequest(
                channel="c", change_id="x", policy=pb.ChannelPolicy(share_bp=10_001))),
             grpc.StatusCode.INVALID_ARGUMENT, "policy.share_bp"),
            (server.admin.SetChannel(pb.SetChannelRequest(
                channel="c", change_id="x", policy=pb.ChannelPolicy(pool="shared"))),
             grpc.StatusCode.INVALID_ARGUMENT, "policy.pool"),
            (server.admin.SetChannel(pb.SetChannelRequest(
                channel="c", change_id="x",
                policy=pb.ChannelPolicy(critical_units=30))),
             grpc.StatusCode.INVALID_ARGUMENT, "policy.critical_units"),
            (server.admin.SetChannel(pb.SetChannelRequest(channel="c", policy=pb.ChannelPolicy())),
             grpc.StatusCode.INVALID_ARGUMENT, "change_id"),
            (_allocate(server, "sku", "shared", "pool", 11),
             grpc.StatusCode.FAILED_PRECONDITION, "from_bucket"),
            (_allocate(server, "nope", "shared", "pool", 1), grpc.StatusCode.NOT_FOUND, "sku"),
            (_allocate(server, "sku", "pool", "pool", 1),
             grpc.StatusCode.INVALID_ARGUMENT, "to_bucket"),
            (server.reservations.GetAts(pb.GetAtsRequest(skus=["sku"], channels=["nope"])),
             grpc.StatusCode.NOT_FOUND, "channels[0]"),
            (server.admin.SetSkuPolicy(pb.SetSkuPolicyRequest(
                sku="sku", channel="nope", change_id="y")),
             grpc.StatusCode.FAILED_PRECONDITION, "channel"),
            (server.admin.GetBuckets(pb.GetBucketsRequest(skus=["sku", "nope"])),
             grpc.StatusCode.NOT_FOUND, "skus[1]"),
        ]
        for call, code, field in cases:
            got, details = await _code(call)
            assert (got, details.split(":")[0]) == (code, field), details
        assert (await server.admin.ListChannels(pb.ListChannelsRequest())).channels == []
        assert await _buckets(server, "sku") == {"shared": (10, 0, 0)}
        # Idempotent by change_id: the same change answers replayed; another payload refused.
        request = pb.AllocateRequest(sku="sku", from_bucket="shared", to_bucket="p", units=4,
                                     change_id="once")
        first = await server.admin.Allocate(request)
        again = await server.admin.Allocate(request)
        assert (again.replayed, again.sequence) == (True, first.sequence)
        assert await _buckets(server, "sku") == {"shared": (6, 0, 0), "p": (4, 0, 0)}
        request.units = 5
        assert (await _code(server.admin.Allocate(request)))[0] is grpc.StatusCode.ALREADY_EXISTS


async def _state(server, sku: str, channels) -> tuple:
    return await _buckets(server, sku), await _ats(server, sku, *channels)


@pytest.mark.parametrize("snapshot_records_interval", [1_000_000, 7])
@aio
async def test_restart_rebuilds_the_same_buckets_and_ats(tmp_path, snapshot_records_interval):
    config = test_config(tmp_path / "data", snapshot_records_interval=snapshot_records_interval)
    channels = ("tiktok", "tiktok-fbt", "seeding", "amazon")
    async with running(config) as server:
        await _tiktok_setup(server)
        await server.admin.SetSkuPolicy(pb.SetSkuPolicyRequest(
            sku="hero", channel="amazon", change_id="o1",
            overrides=pb.ChannelPolicy(enforcement=pb.STRICT, max_units=3)))
        await _allocate(server, "hero", "returns", "shared", 40)
        response = await server.reservations.Reserve(cart("t1", ("hero", 520), channel="tiktok"))
        assert [(b.bucket, b.units) for b in response.lines[0].buckets] == [
            ("tiktok", 500), ("shared", 20)]
        await server.reservations.Reserve(cart("f1", ("hero", 12), channel="tiktok-fbt"))
        await server.reservations.Commit(pb.CommitRequest(
            reservation_id="t1", lines=[pb.Line(sku="hero", quantity=505)]))
        await server.reservations.Release(pb.ReleaseRequest(reservation_id="f1"))
        before = await _state(server, "hero", channels)
        policies = (await server.admin.ListChannels(pb.ListChannelsRequest())).channels
    async with running(config) as server:
        assert await _state(server, "hero", channels) == before
        assert (await server.admin.ListChannels(pb.ListChannelsRequest())).channels == policies
        again = await server.admin.SetSkuPolicy(pb.SetSkuPolicyRequest(
            sku="hero", channel="amazon", change_id="o1",
            overrides=pb.ChannelPolicy(enforcement=pb.STRICT, max_units=3)))
        assert again.replayed
    assert before[0]["tiktok"] == (0, 0, 500) and before[0]["shared"][2] == 5


def replayed(data_dir):
    """(record, ledger before the record) for every record of a stopped daemon's log, through
    a fresh ledger: the state at every sequence."""
    framing, snapshot, log_records = wal.read(data_dir)
    assert framing.ok and snapshot is None
    ledger = Ledger(Table(shards=4, ring_capacity=1024), MemoryLog(), SystemClock(), Config())
    for record in log_records:
        yield record, ledger
        ledger.replay(record.seq, record.type, record.payload)


@aio
async def test_500_buyers_on_four_channels_over_the_last_units(tmp_path):
    """A TikTok pool, a strict capped channel, a pool-only FBT channel and an unconfigured one
    race for the last 40 units: no channel takes units it may not use, the strict channel
    never beyond its ats, oversold == 0 per bucket and in total."""
    async with running(test_config(tmp_path / "data")) as server:
        await server.set_stock("last", 40)
        await _channel(server, "tiktok", pool="tiktok")
        await _channel(server, "tiktok-fbt", pool="fbt", pool_only=True)
        await _channel(server, "ebay", share_bp=5000, max_units=6, enforcement=pb.STRICT)
        await _allocate(server, "last", "shared", "tiktok", 15)
        await _allocate(server, "last", "shared", "fbt", 5)
        await _allocate(server, "last", "shared", "returns", 4)
        channels = ["tiktok", "tiktok-fbt", "ebay", "web"]
        stubs = []
        links = [grpc.aio.insecure_channel(server.target) for _ in range(8)]
        for link in links:
            await link.channel_ready()
            stubs.append(pb_grpc.ReservationsStub(link))
        start = asyncio.Event()
        waiting = 0
        rng = random.Random(7)
        asks = [(channels[i % 4], rng.choice((1, 1, 2))) for i in range(500)]

        async def buyer(i: int):
            nonlocal waiting
            waiting += 1
            if waiting == 500:
                start.set()
            await start.wait()
            channel, quantity = asks[i]
            return await stubs[i % len(stubs)].Reserve(
                cart(f"b{i}", ("last", quantity), channel=channel))

        responses = await asyncio.gather(*(buyer(i) for i in range(500)))
        for link in links:
            await link.close()
        taken: dict[tuple[str, str], int] = {}
        for (channel, _), response in zip(asks, responses):
            if response.granted:
                line = response.lines[0]
                # No bucket listed: every unit came from shared.
                parts = [(p.bucket, p.units) for p in line.buckets] or [("shared", line.granted)]
                assert sum(units for _, units in parts) == line.granted
                for bucket, units in parts:
                    taken[(channel, bucket)] = taken.get((channel, bucket), 0) + units
        allowed = {"tiktok": {"tiktok", "shared"}, "tiktok-fbt": {"fbt"}, "ebay": {"shared"},
                   "web": {"shared"}}
        for channel, bucket in taken:
            assert bucket in allowed[channel], (channel, bucket)
        per_bucket: dict[str, int] = {}
        for (_, bucket), units in taken.items():
            per_bucket[bucket] = per_bucket.get(bucket, 0) + units
        assert per_bucket.get("tiktok", 0) <= 15 and per_bucket.get("fbt", 0) <= 5
        assert per_bucket.get("shared", 0) <= 40 - 15 - 5 - 4
        assert per_bucket.get("returns", 0) == 0
        stock = await server.stock("last")
        total = sum(per_bucket.values())
        assert total == stock.reserved and stock.available >= 0  # oversold == 0 in total
        buckets = await _buckets(server, "last")
        assert all(free >= 0 for free, _, _ in buckets.values())
        assert buckets["returns"] == (4, 0, 0)
        assert sum(free for free, _, _ in buckets.values()) == stock.available
        assert sum(reserved for _, reserved, _ in buckets.values()) == stock.reserved
    # The strict channel never took more than its ats just before each of its grants.
    ebay_grants = 0
    for record, ledger in replayed(tmp_path / "data"):
        if record.type == RecordType.RESERVE:
            command = records.decode(record.type, record.payload)
            if command.channel == "ebay":
                before = ledger.channels.ats_of("last", "ebay")
                assert command.granted[0] <= before.ats, (record.seq, command, before)
                ebay_grants += 1
    assert ebay_grants == sum(1 for (c, _), r in zip(asks, responses) if c == "ebay" and r.granted)


async def _next(stream, count: int) -> list[pb.Ats]:
    out = []
    async for update in stream:
        out.append(update)
        if len(out) == count:
            return out
    raise AssertionError(f"the stream ended after {out}")


@aio
async def test_every_ats_a_watcher_saw_equals_the_state_at_that_sequence(tmp_path):
    data_dir = tmp_path / "data"
    async with running(test_config(data_dir)) as server:
        await _tiktok_setup(server)
        await server.set_stock("other", 30)
        stream = server.reservations.WatchAts(pb.WatchAtsRequest(
            channels=["tiktok", "amazon"], skus=["hero", "other"]))
        first = await _next(stream, 4)
        assert all(u.snapshot and not u.stale for u in first)
        assert {(u.sku, u.channel): u.ats for u in first} == {
            ("hero", "tiktok"): 500, ("hero", "amazon"): 0, ("other", "tiktok"): 30,
            ("other", "amazon"): 27}
        seen = list(first)
        # Each of these moves some ats or level; unwatched SKUs and channels send nothing.
        await server.reservations.Reserve(cart("t1", ("hero", 100), channel="tiktok"))
        seen += await _next(stream, 1)
        await _allocate(server, "hero", "spike", "shared", 50)
        seen += await _next(stream, 2)  # both may now draw 50 more from shared
        await _channel(server, "amazon", share_bp=5000)
        seen += await _next(stream, 2)  # a policy change: fresh ats for every SKU it touches
        await server.set_stock("unwatched", 5)
        await server.admin.SetStock(pb.SetStockRequest(sku="other", on_hand=8,
                                                       adjustment_id="other-8"))
        seen += await _next(stream, 2)  # level 2 on both channels
        await server.reservations.Release(pb.ReleaseRequest(reservation_id="t1"))
        seen += await _next(stream, 1)
        stream.cancel()
        last_seq = server.daemon.ledger.seq
    changes = sorted((u for u in seen if not u.snapshot), key=lambda u: (u.sequence, u.sku, u.channel))
    assert [(u.sku, u.channel, u.ats, u.level) for u in changes] == [
        ("hero", "tiktok", 400, 0), ("hero", "amazon", 45, 0), ("hero", "tiktok", 450, 0),
        ("hero", "amazon", 25, 0), ("other", "amazon", 15, 0),
        ("other", "amazon", 4, 2), ("other", "tiktok", 5, 2),
        ("hero", "tiktok", 550, 0),
    ]
    # The same values, from the log replayed up to each update's sequence.
    by_seq: dict[int, list[pb.Ats]] = {}
    for update in seen:
        by_seq.setdefault(update.sequence, []).append(update)
    checked = 0
    framing, _, log_records = wal.read(data_dir)
    ledger = Ledger(Table(shards=4, ring_capacity=1024), MemoryLog(), SystemClock(), Config())
    for record in log_records:
        ledger.replay(record.seq, record.type, record.payload)
        for update in by_seq.get(record.seq, []):
            value = ledger.channels.ats_of(update.sku, update.channel)
            assert (value.ats, value.level) == (update.ats, update.level), (record.seq, update)
            checked += 1
        if record.seq == last_seq:
            break
    assert checked == len(seen)


@aio
async def test_watch_ats_resumes_and_says_when_it_is_stale():
    async with running() as server:
        await server.set_stock("sku", 100)
        await _channel(server, "shopify")
        stream = server.reservations.WatchAts(pb.WatchAtsRequest(channels=["shopify"]))
        (snapshot,) = await _next(stream, 1)
        assert (snapshot.sku, snapshot.ats, snapshot.snapshot) == ("sku", 100, True)
        await server.reservations.Reserve(cart("r1", ("sku", 10), channel="shopify"))
        (update,) = await _next(stream, 1)
        assert (update.ats, update.snapshot) == (90, False)
        server.daemon.guard.trip("test", "a partition")
        (marker,) = await _next(stream, 1)
        assert (marker.sku, marker.channel, marker.stale) == ("", "shopify", True)
        ats = await server.reservations.GetAts(pb.GetAtsRequest(skus=["sku"],
                                                                channels=["shopify"]))
        assert ats.ats[0].stale
        server.daemon.guard.clear("test")
        (marker,) = await _next(stream, 1)
        assert (marker.sku, marker.stale) == ("", False)
        await server.reservations.Reserve(cart("r2", ("sku", 5), channel="shopify"))
        (update2,) = await _next(stream, 1)
        stream.cancel()
        # Resuming after the first update misses nothing and repeats nothing.
        resumed = server.reservations.WatchAts(pb.WatchAtsRequest(
            channels=["shopify"], from_sequence=update.sequence))
        (again,) = await _next(resumed, 1)
        assert (again.ats, again.sequence, again.snapshot) == (update2.ats, update2.sequence,
                                                               False)
        resumed.cancel()


@aio
async def test_a_slow_ats_watcher_is_coalesced_and_bounded():
    config = test_config(ats_buffer_updates_max=8)
    async with running(config) as server:
        for i in range(20):
            await server.set_stock(f"s{i}", 100)
        await _channel(server, "shopify")
        hub = server.daemon.ats_hub
        watcher = hub.open(frozenset({"shopify"}), frozenset({"s0", "s1"}), 0)
        watcher.needs_snapshot = False  # read only what changes from here on
        for i in range(30):
            await server.reservations.Reserve(cart(f"r{i}", (f"s{i % 2}", 1), channel="shopify"))
        assert len(watcher.buffer) == 2  # one value per pair, the latest
        assert {u.sku: u.ats for u in watcher.buffer.values()} == {"s0": 85, "s1": 85}
        everyone = hub.open(frozenset({"shopify"}), None, 0)
        everyone.needs_snapshot = False
        for i in range(20):
            await server.reservations.Reserve(cart(f"x{i}", (f"s{i}", 1), channel="shopify"))
        # 20 pairs changed, the bound is 8: the buffer is dropped for a fresh snapshot.
        assert everyone.needs_snapshot and not everyone.buffer
        batches = hub.updates_of(everyone)
        snapshot = await batches.__anext__()
        assert len(snapshot) == 8 and all(u.snapshot for u in snapshot)
        await batches.aclose()
        hub.release(watcher)
        hub.release(everyone)


@aio
async def test_batch_reserves_draw_and_answer_like_reserve():
    async with running() as server:
        await server.set_stock("sku", 100)
        await _channel(server, "tiktok", pool="tiktok", enforcement=pb.STRICT, max_units=30)
        await _allocate(server, "sku", "shared", "tiktok", 20)
        response = await server.reservations.Batch(pb.BatchRequest(ops=[
            pb.BatchOp(reserve=cart("b1", ("sku", 25), channel="tiktok")),
            pb.BatchOp(reserve=cart("b2", ("sku", 31), channel="tiktok")),
        ]))
        first, second = (result.reserve for result in response.results)
        assert first.granted and not second.granted
        line = first.lines[0]
        assert [(b.bucket, b.units) for b in line.buckets] == [("tiktok", 20), ("shared", 5)]
        assert (line.available, line.ats) == (75, 30)


@aio
async def test_channel_metrics():
    async with running() as server:
        await _tiktok_setup(server)
        stream = server.reservations.WatchAts(pb.WatchAtsRequest(channels=["tiktok"]))
        await _next(stream, 1)
        values = {
            metric.name: sample.value
            for metric in server.daemon.metrics.registry.collect()
            for sample in metric.samples
            if metric.name.startswith(("reservd_channels", "reservd_bucket", "reservd_ats"))
        }
        stream.cancel()
    assert values["reservd_channels"] == 4
    assert values["reservd_bucket_skus"] == 1 and values["reservd_buckets"] == 6
    assert values["reservd_ats_watchers"] == 1 and values["reservd_ats_tracked_pairs"] == 1
    assert values["reservd_ats_snapshots"] == 1
