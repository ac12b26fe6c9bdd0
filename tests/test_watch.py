"""WatchStock fan-out through the daemon: exactly each watcher's SKUs, only durable changes, the
watcher cap, stalled and lapped streams, shared snapshots, resume points."""
from __future__ import annotations

import asyncio
import random

import grpc
from prometheus_client import generate_latest

from conftest import aio, cart, eventually, running, test_config
from reservd.v1 import reservd_pb2 as pb
from reservd.v1 import reservd_pb2_grpc as pb_grpc

WAIT_SECONDS = 30


def fields(update: pb.StockUpdate) -> tuple:
    return (update.sku, update.on_hand, update.reserved, update.committed, update.available,
            update.sequence, update.snapshot)


async def read_through(call, done, seconds: float = WAIT_SECONDS) -> list[pb.StockUpdate]:
    """Updates of ``call`` up to and including the first one for which ``done`` is true."""
    updates = []
    while True:
        update = await asyncio.wait_for(call.read(), seconds)
        assert update is not grpc.aio.EOF
        updates.append(update)
        if done(update):
            return updates


def reserve_directly(server, sku: str, count: int, prefix: str) -> None:
    """``count`` one-unit holds applied in the ledger at once, without yielding to the loop
    (so the watchers get them as one durable batch, or the ring laps them)."""
    ledger = server.daemon.ledger
    for i in range(count):
        assert ledger.reserve(f"{prefix}-{i}", (sku,), (1,), "", 600, False).granted


@aio
async def test_each_watcher_gets_exactly_the_updates_of_its_skus(tmp_path):
    rng = random.Random(8)
    skus = [f"s{i:02d}" for i in range(40)]
    async with running(test_config(tmp_path / "data")) as server:
        for sku in skus + ["fence"]:
            await server.set_stock(sku, 1_000)
        everything = server.reservations.WatchStock(pb.WatchStockRequest())
        subsets = [frozenset(rng.sample(skus, rng.randrange(1, 12))) for _ in range(40)]
        calls = [
            server.reservations.WatchStock(pb.WatchStockRequest(skus=sorted(subset | {"fence"})))
            for subset in subsets
        ]
        # The current state first, marked snapshot: then each stream is surely open.
        current = [await everything.read() for _ in range(41)]
        assert sorted(u.sku for u in current) == sorted(skus + ["fence"])
        for subset, call in zip(subsets, calls):
            snapshot = [await call.read() for _ in range(len(subset) + 1)]
            assert all(u.snapshot for u in snapshot)
            assert sorted(u.sku for u in snapshot) == sorted(subset | {"fence"})
        limit = asyncio.Semaphore(16)

        async def buy(i: int) -> pb.ReserveResponse:
            lines = rng.sample(skus, rng.choice((1, 1, 2, 3)))
            async with limit:
                return await server.reservations.Reserve(cart(f"r{i}", *((s, 1) for s in lines)))

        responses = await asyncio.gather(*(buy(i) for i in range(300)))
        fence = await server.admin.SetStock(
            pb.SetStockRequest(sku="fence", on_hand=7, adjustment_id="fence")
        )

        def at_fence(update: pb.StockUpdate) -> bool:
            return update.sku == "fence" and update.sequence == fence.sequence

        full = await read_through(everything, at_fence)
        assert not any(u.snapshot for u in full)
        expected = sorted(
            (response.sequence, line.sku) for response in responses for line in response.lines
        )
        assert sorted((u.sequence, u.sku) for u in full if u.sku != "fence") == expected
        assert [u.sequence for u in full] == sorted(u.sequence for u in full), "ring order"
        stock = {s.sku: s for s in (await server.reservations.GetStock(
            pb.GetStockRequest(skus=skus + ["fence"]))).stock}
        last = {u.sku: u for u in full}
        assert all(last[sku].reserved == stock[sku].reserved for sku in last)
        for subset, call in zip(subsets, calls):
            got = await read_through(call, at_fence)
            assert [fields(u) for u in got] == [
                fields(u) for u in full if u.sku in subset or u.sku == "fence"
            ]
            call.cancel()
        everything.cancel()
        hub = server.daemon.hub
        await eventually(lambda: len(hub) == 0, "every stream released")
        assert hub.buffered == 0


@aio
async def test_only_durable_changes_are_streamed():
    async with running() as server:  # in memory: durable only when the log is told to commit
        await server.set_stock("d", 10)
        call = server.reservations.WatchStock(pb.WatchStockRequest(skus=["d"]))
        assert (await call.read()).snapshot
        hub, ledger = server.daemon.hub, server.daemon.ledger
        await eventually(lambda: hub.detached == 0, "the watcher attached")
        updates_before, position_before = hub.updates, hub.position
        outcome = ledger.reserve("not-yet", ("d",), (2,), "", 600, False)
        for _ in range(20):
            await asyncio.sleep(0)  # give the hub every chance to misbehave
        assert hub.durable_seq < outcome.seq
        assert (hub.updates, hub.position) == (updates_before, position_before)
        await server.daemon.log.commit()
        update = await asyncio.wait_for(call.read(), WAIT_SECONDS)
        assert (update.sequence, update.reserved, update.snapshot) == (outcome.seq, 2, False)
        call.cancel()


