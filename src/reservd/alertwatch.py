"""WatchAlerts streams, and the runtime alerts of failing closed.

A watcher holds no copies: it keeps its position among the feed's retained alerts
(reservd.alerts) and reads on from there, at most ``alerts_batch_max`` alerts per step, each
step sent before the next is read. A watcher whose client stops reading costs nothing until it
reads again; if the retained alerts moved past its position meanwhile (more than
``alerts_retained_max`` alerts were published), it is *lapped*: it goes on from the oldest
retained alert, which it gets with ``lapped`` set. A resume point whose later alerts were
partly dropped is told the same way.

Failing closed starts when the guard stops grants (the WAL failed, the Redis mirror is
unreachable or lagging) and ends when it allows them again: a runtime alert ``fail_closed``
of level 3 with the reason, then one of level 0 with how long it lasted.
"""
from __future__ import annotations

import asyncio
import itertools
from typing import AsyncIterator

from reservd.alerts import AlertFeed
from reservd.config import Config
from reservd.v1 import reservd_pb2 as pb

FAIL_CLOSED = "fail_closed"


class TooManyAlertWatchers(Exception):
    """``alert_watchers_max`` streams are open already."""


class AlertWatcher:
    __slots__ = ("position", "lapped", "_ready")

    def __init__(self, position: int, lapped: bool) -> None:
        self.position = position  # the next alert it gets
        self.lapped = lapped  # its next alert follows alerts it will never get
        self._ready: asyncio.Future | None = None

    def _wake(self) -> None:
        ready = self._ready
        if ready is not None and not ready.done():
            ready.set_result(None)


class AlertHub:
    """Every WatchAlerts stream: ``open``, iterate ``alerts_of``, ``release``; the WAL calls
    ``on_durable``, the guard ``_serving_changed``."""

    def __init__(self, feed: AlertFeed, config: Config, guard, clock) -> None:
        self.feed = feed
        self.guard = guard
        self.clock = clock
        self.watchers_max = config.alert_watchers_max
        self.batch_max = config.alerts_batch_max
        self.closed = False
        self._watchers: set[AlertWatcher] = set()
        self._closed_at_ms: int | None = None
        # Counters read by the metrics (reservd_alert_*).
        self.lapped = 0
        self.sent = 0
        feed.on_published = self._wake_all
        guard.add_listener(self._serving_changed)

    def __len__(self) -> int:
        return len(self._watchers)

    def on_durable(self, seq: int) -> None:
        self.feed.publish(seq)

    def _wake_all(self) -> None:
        for watcher in self._watchers:
            watcher._wake()

    def _serving_changed(self, serving: bool) -> None:
        now_ms = self.clock.now_ms()
        if not serving:
            self._closed_at_ms = now_ms
            self.feed.raise_runtime(FAIL_CLOSED, 3, {
                "reason": self.guard.grant_reason or "",
                "writes_closed": int(self.guard.write_reason is not None),
            })
        else:
            since = self._closed_at_ms if self._closed_at_ms is not None else now_ms
            self._closed_at_ms = None
            self.feed.raise_runtime(FAIL_CLOSED, 0, {"closed_ms": max(0, now_ms - since)})

    def close(self) -> None:
        """The daemon stops: every stream ends."""
        self.closed = True
        self._wake_all()

    def open(self, from_sequence: int) -> AlertWatcher:
        if len(self._watchers) >= self.watchers_max:
            raise TooManyAlertWatchers(
                f"{len(self._watchers)} WatchAlerts streams are open, the bound "
                f"alert_watchers_max is {self.watchers_max}"
            )
        watcher = AlertWatcher(*self.feed.resume_point(from_sequence))
        if watcher.lapped:
            self.lapped += 1
        self._watchers.add(watcher)
        return watcher

    def release(self, watcher: AlertWatcher) -> None:
        self._watchers.discard(watcher)

    async def alerts_of(self, watcher: AlertWatcher) -> AsyncIterator[list[pb.Alert]]:
        """Batches of at most ``alerts_batch_max`` alerts, in the order published, until the
        hub closes; each batch is the caller's to send before asking again."""
        feed = self.feed
        while not self.closed:
            first = feed.first_position
            if watcher.position < first:
                watcher.position = first
                watcher.lapped = True
                self.lapped += 1
            if watcher.position < feed.next_position:
                start = watcher.position - first
                batch = [
                    built for _, built in itertools.islice(
                        feed.retained, start, start + self.batch_max
                    )
                ]
                watcher.position += len(batch)
                if watcher.lapped:
                    watcher.lapped = False
                    marked = pb.Alert()
                    marked.CopyFrom(batch[0])
                    marked.lapped = True
                    batch[0] = marked
                self.sent += len(batch)
                yield batch
                continue
            watcher._ready = asyncio.get_running_loop().create_future()
            try:
                await watcher._ready
            finally:
                watcher._ready = None
