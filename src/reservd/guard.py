"""The fail-closed guard: the one place that says whether reservd may grant or write now.

Sources report trouble here (the WAL after a failed write or fsync, the Redis mirror when it is
unreachable or lagging). While any source is tripped, Reserve answers UNAVAILABLE with the
reason, and the health service reports the Reservations service NOT_SERVING. A WAL failure also
stops every other mutation: nothing can be acknowledged without a durable log.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

log = logging.getLogger("reservd.guard")


class Guard:
    def __init__(self) -> None:
        # source -> (message, since unix seconds, blocks every write, not just grants)
        self._trips: dict[str, tuple[str, float, bool]] = {}
        self._listeners: list[Callable[[bool], None]] = []
        self.grant_reason: str | None = None
        self.write_reason: str | None = None

    def add_listener(self, callback: Callable[[bool], None]) -> None:
        """``callback(serving)`` on every change of whether grants are allowed."""
        self._listeners.append(callback)

    def trip(self, source: str, message: str, *, blocks_writes: bool = False) -> None:
        if source in self._trips and self._trips[source][0] == message:
            return
        tripped = self._trips.get(source)
        since = tripped[1] if tripped is not None else time.time()
        self._trips[source] = (message, since, blocks_writes)
        # One line when a source closes; a new reason while it stays closed (a retry that
        # timed out after one that was refused) is not news to the operator.
        level = logging.ERROR if tripped is None else logging.DEBUG
        log.log(
            level, "failing closed", extra={"source": source, "why": message, "since": since}
        )
        self._update()

    def clear(self, source: str) -> None:
        trip = self._trips.pop(source, None)
        if trip is not None:
            log.warning(
                "reopened", extra={"source": source, "closed_seconds": time.time() - trip[1]}
            )
            self._update()

    @property
    def closed_since(self) -> float | None:
        """Unix time of the oldest trip still in force (None while open)."""
        return min((since for _, since, _ in self._trips.values()), default=None)

    def since(self, source: str) -> float | None:
        trip = self._trips.get(source)
        return trip[1] if trip else None

    def _update(self) -> None:
        was_serving = self.grant_reason is None
        grant = [f"{source}: {message}" for source, (message, _, _) in self._trips.items()]
        write = [
            f"{source}: {message}"
            for source, (message, _, blocks) in self._trips.items()
            if blocks
        ]
        self.grant_reason = "; ".join(grant) or None
        self.write_reason = "; ".join(write) or None
        serving = self.grant_reason is None
        if serving != was_serving:
            for callback in self._listeners:
                callback(serving)
