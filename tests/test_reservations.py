"""End-to-end behaviour of the Reservations and Admin services on a real server."""
from __future__ import annotations

import asyncio
import random

import grpc
import pytest
from conftest import aio, cart, eventually, running, test_config
from history import Recorder, check, read_final_state

from reservd.clock import ManualClock
from reservd.v1 import reservd_pb2 as pb
from reservd.v1 import reservd_pb2_grpc as pb_grpc


async def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), caught.value.details()


@aio
async def test_500_clients_race_for_50_units_exactly_50_granted():
    recorder = Recorder()
    async with running() as server:
        await recorder.call(0, "set_stock", server.admin.SetStock, pb.SetStockRequest(
            sku="hot", on_hand=50, adjustment_id="set-hot-50"))
        channels = [grpc.aio.insecure_channel(server.target) for _ in range(8)]
        stubs = [pb_grpc.ReservationsStub(channel) for channel in channels]
        for channel in channels:
            await channel.channel_ready()
        start = asyncio.Event()
        waiting = 0

        async def buyer(i: int) -> bool:
            nonlocal waiting
            waiting += 1
            if waiting == 500:
                start.set()  # every buyer is at the line: all 500 calls go out together
            await start.wait()
            response = await recorder.call(
                i + 1, "reserve", stubs[i % len(stubs)].Reserve, cart(f"buyer-{i}", ("hot", 1))
            )
            return response.granted

        outcomes = await asyncio.gather(*(buyer(i) for i in range(500)))
        for channel in channels:
            await channel.close()
        granted = sum(outcomes)
        stock = await server.stock("hot")
        final = await read_final_state(
            server.reservations, ["hot"], [f"buyer-{i}" for i in range(500)],
            seq=server.daemon.ledger.seq,
        )
    oversold = max(0, granted - 50)
    assert oversold == 0
    assert granted == 50
    assert (stock.on_hand, stock.reserved, stock.available) == (50, 50, 0)
    report = check(recorder.ops, final=final)
    print(f"500-client race history: {report}")
    assert report.ok, report
    assert (report.mutations, report.sold_out) == (51, 450)


@aio
async def test_overlapping_three_line_carts_are_all_or_nothing():
    skus = ["a", "b", "c", "d", "e"]
    supply = 40
    rng = random.Random(7)
    async with running() as server:
        for sku in skus:
            await server.set_stock(sku, supply)
        carts = [
            [(sku, rng.randint(1, 3)) for sku in rng.sample(skus, 3)] for _ in range(300)
        ]
        responses = await asyncio.gather(
            *(server.reservations.Reserve(cart(f"cart-{i}", *lines)) for i, lines in enumerate(carts))
        )
        granted_units = dict.fromkeys(skus, 0)
        for lines, response in zip(carts, responses):
            given = [line.granted for line in response.lines]
            asked = [quantity for _, quantity in lines]
            if response.granted:
                assert given == asked, "a granted cart has every line in full"
                for sku, quantity in lines:
                    granted_units[sku] += quantity
            else:
                assert given == [0, 0, 0], "a refused cart holds nothing"
        assert any(not r.granted for r in responses), "the race must run out of stock"
        for sku in skus:
            stock = await server.stock(sku)
            oversold = max(0, granted_units[sku] - supply)
            assert oversold == 0
            assert stock.reserved == granted_units[sku]
            assert stock.available == supply - granted_units[sku] >= 0


@aio
async def test_allow_partial_clamps_each_line_to_what_is_available():
    async with running() as server:
        await server.set_stock("a", 3)
        await server.set_stock("b", 0)
        await server.set_stock("c", 10)
        response = await server.reservations.Reserve(
            cart("p1", ("a", 5), ("b", 2), ("c", 4), allow_partial=True)
        )
        assert response.granted
        assert [(l.granted, l.available) for l in response.lines] == [(3, 0), (0, 0), (4, 6)]
        released = await server.reservations.Release(pb.ReleaseRequest(reservation_id="p1"))
        assert released.state == pb.RELEASED
        assert [(l.sku, l.quantity) for l in released.lines] == [("a", 3), ("c", 4)]
        assert (await server.stock("a")).available == 3
        none_left = await server.reservations.Reserve(
            cart("p2", ("b", 2), allow_partial=True)
        )
        assert not none_left.granted and none_left.lines[0].granted == 0


