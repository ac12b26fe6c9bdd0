"""The ``safety_stock`` state through a real daemon (HoldStock): held units are on hand but never
available to any channel, they come only from the shared bucket, a race with reservations never
oversells, and a restart (log replay, snapshots) keeps them; GetStock, WatchStock and the Redis
mirror count them."""
from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio as aioredis
from conftest import aio, cart, eventually, running, test_config

from reservd import state_codec
from reservd.clock import ManualClock
from reservd.config import Config
from reservd.ledger import Ledger, Rejection
from reservd.ledger_channels import unwrap, wrap
from reservd.stockstates import StateOutcome
from reservd.v1 import reservd_pb2 as pb

from test_ledger_model import RecordingLog
from test_stockstates import TABLES

PREFIX = Config().redis_prefix


def _hold(server, change_id: str, sku: str, units: int, state: str = "safety_stock"):
    return server.admin.HoldStock(pb.HoldStockRequest(
        change_id=change_id, sku=sku, state=state, units=units))


async def _stock(server, sku: str) -> tuple[int, ...]:
    """(on_hand, reserved, committed, available, quality_control, safety_stock)."""
    s = (await server.reservations.GetStock(pb.GetStockRequest(skus=[sku]))).stock[0]
    return (s.on_hand, s.reserved, s.committed, s.available, s.quality_control, s.safety_stock)


async def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), caught.value.details()


@aio
async def test_held_units_are_on_hand_and_never_available():
    async with running() as server:
        await server.set_stock("tee", 10)
        answer = await _hold(server, "h-1", "tee", 4)
        assert (answer.stock.on_hand, answer.stock.available, answer.stock.safety_stock) == (
            10, 6, 4)
        assert await _stock(server, "tee") == (10, 0, 0, 6, 0, 4)
        assert not (await server.reservations.Reserve(cart("r1", ("tee", 7)))).granted
        assert (await server.reservations.Reserve(cart("r2", ("tee", 6)))).granted
        assert not (await server.reservations.Reserve(cart("r3", ("tee", 1)))).granted
        # Refusals name the field and change nothing.
        code, details = await _code(_hold(server, "h-2", "tee", 1))
        assert code is grpc.StatusCode.FAILED_PRECONDITION and "units" in details
        code, details = await _code(_hold(server, "h-3", "tee", -5))
        assert code is grpc.StatusCode.FAILED_PRECONDITION and "units" in details
        code, details = await _code(_hold(server, "h-4", "tee", 1, state="damaged"))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "state" in details
        code, details = await _code(_hold(server, "h-5", "tee", 0))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "units" in details
        code, _ = await _code(_hold(server, "h-6", "nope", 1))
        assert code is grpc.StatusCode.NOT_FOUND
        assert await _stock(server, "tee") == (10, 6, 0, 0, 0, 4)
        # Idempotent by change id; another payload under it is refused.
        again = await _hold(server, "h-1", "tee", 4)
        assert again.replayed and again.sequence == answer.sequence
        code, details = await _code(_hold(server, "h-1", "tee", 3))
        assert code is grpc.StatusCode.ALREADY_EXISTS and "change_id" in details
        # Returned units are available again; quality_control is held the same way.
        await server.reservations.Release(pb.ReleaseRequest(reservation_id="r2"))
        await _hold(server, "h-7", "tee", -3)
        await _hold(server, "h-8", "tee", 2, state="quality_control")
        assert await _stock(server, "tee") == (10, 0, 0, 7, 2, 1)


@aio
async def test_only_the_shared_bucket_is_held():
    async with running() as server:
        await server.set_stock("cap", 10)
        await server.admin.SetChannel(pb.SetChannelRequest(
            channel="tiktok", policy=pb.ChannelPolicy(pool="tiktok", pool_only=True),
            change_id="c-1"))
        await server.admin.Allocate(pb.AllocateRequest(
            sku="cap", from_bucket="shared", to_bucket="tiktok", units=6, change_id="a-1"))
        code, details = await _code(_hold(server, "h-1", "cap", 5))
        assert code is grpc.StatusCode.FAILED_PRECONDITION and "shared" in details
        await _hold(server, "h-2", "cap", 4)
        buckets = await server.admin.GetBuckets(pb.GetBucketsRequest(skus=["cap"]))
        assert {b.bucket: b.free for b in buckets.skus[0].buckets} == {"shared": 0, "tiktok": 6}
        # The pool's units are whole: tiktok may still reserve all six.
        assert (await server.reservations.Reserve(cart("t1", ("cap", 6), channel="tiktok"))
                ).granted
        assert await _stock(server, "cap") == (10, 6, 0, 0, 0, 4)


@aio
async def test_holding_racing_reservations_never_oversells():
    async with running() as server:
        await server.set_stock("mug", 10)
        reserves = [server.reservations.Reserve(cart(f"m{i}", ("mug", 1))) for i in range(30)]
        hold = _hold(server, "h-m", "mug", 5)
        results = await asyncio.gather(*reserves[:10], hold, *reserves[10:],
                                       return_exceptions=True)
        granted = sum(1 for r in results if isinstance(r, pb.ReserveResponse) and r.granted)
        held = 5 if isinstance(results[10], pb.StockStateResponse) else 0
        if not held:  # refused only because reservations took the shared units first
            assert results[10].code() is grpc.StatusCode.FAILED_PRECONDITION
            assert granted > 5
        assert granted + held == 10
        assert await _stock(server, "mug") == (10, granted, 0, 0, 0, held)


