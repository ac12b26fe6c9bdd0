"""The Redis mirror against a real redis-server: fail closed on partition, heal, never
acknowledge a grant the mirror does not hold.

Each fault scenario runs 16 clients reserving and releasing on four SKUs (WAL on) while Redis
is paused, black-holed, killed and restarted empty, or killed and restarted with its data. The
daemon always reaches Redis through a :class:`Proxy` (transparent except when the test cuts
it), and a MONITOR connection straight to Redis records every stock hash Redis really wrote,
with Redis's own clock: a grant is held by the mirror at its acknowledgement if Redis had
written that SKU at the grant's sequence or later before the client received the answer.
"""
from __future__ import annotations

import asyncio
import bisect
import dataclasses
import random
import subprocess
import sys
import threading
import time

import grpc
import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import ROOT, aio, cart, eventually, running, test_config
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redisserver import Monitor, Proxy, RedisServer, require_redis_server

from reservd import mirrorwrite, walfile
from reservd.config import Config
from reservd.v1 import reservd_pb2 as pb
from reservd.v1 import reservd_pb2_grpc as pb_grpc

pytestmark = pytest.mark.redis

DEFAULTS = Config()
PREFIX = DEFAULTS.redis_prefix
RESERVATIONS = "reservd.v1.Reservations"
SKUS = ("alpha", "beta", "gamma", "delta")
SUPPLY = 20  # per SKU: 16 clients holding up to 3 units each contend for it
CLIENTS = 16
STEADY_GRANTS = 20  # grants the load makes before the fault, and again after healing
STEADY_SECONDS_MAX = 10.0
PARTITION_SECONDS = 0.8
# The bounds the daemon promises with the default config: a Redis that answers nothing (no
# reply, no PONG) for mirror_silence_ms_max fails closed (an idle mirror notices within a
# heartbeat); a Redis that is back is retried within mirror_retry_ms_max and resynchronised.
# Plus slack for a loaded CI box.
FAIL_CLOSED_SECONDS_MAX = (
    DEFAULTS.mirror_silence_ms_max + DEFAULTS.mirror_heartbeat_ms
) / 1000 + 0.4
REOPEN_SECONDS_MAX = (DEFAULTS.mirror_retry_ms_max + DEFAULTS.mirror_timeout_ms) / 1000 + 0.5

_measured: dict[str, tuple[float, float]] = {}


@pytest.fixture(scope="module", autouse=True)
def _redis_server_installed():
    try:
        require_redis_server()
    except RuntimeError as error:
        pytest.fail(str(error), pytrace=False)
    yield
    if _measured:
        print("\nmirror fault -> fail-closed and heal -> reopen (seconds):")
        for name, (closed, reopened) in _measured.items():
            print(f"  {name:<24} fail-closed {closed:.3f}  reopen {reopened:.3f}")
        print(
            f"  longest: fail-closed {max(c for c, _ in _measured.values()):.3f} "
            f"(bound {FAIL_CLOSED_SECONDS_MAX:.2f}), reopen "
            f"{max(r for _, r in _measured.values()):.3f} (bound {REOPEN_SECONDS_MAX:.2f})"
        )


@pytest.fixture
def redis_server(tmp_path, request):
    """Without persistence unless parametrized ``indirect`` with True."""
    server = RedisServer(tmp_path / "redis", persistent=getattr(request, "param", False))
    server.start()
    yield server
    server.close()


@pytest.fixture
def proxy(redis_server):
    front = Proxy(redis_server.port)
    front.start()
    yield front
    front.close()


@pytest.fixture
def monitor(redis_server):
    audit = Monitor(redis_server.port, PREFIX + "stock:")
    audit.start()
    yield audit
    audit.close()


# -- load ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Attempt:
    started: float  # monotonic seconds
    ended: float
    outcome: str  # granted, sold_out, unavailable
    details: str = ""


@dataclasses.dataclass
class Grant:
    reservation_id: str
    sku: str
    quantity: int
    seq: int
    acked_unix: float  # the client's clock when the answer arrived
    available: int  # the SKU's available right after the grant
    released_seq: int = 0


