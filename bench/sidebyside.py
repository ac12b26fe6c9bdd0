"""Side-by-side, fixed-work benchmark: reservd against what teams would build instead.

Full run (on a quiet machine; about 10-20 minutes on 2 cores, three times that with
--repeat 3, which damps the noise of a shared machine):

    python bench/sidebyside.py --repeat 3

Quick check that everything starts and answers (--quick: 2,000 reservations a cell, no
PostgreSQL, 30 s cap a cell):

    python bench/sidebyside.py --quick --out /tmp/bench-quick

One asyncio client process on uvloop drives every system with the same work, without locust:
per cell (system x workload x concurrency), --ops Reserve calls of one unit by --concurrency
tasks, bounded by --cell-seconds, after a short unmeasured warm-up. All systems run at once and
take turns cell by cell, in a rotating order, so drifting background load hits them alike; with
--repeat N each cell runs N times and the table shows the run with the median throughput and
the spread of the N runs ((max - min) / median).

Workloads (--workloads):
  hot     one SKU with 100 units, restocked with 25 units after every 50th Reserve (by index,
          so the supply schedule is the same for every system): about half sold out.
  steady  10,000 SKUs with 1,000 units each, picked uniformly (the same seeded sequence for
          every system): every Reserve is granted, so every one is a durable write.

Systems (--systems; a system that cannot start is skipped with the reason):
  reservd-memory  `reservd serve --in-memory`: no WAL (the cost of reservd's own code)
  reservd-wal     `reservd serve` with the WAL (group commit, fdatasync before each answer)
  reservd-mirror  WAL plus --redis-url to a redis-server of its own (appendfsync always)
  reservd-batched         reservd-wal driven through the auto-batching client
                          (ReservdClient(batching=True)): concurrent calls share Batch RPCs
  reservd-batched-mirror  the same with the Redis mirror
  reservd-mirror-channels, reservd-batched-mirror-channels
                  reservd-mirror and reservd-batched-mirror with the example config's seven
                  channels (examples/channels.json) and pools on every SKU (tiktok 30 %,
                  tiktok-fbt 10 %, seeding 1 % of its stock), each Reserve from one of amazon,
                  walmart, shopify, ebay, tiktok in turn: what channels cost the mirror (every
                  hash then also carries each channel's ats and level and each bucket)
  reservd-batched-stream  reservd-wal, the same auto-batcher sending its batches over one
                          BatchStream (8 batches in flight) instead of unary Batch calls
  redis-lua       a redis-server with appendonly yes and appendfsync always, and a Lua script
                  that checks, decrements and records the reservation id atomically
  redis-lua-pipelined  the same server and script, the calls auto-pipelined the same way as
                  reservd-batched: calls made while a pipeline is in flight share the next
                  redis-py pipeline (up to 1,000 EVALSHA, 2 pipelines in flight)
  grpc-ceiling    bench/ceiling_server.py: reservd's API over a dict on grpc.aio + uvloop,
                  the ceiling of Python gRPC on this machine (client included)
  postgres        PostgreSQL (synchronous_commit on, fsync on) in a temporary cluster (initdb,
                  pg_ctl; as the postgres user through runuser when run as root), one
                  connection per client task, one statement that updates `available =
                  available - qty WHERE available >= qty` and inserts the reservation row;
                  needs /usr/lib/postgresql/*/bin (apt-get install postgresql) and asyncpg

Reported per cell: reservations (Reserve answers) per second, granted share, p50/p99/p999
latency in ms, oversold (units granted beyond units supplied, per SKU, as the client counted
them; and `mismatch`, when the system's own final state disagrees with the client's count),
errors, the CPU used by the server's processes and by this client (100 % = one core), the
server's CPU microseconds per reservation, and for reservd the WAL's fsyncs per second and
records per fsync (from its metrics, scraped before and after; Redis does not count its AOF
fsyncs: under appendfsync always it writes and fsyncs once per event-loop turn, so a pipeline
shares one, and PostgreSQL's group commit is not reported). Then the ratios of reservations
per second against redis-lua, redis-lua-pipelined and grpc-ceiling. Writes sidebyside.json
and sidebyside-throughput.png, sidebyside-p99.png into --out (default bench-results/).

The client shares the machine with the server: on 2 cores, every figure here includes the
client's own CPU (see `cli cpu`); compare systems with each other, not with other machines.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import itertools
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from reservd.autobatch import AutoBatcher  # noqa: E402
from reservd.client import ReservdClient  # noqa: E402
from reservd.metrics import scrape  # noqa: E402
from reservd.v1 import reservd_pb2 as pb  # noqa: E402
from reservd.v1 import reservd_pb2_grpc as pb_grpc  # noqa: E402

SYSTEMS = (
    "reservd-memory", "reservd-wal", "reservd-mirror", "reservd-batched", "reservd-batched-mirror",
    "reservd-batched-stream", "reservd-mirror-channels", "reservd-batched-mirror-channels",
    "redis-lua", "redis-lua-pipelined", "grpc-ceiling", "postgres",
)
RESERVD_SYSTEMS = (
    "reservd-memory", "reservd-wal", "reservd-mirror", "reservd-batched", "reservd-batched-mirror",
    "reservd-batched-stream", "reservd-mirror-channels", "reservd-batched-mirror-channels",
)
BATCHED_SYSTEMS = (
    "reservd-batched", "reservd-batched-mirror", "reservd-batched-stream",
    "reservd-batched-mirror-channels",
)
MIRROR_SYSTEMS = (
    "reservd-mirror", "reservd-batched-mirror", "reservd-mirror-channels",
    "reservd-batched-mirror-channels",
)
CHANNELS_FILE = ROOT / "examples" / "channels.json"
RESERVE_CHANNELS = ("amazon", "walmart", "shopify", "ebay", "tiktok")
POOLS_PERCENT = (("tiktok", 30), ("tiktok-fbt", 10), ("seeding", 1))
PIPELINE_OPS_MAX = 1_000
PIPELINES_IN_FLIGHT_MAX = 2
STREAM_BATCHES_IN_FLIGHT_MAX = 8
WORKLOADS = ("hot", "steady")
HOT_ON_HAND = 100
HOT_RESTOCK_EVERY = 50  # Reserve calls
HOT_RESTOCK_UNITS = 25
STEADY_SKUS = 10_000
STEADY_ON_HAND = 1_000
SEED_CONCURRENCY = 64
SEED_ATTEMPTS_MAX = 5  # an Allocate answered UNAVAILABLE is retried with its change_id
TTL_SECONDS = 86_400  # no hold expires during the run: expiry would be work only reservd does
START_TIMEOUT_SECONDS = 30
CALL_TIMEOUT_SECONDS = 30

REDIS_RESERVE = """
-- KEYS[1]: the SKU's available units; KEYS[2]: the reservation; ARGV[1]: units.
-- 1 granted, 0 sold out, 2 an earlier grant of the same id (a retry).
if redis.call('EXISTS', KEYS[2]) == 1 then return 2 end
local available = tonumber(redis.call('GET', KEYS[1]))
if available == nil then return redis.error_reply('unknown sku ' .. KEYS[1]) end
local units = tonumber(ARGV[1])
if available < units then return 0 end
redis.call('DECRBY', KEYS[1], units)
redis.call('SET', KEYS[2], units)
return 1
"""

POSTGRES_SCHEMA = """
CREATE TABLE stock (sku text PRIMARY KEY, available bigint NOT NULL CHECK (available >= 0));
CREATE TABLE reservations (reservation_id text PRIMARY KEY, sku text NOT NULL,
                           quantity bigint NOT NULL);
