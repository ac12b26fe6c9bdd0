"""reservd under locust: checkout buyers, a restocking admin and channel watchers.

Usually run through loadtest/run.py, which starts a fresh daemon, runs this headless and checks
the invariants afterwards:

    python loadtest/run.py --scenario last-unit --users 50 --spawn-rate 10 --time 60s

By hand, against a running daemon (the scenario's catalogue is set with SetStock at start, before
the clock runs; --no-seed keeps what is there):

    locust -f loadtest/locustfile.py --host 127.0.0.1:50051 --scenario flash-sale \
        --headless -u 50 -r 10 -t 60s --tallies tallies.json

Run it as one process (no --processes): the users share their tallies in memory.

Scenarios (--scenario):
  last-unit   one hot SKU with 5 units, restocked by 2 units every 2 s; every cart wants one
              of it (plus 0-2 lines of a 50-SKU catalogue that never runs out): the fight for
              the last unit.
  flash-sale  ten hot SKUs with 100 units each, picked with Zipf weights (the first is picked
              ten times as often as the tenth), 1-3 lines of 1-2 units; one of them is restocked
              by 10 units every second.
  steady      10,000 SKUs with 1,000 units each, picked uniformly, 1-3 lines of 1-3 units; ten
              of them get 100 units every second.
  viral       buyers of the 50-SKU catalogue as background, and ViralBuyers (--viral-buyers,
              20) reserving one unit of the SKU "viral" at a time on Amazon, Shopify and a
              TikTok pool (2,000 units, a spike reserve of 200, 10,000 in all), the velocity
              rules enabled on the three: 0.5 units/s per channel for the first quarter of the
              run, 10x that in the second, 40x in the third, back to 0.5 in the last. The
              daemon measures velocity over 1-minute windows (run.py starts it so), so the
              baseline is pinned at 630 units/h per channel (0.35 x the baseline traffic: a
              1-minute bucket only reaches the true rate at its end) and the rules hold for
              20 s; run it for 4 minutes or more (a phase per minute at least).

Users:
  Buyer           GetStock of the cart, Reserve it (all or nothing), then after a short think
                  Commit (60 %; half of those are then Fulfilled: shipped), Release it (25 %:
                  an abandoned cart), or walk away from a hold made with a 2 s TTL and let it
                  expire (15 %).
  Restocker       one (fixed): AdjustStock drops on the scenario's schedule.
  ChannelWatcher  --watchers of them (fixed, default 2): a WatchStock stream each, counting
                  updates, snapshots, sequence gaps and regressions. Even-numbered watchers
                  follow the scenario's hot SKUs (steady: the first 100), odd-numbered ones
                  every SKU.

Every call is one locust request (request_type "grpc", name = the method). Sold out is a correct
answer, so a success: it is counted separately, as its own row "Reserve (sold out)", and in the
tallies. Transient failures (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED) are retried
with the same reservation or adjustment id, so a retry never takes stock twice.

Tallies (--tallies PATH, written at test_stop, read by run.py): units supplied (seed and
acknowledged restocks), units per SKU by the state the buyers know their reservations are in
(committed, fulfilled, released, expired), the reservations whose state they cannot know
(held when the test stopped, left to expire, or a call that failed or was cut off: run.py asks
the daemon with GetReservation), adjustments with an unknown outcome (run.py resends them: the
same id makes that exactly-once), the buyers' counters and each watcher's findings.

Sequence gaps. An update carries the global sequence of the mutation that caused it, so a
watcher sees the global sequence jump all the time: mutations of SKUs it does not watch,
sold-out answers consume no sequence at all. A jump alone proves nothing. A gap is therefore
checked against what the users know happened: every acknowledged mutation carries its sequence
and the SKUs it changed. Changes reach a watcher in sequence order and only once durable, and an
acknowledgement waits for durability, so a watcher whose stream has reached sequence h must have
seen every acknowledged mutation of its SKUs with a sequence up to h. A snapshot update folds
the changes before it (sent on connect, or to a watcher that fell behind the change ring) and
restarts that window after its sequence. Each acknowledged mutation of a watched SKU inside a
window that the watcher did not see is a gap. Mutations nobody acknowledged (expiries) are
seen but cannot be checked. Within one SKU, sequences must strictly increase: an update at or
below the SKU's last sequence is a regression.
"""
from __future__ import annotations

