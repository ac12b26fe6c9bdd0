"""Prometheus metrics (prometheus_client): the same words as the API.

Hot-path counters are bound to their labels once, here, so a Reserve costs one ``inc()``.
Gauges that mirror state (sequence, WAL batching, fail-closed) are read at scrape time.
"""
from __future__ import annotations

import urllib.request

import grpc
from prometheus_client import (
    CollectorRegistry, Counter, GCCollector, Histogram, PlatformCollector,
    ProcessCollector, start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


# Seconds: from 100 µs (an in-memory call) to 10 s (a deadline); fsyncs start lower.
_RPC_SECONDS_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)
_FSYNC_SECONDS_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)
_BATCH_RECORDS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)
_GRPC_TYPES = {
    (False, False): "unary", (False, True): "server_stream",
    (True, False): "client_stream", (True, True): "bidi_stream",
}


class RpcMetrics:
    """One method's grpc-prometheus series, labels bound once: ``observe`` costs a dict
    lookup, an ``inc()`` and an ``observe()``."""

    __slots__ = ("_by_code", "_seconds")

    def __init__(self, handled: Counter, seconds: Histogram, labels: tuple[str, ...]) -> None:
        self._by_code = {
            code: handled.labels(*labels, code.name) for code in grpc.StatusCode
        }
        self._seconds = seconds.labels(*labels)

    def observe(self, code: grpc.StatusCode, seconds: float) -> None:
        self._by_code[code].inc()
        self._seconds.observe(seconds)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        labels = ("grpc_type", "grpc_service", "grpc_method")
        self._handled = Counter(
            "grpc_server_handled", "RPCs completed on the server, by status code",
            [*labels, "grpc_code"], registry=self.registry,
        )
        self._handling_seconds = Histogram(
            "grpc_server_handling_seconds", "Time from the call to its status, seconds",
            labels, buckets=_RPC_SECONDS_BUCKETS, registry=self.registry,
        )
        self.fsync_seconds = Histogram(
            "reservd_wal_fsync_seconds", "One fdatasync of the WAL tail, seconds",
            buckets=_FSYNC_SECONDS_BUCKETS, registry=self.registry,
        )
        self.batch_records = Histogram(
            "reservd_wal_batch_records", "Records made durable by one write and fdatasync",
            buckets=_BATCH_RECORDS_BUCKETS, registry=self.registry,
        )
        self.mirror_write_seconds = Histogram(
            "reservd_mirror_write_seconds", "One Redis mirror batch write (a Lua call), seconds",
            buckets=_RPC_SECONDS_BUCKETS, registry=self.registry,
        )
        # The observer methods below are called by the WAL's flusher thread and the mirror.
        self.fsync = self.fsync_seconds.observe
        self.batch = self.batch_records.observe
        self.mirror_write = self.mirror_write_seconds.observe
        reserve = Counter(
            "reservd_reserve", "Reserve calls by outcome", ["outcome"], registry=self.registry
        )
        self.reserve_granted = reserve.labels("granted")
        self.reserve_sold_out = reserve.labels("sold_out")
        self.reserve_rejected = reserve.labels("rejected")
        self.reserve_unavailable = reserve.labels("unavailable")
        self.batches = Counter(
            "reservd_batches", "Batch requests (unary or one message of a stream)",
            registry=self.registry,
        )
        self.batch_ops = Counter(
            "reservd_batch_ops", "Ops received in batches", registry=self.registry
        )
        self.expired = Counter(
            "reservd_expired_reservations", "Holds released by expiry", registry=self.registry
        )
        self._sources: list = []
        self._hub = None
        self._ats_hub = None
        self._alert_hub = None
        self._admission = None
        self.registry.register(self)

    def rpc(
        self, service: str, method: str, client_streaming: bool, server_streaming: bool
    ) -> RpcMetrics:
        """The series of one method (``service`` is the full name, e.g. reservd.v1.Admin)."""
        kind = _GRPC_TYPES[(client_streaming, server_streaming)]
        return RpcMetrics(self._handled, self._handling_seconds, (kind, service, method))

    def watch(
        self, ledger, log_, guard, mirror=None, supervisor=None, hub=None, ats_hub=None,
        alert_hub=None,
    ) -> None:
        """Report these objects' state at each scrape."""
        self._sources = [ledger, log_, guard, mirror, supervisor]
        self._hub = hub
        self._ats_hub = ats_hub
        self._alert_hub = alert_hub

    def watch_admission(self, admission) -> None:
        """Report calls in flight, open streams and overload refusals at each scrape."""
        self._admission = admission

    def collect(self):
        admission = self._admission
        if admission is not None:
            yield GaugeMetricFamily(
                "reservd_rpcs_in_flight", "Unary calls being handled", value=admission.rpcs
            )
            yield GaugeMetricFamily(
                "reservd_streams_open", "WatchStock streams open",
                value=sum(admission.watchers.values()),
            )
            yield CounterMetricFamily(
                "reservd_overload_refusals",
                "Calls refused RESOURCE_EXHAUSTED: in flight, streams or rate beyond their bound",
                value=admission.refused,
            )
        if not self._sources:
            return
        ledger, log_, guard, mirror, supervisor = self._sources
        yield GaugeMetricFamily("reservd_sequence", "Last applied sequence", value=ledger.seq)
        yield GaugeMetricFamily(
            "reservd_durable_sequence", "Last durable sequence", value=log_.durable_seq
        )
        yield GaugeMetricFamily(
            "reservd_live_reservations", "Held or committed reservations", value=ledger.live
        )
        yield GaugeMetricFamily(
            "reservd_skus", "SKUs in the counter table", value=len(ledger.table)
        )
        yield GaugeMetricFamily(
            "reservd_skus_max", "Bound on reservd_skus (a new SKU is refused at it)",
            value=ledger.config.skus_max,
        )
        yield GaugeMetricFamily(
            "reservd_idempotency_window_seconds",
            "How long a finished reservation or adjustment id is remembered (never cut short)",
            value=ledger.config.retention_seconds,
        )
        yield GaugeMetricFamily(
            "reservd_idempotency_oldest_seconds",
            "Age of the oldest idempotency record kept", value=ledger.retained_oldest_seconds(),
        )
        yield GaugeMetricFamily(
            "reservd_retained_reservations", "Finished reservations kept for idempotency",
            value=ledger.retained - ledger.retained_adjustments,
        )
        yield GaugeMetricFamily(
            "reservd_retained_adjustments", "Stock adjustments kept for idempotency",
            value=ledger.retained_adjustments,
        )
        yield GaugeMetricFamily(
            "reservd_state_history_entries",
            "Stock-state breakdowns kept for the change ring's readers (at most one per SKU "
            "that changed state, plus one per state command the ring holds)",
            value=ledger.state_history.entries,
        )
        yield GaugeMetricFamily(
            "reservd_retained_max", "Bound on retained records (new work refused at it)",
            value=ledger.config.retained_max,
        )
        yield from _stock_table_metrics(ledger)
        yield GaugeMetricFamily(
            "reservd_held_reservations", "Held (uncommitted) reservations", value=ledger.held
        )
        yield GaugeMetricFamily(
            "reservd_expiry_entries",
            "Entries in the expiry buckets, stale ones included (at most 2 x held + 64)",
            value=ledger.deadline_entries,
        )
        yield GaugeMetricFamily(
            "reservd_fail_closed", "1 while reservations are refused",
            value=0 if guard.grant_reason is None else 1,
        )
        yield GaugeMetricFamily(
            "reservd_fail_closed_since_timestamp_seconds",
            "Unix time since when reservations are refused (0 while open)",
            value=guard.closed_since or 0,
        )
        if supervisor is not None:
            yield GaugeMetricFamily(
                "reservd_background_tasks", "Supervised background tasks running",
                value=supervisor.tasks,
            )
        if mirror is not None:
            stats = mirror.stats
            yield GaugeMetricFamily(
                "reservd_mirror_sequence",
                "Redis holds every grant (change lowering available) up to this sequence",
                value=mirror.mirrored_seq,
            )
            yield GaugeMetricFamily(
                "reservd_mirror_settled_sequence",
                "Redis holds every change up to this (durable) sequence",
                value=mirror.settled_seq,
            )
            yield CounterMetricFamily(
                "reservd_mirror_slow_writes",
                "Mirror writes answered after mirror_timeout_ms (Redis slow, not down)",
                value=stats.slow_writes,
            )
            yield CounterMetricFamily(
                "reservd_mirror_grant_waits_exceeded",
                "Grants answered UNAVAILABLE after mirror_grant_wait_ms_max",
                value=stats.grant_waits_exceeded,
            )
            yield CounterMetricFamily(
                "reservd_mirror_batches", "Mirror writes (one Lua call each)", value=stats.batches
            )
            yield GaugeMetricFamily(
                "reservd_mirror_channel_fields",
                "Change ring entries whose channel fields the mirror keeps until they are "
                "settled in Redis (at most watch_ring_capacity)",
                value=len(mirror.fields),
            )
            yield GaugeMetricFamily(
                "reservd_mirror_pending_rows",
                "Rows of SKUs with changes not durable yet that the mirror remembers sending, "
                "so as not to send them again unchanged (at most watch_ring_capacity)",
                value=mirror.pending_rows,
            )
            yield GaugeMetricFamily(
                "reservd_mirror_shown_skus",
                "SKUs whose channel fields in Redis the mirror knows exactly, so that it sends "
                "only what changed (at most mirror_shown_skus_max)",
                value=len(mirror.shown),
            )
            yield CounterMetricFamily(
                "reservd_mirror_rows_delta",
                "Rows whose channel fields were sent as a delta over what Redis holds",
                value=mirror.shown.deltas_sent,
            )
            yield CounterMetricFamily(
                "reservd_mirror_rows_unchanged",
                "Rows not sent again: the previous write sent them as they are",
                value=stats.rows_unchanged,
            )
            yield CounterMetricFamily(
                "reservd_mirror_failures", "Mirror writes that failed", value=stats.failures
            )
            if stats.reopen_seconds_last is not None:
                yield GaugeMetricFamily(
                    "reservd_mirror_reopen_seconds_last",
                    "Closed to reopened, the latest time", value=stats.reopen_seconds_last,
                )
        hub = self._hub
        if hub is not None:
            yield GaugeMetricFamily("reservd_watchers", "Open WatchStock streams", value=len(hub))
            yield GaugeMetricFamily(
                "reservd_watchers_detached",
                "Watchers off the fan-out: stalled (client not reading), catching up or in a "
                "snapshot",
                value=hub.detached,
            )
            yield GaugeMetricFamily(
                "reservd_watch_buffered_updates", "Updates waiting in the watchers' buffers",
                value=hub.buffered,
            )
            yield CounterMetricFamily(
                "reservd_watch_table_snapshots",
                "Passes over the whole table for all-SKU watchers' snapshots (shared by them)",
                value=hub.table_snapshots,
            )
            yield CounterMetricFamily(
                "reservd_watch_lapped",
                "Watchers the change ring lapped (sent a snapshot instead)", value=hub.lapped,
            )
            yield CounterMetricFamily(
                "reservd_watch_updates", "StockUpdates handed to watchers", value=hub.updates
            )
            yield CounterMetricFamily(
                "reservd_watch_fanout_seconds",
                "CPU time of the event loop spent handing durable changes to the attached watchers",
                value=hub.fanout_seconds,
            )
        yield from _channel_metrics(ledger.channels, self._ats_hub)
        yield from _rule_metrics(ledger)
        yield from _alert_metrics(ledger.alerts, self._alert_hub)
        stats = getattr(log_, "stats", None)
        if stats is not None:
            yield CounterMetricFamily(
                "reservd_wal_fsyncs", "WAL fdatasync calls", value=stats.fsyncs
            )
            yield CounterMetricFamily(
                "reservd_wal_records", "WAL records written", value=stats.records
            )

    def serve(self, port: int, address: str = "127.0.0.1") -> int:
        """Serve /metrics on ``address:port`` (port 0: any); returns the bound port."""
        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        return server.server_port