"""
POSTGRES_RESERVE = """
WITH taken AS (
    UPDATE stock SET available = available - $2 WHERE sku = $1 AND available >= $2
    RETURNING sku)
INSERT INTO reservations (reservation_id, sku, quantity) SELECT $3, sku, $2 FROM taken
RETURNING 1
"""


class Unavailable(Exception):
    """A system that cannot run here; the message says why."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_tree_cpu(root_pid: int) -> dict[int, int]:
    """CPU nanoseconds of a process and each of its descendants (PostgreSQL forks one per
    connection), from /proc/PID/schedstat: precise, where /proc/PID/stat counts 10 ms ticks
    per process and loses the short lives of many backends."""
    children = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children[parent].append(int(entry.name))
    cpu, todo = {}, [root_pid]
    while todo:
        pid = todo.pop()
        try:
            cpu[pid] = int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
        except (OSError, IndexError):
            continue
        todo.extend(children.get(pid, ()))
    return cpu


def cpu_seconds_between(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU used between two samples; a process that ended in between loses its last part."""
    return sum(ns - before.get(pid, 0) for pid, ns in after.items()) / 1e9


def client_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class ServerProcess:
    """A child server that logs JSON lines on stderr, one with "msg": "serving" and its port
    (the same approach as tests/daemonproc.py, for any server that speaks that way)."""

    def __init__(self, name: str, command: list[str], env: dict | None = None) -> None:
        self.name = name
        self.command = command
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self.serving: dict = {}
        self.tail: collections.deque = collections.deque(maxlen=20)

    async def start(self) -> "ServerProcess":
        self.process = await asyncio.to_thread(
            subprocess.Popen, self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=self.env, text=True,
        )
        ready = asyncio.get_running_loop().create_future()
        # Its own thread for the server's whole life: in the loop's default executor (a few
        # workers on a small machine) six servers would take every worker and starve the rest.
        threading.Thread(target=self._read, args=(ready,), daemon=True,
                         name=f"{self.name}-stderr").start()
        try:
            await asyncio.wait_for(ready, START_TIMEOUT_SECONDS)
        except asyncio.TimeoutError:
            pass
        if self.port is None:
            self.stop()
            raise Unavailable(f"{self.name} did not start: {list(self.tail)[-3:]}")
        return self

    def _read(self, ready: asyncio.Future) -> None:
        loop = ready.get_loop()
        for raw in self.process.stderr:
            try:
                entry = json.loads(raw)
            except ValueError:
                entry = {"msg": raw.rstrip()}
            self.tail.append(entry)
            if entry.get("msg") == "serving" and self.port is None:
                self.port, self.serving = entry["port"], entry
                loop.call_soon_threadsafe(lambda: ready.done() or ready.set_result(None))
        loop.call_soon_threadsafe(lambda: ready.done() or ready.set_result(None))

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


class RedisServer:
    """A redis-server of our own on a free loopback port and a temporary directory."""

    def __init__(self, *options: str) -> None:
        self.options = options
        self.directory = Path(tempfile.mkdtemp(prefix="bench-redis-"))
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    async def start(self) -> "RedisServer":
        binary = shutil.which("redis-server")
        if binary is None:
            raise Unavailable("redis-server is not installed")
        import redis.asyncio

        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.directory), "--save", "", *self.options],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.asyncio.Redis(port=self.port)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            try:
                await client.ping()
                break
            except (redis.exceptions.ConnectionError, OSError):
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise Unavailable("redis-server did not start")
                await asyncio.sleep(0.05)
        await client.aclose()
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        shutil.rmtree(self.directory, ignore_errors=True)


class System:
    """One system under test. ``reserve`` answers True (granted) or False (sold out)."""

    name: str
    pid: int | None = None  # the server's process, for CPU accounting

    async def start(self) -> None: ...
    async def set_stock(self, stock: dict[str, int]) -> None: ...
    async def reserve(self, reservation_id: str, sku: str, units: int) -> bool: ...
    async def restock(self, sku: str, units: int, adjustment_id: str) -> None: ...
    async def taken(self, skus: list[str]) -> dict[str, int]:
        """Units the system holds as reserved per SKU (its own final state)."""
    async def stop(self) -> None: ...

    def wal_counters(self) -> dict[str, float] | None:
        return None

    def mirror_counters(self) -> dict[str, float] | None:
        return None


class GrpcSystem(System):
    """reservd and the gRPC ceiling: the same API, the same client code."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.servers: list = []
        self.metrics_port: int | None = None
        self.data_dir: Path | None = None
        self.extension = None

    async def start(self) -> None:
        env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        if self.name == "grpc-ceiling":
            command = [sys.executable, str(ROOT / "bench" / "ceiling_server.py"),
                       "--bind", "127.0.0.1:0"]
        else:
            self.metrics_port = free_port()
            command = [sys.executable, "-m", "reservd", "serve", "--bind", "127.0.0.1:0",
                       "--metrics-port", str(self.metrics_port)]
            if self.name == "reservd-memory":
                command.append("--in-memory")
            else:
                self.data_dir = Path(tempfile.mkdtemp(prefix="bench-reservd-"))
                command += ["--data-dir", str(self.data_dir)]
            if self.name in MIRROR_SYSTEMS:
                # A Redis as durable as the redis-lua system's: the harder case for the mirror.
                redis = await RedisServer("--appendonly", "yes", "--appendfsync", "always").start()
                self.servers.append(redis)
                command += ["--redis-url", redis.url]
        server = await ServerProcess(self.name, command, env).start()
        self.servers.append(server)
        self.pid = server.pid
        self.extension = server.serving.get("extension")
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        self.reservations = pb_grpc.ReservationsStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)
        self.client = None
        self.channels = self.name.endswith("-channels")
        self.reserves = 0
        if self.channels:
            from google.protobuf.json_format import ParseDict

            presets = json.loads(CHANNELS_FILE.read_text())["channels"]
            for channel, policy in presets.items():
                await self.admin.SetChannel(pb.SetChannelRequest(
                    channel=channel, policy=ParseDict(policy, pb.ChannelPolicy()),
                    change_id=f"bench-{channel}"), timeout=CALL_TIMEOUT_SECONDS)
        if self.name in BATCHED_SYSTEMS:
            # Its own channel, as a checkout service would have; restocks stay unary.
            self.client = ReservdClient(
                f"127.0.0.1:{server.port}", batching=True, deadline_seconds=CALL_TIMEOUT_SECONDS,
                attempts_max=1,
            )
            if self.name == "reservd-batched-stream":
                self.stream = StreamBatches(self.client.reservations)
                self.client.batcher = AutoBatcher(
                    self.stream, ops_max=self.client.batcher.ops_max,
                    bytes_max=self.client.batcher.bytes_max,
                    in_flight_max=STREAM_BATCHES_IN_FLIGHT_MAX,
                )

    async def set_stock(self, stock: dict[str, int]) -> None:
        limit = asyncio.Semaphore(SEED_CONCURRENCY)

        async def one(sku: str, on_hand: int) -> None:
            async with limit:
                await self.admin.SetStock(
                    pb.SetStockRequest(sku=sku, on_hand=on_hand, adjustment_id=f"seed-{sku}"),
                    timeout=CALL_TIMEOUT_SECONDS,
                )

        await asyncio.gather(*(one(sku, on_hand) for sku, on_hand in stock.items()))
        if self.channels:
            await asyncio.gather(*(
                self._pools(limit, sku, on_hand) for sku, on_hand in stock.items()
            ))

    async def _pools(self, limit: asyncio.Semaphore, sku: str, on_hand: int) -> None:
        async with limit:
            for bucket, percent in POOLS_PERCENT:
                request = pb.AllocateRequest(
                    sku=sku, from_bucket="shared", to_bucket=bucket,
                    units=max(1, on_hand * percent // 100), change_id=f"pool-{sku}-{bucket}",
                )
                for attempt in range(SEED_ATTEMPTS_MAX):
                    try:
                        await self.admin.Allocate(request, timeout=CALL_TIMEOUT_SECONDS)
                        break
                    except grpc.aio.AioRpcError as error:
                        # A mirror slower than mirror_grant_wait_ms_max on a loaded machine:
                        # the allocation is applied; the same change_id answers it.
                        if (error.code() != grpc.StatusCode.UNAVAILABLE
                                or attempt == SEED_ATTEMPTS_MAX - 1):
                            raise

    async def reserve(self, reservation_id: str, sku: str, units: int) -> bool:
        channel = ""
        if self.channels:
            channel = RESERVE_CHANNELS[self.reserves % len(RESERVE_CHANNELS)]
            self.reserves += 1
        if self.client is not None:
            result = await self.client.reserve(
                reservation_id, ((sku, units),), channel=channel, ttl_seconds=TTL_SECONDS
            )
            if result.error is not None:
                raise result.error
            return result.granted
        response = await self.reservations.Reserve(
            pb.ReserveRequest(
                reservation_id=reservation_id, lines=[pb.Line(sku=sku, quantity=units)],
                ttl_seconds=TTL_SECONDS, channel=channel,
            ),
            timeout=CALL_TIMEOUT_SECONDS,
        )
        return response.granted

    async def restock(self, sku: str, units: int, adjustment_id: str) -> None:
        await self.admin.AdjustStock(
            pb.AdjustStockRequest(sku=sku, delta=units, adjustment_id=adjustment_id),
            timeout=CALL_TIMEOUT_SECONDS,
        )

    async def taken(self, skus: list[str]) -> dict[str, int]:
        taken = {}
        for start in range(0, len(skus), 1000):
            response = await self.reservations.GetStock(
                pb.GetStockRequest(skus=skus[start:start + 1000]), timeout=CALL_TIMEOUT_SECONDS
            )
            taken.update((row.sku, row.reserved + row.committed) for row in response.stock)
        return taken

    def wal_counters(self) -> dict[str, float] | None:
        if self.name in ("reservd-memory", "grpc-ceiling"):
            return None
        return scrape(self.metrics_port, prefix="reservd_wal_")

    def mirror_counters(self) -> dict[str, float] | None:
        """Fail-closed episodes and slow writes of the mirror (reservd-mirror only)."""
        if self.name not in MIRROR_SYSTEMS:
            return None
        return scrape(self.metrics_port, prefix="reservd_mirror_")

    def fail_closed_reasons(self) -> list[str]:
        """Why the daemon failed closed so far (its "failing closed" log lines)."""
        return [entry.get("why", "") for server in self.servers
                for entry in list(getattr(server, "tail", ()))
                if entry.get("msg") == "failing closed"]

    async def stop(self) -> None:
        if getattr(self, "stream", None) is not None:
            await self.stream.close()
        if getattr(self, "client", None) is not None:
            await self.client.close()
        if hasattr(self, "channel"):
            await self.channel.close()
        for server in reversed(self.servers):
            server.stop()
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)


