"""What the three stream hubs (WatchStock, WatchAts, WatchAlerts) share: the bound on the streams
open at once, and a stream's wait for its hub to wake it."""
from __future__ import annotations

import asyncio


class TooManyStreams(Exception):
    """The hub's bound on open streams is reached (answered RESOURCE_EXHAUSTED)."""


def admit(open_now: int, bound: int, what: str, bound_name: str, refusal: type) -> None:
    """Raise ``refusal`` (a TooManyStreams) when ``open_now`` streams of ``what`` (the RPC)
    are already open and ``bound`` (the setting ``bound_name``) allows no more."""
    if open_now >= bound:
        raise refusal(
            f"{open_now} {what} streams are open, the bound {bound_name} is {bound}"
        )


class Sleeper:
    """One stream of a hub: ``sleep`` until the hub calls ``_wake`` (new data, or it closed)."""

    __slots__ = ("_ready",)

    def __init__(self) -> None:
        self._ready: asyncio.Future | None = None

    def _wake(self) -> None:
        ready = self._ready
        if ready is not None and not ready.done():
            ready.set_result(None)

    async def sleep(self) -> None:
        self._ready = asyncio.get_running_loop().create_future()
        try:
            await self._ready
        finally:
            self._ready = None