class Load:
    """CLIENTS tasks, each: reserve 1-3 units of a random SKU, hold briefly, release."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.ReservationsStub(self.channel)
        self.attempts: list[Attempt] = []
        self.grants: list[Grant] = []
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(CLIENTS)]

    async def stop(self) -> None:
        self._stopping.set()
        await asyncio.gather(*self._tasks)
        await self.channel.close()

    async def _client(self, number: int) -> None:
        rng = random.Random(number)
        stub = self.stub
        count = 0
        while not self._stopping.is_set():
            count += 1
            reservation_id = f"client{number}-{count}"
            sku, quantity = rng.choice(SKUS), rng.randint(1, 3)
            started = time.monotonic()
            try:
                response = await stub.Reserve(
                    cart(reservation_id, (sku, quantity), ttl_seconds=600), timeout=10
                )
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                self.attempts.append(
                    Attempt(started, time.monotonic(), "unavailable", error.details())
                )
                # Not acknowledged, but perhaps held: give it back (WAL only, allowed now).
                try:
                    await stub.Release(pb.ReleaseRequest(reservation_id=reservation_id))
                except grpc.aio.AioRpcError as release_error:
                    assert release_error.code() == grpc.StatusCode.NOT_FOUND, release_error
                await asyncio.sleep(0.005)
                continue
            acked_unix = time.time()
            if not response.granted:
                self.attempts.append(Attempt(started, time.monotonic(), "sold_out"))
                await asyncio.sleep(0.002)
                continue
            self.attempts.append(Attempt(started, time.monotonic(), "granted"))
            grant = Grant(
                reservation_id, sku, quantity, response.sequence, acked_unix,
                response.lines[0].available,
            )
            self.grants.append(grant)
            await asyncio.sleep(rng.uniform(0, 0.01))
            released = await stub.Release(pb.ReleaseRequest(reservation_id=reservation_id))
            grant.released_seq = released.sequence

    def oversold(self) -> int:
        """Most units of one SKU held at once by acknowledged grants, beyond the supply, in the
        order the daemon applied grants and releases (their sequences)."""
        events = [(g.seq, g.sku, g.quantity) for g in self.grants]
        events += [(g.released_seq, g.sku, -g.quantity) for g in self.grants if g.released_seq]
        held = dict.fromkeys(SKUS, 0)
        worst = 0
        for _, sku, change in sorted(events):
            held[sku] += change
            worst = max(worst, held[sku] - SUPPLY)
        return worst


# -- checks ----------------------------------------------------------------------------------


async def _watch_health(channel: grpc.aio.Channel, events: list[tuple[float, int]]) -> None:
    """Record each change of the Reservations service's health, polled every 5 ms (Watch
    coalesces changes, which is right for its use but not for timing them)."""
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service=RESERVATIONS)
    while True:
        status = (await stub.Check(request)).status
        if not events or events[-1][1] != status:
            events.append((time.monotonic(), status))
        await asyncio.sleep(0.005)


async def _first(events: list, status, after: float, seconds: float) -> float:
    deadline = time.monotonic() + seconds
    while True:
        for at, value in events:
            if at >= after and value == status:
                return at
        assert time.monotonic() < deadline, f"no {status} within {seconds} s: {events}"
        await asyncio.sleep(0.005)


async def _granted(load: Load, count: int) -> None:
    """Until the load has had ``count`` grants acknowledged (a loaded machine may take a while).
    """
    deadline = time.monotonic() + STEADY_SECONDS_MAX
    while len(load.grants) < count:
        assert time.monotonic() < deadline, f"{len(load.grants)} grants, not {count}"
        await asyncio.sleep(0.01)


async def _caught_up(daemon, client: aioredis.Redis, seconds: float = 5.0) -> None:
    """Until the daemon is open and Redis's watermark is at the daemon's sequence."""
    deadline = time.monotonic() + seconds
    while True:
        watermark_seq = int(await client.hget(PREFIX + "watermark", "seq") or -1)
        seq = daemon.ledger.seq
        if daemon.mirror.mirrored_seq == watermark_seq == seq and not daemon.guard.grant_reason:
            return
        assert time.monotonic() < deadline, (
            daemon.mirror.mirrored_seq, watermark_seq, seq, daemon.guard.grant_reason
        )
        await asyncio.sleep(0.01)


async def assert_mirror_equals_table(daemon, client: aioredis.Redis) -> None:
    """Key for key: every SKU's hash holds the table's counters in the watermark's epoch, and
    there is no other stock key."""
    await _caught_up(daemon, client)
    table = {sku: (on_hand, reserved, committed)
             for sku, on_hand, reserved, committed in daemon.table.items()}
    watermark = await client.hgetall(PREFIX + "watermark")
    assert int(watermark[b"seq"]) == daemon.ledger.seq == daemon.mirror.mirrored_seq
    assert int(watermark[b"epoch"]) == daemon.mirror.epoch
    keys = sorted([k.decode() async for k in client.scan_iter(match=PREFIX + "stock:*")])
    assert keys == sorted(PREFIX + "stock:" + sku for sku in table)
    for sku, (on_hand, reserved, committed) in table.items():
        stored = await client.hgetall(PREFIX + "stock:" + sku)
        quarantine, damaged, quality_control, safety_stock, incoming = (
            daemon.ledger.breakdown(sku)
        )
        assert {k.decode(): int(v) for k, v in stored.items() if k != b"seq"} == {
            "on_hand": on_hand, "reserved": reserved, "committed": committed,
            "available": on_hand - reserved - committed, "epoch": daemon.mirror.epoch,
            "quarantine": quarantine, "damaged": damaged, "quality_control": quality_control,
            "safety_stock": safety_stock, "incoming": incoming,
        }, sku


def assert_grants_were_held(
    grants: list[Grant], writes, unaudited: tuple[float, float] | None = None
) -> int:
    """For every acknowledged grant, what Redis held for its SKU when the client got the answer
    showed no more available than right after the grant (Redis wrote the grant, or something
    lower that it may not overwrite until durable); and no stock hash ever went back to an
    older version.

    ``unaudited`` (unix seconds, exclusive start, inclusive end): a grant acknowledged inside it
    that MONITOR did not see held is counted, not failed. A dying redis-server drops what it
    had not yet sent to MONITOR while the daemon may already have had its reply, so the writes
    after the last line MONITOR showed before the fault are unknown, not missing. Returns how
    many grants were counted so."""
    skipped = 0
    history: dict[str, tuple[list[int], list[float]]] = {}
    for at, key, fields in writes:
        seqs, times = history.setdefault(key, ([], []))
        seq = int(fields["seq"])
        assert not seqs or seq >= seqs[-1], f"{key} went back from seq {seqs[-1]} to {seq}"
        assert int(fields["available"]) >= 0, (key, fields)
        seqs.append(seq)
        times.append(at)
    shown: dict[str, list[int]] = {}  # available, in the order of ``history``
    for at, key, fields in writes:
        shown.setdefault(key, []).append(int(fields["available"]))
    for grant in grants:
        key = PREFIX + "stock:" + grant.sku
        seqs, times = history.get(key, ([], []))
        index = bisect.bisect_right(times, grant.acked_unix) - 1
        held = index >= 0 and (seqs[index] >= grant.seq or shown[key][index] <= grant.available)
        if not held and unaudited and unaudited[0] < grant.acked_unix <= unaudited[1]:
            skipped += 1
            continue
        assert index >= 0, f"{grant} was acknowledged before Redis held anything for its SKU"
        # A state of seq >= the grant's includes the grant; an older one must show less.
        assert seqs[index] >= grant.seq or shown[key][index] <= grant.available, (
            f"{grant} was acknowledged while Redis showed {shown[key][index]} available "
            f"(seq {seqs[index]})"
        )
    return skipped


async def scenario(
    name, tmp_path, server, proxy, monitor, fault, heal, server_dies: bool = False
) -> None:
    """Load; fault; Reserve fails closed within the bound; heal; it reopens within the bound;
    the mirror equals the table; every grant was held at its ack (except, when the fault ends
    the redis-server process, those acknowledged after the last write MONITOR saw from it and
    before the heal); nothing oversold."""
    config = test_config(tmp_path / "data", redis_url=proxy.url)
    direct = aioredis.Redis(port=server.port)
    async with running(config) as node:
        daemon = node.daemon
        guard_events: list[tuple[float, bool, str | None]] = []
        daemon.guard.add_listener(
            lambda serving: guard_events.append(
                (time.monotonic(), serving, daemon.guard.grant_reason)
            )
        )
        health: list[tuple[float, int]] = []
        health_task = asyncio.create_task(_watch_health(node.channel, health))
        for sku in SKUS:
            await node.set_stock(sku, SUPPLY)
        load = Load(node.target)
        load.start()
        await _granted(load, STEADY_GRANTS)

        faulted, faulted_unix = time.monotonic(), time.time()
        await fault()
        try:
            closed = await _first(
                health, health_pb2.HealthCheckResponse.NOT_SERVING, faulted,
                FAIL_CLOSED_SECONDS_MAX + 1,
            )
        except AssertionError as error:
            raise AssertionError(
                f"{error}; guard: {[(round(at - faulted, 3), s, w) for at, s, w in guard_events]}"
                f"; mirror tasks: {daemon.mirror._tasks}; stats {daemon.mirror.stats}"
            ) from None
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await node.reservations.Reserve(cart(f"probe-{name}", (SKUS[0], 1)))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "mirror" in refused.value.details()
        await asyncio.sleep(PARTITION_SECONDS)

        healed = time.monotonic()  # before: the daemon may reopen before heal() returns
        healed_unix = time.time()
        await heal()
        reopened = await _first(
            health, health_pb2.HealthCheckResponse.SERVING, healed, REOPEN_SECONDS_MAX + 1
        )
        await _granted(load, len(load.grants) + STEADY_GRANTS)
        await load.stop()

        # Closed means closed: a Reserve that started after the guard tripped and ended before
        # it reopened was refused, saying why.
        relative = [(round(at - faulted, 3), serving, why) for at, serving, why in guard_events]
        assert [serving for at, serving, _ in guard_events if at < faulted] == [], relative
        tripped_at = next(at for at, serving, _ in guard_events if not serving)
        reopened_at = next(at for at, serving, _ in guard_events if serving and at > tripped_at)
        inside = [a for a in load.attempts if tripped_at < a.started and a.ended < reopened_at]
        assert inside, "no Reserve ran while failed closed"
        for attempt in inside:
            assert attempt.outcome == "unavailable" and "mirror" in attempt.details, attempt

        await assert_mirror_equals_table(daemon, direct)
        marker = f"end-of-{name}"
        await direct.echo(marker)
        await asyncio.to_thread(monitor.wait_marker, marker)
        unaudited = None
        if server_dies:
            last_seen = max(at for at, _, _ in monitor.writes if at <= faulted_unix)
            unaudited = (last_seen, healed_unix)
        skipped = assert_grants_were_held(load.grants, monitor.writes, unaudited)
        assert load.oversold() == 0
        for sku, on_hand, reserved, committed in daemon.table.items():
            assert reserved + committed <= on_hand, sku
        health_task.cancel()
        await asyncio.gather(health_task, return_exceptions=True)
    await direct.aclose()

    fail_closed_seconds, reopen_seconds = closed - faulted, reopened - healed
    _measured[name] = (fail_closed_seconds, reopen_seconds)
    print(
        f"{name}: fail-closed after {fail_closed_seconds:.3f} s, reopened "
        f"{reopen_seconds:.3f} s after healing; {len(load.grants)} grants, "
        f"{sum(a.outcome == 'unavailable' for a in load.attempts)} refused, "
        f"{skipped} acknowledged as Redis died, unseen by MONITOR, "
        f"{daemon.mirror.stats}"
    )
    timeline = (relative, [(round(at - faulted, 3), status) for at, status in health])
    assert fail_closed_seconds <= FAIL_CLOSED_SECONDS_MAX, timeline
    assert reopen_seconds <= REOPEN_SECONDS_MAX, timeline


# -- fault scenarios -------------------------------------------------------------------------


@aio
async def test_sigstop_then_sigcont(tmp_path, redis_server, proxy, monitor):
    async def fault():
        redis_server.stop()

    async def heal():
        redis_server.cont()

    await scenario("sigstop", tmp_path, redis_server, proxy, monitor, fault, heal)


@aio
async def test_black_hole_then_restore(tmp_path, redis_server, proxy, monitor):
    await scenario(
        "black-hole", tmp_path, redis_server, proxy, monitor,
        lambda: asyncio.to_thread(proxy.black_hole), lambda: asyncio.to_thread(proxy.restore),
    )


def _restart(server: RedisServer, proxy: Proxy, monitor: Monitor, keep_data: bool):
    async def heal():
        # Hold the daemon's reconnects at the proxy until MONITOR is attached to the new
        # process, so the audit sees every write it makes.
        attached = monitor.attached
        await asyncio.to_thread(proxy.black_hole)
        await asyncio.to_thread(server.restart, keep_data)
        await asyncio.to_thread(monitor.wait_attached, attached + 1)
        await asyncio.to_thread(proxy.restore)

    return heal


@aio
async def test_kill_then_restart_empty(tmp_path, redis_server, proxy, monitor):
    async def fault():
        redis_server.kill()

    await scenario(
        "kill, restart empty", tmp_path, redis_server, proxy, monitor, fault,
        _restart(redis_server, proxy, monitor, keep_data=False), server_dies=True,
    )


@pytest.mark.parametrize("redis_server", [True], indirect=True, ids=["aof"])
@aio
async def test_restart_with_its_data(tmp_path, redis_server, proxy, monitor):
    async def fault():
        await asyncio.to_thread(redis_server.terminate)

    await scenario(
        "restart with its data", tmp_path, redis_server, proxy, monitor, fault,
        _restart(redis_server, proxy, monitor, keep_data=True), server_dies=True,
    )


# -- the parts -------------------------------------------------------------------------------


@aio
async def test_the_script_never_applies_an_older_version(redis_server):
    client = aioredis.Redis(port=redis_server.port)
    sha = await client.script_load(mirrorwrite.BATCH_SCRIPT)

    async def call(mode, epoch, seq, expected_seq, rows, time_ms=1_000, lower=()):
        keys, args = mirrorwrite.batch_command(
            "t:", mode, epoch, seq, time_ms, expected_seq, 1_350, rows, lower
        )
        return (await client.evalsha(sha, len(keys), *keys, *args))[0]  # hashes written

    async def stock():
        return {k.decode(): int(v) for k, v in (await client.hgetall("t:stock:s")).items()}

    await call("mark", 1, 0, 0, [])
    assert await call("apply", 1, 5, 0, [(5, "s", 10, 4, 0, 0)]) == 1
    # A write that timed out on reservd's side and lands late: nothing changes.
    assert await call("apply", 1, 3, 0, [(3, "s", 10, 1, 0, 0)]) == 0
    assert await stock() == {
        "on_hand": 10, "reserved": 4, "committed": 0, "available": 6, "seq": 5, "epoch": 1
    }
    watermark = await client.hgetall("t:watermark")
    assert (int(watermark[b"seq"]), int(watermark[b"time_ms"])) == (5, 1_000)
    # Not durable yet ("lower"): more available is not written, less is.
    assert await call("apply", 1, 5, 5, [(6, "s", 10, 2, 0, 0)], lower={"s"}) == 0
    assert (await stock())["available"] == 6
    assert await call("apply", 1, 5, 5, [(7, "s", 10, 5, 0, 0)], lower={"s"}) == 1
    assert (await stock())["available"] == 5
    assert await call("apply", 1, 5, 5, [(8, "new", 3, 0, 0, 0)], lower={"new"}) == 0
    assert not await client.exists("t:stock:new")  # a SKU not durable yet is not shown
    assert await call("apply", 1, 7, 5, [(7, "s", 10, 4, 0, 0)]) == 0  # same version
    # An older write in a newer epoch (a full rewrite after Redis lost data) does apply...
    await call("rewrite", 2, 4, 0, [(4, "s", 10, 2, 0, 0)])
    assert (await stock())["reserved"] == 2
    # ... and a write of the old epoch no longer does, whatever its sequence.
    with pytest.raises(Exception, match="RESERVD_NEWER"):
        await call("rewrite", 1, 9, 0, [(9, "s", 10, 9, 0, 0)])
    assert (await stock())["reserved"] == 2
    # A batch is refused whole when Redis does not hold what reservd knows it wrote.
    await client.delete("t:watermark")
    with pytest.raises(Exception, match="RESERVD_LOST"):
        await call("apply", 2, 6, 4, [(6, "s", 10, 3, 0, 0)])
    assert (await stock())["reserved"] == 2
    await client.aclose()


def test_without_redis_url_nothing_changes(tmp_path):
    """The embedded default stays WAL-only: no mirror, redis-py is not even imported."""
    code = f"""