@aio
async def test_watchers_beyond_the_bound_get_resource_exhausted_naming_it():
    async with running(test_config(watchers_max=3)) as server:
        await server.set_stock("c", 1)
        calls = [server.reservations.WatchStock(pb.WatchStockRequest(skus=["c"])) for _ in range(3)]
        for call in calls:
            assert (await call.read()).snapshot
        refused = server.reservations.WatchStock(pb.WatchStockRequest())
        try:
            await refused.read()
            raise AssertionError("a fourth watcher was accepted")
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "watchers_max is 3" in error.details()
        scraped = generate_latest(server.daemon.metrics.registry).decode()
        assert "\nreservd_watchers 3.0\n" in scraped
        calls[0].cancel()
        hub = server.daemon.hub
        await eventually(lambda: len(hub) == 2, "the cancelled stream released")
        again = server.reservations.WatchStock(pb.WatchStockRequest(skus=["c"]))
        assert (await again.read()).snapshot
        for call in (*calls[1:], again):
            call.cancel()


async def _stall(server, stalled_call, sku: str, reader_seen: list, prefix: str) -> int:
    """Apply holds on ``sku`` in batches until the stalled stream's flow-control window is full
    and the hub has parked it; returns how many holds that took."""
    hub = server.daemon.hub
    applied = 0
    for batch in range(200):
        reserve_directly(server, sku, 200, f"{prefix}-{batch}")
        applied += 200
        await server.daemon.log.commit()
        # The reading watcher drains; the stalled one moves only while gRPC takes its messages.
        await eventually(lambda: len(reader_seen) >= applied, "the reader keeps up")
        if hub.detached == 1:
            position = next(w.position for w in hub._watchers if not w.attached)
            reserve_directly(server, sku, 200, f"{prefix}-{batch}-probe")
            applied += 200
            await server.daemon.log.commit()
            await eventually(lambda: len(reader_seen) >= applied, "the reader keeps up")
            if hub.detached == 1 and next(
                w.position for w in hub._watchers if not w.attached
            ) == position:
                return applied
    raise AssertionError("the stream never stalled")


def _stalling_stub(server) -> tuple[grpc.aio.Channel, pb_grpc.ReservationsStub]:
    # Without BDP probing the client keeps its 64 KiB stream window, so a client that does not
    # read blocks the server's writes after a few thousand updates instead of megabytes.
    channel = grpc.aio.insecure_channel(server.target, options=[("grpc.http2.bdp_probe", 0)])
    return channel, pb_grpc.ReservationsStub(channel)


async def _collect(call, seen: list) -> None:
    while (update := await call.read()) is not grpc.aio.EOF:
        if not update.snapshot:
            seen.append(update)


@aio
async def test_a_stalled_stream_costs_nothing_and_does_not_stop_the_others():
    buffer_max = 64
    async with running(test_config(watch_buffer_updates_max=buffer_max)) as server:
        await server.set_stock("s", 10**9)
        channel, stub = _stalling_stub(server)
        stalled = stub.WatchStock(pb.WatchStockRequest(skus=["s"]))
        assert (await stalled.read()).snapshot
        reader = server.reservations.WatchStock(pb.WatchStockRequest(skus=["s"]))
        assert (await reader.read()).snapshot
        seen: list[pb.StockUpdate] = []
        collecting = asyncio.create_task(_collect(reader, seen))
        hub = server.daemon.hub
        applied = await _stall(server, stalled, "s", seen, "a")
        assert hub.buffered <= 2 * buffer_max
        # Parked: more changes cost it nothing, the reader gets every one.
        updates_before = hub.updates
        reserve_directly(server, "s", 1_000, "more")
        applied += 1_000
        await server.daemon.log.commit()
        await eventually(lambda: len(seen) >= applied, "the reader keeps up")
        assert hub.updates - updates_before == 1_000
        assert hub.buffered <= 2 * buffer_max
        assert [u.reserved for u in seen] == list(range(1, applied + 1))
        # Reading again, it gets every change in order (the ring still holds them all).
        late = await read_through(stalled, lambda u: u.reserved == applied)
        assert [u.reserved for u in late] == list(range(1, applied + 1))
        assert not any(u.snapshot for u in late)
        assert hub.lapped == 0
        await eventually(lambda: hub.detached == 0, "the stalled watcher re-attached")
        last = await server.reservations.Reserve(cart("after", ("s", 1)))
        update = await asyncio.wait_for(stalled.read(), WAIT_SECONDS)
        assert (update.sequence, update.reserved) == (last.sequence, applied + 1)
        for call in (stalled, reader):
            call.cancel()
        await asyncio.gather(collecting, return_exceptions=True)
        await channel.close()


