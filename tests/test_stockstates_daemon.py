"""The returns flow through a real daemon: a returned unit is never available before inspection,
a damaged one never; inspection racing reservations never oversells; a restart (log replay and
snapshots) rebuilds the same states."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from conftest import aio, cart, running, test_config

from reservd.v1 import reservd_pb2 as pb


async def _stock(server, sku: str) -> tuple[int, ...]:
    s = (await server.reservations.GetStock(pb.GetStockRequest(skus=[sku]))).stock[0]
    return (s.on_hand, s.reserved, s.committed, s.available, s.quarantine, s.damaged,
            s.quality_control)


async def _set(server, sku: str, on_hand: int) -> None:
    await server.admin.SetStock(
        pb.SetStockRequest(sku=sku, on_hand=on_hand, adjustment_id=f"s-{sku}")
    )


async def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), caught.value.details()


@aio
async def test_returned_units_are_available_only_after_inspection_and_damaged_never():
    async with running() as server:
        admin, reservations = server.admin, server.reservations
        await _set(server, "tee", 2)
        answer = await admin.ReceiveReturn(pb.ReceiveReturnRequest(
            return_id="rma-1", sku="tee", units=3, reservation_id="order-9"))
        assert (answer.stock.on_hand, answer.stock.available, answer.stock.quarantine) == (5, 2, 3)
        assert await _stock(server, "tee") == (5, 0, 0, 2, 3, 0, 0)
        assert not (await reservations.Reserve(cart("r1", ("tee", 3)))).granted
        assert (await reservations.Reserve(cart("r2", ("tee", 2)))).granted
        answer = await admin.Inspect(pb.InspectRequest(
            return_id="rma-1", sellable_units=1, damaged_units=2))
        assert await _stock(server, "tee") == (5, 2, 0, 1, 0, 2, 0)
        assert not (await reservations.Reserve(cart("r3", ("tee", 2)))).granted
        assert (await reservations.Reserve(cart("r4", ("tee", 1)))).granted
        await admin.WriteOff(pb.WriteOffRequest(change_id="wo-1", sku="tee", units=2,
                                                state="damaged"))
        assert await _stock(server, "tee") == (3, 3, 0, 0, 0, 0, 0)
        # Refusals name the field and change nothing.
        code, details = await _code(admin.WriteOff(pb.WriteOffRequest(
            change_id="wo-2", sku="tee", units=1, state="damaged")))
        assert code is grpc.StatusCode.FAILED_PRECONDITION and "units" in details
        code, details = await _code(admin.ReceiveReturn(pb.ReceiveReturnRequest(
            return_id="rma-2", sku="tee", units=0)))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "units" in details
        code, _ = await _code(admin.Inspect(pb.InspectRequest(return_id="nope", sellable_units=1)))
        assert code is grpc.StatusCode.NOT_FOUND
        assert await _stock(server, "tee") == (3, 3, 0, 0, 0, 0, 0)


@aio
async def test_inspection_racing_reservations_never_oversells():
    async with running() as server:
        await _set(server, "mug", 4)
        await server.admin.ReceiveReturn(pb.ReceiveReturnRequest(
            return_id="rma-m", sku="mug", units=6))
        reserves = [server.reservations.Reserve(cart(f"m{i}", ("mug", 1))) for i in range(30)]
        inspect = server.admin.Inspect(pb.InspectRequest(
            return_id="rma-m", sellable_units=5, damaged_units=1))
        results = await asyncio.gather(*reserves[:15], inspect, *reserves[15:])
        granted = sum(1 for r in results if isinstance(r, pb.ReserveResponse) and r.granted)
        # 4 sellable before inspection + 5 passed: never the damaged one, never more.
        assert granted == 9
        assert await _stock(server, "mug") == (10, 9, 0, 0, 0, 1, 0)


@pytest.mark.parametrize("snapshot_records_interval", [1_000_000, 3])
@aio
async def test_a_restart_rebuilds_the_same_states(tmp_path, snapshot_records_interval):
    config = test_config(tmp_path / "data", snapshot_records_interval=snapshot_records_interval)
    async with running(config) as server:
        await _set(server, "cap", 1)
        for i in range(3):
            await server.admin.ReceiveReturn(pb.ReceiveReturnRequest(
                return_id=f"rma-{i}", sku="cap", units=2))
        await server.admin.Inspect(pb.InspectRequest(
            return_id="rma-0", sellable_units=1, damaged_units=1))
        await server.reservations.Reserve(cart("c1", ("cap", 2)))
        before = await _stock(server, "cap")
    assert before == (7, 2, 0, 0, 4, 1, 0)
    async with running(config) as server:
        assert await _stock(server, "cap") == before
        again = await server.admin.ReceiveReturn(pb.ReceiveReturnRequest(
            return_id="rma-1", sku="cap", units=2))
        assert again.replayed
        await server.admin.Inspect(pb.InspectRequest(
            return_id="rma-1", sellable_units=2, damaged_units=0))
        assert (await server.reservations.Reserve(cart("c2", ("cap", 2)))).granted
        assert await _stock(server, "cap") == (7, 4, 0, 0, 2, 1, 0)


@aio
async def test_watch_stock_shows_returned_units_on_hand_but_not_available():
    async with running() as server:
        await _set(server, "hat", 2)
        stream = server.reservations.WatchStock(pb.WatchStockRequest(skus=["hat"]))
        updates = stream.__aiter__()
        first = await updates.__anext__()
        assert first.snapshot and (first.on_hand, first.available) == (2, 2)
        await server.admin.ReceiveReturn(pb.ReceiveReturnRequest(
            return_id="rma-h", sku="hat", units=3))
        update = await updates.__anext__()
        assert (update.on_hand, update.available) == (5, 2)
        await server.admin.Inspect(pb.InspectRequest(
            return_id="rma-h", sellable_units=3, damaged_units=0))
        update = await updates.__anext__()
        assert (update.on_hand, update.available) == (5, 5)
        stream.cancel()


@aio
async def test_expect_and_receive_through_the_daemon():
    async with running() as server:
        await _set(server, "sock", 1)
        answer = await server.admin.ExpectReceipt(pb.ExpectReceiptRequest(
            po_id="po-9", sku="sock", units=5, eta_ms=1_800_000_000_000))
        assert (answer.incoming, answer.on_hand) == (5, 1)
        stock = (await server.reservations.GetStock(pb.GetStockRequest(skus=["sock"]))).stock[0]
        assert (stock.on_hand, stock.available, stock.incoming) == (1, 1, 5)
        answer = await server.admin.Receive(pb.ReceiveRequest(
            receipt_id="rc-9", po_id="po-9", units=6))
        assert (answer.incoming, answer.on_hand, answer.over_received) == (0, 7, 1)
        code, details = await _code(server.admin.Receive(pb.ReceiveRequest(
            receipt_id="rc-10", po_id="po-9", units=0)))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "units" in details
