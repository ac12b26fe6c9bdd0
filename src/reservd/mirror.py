"""The Redis mirror: reservd's counter table, written to Redis for systems that read stock
without asking reservd (storefront pages, dashboards, channel sync jobs, a future standby).

The mirror never shows more available than the truth, across crashes too:

- a grant (anything that makes stock less available) is written ahead of its WAL fsync and
  acknowledged only once the mirror holds it (see reservd.service.Durability);
- anything that makes stock more available (release, expiry, commit of fewer units, fulfil,
  a restock) is written only once durable, so after a crash Redis shows no more than the
  recovered log. Per SKU, each write shows the least available of the durable state and of
  every applied, not yet durable state (:func:`plan`).

A slow Redis is not a partition: a write unanswered after ``mirror_timeout_ms`` makes the
mirror ping Redis on a second connection, and it fails closed only when Redis has answered
nothing for ``mirror_silence_ms_max``, or a write has no reply within ``mirror_lag_ms_max``,
or a change waits that long to be mirrored (:meth:`RedisMirror._call`). A grant waits for the
mirror at most ``mirror_grant_wait_ms_max``.

Key layout, under ``P`` = ``config.redis_prefix`` ("reservd:" by default):

``P + "stock:" + sku`` (hash)
    ``on_hand``, ``reserved``, ``committed``, ``available``: the SKU's counters (items), and
    ``epoch``, ``seq``: their version: the mirror epoch that wrote them and the sequence of the
    change they reflect (or, after a full rewrite, the sequence the rewrite was taken at).
    With channels or buckets (reservd.mirrorfields): ``ats:<channel>``, ``level:<channel>``,
    ``level`` (the most severe), ``free:<bucket>`` (units), versioned by ``channels_seq`` and
    ``channels_exact``, each field only ever shown on its safe side.
``P + "watermark"`` (hash)
    ``epoch``, ``seq``: every change up to ``seq`` (a durable sequence) is in the stock hashes
    of this epoch, and so are the grants after it that the hashes hold;
    ``time_ms``: unix time (ms, reservd's clock) at which the stock hashes last reflected
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
rewrite). reservd itself fails closed (:class:`reservd.guard.Guard` source ``"mirror"``) as
described above, and reopens by itself once it has resynchronised.
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
from reservd.mirrorfields import FieldJournal, FieldsDropped
from reservd.mirrorwrite import (
    BATCH_SCRIPT, EPOCH_SCRIPT, ChannelRow, batch_command, pack, plan, read_entries,
)
from reservd.table import Change, CounterTable

log = logging.getLogger("reservd.mirror")

# redis-py is imported by RedisMirror only: without --redis-url reservd never loads it.

SOURCE = "mirror"  # the guard source name

_SEQ_ALL = (1 << 63) - 1

class _Silent(TimeoutError):
    """Redis answered nothing (no reply, no PONG) for mirror_silence_ms_max: a partition."""


class MirrorUnavailable(Exception):
    """The mirror cannot hold a grant now: Redis is unreachable or lagging."""


class MirrorSlow(MirrorUnavailable):
    """The mirror did not hold a grant within mirror_grant_wait_ms_max (reservd stays open)."""


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
    rows_unchanged: int = 0  # rows not sent again: the previous write sent them as they are
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
        # Each ring entry's channel fields, recorded right after its mutation (the ledger
        # calls it): what the plan needs to show every ats and bucket the safe way.
        self.fields = FieldJournal(table, ledger.channels)
        ledger.field_journal = self.fields
        # Told each successful batch write's seconds (reservd.metrics.Metrics).
        self.observer = None
        self._position = 0  # ring position after the last entry <= settled_seq
        # SKU -> what the latest successful write sent for it (row, rule, channel fields),
        # kept only while the SKU has entries not durable yet: until its fsync, the next plans
        # often choose the very same row, and sending it again would change nothing in Redis
        # (the script writes only newer or lower values). Such rows are not sent again: most
        # of what channel fields cost a write. At most one per ring entry not durable yet
        # (watch_ring_capacity); emptied whenever the mirror resynchronises.
        self._sent: dict[str, tuple] = {}  # reservd_mirror_pending_rows
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
        self._supervisor = supervisor
        self._closing = False

    # -- the hot path -------------------------------------------------------------------------

    def wait(self, seq: int) -> asyncio.Future:
        """A future resolved once Redis holds every grant up to ``seq`` (shows no more
        available than the table after it), rejected with MirrorUnavailable if the mirror is
        (or goes) down first, or with MirrorSlow after mirror_grant_wait_ms_max. Waiters of
        one batch share one write; each gets its own future (its own deadline)."""
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
            return self._bounded(batch)
        batch = self._next
        if batch is None:
            batch = self._next = SharedFuture(loop=loop)
            # Start now if the log starts a batch with this change now. Otherwise the log's
            # next batch starts when the one in flight is durable, and so does ours
            # (_on_durable): the grant is not held up, and Redis gets fewer, larger writes.
            if self.ledger.log.durable_seq >= seq - 1:
                self._kick()
        return self._bounded(batch)

    def _bounded(self, batch: asyncio.Future) -> asyncio.Future:
        """This waiter's future: the batch's outcome, or MirrorSlow after
        mirror_grant_wait_ms_max (the batch goes on; cancelling this future leaves it alone)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def expire() -> None:
            if not future.done():
                self.stats.grant_waits_exceeded += 1
                _settle(future, MirrorSlow(
                    f"it did not confirm within {self.config.mirror_grant_wait_ms_max} ms "
                    "(mirror_grant_wait_ms_max): slow, not down"
                ))

        timer = loop.call_later(self.grant_wait_seconds, expire)

        def copy(done: asyncio.Future) -> None:
            timer.cancel()
            if not future.done():
                _settle(future, done.exception())

        batch.add_done_callback(copy)
        return future

    @property
    def pending_rows(self) -> int:
        """Rows remembered as sent for SKUs with changes not durable yet (see ``_sent``)."""
        return len(self._sent)

    @property
    def closed_since(self) -> float | None:
        """Unix seconds since which the mirror has been failing closed (None: it is open)."""
        return self.guard.since(SOURCE)

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Rewrite the recovered state in a new epoch, then keep mirroring. If Redis does not
        answer now, reservd starts failed closed and reopens by itself once it does."""
        self.ledger.log.add_durable_listener(self._on_durable)
        self.fields.begin()
        try:
            await self._resync()
        except AssertionError:
            raise  # a bug of ours: fatal, not a Redis fault
        except Exception as error:  # fail closed on anything; the task retries
            self._fail(error)
            await self._drop_client()
        spawn = self._supervisor.spawn if self._supervisor is not None else (
            lambda coro, name: asyncio.create_task(coro, name=name)
        )
        self._tasks = [spawn(self._run(), "mirror"), spawn(self._watch_lag(), "mirror-lag")]

    async def close(self) -> None:
        """Stop; mirror what is left if Redis answers (bounded by mirror_silence_ms_max)."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        # Only waits for the cancellations: a task that failed before was already reported by
        # the supervisor's done callback, which owns failures.
        if self._tasks:
            await asyncio.wait(self._tasks)
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
                except AssertionError:
                    raise  # a bug of ours: the supervisor stops the daemon
                except Exception as error:  # fail closed on anything, and retry
                    self._fail(error)
                    await self._drop_client()
                    await asyncio.sleep(retry_seconds)
                    retry_seconds = min(retry_seconds * 2, config.mirror_retry_ms_max / 1000)
                    continue
                retry_seconds = config.mirror_retry_ms_min / 1000
            try:
                await self._flush()
            except AssertionError:
                raise  # a bug of ours: the supervisor stops the daemon
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
        try:
            step = plan(table, self._position, durable, target, batch_max, self.fields.at)
        except FieldsDropped as error:
            raise _Rebuild(str(error)) from None
        time_ms = time.time_ns() // 1_000_000  # the table was at ``target`` now
        sent, lower, channels = self._sent, step.lower, step.channels
        sending = {row[1]: (row, row[1] in lower, channels.get(row[1])) for row in step.rows}
        rows = [row for row in step.rows if sent.get(row[1]) != sending[row[1]]]
        self.stats.rows_unchanged += len(step.rows) - len(rows)
        chunks = [rows[start:start + batch_max] for start in range(0, len(rows), batch_max)]
        for chunk in chunks[:-1]:  # not the last call: leave the watermark where it is
            await self._apply(chunk, self.settled_seq, 0, step.lower, step.channels)
        await self._apply(
            chunks[-1] if chunks else [], durable, time_ms, step.lower, step.channels
        )
        pending = step.pending
        for sku, what in sending.items():
            if sku in pending:
                sent[sku] = what
            else:
                sent.pop(sku, None)
        self._position = step.settled_position
        self.fields.settle(step.settled_position)
        self.settled_seq = durable
        self.mirrored_seq = target
        self.stats.changes += step.settled_entries

    async def _apply(
        self, rows: Iterable[Change], seq: int, time_ms: int, lower: Container[str] = (),
        channels: dict[str, ChannelRow] | None = None,
    ) -> None:
        keys, args = batch_command(
            self.prefix, "apply", self.epoch, seq, time_ms, self.settled_seq,
            self.stale_after_ms, rows, lower, channels,
        )
        started = time.monotonic()
        await self._call(pack(("EVALSHA", self._batch_sha, len(keys), *keys, *args)))
        self._written_at = time.monotonic()
        self.stats.batches += 1
        if self.observer is not None:
            self.observer.mirror_write(self._written_at - started)

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
                if not done and (now >= heard + self.silence_seconds or now >= give_up):
                    # Before calling it silence: an answer may already wait in our socket while
                    # our own loop was busy. Let the loop poll and run what is ready.
                    for _ in range(3):
                        await asyncio.sleep(0)
                if reply.done():
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
        self._sent.clear()
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
        self._sent.clear()  # Redis may hold less than we sent (it lost data, or a write failed)
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
        if seq >= self._rewrite_seq and self._retained_after(seq) and self.fields.keeps(
            table.position_after(seq)
        ):
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
        _, pending = read_entries(table, position, seq, batch_max)
        skipped = {change[1] for change in pending}
        time_ms = time.time_ns() // 1_000_000
        rows = [(*row, table.unsellable(table.lookup(row[0])))
                for row in table.items() if row[0] not in skipped]
        # A SKU without changes not durable yet is in its durable state, channel fields too
        # (every change to a SKU's buckets or policies is a ring entry of that SKU).
        mirror_fields = self.ledger.channels.mirror_fields
        for start in range(0, len(rows), batch_max):
            chunk = rows[start:start + batch_max]
            channels = {row[0]: (durable, 1, mirror_fields(row[0])) for row in chunk}
            keys, args = batch_command(
                prefix, "rewrite", epoch, durable, 0, 0, self.stale_after_ms,
                ((durable, *row) for row in chunk), (), channels,
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