import array
import collections
import dataclasses
import itertools
import json
import logging
import random
import time
import uuid
from pathlib import Path

import grpc
from locust import between, constant, constant_pacing, events, task

from grpc_user import CALL_TIMEOUT_SECONDS, GrpcUser
from reservd.v1 import reservd_pb2 as pb
from reservd.v1 import reservd_pb2_grpc as pb_grpc

log = logging.getLogger("reservd.loadtest")

ABANDON_TTL_SECONDS = 2
FATE_WEIGHTS = {"commit": 60, "release": 25, "abandon": 15}
FULFIL_SHARE = 0.5
CHANNELS = ("web", "app", "store")
ATTEMPTS_MAX = 3
RETRY_BACKOFF_SECONDS = 0.05
SEED_BATCH_MAX = 256  # SetStock calls in flight while seeding
_TRANSIENT = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
     grpc.StatusCode.RESOURCE_EXHAUSTED}
)


@dataclasses.dataclass(frozen=True)
class Scenario:
    """What is on sale and how buyers pick it. Quantities are units of stock."""

    name: str
    hot_skus: tuple[str, ...]
    hot_weights: tuple[float, ...]
    hot_on_hand: int
    hot_lines: tuple[int, int]  # (min, max) lines per cart from the hot SKUs
    hot_quantity: tuple[int, int]
    catalogue_skus: tuple[str, ...]
    catalogue_on_hand: int
    catalogue_lines: tuple[int, int]
    catalogue_quantity: tuple[int, int]
    restock_interval_seconds: float
    restock_skus: tuple[str, ...]
    restock_skus_per_drop: int
    restock_units: int
    restock_weighted: bool  # pick restocked SKUs with the hot weights

    def stock(self) -> dict[str, int]:
        """The catalogue as seeded: sku -> on_hand."""
        return {
            **{sku: self.catalogue_on_hand for sku in self.catalogue_skus},
            **{sku: self.hot_on_hand for sku in self.hot_skus},
        }

    def cart(self, rng: random.Random) -> dict[str, int]:
        """sku -> quantity; distinct SKUs, 1-3 lines."""
        lines: dict[str, int] = {}
        hot = rng.randint(*self.hot_lines)
        while len(lines) < hot:
            sku = rng.choices(self.hot_skus, self.hot_weights)[0]
            lines.setdefault(sku, rng.randint(*self.hot_quantity))
        for sku in rng.sample(self.catalogue_skus, rng.randint(*self.catalogue_lines)):
            lines[sku] = rng.randint(*self.catalogue_quantity)
        return lines

    def restock_drop(self, rng: random.Random) -> list[str]:
        if self.restock_weighted:
            return rng.choices(self.hot_skus, self.hot_weights, k=self.restock_skus_per_drop)
        return rng.sample(self.restock_skus, self.restock_skus_per_drop)

    @property
    def watched_skus(self) -> tuple[str, ...]:
        return self.hot_skus or self.catalogue_skus[:100]