import asyncio, sys
from pathlib import Path
sys.path.insert(0, {str(ROOT / "tests")!r})
from conftest import cart, running, test_config

async def main():
    async with running(test_config(Path({str(tmp_path / "data")!r}))) as node:
        assert node.daemon.mirror is None
        await node.set_stock("a", 3)
        response = await node.reservations.Reserve(cart("r", ("a", 1)))
        assert response.granted and node.daemon.guard.grant_reason is None
    assert "redis" not in sys.modules, "a daemon without redis_url imported redis-py"

asyncio.run(main())
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]


@aio
async def test_waiters_share_one_batch_and_a_cancelled_one_leaves_it_to_the_others(
    tmp_path, redis_server
):
    async with running(test_config(tmp_path / "data", redis_url=redis_server.url)) as node:
        await node.set_stock("a", 5)
        daemon = node.daemon
        outcome = daemon.ledger.reserve("direct", ("a",), (1,), "", 60, False)
        daemon.mirror.wait(outcome.seq)
        batch = daemon.mirror._next or daemon.mirror._inflight
        daemon.mirror.wait(outcome.seq)
        assert (daemon.mirror._next or daemon.mirror._inflight) is batch  # one write for both

        async def wait():
            await daemon.mirror.wait(outcome.seq)

        waiters = [asyncio.create_task(wait()) for _ in range(2)]
        await asyncio.sleep(0)
        assert not batch.done()
        waiters[0].cancel()  # its client went away
        await waiters[1]
        await asyncio.sleep(0)
        assert waiters[0].cancelled()
        assert daemon.mirror.mirrored_seq >= outcome.seq


