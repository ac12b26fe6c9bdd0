"""One waiter going away must not fail the others who share its wait (a WAL batch)."""
from __future__ import annotations

import asyncio
import time

import grpc
from conftest import aio, cart, running, test_config

from reservd.walfile import FileLayer


class SlowSync(FileLayer):
    """Real files; every fdatasync takes a while, so calls pile up in one batch."""

    def fdatasync(self, fd: int) -> None:
        time.sleep(0.3)
        super().fdatasync(fd)


@aio
async def test_a_cancelled_call_does_not_fail_the_rest_of_its_batch(tmp_path):
    async with running(test_config(tmp_path / "data"), wal_files=SlowSync()) as server:
        await server.set_stock("s", 100)
        # The first grant starts a slow flush; the next three share the batch after it.
        first = asyncio.ensure_future(server.reservations.Reserve(cart("first", ("s", 1))))
        await asyncio.sleep(0.05)
        impatient = asyncio.ensure_future(
            server.reservations.Reserve(cart("impatient", ("s", 1)), timeout=0.2)
        )
        patient = [
            asyncio.ensure_future(server.reservations.Reserve(cart(f"patient-{i}", ("s", 1))))
            for i in range(2)
        ]
        outcome = await asyncio.gather(impatient, return_exceptions=True)
        assert isinstance(outcome[0], grpc.aio.AioRpcError)
        assert outcome[0].code() == grpc.StatusCode.DEADLINE_EXCEEDED
        answers = await asyncio.gather(first, *patient)
        assert all(answer.granted for answer in answers)
        # The impatient grant is durable too; it was simply not acknowledged.
        assert (await server.stock("s")).reserved == 4