def _stock_table_metrics(ledger):
    """The stock-state tables beside their bounds, and the age of the inspection backlog."""
    config = ledger.config
    for name, kept, bound, what in (
        ("returns", len(ledger.states.returns), config.returns_max,
         "Returns kept (in quarantine, or inspected within retention_seconds)"),
        ("write_offs", len(ledger.states.write_offs), config.write_offs_max,
         "Write-offs kept for their idempotency window"),
        ("purchase_orders", len(ledger.incoming.orders), config.purchase_orders_max,
         "Purchase orders kept (open, or received within retention_seconds)"),
        ("receipts", len(ledger.incoming.receipts), config.receipts_max,
         "Receipts kept for their idempotency window"),
    ):
        yield GaugeMetricFamily(f"reservd_{name}", what, value=kept)
        yield GaugeMetricFamily(
            f"reservd_{name}_max", f"Bound on reservd_{name} (RESOURCE_EXHAUSTED at it)",
            value=bound,
        )
    planning = ledger.planning
    yield GaugeMetricFamily(
        "reservd_planned_skus", "SKUs with demand history, replenishment settings or a count",
        value=len(planning.plans),
    )
    yield GaugeMetricFamily(
        "reservd_planned_skus_max", "Bound on reservd_planned_skus (replenish_skus_max)",
        value=config.replenish_skus_max,
    )
    yield CounterMetricFamily(
        "reservd_planning_untracked",
        "Commits and recounts of SKUs beyond replenish_skus_max, not kept as demand or counts",
        value=planning.untracked,
    )
    yield GaugeMetricFamily(
        "reservd_ghost_stock_ratio",
        "(system - counted) / system over every SKU's last recount (target < 0.02)",
        value=planning.ghost_overall(),
    )
    oldest_ms = ledger.states.oldest_quarantine_ms()
    yield GaugeMetricFamily(
        "reservd_quarantine_oldest_seconds",
        "Age of the oldest return awaiting inspection (0 when none)",
        value=0 if oldest_ms is None else max(0, ledger.clock.now_ms() - oldest_ms) / 1000,
    )