@aio
async def test_starts_failed_closed_while_redis_is_down_then_opens(tmp_path):
    server = RedisServer(tmp_path / "redis")  # not started yet
    try:
        config = test_config(tmp_path / "data", redis_url=server.url)
        async with running(config) as node:
            health = health_pb2_grpc.HealthStub(node.channel)
            request = health_pb2.HealthCheckRequest(service=RESERVATIONS)
            status = (await health.Check(request)).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            await node.set_stock("a", 5)  # not a grant: the WAL alone acknowledges it
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await node.reservations.Reserve(cart("early", ("a", 1)))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "mirror is unreachable" in refused.value.details()
            await asyncio.to_thread(server.start)
            started = time.monotonic()
            while (await health.Check(request)).status != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() - started < REOPEN_SECONDS_MAX
                await asyncio.sleep(0.01)
            assert (await node.reservations.Reserve(cart("later", ("a", 1)))).granted
            direct = aioredis.Redis(port=server.port)
            await assert_mirror_equals_table(node.daemon, direct)
            await direct.aclose()
    finally:
        server.close()


@aio
async def test_redis_losing_its_data_under_a_live_connection_is_rewritten(
    tmp_path, redis_server, caplog
):
    async with running(test_config(tmp_path / "data", redis_url=redis_server.url)) as node:
        for sku in SKUS:
            await node.set_stock(sku, SUPPLY)
        assert (await node.reservations.Reserve(cart("before", (SKUS[0], 2)))).granted
        direct = aioredis.Redis(port=redis_server.port)
        await direct.flushall()
        # The next heartbeat finds the watermark gone, fails closed and rewrites everything.
        deadline = time.monotonic() + 2
        while node.daemon.mirror.stats.rewrites < 2:
            assert time.monotonic() < deadline, node.daemon.mirror.stats
            await asyncio.sleep(0.01)
        assert any("lost data" in str(getattr(r, "why", "")) for r in caplog.records)
        await assert_mirror_equals_table(node.daemon, direct)
        assert (await node.reservations.Reserve(cart("after", (SKUS[0], 2)))).granted
        await assert_mirror_equals_table(node.daemon, direct)
        await direct.aclose()


