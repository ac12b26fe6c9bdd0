"""The Redis mirror carries channels: each channel's ``ats:<channel>`` and ``level:<channel>``,
the SKU's ``level`` and each bucket's ``free:<bucket>`` in the SKU's hash, equal to GetAts and
GetBuckets once settled, a lower ``ats`` or bucket in Redis before the change is acknowledged,
and (test_mirror_crash.py) never more than recovery has after kill -9."""
from __future__ import annotations

import asyncio
import random

import grpc
import pytest
import redis.asyncio as aioredis
from conftest import aio, cart, running, test_config
from hypothesis import given, settings
from hypothesis import strategies as st

from reservd import mirrorwrite
from reservd.clock import ManualClock
from reservd.config import Config
from reservd.mirrorfields import FieldJournal, safest
from reservd.v1 import reservd_pb2 as pb

pytestmark = pytest.mark.redis

PREFIX = Config().redis_prefix
CHANNELS = ("amazon", "ebay", "seeding", "shopify", "tiktok")
_ids = iter(range(1, 1 << 30))


def _id(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"



async def _set_channel(node, name: str, **policy) -> None:
    await node.admin.SetChannel(pb.SetChannelRequest(
        channel=name, policy=pb.ChannelPolicy(**policy), change_id=_id("channel")))


async def _allocate(node, sku: str, source: str, target: str, units: int) -> None:
    await node.admin.Allocate(pb.AllocateRequest(
        sku=sku, from_bucket=source, to_bucket=target, units=units, change_id=_id("allocate")))


async def expected_hashes(node, skus) -> dict[str, dict[str, int]]:
    """The channel fields each SKU's hash must hold, from GetAts and GetBuckets."""
    listed = await node.admin.ListChannels(pb.ListChannelsRequest())
    wanted: dict[str, dict[str, int]] = {sku: {} for sku in skus}
    if not listed.channels:
        return wanted
    channels = [entry.channel for entry in listed.channels]
    ats = await node.reservations.GetAts(pb.GetAtsRequest(skus=list(skus), channels=channels))
    buckets = await node.admin.GetBuckets(pb.GetBucketsRequest(skus=list(skus)))
    for value in ats.ats:
        fields = wanted[value.sku]
        fields["ats:" + value.channel] = value.ats
        fields["level:" + value.channel] = value.level
        fields["level"] = max(fields.get("level", 0), value.level)
    for row in buckets.skus:
        for bucket in row.buckets:
            wanted[row.sku]["free:" + bucket.bucket] = bucket.free
    return wanted


async def shown_hashes(client: aioredis.Redis, skus) -> dict[str, dict[str, int]]:
    shown = {}
    for sku in skus:
        stored = await client.hgetall(PREFIX + "stock:" + sku)
        shown[sku] = {
            key.decode(): int(value) for key, value in stored.items()
            if key.decode().split(":")[0] in ("ats", "level", "free")
        }
    return shown


async def settled(node, client: aioredis.Redis, skus) -> None:
    """Until Redis holds every change as exact (durable) values, then equal to GetAts and
    GetBuckets key for key."""
    daemon = node.daemon
    for _ in range(1000):
        if daemon.mirror.settled_seq == daemon.ledger.seq:
            expected = await expected_hashes(node, skus)
            exact = [await client.hget(PREFIX + "stock:" + sku, "channels_exact") for sku in skus]
            # A SKU with no channel field has no channels_exact either.
            if all(value == b"1" or (value is None and not expected[sku])
                   for sku, value in zip(skus, exact)):
                break
        await asyncio.sleep(0.01)
    assert await shown_hashes(client, skus) == await expected_hashes(node, skus)
    assert len(daemon.mirror.fields) == 0  # every entry's fields settled and dropped


@pytest.mark.parametrize("shown_skus_max", [10_000, 1, 0], ids=["deltas", "one-known", "full"])
@aio
async def test_the_hash_equals_get_ats_and_get_buckets_after_reserves_allocations_and_policies(
    tmp_path, redis_server, shown_skus_max
):
    """Whether a write sends channel fields as deltas over what Redis holds (every SKU known,
    one at a time, none: reservd.mirrorshown), the hashes are the same."""
    client = aioredis.Redis(port=redis_server.port)
    config = test_config(tmp_path / "data", redis_url=redis_server.url,
                         mirror_shown_skus_max=shown_skus_max)
    skus = ("hero", "plain", "low")
    async with running(config) as node:
        for sku, units in (("hero", 1000), ("plain", 100), ("low", 30)):
            await node.set_stock(sku, units)
        # Before any channel: the hashes carry stock only.
        await settled(node, client, skus)
        assert await shown_hashes(client, skus) == {sku: {} for sku in skus}
        await _set_channel(node, "tiktok", pool="tiktok")
        await _set_channel(node, "seeding", reserve="seeding", pool_only=True)
        await _set_channel(node, "amazon", share_bp=9000)
        await _set_channel(node, "ebay", share_bp=9500, max_units=100)
        await _set_channel(node, "shopify", enforcement=pb.STRICT, buffer_units=5)
        for bucket, units in (("tiktok", 500), ("returns", 100), ("seeding", 30), ("spike", 50)):
            await _allocate(node, "hero", "shared", bucket, units)
        await _allocate(node, "low", "shared", "tiktok", 10)
        await settled(node, client, skus)
        rng = random.Random(7)
        held: list[str] = []
        for round_ in range(60):
            sku = rng.choice(skus)
            action = rng.random()
            if action < 0.5 or not held:
                reservation = _id("r")
                response = await node.reservations.Reserve(cart(
                    reservation, (sku, rng.randint(1, 12)), channel=rng.choice(CHANNELS),
                    allow_partial=True))
                if response.granted:
                    held.append(reservation)
            elif action < 0.7:
                await node.reservations.Release(
                    pb.ReleaseRequest(reservation_id=held.pop(rng.randrange(len(held)))))
            elif action < 0.8:
                reservation = held.pop(rng.randrange(len(held)))
                await node.reservations.Commit(pb.CommitRequest(reservation_id=reservation))
            elif action < 0.9:
                await _allocate(node, "hero", "spike", "tiktok", 1)
            else:
                await node.admin.SetSkuPolicy(pb.SetSkuPolicyRequest(
                    sku=sku, channel="amazon", change_id=_id("sku-policy"),
                    overrides=pb.ChannelPolicy(share_bp=rng.choice((8000, 9000, 10000)))))
            if round_ % 20 == 19:
                await settled(node, client, skus)
        shown = node.daemon.mirror.shown
        assert len(shown) <= shown_skus_max
        assert (shown.deltas_sent > 0) == (shown_skus_max > 0)
        # Down to the triggers: "low" through levels 1-4.
        await _set_channel(node, "amazon", share_bp=8500)
        await settled(node, client, skus)
        shown = await shown_hashes(client, skus)
        assert {"ats:amazon", "level", "free:shared", "free:tiktok"} <= set(shown["hero"])
        # A bucket emptied by an allocation leaves the hash.
        free_spike = (await expected_hashes(node, ["hero"]))["hero"].get("free:spike", 0)
        if free_spike:
            await _allocate(node, "hero", "spike", "shared", free_spike)
        await settled(node, client, ["hero"])
        assert "free:spike" not in (await shown_hashes(client, ["hero"]))["hero"]
    # A restart rewrites the same fields.
    async with running(config) as node:
        await settled(node, client, skus)
    await client.aclose()


@aio
async def test_a_change_that_lowers_an_ats_is_in_redis_when_acknowledged(tmp_path, redis_server):
    client = aioredis.Redis(port=redis_server.port)
    config = test_config(tmp_path / "data", redis_url=redis_server.url)
    async with running(config) as node:
        await node.set_stock("hero", 100)
        await _set_channel(node, "amazon", share_bp=9000)
        await _set_channel(node, "tiktok", pool="tiktok", pool_only=True)
        await settled(node, client, ["hero"])
        steps = [
            _allocate(node, "hero", "shared", "tiktok", 40),  # amazon 90 -> 54
            node.reservations.Reserve(cart("a", ("hero", 10), channel="amazon")),  # 54 -> 45
            _set_channel(node, "amazon", share_bp=5000),  # 45 -> 25
            node.admin.SetSkuPolicy(pb.SetSkuPolicyRequest(
                sku="hero", channel="amazon", change_id="cap",
                overrides=pb.ChannelPolicy(max_units=7))),  # 25 -> 7
            node.reservations.Reserve(cart("t", ("hero", 30), channel="tiktok")),  # pool 40 -> 10
        ]
        for step in steps:
            await step
            # No wait: the write that took it down preceded the answer.
            shown = (await shown_hashes(client, ["hero"]))["hero"]
            truth = (await expected_hashes(node, ["hero"]))["hero"]
            for name in ("ats:amazon", "ats:tiktok", "free:tiktok", "free:shared"):
                assert shown[name] <= truth[name], (name, shown, truth)
            assert shown["level"] >= truth["level"], (shown, truth)
        assert (await shown_hashes(client, ["hero"]))["hero"]["ats:amazon"] == 7
    await client.aclose()


@aio
async def test_a_velocity_rule_moves_the_ats_in_redis(tmp_path, redis_server):
    # The low-stock rule (reservd.rules) raises every channel's buffer by a RULE command, not by
    # a reservation: the hash follows it all the same.
    client = aioredis.Redis(port=redis_server.port)
    config = test_config(tmp_path / "data", redis_url=redis_server.url,
                         rules_evaluate_ms=3_600_000)  # the test ticks the evaluator itself
    async with running(config, clock=ManualClock(1_700_000_000_000)) as node:
        await node.set_stock("hero", 150)
        await _set_channel(node, "amazon", share_bp=9000)
        await node.admin.SetRulePolicy(pb.SetRulePolicyRequest(
            channel="amazon", change_id=_id("rules"), policy=pb.RulePolicy(enabled=True)))
        await node.reservations.Reserve(cart("a", ("hero", 60), channel="amazon"))
        await settled(node, client, ["hero"])
        assert (await shown_hashes(client, ["hero"]))["hero"]["ats:amazon"] == 81  # 90 at 90 %
        assert node.daemon.ledger.evaluate_rules()
        await node.daemon.log.commit()
        await settled(node, client, ["hero"])
        assert (await shown_hashes(client, ["hero"]))["hero"]["ats:amazon"] == 63  # at 70 %
    await client.aclose()


@aio
async def test_the_script_takes_channel_fields_the_safe_way(redis_server):
    client = aioredis.Redis(port=redis_server.port)
    sha = await client.script_load(mirrorwrite.BATCH_SCRIPT)

    async def call(rows, channels, lower=(), mode="apply", seq=1):
        keys, args = mirrorwrite.batch_command(
            "t:", mode, 1, seq, 1_000, 0, 1_350, rows, lower, channels)
        return (await client.evalsha(sha, len(keys), *keys, *args))[0]  # hashes written

    async def fields():
        stored = await client.hgetall("t:stock:s")
        return {k.decode(): int(v) for k, v in stored.items()
                if k.decode().split(":")[0] in ("ats", "level", "free", "channels_seq",
                                                "channels_exact")}

    await call([], {}, mode="mark", seq=0)
    row = (5, "s", 10, 0, 0, 0)
    base = (("ats:a", 9), ("level:a", 0), ("level", 0), ("free:shared", 6), ("free:p", 4))
    assert await call([row], {"s": (5, 1, base)}) == 1
    assert await fields() == {"ats:a": 9, "level:a": 0, "level": 0, "free:shared": 6,
                              "free:p": 4, "channels_seq": 5, "channels_exact": 1}
    # Not durable ("lower"): each field only the safe way; a bucket new to the hash, or gone
    # from the new state, counts 0.
    pending = (("ats:a", 12), ("level:a", 2), ("level", 2), ("free:shared", 3),
               ("free:q", 5))
    assert await call([(6, "s", 10, 0, 0, 0)], {"s": (6, 0, pending)}, lower={"s"}) == 1
    assert await fields() == {"ats:a": 9, "level:a": 2, "level": 2, "free:shared": 3,
                              "free:p": 0, "free:q": 0, "channels_seq": 6, "channels_exact": 0}
    # The same version again changes nothing; an older one neither.
    assert await call([row], {"s": (6, 0, base)}) == 0
    assert await call([(4, "s", 10, 0, 0, 0)], {"s": (4, 1, base)}) == 0
    assert (await fields())["ats:a"] == 9
    # Durable ("newer", exact): replaced whole, fields no longer there removed.
    assert await call([(6, "s", 10, 0, 0, 0)], {"s": (6, 1, pending)}) == 1
    assert await fields() == {"ats:a": 12, "level:a": 2, "level": 2, "free:shared": 3,
                              "free:q": 5, "channels_seq": 6, "channels_exact": 1}
    # No channel fields any more (a restart without channels): all of them go.
    assert await call([(7, "s", 10, 0, 0, 0)], {"s": (7, 1, ())}) == 1
    assert await fields() == {}
    # A SKU that never had channel fields is written exactly as before.
    assert await call([(8, "s", 10, 1, 0, 0)], {}) == 1
    assert await fields() == {}
    # The hash remembers the names it holds (channels_names): the same names again skip the
    # scan for stale ones, and a name gone is still removed.
    assert await call([(9, "s", 10, 0, 0, 0)], {"s": (9, 1, base)}) == 1
    names = "\n".join(name for name, _ in base)
    assert (await client.hget("t:stock:s", "channels_names")).decode() == names
    assert await call([(10, "s", 10, 0, 0, 0)], {"s": (10, 1, base)}) == 1
    assert await fields() == {**dict(base), "channels_seq": 10, "channels_exact": 1}
    assert await call([(11, "s", 10, 0, 0, 0)], {"s": (11, 1, base[:4])}) == 1
    assert await fields() == {**dict(base[:4]), "channels_seq": 11, "channels_exact": 1}
    await client.aclose()


# -- the plan's channel fields: never more than a recovery could show -------------------------


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("change"), st.sampled_from("ab"),
                      st.tuples(st.integers(0, 9), st.integers(0, 4), st.integers(0, 5),
                                st.booleans())),
            st.tuples(st.just("durable"), st.integers(0, 3), st.none()),
            st.tuples(st.just("write"), st.booleans(), st.none()),
        ),
        max_size=50,
    ),
    read_max=st.integers(1, 4),
)
def test_the_plans_channel_fields_never_show_more_than_recovery_could(steps, read_max):
    """A model of the mirror's channel fields over the pure-Python table and a FieldJournal
    (each change: an ats, a level, a bucket's free units, and whether a second bucket exists):
    after every write, per SKU and field, Redis shows at most (a level: at least) the value of
    every state from the durable one to the newest mirrored, the versions never go back, and
    once everything is durable Redis equals the truth."""
    from reservd._pytable import Table

    class Book:  # the part of Channels a FieldJournal reads
        active = True
        now: dict[str, tuple] = {}

        def mirror_fields(self, sku):
            return self.now[sku]

    table = Table(shards=1, ring_capacity=256)
    book = Book()
    journal = FieldJournal(table, book)
    history: dict[str, list[tuple[int, dict]]] = {}
    redis: dict[str, tuple[tuple[int, int], dict]] = {}  # sku -> ((seq, exact), fields)
    seq = durable = mirrored = position = 0

    def lua(step) -> None:
        for sku, (channels_seq, exact, fields) in step.channels.items():
            version = (channels_seq, exact)
            stored = redis.get(sku)
            if sku in step.lower:
                if stored is None or stored[0] >= version or not fields:
                    continue
                merged = dict(stored[1])
                given = {name for name, _ in fields}
                for name, value in stored[1].items():
                    if name.startswith("free:") and name not in given:
                        merged[name] = min(value, 0)
                for name, value in fields:
                    before = stored[1].get(name, 0 if name.startswith("free:") else None)
                    if before is None:
                        merged[name] = value
                    else:
                        merged[name] = (max if name.startswith("level") else min)(value, before)
                redis[sku] = (version, merged)
            elif stored is None or stored[0] < version:
                redis[sku] = (version, dict(fields))

    def write(target: int) -> None:
        nonlocal mirrored, position
        step = mirrorwrite.plan(table, position, durable, target, read_max, journal.at)
        before = dict(redis)
        lua(step)
        position, mirrored = step.settled_position, target
        journal.settle(position)
        for sku, states in history.items():
            if sku not in redis:
                continue
            version, shown = redis[sku]
            assert sku not in before or version >= before[sku][0], (sku, before, redis)
            at_durable = [f for s, f in states if s <= durable][-1:]
            after = [f for s, f in states if durable < s <= target]
            for truth in at_durable + after:
                for name, value in shown.items():
                    real = truth.get(name, 0 if name.startswith("free:") else None)
                    if real is None:
                        continue
                    if name.startswith("level"):
                        assert value >= real, (sku, name, shown, states, durable)
                    else:
                        assert value <= real, (sku, name, shown, states, durable)

    for kind, first, second in steps:
        if kind == "change":
            seq += 1
            ats, level, free, second_bucket = second
            fields = {"ats:x": ats, "level": level, "free:shared": free}
            if second_bucket:
                fields["free:p"] = ats
            book.now[first] = tuple(fields.items())
            history.setdefault(first, []).append((seq, fields))
            table.touch(table.ensure(first), seq)
            journal.on_applied(seq)
        elif kind == "durable":
            durable = min(seq, durable + first)
        else:
            if first:
                durable = seq
            write(seq)
    durable = seq
    write(seq)
    for sku, states in history.items():
        assert redis[sku][1] == states[-1][1], (sku, redis[sku], states)