def _channel_metrics(channels, ats_hub):
    yield GaugeMetricFamily(
        "reservd_channels", "Channels with a policy (bound: channels_max)",
        value=len(channels.policies),
    )
    yield GaugeMetricFamily(
        "reservd_bucket_skus", "SKUs with named buckets besides shared",
        value=len(channels.buckets),
    )
    yield GaugeMetricFamily(
        "reservd_buckets", "Named buckets over every SKU (bound: buckets_per_sku_max each)",
        value=sum(len(named) for named in channels.buckets.values()),
    )
    if ats_hub is None:
        return
    yield GaugeMetricFamily(
        "reservd_ats_watchers", "Open WatchAts streams (bound: ats_watchers_max)",
        value=len(ats_hub),
    )
    yield GaugeMetricFamily(
        "reservd_ats_tracked_pairs",
        "(sku, channel) pairs kept up to date for WatchAts (bound: ats_tracked_pairs_max)",
        value=ats_hub.tracked,
    )
    yield GaugeMetricFamily(
        "reservd_ats_buffered_updates",
        "Ats values waiting in the WatchAts buffers (bound: ats_buffer_updates_max each)",
        value=ats_hub.buffered,
    )
    yield CounterMetricFamily(
        "reservd_ats_updates", "Ats values handed to WatchAts streams", value=ats_hub.updates
    )
    yield CounterMetricFamily(
        "reservd_ats_snapshots",
        "WatchAts streams sent every value afresh (new, not resumable, or over their buffer)",
        value=ats_hub.snapshots,
    )


