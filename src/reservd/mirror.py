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
from typing import Container, Iterable

from reservd.config import Config
from reservd.futures import SharedFuture
from reservd.guard import Guard
from reservd.table import Change, CounterTable

log = logging.getLogger("reservd.mirror")

# redis-py is imported by RedisMirror only: without --redis-url reservd never loads it.

SOURCE = "mirror"  # the guard source name

_SEQ_ALL = (1 << 63) - 1

# One batch, applied atomically. KEYS[1]: the watermark; KEYS[2..]: stock hashes.
# ARGV: mode, epoch, seq, time_ms (0: leave the time), expected_seq, stale_after_ms, then six
# per stock hash: rule, seq, on_hand, reserved, committed, available.
#   apply:   refuse the whole batch unless the watermark is of this epoch and at least
#            expected_seq (otherwise Redis lost what it held: reservd must rewrite everything);
#            write each stock hash by its rule; move the watermark forward.
#   rewrite: stock hashes only (a chunk of a full rewrite in a new epoch).
#   mark:    the watermark only: the full rewrite is complete.
# Rules: "newer": write when the stored version is older (the values are safe to show as they
# are); "lower": write only over a hash of this epoch with an older version *and* more
# available (the values are not durable yet: they may only take availability down).
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
  local at = 6 + (i - 2) * 6
  local version = tonumber(ARGV[at + 2])
  local stored = redis.call('HMGET', KEYS[i], 'epoch', 'seq', 'available')
  local stored_epoch = tonumber(stored[1])
  if stored_epoch and stored_epoch > epoch then
    return redis.error_reply('RESERVD_NEWER ' .. KEYS[i] .. ' has epoch ' .. stored[1] ..
      ', newer than ' .. ARGV[2] .. ': is another reservd mirroring under this prefix?')
  end
  local older = (tonumber(stored[2]) or -1) < version
  local write
  if ARGV[at + 1] == 'lower' then
    write = stored_epoch == epoch and older and
      tonumber(ARGV[at + 6]) < (tonumber(stored[3]) or 0)
  else
    write = not stored_epoch or stored_epoch < epoch or older
  end
  if write then
    redis.call('HSET', KEYS[i], 'on_hand', ARGV[at + 3], 'reserved', ARGV[at + 4],
      'committed', ARGV[at + 5], 'available', ARGV[at + 6], 'seq', ARGV[at + 2],
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
    stale_after_ms: int, rows: Iterable[Change], lower: Container[str] = (),
) -> tuple[list[str], list]:
    """KEYS and ARGV of one :data:`BATCH_SCRIPT` call; ``rows`` as the change ring has them:
    (seq, sku, on_hand, reserved, committed); the SKUs in ``lower`` are written by the "lower"
    rule (not durable yet), the others by the "newer" rule."""
    stock = prefix + "stock:"
    keys = [prefix + "watermark"]
    args: list = [mode, epoch, seq, time_ms, expected_seq, stale_after_ms]
    for version, sku, on_hand, reserved, committed in rows:
        keys.append(stock + sku)
        args += (
            "lower" if sku in lower else "newer", version, on_hand, reserved, committed,
            on_hand - reserved - committed,
        )
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


def _available(change: Change) -> int:
    return change[2] - change[3] - change[4]


def _read(table: CounterTable, position: int, seq_max: int, read_max: int):
    """Every ring entry from ``position`` up to ``seq_max``: (position after them, entries)."""
    entries: list[Change] = []
    while True:
        position, changes = table.changes(position, read_max, seq_max)
        entries += changes
        if len(changes) < read_max:
            return position, entries


@dataclasses.dataclass
class Plan:
    """One mirror write: ``rows`` (one per SKU), the SKUs among them written by the "lower"
    rule, and the ring position after the last durable entry read (where the next plan starts).
    """

    rows: list[Change]
    lower: set[str]
    settled_position: int
    settled_entries: int  # durable entries read (changes mirrored for good)