@aio
async def test_redis_back_with_older_data_replays_what_it_lost(tmp_path, redis_server, caplog):
    """Redis restarts from an older snapshot (same epoch, a lower watermark): reservd notices
    and replays the changes after that watermark from its ring, without a full rewrite."""
    async with running(test_config(tmp_path / "data", redis_url=redis_server.url)) as node:
        for sku in SKUS:
            await node.set_stock(sku, SUPPLY)
        direct = aioredis.Redis(port=redis_server.port)
        await direct.save()
        snapshot = (redis_server.directory / "dump.rdb").read_bytes()
        older_seq = int(await direct.hget(PREFIX + "watermark", "seq"))
        for number, sku in enumerate(SKUS):
            assert (await node.reservations.Reserve(cart(f"lost-{number}", (sku, 3)))).granted
        assert node.daemon.mirror.mirrored_seq > older_seq
        await direct.aclose()
        await asyncio.to_thread(redis_server.kill)
        (redis_server.directory / "dump.rdb").write_bytes(snapshot)
        await asyncio.to_thread(redis_server.restart, True)
        direct = aioredis.Redis(port=redis_server.port)
        await assert_mirror_equals_table(node.daemon, direct)
        assert node.daemon.mirror.stats.rewrites == 1  # the one at start
        assert any(r.getMessage() == "Redis lost mirrored changes: replaying them"
                   for r in caplog.records)
        await direct.aclose()