class StreamBatches:
    """A Batch method over one BatchStream, for AutoBatcher: each request is written to the
    stream and answered by the response in the same place (the server answers in order)."""

    def __init__(self, stub) -> None:
        self.call = stub.BatchStream()
        self.waiting: collections.deque[asyncio.Future] = collections.deque()
        self.writing = asyncio.Lock()  # one write at a time, in the order of ``waiting``
        self.reader = asyncio.ensure_future(self._read())

    async def __call__(self, request: pb.BatchRequest, timeout: float | None = None):
        future = asyncio.get_running_loop().create_future()
        async with self.writing:
            self.waiting.append(future)
            await self.call.write(request)
        return await future

    async def _read(self) -> None:
        try:
            async for response in self.call:
                self.waiting.popleft().set_result(response)
            error: BaseException = ConnectionError("the BatchStream ended")
        except grpc.aio.AioRpcError as rpc_error:
            error = rpc_error
        while self.waiting:
            self.waiting.popleft().set_exception(error)

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)


class RedisLua(System):
    name = "redis-lua"

    async def start(self) -> None:
        import redis.asyncio

        self.server = await RedisServer("--appendonly", "yes", "--appendfsync", "always").start()
        self.pid = self.server.process.pid
        self.pool = redis.asyncio.BlockingConnectionPool(
            port=self.server.port, max_connections=1024, timeout=CALL_TIMEOUT_SECONDS
        )
        self.client = redis.asyncio.Redis(connection_pool=self.pool)
        self.script = self.client.register_script(REDIS_RESERVE)
        self.supplied: dict[str, int] = {}

    async def set_stock(self, stock: dict[str, int]) -> None:
        items = list(stock.items())
        for start in range(0, len(items), 1000):
            chunk = dict(items[start:start + 1000])
            await self.client.mset({f"stock:{sku}": units for sku, units in chunk.items()})
            self.supplied.update(chunk)

    async def reserve(self, reservation_id: str, sku: str, units: int) -> bool:
        answer = await self.script(keys=[f"stock:{sku}", f"reservation:{reservation_id}"],
                                   args=[units])
        return answer != 0

    async def restock(self, sku: str, units: int, adjustment_id: str) -> None:
        await self.client.incrby(f"stock:{sku}", units)
        self.supplied[sku] += units

    async def taken(self, skus: list[str]) -> dict[str, int]:
        taken = {}
        for start in range(0, len(skus), 1000):
            chunk = skus[start:start + 1000]
            values = await self.client.mget([f"stock:{sku}" for sku in chunk])
            taken.update(
                (sku, self.supplied[sku] - int(value)) for sku, value in zip(chunk, values)
            )
        return taken

    async def stop(self) -> None:
        if hasattr(self, "client"):
            await self.client.aclose()
            await self.pool.disconnect()
        if hasattr(self, "server"):
            self.server.stop()