def _rule_metrics(ledger):
    velocity, rules = ledger.velocity, ledger.rules
    if velocity is not None:
        yield GaugeMetricFamily(
            "reservd_velocity_tracked_pairs",
            "(sku, channel) pairs with velocity buckets (bound: velocity_tracked_pairs_max)",
            value=len(velocity),
        )
        yield CounterMetricFamily(
            "reservd_velocity_untracked_samples",
            "Reserve lines not tracked: velocity_tracked_pairs_max busy pairs",
            value=velocity.untracked,
        )
    yield GaugeMetricFamily(
        "reservd_rules_in_force", "Velocity and promotion rules in force (bound: rules_active_max)",
        value=len(rules.active),
    )
    yield CounterMetricFamily("reservd_rules_fired", "Rule firings logged", value=rules.fired)
    yield CounterMetricFamily("reservd_rules_ended", "Rule reversals logged", value=rules.ended)
    yield CounterMetricFamily(
        "reservd_rules_refused", "Rule firings not logged: rules_active_max in force",
        value=ledger.rules_refused,
    )
    yield GaugeMetricFamily(
        "reservd_promotions", "Promotions on the calendar (bound: promotions_max)",
        value=len(ledger.promotions),
    )


def _alert_metrics(feed, alert_hub):
    alerts = CounterMetricFamily(
        "reservd_alerts", "Alerts published (not those replayed at start-up), by kind and level",
        labels=("kind", "level"),
    )
    for (kind, level), count in sorted(feed.counts.items()):
        alerts.add_metric((kind, str(level)), count)
    yield alerts
    yield GaugeMetricFamily(
        "reservd_alerts_retained", "Alerts retained for GetAlerts and resuming WatchAlerts "
        "(bound: alerts_retained_max)", value=len(feed.retained),
    )
    yield GaugeMetricFamily(
        "reservd_alerts_retained_max", "Bound on retained alerts (the oldest is dropped)",
        value=feed.retained_max,
    )
    yield GaugeMetricFamily(
        "reservd_alert_latches",
        "(kind, sku, channel) whose last alert level is not 0 (one each at most)",
        value=feed.latches,
    )
    if alert_hub is None:
        return
    yield GaugeMetricFamily(
        "reservd_alert_watchers", "Open WatchAlerts streams (bound: alert_watchers_max)",
        value=len(alert_hub),
    )
    yield CounterMetricFamily(
        "reservd_alert_watchers_lapped",
        "WatchAlerts streams that missed alerts no longer retained (told with lapped)",
        value=alert_hub.lapped,
    )
    yield CounterMetricFamily(
        "reservd_alerts_sent", "Alerts sent on WatchAlerts streams", value=alert_hub.sent
    )


def scrape(port: int, host: str = "127.0.0.1", prefix: str = "reservd_") -> dict[str, float]:
    """Read a running daemon's unlabelled samples: {name without _total: value} (load tests and
    benchmarks). Goes straight to the address, never through a proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{host}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith(prefix) and "{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name.removesuffix("_total")] = float(value)
    return values