@aio
async def test_a_row_sent_unchanged_before_its_fsync_is_not_sent_again(
    tmp_path, redis_server, monkeypatch
):
    """While a grant waits for its fsync, the next write plans its SKU's row again, unchanged:
    it is not sent again, Redis keeps showing the grant, and once durable the mirror equals
    the table."""
    async with running(test_config(tmp_path / "data", redis_url=redis_server.url)) as node:
        for sku in SKUS:
            await node.set_stock(sku, SUPPLY)
        mirror = node.daemon.mirror
        direct = aioredis.Redis(port=redis_server.port)
        open_gate = threading.Event()
        write = walfile.OS_FILES.write

        def gated_write(fd, data):  # in the WAL's flusher thread, as on a disk that stalls
            assert open_gate.wait(60), "the test never opened the WAL's gate"
            return write(fd, data)

        monkeypatch.setattr(walfile.OS_FILES, "write", gated_write)
        unchanged = mirror.stats.rows_unchanged
        first = asyncio.ensure_future(node.reservations.Reserve(cart("first", (SKUS[0], 2))))
        await eventually(lambda: mirror.mirrored_seq >= node.daemon.ledger.seq, "first held")
        second = asyncio.ensure_future(node.reservations.Reserve(cart("second", (SKUS[1], 3))))
        await eventually(lambda: mirror.stats.rows_unchanged > unchanged, "a row not re-sent")
        assert mirror.pending_rows >= 1
        assert int(await direct.hget(PREFIX + "stock:" + SKUS[0], "available")) == SUPPLY - 2
        open_gate.set()
        assert (await first).granted and (await second).granted
        await assert_mirror_equals_table(node.daemon, direct)
        assert mirror.pending_rows == 0
        await direct.aclose()