class RedisPipelined(RedisLua):
    """The Lua reserve script, auto-pipelined like reservd's batching client: calls made while
    PIPELINES_IN_FLIGHT_MAX pipelines are in flight share the next one (redis-py pipeline,
    transaction=False: one round trip, each EVALSHA still atomic on its own)."""

    name = "redis-lua-pipelined"

    async def start(self) -> None:
        await super().start()
        self.sha = await self.client.script_load(REDIS_RESERVE)
        self.pending: list[tuple[str, str, int, asyncio.Future]] = []
        self.in_flight = 0
        self.flush_scheduled = False
        self.sending: set[asyncio.Task] = set()

    async def reserve(self, reservation_id: str, sku: str, units: int) -> bool:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pending.append((f"stock:{sku}", f"reservation:{reservation_id}", units, future))
        if not self.flush_scheduled and self.in_flight < PIPELINES_IN_FLIGHT_MAX:
            self.flush_scheduled = True
            loop.call_soon(self.flush)
        return await future != 0

    def flush(self) -> None:
        self.flush_scheduled = False
        while self.pending and self.in_flight < PIPELINES_IN_FLIGHT_MAX:
            calls = self.pending[:PIPELINE_OPS_MAX]
            del self.pending[:PIPELINE_OPS_MAX]
            self.in_flight += 1
            task = asyncio.ensure_future(self.send(calls))
            self.sending.add(task)
            task.add_done_callback(self.sending.discard)

    async def send(self, calls: list) -> None:
        try:
            pipe = self.client.pipeline(transaction=False)
            for stock_key, reservation_key, units, _ in calls:
                pipe.evalsha(self.sha, 2, stock_key, reservation_key, units)
            answers = await pipe.execute(raise_on_error=False)
        except Exception as error:
            answers = [error] * len(calls)
        finally:
            self.in_flight -= 1
            self.flush()
        for (*_, future), answer in zip(calls, answers):
            if isinstance(answer, Exception):
                future.set_exception(answer)
            else:
                future.set_result(answer)


