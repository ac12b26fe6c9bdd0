"""Configuration: every bound the daemon enforces, with units in the names."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping


class ConfigError(ValueError):
    """A setting an operator must fix: the message is one line naming the key."""


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """Input bounds enforced by the service layer (INVALID_ARGUMENT beyond them)."""

    id_bytes_max: int = 128
    channel_bytes_max: int = 64
    reason_bytes_max: int = 256
    lines_max: int = 100
    quantity_max: int = 1_000_000
    on_hand_max: int = 1_000_000_000_000
    ttl_seconds_default: int = 600
    ttl_seconds_min: int = 1
    ttl_seconds_max: int = 86_400
    watch_skus_max: int = 10_000
    get_skus_max: int = 1_000
    # Ops in one Batch (or one BatchStream message), and batches of one stream awaiting their
    # durability at once (the stream stops reading beyond it).
    batch_ops_max: int = 1_000
    batch_stream_in_flight_max: int = 16
    # GetAts and WatchAts: channels named in one request.
    ats_channels_max: int = 64
    # GetAlerts: alerts in one answer.
    get_alerts_max: int = 1_000


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    """Everything `reservd serve` can be told; defaults are the embedded default."""

    bind: str = "127.0.0.1:50051"
    data_dir: Path | None = Path("reservd-data")  # None: in memory only (benchmarks, tests)
    limits: Limits = dataclasses.field(default_factory=Limits)
    shards: int = 64
    # Change ring read by WatchStock (and the mirror): entries, a power of two.
    watch_ring_capacity: int = 1 << 18
    # Open WatchStock streams; beyond it WatchStock answers RESOURCE_EXHAUSTED.
    watchers_max: int = 1_000
    # Updates buffered per watcher, in updates (also the most one snapshot batch holds): a watcher
    # whose client stops reading is parked at its ring position once its buffer is this full.
    watch_buffer_updates_max: int = 1_024
    # Idempotency records of finished reservations and adjustments are kept retention_seconds
    # (the promise); at retained_max of them, new reservations and adjustments are refused
    # (RESOURCE_EXHAUSTED) instead of forgetting a record early.
    retention_seconds: int = 86_400
    retained_max: int = 20_000_000
    # Live (held or committed) reservations; Reserve answers RESOURCE_EXHAUSTED beyond it.
    reservations_max: int = 5_000_000
    # SKUs in the counter table; a SetStock creating one beyond it answers RESOURCE_EXHAUSTED
    # (existing SKUs still change; a log written under a larger bound still replays). 2 M SKUs
    # at the measured ~430-490 B of RSS each (bench/bench_memory.py, with their adjustment
    # records) is under 1 GiB: twice a large retail catalogue, beside reservations_max's ~1.2 GiB.
    skus_max: int = 2_000_000
    expiry_tick_ms: int = 100
    expiry_batch_max: int = 10_000
    message_bytes_max: int = 1 << 20
    shutdown_grace_seconds: float = 10.0
    # At stop, background tasks get this long to end after their cancellation (else: a bug).
    task_stop_seconds_max: float = 5.0
    segment_bytes_max: int = 64 << 20
    # One write + fdatasync carries at most this much; beyond pending, mutations are refused.
    wal_batch_bytes_max: int = 4 << 20
    wal_pending_bytes_max: int = 256 << 20
    # A snapshot is taken after this many WAL records since the last one.
    snapshot_records_interval: int = 1_000_000
    # Channels with a policy (SetChannel beyond it: RESOURCE_EXHAUSTED), and named buckets per
    # SKU besides shared (Allocate to a new one beyond it: RESOURCE_EXHAUSTED).
    channels_max: int = 256
    buckets_per_sku_max: int = 16
    # WatchAts: open streams; ats changes retained for resuming streams, in entries; the
    # (sku, channel) values one slow stream holds before it is sent a fresh snapshot instead;
    ats_watchers_max: int = 1_000
    ats_ring_capacity: int = 1 << 16
    ats_buffer_updates_max: int = 4_096
    # (sku, channel) pairs whose ats is kept up to date for streams that may resume.
    ats_tracked_pairs_max: int = 1_000_000
    # Velocity (reservd.velocity): units reserved per hour per (sku, channel), in minute
    # buckets over velocity_window_minutes (detection) and hour buckets over
    # velocity_baseline_hours (the learned baseline); at most velocity_tracked_pairs_max pairs.
    velocity_tracking: bool = True
    velocity_window_minutes: int = 10
    velocity_baseline_hours: int = 24
    velocity_tracked_pairs_max: int = 1_000_000
    # The velocity rules and promotions (reservd.rules, reservd.promotions) are evaluated every
    # rules_evaluate_ms (each firing a WAL command); the spike-absorption reserve is the
    # bucket named rules_spike_reserve; at most rules_active_max rules in force at once.
    rules_evaluate_ms: int = 1_000
    rules_spike_reserve: str = "spike"
    rules_active_max: int = 100_000
    # Promotions kept (normalised ones are forgotten retention_seconds after); their buffers
    # rise promotion_preload_points_bp (basis points of share) promotion_preload_seconds before
    # the start; sales at promotion_overrun_pct of the pro-rated forecast (and at least
    # promotion_overrun_units_min) tighten them like a spike; promotion_normalize_seconds after
    # the end they are back; announced less than promotion_notice_seconds ahead: flagged.
    promotions_max: int = 10_000
    promotion_preload_seconds: int = 86_400
    promotion_preload_points_bp: int = 2_000
    promotion_overrun_pct: int = 150
    promotion_overrun_units_min: int = 10
    promotion_normalize_seconds: int = 10_800
    promotion_notice_seconds: int = 172_800
    # Alerts (reservd.alerts): alerts retained for GetAlerts, resuming WatchAlerts streams and
    # snapshots (the oldest is dropped beyond it); open WatchAlerts streams (RESOURCE_EXHAUSTED
    # beyond); alerts one stream takes from the retained ones per step.
    alerts_retained_max: int = 10_000
    alert_watchers_max: int = 100
    alerts_batch_max: int = 256
    # Reserve-level alerts: a SKU leaves a level towards normal only once its available units
    # are more than this above the level's threshold (no alert per unit around a threshold).
    alert_level_hysteresis_units: int = 2
    # Recount shortfalls, graded: level 1 one SKU short by fewer than alert_shortfall_major_units;
    # level 2 one SKU short by that many or more, or several SKUs short within
    # alert_shortfall_window_seconds; level 3 (widespread) alert_shortfall_widespread_skus SKUs
    # or more short within the window.
    alert_shortfall_window_seconds: int = 3_600
    alert_shortfall_major_units: int = 5
    alert_shortfall_widespread_skus: int = 5
    # Stock states and incoming stock (issue 12), each refused RESOURCE_EXHAUSTED beyond its
    # bound: returns kept (in quarantine, or inspected and kept retention_seconds); write-offs
    # and receipts (idempotency records, kept retention_seconds); purchase orders (open, or
    # received and kept retention_seconds after the last receipt). Measured by
    # tests/test_stock_bounds.py (ids of 10-20 bytes): 0.7 KiB per return in quarantine, 1.2 KiB
    # inspected; 0.6 KiB per write-off or receipt; 0.2 KiB per order: the defaults hold at
    # most ~1.1 GiB together.
    returns_max: int = 500_000
    write_offs_max: int = 200_000
    purchase_orders_max: int = 200_000
    receipts_max: int = 500_000
    # Replenishment and cycle counts (reservd.planning). SKUs with demand history (1 KiB each),
    # settings or a count: settings beyond it are refused, further demand is not kept.
    replenish_skus_max: int = 200_000
    # Whole days of history D and sigma_D are measured over (1-127).
    replenish_demand_days: int = 90
    # Defaults of SKUs without settings (Admin.SetReplenishment), in days.
    replenish_lead_time_days: float = 14.0
    replenish_lead_time_sigma_days: float = 3.0
    # A suggested order brings available + incoming to the reorder point plus this many days
    # of demand.
    replenish_order_cycle_days: float = 30.0
    # Monthly seasonal indices, January first (seed 001's table).
    replenish_seasonal_indices: str = "0.8,0.7,0.9,1.0,1.0,1.1,1.1,1.2,1.3,1.5,2.5,2.0"
    # Cycle-count frequency by ABC class, in days (A weekly, B monthly, C quarterly).
    count_days_a: int = 7
    count_days_b: int = 30
    count_days_c: int = 91
    # Alerts: ghost stock at a recount above these, in basis points of the system count (seed
    # 001: target below 2%, above 5% a data integrity problem); returns waiting for inspection
    # longer than inspection_backlog_seconds_max, checked every inspection_backlog_check_seconds.
    ghost_stock_warning_bp: int = 200
    ghost_stock_critical_bp: int = 500
    inspection_backlog_seconds_max: int = 172_800
    inspection_backlog_check_seconds: float = 60.0
    metrics_port: int | None = None
    redis_url: str | None = None
    redis_prefix: str = "reservd:"
    # A mirror write unanswered after mirror_timeout_ms is slow, not failed: Redis is pinged on
    # a second connection every mirror_timeout_ms, and the mirror fails closed only when Redis
    # has answered nothing for mirror_silence_ms_max (a partition), or a write has no reply
    # within mirror_lag_ms_max, or a change waits longer than that to be mirrored.
    # Measured on a 2-core machine shared by seven test suites: a healthy Redis on appendfsync
    # always went silent for over 1 s (fsync stalls) about once in 18 ten-second runs.
    mirror_timeout_ms: int = 250
    mirror_silence_ms_max: int = 2_000
    mirror_lag_ms_max: int = 4_000
    # A grant waits at most this long for the mirror, then answers UNAVAILABLE without closing
    # reservd (the grant stays applied; a retry with the same id returns it).
    mirror_grant_wait_ms_max: int = 2_000
    mirror_batch_max: int = 5_000
    # SKUs whose channel fields in Redis the mirror knows exactly, so that a write sends only
    # the fields that changed (least recently written forgotten first; 1,533 B each with the
    # example config's seven channels and three buckets, 19 fields, measured with tracemalloc;
    # 0: always the full fields).
    mirror_shown_skus_max: int = 10_000
    # The mirror refreshes its watermark this often while idle (readers judge staleness by it),
    # and retries an unreachable Redis with a backoff doubling from min to max.
    mirror_heartbeat_ms: int = 100
    mirror_retry_ms_min: int = 25
    mirror_retry_ms_max: int = 250
    # TLS on the gRPC port (PEM files). A client CA with tls_require_client_auth is mutual TLS.
    # The files are re-read at a handshake at most every tls_reload_seconds: rotate without
    # a restart by replacing them (write aside, then rename).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    tls_require_client_auth: bool = False
    tls_reload_seconds: float = 5.0
    # Authorization, default deny: identity (client certificate SAN or CN, or a token's name)
    # -> roles (checkout, sync, ops, admin). Off when empty and no tokens and no client auth.
    auth_roles: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # A TOML file of `identity = "token"` lines: bearer tokens for clients without mTLS.
    auth_tokens_file: Path | None = None
    # Serve plain text with no authentication on a non-loopback address (warned in the log).
    insecure: bool = False
    reflection: bool = True
    # host:port of the Prometheus endpoint (overrides metrics_port, which binds 127.0.0.1).
    metrics_bind: str | None = None
    # Overload (reservd.admission): RESOURCE_EXHAUSTED with a retry hint of overload_retry_ms
    # beyond calls in flight, streams (WatchStock) per identity, or the optional rate per
    # identity (0: off; a bucket rate_burst_requests deep). The transport refuses streams
    # beyond streams_per_connection_max per connection, and holds at most rpcs_pending_max
    # calls not yet taken by the event loop.
    rpcs_concurrent_max: int = 10_000
    watchers_per_identity_max: int = 1_000
    rate_per_identity_per_second: float = 0.0
    rate_burst_requests: int = 100
    overload_retry_ms: int = 100
    streams_per_connection_max: int = 1_000
    rpcs_pending_max: int = 100_000
