"""The history checker with channels and buckets (tests/history_channels.py): 500 buyers on four
channels racing for the last units of a SKU with a TikTok pool, a reserve-bound channel and a
strict capped one, while an admin moves units between buckets, read back from the WAL on disk
and checked against the model written from the README; and small recorded histories, doctored,
which it must reject."""
from __future__ import annotations

import asyncio
import copy
import random
import time

import grpc
import pytest
from conftest import aio, cart, eventually, running, test_config
from history import Recorder, check, read_final_state, read_wal

from reservd.clock import ManualClock
from reservd.ledger import State
from reservd.v1 import reservd_pb2 as pb
from reservd.v1 import reservd_pb2_grpc as pb_grpc

BUYERS = 500
SKU = "last"
SPARE = "spare"  # a second SKU without named buckets, in some carts
# What each channel may draw (README: its pool, its bound reserve, shared unless pool-only).
ALLOWED = {
    "tiktok": {"tiktok", "shared"},
    "seeding": {"seeding"},
    "ebay": {"shared"},
    "web": {"shared"},  # no policy: shared only
}
CONFIGURED = ("tiktok", "seeding", "ebay")
# Admin moves during the race; some find their source empty (FAILED_PRECONDITION).
MOVES = [("returns", "shared", 2), ("shared", "tiktok", 3), ("tiktok", "shared", 2),
         ("returns", "seeding", 1), ("shared", "returns", 1), ("seeding", "shared", 1),
         ("shared", "tiktok", 4), ("tiktok", "returns", 1)]


async def _setup(recorder: Recorder, admin) -> None:
    """40 units of the SKU: a TikTok pool of 12, a creator-seeding reserve of 4 (channel
    `seeding` is bound to it, pool-only), a returns reserve of 4 nobody draws, 20 shared; eBay
    shows 50 % of what it may draw, at most 6, and is held to it (strict)."""
    calls = [
        ("set_stock", admin.SetStock, pb.SetStockRequest(sku=SKU, on_hand=40,
                                                         adjustment_id="init")),
        ("set_stock", admin.SetStock, pb.SetStockRequest(sku=SPARE, on_hand=30,
                                                         adjustment_id="init-spare")),
        ("set_channel", admin.SetChannel, pb.SetChannelRequest(
            channel="tiktok", policy=pb.ChannelPolicy(pool="tiktok"), change_id="c-tiktok")),
        ("set_channel", admin.SetChannel, pb.SetChannelRequest(
            channel="seeding", policy=pb.ChannelPolicy(reserve="seeding", pool_only=True),
            change_id="c-seeding")),
        ("set_channel", admin.SetChannel, pb.SetChannelRequest(
            channel="ebay", change_id="c-ebay", policy=pb.ChannelPolicy(
                share_bp=5000, max_units=6, enforcement=pb.STRICT))),
    ]
    calls += [
        ("allocate", admin.Allocate, pb.AllocateRequest(
            sku=SKU, from_bucket="shared", to_bucket=bucket, units=units,
            change_id=f"a-{bucket}"))
        for bucket, units in (("tiktok", 12), ("seeding", 4), ("returns", 4))
    ]
    for kind, method, request in calls:
        assert await recorder.call(0, kind, method, request) is not None, request


async def _admin_moves(recorder: Recorder, admin, start: asyncio.Event) -> None:
    await start.wait()
    for n, (source, target, units) in enumerate(MOVES):
        request = pb.AllocateRequest(sku=SKU, from_bucket=source, to_bucket=target,
                                     units=units, change_id=f"move-{n}")
        await recorder.call(0, "allocate", admin.Allocate, request)
        if n % 3 == 0:  # an admin retry: replayed
            await recorder.call(0, "allocate", admin.Allocate, request)
        # An eBay override mid-race: a lower cap for this SKU only.
        if n == 3:
            await recorder.call(0, "set_sku_policy", admin.SetSkuPolicy, pb.SetSkuPolicyRequest(
                sku=SKU, channel="ebay", overrides=pb.ChannelPolicy(max_units=4),
                change_id="o-ebay"))
        await asyncio.sleep(0)


