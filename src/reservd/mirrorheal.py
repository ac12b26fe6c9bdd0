"""The Redis mirror's side that fails closed and heals (reservd.mirror has the rest).

A slow Redis is not a partition: :meth:`Healing._call` waits for a write's reply past
``mirror_timeout_ms`` while Redis answers pings, and gives up (fails closed) only on silence
for ``mirror_silence_ms_max``, a reply later than ``mirror_lag_ms_max``, or a refused or reset
connection. :meth:`Healing._watch_lag` fails closed when an applied change waits longer than
``mirror_lag_ms_max`` to be mirrored. Failing closed trips the guard and rejects every waiter
(:meth:`Healing._fail`); the mirror task then reconnects with capped backoff and
resynchronises (:meth:`Healing._resync`): it replays the change ring from a position Redis is
known to hold, or rewrites every key in a new epoch (:meth:`Healing._rewrite`).

:class:`Healing` is a part of :class:`reservd.mirror.RedisMirror`, and uses its state.
"""
from __future__ import annotations

import asyncio
import logging
import time

from reservd.mirrorwrite import BATCH_SCRIPT, EPOCH_SCRIPT, batch_command, read_entries

log = logging.getLogger("reservd.mirror")

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


class Healing:
    """Connecting, the bounded wait for a reply, failing closed, resynchronising (a part of
    reservd.mirror.RedisMirror)."""

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
        self.shown.forget()
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
        # Redis may hold less than we sent (it lost data, or a write failed)
        self._sent.clear()
        self.shown.forget()
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
                ((durable, *row) for row in chunk), (), channels, self.ledger.state_history.text_at,
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