def plan(
    table: CounterTable, position: int, durable_seq: int, target: int, read_max: int
) -> Plan:
    """What to write so that Redis shows every change up to ``target`` that lowers
    availability, and never more available than any state a recovery could bring back.

    ``position`` is the ring position of the first entry after the last durable sequence the
    mirror wrote (every entry before it is in Redis, or superseded there by a lower one). The
    entries from it up to ``target`` split at ``durable_seq``: per SKU, its *base* is its newest
    durable entry, and its *pending* entries are the ones after (applied, not yet fsync'd). After
    a crash the log holds the changes up to some sequence between ``durable_seq`` and
    ``target`` (or beyond, with changes no write has covered), so per SKU the state a recovery
    brings back is its base or one of its pending entries: the write shows their minimum.

    - A SKU with a base: whichever of the base and its least-available pending entry has less
      available (the newer on a tie), by the "newer" rule. Both the base and every pending
      entry are >= it. Versions never go back: the base is newer than anything the previous
      write could have chosen below it, and a pending entry stays chosen until one newer and
      no higher replaces it.
    - A SKU with pending entries only: its durable state is the one Redis already reflects
      (Redis holds it or something lower), so its least-available pending entry is written by
      the "lower" rule: only if it has less available than Redis holds.

    Releases, expiries, commits of fewer units, restocks (anything that raises availability)
    therefore reach Redis once durable; grants and stock taken down reach it ahead of the fsync.
    """
    settled_position, durable = _read(table, position, durable_seq, read_max)
    _, pending = _read(table, settled_position, target, read_max)
    base: dict[str, Change] = {change[1]: change for change in durable}
    least: dict[str, Change] = {}
    for change in pending:
        sku = change[1]
        current = least.get(sku)
        if current is None or _available(change) <= _available(current):
            least[sku] = change
    rows: list[Change] = []
    lower: set[str] = set()
    for sku, change in base.items():
        candidate = least.pop(sku, None)
        if candidate is not None and _available(candidate) <= _available(change):
            change = candidate
        rows.append(change)
    rows += least.values()
    lower.update(least)
    return Plan(rows, lower, settled_position, len(durable))


class _Silent(TimeoutError):
    """Redis answered nothing (no reply, no PONG) for mirror_silence_ms_max: a partition."""


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

    if isinstance(error, _Silent):
        return str(error)
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
    slow_writes: int = 0  # writes answered later than mirror_timeout_ms (Redis probed, alive)
    grant_waits_exceeded: int = 0  # grants answered UNAVAILABLE after mirror_grant_wait_ms_max
    reopen_seconds_last: float | None = None  # closed -> open again, the latest time