@aio
async def test_sold_out_is_an_answer_with_what_is_available():
    async with running() as server:
        await server.set_stock("x", 2)
        response = await server.reservations.Reserve(cart("r1", ("x", 3)))
        assert not response.granted
        assert (response.lines[0].requested, response.lines[0].available) == (3, 2)
        assert response.sequence == 0 and response.expires_at_ms == 0
        # Not recorded: the same id may try again after a restock.
        await server.admin.AdjustStock(
            pb.AdjustStockRequest(sku="x", delta=5, adjustment_id="receipt-1")
        )
        again = await server.reservations.Reserve(cart("r1", ("x", 3)))
        assert again.granted and not again.replayed


@aio
async def test_idempotent_retries_reserve_nothing_more():
    async with running() as server:
        await server.set_stock("s", 10)
        first = await server.reservations.Reserve(cart("order-1", ("s", 4), ttl_seconds=60))
        retries = await asyncio.gather(
            *(server.reservations.Reserve(cart("order-1", ("s", 4), ttl_seconds=60)) for _ in range(20))
        )
        assert first.granted and not first.replayed
        for retry in retries:
            assert retry.granted and retry.replayed
            assert retry.sequence == first.sequence
            assert retry.expires_at_ms == first.expires_at_ms
        assert (await server.stock("s")).reserved == 4
        code, details = await _code(
            server.reservations.Reserve(cart("order-1", ("s", 5), ttl_seconds=60))
        )
        assert code == grpc.StatusCode.ALREADY_EXISTS and "order-1" in details
        assert (await server.stock("s")).reserved == 4


@aio
async def test_concurrent_first_attempts_with_one_id_take_stock_once():
    async with running() as server:
        await server.set_stock("s", 100)
        responses = await asyncio.gather(
            *(server.reservations.Reserve(cart("same", ("s", 7))) for _ in range(50))
        )
        assert all(r.granted for r in responses)
        assert sum(not r.replayed for r in responses) == 1
        assert (await server.stock("s")).reserved == 7


