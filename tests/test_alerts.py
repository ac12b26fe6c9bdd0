"""The alerts feed through a real daemon (port 0, real WAL, injected clock): reserve-level
crossings once each with hysteresis, shortfall grading, failing closed, GetAlerts filters,
WatchAlerts resume, lapping and its watcher cap, and the same alerts after a replay."""
from __future__ import annotations

import asyncio
import errno
import itertools
import logging

import grpc
import pytest
from conftest import aio, cart, eventually, running, test_config
from redisserver import RedisServer, require_redis_server
from walfaults import FaultyFiles

from reservd.alerts import AlertFeed
from reservd.alertwatch import AlertHub
from reservd.clock import ManualClock
from reservd.config import Config
from reservd.guard import Guard
from reservd.v1 import reservd_pb2 as pb

_ids = itertools.count(1)


async def _set(server, sku: str, on_hand: int) -> pb.StockAdjustmentResponse:
    """A recount with a fresh id (the same figure twice is two recounts)."""
    return await server.admin.SetStock(
        pb.SetStockRequest(sku=sku, on_hand=on_hand, adjustment_id=f"count-{next(_ids)}")
    )


async def _alerts(server, *kinds: str, **filters) -> list[pb.Alert]:
    response = await server.reservations.GetAlerts(
        pb.GetAlertsRequest(kinds=list(kinds), **filters)
    )
    return list(response.alerts)


def figures(alert: pb.Alert) -> dict[str, int | str]:
    return {f.name: getattr(f, f.WhichOneof("value")) for f in alert.figures}


def _levels(alerts) -> list[tuple[str, int]]:
    return [(a.sku, a.level) for a in alerts]


async def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), caught.value.details()


@aio
async def test_each_reserve_level_crossing_is_one_alert_down_and_back_up(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="reservd.alerts")
    async with running(test_config(tmp_path / "data"), clock=ManualClock()) as server:
        watch = server.reservations.WatchAlerts(pb.WatchAlertsRequest())
        await _set(server, "tee", 30)
        for i, units in enumerate((10, 10, 5, 5)):  # available 20, 10, 5, 0
            assert (await server.reservations.Reserve(cart(f"r{i}", ("tee", units)))).granted
        for i in (3, 2, 1, 0):  # back to 5, 10, 20, 30
            await server.reservations.Release(pb.ReleaseRequest(reservation_id=f"r{i}"))
        expected = [1, 2, 3, 4, 3, 2, 1, 0]
        alerts = await _alerts(server, "reserve_level")
        assert [a.level for a in alerts] == expected
        assert [figures(a)["available"] for a in alerts] == [20, 10, 5, 0, 5, 10, 20, 30]
        assert [figures(a)["previous_level"] for a in alerts] == [0, *expected[:-1]]
        assert len({a.id for a in alerts}) == len(alerts)
        assert all(a.sku == "tee" and not a.runtime and a.sequence for a in alerts)
        # The stream carries the same alerts, once each.
        streamed = [await watch.read() for _ in expected]
        assert streamed == alerts
        # Nothing more was raised: the next alert the stream carries is a new one.
        await _set(server, "other", 3)
        assert (await watch.read()).sku == "other"
        watch.cancel()
        registry = server.daemon.metrics.registry
        assert registry.get_sample_value(
            "reservd_alerts_total", {"kind": "reserve_level", "level": "4"}
        ) == 1
        assert registry.get_sample_value(
            "reservd_alerts_total", {"kind": "reserve_level", "level": "1"}
        ) == 2  # down through 20, and back up to 20
    logged = [r for r in caplog.records if r.name == "reservd.alerts"]
    assert [r.alert_id for r in logged[:8]] == [a.id for a in alerts]