def test_safest_takes_each_field_its_safe_way():
    assert safest([
        (("ats:a", 5), ("level", 1), ("free:p", 3)),
        (("ats:a", 7), ("level", 3), ("free:shared", 2)),
    ]) == {"ats:a": 5, "level": 3, "free:p": 0, "free:shared": 0}


@pytest.mark.parametrize("fault", ["pause", "kill"])
@aio
async def test_after_healing_the_hash_equals_get_ats_key_for_key(tmp_path, redis_server, fault):
    """Redis paused (the mirror replays its ring) or killed and restarted empty (it rewrites
    every key) while releases, commits, allocations and a policy change go on: once reopened,
    every hash equals GetAts and GetBuckets again."""
    client = aioredis.Redis(port=redis_server.port)
    config = test_config(
        tmp_path / "data", redis_url=redis_server.url, mirror_timeout_ms=50,
        mirror_silence_ms_max=300, mirror_lag_ms_max=600, mirror_retry_ms_max=200,
    )
    skus = ("hero", "plain")
    async with running(config) as node:
        guard = node.daemon.guard
        await node.set_stock("hero", 200)
        await node.set_stock("plain", 40)
        await _set_channel(node, "tiktok", pool="tiktok")
        await _set_channel(node, "amazon", share_bp=9000)
        await _allocate(node, "hero", "shared", "tiktok", 60)
        await _allocate(node, "hero", "shared", "spike", 20)
        for i, (sku, channel) in enumerate([("hero", "tiktok"), ("hero", "amazon"),
                                            ("plain", "amazon"), ("plain", "tiktok")]):
            assert (await node.reservations.Reserve(
                cart(f"h{i}", (sku, 8), channel=channel))).granted
        await settled(node, client, skus)
        if fault == "pause":
            redis_server.stop()
        else:
            redis_server.kill()
        for _ in range(1000):
            if guard.grant_reason is not None:
                break
            await asyncio.sleep(0.01)
        assert guard.grant_reason is not None
        # While closed: releases and a commit are acknowledged on the WAL alone; a change of
        # buckets or policies is applied and answered UNAVAILABLE (not in the mirror).
        await node.reservations.Release(pb.ReleaseRequest(reservation_id="h0"))
        await node.reservations.Release(pb.ReleaseRequest(reservation_id="h2"))
        await node.reservations.Commit(pb.CommitRequest(reservation_id="h1"))
        for call in (_allocate(node, "hero", "spike", "tiktok", 20),
                     _set_channel(node, "amazon", share_bp=8000)):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        if fault == "pause":
            redis_server.cont()
        else:
            await asyncio.to_thread(redis_server.restart, False)
        for _ in range(1000):
            if guard.grant_reason is None:
                break
            await asyncio.sleep(0.01)
        assert guard.grant_reason is None
        await settled(node, client, skus)
        shown = (await shown_hashes(client, ["hero"]))["hero"]
        assert "free:spike" not in shown and shown["free:tiktok"] == 80  # 60 + 20, h0 released
        stats = node.daemon.mirror.stats
        assert (stats.replays if fault == "pause" else stats.rewrites - 1) >= 1, stats
    await client.aclose()
