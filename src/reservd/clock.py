"""Wall-clock time in milliseconds, injectable so expiry is testable without sleeping."""
from __future__ import annotations

import time


class SystemClock:
    """The real clock: Unix time in milliseconds."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class ManualClock:
    """A clock that moves only when told to (tests)."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._now_ms = start_ms

    def now_ms(self) -> int:
        return self._now_ms

    def advance(self, milliseconds: int) -> None:
        assert milliseconds >= 0, "a clock does not go back"
        self._now_ms += milliseconds