@aio
async def test_flapping_around_a_threshold_does_not_realert(tmp_path):
    """Hysteresis 2 units: at emergency (<= 5) the SKU stays there until available > 7."""
    async with running(test_config(tmp_path / "data"), clock=ManualClock()) as server:
        await _set(server, "cap", 100)
        await _set(server, "cap", 5)  # one alert: 0 -> 3 at once
        for on_hand in (6, 5, 6, 7, 5, 7, 6, 4, 5, 7):  # 4 is still emergency
            await _set(server, "cap", on_hand)
        assert _levels(await _alerts(server, "reserve_level")) == [("cap", 3)]
        await _set(server, "cap", 8)  # clear of 5 + 2: critical (<= 10)
        for on_hand in (10, 9, 12, 11, 8, 12):  # around 10: stays critical until > 12
            await _set(server, "cap", on_hand)
        await _set(server, "cap", 13)
        for on_hand in (11, 12, 13, 22, 21, 20, 22):  # warning until > 22
            await _set(server, "cap", on_hand)
        await _set(server, "cap", 23)
        await _set(server, "cap", 21)  # not a crossing of 20: still normal
        alerts = await _alerts(server, "reserve_level")
        assert _levels(alerts) == [("cap", 3), ("cap", 2), ("cap", 1), ("cap", 0)]
        assert [figures(a)["available"] for a in alerts] == [5, 8, 13, 23]
        assert [figures(a)["threshold_units"] for a in alerts] == [5, 10, 20, 20]
        await _set(server, "cap", 0)  # a fall through every threshold is one alert
        await _set(server, "cap", 3)  # leaves zero (3 > 0 + 2) for emergency
        assert _levels((await _alerts(server, "reserve_level"))[-2:]) == [("cap", 4), ("cap", 3)]


@aio
async def test_shortfalls_are_graded_like_the_seeds_oversell_levels(tmp_path):
    """Level 1: one SKU short by 1-2; level 2: one SKU short by 5 or more, or several SKUs in
    one window (60 s here); level 3: 5 SKUs or more short in the window."""
    clock = ManualClock()
    config = test_config(tmp_path / "data", alert_shortfall_window_seconds=60)
    async with running(config, clock=clock) as server:

        async def short(sku: str, units: int) -> pb.Alert:
            await _set(server, sku, 10)
            assert (await server.reservations.Reserve(
                cart(f"hold-{sku}", ("" + sku, 10), ttl_seconds=86_400))).granted
            assert (await _set(server, sku, 10 - units)).shortfall == units
            return (await _alerts(server, "shortfall"))[-1]

        one = await short("a", 2)
        assert (one.sku, one.level) == ("a", 1)
        assert figures(one) == {
            "shortfall_units": 2, "on_hand": 8, "reserved": 10, "committed": 0,
            "skus_short_in_window": 1, "window_seconds": 60,
        }
        clock.advance(61_000)  # "a" leaves the window
        assert (await short("b", 5)).level == 2  # one SKU, 5 units
        clock.advance(61_000)
        assert (await short("c", 1)).level == 1
        clock.advance(30_000)
        several = await short("d", 1)  # two SKUs within 60 s
        assert several.level == 2 and figures(several)["skus_short_in_window"] == 2
        assert [(await short(sku, 1)).level for sku in ("e", "f", "g")] == [2, 2, 3]
        assert figures((await _alerts(server, "shortfall"))[-1])["skus_short_in_window"] == 5
        # A recount that is not short raises nothing.
        await _set(server, "g", 10)
        assert len(await _alerts(server, "shortfall")) == 7


@aio
async def test_a_failing_wal_raises_fail_closed_at_once(tmp_path):
    files = FaultyFiles()
    async with running(test_config(tmp_path / "data"), clock=ManualClock(),
                       wal_files=files) as server:
        await _set(server, "a", 100)
        watch = server.reservations.WatchAlerts(pb.WatchAlertsRequest())
        files.fail("fdatasync", errno.EIO)
        code, _ = await _code(server.reservations.Reserve(cart("r", ("a", 1))))
        assert code is grpc.StatusCode.UNAVAILABLE
        alert = await watch.read()
        watch.cancel()
        assert (alert.kind, alert.level, alert.runtime) == ("fail_closed", 3, True)
        assert "wal" in figures(alert)["reason"] and figures(alert)["writes_closed"] == 1
        assert alert.id.startswith("r-") and alert.sequence == 1  # the last durable sequence
        assert await _alerts(server, "fail_closed") == [alert]
        # It shares sequence 1 with the recount: a stream resuming after 1 gets it again.
        resumed = server.reservations.WatchAlerts(pb.WatchAlertsRequest(from_sequence=1))
        assert await resumed.read() == alert
        resumed.cancel()