@aio
async def test_lifecycle_commit_fewer_then_fulfil():
    async with running() as server:
        await server.set_stock("a", 10)
        await server.set_stock("b", 10)
        await server.reservations.Reserve(cart("o", ("a", 3), ("b", 2)))
        committed = await server.reservations.Commit(
            pb.CommitRequest(reservation_id="o", lines=[pb.Line(sku="a", quantity=1)])
        )
        assert committed.state == pb.COMMITTED and committed.expires_at_ms == 0
        assert [(l.sku, l.quantity) for l in committed.lines] == [("a", 1), ("b", 2)]
        a, b = await server.stock("a"), await server.stock("b")
        assert (a.reserved, a.committed, a.available) == (0, 1, 9)
        assert (b.reserved, b.committed, b.available) == (0, 2, 8)
        again = await server.reservations.Commit(
            pb.CommitRequest(reservation_id="o", lines=[pb.Line(sku="a", quantity=1)])
        )
        assert again.replayed
        code, _ = await _code(server.reservations.Commit(pb.CommitRequest(reservation_id="o")))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        fulfilled = await server.reservations.Fulfil(pb.FulfilRequest(reservation_id="o"))
        assert fulfilled.state == pb.FULFILLED
        assert (await server.reservations.Fulfil(pb.FulfilRequest(reservation_id="o"))).replayed
        a = await server.stock("a")
        assert (a.on_hand, a.committed, a.available) == (9, 0, 9)
        code, details = await _code(
            server.reservations.Release(pb.ReleaseRequest(reservation_id="o"))
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "fulfilled" in details


@aio
async def test_release_held_and_committed_is_idempotent():
    async with running() as server:
        await server.set_stock("a", 5)
        await server.reservations.Reserve(cart("held", ("a", 2)))
        await server.reservations.Reserve(cart("done", ("a", 3)))
        await server.reservations.Commit(pb.CommitRequest(reservation_id="done"))
        for reservation_id in ("held", "done"):
            first = await server.reservations.Release(pb.ReleaseRequest(reservation_id=reservation_id))
            second = await server.reservations.Release(pb.ReleaseRequest(reservation_id=reservation_id))
            assert first.state == second.state == pb.RELEASED
            assert not first.replayed and second.replayed
        stock = await server.stock("a")
        assert (stock.reserved, stock.committed, stock.available) == (0, 0, 5)
        code, _ = await _code(server.reservations.Fulfil(pb.FulfilRequest(reservation_id="held")))
        assert code == grpc.StatusCode.FAILED_PRECONDITION


@aio
async def test_expiry_with_an_injected_clock():
    clock = ManualClock()
    async with running(clock=clock) as server:
        await server.set_stock("t", 5)
        held = await server.reservations.Reserve(cart("cart-1", ("t", 2), ttl_seconds=30))
        await server.reservations.Reserve(cart("cart-2", ("t", 1), ttl_seconds=30))
        await server.reservations.Reserve(cart("paid", ("t", 1), ttl_seconds=30))
        assert held.expires_at_ms == clock.now_ms() + 30_000
        await server.reservations.Commit(pb.CommitRequest(reservation_id="paid"))
        clock.advance(20_000)
        extended = await server.reservations.Extend(
            pb.ExtendRequest(reservation_id="cart-2", ttl_seconds=60)
        )
        assert extended.expires_at_ms == clock.now_ms() + 60_000
        clock.advance(10_000)  # cart-1 is due; cart-2 was extended; paid is committed

        async def swept() -> bool:
            return (await server.stock("t")).reserved == 1

        await eventually(swept, "expired by the sweep")
        stock = await server.stock("t")
        assert (stock.reserved, stock.committed, stock.available) == (1, 1, 3)
        code, details = await _code(
            server.reservations.Commit(pb.CommitRequest(reservation_id="cart-1"))
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "expired" in details
        released = await server.reservations.Release(pb.ReleaseRequest(reservation_id="cart-1"))
        assert released.state == pb.EXPIRED and released.replayed
        clock.advance(60_000)
        code, details = await _code(
            server.reservations.Extend(pb.ExtendRequest(reservation_id="cart-2", ttl_seconds=5))
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "expired" in details
        stock = await server.stock("t")
        assert (stock.reserved, stock.committed, stock.available) == (0, 1, 4)


@aio
async def test_unknown_sku_and_unknown_reservation_are_not_found():
    async with running() as server:
        await server.set_stock("known", 5)
        code, details = await _code(
            server.reservations.Reserve(cart("r", ("known", 1), ("ghost", 1)))
        )
        assert code == grpc.StatusCode.NOT_FOUND and "ghost" in details
        assert (await server.stock("known")).reserved == 0
        for method, request in (
            (server.reservations.Commit, pb.CommitRequest(reservation_id="nope")),
            (server.reservations.Release, pb.ReleaseRequest(reservation_id="nope")),
            (server.reservations.Fulfil, pb.FulfilRequest(reservation_id="nope")),
            (server.reservations.Extend, pb.ExtendRequest(reservation_id="nope", ttl_seconds=5)),
        ):
            code, details = await _code(method(request))
            assert code == grpc.StatusCode.NOT_FOUND and "nope" in details
        code, details = await _code(server.reservations.GetStock(pb.GetStockRequest(skus=["ghost"])))
        assert code == grpc.StatusCode.NOT_FOUND and "ghost" in details


@aio
async def test_stock_admin_cas_shortfall_and_idempotency():
    async with running() as server:
        created = await server.admin.SetStock(
            pb.SetStockRequest(sku="k", on_hand=10, adjustment_id="count-1", reason="recount")
        )
        assert (created.stock.on_hand, created.previous_on_hand) == (10, 0)
        code, details = await _code(
            server.admin.AdjustStock(
                pb.AdjustStockRequest(sku="k", delta=5, adjustment_id="rcv-1", expected_on_hand=9)
            )
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "k" in details and "9" in details
        receipt = await server.admin.AdjustStock(
            pb.AdjustStockRequest(sku="k", delta=5, adjustment_id="rcv-1", expected_on_hand=10)
        )
        retry = await server.admin.AdjustStock(
            pb.AdjustStockRequest(sku="k", delta=5, adjustment_id="rcv-1", expected_on_hand=10)
        )
        assert receipt.stock.on_hand == retry.stock.on_hand == 15 and retry.replayed
        code, _ = await _code(
            server.admin.AdjustStock(pb.AdjustStockRequest(sku="k", delta=6, adjustment_id="rcv-1"))
        )
        assert code == grpc.StatusCode.ALREADY_EXISTS
        code, details = await _code(
            server.admin.AdjustStock(pb.AdjustStockRequest(sku="k", delta=-16, adjustment_id="dmg"))
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION, (code, details)
        assert "delta" in details and "'k'" in details, details
        assert (await server.stock("k")).on_hand == 15, "a refused adjustment changes nothing"
        code, _ = await _code(
            server.admin.AdjustStock(pb.AdjustStockRequest(sku="nope", delta=1, adjustment_id="x"))
        )
        assert code == grpc.StatusCode.NOT_FOUND
        await server.reservations.Reserve(cart("r", ("k", 12)))
        recount = await server.admin.SetStock(
            pb.SetStockRequest(sku="k", on_hand=8, adjustment_id="count-2", reason="shrinkage")
        )
        assert recount.shortfall == 4
        assert (recount.stock.on_hand, recount.stock.reserved, recount.stock.available) == (8, 12, -4)
        assert (await server.stock("k")).on_hand == 8


@aio
async def test_watch_streams_every_change_in_order_and_resumes():
    async with running() as server:
        await server.set_stock("w", 10)
        await server.set_stock("other", 10)
        call = server.reservations.WatchStock(pb.WatchStockRequest(skus=["w"]))
        first = await call.read()
        assert first.snapshot and first.sku == "w" and first.available == 10
        for i in range(5):
            await server.reservations.Reserve(cart(f"w{i}", ("w", 1), ("other", 1)))
        seen = [await call.read() for _ in range(5)]
        call.cancel()
        assert [u.reserved for u in seen] == [1, 2, 3, 4, 5]
        assert all(u.sku == "w" and not u.snapshot for u in seen)
        assert [u.sequence for u in seen] == sorted(u.sequence for u in seen)
        resume_from = seen[1].sequence
        resumed = server.reservations.WatchStock(
            pb.WatchStockRequest(skus=["w"], from_sequence=resume_from)
        )
        again = [await resumed.read() for _ in range(3)]
        resumed.cancel()
        assert [u.sequence for u in again] == [u.sequence for u in seen[2:]]


@aio
async def test_slow_watcher_gets_a_coalesced_snapshot_memory_stays_bounded():
    config = test_config(watch_ring_capacity=64)
    async with running(config) as server:
        await server.set_stock("w", 1000)
        call = server.reservations.WatchStock(pb.WatchStockRequest(skus=["w"]))
        await call.read()
        ledger = server.daemon.ledger
        # Far more changes than the ring holds, applied without yielding to the watcher.
        for i in range(300):
            assert ledger.reserve(f"w{i}", ("w",), (1,), "", 600, False).granted
        await server.daemon.log.commit()
        assert server.daemon.table.ring_head - server.daemon.table.ring_tail <= 64
        updates = []
        while True:
            update = await asyncio.wait_for(call.read(), 5)
            updates.append(update)
            if update.reserved == 300:
                break
        call.cancel()
        assert any(u.snapshot for u in updates), "the lost span is folded into a snapshot"
        assert len(updates) < 300
        assert [u.sequence for u in updates] == sorted(u.sequence for u in updates)
