"""Reservations.Batch and BatchStream on a real server: each op answered on its own, exactly as
its unary RPC; one durability wait per batch; the fail-closed paths answer each op UNAVAILABLE."""
from __future__ import annotations

import asyncio
import errno

import grpc
import pytest
from conftest import aio, cart, running, test_config
from redisserver import Proxy, RedisServer, require_redis_server
from walfaults import FaultyFiles

from reservd.v1 import reservd_pb2 as pb

OK = "ok"


def ops(*items: pb.BatchOp | tuple[str, object]) -> pb.BatchRequest:
    """``("reserve", ReserveRequest)``, ``("commit", CommitRequest)``... or a bare BatchOp."""
    return pb.BatchRequest(
        ops=[
            item if isinstance(item, pb.BatchOp) else pb.BatchOp(**{item[0]: item[1]})
            for item in items
        ]
    )


def outcome(result: pb.BatchResult) -> tuple[str, object]:
    """(kind, granted / state / (status code, message)) of one result."""
    kind = result.WhichOneof("result")
    if kind == "reserve":
        return kind, result.reserve.granted
    if kind == "reservation":
        return kind, pb.ReservationState.Name(result.reservation.state)
    return kind, (grpc.StatusCode.__members__[_code_name(result.error.code)], result.error.message)


def _code_name(number: int) -> str:
    return next(code.name for code in grpc.StatusCode if code.value[0] == number)


async def _unary_error(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), caught.value.details()


@aio
async def test_mixed_valid_and_invalid_ops_each_answered_as_unary_nothing_else_changed():
    async with running() as server:
        await server.set_stock("a", 5)
        await server.set_stock("b", 5)
        stub = server.reservations
        invalid = [  # the unary RPC answers INVALID_ARGUMENT (NOT_FOUND for the last)
            ("reserve", cart("", ("a", 1))),
            ("reserve", cart("dup", ("a", 1), ("a", 2))),
            ("reserve", cart("zero", ("a", 0))),
            ("reserve", cart("ttl", ("a", 1), ttl_seconds=86_401)),
            ("extend", pb.ExtendRequest(reservation_id="held", ttl_seconds=0)),
            ("commit", pb.CommitRequest(reservation_id="x" * 129)),
            ("reserve", cart("unknown", ("a", 1), ("nope", 1))),
        ]
        unary = {
            "reserve": stub.Reserve, "commit": stub.Commit, "extend": stub.Extend,
        }
        expected_invalid = [await _unary_error(unary[kind](request)) for kind, request in invalid]
        assert all(code is grpc.StatusCode.INVALID_ARGUMENT for code, _ in expected_invalid[:-1])
        assert expected_invalid[-1][0] is grpc.StatusCode.NOT_FOUND
        before = (await server.stock("a"), await server.stock("b"))
        response = await stub.Batch(
            ops(
                ("reserve", cart("held", ("a", 2), ("b", 1))),  # 0: granted
                *invalid,  # 1..7
                ("reserve", cart("big", ("a", 4))),  # 8: sold out (3 left)
                ("commit", pb.CommitRequest(reservation_id="missing")),  # 9: NOT_FOUND
                ("fulfil", pb.FulfilRequest(reservation_id="held")),  # 10: held, not committed
                pb.BatchOp(),  # 11: no op set
                ("reserve", cart("held", ("a", 3))),  # 12: same id, other payload
                ("commit", pb.CommitRequest(
                    reservation_id="held", lines=[pb.Line(sku="a", quantity=1)]
                )),
            )
        )
        got = [outcome(result) for result in response.results]
        assert len(got) == 14
        assert got[0] == ("reserve", True)
        for index, (code, message) in enumerate(expected_invalid, start=1):
            kind = invalid[index - 1][0]
            assert got[index] == ("error", (code, f"ops[{index}].{kind}.{message}"))
        assert got[7] == (
            "error",
            (grpc.StatusCode.NOT_FOUND, "ops[7].reserve.lines[1].sku: sku 'nope' is unknown"),
        )
        assert got[8] == ("reserve", False)
        assert response.results[8].reserve.lines[0].available == 3
        assert got[9] == ("error", (grpc.StatusCode.NOT_FOUND, "reservation 'missing' is unknown"))
        assert got[10][1][0] is grpc.StatusCode.FAILED_PRECONDITION
        assert got[11] == (
            "error",
            (grpc.StatusCode.INVALID_ARGUMENT,
             "ops[11]: must set one of reserve, commit, extend, release, fulfil"),
        )
        assert got[12][1][0] is grpc.StatusCode.ALREADY_EXISTS
        assert got[13] == ("reservation", "COMMITTED")
        # Only op 0 (2 a + 1 b) and op 13 (commit 1 a, the other returns) changed anything.
        a, b = await server.stock("a"), await server.stock("b")
        assert before[0].on_hand == a.on_hand == 5 and before[1].on_hand == b.on_hand == 5
        assert (a.reserved, a.committed, a.available) == (0, 1, 4)
        assert (b.reserved, b.committed, b.available) == (0, 1, 4)
        for rid in ("dup", "zero", "ttl", "unknown", "big"):
            request = pb.GetReservationRequest(reservation_id=rid)
            code, _ = await _unary_error(stub.GetReservation(request))
            assert code is grpc.StatusCode.NOT_FOUND