@aio
async def test_failing_closed_starts_and_ends_with_the_redis_mirror(tmp_path):
    require_redis_server()
    redis = RedisServer(tmp_path / "redis")  # not started: reservd starts failed closed
    try:
        config = test_config(tmp_path / "data", redis_url=redis.url)
        async with running(config, clock=ManualClock()) as server:
            start = (await _alerts(server, "fail_closed"))[0]
            assert start.level == 3 and "mirror" in figures(start)["reason"]
            assert figures(start)["writes_closed"] == 0
            assert start.sequence == 0  # raised at start-up, before any command
            watch = server.reservations.WatchAlerts(pb.WatchAlertsRequest())
            assert await watch.read() == start
            await asyncio.to_thread(redis.start)
            end = await watch.read()
            watch.cancel()
            assert (end.kind, end.level, end.runtime) == ("fail_closed", 0, True)
            assert figures(end) == {"closed_ms": 0}  # the injected clock did not move
            assert end.id != start.id
    finally:
        redis.close()


@aio
async def test_get_alerts_filters_and_bounds(tmp_path):
    async with running(test_config(tmp_path / "data"), clock=ManualClock()) as server:
        for sku, on_hand in (("a", 15), ("b", 4), ("c", 0), ("a", 9)):
            await _set(server, sku, on_hand)
        # The recount of a (15 -> 9) is also 40% ghost stock (reservd.planning).
        assert _levels(await _alerts(server)) == [
            ("a", 1), ("b", 3), ("c", 4), ("a", 3), ("a", 2)]
        assert [a.kind for a in await _alerts(server, sku="a")] == [
            "reserve_level", "ghost_stock", "reserve_level"]
        level = "reserve_level"
        assert _levels(await _alerts(server, level, sku="a")) == [("a", 1), ("a", 2)]
        assert _levels(await _alerts(server, level, level_min=3)) == [("b", 3), ("c", 4)]
        assert _levels(await _alerts(server, level, limit=2)) == [("c", 4), ("a", 2)]
        assert await _alerts(server, "shortfall") == []
        for request, field in (
            (pb.GetAlertsRequest(level_min=5), "level_min"),
            (pb.GetAlertsRequest(limit=1_001), "limit"),
            (pb.GetAlertsRequest(kinds=[""]), "kinds[0]"),
            (pb.GetAlertsRequest(sku=" a"), "sku"),
        ):
            code, details = await _code(server.reservations.GetAlerts(request))
            assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field)


@aio
async def test_watch_alerts_resumes_after_a_sequence_and_tells_a_lapped_reader(tmp_path):
    config = test_config(tmp_path / "data", alerts_retained_max=4, alert_watchers_max=2)
    async with running(config, clock=ManualClock()) as server:
        for sku in "abc":
            await _set(server, sku, 0)
        alerts = await _alerts(server)
        assert _levels(alerts) == [("a", 4), ("b", 4), ("c", 4)]
        resumed = server.reservations.WatchAlerts(
            pb.WatchAlertsRequest(from_sequence=alerts[0].sequence)
        )
        assert [await resumed.read() for _ in range(2)] == alerts[1:]
        everything = server.reservations.WatchAlerts(pb.WatchAlertsRequest())
        assert await everything.read() == alerts[0]
        # Two streams are open: a third is refused.
        code, details = await _code(
            server.reservations.WatchAlerts(pb.WatchAlertsRequest()).read()
        )
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "alert_watchers_max" in details
        for sku in "defg":  # 7 alerts so far, 4 retained: a, b and c are gone
            await _set(server, sku, 0)
        assert [a.sku for a in await _alerts(server)] == list("defg")
        resumed.cancel()
        everything.cancel()
        await eventually(lambda: len(server.daemon.alert_hub) == 0, "streams released")
        lapped = server.reservations.WatchAlerts(
            pb.WatchAlertsRequest(from_sequence=alerts[0].sequence)
        )
        first = await lapped.read()
        assert (first.sku, first.lapped) == ("d", True)
        assert [(await lapped.read()).lapped for _ in range(3)] == [False] * 3
        lapped.cancel()
        # A resume point whose later alerts are all still retained is not lapped.
        latest = (await _alerts(server))[-2]
        exact = server.reservations.WatchAlerts(
            pb.WatchAlertsRequest(from_sequence=latest.sequence)
        )
        last = await exact.read()
        assert (last.sku, last.lapped) == ("g", False)
        exact.cancel()