_ITEMS = tuple(f"item-{i:02d}" for i in range(50))
VIRAL_SKU = "viral"
VIRAL_CHANNELS = ("amazon", "shopify", "tiktok")
VIRAL_PHASES = ((0.25, 1), (0.5, 10), (0.75, 40), (1.01, 1))  # (until fraction of run, x)
VIRAL_UNITS_PER_SECOND = 0.5  # per channel, at 1x
VIRAL_PINNED_UNITS_PER_HOUR = 630
_FLASH = tuple(f"flash-{i}" for i in range(10))
SCENARIOS = {
    "last-unit": Scenario(
        "last-unit", ("last-unit",), (1.0,), 5, (1, 1), (1, 1),
        _ITEMS, 1_000_000, (0, 2), (1, 3),
        2.0, ("last-unit",), 1, 2, False,
    ),
    "flash-sale": Scenario(
        "flash-sale", _FLASH, tuple(1 / (i + 1) for i in range(10)), 100, (1, 3), (1, 2),
        (), 0, (0, 0), (1, 1),
        1.0, _FLASH, 1, 10, True,
    ),
    "viral": Scenario(
        "viral", (VIRAL_SKU,), (1.0,), 10_000, (0, 0), (1, 1),
        _ITEMS, 1_000_000, (1, 2), (1, 2),
        2.0, _ITEMS, 1, 2, False,
    ),
    "steady": Scenario(
        "steady", (), (), 0, (0, 0), (1, 1),
        tuple(f"sku-{i:05d}" for i in range(10_000)), 1_000, (1, 3), (1, 3),
        1.0, tuple(f"sku-{i:05d}" for i in range(10_000)), 10, 100, False,
    ),
}