@aio
async def test_a_lapped_stalled_stream_gets_a_snapshot_then_continues():
    config = test_config(watch_buffer_updates_max=64, watch_ring_capacity=1 << 13)
    async with running(config) as server:
        await server.set_stock("s", 10**9)
        await server.set_stock("t", 5)
        channel, stub = _stalling_stub(server)
        stalled = stub.WatchStock(pb.WatchStockRequest(skus=["s", "t"]))
        assert len([await stalled.read() for _ in range(2)]) == 2
        reader = server.reservations.WatchStock(pb.WatchStockRequest(skus=["s"]))
        assert (await reader.read()).snapshot
        seen: list[pb.StockUpdate] = []
        collecting = asyncio.create_task(_collect(reader, seen))
        hub = server.daemon.hub
        applied = await _stall(server, stalled, "s", seen, "a")
        # Twice the ring past its position: it has been lapped.
        for batch in range(2 * (1 << 13) // 1000):
            reserve_directly(server, "s", 1_000, f"lap-{batch}")
            applied += 1_000
            await server.daemon.log.commit()
            await eventually(lambda: len(seen) >= applied, "the reader keeps up")
        assert hub.lapped == 0, "only the stalled watcher falls behind, and it is parked"
        recount = await server.admin.SetStock(
            pb.SetStockRequest(sku="t", on_hand=9, adjustment_id="t-9")
        )
        late = await read_through(stalled, lambda u: u.snapshot and u.sku == "t")
        assert hub.lapped == 1
        # What gRPC had taken before the stall, in order, then the current state of both SKUs
        # (earlier changes folded in), then the changes after that state.
        snapshot = [u for u in late if u.snapshot]
        assert [u.sku for u in snapshot] == ["s", "t"]
        before = late[:late.index(snapshot[0])]
        assert [u.reserved for u in before] == list(range(1, len(before) + 1))
        assert not any(u.snapshot for u in before)
        assert (snapshot[0].reserved, snapshot[1].on_hand) == (applied, 9)
        assert snapshot[0].sequence >= recount.sequence
        after = await server.reservations.Reserve(cart("after", ("s", 1)))
        update = await asyncio.wait_for(stalled.read(), WAIT_SECONDS)
        assert (update.sequence, update.reserved, update.snapshot) == (
            after.sequence, applied + 1, False
        )
        assert len(late) < applied
        for call in (stalled, reader):
            call.cancel()
        await asyncio.gather(collecting, return_exceptions=True)
        await channel.close()


@aio
async def test_lapped_all_sku_watchers_share_one_pass_over_the_table():
    async with running(test_config(watch_ring_capacity=64)) as server:
        skus = [f"a{i:03d}" for i in range(300)]
        for sku in skus:
            await server.set_stock(sku, 1_000)
        hub = server.daemon.hub
        calls = [server.reservations.WatchStock(pb.WatchStockRequest()) for _ in range(3)]
        for call in calls:
            first = [await call.read() for _ in skus]
            assert all(u.snapshot for u in first) and sorted(u.sku for u in first) == skus
        passes = hub.table_snapshots
        assert 1 <= passes <= 3  # one each, or shared by those that overlapped
        await eventually(lambda: hub.detached == 0, "every watcher attached")
        ledger = server.daemon.ledger
        for i in range(200):  # more than the ring holds, in one durable batch
            assert ledger.reserve(f"lap-{i}", (skus[i],), (1,), "", 600, False).granted
        await server.daemon.log.commit()
        final = await server.reservations.Reserve(cart("final", (skus[-1], 1)))
        for call in calls:
            got = await read_through(call, lambda u: u.sequence == final.sequence)
            snapshot = {u.sku: u for u in got if u.snapshot}
            assert sorted(snapshot) == skus
            assert all(snapshot[sku].reserved == (1 if i < 200 else 0)
                       for i, sku in enumerate(skus))
            assert got[-1].reserved == 1 and not got[-1].snapshot
            call.cancel()
        assert hub.lapped == 3
        assert hub.table_snapshots == passes + 1, "one pass for the three lapped watchers"


@aio
async def test_a_resume_point_no_longer_retained_gets_the_current_state_then_continues():
    async with running(test_config(watch_ring_capacity=64)) as server:
        await server.set_stock("r", 1_000)
        first = await server.reservations.Reserve(cart("first", ("r", 1)))
        for i in range(100):
            await server.reservations.Reserve(cart(f"r{i}", ("r", 1)))
        for from_sequence in (first.sequence, 10**9):  # lapped; from another data directory
            call = server.reservations.WatchStock(
                pb.WatchStockRequest(skus=["r"], from_sequence=from_sequence)
            )
            current = await call.read()
            assert current.snapshot and current.reserved == (await server.stock("r")).reserved
            later = await server.reservations.Reserve(cart(f"later-{from_sequence}", ("r", 1)))
            update = await asyncio.wait_for(call.read(), WAIT_SECONDS)
            assert (update.sequence, update.snapshot) == (later.sequence, False)
            assert update.reserved == current.reserved + 1
            call.cancel()
