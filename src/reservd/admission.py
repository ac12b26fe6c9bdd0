"""Overload is an explicit answer, never CANCELLED to a bystander.

Why bystanders used to see CANCELLED: the grpc.aio server takes calls from gRPC core one at a
time, as fast as its event loop runs; a burst (2,000 fresh connections, or 5,000 streams opened
with headers and no data) waits in core's *pending-request queue* meanwhile. Past
``grpc.server.max_pending_requests`` (1,000 by default) core drops calls at random until
``..._hard_limit`` (3,000), and the client of a dropped call sees a bare CANCELLED: in a burst
~5 % of fresh connections, and other clients' Reserves on healthy connections too. A bare grpc.aio
server shows the same; with both limits raised (and equal, so nothing is random) no call is lost.

So the transport's queues are bounded high and deterministically (:func:`server_options`), and
the limits that protect the daemon are here, where the answer can be specific:

- calls in flight (unary) beyond ``rpcs_concurrent_max``: RESOURCE_EXHAUSTED;
- open streams (WatchStock) per identity beyond ``watchers_per_identity_max``: RESOURCE_EXHAUSTED;
- with ``rate_per_identity_per_second`` > 0, a token bucket per identity
  (``rate_burst_requests`` deep): RESOURCE_EXHAUSTED;
- streams per HTTP/2 connection beyond ``streams_per_connection_max``: the transport refuses the
  stream (REFUSED_STREAM, which clients retry, or UNAVAILABLE).

Every refusal carries a retry hint: ``grpc-retry-pushback-ms`` trailing metadata (which gRPC's
retry policy honours) and "retry in N ms" in the message. The identity is the caller's
authenticated identity, or the peer's address when authorization is off.
"""
from __future__ import annotations

import time

import grpc

from reservd import auth

_RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def server_options(config) -> list[tuple[str, int]]:
    """grpc.aio.server options for the Config's transport bounds."""
    return [
        ("grpc.max_concurrent_streams", config.streams_per_connection_max),
        # Equal soft and hard limits: core never drops a call at random below the bound.
        ("grpc.server.max_pending_requests", config.rpcs_pending_max),
        ("grpc.server.max_pending_requests_hard_limit", config.rpcs_pending_max),
    ]


def _peer_host(context) -> str:
    peer = context.peer() or ""
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


class Admission:
    """Counts calls in flight and streams per identity; rate-limits per identity."""

    # Buckets kept at most (by identity or peer address); full ones are dropped beyond it.
    buckets_max = 10_000

    def __init__(self, config) -> None:
        self.rpcs_max = config.rpcs_concurrent_max
        self.watchers_max = config.watchers_per_identity_max
        self.rate = config.rate_per_identity_per_second
        self.burst = float(config.rate_burst_requests)
        self.retry_ms = config.overload_retry_ms
        self.rpcs = 0
        self.watchers: dict[str, int] = {}
        self.refused = 0
        self._buckets: dict[str, list[float]] = {}

    async def _refuse(self, context, why: str, retry_ms: int) -> None:
        self.refused += 1
        context.set_trailing_metadata((("grpc-retry-pushback-ms", str(retry_ms)),))
        await context.abort(_RESOURCE_EXHAUSTED, f"{why}; retry in {retry_ms} ms")

    def _take(self, key: str) -> int:
        """0 when the bucket had a token (taken), else the milliseconds until it has one."""
        now = time.monotonic()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.buckets_max:
                self._evict(now)
            bucket = self._buckets[key] = [self.burst, now]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0
        bucket[0] = tokens
        return max(1, int((1.0 - tokens) / self.rate * 1000))

    def _evict(self, now: float) -> None:
        full = [
            key for key, (tokens, at) in self._buckets.items()
            if tokens + (now - at) * self.rate >= self.burst
        ]
        for key in full:
            del self._buckets[key]

    async def enter(self, context, streaming: bool) -> str | None:
        """Admit the call or abort it with RESOURCE_EXHAUSTED; returns the key to ``leave``
        with (None for a unary call)."""
        key = None
        if self.rate > 0 or streaming:
            key = auth.caller.get() or _peer_host(context)
        if self.rate > 0:
            wait_ms = self._take(key)
            if wait_ms:
                await self._refuse(
                    context, f"{key!r} is over its rate of {self.rate:g} calls per second",
                    wait_ms,
                )
        if streaming:
            open_ = self.watchers.get(key, 0)
            if open_ >= self.watchers_max:
                await self._refuse(
                    context, f"{key!r} has {open_} streams open (watchers_per_identity_max)",
                    self.retry_ms,
                )
            self.watchers[key] = open_ + 1
            return key
        if self.rpcs >= self.rpcs_max:
            await self._refuse(
                context, f"reservd is handling {self.rpcs} calls (rpcs_concurrent_max)",
                self.retry_ms,
            )
        self.rpcs += 1
        return None

    def leave(self, key: str | None) -> None:
        if key is None:
            self.rpcs -= 1
            return
        left = self.watchers[key] - 1
        if left:
            self.watchers[key] = left
        else:
            del self.watchers[key]
