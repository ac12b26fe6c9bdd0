"""Who is told that a batch became durable (the WatchStock, WatchAts and alert hubs, the
mirror), for both logs (reservd.wal.log, reservd.memlog).

A listener that raises is a bug: the streams (or the mirror) behind it can no longer be trusted,
so it is never logged and passed over. ``on_error`` decides (reservd.server stops the daemon);
without it the error propagates.
"""
from __future__ import annotations

from typing import Callable


class DurableListeners:
    """``add`` a listener; ``notify(durable_seq)`` calls each in order."""

    def __init__(self) -> None:
        self._listeners: list[Callable[[int], None]] = []
        # Told (error, where) when a listener raises.
        self.on_error: Callable[[BaseException, str], None] | None = None

    def add(self, callback: Callable[[int], None]) -> None:
        self._listeners.append(callback)

    def notify(self, durable_seq: int) -> None:
        for callback in self._listeners:
            try:
                callback(durable_seq)
            except Exception as error:
                if self.on_error is None:
                    raise
                self.on_error(error, f"durable listener {callback.__qualname__}")