async def _race(recorder: Recorder, server, rng: random.Random) -> list:
    links = [grpc.aio.insecure_channel(server.target) for _ in range(8)]
    for link in links:
        await link.channel_ready()
    stubs = [pb_grpc.ReservationsStub(link) for link in links]
    channels = list(ALLOWED)
    plans = [(channels[i % 4], rng.choice((1, 1, 2)), rng.random() < 0.1, rng.random())
             for i in range(BUYERS)]
    start = asyncio.Event()
    waiting = 0

    async def buyer(i: int):
        nonlocal waiting
        channel, quantity, partial, roll = plans[i]
        lines = [(SKU, quantity)] + ([(SPARE, 1)] if channel == "web" and roll < 0.2 else [])
        request = cart(f"b{i}", *lines, channel=channel, allow_partial=partial)
        stub = stubs[(i // 4) % len(stubs)]  # each link carries every channel
        waiting += 1
        if waiting == BUYERS:
            start.set()
        await start.wait()
        response = await recorder.call(i + 1, "reserve", stub.Reserve, request)
        if response is None or not response.granted:
            return response
        # Some give the units back at once (others may take them), some commit (a 2-unit
        # hold sometimes only 1), the rest are left to expire.
        if roll < 0.15:
            await recorder.call(i + 1, "release", stub.Release,
                                pb.ReleaseRequest(reservation_id=request.reservation_id))
        elif roll < 0.3:
            commit = pb.CommitRequest(reservation_id=request.reservation_id)
            if response.lines[0].granted == 2 and roll < 0.2:
                commit.lines.append(pb.Line(sku=SKU, quantity=1))
            await recorder.call(i + 1, "commit", stub.Commit, commit)
        return response

    responses = await asyncio.gather(
        _admin_moves(recorder, server.admin, start), *(buyer(i) for i in range(BUYERS)))
    for link in links:
        await link.close()
    return list(zip(plans, responses[1:]))


@aio
async def test_500_buyers_on_four_channels_over_the_last_units_check_out(tmp_path):
    began = time.monotonic()
    clock = ManualClock()
    recorder = Recorder()
    data = tmp_path / "data"
    async with running(test_config(data), clock=clock) as server:
        await _setup(recorder, server.admin)
        outcomes = await _race(recorder, server, random.Random(20261203))
        raced = time.monotonic()
        # The peak: every hold still live. No bucket below zero, nor the total.
        peak = (await server.admin.GetBuckets(pb.GetBucketsRequest(skus=[SKU]))).skus[0]
        stock = await server.stock(SKU)
        assert all(bucket.free >= 0 for bucket in peak.buckets), peak
        assert stock.available >= 0
        assert sum(bucket.free for bucket in peak.buckets) == stock.available
        # Every hold left runs out: its units go back to the bucket they came from.
        clock.advance(3_600_000)
        ledger = server.daemon.ledger
        await eventually(
            lambda: not any(r.state is State.HELD for r in ledger.reservations.values()),
            "every hold expired",
        )
        await server.daemon.log.commit()
        seq = ledger.seq
        final = await read_final_state(
            server.reservations, [SKU, SPARE], [f"b{i}" for i in range(BUYERS)], seq=seq,
            admin=server.admin, channels=CONFIGURED)
        assert ledger.seq == seq, "nothing moved while the final state was read"
    report = check(recorder.ops, wal=read_wal(data), final=final)
    checked = time.monotonic()
    print(f"channels race, {len(recorder.ops)} calls, race {raced - began:.1f} s, whole run "
          f"{checked - began:.1f} s (check {checked - raced:.1f} s): {report}; lowest free "
          f"per bucket {report.lowest_free}")
    assert report.ok, report
    # oversold == 0 per bucket and in total, at every sequence of the model that agreed with
    # every answer (shared included: no recount here).
    assert report.lowest_free and min(report.lowest_free.values()) >= 0, report.lowest_free
    # No channel took units it may not use (from the answers alone).
    granted = {channel: 0 for channel in ALLOWED}
    for (channel, *_), response in outcomes:
        if response is not None and response.granted:
            line = response.lines[0]
            drawn = [(part.bucket, part.units) for part in line.buckets] or [
                ("shared", line.granted)]
            assert {bucket for bucket, _ in drawn} <= ALLOWED[channel], (channel, line)
            assert sum(units for _, units in drawn) == line.granted
            granted[channel] += line.granted
    assert all(granted.values()), granted
    assert report.strict_grants > 0 and report.sold_out > BUYERS // 2, report
    assert report.channel_answers >= len(MOVES) and report.replayed > 0, report
    assert report.expiries > 0, report
    assert final.buckets[SKU][0][0] == "shared" and all(
        reserved == 0 for _, _, reserved, _ in final.buckets[SKU])


# -- small recorded histories, doctored: each broken one must be reported --------------------


async def _record_small(data) -> tuple:
    """A short sequential history through a real daemon (WAL on disk): every channel command,
    draws from a pool, shared and a bound reserve, a strict channel's refusal, a pool-only
    channel's refusal, a refused Allocate, release and a partial commit."""
    recorder = Recorder()
    async with running(test_config(data)) as server:
        admin, stub = server.admin, server.reservations
        await _setup(recorder, admin)
        steps = [
            ("reserve", stub.Reserve, cart("t1", (SKU, 14), channel="tiktok")),
            ("reserve", stub.Reserve, cart("w1", (SKU, 3), channel="web")),
            ("reserve", stub.Reserve, cart("e1", (SKU, 7), channel="ebay")),
            ("reserve", stub.Reserve, cart("e2", (SKU, 6), channel="ebay")),
            ("reserve", stub.Reserve, cart("s1", (SKU, 5), channel="seeding")),
            ("reserve", stub.Reserve, cart("s2", (SKU, 4), channel="seeding")),
            ("allocate", admin.Allocate, pb.AllocateRequest(
                sku=SKU, from_bucket="seeding", to_bucket="shared", units=1, change_id="none")),
            ("set_sku_policy", admin.SetSkuPolicy, pb.SetSkuPolicyRequest(
                sku=SKU, channel="ebay", overrides=pb.ChannelPolicy(max_units=2),
                change_id="o-ebay")),
            ("release", stub.Release, pb.ReleaseRequest(reservation_id="t1")),
            ("commit", stub.Commit, pb.CommitRequest(
                reservation_id="e2", lines=[pb.Line(sku=SKU, quantity=4)])),
        ]
        for kind, method, request in steps:
            await recorder.call(0, kind, method, request)
        final = await read_final_state(
            stub, [SKU, SPARE], ["t1", "w1", "e1", "e2", "s1", "s2"], admin=admin,
            channels=CONFIGURED)
    return recorder.ops, read_wal(data), final


_SMALL: list = []


@pytest.fixture
def small(tmp_path):
    """(ops, log, final) of the small history, recorded once, a fresh copy for each test."""
    if not _SMALL:
        _SMALL.append(aio(_record_small)(tmp_path / "data"))
    return copy.deepcopy(_SMALL[0])


def _op(ops, kind: str, key: str):
    return next(op for op in ops if op.kind == kind and op.key == key)


def test_the_small_history_checks_out(small):
    ops, log, final = small
    report = check(ops, wal=log, final=final)
    assert report.ok, report
    # What it holds, from the answers: the draws the doctored versions change.
    t1, w1, e1, e2, s1, s2 = (_op(ops, "reserve", rid).response
                              for rid in ("t1", "w1", "e1", "e2", "s1", "s2"))
    assert [(p.bucket, p.units) for p in t1.lines[0].buckets] == [("tiktok", 12), ("shared", 2)]
    assert w1.granted and not w1.lines[0].buckets  # every unit from shared
    assert not e1.granted and e2.granted and e2.lines[0].granted == 6
    assert not s1.granted and [(p.bucket, p.units) for p in s2.lines[0].buckets] == [
        ("seeding", 4)]
    assert _op(ops, "allocate", "none").code == grpc.StatusCode.FAILED_PRECONDITION
    assert report.strict_grants == 1 and report.channel_answers == 8, report


def _unanswered(ops, log, final):
    """The pool allocation's answer was lost: the log holds it whole (clean)."""
    op = _op(ops, "allocate", "a-tiktok")
    op.response, op.code = None, grpc.StatusCode.UNAVAILABLE


def _draw_from(bucket: str):
    def edit(ops, log, final):
        line = _op(ops, "reserve", "w1").response.lines[0]
        line.buckets.append(pb.BucketUnits(bucket=bucket, units=line.granted))
    return edit


def _strict_beyond_ats(ops, log, final):
    """eBay's refused 7 (ats 6) granted, in the answer and in the log."""
    e1 = _op(ops, "reserve", "e1")
    e2 = _op(ops, "reserve", "e2")
    e2.request.lines[0].quantity = 7
    line = e2.response.lines[0]
    line.requested = line.granted = 7
    line.available -= 1
    seq = e2.response.sequence
    log[seq] = (log[seq][0], log[seq][1]._replace(requested=(7,), granted=(7,)))
    del ops[ops.index(e1)]


def _refused_with_units(ops, log, final):
    """The refused Allocate of 1 unit, as if it had asked the returns reserve (4 free)."""
    _op(ops, "allocate", "none").request.from_bucket = "returns"


def _set(path: str, value):
    def edit(ops, log, final):
        kind, key, attribute = path.split(":")
        response = _op(ops, kind, key).response
        target = response.lines[0] if kind == "reserve" else response
        setattr(target, attribute, value)
    return edit


def _final_bucket(ops, log, final):
    rows = list(final.buckets[SKU])
    rows[-1] = (rows[-1][0], rows[-1][1] + 1, *rows[-1][2:])
    final.buckets[SKU] = tuple(rows)


def _final_ats(ops, log, final):
    ats, level, stale = final.ats[(SKU, "tiktok")]
    final.ats[(SKU, "tiktok")] = (ats + 1, level, stale)


def _allocate_answer(ops, log, final):
    _op(ops, "allocate", "a-returns").response.buckets.buckets[0].free += 1


def _policy_answer(ops, log, final):
    _op(ops, "set_channel", "c-ebay").response.channel.policy.max_units = 7


def _sold_out_within_pool(ops, log, final):
    """The pool-only seeding channel refused 4 of its 4-unit reserve (asked 5 in truth)."""
    s1 = _op(ops, "reserve", "s1")
    s1.request.lines[0].quantity = 4
    s1.response.lines[0].requested = 4


BROKEN = {
    "answered draws (another channel's pool)": _draw_from("tiktok"),
    "answered draws (an unbound reserve)": _draw_from("returns"),
    "granted, but the model says: sold out": _strict_beyond_ats,
    "answered ats": _set("reserve:t1:ats", 999),
    "which the model never had with a refusal": _sold_out_within_pool,
    "refused, but": _refused_with_units,
    "which the model never had between": _allocate_answer,
    "which the model never had between (policy)": _policy_answer,
    "final buckets": _final_bucket,
    "final ats": _final_ats,
}


def test_an_unanswered_allocate_is_placed_from_the_log(small):
    ops, log, final = small
    _unanswered(ops, log, final)
    report = check(ops, wal=log, final=final)
    assert report.ok and report.indefinite_present == 1, report


@pytest.mark.parametrize("name,edit", BROKEN.items(), ids=BROKEN.keys())
def test_the_checker_reports_a_doctored_channel_history(small, name, edit):
    ops, log, final = small
    edit(ops, log, final)
    report = check(ops, wal=log, final=final)
    assert any(name.split(" (")[0] in violation for violation in report.violations), report
