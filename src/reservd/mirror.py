"""The Redis mirror: reservd's counter table, written to Redis for systems that read stock
without asking reservd (storefront pages, dashboards, channel sync jobs, a future standby).

A grant (anything that makes stock less available) is acknowledged only once the mirror holds it
(see reservd.service.Durability), so the mirror never shows stock that reservd has promised to
someone; releases, expiries, commits and fulfilments are mirrored as soon as possible but may be
acknowledged on the WAL alone: until they land the mirror shows *less* available, the safe side.

Key layout, under ``P`` = ``config.redis_prefix`` ("reservd:" by default):

``P + "stock:" + sku`` (hash)
    ``on_hand``, ``reserved``, ``committed``, ``available``: the SKU's counters (items), and
    ``epoch``, ``seq``: their version: the mirror epoch that wrote them and the sequence of the
    change they reflect (or, after a full rewrite, the sequence the rewrite was taken at).
``P + "watermark"`` (hash)
    ``epoch``, ``seq``: every change up to ``seq`` is in the stock hashes of this epoch;
    ``time_ms``: unix time (ms, reservd's clock) at which the stock hashes last equalled
    reservd's table, refreshed every ``mirror_heartbeat_ms`` while idle; ``stale_after_ms``: the
    age of ``time_ms`` beyond which a reader must stop trusting the mirror.
``P + "epoch"`` (string)
    The last epoch handed out. Every full rewrite (at start, and after Redis lost data) takes a
    new one, higher than any epoch Redis has seen.

Versions are compared as (epoch, seq) by one Lua script per batch (:data:`BATCH_SCRIPT`) that
writes absolute values only when they are newer, never INCR/DECR: a write that timed out on our
side may still land later, and then it changes nothing. The mirror writes ahead of the WAL fsync,
so a restarted reservd may reuse sequences that Redis already holds with other values: every run,
and every full rewrite, therefore writes in a new, higher epoch.

A reader fails closed on its own side when the watermark is missing, when ``now_ms - time_ms``
exceeds ``stale_after_ms`` (reservd stopped confirming the mirror: partitioned, lagging, down),
or when a stock hash's ``epoch`` differs from the watermark's (it predates the latest full
rewrite). reservd itself fails closed (:class:`reservd.guard.Guard` source ``"mirror"``) when a
write does not succeed within ``mirror_timeout_ms`` or the mirror lags by more than
``mirror_lag_ms_max``, and reopens by itself once it has resynchronised.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from typing import Iterable

from reservd.config import Config
from reservd.futures import SharedFuture
from reservd.guard import Guard
from reservd.table import Change, CounterTable

log = logging.getLogger("reservd.mirror")

# redis-py is imported by RedisMirror only: without --redis-url reservd never loads it.

SOURCE = "mirror"  # the guard source name

_SEQ_ALL = (1 << 63) - 1

# One batch, applied atomically. KEYS[1]: the watermark; KEYS[2..]: stock hashes.
# ARGV: mode, epoch, seq, time_ms (0: leave the time), expected_seq, stale_after_ms, then five
# per stock hash: seq, on_hand, reserved, committed, available.
#   apply:   refuse the whole batch unless the watermark is of this epoch and at least
#            expected_seq (otherwise Redis lost what it held: reservd must rewrite everything);
#            write each stock hash whose version is older; move the watermark forward.
#   rewrite: stock hashes only (a chunk of a full rewrite in a new epoch).
#   mark:    the watermark only: the full rewrite is complete.
BATCH_SCRIPT = """
local mode = ARGV[1]
local epoch = tonumber(ARGV[2])
local seq = tonumber(ARGV[3])
local mark = redis.call('HMGET', KEYS[1], 'epoch', 'seq', 'time_ms')
local mark_epoch = tonumber(mark[1])
local mark_seq = tonumber(mark[2]) or -1
if mode == 'apply' and (mark_epoch ~= epoch or mark_seq < tonumber(ARGV[5])) then
  return redis.error_reply('RESERVD_LOST the watermark is at epoch ' .. tostring(mark[1]) ..
    ' seq ' .. tostring(mark[2]) .. ', not epoch ' .. ARGV[2] .. ' seq >= ' .. ARGV[5])
end
if mark_epoch and mark_epoch > epoch then
  return redis.error_reply('RESERVD_NEWER the watermark has epoch ' .. mark[1] ..
    ', newer than ' .. ARGV[2] .. ': is another reservd mirroring under this prefix?')