@aio
async def test_idempotent_replays_inside_and_across_batches():
    async with running() as server:
        await server.set_stock("a", 10)
        stub = server.reservations
        first = await stub.Batch(
            ops(
                ("reserve", cart("r1", ("a", 2))),
                ("reserve", cart("r1", ("a", 2))),
                ("release", pb.ReleaseRequest(reservation_id="r1")),
                ("release", pb.ReleaseRequest(reservation_id="r1")),
                ("reserve", cart("r2", ("a", 3))),
            )
        )
        original, replay, released, released_again, r2 = first.results
        assert original.reserve.granted and not original.reserve.replayed
        assert replay.reserve.granted and replay.reserve.replayed
        assert replay.reserve.sequence == original.reserve.sequence
        assert released.reservation.state == pb.RELEASED and not released.reservation.replayed
        assert released_again.reservation.replayed
        assert released_again.reservation.sequence == released.reservation.sequence
        second = await stub.Batch(
            ops(("reserve", cart("r2", ("a", 3))), ("reserve", cart("r2", ("a", 4))))
        )
        assert second.results[0].reserve.replayed
        assert second.results[0].reserve.sequence == r2.reserve.sequence
        assert second.results[1].error.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
        unary = await stub.Reserve(cart("r2", ("a", 3)))
        assert unary.replayed and unary.sequence == r2.reserve.sequence
        stock = await server.stock("a")
        assert (stock.reserved, stock.available) == (3, 7)


@aio
async def test_ops_apply_in_order_and_one_fsync_covers_the_batch(tmp_path):
    async with running(test_config(tmp_path / "data")) as server:
        await server.set_stock("a", 1000)
        stats = server.daemon.log.stats
        fsyncs, records = stats.fsyncs, stats.records
        request = ops(
            *(("reserve", cart(f"r{i}", ("a", 1))) for i in range(100)),
            ("commit", pb.CommitRequest(reservation_id="r0")),
            ("fulfil", pb.FulfilRequest(reservation_id="r0")),
        )
        response = await server.reservations.Batch(request)
        assert all(result.reserve.granted for result in response.results[:100])
        sequences = [result.reserve.sequence for result in response.results[:100]]
        assert sequences == sorted(sequences) and len(set(sequences)) == 100
        assert response.results[101].reservation.state == pb.FULFILLED
        assert stats.records - records == 102
        assert stats.fsyncs - fsyncs == 1
        registry = server.daemon.metrics.registry
        assert registry.get_sample_value("reservd_reserve_total", {"outcome": "granted"}) == 100
        stock = await server.stock("a")
        assert (stock.on_hand, stock.reserved, stock.committed) == (999, 99, 0)


@aio
async def test_a_batch_over_the_bound_or_empty_is_refused_whole():
    async with running() as server:
        await server.set_stock("a", 5000)
        limit = server.daemon.config.limits.batch_ops_max
        code, message = await _unary_error(
            server.reservations.Batch(
                ops(*(("reserve", cart(f"r{i}", ("a", 1))) for i in range(limit + 1)))
            )
        )
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert message == f"ops: must have at most {limit} ops, not {limit + 1}"
        code, message = await _unary_error(server.reservations.Batch(pb.BatchRequest()))
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert message == "ops: must have at least one op"
        assert (await server.stock("a")).reserved == 0


@aio
async def test_a_wal_failure_answers_each_op_of_the_batch_unavailable(tmp_path):
    files = FaultyFiles()
    async with running(test_config(tmp_path / "data"), wal_files=files) as server:
        await server.set_stock("a", 100)
        files.fail("fdatasync", errno.EIO)
        response = await server.reservations.Batch(
            ops(
                *(("reserve", cart(f"r{i}", ("a", 1))) for i in range(10)),
                ("reserve", cart("", ("a", 1))),
            )
        )
        got = [outcome(result) for result in response.results]
        for kind, (code, message) in got[:10]:
            assert (kind, code) == ("error", grpc.StatusCode.UNAVAILABLE)
            assert message.startswith("not acknowledged: ")
        assert got[10][1][0] is grpc.StatusCode.INVALID_ARGUMENT
        # From now on nothing is applied: each op says why.
        response = await server.reservations.Batch(
            ops(
                ("reserve", cart("later", ("a", 1))),
                ("release", pb.ReleaseRequest(reservation_id="r0")),
            )
        )
        reserve, release = (outcome(result) for result in response.results)
        assert reserve[1][0] is grpc.StatusCode.UNAVAILABLE
        assert reserve[1][1].startswith("reservations are closed: wal: ")
        assert release[1][0] is grpc.StatusCode.UNAVAILABLE
        assert release[1][1].startswith("writes are closed: wal: ")