@pytest.mark.parametrize("snapshot_records_interval", [1_000_000, 5])
@aio
async def test_replay_from_the_wal_gives_the_same_alerts(tmp_path, snapshot_records_interval):
    config = test_config(
        tmp_path / "data", snapshot_records_interval=snapshot_records_interval,
        alert_shortfall_window_seconds=60,
    )
    clock = ManualClock()
    async with running(config, clock=clock) as server:
        for sku in ("a", "b", "c"):
            await _set(server, sku, 12)
            await server.reservations.Reserve(cart(f"r-{sku}", (sku, 10), ttl_seconds=3_600))
            clock.advance(1_000)
        await _set(server, "a", 7)  # short by 3
        await _set(server, "b", 9)  # short by 1, two SKUs in the window
        await server.reservations.Release(pb.ReleaseRequest(reservation_id="r-c"))
        await _set(server, "c", 25)
        before = await _alerts(server)
        if snapshot_records_interval < 100:
            await eventually(
                lambda: server.daemon.log.stats.snapshots > 0, "a snapshot written"
            )
    assert len(before) >= 8
    async with running(config, clock=clock) as server:
        assert await _alerts(server) == before
        # The hysteresis and the shortfall window carried over: the same next alerts.
        await _set(server, "c", 23)  # warning was left at 23 already: nothing
        await _set(server, "c", 20)  # 0 -> 1
        clock.advance(30_000)
        await _set(server, "b", 8)  # b, and a within the window: level 2
        after = [a for a in (await _alerts(server))[len(before):]
                 if a.kind != "ghost_stock"]  # the recounts' (reservd.planning)
        assert [(a.kind, a.sku, a.level) for a in after] == [
            ("reserve_level", "c", 1), ("shortfall", "b", 2)]
        assert figures(after[1])["skus_short_in_window"] == 2


def _command(feed: AlertFeed, seq: int, sku: str) -> None:
    feed.begin(seq, 1_000 + seq)
    feed.emit("reserve_level", 1, sku=sku, figures={"available": 20})
    feed.end(seq)


@aio
async def test_a_stream_that_falls_behind_is_lapped_and_told_once():
    config = Config(data_dir=None, alerts_retained_max=3, alerts_batch_max=2)
    feed = AlertFeed(config, ManualClock())
    hub = AlertHub(feed, config, Guard(), ManualClock())
    _command(feed, 1, "a")
    hub.on_durable(1)
    stream = hub.alerts_of(hub.open(0))
    assert [a.sku for a in await anext(stream)] == ["a"]
    for seq, sku in enumerate("bcdef", start=2):  # its client reads nothing meanwhile
        _command(feed, seq, sku)
    hub.on_durable(6)  # 6 published, 3 retained: b and c are gone
    assert [(a.sku, a.lapped) for a in await anext(stream)] == [("d", True), ("e", False)]
    assert [(a.sku, a.lapped) for a in await anext(stream)] == [("f", False)]
    assert hub.lapped == 1 and hub.sent == 4
    assert not any(built.lapped for _, built in feed.retained)  # shared messages unmarked
    hub.close()
    assert [batch async for batch in stream] == []


def test_alerts_wait_for_durability_and_only_come_from_a_command():
    feed = AlertFeed(Config(data_dir=None), ManualClock())
    _command(feed, 1, "a")
    _command(feed, 2, "b")
    assert feed.publish(1) == 1 and [a.id for a, _ in feed.retained] == ["1.0"]
    assert feed.publish(2) == 1 and feed.published_seq == 2
    with pytest.raises(AssertionError, match="outside a command"):
        feed.emit("reorder", 1, sku="a")
    feed.begin(3, 5)
    with pytest.raises(AssertionError):
        feed.emit("reorder", 1, figures={"ratio": 1.5})  # figures are int or str
    with pytest.raises(AssertionError):
        feed.emit("Reorder", 1)
    assert feed.cross("reorder", 2, sku="a") and not feed.cross("reorder", 2, sku="a")
    assert feed.latched("reorder", "a") == 2
    assert feed.cross("reorder", 0, sku="a") and feed.latches == 0
    feed.end(3)
    assert [a.id for a, _ in feed._pending] == ["3.0", "3.1"]
