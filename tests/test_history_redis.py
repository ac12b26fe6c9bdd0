"""The history checker on the Redis mirror's faults: a redis-server paused (SIGSTOP) or killed
and restarted empty in the middle of the load. Grants that were applied but never mirrored are
answered UNAVAILABLE: the checker finds each errored call absent or whole in the WAL, and the
clients' retries with the same id replay exactly those grants."""
from __future__ import annotations

import asyncio
import random

from conftest import aio, cart, running, test_config
from history import Recorder, check, read_final_state, read_wal
from history_model import COMMITTED, HELD
from redisserver import RedisServer

from reservd.v1 import reservd_pb2 as pb

SKUS = ("alpha", "beta", "gamma", "delta")
SUPPLY = 200
CLIENTS = 16
OPS_PER_CLIENT_MAX = 2_000
ACKED_BEFORE_FAULT = 150
CALLS_DURING_FAULT = 100
ACKED_AFTER_HEAL = 150



class _Load:
    """CLIENTS clients reserving 1-2 units of a SKU, committing, releasing and fulfilling their
    own holds; a reserve that errored is remembered and retried with the same id at the end."""

    def __init__(self, recorder: Recorder, stub) -> None:
        self.recorder, self.stub = recorder, stub
        self.acked = 0
        self.calls = 0
        self.stop = asyncio.Event()
        self.errored: list[tuple[int, pb.ReserveRequest]] = []
        self._waiters: list[tuple[str, int, asyncio.Event]] = []

    def reached(self, counter: str, count: int) -> asyncio.Event:
        event = asyncio.Event()
        self._waiters.append((counter, count, event))
        self._wake()
        return event

    def _wake(self) -> None:
        for counter, count, event in self._waiters:
            if getattr(self, counter) >= count:
                event.set()

    async def _call(self, client: int, kind: str, method, request):
        response = await self.recorder.call(client, kind, method, request, timeout=10)
        self.calls += 1
        self.acked += response is not None
        self._wake()
        return response

    async def client(self, client: int, rng: random.Random) -> None:
        stub = self.stub
        mine: dict[str, int] = {}
        for n in range(OPS_PER_CLIENT_MAX):
            if self.stop.is_set():
                return
            if not mine or rng.random() < 0.5:
                request = cart(f"c{client}-{n}", (rng.choice(SKUS), rng.randint(1, 2)),
                               ttl_seconds=600)
                response = await self._call(client, "reserve", stub.Reserve, request)
                if response is None:
                    self.errored.append((client, request))
                elif response.granted:
                    mine[request.reservation_id] = HELD
                continue
            rid = rng.choice(list(mine))
            if mine[rid] == HELD:
                kind, method, request = (("commit", stub.Commit, pb.CommitRequest(reservation_id=rid))
                                         if rng.random() < 0.6 else
                                         ("release", stub.Release, pb.ReleaseRequest(reservation_id=rid)))
            else:
                kind, method, request = ("fulfil", stub.Fulfil, pb.FulfilRequest(reservation_id=rid))
            response = await self._call(client, kind, method, request)
            if response is not None and response.state in (HELD, COMMITTED):
                mine[rid] = response.state
            else:
                mine.pop(rid)  # finished, or unknown after an error: leave it


async def _fault_round(tmp_path, redis_server: RedisServer, fault, heal):
    recorder = Recorder()
    data = tmp_path / "data"
    config = test_config(data, redis_url=redis_server.url)
    async with running(config) as server:
        guard = server.daemon.guard
        closed, reopened = asyncio.Event(), asyncio.Event()
        guard.add_listener(lambda serving: (reopened if serving else closed).set())
        for sku in SKUS:
            await recorder.call(0, "set_stock", server.admin.SetStock, pb.SetStockRequest(
                sku=sku, on_hand=SUPPLY, adjustment_id=f"init-{sku}"))
        load = _Load(recorder, server.reservations)
        rng = random.Random(8)
        clients = [asyncio.create_task(load.client(c + 1, random.Random(rng.random())))
                   for c in range(CLIENTS)]
        await load.reached("acked", ACKED_BEFORE_FAULT).wait()
        await asyncio.to_thread(fault)
        await closed.wait()
        await load.reached("calls", load.calls + CALLS_DURING_FAULT).wait()
        await asyncio.to_thread(heal)
        await reopened.wait()
        await load.reached("acked", load.acked + ACKED_AFTER_HEAL).wait()
        load.stop.set()
        await asyncio.gather(*clients)
        retries = await asyncio.gather(*(
            recorder.call(client, "reserve", server.reservations.Reserve, request, timeout=10)
            for client, request in load.errored
        ))
        seq = server.daemon.ledger.seq
        reservation_ids = {op.key for op in recorder.ops if op.kind != "set_stock"}
        final = await read_final_state(server.reservations, SKUS, reservation_ids, seq=seq)
        assert server.daemon.ledger.seq == seq
    report = check(recorder.ops, wal=read_wal(data), final=final)
    replayed = sum(1 for response in retries if response is not None and response.replayed)
    return report, replayed, len(load.errored)


@aio
async def test_redis_paused_mid_load_errored_calls_are_absent_or_whole(tmp_path, redis_server):
    report, replayed, errored = await _fault_round(
        tmp_path, redis_server, redis_server.stop, redis_server.cont
    )
    print(f"redis paused: {report}; {errored} reserves errored, {replayed} replayed on retry")
    assert report.ok, report
    assert errored > 0 and report.indefinite >= errored
    assert replayed == report.indefinite_present_reserves, report


@aio
async def test_redis_killed_and_restarted_empty_errored_calls_are_absent_or_whole(
    tmp_path, redis_server
):
    report, replayed, errored = await _fault_round(
        tmp_path, redis_server, redis_server.kill, lambda: redis_server.restart(keep_data=False)
    )
    print(f"redis killed: {report}; {errored} reserves errored, {replayed} replayed on retry")
    assert report.ok, report
    assert errored > 0 and report.indefinite >= errored
    assert replayed == report.indefinite_present_reserves, report