end
local written = 0
for i = 2, #KEYS do
  local at = 6 + (i - 2) * 5
  local version = tonumber(ARGV[at + 1])
  local stored = redis.call('HMGET', KEYS[i], 'epoch', 'seq')
  local stored_epoch = tonumber(stored[1])
  if stored_epoch and stored_epoch > epoch then
    return redis.error_reply('RESERVD_NEWER ' .. KEYS[i] .. ' has epoch ' .. stored[1] ..
      ', newer than ' .. ARGV[2] .. ': is another reservd mirroring under this prefix?')
  end
  if not stored_epoch or stored_epoch < epoch or (tonumber(stored[2]) or -1) < version then
    redis.call('HSET', KEYS[i], 'on_hand', ARGV[at + 2], 'reserved', ARGV[at + 3],
      'committed', ARGV[at + 4], 'available', ARGV[at + 5], 'seq', ARGV[at + 1],
      'epoch', ARGV[2])
    written = written + 1
  end
end
if mode ~= 'rewrite' then
  local time_ms = tonumber(ARGV[4])
  local newer = mark_epoch ~= epoch or mark_seq < seq
  if newer or (mark_seq == seq and (tonumber(mark[3]) or 0) < time_ms) then
    local stamp = ARGV[4]
    if time_ms == 0 then
      stamp = mark[3] or '0'
    end
    redis.call('HSET', KEYS[1], 'epoch', ARGV[2], 'seq', ARGV[3], 'time_ms', stamp,
      'stale_after_ms', ARGV[6])
  end
end
return written
"""

# A new epoch, above the counter, the watermark and the caller's current epoch (Redis may have
# lost the counter with the rest of its data while reservd still remembers its epoch).
# KEYS[1]: the epoch counter; KEYS[2]: the watermark. ARGV[1]: the caller's epoch.
EPOCH_SCRIPT = """
local epoch = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'),
  tonumber(redis.call('HGET', KEYS[2], 'epoch') or '0'), tonumber(ARGV[1])) + 1
