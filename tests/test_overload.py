"""Overload is RESOURCE_EXHAUSTED or UNAVAILABLE with a retry hint, never CANCELLED to a
well-behaved client: a burst of fresh connections, a flood of header-only streams, and the
per-identity bounds (streams, rate). The daemon runs as a real process for the floods."""
from __future__ import annotations

import asyncio
import collections
import socket
import time

import grpc
import h2.config
import h2.connection
from conftest import aio, running, test_config
from daemonproc import DaemonProcess

from reservd import handlers
from reservd.v1 import reservd_pb2 as pb
from reservd.v1 import reservd_pb2_grpc as pb_grpc

# Answers a well-behaved client may get under overload; CANCELLED is not one of them.
FAIR = {"OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}


async def _bystanders(target: str, stop: asyncio.Event, codes: collections.Counter, count=8):
    """Clients on one established channel reserving one unit at a time until ``stop``."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ReservationsStub(channel)

        async def one(k: int) -> None:
            n = 0
            while not stop.is_set() and n < 10_000:
                n += 1
                request = pb.ReserveRequest(
                    reservation_id=f"bystander-{k}-{n}", lines=[pb.Line(sku="a", quantity=1)]
                )
                try:
                    await stub.Reserve(request, timeout=20)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    codes[error.code().name] += 1

        await asyncio.gather(*(one(k) for k in range(count)))


async def _seed(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        await pb_grpc.AdminStub(channel).SetStock(
            pb.SetStockRequest(sku="a", on_hand=10**9, adjustment_id="seed")
        )


@aio
async def test_a_burst_of_fresh_connections_is_never_cancelled():
    daemon = DaemonProcess("--in-memory").start()
    try:
        await _seed(daemon.target)
        stop = asyncio.Event()
        bystander_codes = collections.Counter()
        bystanders = asyncio.create_task(_bystanders(daemon.target, stop, bystander_codes))
        fresh_codes = collections.Counter()

        async def fresh(i: int) -> None:
            async with grpc.aio.insecure_channel(
                daemon.target, options=[("grpc.use_local_subchannel_pool", 1)]
            ) as channel:
                request = pb.ReserveRequest(
                    reservation_id=f"fresh-{i}", lines=[pb.Line(sku="a", quantity=1)]
                )
                try:
                    await pb_grpc.ReservationsStub(channel).Reserve(request, timeout=30)
                    fresh_codes["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    fresh_codes[error.code().name] += 1

        await asyncio.gather(*(fresh(i) for i in range(2_000)))
        stop.set()
        await bystanders
    finally:
        daemon.kill()
    assert sum(fresh_codes.values()) == 2_000
    assert set(fresh_codes) <= FAIR, fresh_codes
    assert set(bystander_codes) <= FAIR, bystander_codes
    assert fresh_codes["OK"] > 0 and bystander_codes["OK"] > 0


def _flood(port: int, streams: int) -> tuple[socket.socket, int]:
    """A raw HTTP/2 client: opens ``streams`` Reserve calls with headers and no data."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    sock.sendall(connection.data_to_send())
    connection.receive_data(sock.recv(65_535))
    opened = 0
    for _ in range(streams):
        if connection.open_outbound_streams >= connection.remote_settings.max_concurrent_streams:
            break  # the server's per-connection bound: a raw client cannot go past it
        connection.send_headers(
            connection.get_next_available_stream_id(),
            [(":method", "POST"), (":scheme", "http"),
             (":path", "/reservd.v1.Reservations/Reserve"), (":authority", f"127.0.0.1:{port}"),
             ("content-type", "application/grpc"), ("te", "trailers")],
        )
        opened += 1
    sock.sendall(connection.data_to_send())  # all at once: the burst is the point
    return sock, opened


@aio
async def test_a_flood_of_header_only_streams_cancels_no_bystander():
    daemon = DaemonProcess("--in-memory").start()
    try:
        await _seed(daemon.target)
        stop = asyncio.Event()
        codes = collections.Counter()
        bystanders = asyncio.create_task(_bystanders(daemon.target, stop, codes))
        loop = asyncio.get_running_loop()
        before = sum(codes.values())
        floods = await asyncio.gather(
            *(loop.run_in_executor(None, _flood, daemon.port, 1_000) for _ in range(5))
        )
        for sock, _ in floods:
            sock.close()
        # The bystanders go on through the flood and after it: 2,000 more calls, bounded.
        deadline = time.monotonic() + 60
        while sum(codes.values()) < before + 2_000 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stop.set()
        await bystanders
    finally:
        daemon.kill()
    assert all(opened == 1_000 for _, opened in floods), [opened for _, opened in floods]
    assert set(codes) <= FAIR, codes
    assert codes["OK"] >= 2_000


@aio
async def test_streams_per_identity_and_rate_are_resource_exhausted_with_a_retry_hint():
    config = test_config(
        watchers_per_identity_max=1, rate_per_identity_per_second=1.0, rate_burst_requests=3,
    )
    async with running(config) as r:
        await r.set_stock("a", 5)  # the first of 3 calls of the bucket
        first = r.reservations.WatchStock(pb.WatchStockRequest(skus=["a"]))
        await first.read()  # the watch is open (the second call)
        second = r.reservations.WatchStock(pb.WatchStockRequest(skus=["a"]))
        try:
            await second.read()
        except grpc.aio.AioRpcError as error:
            refused = error
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "watchers_per_identity_max" in refused.details()
        assert "retry in 100 ms" in refused.details()
        assert ("grpc-retry-pushback-ms", "100") in tuple(refused.trailing_metadata())
        first.cancel()
        # The bucket is empty now (3 calls within a second): the next is refused with a hint.
        try:
            await r.reservations.GetStock(pb.GetStockRequest(skus=["a"]))
        except grpc.aio.AioRpcError as error:
            limited = error
        assert limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "over its rate of 1 calls per second" in limited.details()
        pushback = dict(limited.trailing_metadata())["grpc-retry-pushback-ms"]
        assert 0 < int(pushback) <= 1_000
        assert r.daemon.admission.refused == 2


@aio
async def test_authorisation_is_checked_before_admission():
    """A caller refused by authorisation never takes (nor releases) a slot of admission."""
    steps = []

    class Refused(Exception):
        pass

    async def check(context) -> None:
        steps.append("authorisation")
        raise Refused

    class Admission:
        async def enter(self, context, streaming: bool):
            steps.append("admission")

        def leave(self, key) -> None:
            steps.append("leave")

    call = handlers._Call()
    try:
        await call.enter(pb.GetStockRequest(), None, "/m", check, Admission(), False, False)
    except Refused:
        pass
    assert steps == ["authorisation"] and call.admission is None
    await call.enter(pb.GetStockRequest(), None, "/m", None, Admission(), False, False)
    assert steps == ["authorisation", "admission"] and call.admission is not None