class WatchView:
    """What one WatchStock stream showed: counts, and per SKU the sequences it saw."""

    def __init__(self, skus: tuple[str, ...]) -> None:
        self.skus = frozenset(skus)  # empty: every SKU
        self.updates = 0
        self.snapshots = 0
        self.regressions = 0
        self.stray = 0  # updates for SKUs the stream was not asked for
        self.bad_counters = 0  # available != on_hand - reserved - committed, or a negative
        self.examples: list[str] = []
        self.last: dict[str, int] = {}
        self.seen: dict[str, array.array] = collections.defaultdict(lambda: array.array("q"))
        # [after, through]: sequences the stream covered change by change.
        self.windows: list[list[int]] = []
        self._snapshot_round = False

    def _example(self, text: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(text)

    def see(self, update: pb.StockUpdate) -> None:
        self.updates += 1
        sku, seq = update.sku, update.sequence
        if self.skus and sku not in self.skus:
            self.stray += 1
            self._example(f"update for unwatched sku {sku!r} at {seq}")
        # No scenario recounts below what is promised, so available < 0 would be an oversell.
        if (
            update.available != update.on_hand - update.reserved - update.committed
            or min(update.on_hand, update.reserved, update.committed, update.available) < 0
        ):
            self.bad_counters += 1
            self._example(f"counters of {sku!r} at {seq}: {update}")
        if update.snapshot:
            self.snapshots += 1
            if not self._snapshot_round or self.windows[-1][0] != seq:
                self.windows.append([seq, seq])
                self._snapshot_round = True
            self.last[sku] = seq
            return
        self._snapshot_round = False
        previous = self.last.get(sku, 0)
        if seq <= previous:
            self.regressions += 1
            self._example(f"sku {sku!r}: sequence {seq} after {previous}")
        self.last[sku] = seq
        self.seen[sku].append(seq)
        if self.windows:
            self.windows[-1][1] = max(self.windows[-1][1], seq)

    def gaps(self, mutations: dict[str, array.array]) -> tuple[int, int]:
        """(acknowledged mutations checked, of which not seen) over this stream's windows."""
        checked = missed = 0
        skus = self.skus or mutations.keys()
        for sku in skus:
            acknowledged = mutations.get(sku)
            if not acknowledged:
                continue
            seen = set(self.seen.get(sku, ()))
            for after, through in self.windows:
                for seq in acknowledged:
                    # Not ``through`` itself: a multi-line cart is one sequence in several
                    # updates, and a stream cut at the end of the run (or by a reconnect) may
                    # have shown some of them only.
                    if after < seq < through:
                        checked += 1
                        if seq not in seen:
                            missed += 1
                            self._example(f"sku {sku!r}: acknowledged change {seq} not seen")
        return checked, missed

    def summary(self, mutations: dict[str, array.array]) -> dict:
        checked, missed = self.gaps(mutations)
        return {
            "skus": len(self.skus) or "all", "updates": self.updates,
            "snapshots": self.snapshots, "windows": len(self.windows),
            "changes_checked": checked, "gaps": missed, "regressions": self.regressions,
            "stray": self.stray, "bad_counters": self.bad_counters, "examples": self.examples,
        }


class Tallies:
    """What the users know, shared by all users of this process."""

    def __init__(self) -> None:
        self.seeded: dict[str, int] = {}
        self.restocked: collections.Counter = collections.Counter()
        self.restock_drops = 0
        self.pending_adjustments: dict[str, tuple[str, int]] = {}
        # reservation_id -> [lines {sku: units}, state, expires_at_ms]
        self.reservations: dict[str, list] = {}
        self.mutations: dict[str, array.array] = collections.defaultdict(
            lambda: array.array("q")
        )
        self.buyers: collections.Counter = collections.Counter()
        self.restocker: collections.Counter = collections.Counter()  # its failed calls
        self.watchers: list[WatchView] = []
        self.watch_errors = 0
        # viral: units granted per channel, sold-out answers, and when each phase began
        self.viral: collections.Counter = collections.Counter()

    def acknowledged(self, seq: int, skus) -> None:
        """A mutation of ``skus`` at ``seq`` was acknowledged (durable)."""
        if seq:
            for sku in skus:
                self.mutations[sku].append(seq)

    def to_json(self) -> dict:
        units: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        open_reservations = []
        for reservation_id, (lines, state, expires_at_ms) in self.reservations.items():
            if state in ("held", "abandoned", "unknown"):
                open_reservations.append({
                    "reservation_id": reservation_id, "state": state, "lines": lines,
                    "expires_at_ms": expires_at_ms,
                })
            else:
                for sku, quantity in lines.items():
                    units[sku][state] += quantity
        return {
            "scenario": SCENARIO.name,
            "seeded": self.seeded,
            "restocked": dict(self.restocked),
            "restock_drops": self.restock_drops,
            "unknown_adjustments": [
                {"adjustment_id": adjustment_id, "sku": sku, "delta": delta}
                for adjustment_id, (sku, delta) in self.pending_adjustments.items()
            ],
            "units": {sku: dict(counts) for sku, counts in units.items()},
            "open_reservations": open_reservations,
            "buyers": dict(self.buyers),
            "restocker": dict(self.restocker),
            "watchers": [view.summary(self.mutations) for view in self.watchers],
            "watch_errors": self.watch_errors,
            "viral": dict(self.viral),
        }


SCENARIO = SCENARIOS["last-unit"]
TALLIES = Tallies()
_stopping = False
_streams: set = set()
_watcher_numbers = itertools.count()


def call(method, request, tally: collections.Counter):
    """One call, retried on transient failures (same ids: idempotent). None when it failed
    or its outcome stays unknown; every attempt is its own locust request."""
    for attempt in range(ATTEMPTS_MAX):
        try:
            return method(request, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.RpcError as error:
            tally[f"error {error.code().name}"] += 1
            if error.code() not in _TRANSIENT or attempt + 1 == ATTEMPTS_MAX or _stopping:
                return None
            time.sleep(RETRY_BACKOFF_SECONDS * 2**attempt)
    return None


def _reserve_name(name: str, response) -> str:
    if name == "Reserve" and not response.granted:
        return "Reserve (sold out)"
    return name


class Buyer(GrpcUser):
    weight = 1
    wait_time = between(0.05, 0.5)
    rename = staticmethod(_reserve_name)

    @task
    def checkout(self) -> None:
        tally, reservations = TALLIES.buyers, TALLIES.reservations
        lines = SCENARIO.cart(random)
        call(self.reservations.GetStock, pb.GetStockRequest(skus=list(lines)), tally)
        fate = random.choices(list(FATE_WEIGHTS), list(FATE_WEIGHTS.values()))[0]
        reservation_id = uuid.uuid4().hex
        request = pb.ReserveRequest(
            reservation_id=reservation_id,
            lines=[pb.Line(sku=sku, quantity=quantity) for sku, quantity in lines.items()],
            channel=random.choice(CHANNELS),
            ttl_seconds=ABANDON_TTL_SECONDS if fate == "abandon" else 0,
        )
        tally["carts"] += 1
        # Unknown until answered: a call cut off by the end of the test stays for run.py.
        reservations[reservation_id] = [lines, "unknown", 0]
        response = call(self.reservations.Reserve, request, tally)
        if response is None:
            return
        if not response.granted:
            tally["sold_out"] += 1
            del reservations[reservation_id]
            return
        if any(line.granted != line.requested for line in response.lines):
            tally["partial_grants"] += 1  # all-or-nothing was asked for: a bug
        tally["granted"] += 1
        tally["units_granted"] += sum(lines.values())
        TALLIES.acknowledged(response.sequence, lines)
        state = "abandoned" if fate == "abandon" else "held"
        reservations[reservation_id] = [lines, state, response.expires_at_ms]
        if fate == "abandon":
            tally["abandoned"] += 1
            return
        time.sleep(random.uniform(0.05, 0.3))
        if fate == "release":
            self._finish(self.reservations.Release, pb.ReleaseRequest, reservation_id, lines)
            return
        if self._finish(self.reservations.Commit, pb.CommitRequest, reservation_id, lines):
            if random.random() < FULFIL_SHARE:
                self._finish(self.reservations.Fulfil, pb.FulfilRequest, reservation_id, lines)

    def _finish(self, method, request_type, reservation_id: str, lines: dict) -> bool:
        """Commit, Release or Fulfil; records the state the daemon answered."""
        entry = TALLIES.reservations[reservation_id]
        entry[1] = "unknown"
        response = call(method, request_type(reservation_id=reservation_id), TALLIES.buyers)
        if response is None:
            return False
        state = pb.ReservationState.Name(response.state).lower()
        entry[1] = state
        TALLIES.buyers[state] += 1
        TALLIES.acknowledged(response.sequence, lines)
        return state in ("committed", "fulfilled")


class Restocker(GrpcUser):
    fixed_count = 1
    wait_time = constant_pacing(1.0)  # set from the scenario at init

    @task
    def restock(self) -> None:
        TALLIES.restock_drops += 1
        for sku in SCENARIO.restock_drop(random):
            adjustment_id = uuid.uuid4().hex
            delta = SCENARIO.restock_units
            TALLIES.pending_adjustments[adjustment_id] = (sku, delta)
            request = pb.AdjustStockRequest(
                sku=sku, delta=delta, reason="restock", adjustment_id=adjustment_id
            )
            response = call(self.admin.AdjustStock, request, TALLIES.restocker)
            if response is not None:
                del TALLIES.pending_adjustments[adjustment_id]
                TALLIES.restocked[sku] += delta
                TALLIES.acknowledged(response.sequence, (sku,))


_viral_channels = itertools.cycle(VIRAL_CHANNELS)
_started = [0.0, 60.0]  # monotonic start, run time in seconds
_pinned = [VIRAL_PINNED_UNITS_PER_HOUR]
_next_due = [0.0]


def viral_multiplier() -> int:
    fraction = (time.monotonic() - _started[0]) / _started[1]
    return next(x for until, x in VIRAL_PHASES if fraction < until)


class ViralBuyer(GrpcUser):
    """One unit of the viral SKU at a time; together the ViralBuyers keep to the phase's rate
    (a shared schedule: each takes the next due slot, so the rate follows the phase at once).
    Committed at once (a creator's fans pay)."""

    fixed_count = 20
    rename = staticmethod(_reserve_name)
    wait_time = constant(0.01)

    def _due(self) -> bool:
        now = time.monotonic()
        if now < _next_due[0]:
            return False
        per_second = VIRAL_UNITS_PER_SECOND * len(VIRAL_CHANNELS) * viral_multiplier()
        _next_due[0] = max(_next_due[0], now - 1.0) + 1 / per_second
        return True

    @task
    def burst(self) -> None:
        if not self._due():
            return
        tally, channel = TALLIES.buyers, next(_viral_channels)
        lines = {VIRAL_SKU: 1}
        reservation_id = uuid.uuid4().hex
        TALLIES.reservations[reservation_id] = [lines, "unknown", 0]
        response = call(self.reservations.Reserve, pb.ReserveRequest(
            reservation_id=reservation_id, lines=[pb.Line(sku=VIRAL_SKU, quantity=1)],
            channel=channel), tally)
        if response is None:
            return
        if not response.granted:
            del TALLIES.reservations[reservation_id]
            TALLIES.viral[f"sold_out x{viral_multiplier()}"] += 1
            return
        tally["granted"] += 1
        tally["units_granted"] += 1
        TALLIES.viral[f"units {channel}"] += 1
        TALLIES.acknowledged(response.sequence, lines)
        TALLIES.reservations[reservation_id] = [lines, "held", response.expires_at_ms]
        Buyer._finish(self, self.reservations.Commit, pb.CommitRequest, reservation_id, lines)


class ChannelWatcher(GrpcUser):
    fixed_count = 2
    wait_time = constant(1)

    @task
    def watch(self) -> None:
        if _stopping:
            return
        skus = SCENARIO.watched_skus if next(_watcher_numbers) % 2 == 0 else ()
        view = WatchView(skus)
        TALLIES.watchers.append(view)
        stream = self.reservations.WatchStock(pb.WatchStockRequest(skus=skus))
        _streams.add(stream)
        try:
            for update in stream:
                view.see(update)
        except grpc.RpcError as error:
            if not _stopping:
                TALLIES.watch_errors += 1
                log.warning("watch stream failed: %s", error)
        finally:
            _streams.discard(stream)


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    parser.add_argument(
        "--scenario", choices=sorted(SCENARIOS), default="last-unit",
        help="reservd: what is on sale and how buyers pick it",
    )
    parser.add_argument(
        "--tallies", default="", help="reservd: write the users' tallies to this JSON file"
    )
    parser.add_argument("--watchers", type=int, default=2, help="reservd: WatchStock users")
    parser.add_argument(
        "--no-seed", action="store_true", help="reservd: keep the daemon's stock as it is"
    )
    parser.add_argument("--viral-buyers", type=int, default=20,
                        help="reservd: ViralBuyer users (scenario viral)")
    parser.add_argument("--viral-baseline", type=int, default=VIRAL_PINNED_UNITS_PER_HOUR,
                        help="reservd: the viral SKU's pinned baseline, units/h per channel")


@events.init.add_listener
def _init(environment, **_kwargs) -> None:
    global SCENARIO
    options = environment.parsed_options
    if options is None:
        return
    SCENARIO = SCENARIOS[options.scenario]
    Restocker.wait_time = constant_pacing(SCENARIO.restock_interval_seconds)
    ChannelWatcher.fixed_count = options.watchers
    if SCENARIO.name == "viral":
        ViralBuyer.fixed_count = options.viral_buyers
        _started[1] = float(options.run_time or 60)
        _pinned[0] = options.viral_baseline
    else:
        environment.user_classes[:] = [c for c in environment.user_classes if c is not ViralBuyer]
    if options.no_seed or not environment.host:
        return
    _seed(environment.host)


def _seed(target: str) -> None:
    """SetStock for the whole catalogue, before the clock starts (not in locust's stats)."""
    started = time.monotonic()
    run = uuid.uuid4().hex[:8]
    stock = list(SCENARIO.stock().items())
    with grpc.insecure_channel(target) as channel:
        admin = pb_grpc.AdminStub(channel)
        for start in range(0, len(stock), SEED_BATCH_MAX):
            batch = stock[start:start + SEED_BATCH_MAX]
            futures = [
                admin.SetStock.future(
                    pb.SetStockRequest(sku=sku, on_hand=on_hand, reason="seed",
                                       adjustment_id=f"seed-{run}-{sku}"),
                    timeout=CALL_TIMEOUT_SECONDS,
                )
                for sku, on_hand in batch
            ]
            for (sku, on_hand), future in zip(batch, futures):
                TALLIES.seeded[sku] = on_hand
                TALLIES.acknowledged(future.result().sequence, (sku,))
        if SCENARIO.name == "viral":
            _viral_setup(admin, run)
    log.info(
        "seeded %d SKUs of scenario %s in %.1f s",
        len(TALLIES.seeded), SCENARIO.name, time.monotonic() - started,
    )


def _viral_setup(admin, run: str) -> None:
    """Channels, the TikTok pool and spike reserve, the rules on, the baseline pinned."""
    for channel in VIRAL_CHANNELS:
        admin.SetChannel(pb.SetChannelRequest(
            channel=channel, change_id=f"seed-{run}-c-{channel}", policy=pb.ChannelPolicy(
                share_bp=9000 if channel == "amazon" else 10_000,
                pool="tiktok" if channel == "tiktok" else "")), timeout=CALL_TIMEOUT_SECONDS)
        admin.SetRulePolicy(pb.SetRulePolicyRequest(
            channel=channel, change_id=f"seed-{run}-r-{channel}", policy=pb.RulePolicy(
                enabled=True, hold_seconds=20, viral_reassess_seconds=20, release_pct=100)),
            timeout=CALL_TIMEOUT_SECONDS)
    admin.SetRulePolicy(pb.SetRulePolicyRequest(
        sku=VIRAL_SKU, change_id=f"seed-{run}-pin", policy=pb.RulePolicy(
            baseline_units_per_hour=_pinned[0])), timeout=CALL_TIMEOUT_SECONDS)
    for bucket, units in (("tiktok", 2000), ("spike", 200)):
        admin.Allocate(pb.AllocateRequest(
            sku=VIRAL_SKU, from_bucket="shared", to_bucket=bucket, units=units,
            change_id=f"seed-{run}-a-{bucket}"), timeout=CALL_TIMEOUT_SECONDS)


@events.test_start.add_listener
def _start_clock(**_kwargs) -> None:
    _started[0] = time.monotonic()


@events.test_stopping.add_listener
def _stopping_now(**_kwargs) -> None:
    global _stopping
    _stopping = True
    for stream in list(_streams):
        stream.cancel()


@events.test_stop.add_listener
def _report(environment, **_kwargs) -> None:
    tallies = TALLIES.to_json()
    buyers = tallies["buyers"]
    log.info(
        "buyers: %d carts, %d granted (%d units), %d sold out, %d committed, %d fulfilled, "
        "%d released, %d left to expire; restocks: %d drops, %d units",
        buyers.get("carts", 0), buyers.get("granted", 0), buyers.get("units_granted", 0),
        buyers.get("sold_out", 0), buyers.get("committed", 0), buyers.get("fulfilled", 0),
        buyers.get("released", 0), buyers.get("abandoned", 0), tallies["restock_drops"],
        sum(tallies["restocked"].values()),
    )
    for watcher in tallies["watchers"]:
        log.info("watcher %s", {k: v for k, v in watcher.items() if k != "examples"})
    # Locust's CSV is written every second and may miss the last requests; these are final.
    entries = sorted(environment.stats.entries.values(), key=lambda entry: entry.name)
    tallies["requests"] = [
        {
            "name": entry.name, "count": entry.num_requests, "failures": entry.num_failures,
            "rps": round(entry.total_rps, 1),
            "p50_ms": entry.get_response_time_percentile(0.5),
            "p99_ms": entry.get_response_time_percentile(0.99),
        }
        for entry in [*entries, environment.stats.total]
    ]
    path = getattr(environment.parsed_options, "tallies", "")
    if path:
        Path(path).write_text(json.dumps(tallies, indent=1))