@pytest.mark.redis
@aio
async def test_a_mirror_partition_answers_each_grant_unavailable_and_the_retry_returns_it(tmp_path):
    require_redis_server()
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    proxy = Proxy(redis.port)
    proxy.start()
    try:
        config = test_config(tmp_path / "data", redis_url=proxy.url)
        async with running(config) as server:
            serving = asyncio.Event()
            closed = asyncio.Event()
            server.daemon.guard.add_listener(lambda on: (serving if on else closed).set())
            await server.set_stock("a", 100)
            await server.reservations.Reserve(cart("held", ("a", 1)))
            proxy.black_hole()
            # Applied before the guard knows: the mirror wait fails, each grant is UNAVAILABLE,
            # while the release (which makes stock more available) needs only the WAL.
            grants = [("reserve", cart(f"r{i}", ("a", 1))) for i in range(5)]
            response = await server.reservations.Batch(
                ops(*grants, ("release", pb.ReleaseRequest(reservation_id="held")))
            )
            got = [outcome(result) for result in response.results]
            for kind, (code, message) in got[:5]:
                assert (kind, code) == ("error", grpc.StatusCode.UNAVAILABLE)
                # Usually "not acknowledged: the Redis mirror is unreachable"; on a loaded
                # machine the guard may already be closed when the batch arrives.
                assert "the Redis mirror is unreachable" in message, message
            assert got[5] == ("reservation", "RELEASED")
            await asyncio.wait_for(closed.wait(), 5)
            response = await server.reservations.Batch(ops(*grants))
            for kind, (code, message) in map(outcome, response.results):
                assert code is grpc.StatusCode.UNAVAILABLE
                assert message.startswith("reservations are closed: ")
            proxy.restore()
            await asyncio.wait_for(serving.wait(), 10)
            response = await server.reservations.Batch(ops(*grants))
            assert all(r.reserve.granted and r.reserve.replayed for r in response.results)
            assert (await server.stock("a")).reserved == 5
    finally:
        proxy.close()
        redis.close()


@aio
async def test_batch_stream_answers_many_batches_in_flight_in_order(tmp_path):
    async with running(test_config(tmp_path / "data")) as server:
        await server.set_stock("a", 150)
        batches = [
            ops(*(("reserve", cart(f"s{b}-{i}", ("a", 1))) for i in range(20)))
            for b in range(10)
        ]

        async def requests():
            for request in batches:
                yield request

        responses = [response async for response in server.reservations.BatchStream(requests())]
        assert len(responses) == 10
        granted = [[r.reserve.granted for r in response.results] for response in responses]
        # In order: the first 150 ops (7.5 batches) are granted, the rest sold out.
        assert [sum(g) for g in granted] == [20] * 7 + [10, 0, 0]
        assert granted[7] == [True] * 10 + [False] * 10
        stock = await server.stock("a")
        assert (stock.reserved, stock.available) == (150, 0)


@aio
async def test_batch_stream_refuses_an_oversized_batch_after_answering_the_earlier_ones():
    async with running() as server:
        await server.set_stock("a", 5000)
        limit = server.daemon.config.limits.batch_ops_max

        async def requests():
            yield ops(("reserve", cart("first", ("a", 1))))
            yield ops(*(("reserve", cart(f"r{i}", ("a", 1))) for i in range(limit + 1)))

        call = server.reservations.BatchStream(requests())
        first = await call.read()
        assert first.results[0].reserve.granted
        code, message = await _unary_error(call.read())
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert message.startswith("ops: must have at most")
        assert (await server.stock("a")).reserved == 1


@aio
async def test_batch_stream_refuses_an_undecodable_message_naming_the_field():
    async with running() as server:
        await server.set_stock("a", 10)
        call = server.channel.stream_stream(
            "/reservd.v1.Reservations/BatchStream",
            request_serializer=None, response_deserializer=pb.BatchResponse.FromString,
        )()
        await call.write(ops(("reserve", cart("first", ("a", 1)))).SerializeToString())
        first = await call.read()
        assert first.results[0].reserve.granted
        # ops[0].reserve.reservation_id (field 1 of ReserveRequest) holding invalid UTF-8.
        bad_id = b"\x0a\x02\xff\xfe"
        reserve = b"\x0a" + bytes([len(bad_id)]) + bad_id
        await call.write(b"\x0a" + bytes([len(reserve)]) + reserve)
        code, message = await _unary_error(call.read())
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert "ops[0].reserve.reservation_id" in message, message
        assert (await server.stock("a")).reserved == 1
