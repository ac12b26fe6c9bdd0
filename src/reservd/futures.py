"""A future shared by many waiters (a WAL batch, a mirror batch, the watchers' wake-up)."""
from __future__ import annotations

import asyncio


class SharedFuture(asyncio.Future):
    """``cancel()`` is refused: cancelling a task that awaits a future cancels that future, and
    one waiter whose RPC went away must not cancel the wait of every other waiter. The
    cancelled task is interrupted as soon as the future settles."""

    def cancel(self, msg=None) -> bool:
        return False
