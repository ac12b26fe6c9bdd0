"""The log of memory-only mode (``--in-memory``): nothing is written, everything is at once
"durable". It exists for benchmarks and tests that measure the core without the disk."""
from __future__ import annotations

import asyncio
from typing import Callable

from reservd.durable import DurableListeners


class MemoryLog:
    """Same surface as the WAL: append, commit, durable_seq and durable listeners."""

    failed: BaseException | None = None
    backlogged = False

    def __init__(self) -> None:
        self.last_seq = 0
        self.durable_seq = 0
        self.durable_listeners = DurableListeners()
        self._notify_scheduled = False

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
        self.durable_listeners.add(callback)

    def add_failure_listener(self, callback) -> None:
        """Memory never fails: nothing to report."""

    def _notify(self) -> None:
        self._notify_scheduled = False
        self.durable_listeners.notify(self.durable_seq)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def abandon(self) -> None:
        return None
