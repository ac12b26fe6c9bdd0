"""Bad input gets INVALID_ARGUMENT naming the field and the rule, and changes nothing."""
from __future__ import annotations

import grpc
import pytest
from conftest import aio, cart, running

from reservd.v1 import reservd_pb2 as pb

LONG = "x" * 129
EMOJI_LONG = "\N{PACKAGE}" * 33  # 132 bytes in UTF-8, 33 characters


def _line(sku="ok", quantity=1):
    return pb.Line(sku=sku, quantity=quantity)


RESERVE_CASES = [
    ("empty id", pb.ReserveRequest(reservation_id="", lines=[_line()]), "reservation_id", "empty"),
    ("long id", pb.ReserveRequest(reservation_id=LONG, lines=[_line()]), "reservation_id", "128 bytes"),
    ("multibyte id", pb.ReserveRequest(reservation_id=EMOJI_LONG, lines=[_line()]), "reservation_id", "128 bytes"),
    ("control char id", pb.ReserveRequest(reservation_id="a\x00b", lines=[_line()]), "reservation_id", "printable"),
    ("newline in sku", pb.ReserveRequest(reservation_id="r", lines=[_line("o\nk")]), "lines[0].sku", "printable"),
    ("empty sku", pb.ReserveRequest(reservation_id="r", lines=[_line("")]), "lines[0].sku", "empty"),
    ("long sku", pb.ReserveRequest(reservation_id="r", lines=[_line(LONG)]), "lines[0].sku", "128 bytes"),
    ("no lines", pb.ReserveRequest(reservation_id="r"), "lines", "at least one"),
    ("zero quantity", pb.ReserveRequest(reservation_id="r", lines=[_line(quantity=0)]), "lines[0].quantity", "between 1"),
    ("negative quantity", pb.ReserveRequest(reservation_id="r", lines=[_line(quantity=-3)]), "lines[0].quantity", "between 1"),
    ("absurd quantity", pb.ReserveRequest(reservation_id="r", lines=[_line(quantity=10**15)]), "lines[0].quantity", "1000000"),
    ("duplicate sku", pb.ReserveRequest(reservation_id="r", lines=[_line(), _line()]), "lines[1].sku", "duplicate"),
    ("too many lines", pb.ReserveRequest(reservation_id="r", lines=[_line(f"s{i}") for i in range(101)]), "lines", "at most 100"),
    ("ttl negative", pb.ReserveRequest(reservation_id="r", lines=[_line()], ttl_seconds=-1), "ttl_seconds", "between"),
    ("ttl too long", pb.ReserveRequest(reservation_id="r", lines=[_line()], ttl_seconds=86_401), "ttl_seconds", "86400"),
    ("long channel", pb.ReserveRequest(reservation_id="r", lines=[_line()], channel="c" * 65), "channel", "64 bytes"),
]


async def _invalid(call) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return caught.value.details()


@aio
async def test_every_bad_reserve_is_rejected_naming_field_and_rule():
    async with running() as server:
        await server.set_stock("ok", 5)
        seq_before = server.daemon.ledger.seq
        for name, request, field, rule in RESERVE_CASES:
            details = await _invalid(server.reservations.Reserve(request))
            assert details.startswith(field + ":"), (name, details)
            assert rule in details, (name, details)
        assert server.daemon.ledger.seq == seq_before, "bad input changed nothing"
        assert (await server.stock("ok")).available == 5


@aio
async def test_bad_admin_and_lifecycle_input_is_rejected():
    async with running() as server:
        await server.set_stock("ok", 5)
        await server.reservations.Reserve(cart("r", ("ok", 2)))
        seq_before = server.daemon.ledger.seq
        cases = [
            (server.admin.SetStock(pb.SetStockRequest(sku="ok", on_hand=-1, adjustment_id="a")), "on_hand:"),
            (server.admin.SetStock(pb.SetStockRequest(sku="ok", on_hand=1)), "adjustment_id:"),
            (server.admin.SetStock(pb.SetStockRequest(sku="", on_hand=1, adjustment_id="a")), "sku:"),
            (server.admin.SetStock(pb.SetStockRequest(sku="ok", on_hand=10**13, adjustment_id="a")), "on_hand:"),
            (server.admin.AdjustStock(pb.AdjustStockRequest(sku="ok", delta=0, adjustment_id="a")), "delta:"),
            (server.admin.AdjustStock(pb.AdjustStockRequest(sku="ok", delta=1, adjustment_id="a", reason="r" * 257)), "reason:"),
            (server.reservations.Commit(pb.CommitRequest(reservation_id="r", lines=[_line(quantity=-1)])), "lines[0].quantity:"),
            (server.reservations.Extend(pb.ExtendRequest(reservation_id="r", ttl_seconds=0)), "ttl_seconds:"),
            (server.reservations.Extend(pb.ExtendRequest(reservation_id="r", ttl_seconds=10**6)), "ttl_seconds:"),
            (server.reservations.Release(pb.ReleaseRequest(reservation_id="")), "reservation_id:"),
            (server.reservations.Fulfil(pb.FulfilRequest(reservation_id=LONG)), "reservation_id:"),
            (server.reservations.GetStock(pb.GetStockRequest()), "skus:"),
            (server.reservations.GetStock(pb.GetStockRequest(skus=["\x07"])), "skus[0]:"),
        ]
        for call, field in cases:
            details = await _invalid(call)
            assert details.startswith(field), details
        assert server.daemon.ledger.seq == seq_before
        stock = await server.stock("ok")
        assert (stock.on_hand, stock.reserved) == (5, 2)


@aio
async def test_commit_more_than_held_is_a_failed_precondition_and_changes_nothing():
    async with running() as server:
        await server.set_stock("ok", 5)
        await server.reservations.Reserve(cart("r", ("ok", 2)))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.reservations.Commit(
                pb.CommitRequest(reservation_id="r", lines=[_line(quantity=3)])
            )
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "'ok'" in caught.value.details() and "holds 2" in caught.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.reservations.Commit(
                pb.CommitRequest(reservation_id="r", lines=[_line("other", 1)])
            )
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        stock = await server.stock("ok")
        assert (stock.reserved, stock.committed) == (2, 0)


@aio
async def test_oversized_message_is_refused_by_the_transport_bound():
    async with running() as server:
        request = pb.ReserveRequest(
            reservation_id="big", lines=[_line(f"s{i:0120d}") for i in range(20_000)]
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.reservations.Reserve(request)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