redis.call('SET', KEYS[1], epoch)
return epoch
"""

def batch_command(
    prefix: str, mode: str, epoch: int, seq: int, time_ms: int, expected_seq: int,
    stale_after_ms: int, rows: Iterable[Change],
) -> tuple[list[str], list]:
    """KEYS and ARGV of one :data:`BATCH_SCRIPT` call; ``rows`` as the change ring has them:
    (seq, sku, on_hand, reserved, committed)."""
    stock = prefix + "stock:"
    keys = [prefix + "watermark"]
    args: list = [mode, epoch, seq, time_ms, expected_seq, stale_after_ms]
    for version, sku, on_hand, reserved, committed in rows:
        keys.append(stock + sku)
        args += (version, on_hand, reserved, committed, on_hand - reserved - committed)
    return keys, args


def _pack(arguments: Iterable[str | int]) -> bytes:
    """One command in RESP, as redis-py's pack_command makes it, without its per-argument
    cost (the mirror's hot path sends one per batch)."""
    parts = [b""]
    for argument in arguments:
        data = argument.encode() if isinstance(argument, str) else b"%d" % argument
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    parts[0] = b"*%d\r\n" % (len(parts) - 1)
    return b"".join(parts)


class MirrorUnavailable(Exception):
    """The mirror cannot hold a grant now: Redis is unreachable or lagging."""


class _Rebuild(Exception):
    """The mirror's place in the change ring was overwritten: only a full rewrite can help."""


def _settle(future: asyncio.Future | None, error: BaseException | None = None) -> None:
    if future is None or future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
        future.exception()  # no "never retrieved" warning when nobody waits any more


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _is_fault(error: BaseException) -> bool:
    """A Redis that does not answer, refuses or drops the connection (not a bug of ours)."""
    from redis.exceptions import ConnectionError, TimeoutError as RedisTimeout

    return isinstance(error, (OSError, TimeoutError, ConnectionError, RedisTimeout))


def _describe(error: BaseException, timeout_ms: int) -> str:
    from redis.exceptions import TimeoutError as RedisTimeout

    if isinstance(error, (TimeoutError, RedisTimeout)):
        return f"the Redis mirror is unreachable: no answer within {timeout_ms} ms"
    if _is_fault(error):
        return f"the Redis mirror is unreachable: {error}"
    if isinstance(error, _Rebuild):
        return f"the Redis mirror is being rebuilt: {error}"
    text = str(error)
    if text.startswith("RESERVD_LOST "):
        return f"the Redis mirror lost data and is being rebuilt: {text[13:]}"
    if text.startswith("RESERVD_NEWER "):
        return f"the Redis mirror is written by someone else: {text[14:]}"
    return f"the Redis mirror failed: {type(error).__name__}: {error}"


@dataclasses.dataclass
class MirrorStats:
    batches: int = 0
    changes: int = 0  # change ring entries mirrored
    rewrites: int = 0  # full rewrites (every start, and after Redis lost data)
    replays: int = 0  # reopenings that replayed the ring from the mirror's position
    failures: int = 0
    reopen_seconds_last: float | None = None  # closed -> open again, the latest time


class RedisMirror:
    """Mirrors the counter table to Redis. ``mirrored_seq``: Redis holds every change up to it.

    One task owns the Redis connection: it reads the change ring from its position up to
    ``ledger.seq`` (not only the durable sequence: the Redis write runs alongside the WAL
    fsync), coalesces per SKU, and writes one script call per batch; or it resynchronises after
    a failure. A second task watches the lag.
    """

    def __init__(
        self, table: CounterTable, ledger, guard: Guard, config: Config, *, supervisor=None
    ) -> None:
        """``supervisor`` (reservd.supervisor.Supervisor) runs the mirror's tasks, so one that
        dies stops the daemon; without it they are plain tasks (tests of the mirror alone)."""
        assert config.redis_url, "RedisMirror needs config.redis_url"
        self.table = table
        self.ledger = ledger
        self.guard = guard
        self.config = config
        self.prefix = config.redis_prefix
        self.timeout_seconds = config.mirror_timeout_ms / 1000
        # A healthy reservd refreshes the watermark at least this often (lag bound, one write,
        # one heartbeat); readers stop trusting it beyond.
        self.stale_after_ms = (
            config.mirror_lag_ms_max + config.mirror_timeout_ms + config.mirror_heartbeat_ms
        )
        self.epoch = 0
        self.mirrored_seq = 0
        self.stats = MirrorStats()
        self._position = 0  # ring position after the last mirrored change
        self._rewrite_seq = 0  # sequence of the latest full rewrite
        self._open = False
        self._reason = "the Redis mirror is not written yet"
        self._client = None  # redis.asyncio.Redis with a single connection ...
        self._connection = None  # ... which the hot path uses directly
        self._batch_sha = ""
        self._epoch_sha = ""
        self._inflight: SharedFuture | None = None  # waiters of the batch being written
        self._inflight_seq = 0  # ... which covers every sequence up to this one
        self._next: SharedFuture | None = None  # waiters of the batch after it
        self._wake: asyncio.Future | None = None
        self._written_at = 0.0  # monotonic seconds of the latest successful write
        self._lag_samples: collections.deque[tuple[float, int]] = collections.deque()
        self._tasks: list[asyncio.Task] = []
        self._supervisor = supervisor
        self._closing = False

    # -- the hot path -------------------------------------------------------------------------

    def wait(self, seq: int) -> asyncio.Future:
        """A future resolved once Redis holds every change up to ``seq``, rejected with
        MirrorUnavailable if the mirror is (or goes) down first. Waiters share one future per
        batch."""
        loop = asyncio.get_running_loop()
        if seq <= self.mirrored_seq:
            future = loop.create_future()
            future.set_result(None)
            return future
        if not self._open:
            future = loop.create_future()
            _settle(future, MirrorUnavailable(self._reason))
            return future
        if seq <= self._inflight_seq:
            batch = self._inflight
            if batch is None:
                batch = self._inflight = SharedFuture(loop=loop)
            return batch
        batch = self._next
        if batch is None:
            batch = self._next = SharedFuture(loop=loop)
            # Start now if the log starts a batch with this change now. Otherwise the log's
            # next batch starts when the one in flight is durable, and so does ours
            # (_on_durable): the grant is not held up, and Redis gets fewer, larger writes.
            if self.ledger.log.durable_seq >= seq - 1:
                self._kick()
        return batch

    @property
    def closed_since(self) -> float | None:
        """Unix seconds since which the mirror has been failing closed (None: it is open)."""
        return self.guard.since(SOURCE)

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Rewrite the recovered state in a new epoch, then keep mirroring. If Redis does not
        answer now, reservd starts failed closed and reopens by itself once it does."""
        self.ledger.log.add_durable_listener(self._on_durable)
        try:
            await self._resync()
        except Exception as error:  # fail closed on anything; the task retries
            self._fail(error)
            await self._drop_client()
        spawn = self._supervisor.spawn if self._supervisor is not None else (
            lambda coro, name: asyncio.create_task(coro, name=name)
        )
        self._tasks = [spawn(self._run(), "mirror"), spawn(self._watch_lag(), "mirror-lag")]

    async def close(self) -> None:
        """Stop; mirror what is left if Redis answers (bounded by mirror_timeout_ms)."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._open and self._client is not None and self.ledger.seq > self.mirrored_seq:
            try:
                await self._write_changes(self.ledger.seq, time.time_ns() // 1_000_000)
            except Exception as error:
                why = _describe(error, self.config.mirror_timeout_ms)
                log.warning("final mirror write failed", extra={"why": why})
        self._open = False
        self._reason = "reservd is stopping"
        stopping = MirrorUnavailable(self._reason)
        _settle(self._inflight, stopping)
        _settle(self._next, stopping)
        self._inflight = self._next = None
        await self._drop_client()

    # -- the mirror task ----------------------------------------------------------------------

    async def _run(self) -> None:
        config = self.config
        retry_seconds = config.mirror_retry_ms_min / 1000
        while True:
            if not self._open:
                try:
                    await self._resync()
                except Exception as error:  # fail closed on anything, and retry
                    self._fail(error)
                    await self._drop_client()
                    await asyncio.sleep(retry_seconds)
                    retry_seconds = min(retry_seconds * 2, config.mirror_retry_ms_max / 1000)
                    continue
                retry_seconds = config.mirror_retry_ms_min / 1000
            try:
                await self._flush()
            except Exception as error:
                self._fail(error)
            await self._drop_client()

    async def _flush(self) -> None:
        """Write batches while there are changes, a heartbeat when idle; return when closed."""
        heartbeat_seconds = self.config.mirror_heartbeat_ms / 1000
        while self._open:
            if self.ledger.seq > self.mirrored_seq:
                # Reserves that are ready to run in this loop turn join the batch.
                await asyncio.sleep(0)
                await self._batch(self.ledger.seq)
                continue
            idle = time.monotonic() - self._written_at
            if idle >= heartbeat_seconds:
                await self._apply([], self.mirrored_seq, time.time_ns() // 1_000_000)
                continue
            await self._idle(heartbeat_seconds - idle)

    async def _batch(self, target: int) -> None:
        """Mirror every change up to ``target`` (one write, or more beyond mirror_batch_max),
        then release its waiters."""
        assert self._inflight is None, "one batch at a time"
        self._inflight, self._next = self._next, None
        self._inflight_seq = target
        time_ms = time.time_ns() // 1_000_000
        while self.mirrored_seq < target:
            await self._write_changes(target, time_ms)
        batch, self._inflight = self._inflight, None
        _settle(batch)

    async def _write_changes(self, target: int, time_ms: int) -> None:
        """One write: the next changes up to ``target``, at most mirror_batch_max of them.
        ``time_ms``: unix ms at which the table was at ``target``."""
        table = self.table
        position = self._position
        if position < table.ring_tail:
            raise _Rebuild(
                f"it fell {table.ring_head - position} changes behind, more than the change "
                "ring holds (watch_ring_capacity)"
            )
        batch_max = self.config.mirror_batch_max
        after, changes = table.changes(position, batch_max, target)
        if len(changes) < batch_max:
            seq = target
        else:
            # Entries of the last sequence may continue in the next read; the time is only
            # advanced with a complete batch (the table was exactly at ``seq`` then).
            seq, time_ms = max(self.mirrored_seq, changes[-1][0] - 1), 0
        latest = {change[1]: change for change in changes}  # per SKU, its newest entry
        await self._apply(latest.values(), seq, time_ms)
        assert after >= position and seq >= self.mirrored_seq, (after, position, seq)
        self._position = after
        self.mirrored_seq = seq
        self.stats.changes += len(changes)

    async def _apply(self, rows: Iterable[Change], seq: int, time_ms: int) -> None:
        keys, args = batch_command(
            self.prefix, "apply", self.epoch, seq, time_ms, self.mirrored_seq,
            self.stale_after_ms, rows,
        )
        connection = self._connection
        command = _pack(("EVALSHA", self._batch_sha, len(keys), *keys, *args))
        async with asyncio.timeout(self.timeout_seconds):
            await connection.send_packed_command(command, check_health=False)
            await connection.read_response()  # raises the script's error reply
        self._written_at = time.monotonic()
        self.stats.batches += 1

    async def _idle(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self._wake = wake = loop.create_future()
        timer = loop.call_later(seconds, _settle, wake)
        try:
            await wake
        finally:
            timer.cancel()
            self._wake = None

    def _kick(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _on_durable(self, seq: int) -> None:
        # The log takes its next batch now: mirror alongside it (see wait), and mirror what
        # nobody waits for (releases, expiries) once it is durable.
        if self.ledger.seq > self.mirrored_seq:
            self._kick()

    # -- failing closed and healing -----------------------------------------------------------

    def _fail(self, error: BaseException | str) -> None:
        """Fail closed: trip the guard, reject every waiter."""
        if self._closing:
            return
        if isinstance(error, str):
            why = error
        else:
            why = _describe(error, self.config.mirror_timeout_ms)
            if not (_is_fault(error) or isinstance(error, _Rebuild)
                    or str(error).startswith("RESERVD_")):
                log.error("unexpected mirror failure", exc_info=error)
        self._open = False
        self._reason = why
        self.stats.failures += 1
        self._lag_samples.clear()
        self.guard.trip(SOURCE, why)
        # Waiters answer "the Redis mirror is unreachable (<this>)".
        unavailable = MirrorUnavailable(why.removeprefix("the Redis mirror is unreachable: "))
        _settle(self._inflight, unavailable)
        _settle(self._next, unavailable)
        self._inflight = self._next = None

    def _connect(self):
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        timeout = self.timeout_seconds
        return Redis.from_url(
            self.config.redis_url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # redis-py's default retries a failed command three times with a backoff, which
            # stretches one timeout to seconds: fail at once, reconnecting is _run's job.
            retry=Retry(NoBackoff(), 0),
            # Our heartbeat keeps the connection busy; this PING before a command on a
            # connection idle for a second is only a backstop.
            health_check_interval=1,
            single_connection_client=True,
            client_name="reservd-mirror",
        )

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        self._connection = None
        if client is None:
            return
        try:
            async with asyncio.timeout(self.timeout_seconds):
                await client.aclose()
        except Exception:
            pass  # it is gone either way

    async def _resync(self) -> None:
        """Connect, bring Redis up to date (replay the ring, or rewrite every key), reopen."""
        started = time.monotonic()
        await self._drop_client()
        self._client = client = self._connect()
        async with asyncio.timeout(self.timeout_seconds):
            self._batch_sha = await client.script_load(BATCH_SCRIPT)
        async with asyncio.timeout(self.timeout_seconds):
            self._epoch_sha = await client.script_load(EPOCH_SCRIPT)
        self._connection = client.connection
        assert self._connection is not None, "a single-connection client after a command"
        async with asyncio.timeout(self.timeout_seconds):
            watermark = await client.hgetall(self.prefix + "watermark")
        how = self._resume(watermark)
        if how == "rewrite":
            await self._rewrite()
        target, time_ms = self.ledger.seq, time.time_ns() // 1_000_000
        while self.mirrored_seq < target:
            await self._write_changes(target, time_ms)
        if self._written_at < started:
            await self._apply([], self.mirrored_seq, time.time_ns() // 1_000_000)
        self._open = True
        self._lag_samples.clear()
        since = self.guard.since(SOURCE)
        self.guard.clear(SOURCE)
        now = time.monotonic()
        if how == "replay":
            self.stats.replays += 1
        closed_seconds = None if since is None else round(time.time() - since, 3)
        self.stats.reopen_seconds_last = closed_seconds
        log.info(
            "mirror open",
            extra={"how": how, "epoch": self.epoch, "seq": self.mirrored_seq,
                   "resync_seconds": round(now - started, 3), "closed_seconds": closed_seconds},
        )

    def _resume(self, watermark: dict[bytes, bytes]) -> str:
        """How to resynchronise: "replay" the ring from a position Redis is known to hold, or
        "rewrite" every key."""
        table = self.table
        if self.epoch == 0 or not watermark:
            return "rewrite"  # a new run, or Redis lost everything
        epoch = int(watermark.get(b"epoch", 0))
        seq = int(watermark.get(b"seq", -1))
        if epoch != self.epoch or seq > self.ledger.seq or self._position < table.ring_tail:
            return "rewrite"
        if seq >= self.mirrored_seq:
            return "replay"
        # Redis came back with less than it had acknowledged (an older snapshot or AOF).
        if seq >= self._rewrite_seq and self._retained_after(seq):
            log.warning(
                "Redis lost mirrored changes: replaying them",
                extra={"watermark_seq": seq, "mirrored_seq": self.mirrored_seq},
            )
            self.mirrored_seq = seq
            self._position = table.position_after(seq)
            return "replay"
        return "rewrite"

    def _retained_after(self, seq: int) -> bool:
        """Whether the ring still holds every change after ``seq``."""
        table = self.table
        if table.ring_tail == 0:
            return True
        _, oldest = table.changes(table.ring_tail, 1, _SEQ_ALL)
        return bool(oldest) and oldest[0][0] <= seq

    async def _rewrite(self) -> None:
        """Write every SKU's counters as of now in a new epoch, remove stock keys the table
        does not have, then the watermark. Later changes follow by replay from ring_head."""
        client, timeout = self._client, self.timeout_seconds
        prefix = self.prefix
        async with asyncio.timeout(timeout):
            epoch = int(await client.evalsha(
                self._epoch_sha, 2, prefix + "epoch", prefix + "watermark", self.epoch
            ))
        table = self.table
        seq, position = self.ledger.seq, table.ring_head
        time_ms = time.time_ns() // 1_000_000
        rows = list(table.items())
        batch_max = self.config.mirror_batch_max
        for start in range(0, len(rows), batch_max):
            keys, args = batch_command(
                prefix, "rewrite", epoch, seq, 0, 0, self.stale_after_ms,
                ((seq, sku, on_hand, reserved, committed)
                 for sku, on_hand, reserved, committed in rows[start:start + batch_max]),
            )
            async with asyncio.timeout(timeout):
                await client.evalsha(self._batch_sha, len(keys), *keys, *args)
        stock = prefix + "stock:"
        wanted = {(stock + row[0]).encode() for row in rows}
        pattern = _glob_escape(stock) + "*"
        cursor = 0
        while True:
            async with asyncio.timeout(timeout):
                cursor, found = await client.scan(cursor, match=pattern, count=batch_max)
            stray = [key for key in found if key not in wanted]
            if stray:
                async with asyncio.timeout(timeout):
                    await client.unlink(*stray)
            if cursor == 0:
                break
        keys, args = batch_command(prefix, "mark", epoch, seq, time_ms, 0, self.stale_after_ms, ())
        async with asyncio.timeout(timeout):
            await client.evalsha(self._batch_sha, len(keys), *keys, *args)
        self._written_at = time.monotonic()
        self.epoch = epoch
        self._rewrite_seq = self.mirrored_seq = seq
        self._position = position
        self.stats.rewrites += 1
        log.info("mirror rewritten", extra={"epoch": epoch, "seq": seq, "skus": len(rows)})

    async def _watch_lag(self) -> None:
        """Fail closed when a change applied mirror_lag_ms_max ago is still not mirrored."""
        lag_seconds = self.config.mirror_lag_ms_max / 1000
        tick = min(max(lag_seconds / 10, 0.01), 0.1)
        samples = self._lag_samples  # (monotonic seconds first seen, sequence), oldest first
        while True:
            await asyncio.sleep(tick)
            if not self._open:
                continue
            now, seq, mirrored = time.monotonic(), self.ledger.seq, self.mirrored_seq
            while samples and samples[0][1] <= mirrored:
                samples.popleft()
            if seq > mirrored and (not samples or samples[-1][1] < seq):
                samples.append((now, seq))
            if samples and now - samples[0][0] > lag_seconds:
                self._fail(
                    f"the Redis mirror is lagging: sequence {samples[0][1]} was applied "
                    f"{round((now - samples[0][0]) * 1000)} ms ago and Redis does not hold it "
                    f"yet (mirror_lag_ms_max {self.config.mirror_lag_ms_max})"
                )
