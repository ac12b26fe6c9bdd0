"""The auto-batching client (ReservdClient(batching=True)) against a real server: concurrent
calls share Batch RPCs, each caller gets exactly its own answer, and the fail-closed rules hold."""
from __future__ import annotations

import asyncio
import errno
import time

import grpc
import pytest
from conftest import aio, running, test_config
from walfaults import FaultyFiles

from reservd.client import ReservdClient, ReservdError
from reservd.walfile import FileLayer


class SlowSync(FileLayer):
    """Real files; every fdatasync takes ``seconds``, so calls pile up behind it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def fdatasync(self, fd: int) -> None:
        time.sleep(self.seconds)
        super().fdatasync(fd)


@aio
async def test_500_concurrent_callers_each_get_their_own_answer_exactly_50_granted():
    async with running() as server:
        await server.set_stock("hot", 50)
        for k in range(5):
            await server.set_stock(f"cold-{k}", 1000)
        client = ReservdClient(server.target, batching=True, deadline_seconds=30)
        start = asyncio.Event()

        async def caller(i: int):
            await start.wait()
            # Everyone races for "hot"; the second line is each caller's own, to tell answers apart.
            cart = {"hot": 1, f"cold-{i % 5}": i % 3 + 1}
            result = await client.reserve(f"caller-{i}", cart)
            assert result.error is None, result.error
            got = [(line.sku, line.requested) for line in result.response.lines]
            assert got == list(cart.items()), "someone else's answer"
            assert [line.granted for line in result.response.lines] == (
                list(cart.values()) if result.granted else [0, 0]
            )
            return result.granted

        tasks = [asyncio.create_task(caller(i)) for i in range(500)]
        await asyncio.sleep(0)
        start.set()
        outcomes = await asyncio.gather(*tasks)
        assert sum(outcomes) == 50
        stock = await server.stock("hot")
        assert (stock.reserved, stock.available) == (50, 0)
        for i in range(0, 500, 50):
            if outcomes[i]:
                assert (await client.get_reservation(f"caller-{i}")).state == 1  # HELD
            else:
                with pytest.raises(ReservdError):
                    await client.get_reservation(f"caller-{i}")
        # Coalesced: far fewer RPCs than calls (the first turn's 500 calls share one or two).
        batcher = client.batcher
        assert batcher.ops_sent == 500
        assert batcher.batches_sent <= 10
        registry = server.daemon.metrics.registry
        assert registry.get_sample_value("reservd_batch_ops_total") == 500
        await client.close()


@aio
async def test_each_op_kind_through_the_batcher_answers_its_own_outcome_or_error():
    async with running() as server:
        await server.set_stock("a", 10)
        async with ReservdClient(server.target, batching=True) as client:
            granted, missing = await asyncio.gather(
                client.reserve("r1", {"a": 3}),
                client.commit("nobody"),
                return_exceptions=True,
            )
            assert granted.granted and granted.response.lines[0].granted == 3
            assert isinstance(missing, ReservdError)
            assert missing.code is grpc.StatusCode.NOT_FOUND
            assert missing.details == "reservation 'nobody' is unknown"
            extended, other = await asyncio.gather(
                client.extend("r1", 900), client.reserve("r2", {"a": 1})
            )
            assert extended.state == 1 and other.granted
            committed = await client.commit("r1", {"a": 2})
            assert committed.state == 2 and committed.lines[0].quantity == 2
            fulfilled, released = await asyncio.gather(
                client.fulfil("r1"), client.release("r2")
            )
            assert fulfilled.state == 5 and released.state == 3
            invalid = await client.reserve("", {"a": 1})
            assert not invalid.granted
            assert invalid.error.code is grpc.StatusCode.INVALID_ARGUMENT
            assert invalid.error.details == "reservation_id: must not be empty"
            stock = await server.stock("a")
            assert (stock.on_hand, stock.reserved, stock.committed) == (8, 0, 0)


@aio
async def test_a_lone_call_goes_at_once_and_calls_during_flight_join_the_next_batch(tmp_path):
    async with running(test_config(tmp_path / "data"), wal_files=SlowSync(0.2)) as server:
        await server.set_stock("a", 100)
        async with ReservdClient(
            server.target, batching=True, batches_in_flight_max=1, deadline_seconds=30
        ) as client:
            batcher = client.batcher
            first = asyncio.ensure_future(client.reserve("lone", {"a": 1}))
            while batcher.batches_sent == 0:
                await asyncio.sleep(0)  # one loop turn: the lone call is sent, not held
            assert (batcher.batches_sent, batcher.ops_sent, batcher.in_flight) == (1, 1, 1)
            later = [
                asyncio.ensure_future(client.reserve(f"later-{i}", {"a": 1})) for i in range(10)
            ]
            results = await asyncio.gather(first, *later)
            assert all(result.granted for result in results)
            assert (batcher.batches_sent, batcher.ops_sent) == (2, 11)


@aio
async def test_a_batch_that_times_out_is_not_reserved_and_the_retry_with_the_same_id_returns_it(
    tmp_path,
):
    async with running(test_config(tmp_path / "data"), wal_files=SlowSync(0.5)) as server:
        await server.set_stock("a", 100)
        async with ReservdClient(
            server.target, batching=True, deadline_seconds=0.2, attempts_max=1
        ) as impatient:
            results = await asyncio.gather(
                *(impatient.reserve(f"r{i}", {"a": 1}) for i in range(5))
            )
        for result in results:
            assert not result.granted
            assert result.error.code is grpc.StatusCode.DEADLINE_EXCEEDED
        async with ReservdClient(server.target, batching=True, deadline_seconds=30) as patient:
            retries = await asyncio.gather(*(patient.reserve(f"r{i}", {"a": 1}) for i in range(5)))
        # The grants did land: the retries return them instead of taking more stock.
        assert all(result.granted and result.response.replayed for result in retries)
        assert (await server.stock("a")).reserved == 5


@aio
async def test_a_wal_failure_leaves_every_caller_of_the_batch_not_reserved(tmp_path):
    files = FaultyFiles()
    async with running(test_config(tmp_path / "data"), wal_files=files) as server:
        await server.set_stock("a", 100)
        files.fail("fdatasync", errno.EIO)
        async with ReservdClient(server.target, batching=True, deadline_seconds=5) as client:
            results = await asyncio.gather(*(client.reserve(f"r{i}", {"a": 1}) for i in range(20)))
        for result in results:
            assert not result.granted
            assert result.error.code is grpc.StatusCode.UNAVAILABLE


@aio
async def test_batches_are_bounded_in_ops_and_in_bytes():
    async with running() as server:
        await server.set_stock("a", 10_000)
        for ops_max, bytes_max in ((7, 1 << 20), (1000, 400)):
            async with ReservdClient(
                server.target, batching=True, batch_ops_max=ops_max, batch_bytes_max=bytes_max,
                deadline_seconds=30,
            ) as client:
                sent: list[tuple[int, int]] = []
                batch = client.batcher.batch_method

                def recording(request, timeout, batch=batch, sent=sent):
                    sent.append((len(request.ops), request.ByteSize()))
                    return batch(request, timeout=timeout)

                client.batcher.batch_method = recording
                results = await asyncio.gather(
                    *(client.reserve(f"{ops_max}-{i}", {"a": 1}) for i in range(50))
                )
                assert all(result.granted for result in results)
                assert sum(count for count, _ in sent) == 50
                assert all(count <= ops_max for count, _ in sent)
                assert all(size <= bytes_max for _, size in sent)
                assert len(sent) >= (8 if ops_max == 7 else 50 * 20 // 400)