@aio
async def test_lag_alone_fails_closed(tmp_path, redis_server):
    """Redis that answers too late (within a generous timeout) but lags beyond
    mirror_lag_ms_max: grants waiting for it are refused, reservations close, then reopen."""
    config = test_config(
        tmp_path / "data", redis_url=redis_server.url, mirror_timeout_ms=5_000,
        mirror_lag_ms_max=200,
    )
    async with running(config) as node:
        await node.set_stock("a", 5)
        redis_server.stop()
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await node.reservations.Reserve(cart("slow", ("a", 1)))
        waited = time.monotonic() - started
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "lagging" in refused.value.details()
        assert 0.15 < waited < 0.5, waited
        assert "lagging" in node.daemon.guard.grant_reason
        redis_server.cont()
        direct = aioredis.Redis(port=redis_server.port)
        await _caught_up(node.daemon, direct)
        await direct.aclose()
        assert (await node.reservations.Reserve(cart("fast", ("a", 1)))).granted


# -- slow is not down ------------------------------------------------------------------------


async def _paused(client: aioredis.Redis, milliseconds: int, mode: str) -> None:
    """CLIENT PAUSE: Redis holds other clients' commands (``WRITE``: writes and scripts only,
    PING still answers; ``ALL``: everything) for ``milliseconds``, then carries on."""
    assert await client.execute_command("CLIENT", "PAUSE", milliseconds, mode)


@pytest.mark.parametrize("mode, pause_ms", [("WRITE", 1_500), ("ALL", 1_200)])
@aio
async def test_a_slow_redis_does_not_close(tmp_path, redis_server, mode, pause_ms):
    """A write answered after mirror_timeout_ms, by a Redis that answers pings (WRITE) or that
    answers nothing for less than mirror_silence_ms_max (ALL): the grant waits and is granted,
    reservd never fails closed."""
    assert DEFAULTS.mirror_timeout_ms < pause_ms < min(
        DEFAULTS.mirror_silence_ms_max, DEFAULTS.mirror_lag_ms_max,
        DEFAULTS.mirror_grant_wait_ms_max,
    )
    async with running(test_config(tmp_path / "data", redis_url=redis_server.url)) as node:
        daemon = node.daemon
        trips: list[str | None] = []
        daemon.guard.add_listener(lambda serving: trips.append(daemon.guard.grant_reason))
        await node.set_stock("a", 5)
        direct = aioredis.Redis(port=redis_server.port)
        await _paused(direct, pause_ms, mode)
        started = time.monotonic()
        response = await node.reservations.Reserve(cart("slow", ("a", 1)))
        waited = time.monotonic() - started
        await direct.aclose()
        assert response.granted
        assert trips == [], trips
        assert daemon.mirror.stats.slow_writes >= 1, daemon.mirror.stats
        assert waited > DEFAULTS.mirror_timeout_ms / 1000, waited
        assert daemon.guard.grant_reason is None