class RedisMirror:
    """Mirrors the counter table to Redis.

    ``mirrored_seq``: Redis reflects every change up to it that lowers availability (every
    grant up to it is held). ``settled_seq``: Redis reflects every change up to it (the durable
    sequence of the latest write). One task owns the Redis connection: it reads the change ring
    from the settled position up to ``ledger.seq`` (not only the durable sequence: the Redis
    write of a grant runs alongside the WAL fsync), picks one row per SKU (:func:`plan`), and
    writes one script call per batch; or it resynchronises after a failure. A second task
    watches the lag.
    """

    def __init__(self, table: CounterTable, ledger, guard: Guard, config: Config) -> None:
        assert config.redis_url, "RedisMirror needs config.redis_url"
        self.table = table
        self.ledger = ledger
        self.guard = guard
        self.config = config
        self.prefix = config.redis_prefix
        self.timeout_seconds = config.mirror_timeout_ms / 1000
        self.silence_seconds = config.mirror_silence_ms_max / 1000
        self.grant_wait_seconds = config.mirror_grant_wait_ms_max / 1000
        # A healthy reservd refreshes the watermark at least this often (lag bound, one write,
        # one heartbeat); readers stop trusting it beyond.
        self.stale_after_ms = (
            config.mirror_lag_ms_max + config.mirror_timeout_ms + config.mirror_heartbeat_ms
        )
        self.epoch = 0
        self.mirrored_seq = 0
        self.settled_seq = 0
        self.stats = MirrorStats()
        self._position = 0  # ring position after the last entry <= settled_seq
        self._rewrite_seq = 0  # sequence of the latest full rewrite
        self._open = False
        self._reason = "the Redis mirror is not written yet"
        self._client = None  # redis.asyncio.Redis with a single connection ...
        self._connection = None  # ... which the hot path uses directly
        self._probe = None  # a second single-connection client: PING while a write is slow
        self._batch_sha = ""
        self._epoch_sha = ""
        self._inflight: SharedFuture | None = None  # waiters of the batch being written
        self._inflight_seq = 0  # ... which covers every sequence up to this one
        self._next: SharedFuture | None = None  # waiters of the batch after it
        self._wake: asyncio.Future | None = None
        self._written_at = 0.0  # monotonic seconds of the latest successful write
        self._lag_samples: collections.deque[tuple[float, int]] = collections.deque()
        self._tasks: list[asyncio.Task] = []
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
        self._tasks = [
            asyncio.create_task(self._run(), name="mirror"),
            asyncio.create_task(self._watch_lag(), name="mirror-lag"),
        ]

    async def close(self) -> None:
        """Stop; mirror what is left if Redis answers (bounded by mirror_timeout_ms)."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._open and self._client is not None and self._behind():
            try:
                await self._write(self.ledger.seq)
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
            if self._behind():
                # Reserves that are ready to run in this loop turn join the batch.
                await asyncio.sleep(0)
                await self._batch(self.ledger.seq)
                continue
            idle = time.monotonic() - self._written_at
            if idle >= heartbeat_seconds:
                await self._apply([], self.settled_seq, time.time_ns() // 1_000_000)
                continue
            await self._idle(heartbeat_seconds - idle)

    def _behind(self) -> bool:
        """Whether a write is due: changes not mirrored yet, or mirrored ones that have become
        durable since (a release shows in Redis only then)."""
        return (self.ledger.seq > self.mirrored_seq
                or self.ledger.log.durable_seq > self.settled_seq)

    async def _batch(self, target: int) -> None:
        """Mirror every change up to ``target``, then release its waiters."""
        assert self._inflight is None, "one batch at a time"
        self._inflight, self._next = self._next, None
        self._inflight_seq = target
        await self._write(target)
        batch, self._inflight = self._inflight, None
        _settle(batch)

    async def _write(self, target: int) -> None:
        """Write the :func:`plan` up to ``target`` (several script calls beyond
        mirror_batch_max rows: each row is safe on its own; the watermark moves with the last).
        """
        table = self.table
        if self._position < table.ring_tail:
            raise _Rebuild(
                f"it fell {table.ring_head - self._position} changes behind, more than the "
                "change ring holds (watch_ring_capacity)"
            )
        durable = min(self.ledger.log.durable_seq, target)
        assert durable >= self.settled_seq and target >= self.mirrored_seq, (
            durable, self.settled_seq, target, self.mirrored_seq)
        batch_max = self.config.mirror_batch_max
        step = plan(table, self._position, durable, target, batch_max)
        time_ms = time.time_ns() // 1_000_000  # the table was at ``target`` now
        rows = step.rows
        chunks = [rows[start:start + batch_max] for start in range(0, len(rows), batch_max)]
        for chunk in chunks[:-1]:  # not the last call: leave the watermark where it is
            await self._apply(chunk, self.settled_seq, 0, step.lower)
        await self._apply(chunks[-1] if chunks else [], durable, time_ms, step.lower)
        self._position = step.settled_position
        self.settled_seq = durable
        self.mirrored_seq = target
        self.stats.changes += step.settled_entries

    async def _apply(
        self, rows: Iterable[Change], seq: int, time_ms: int, lower: Container[str] = ()
    ) -> None:
        keys, args = batch_command(
            self.prefix, "apply", self.epoch, seq, time_ms, self.settled_seq,
            self.stale_after_ms, rows, lower,
        )
        await self._call(_pack(("EVALSHA", self._batch_sha, len(keys), *keys, *args)))
        self._written_at = time.monotonic()
        self.stats.batches += 1

    async def _call(self, command: bytes):
        """Send one packed command on the mirror connection; return its reply (raises the
        script's error reply).

        A slow reply is not a partition. Past mirror_timeout_ms the mirror asks Redis for a
        sign of life (PING on the probe connection), again every mirror_timeout_ms; it gives up
        (:class:`_Silent`) when Redis has answered nothing at all for mirror_silence_ms_max, or
        when the reply has not come within mirror_lag_ms_max although Redis answers pings (a
        stuck connection). A refused or reset connection raises at once.
        """
        connection = self._connection

        async def roundtrip():
            await connection.send_packed_command(command, check_health=False)
            return await connection.read_response()

        reply = asyncio.ensure_future(roundtrip())
        probe = None
        sent = heard = time.monotonic()  # heard: the latest sign of life
        give_up = sent + self.config.mirror_lag_ms_max / 1000
        try:
            while True:
                now = time.monotonic()
                wake = min(now + self.timeout_seconds, heard + self.silence_seconds, give_up)
                waiting = {reply} if probe is None else {reply, probe}
                done, _ = await asyncio.wait(
                    waiting, timeout=max(wake - now, 0), return_when=asyncio.FIRST_COMPLETED
                )
                now = time.monotonic()
                if reply in done:
                    if now - sent > self.timeout_seconds:
                        self.stats.slow_writes += 1
                    return reply.result()
                if probe is not None and probe.done():
                    probe.result()  # a refused or reset connection is a fault now
                    heard, probe = now, None
                if now >= heard + self.silence_seconds:
                    raise _Silent(
                        "the Redis mirror is unreachable: no answer within "
                        f"{self.config.mirror_silence_ms_max} ms (mirror_silence_ms_max)"
                    )
                if now >= give_up:
                    raise _Silent(
                        "the Redis mirror is lagging: a write had no reply within "
                        f"{self.config.mirror_lag_ms_max} ms (mirror_lag_ms_max)"
                    )
                if probe is None and now - max(sent, heard) >= self.timeout_seconds:
                    probe = asyncio.ensure_future(self._probe.ping())
        finally:
            for pending in (reply, probe):
                if pending is not None and not pending.done():
                    pending.cancel()

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
        # may only show once durable (releases, expiries, restocks).
        if self._behind():
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

    def _connect(self, name: str = "reservd-mirror"):
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        return Redis.from_url(
            self.config.redis_url,
            # No read timeout of redis-py's own: a slow reply is not a failure (see _call),
            # and every wait here is bounded explicitly.
            socket_timeout=None,
            socket_connect_timeout=self.silence_seconds,
            # redis-py's default retries a failed command three times with a backoff, which
            # stretches one timeout to seconds: fail at once, reconnecting is _run's job.
            retry=Retry(NoBackoff(), 0),
            # Our heartbeat keeps the connection busy; this PING before a command on a
            # connection idle for a second is only a backstop.
            health_check_interval=1,
            single_connection_client=True,
            client_name=name,
        )

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        probe, self._probe = self._probe, None
        self._connection = None
        for each in (client, probe):
            if each is None:
                continue
            try:
                async with asyncio.timeout(self.timeout_seconds):
                    await each.aclose()
            except Exception:
                pass  # it is gone either way

    async def _resync(self) -> None:
        """Connect, bring Redis up to date (replay the ring, or rewrite every key), reopen."""
        started = time.monotonic()
        await self._drop_client()
        self._client = client = self._connect()
        self._probe = self._connect("reservd-mirror-probe")
        timeout = self.silence_seconds
        async with asyncio.timeout(timeout):
            self._batch_sha = await client.script_load(BATCH_SCRIPT)
        async with asyncio.timeout(timeout):
            self._epoch_sha = await client.script_load(EPOCH_SCRIPT)
        self._connection = client.connection
        assert self._connection is not None, "a single-connection client after a command"
        async with asyncio.timeout(timeout):
            watermark = await client.hgetall(self.prefix + "watermark")
        async with asyncio.timeout(timeout):
            await self._probe.ping()  # connected before a slow write needs it
        how = self._resume(watermark)
        if how == "rewrite":
            await self._rewrite()
        await self._write(self.ledger.seq)
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
        if seq >= self.settled_seq:
            return "replay"
        # Redis came back with less than it had acknowledged (an older snapshot or AOF).
        if seq >= self._rewrite_seq and self._retained_after(seq):
            log.warning(
                "Redis lost mirrored changes: replaying them",
                extra={"watermark_seq": seq, "settled_seq": self.settled_seq},
            )
            self.settled_seq = self.mirrored_seq = seq
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
        """Write every SKU's durable counters in a new epoch, remove the other stock keys, then
        the watermark. A SKU with changes not durable yet is left out (its key removed: no
        stock shown) until they are; later changes follow from the durable position."""
        client, timeout = self._client, self.silence_seconds
        prefix = self.prefix
        async with asyncio.timeout(timeout):
            epoch = int(await client.evalsha(
                self._epoch_sha, 2, prefix + "epoch", prefix + "watermark", self.epoch
            ))
        table = self.table
        batch_max = self.config.mirror_batch_max
        seq = self.ledger.seq
        durable = min(self.ledger.log.durable_seq, seq)
        if durable < seq and not self._retained_after(durable):
            raise _Rebuild(
                f"the log is {seq - durable} changes from durable, more than the change ring "
                "holds (watch_ring_capacity)"
            )
        position = table.position_after(durable)
        _, pending = _read(table, position, seq, batch_max)
        skipped = {change[1] for change in pending}
        time_ms = time.time_ns() // 1_000_000
        rows = [row for row in table.items() if row[0] not in skipped]
        for start in range(0, len(rows), batch_max):
            keys, args = batch_command(
                prefix, "rewrite", epoch, durable, 0, 0, self.stale_after_ms,
                ((durable, sku, on_hand, reserved, committed)
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
        keys, args = batch_command(
            prefix, "mark", epoch, durable, time_ms, 0, self.stale_after_ms, ()
        )
        async with asyncio.timeout(timeout):
            await client.evalsha(self._batch_sha, len(keys), *keys, *args)
        self._written_at = time.monotonic()
        self.epoch = epoch
        self._rewrite_seq = self.settled_seq = self.mirrored_seq = durable
        self._position = position
        self.stats.rewrites += 1
        log.info("mirror rewritten", extra={
            "epoch": epoch, "seq": durable, "skus": len(rows), "not_durable_skus": len(skipped)
        })

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
