"""The log of memory-only mode (``--in-memory``): nothing is written, everything is at once
"durable". It exists for benchmarks and tests that measure the core without the disk."""
from __future__ import annotations

import asyncio
from typing import Callable


class MemoryLog:
    """Same surface as the WAL: append, commit, durable_seq and durable listeners."""

    failed: BaseException | None = None
    backlogged = False

    def __init__(self) -> None:
        self.last_seq = 0
        self.durable_seq = 0
        self._listeners: list[Callable[[int], None]] = []
        self._notify_scheduled = False
        # Told (error, where) when a durable listener raises (a bug), as the WAL does.
        self.on_listener_error: Callable[[BaseException, str], None] | None = None

    def append(self, seq: int, type: int, payload: bytes) -> None:
        assert seq == self.last_seq + 1, f"append of seq {seq} after {self.last_seq}"
        self.last_seq = seq

    def commit(self) -> asyncio.Future:
        self.durable_seq = self.last_seq
        if not self._notify_scheduled:
            # One notification per loop turn, like a WAL batch.
            self._notify_scheduled = True
            asyncio.get_running_loop().call_soon(self._notify)
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    def add_durable_listener(self, callback: Callable[[int], None]) -> None:
        self._listeners.append(callback)

    def add_failure_listener(self, callback) -> None:
        """Memory never fails: nothing to report."""

    def _notify(self) -> None:
        self._notify_scheduled = False
        for callback in self._listeners:
            try:
                callback(self.durable_seq)
            except Exception as error:
                if self.on_listener_error is None:
                    raise
                self.on_listener_error(error, f"durable listener {callback.__qualname__}")

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def abandon(self) -> None:
        return None