@aio
async def test_a_grant_waits_for_the_mirror_at_most_grant_wait_then_is_returned_on_retry(
    tmp_path, redis_server
):
    config = test_config(
        tmp_path / "data", redis_url=redis_server.url, mirror_grant_wait_ms_max=200
    )
    async with running(config) as node:
        daemon = node.daemon
        trips: list[str | None] = []
        daemon.guard.add_listener(lambda serving: trips.append(daemon.guard.grant_reason))
        await node.set_stock("a", 5)
        direct = aioredis.Redis(port=redis_server.port)
        await _paused(direct, 700, "WRITE")
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await node.reservations.Reserve(cart("patient", ("a", 2)))
        waited = time.monotonic() - started
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "mirror_grant_wait_ms_max" in refused.value.details()
        assert 0.2 <= waited < 0.6, waited
        assert daemon.mirror.stats.grant_waits_exceeded == 1
        assert daemon.guard.grant_reason is None and trips == []
        # The grant stayed applied: once Redis holds it, the retry returns it.
        await _caught_up(daemon, direct)
        await direct.aclose()
        retried = await node.reservations.Reserve(cart("patient", ("a", 2)))
        assert retried.granted and retried.replayed
        assert (await node.stock("a")).available == 3


# -- the plan: never more than a recovery could show -----------------------------------------


def _lua_rules(redis: dict[str, tuple[int, int]], rows, lower) -> None:
    """BATCH_SCRIPT's two rules on a dict sku -> (seq, available) (one epoch)."""
    for seq, sku, on_hand, reserved, committed, unsellable in rows:
        available = on_hand - reserved - committed - unsellable
        stored = redis.get(sku)
        if sku in lower:
            if stored is not None and stored[0] < seq and available < stored[1]:
                redis[sku] = (seq, available)
        elif stored is None or stored[0] < seq:
            redis[sku] = (seq, available)


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("change"), st.sampled_from("abc"), st.integers(0, 9)),
            st.tuples(st.just("durable"), st.integers(0, 3), st.none()),
            st.tuples(st.just("write"), st.booleans(), st.none()),
        ),
        max_size=60,
    ),
    read_max=st.integers(1, 4),
)
def test_the_plan_never_shows_more_than_a_state_recovery_could_bring_back(steps, read_max):
    """A model of the mirror over the pure-Python table (on_hand only: available = on_hand):
    after every write, per SKU, Redis shows at most the available of every state from the
    durable one to the newest mirrored (whichever of them a crash leaves in the log), at most
    the newest (grants are held), exactly the truth once everything is durable, and versions
    never go back."""
    from reservd._pytable import Table

    table = Table(shards=1, ring_capacity=256)
    history: dict[str, list[tuple[int, int]]] = {}  # sku -> [(seq, available)]
    redis: dict[str, tuple[int, int]] = {}
    seq = durable = settled = mirrored = position = 0

    def write(target: int) -> None:
        nonlocal settled, mirrored, position
        step = mirrorwrite.plan(table, position, durable, target, read_max)
        before = dict(redis)
        _lua_rules(redis, step.rows, step.lower)
        position, settled, mirrored = step.settled_position, durable, target
        for sku, states in history.items():
            if sku not in redis:
                continue
            shown_seq, shown = redis[sku]
            assert sku not in before or shown_seq >= before[sku][0], (sku, before, redis)
            at_durable = [a for s, a in states if s <= durable][-1:]
            after = [a for s, a in states if durable < s <= target]
            assert all(shown <= a for a in at_durable + after), (sku, shown, states, durable)

    for kind, first, second in steps:
        if kind == "change":
            seq += 1
            handle = table.ensure(first)
            if table.counters(handle)[0] != second:  # else the table logs no change
                history.setdefault(first, []).append((seq, second))
            table.set_on_hand(handle, second, seq)
        elif kind == "durable":
            durable = min(seq, durable + first)
        else:
            if first:
                durable = seq
            write(seq)
    durable = seq
    write(seq)
    for sku, states in history.items():  # everything durable: Redis equals the truth
        assert redis[sku][1] == states[-1][1], (sku, redis, states)