class Postgres(System):
    name = "postgres"

    def __init__(self, pool_size_max: int) -> None:
        self.pool_size_max = pool_size_max
        self.directory: Path | None = None
        self.pg_ctl: list[str] | None = None
        self.pool = None
        self.supplied: dict[str, int] = {}

    async def start(self) -> None:
        try:
            import asyncpg
        except ImportError:
            raise Unavailable("asyncpg is not installed (pip install asyncpg)") from None
        binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
        if not binaries:
            raise Unavailable("no /usr/lib/postgresql/*/bin/postgres (apt-get install postgresql)")
        bin_dir = binaries[-1].parent
        self.directory = Path(tempfile.mkdtemp(prefix="bench-postgres-"))
        data, port = self.directory / "data", free_port()
        run_as: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            if shutil.which("runuser") is None:
                raise Unavailable("running as root and runuser is missing")
            try:
                shutil.chown(self.directory, "postgres", "postgres")
            except (LookupError, OSError) as error:
                raise Unavailable(f"no postgres user to run the server as: {error}") from None
            run_as = ["runuser", "-u", "postgres", "--"]
        initdb = subprocess.run(
            [*run_as, str(bin_dir / "initdb"), "-D", str(data), "-U", "bench", "-A", "trust",
             "--no-instructions", "-E", "UTF8"],
            capture_output=True, text=True,
        )
        if initdb.returncode != 0:
            raise Unavailable(f"initdb failed: {initdb.stderr.strip()[-300:]}")
        options = (
            f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.directory}"
            f" -c max_connections={self.pool_size_max + 20} -c synchronous_commit=on"
            " -c fsync=on -c shared_buffers=256MB"
        )
        self.pg_ctl = [*run_as, str(bin_dir / "pg_ctl"), "-D", str(data)]
        started = subprocess.run(
            [*self.pg_ctl, "-l", str(self.directory / "postgres.log"), "-o", options, "-w",
             "-t", str(START_TIMEOUT_SECONDS), "start"],
            capture_output=True, text=True,
        )
        if started.returncode != 0:
            log = (self.directory / "postgres.log").read_text()[-300:]
            raise Unavailable(f"postgres did not start: {started.stdout[-200:]} {log}")
        self.pid = int((data / "postmaster.pid").read_text().split()[0])
        self.dsn = f"postgresql://bench@127.0.0.1:{port}/postgres"
        connection = await asyncpg.connect(self.dsn)
        await connection.execute(POSTGRES_SCHEMA)
        await connection.close()

    async def resize(self, size: int) -> None:
        """A connection per client task, opened before the measurement."""
        import asyncpg

        if self.pool is not None and self.pool.get_max_size() == size:
            return
        if self.pool is not None:
            await self.pool.close()
        self.pool = await asyncpg.create_pool(self.dsn, min_size=size, max_size=size)

    async def set_stock(self, stock: dict[str, int]) -> None:
        async with self.pool.acquire() as connection:
            await connection.executemany(
                "INSERT INTO stock VALUES ($1, $2) ON CONFLICT (sku) "
                "DO UPDATE SET available = EXCLUDED.available",
                list(stock.items()),
            )
        self.supplied.update(stock)

    async def reserve(self, reservation_id: str, sku: str, units: int) -> bool:
        async with self.pool.acquire() as connection:
            return await connection.fetchval(POSTGRES_RESERVE, sku, units, reservation_id) == 1

    async def restock(self, sku: str, units: int, adjustment_id: str) -> None:
        async with self.pool.acquire() as connection:
            await connection.execute(
                "UPDATE stock SET available = available + $2 WHERE sku = $1", sku, units
            )
        self.supplied[sku] += units

    async def taken(self, skus: list[str]) -> dict[str, int]:
        async with self.pool.acquire() as connection:
            rows = await connection.fetch(
                "SELECT sku, available FROM stock WHERE sku = ANY($1::text[])", skus
            )
        return {row["sku"]: self.supplied[row["sku"]] - row["available"] for row in rows}

    async def stop(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        if self.pg_ctl is not None:
            subprocess.run([*self.pg_ctl, "-m", "fast", "-w", "stop"], capture_output=True)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def make_system(name: str, concurrency_max: int) -> System:
    if name == "redis-lua":
        return RedisLua()
    if name == "redis-lua-pipelined":
        return RedisPipelined()
    if name == "postgres":
        return Postgres(concurrency_max)
    return GrpcSystem(name)


def percentile(sorted_values: list[int], fraction: float) -> float:
    """Nearest-rank percentile of nanoseconds, in milliseconds."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index] / 1e6


async def run_cell(system: System, workload: str, concurrency: int, args,
                   cell: str) -> dict:
    """Prepare the cell's stock, warm up, then measure --ops reservations."""
    if isinstance(system, Postgres):
        await system.resize(concurrency)
    supplied: collections.Counter = collections.Counter()
    if workload == "hot":
        hot = f"hot-{cell}"
        await system.set_stock({hot: HOT_ON_HAND, f"warm-{cell}": 1_000_000})
        supplied[hot] = HOT_ON_HAND
        skus = [hot] * args.ops
        warm_skus = [f"warm-{cell}"] * args.warmup
    else:
        if not getattr(system, "steady_seeded", False):
            await system.set_stock({f"sku-{i:05d}": STEADY_ON_HAND for i in range(STEADY_SKUS)})
            system.steady_seeded = True
            system.steady_taken = collections.Counter()
        rng = random.Random(f"steady-{cell}")
        skus = [f"sku-{rng.randrange(STEADY_SKUS):05d}" for _ in range(args.ops)]
        warm_skus = [f"sku-{rng.randrange(STEADY_SKUS):05d}" for _ in range(args.warmup)]

    async def drive(prefix: str, plan: list[str], latencies: list[int] | None,
                    granted: collections.Counter, deadline: float) -> int:
        indices, errors = itertools.count(), [0]

        async def worker() -> None:
            while True:
                index = next(indices)
                if index >= len(plan) or time.monotonic() > deadline:
                    return
                sku = plan[index]
                started = time.perf_counter_ns()
                try:
                    ok = await system.reserve(f"{prefix}-{index}", sku, 1)
                except Exception:
                    errors[0] += 1
                    continue
                if latencies is not None:
                    latencies.append(time.perf_counter_ns() - started)
                if ok:
                    granted[sku] += 1
                if workload == "hot" and latencies is not None and (
                    index % HOT_RESTOCK_EVERY == HOT_RESTOCK_EVERY - 1
                ):
                    try:
                        await system.restock(
                            sku, HOT_RESTOCK_UNITS, f"{prefix}-restock-{index}"
                        )
                    except Exception:
                        errors[0] += 1
                    else:
                        supplied[sku] += HOT_RESTOCK_UNITS

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return errors[0]

    warm_granted: collections.Counter = collections.Counter()
    await drive(f"{cell}-warm", warm_skus, None, warm_granted, time.monotonic() + 60)
    latencies: list[int] = []
    granted: collections.Counter = collections.Counter()
    wal_before = system.wal_counters()
    mirror_before = system.mirror_counters()
    reasons_before = len(system.fail_closed_reasons()) if mirror_before is not None else 0
    server_cpu_before = process_tree_cpu(system.pid) if system.pid else None
    client_cpu = client_cpu_seconds()
    started = time.monotonic()
    errors = await drive(cell, skus, latencies, granted, started + args.cell_seconds)
    elapsed = time.monotonic() - started
    client_cpu = client_cpu_seconds() - client_cpu
    server_cpu = None
    if server_cpu_before is not None:
        server_cpu = cpu_seconds_between(server_cpu_before, process_tree_cpu(system.pid))
    wal_after = system.wal_counters()
    mirror_after = system.mirror_counters()

    # Oversold: units granted beyond units supplied, per SKU, by the client's count; and
    # whether the system's own final state agrees with that count.
    if workload == "hot":
        checked = [f"hot-{cell}"]
        expected = dict(granted)
    else:
        system.steady_taken.update(warm_granted)
        system.steady_taken.update(granted)
        checked = sorted(system.steady_taken)
        expected = system.steady_taken
        supplied = collections.Counter({sku: STEADY_ON_HAND for sku in checked})
    final = await system.taken(checked)
    oversold = sum(max(0, expected.get(sku, 0) - supplied[sku]) for sku in checked)
    oversold_server = sum(max(0, final.get(sku, 0) - supplied[sku]) for sku in checked)
    mismatch = sum(abs(final.get(sku, 0) - expected.get(sku, 0)) for sku in checked)

    latencies.sort()
    answered = len(latencies)
    result = {
        "system": system.name, "workload": workload, "concurrency": concurrency,
        "ops": answered, "errors": errors, "seconds": round(elapsed, 3),
        "capped": answered + errors < len(skus),
        "reservations_per_second": round(answered / elapsed, 1) if elapsed else 0.0,
        "granted_share": round(sum(granted.values()) / answered, 3) if answered else 0.0,
        "p50_ms": round(percentile(latencies, 0.50), 3),
        "p99_ms": round(percentile(latencies, 0.99), 3),
        "p999_ms": round(percentile(latencies, 0.999), 3),
        "oversold": max(oversold, oversold_server), "mismatch": mismatch,
        "server_cpu_percent": round(100 * server_cpu / elapsed, 1) if server_cpu is not None
        else None,
        "client_cpu_percent": round(100 * client_cpu / elapsed, 1),
        "server_cpu_us_per_op": round(1e6 * server_cpu / answered, 1)
        if server_cpu is not None and answered else None,
        "fsyncs_per_second": None, "records_per_fsync": None,
    }
    if wal_before is not None and wal_after is not None:
        fsyncs = wal_after.get("reservd_wal_fsyncs", 0) - wal_before.get("reservd_wal_fsyncs", 0)
        records = (wal_after.get("reservd_wal_records", 0)
                   - wal_before.get("reservd_wal_records", 0))
        result["fsyncs_per_second"] = round(fsyncs / elapsed, 1)
        result["records_per_fsync"] = round(records / fsyncs, 2) if fsyncs else None
    if mirror_before is not None and mirror_after is not None:
        for name in ("failures", "slow_writes", "grant_waits_exceeded"):
            key = f"reservd_mirror_{name}"
            result[f"mirror_{name}"] = mirror_after.get(key, 0) - mirror_before.get(key, 0)
        result["fail_closed_reasons"] = system.fail_closed_reasons()[reasons_before:]
    return result


def median_runs(runs: list[dict]) -> list[dict]:
    """Per cell, the run with the median reservations per second (all runs stay in the JSON),
    with the spread of the runs: (max - min) / median."""
    cells: dict[tuple, list[dict]] = collections.defaultdict(list)
    for run in runs:
        cells[(run["system"], run["workload"], run["concurrency"])].append(run)
    results = []
    for cell_runs in cells.values():
        ordered = sorted(cell_runs, key=lambda run: run["reservations_per_second"])
        median = dict(ordered[(len(ordered) - 1) // 2])
        rates = [run["reservations_per_second"] for run in ordered]
        median["runs"] = len(ordered)
        median["spread"] = (
            round((rates[-1] - rates[0]) / median["reservations_per_second"], 3)
            if median["reservations_per_second"] else None
        )
        median["oversold"] = max(run["oversold"] for run in ordered)
        median["mismatch"] = max(run["mismatch"] for run in ordered)
        median["errors"] = sum(run["errors"] for run in ordered)
        results.append(median)
    return results


def _cell(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_tables(results: list[dict], skipped: dict[str, str], args) -> list[dict]:
    header = (f"{'conc':>5} {'system':<22} {'res/s':>9} {'granted':>8} {'p50 ms':>8} "
              f"{'p99 ms':>8} {'p999 ms':>8} {'oversold':>8} {'mismatch':>8} {'errors':>6} "
              f"{'srv cpu':>8} {'cli cpu':>8} {'us/op':>6} {'fsync/s':>8} {'rec/fsync':>9} "
              f"{'spread':>7}")
    for workload in args.workloads:
        rows = [row for row in results if row["workload"] == workload]
        if not rows:
            continue
        print(f"\nworkload {workload}: {WORKLOAD_TEXT[workload]}; {args.ops} reservations a cell")
        print(header)
        for row in sorted(rows, key=lambda r: (r["concurrency"], SYSTEMS.index(r["system"]))):
            print(
                f"{row['concurrency']:>5} {row['system']:<22} "
                f"{row['reservations_per_second']:>9.0f} {row['granted_share']:>8.0%} "
                f"{row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} {row['p999_ms']:>8.2f} "
                f"{row['oversold']:>8} {row['mismatch']:>8} {row['errors']:>6} "
                f"{_cell(row['server_cpu_percent'], 0) + '%':>8} "
                f"{_cell(row['client_cpu_percent'], 0) + '%':>8} "
                f"{_cell(row.get('server_cpu_us_per_op'), 0):>6} "
                f"{_cell(row['fsyncs_per_second'], 0):>8} {_cell(row['records_per_fsync']):>9} "
                f"{_cell(row['spread'] * 100 if row['runs'] > 1 and row['spread'] else None, 0):>7}"
                + ("  (time cap)" if row["capped"] else "")
            )
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")

    by_key = {(r["system"], r["workload"], r["concurrency"]): r for r in results}
    ratios = []
    columns = [(w, c) for w in args.workloads for c in args.concurrency]
    for mine in RESERVD_SYSTEMS:
        for other in ("redis-lua", "redis-lua-pipelined", "grpc-ceiling"):
            values = {}
            for workload, concurrency in columns:
                a = by_key.get((mine, workload, concurrency))
                b = by_key.get((other, workload, concurrency))
                if a and b and b["reservations_per_second"]:
                    values[f"{workload}/{concurrency}"] = round(
                        a["reservations_per_second"] / b["reservations_per_second"], 2
                    )
            if values:
                ratios.append({"ratio": f"{mine} / {other}", **values})
    if ratios:
        names = [f"{w}/{c}" for w, c in columns]
        print("\nreservations per second, ratio (workload/concurrency)")
        print(f"{'':<46}" + "".join(f"{name:>11}" for name in names))
        for ratio in ratios:
            print(f"{ratio['ratio']:<46}"
                  + "".join(f"{_cell(ratio.get(name), 2):>11}" for name in names))
    return ratios


WORKLOAD_TEXT = {
    "hot": f"1 SKU, {HOT_ON_HAND} units + {HOT_RESTOCK_UNITS} after every "
           f"{HOT_RESTOCK_EVERY}th Reserve",
    "steady": f"{STEADY_SKUS} SKUs x {STEADY_ON_HAND} units, uniform",
}


def plot(results: list[dict], args, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots")
        return []
    written = []
    for key, label, filename in (
        ("reservations_per_second", "reservations / s", "sidebyside-throughput.png"),
        ("p99_ms", "p99 latency (ms)", "sidebyside-p99.png"),
    ):
        figure, axes = plt.subplots(
            1, len(args.workloads), figsize=(6 * len(args.workloads), 4.5), squeeze=False
        )
        for axis, workload in zip(axes[0], args.workloads):
            for system in SYSTEMS:
                rows = sorted(
                    (r for r in results if r["system"] == system and r["workload"] == workload),
                    key=lambda r: r["concurrency"],
                )
                if rows:
                    axis.plot([r["concurrency"] for r in rows], [r[key] for r in rows],
                              marker="o", label=system)
            axis.set_xscale("log", base=2)
            axis.set_xticks(args.concurrency, [str(c) for c in args.concurrency])
            axis.set_xlabel("concurrent requests")
            axis.set_ylabel(label)
            if key == "p99_ms":
                axis.set_yscale("log")
            axis.set_title(f"{workload}: {WORKLOAD_TEXT[workload]}", fontsize=9)
            axis.grid(True, alpha=0.3)
            axis.legend(fontsize=8)
        figure.suptitle(f"reservd side by side: {label} ({os.cpu_count()} cores, "
                        f"{args.ops} reservations a cell)", fontsize=10)
        figure.tight_layout()
        figure.savefig(out / filename, dpi=110)
        plt.close(figure)
        written.append(str(out / filename))
    return written


async def main(args) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cores": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "load_average": os.getloadavg(),
        "ops": args.ops, "warmup": args.warmup, "cell_seconds": args.cell_seconds,
        "workloads": {w: WORKLOAD_TEXT[w] for w in args.workloads},
    }
    print(f"{meta['date']}: {meta['cores']} cores, Python {meta['python']}, "
          f"load average {meta['load_average'][0]:.1f}")
    skipped: dict[str, str] = {}
    extensions: dict[str, object] = {}
    systems: list[System] = []
    for name in args.systems:
        system = make_system(name, max(args.concurrency))
        try:
            await system.start()
        except Unavailable as error:
            skipped[name] = str(error)
            print(f"skipped {name}: {error}", flush=True)
            await system.stop()
            continue
        systems.append(system)
        if isinstance(system, GrpcSystem) and name in RESERVD_SYSTEMS:
            extensions[name] = system.extension
    # Every system is up at once and they take turns cell by cell (in a rotating order), so
    # that a change in the machine's background load hits them all alike.
    runs: list[dict] = []
    try:
        for workload in args.workloads:
            for concurrency in args.concurrency:
                for repeat in range(args.repeat):
                    turn = repeat % max(1, len(systems))
                    for system in systems[turn:] + systems[:turn]:
                        if system.name in skipped:
                            continue
                        try:
                            result = await run_cell(
                                system, workload, concurrency, args,
                                f"{workload}-{concurrency}-{repeat}",
                            )
                        except Exception as error:  # must not hide the others' results
                            skipped[system.name] = f"failed mid-run: {error!r}"
                            print(f"{system.name} failed: {error!r}", flush=True)
                            continue
                        result["repeat"] = repeat
                        runs.append(result)
                        print(
                            f"{system.name:<22} {workload:<7} {concurrency:>4}: "
                            f"{result['reservations_per_second']:>8.0f} res/s, "
                            f"p99 {result['p99_ms']:.2f} ms, oversold {result['oversold']}",
                            flush=True,
                        )
    finally:
        for system in systems:
            await system.stop()
    results = median_runs(runs)
    meta["reservd_extension"] = extensions
    ratios = print_tables(results, skipped, args)
    path = args.out / "sidebyside.json"
    plots = plot(results, args, args.out)
    path.write_text(json.dumps(
        {"meta": meta, "results": results, "ratios": ratios, "skipped": skipped,
         "plots": plots, "runs": runs}, indent=1,
    ))
    print(f"\nwrote {path}" + "".join(f", {p}" for p in plots))
    oversold = sum(row["oversold"] for row in runs)
    return 1 if oversold else 0


def parse(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[16, 64, 256])
    parser.add_argument("--ops", type=int, default=None,
                        help="reservations a cell (default 20,000; 2,000 with --quick)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="unmeasured reservations before each cell (default ops/10, <= 1000)")
    parser.add_argument("--cell-seconds", type=float, default=120, help="time cap of a cell")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each cell; the table shows the median run and the spread")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    parser.add_argument("--quick", action="store_true",
                        help="2,000 reservations a cell, a 30 s cap, no PostgreSQL")
    args = parser.parse_args(argv)
    if args.quick:
        args.cell_seconds = min(args.cell_seconds, 30)
        args.systems = [name for name in args.systems if name != "postgres"]
    if args.ops is None:
        args.ops = 2_000 if args.quick else 20_000
    if args.warmup is None:
        args.warmup = min(1000, args.ops // 10)
    args.concurrency = sorted(set(args.concurrency))
    return args


if __name__ == "__main__":
    sys.exit(uvloop.run(main(parse())))