@pytest.mark.parametrize("snapshot_records_interval", [1_000_000, 3])
@aio
async def test_a_restart_keeps_held_units(tmp_path, snapshot_records_interval):
    config = test_config(tmp_path / "data", snapshot_records_interval=snapshot_records_interval)
    async with running(config) as server:
        await server.set_stock("hat", 9)
        await _hold(server, "h-1", "hat", 3)
        await _hold(server, "h-2", "hat", 2, state="quality_control")
        await server.reservations.Reserve(cart("c1", ("hat", 2)))
        await _hold(server, "h-3", "hat", -1)
        before = await _stock(server, "hat")
    assert before == (9, 2, 0, 3, 2, 2)
    async with running(config) as server:
        assert await _stock(server, "hat") == before
        assert (await _hold(server, "h-1", "hat", 3)).replayed
        assert not (await server.reservations.Reserve(cart("c2", ("hat", 4)))).granted
        assert (await server.reservations.Reserve(cart("c3", ("hat", 3)))).granted


@aio
async def test_watch_stock_shows_held_units_leaving_available():
    async with running() as server:
        await server.set_stock("hat", 5)
        stream = server.reservations.WatchStock(pb.WatchStockRequest(skus=["hat"]))
        updates = stream.__aiter__()
        first = await updates.__anext__()
        assert first.snapshot and (first.on_hand, first.available) == (5, 5)
        await _hold(server, "h-w", "hat", 2)
        update = await updates.__anext__()
        assert (update.on_hand, update.available) == (5, 3)
        stream.cancel()



@aio
async def test_the_mirror_shows_held_units_as_not_available(tmp_path, redis_server):
    client = aioredis.Redis(port=redis_server.port)
    config = test_config(tmp_path / "data", redis_url=redis_server.url)
    try:
        async with running(config) as server:
            await server.set_stock("hero", 8)
            await _hold(server, "h-r", "hero", 3)
            daemon = server.daemon

            async def mirrored():
                stored = await client.hgetall(PREFIX + "stock:hero")
                return (daemon.mirror.settled_seq == daemon.ledger.seq
                        and stored.get(b"available") == b"5")

            await eventually(mirrored, "mirrored")
            stored = await client.hgetall(PREFIX + "stock:hero")
            assert (stored[b"on_hand"], stored[b"available"]) == (b"8", b"5")
    finally:
        await client.aclose()


# -- in the ledger: replay, snapshots (format 8) and the older formats -------------------------

@pytest.mark.parametrize("table_class", TABLES)
def test_replay_and_snapshot_keep_held_units(table_class):
    ledger = Ledger(table_class(), RecordingLog(), ManualClock(), Config())
    ledger.set_stock("s1", "A", 10, None, "")
    ledger.set_stock("s2", "B", 4, None, "")
    assert ledger.hold_stock("h1", "A", "safety_stock", 4).safety_stock == 4
    ledger.hold_stock("h2", "A", "quality_control", 1)
    ledger.receive_return("ret-1", "A", 2, "")
    ledger.hold_stock("h3", "A", "safety_stock", -1)
    assert ledger.reserve("r1", ("A",), (5,), "web", 60, False).granted
    refused = ledger.hold_stock("h4", "A", "safety_stock", 2)
    assert isinstance(refused, Rejection) and refused.field == "units"

    def state(of: Ledger) -> tuple:
        handle = of.table.lookup("A")
        return (of.table.counters(handle), of.table.unsellable(handle), of.states.of("A"),
                of._available(("A", "B")))

    expected = state(ledger)
    assert expected == ((12, 5, 0), 6, (2, 0, 1, 3), (1, 4))
    replica = Ledger(table_class(), RecordingLog(), ManualClock(), Config())
    for seq, record_type, payload in ledger.log.records:
        replica.replay(seq, record_type, payload)
    assert state(replica) == expected
    _, encode = ledger.snapshot_state()
    payload = encode()
    restored = Ledger(table_class(), RecordingLog(), ManualClock(), Config())
    restored.restore(payload)
    restored.log.last_seq = restored.seq
    assert state(restored) == expected
    again = restored.hold_stock("h1", "A", "safety_stock", 4)
    assert isinstance(again, StateOutcome) and again.replayed
    assert not restored.reserve("r2", ("A",), (2,), "web", 60, False).granted


@pytest.mark.parametrize("table_class", TABLES)
def test_a_format_7_snapshot_is_still_read(table_class):
    """Format 8 only added the safety_stock section: a snapshot without it, labelled 7, is
    what an older reservd wrote."""
    ledger = Ledger(table_class(), RecordingLog(), ManualClock(), Config())
    ledger.set_stock("s1", "A", 10, None, "")
    ledger.receive_return("ret-1", "A", 2, "")
    _, encode = ledger.snapshot_state()
    payload, channel_rows = unwrap(encode())
    assert state_codec._HEAD.unpack_from(payload)[1] == 8
    old = bytearray(payload)
    state_codec._HEAD.pack_into(old, 0, state_codec.MAGIC, 7, ledger.seq)
    restored = Ledger(table_class(), RecordingLog(), ManualClock(), Config())
    restored.restore(wrap(bytes(old), channel_rows))
    assert restored.states.of("A") == (2, 0, 0, 0)
    assert restored._available(("A",)) == (10,)
