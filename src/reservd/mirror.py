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
or a change waits that long to be mirrored (reservd.mirrorheal). A grant waits for the
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
from typing import Container

from reservd.config import Config
from reservd.futures import SharedFuture
from reservd.guard import Guard
from reservd.mirrorfields import FieldJournal, FieldsDropped
from reservd.mirrorheal import (  # noqa: F401  (MirrorSlow, MirrorUnavailable, SOURCE: API)
    SOURCE, Healing, MirrorSlow, MirrorUnavailable, _Rebuild, _describe, _settle,
)
from reservd.mirrorshown import ShownFields
from reservd.mirrorwrite import ChannelRow, batch_command, pack, plan
from reservd.table import Change, CounterTable

log = logging.getLogger("reservd.mirror")

# redis-py is imported by RedisMirror only: without --redis-url reservd never loads it.


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


class RedisMirror(Healing):
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
        # What each hash's channel fields are, so a write sends only what changed.
        self.shown = ShownFields(config.mirror_shown_skus_max)  # reservd_mirror_shown_skus
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
        self, rows: list[Change], seq: int, time_ms: int, lower: Container[str] = (),
        channels: dict[str, ChannelRow] | None = None,
    ) -> None:
        deltas = self.shown.deltas(rows, lower, channels) if channels else {}
        keys, args = batch_command(
            self.prefix, "apply", self.epoch, seq, time_ms, self.settled_seq,
            self.stale_after_ms, rows, lower, channels, self.ledger.state_history.text_at,
            deltas,
        )
        started = time.monotonic()
        _, codes = await self._call(pack(("EVALSHA", self._batch_sha, len(keys), *keys, *args)))
        self._written_at = time.monotonic()
        self.stats.batches += 1
        if self.observer is not None:
            self.observer.mirror_write(self._written_at - started)
        if channels:
            self.shown.note(rows, codes, lower, channels, deltas)

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
