"""Run one locust scenario against a fresh reservd, headless, end to end, and judge it.

    python loadtest/run.py --scenario last-unit --users 50 --spawn-rate 10 --time 60s
    ./dev load --scenario flash-sale --users 100 --time 2m --redis-url redis://127.0.0.1:6379/0

It starts `reservd serve` on a fresh temporary data directory (WAL on; the Redis mirror too with
--redis-url), runs `locust -f loadtest/locustfile.py --headless` for the given users and time
(the locustfile seeds the scenario's catalogue with SetStock before its clock starts, so a
hand-run locust seeds the same way), and writes locust's CSV files, HTML report, log and the
users' tallies into --reports (default loadtest/reports/). Then it checks, from the daemon's
own final state (GetStock, GetReservation) and the users' tallies:

  oversold == 0     no SKU has more units promised to buyers (held + committed + fulfilled,
                    as the buyers were told) than supplied (seed + acknowledged restocks)
  counters balance  per SKU: available == on_hand - reserved - committed; on_hand == supplied -
                    fulfilled; committed == the units of committed reservations; reserved == the
                    units of live holds; available >= 0
  expiry            every hold left to expire is EXPIRED once its TTL has passed
  watchers          no sequence gaps, regressions, stray SKUs or unbalanced counters in the
                    WatchStock streams (see the locustfile for what a gap means), and the
                    streams did check acknowledged changes
  recovery          a restart on the same data directory recovers exactly the final counters
  progress          units were granted; failed requests <= --max-failure-ratio; every unknown
                    outcome was resolved; the daemon did not die
  viral (scenario)  from the daemon's WAL: the buffers tightened during the burst (spike and
                    viral fired) and the spike reserve was deployed into the TikTok pool; it
                    prints seed 000's spike survival, buffer utilisation and units per channel

Reservations whose outcome the buyers could not know (cut off at the end, failed calls) are
looked up with GetReservation; restocks with an unknown outcome are resent with the same
adjustment id (exactly once either way). It prints a short verdict and exits 1 when an
invariant fails (2 when the run itself could not be made).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from daemonproc import DaemonProcess  # noqa: E402
import viral  # noqa: E402  (loadtest/viral.py: the viral scenario's verdict)
from reservd.metrics import scrape  # noqa: E402
from reservd.v1 import reservd_pb2 as pb  # noqa: E402
from reservd.v1 import reservd_pb2_grpc as pb_grpc  # noqa: E402

SCENARIOS = ("last-unit", "flash-sale", "steady", "viral")
GET_STOCK_BATCH_MAX = 1000  # the daemon's get_skus_max
LOOKUP_BATCH_MAX = 200  # GetReservation calls in flight at once
EXPIRY_SLACK_SECONDS = 2.0  # expiry ticks every 100 ms; this is generous on a busy machine
CALL_TIMEOUT_SECONDS = 10.0


def seconds(timespan: str) -> float:
    """Locust's -t: '90', '30s', '2m', '1h30m'."""
    if re.fullmatch(r"\d+", timespan):
        return float(timespan)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", timespan)
    if not parts or not any(parts.groups()):
        raise argparse.ArgumentTypeError(f"{timespan!r}: expected e.g. 30s, 2m, 1h30m")
    hours, minutes, secs = (int(part or 0) for part in parts.groups())
    return hours * 3600 + minutes * 60 + secs


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Verdict:
    def __init__(self) -> None:
        self.lines: list[tuple[bool, str]] = []

    def check(self, ok: bool, text: str) -> bool:
        self.lines.append((bool(ok), text))
        return ok

    @property
    def passed(self) -> bool:
        return all(ok for ok, _ in self.lines)

    def print(self, scenario: str) -> None:
        print(f"\nverdict for {scenario}: {'PASS' if self.passed else 'FAIL'}")
        for ok, text in self.lines:
            print(f"  {'ok  ' if ok else 'FAIL'}  {text}")


def stock_of(stub, skus: list[str]) -> dict[str, pb.Stock]:
    stock = {}
    for start in range(0, len(skus), GET_STOCK_BATCH_MAX):
        response = stub.GetStock(
            pb.GetStockRequest(skus=skus[start:start + GET_STOCK_BATCH_MAX]),
            timeout=CALL_TIMEOUT_SECONDS,
        )
        stock.update((row.sku, row) for row in response.stock)
    return stock


def lookup(stub, reservation_ids: list[str]) -> dict[str, pb.ReservationResponse | None]:
    """GetReservation for each id; None where the daemon does not know it."""
    found: dict[str, pb.ReservationResponse | None] = {}
    for start in range(0, len(reservation_ids), LOOKUP_BATCH_MAX):
        batch = reservation_ids[start:start + LOOKUP_BATCH_MAX]
        futures = [
            stub.GetReservation.future(
                pb.GetReservationRequest(reservation_id=reservation_id),
                timeout=CALL_TIMEOUT_SECONDS,
            )
            for reservation_id in batch
        ]
        for reservation_id, future in zip(batch, futures):
            try:
                found[reservation_id] = future.result()
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                found[reservation_id] = None
    return found


def run_locust(args, target: str, reports: Path) -> tuple[int, Path, Path]:
    prefix = reports / args.scenario
    tallies = reports / f"{args.scenario}-tallies.json"
    log_path = reports / f"{args.scenario}-locust.log"
    tallies.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.time,
        "--host", target, "--scenario", args.scenario, "--watchers", str(args.watchers),
        "--tallies", str(tallies), "--csv", str(prefix), "--html", f"{prefix}.html",
        "--viral-buyers", str(args.viral_buyers), "--viral-baseline", str(args.viral_baseline),
        "--stop-timeout", str(args.stop_timeout), "--exit-code-on-error", "0", "--only-summary",
        *args.locust_args,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "src"), str(ROOT / "loadtest"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    budget = seconds(args.time) + args.stop_timeout + 120
    print(f"locust: {args.scenario}, {args.users} users for {args.time} -> {reports}/", flush=True)
    with open(log_path, "w") as log_file:
        try:
            code = subprocess.run(
                command, stdout=log_file, stderr=subprocess.STDOUT, env=env, timeout=budget
            ).returncode
        except subprocess.TimeoutExpired:
            code = -1
    return code, tallies, log_path


def print_requests(tallies: dict) -> tuple[int, int]:
    """Locust's per-request rows; returns (requests, failures) of all of them."""
    print(f"\n{'request':<22}{'count':>9}{'fail':>7}{'rps':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for row in tallies["requests"]:
        print(
            f"{row['name']:<22}{row['count']:>9}{row['failures']:>7}{row['rps']:>9.1f}"
            f"{row['p50_ms']:>9.0f}{row['p99_ms']:>9.0f}"
        )
    total = tallies["requests"][-1]
    return total["count"], total["failures"]


def judge(args, daemon: DaemonProcess, tallies: dict, requests: int, failures: int,
          verdict: Verdict) -> dict[str, pb.Stock]:
    channel = grpc.insecure_channel(daemon.target)
    reservations = pb_grpc.ReservationsStub(channel)
    admin = pb_grpc.AdminStub(channel)

    supplied: Counter = Counter(tallies["seeded"])
    supplied.update(tallies["restocked"])
    unresolved = 0
    for adjustment in tallies["unknown_adjustments"]:
        # Same id and payload: applied now if it never was, replayed if it was.
        try:
            admin.AdjustStock(
                pb.AdjustStockRequest(
                    sku=adjustment["sku"], delta=adjustment["delta"], reason="restock",
                    adjustment_id=adjustment["adjustment_id"],
                ),
                timeout=CALL_TIMEOUT_SECONDS,
            )
            supplied[adjustment["sku"]] += adjustment["delta"]
        except grpc.RpcError:
            unresolved += 1

    open_reservations = tallies["open_reservations"]
    abandoned_until_ms = max(
        (entry["expires_at_ms"] for entry in open_reservations if entry["state"] == "abandoned"),
        default=0,
    )
    wait_seconds = abandoned_until_ms / 1000 + EXPIRY_SLACK_SECONDS - time.time()
    if wait_seconds > 0:
        time.sleep(wait_seconds)

    units: dict[str, Counter] = defaultdict(Counter)
    for sku, counts in tallies["units"].items():
        units[sku].update(counts)
    found = lookup(reservations, [entry["reservation_id"] for entry in open_reservations])
    lost = not_expired = 0
    for entry in open_reservations:
        answer = found[entry["reservation_id"]]
        if answer is None:
            # Unknown outcomes may never have been applied; a hold that was granted must exist.
            lost += entry["state"] != "unknown"
            continue
        state = pb.ReservationState.Name(answer.state).lower()
        not_expired += entry["state"] == "abandoned" and state == "held"
        for line in answer.lines:
            units[line.sku][state] += line.quantity

    skus = sorted(supplied)
    final = stock_of(reservations, skus)
    channel.close()

    oversold = 0
    tightest = (None, 0, 0)  # sku, promised, supplied: the SKU closest to overselling
    unbalanced: list[str] = []
    for sku in skus:
        row, mine = final.get(sku), units[sku]
        if row is None:
            unbalanced.append(f"{sku}: unknown to the daemon")
            continue
        promised = mine["held"] + mine["committed"] + mine["fulfilled"]
        oversold += max(0, promised - supplied[sku])
        if tightest[0] is None or supplied[sku] - promised < tightest[2] - tightest[1]:
            tightest = (sku, promised, supplied[sku])
        problems = []
        if row.available != row.on_hand - row.reserved - row.committed:
            problems.append("available != on_hand - reserved - committed")
        if row.on_hand != supplied[sku] - mine["fulfilled"]:
            problems.append(f"on_hand {row.on_hand} != supplied {supplied[sku]} - fulfilled "
                            f"{mine['fulfilled']}")
        if row.committed != mine["committed"]:
            problems.append(f"committed {row.committed} != {mine['committed']} known committed")
        if row.reserved != mine["held"]:
            problems.append(f"reserved {row.reserved} != {mine['held']} in live holds")
        if row.available < 0:
            problems.append(f"available {row.available} < 0")
        if problems:
            unbalanced.append(f"{sku}: " + "; ".join(problems))

    buyers = tallies["buyers"]
    sku, promised, supply = tightest
    verdict.check(
        oversold == 0,
        f"oversold == {oversold} units (tightest SKU {sku}: {promised} promised of {supply} "
        f"supplied; {buyers.get('units_granted', 0)} units granted over the run, "
        f"{buyers.get('sold_out', 0)} carts sold out)",
    )
    verdict.check(
        not unbalanced and not buyers.get("partial_grants"),
        f"counters balance on {len(skus) - len(unbalanced)}/{len(skus)} SKUs"
        + (f": {'; '.join(unbalanced[:3])}" if unbalanced else "")
        + (f"; {buyers['partial_grants']} partial grants" if buyers.get("partial_grants") else ""),
    )
    verdict.check(
        not not_expired,
        f"expiry: {not_expired} of the holds left to expire still held "
        f"{EXPIRY_SLACK_SECONDS:.0f} s after their TTL",
    )
    watchers = tallies["watchers"]
    totals = Counter()
    for watcher in watchers:
        totals.update({key: watcher[key] for key in (
            "updates", "snapshots", "changes_checked", "gaps", "regressions", "stray",
            "bad_counters")})
    examples = [example for watcher in watchers for example in watcher["examples"]][:3]
    verdict.check(
        totals["gaps"] == totals["regressions"] == totals["stray"] == totals["bad_counters"] == 0
        and totals["changes_checked"] > 0 and not tallies["watch_errors"],
        f"watchers: {totals['gaps']} sequence gaps, {totals['regressions']} regressions, "
        f"{totals['stray']} stray, {totals['bad_counters']} bad counters in {totals['updates']} "
        f"updates ({totals['snapshots']} snapshot) over {len(watchers)} streams; "
        f"{totals['changes_checked']} acknowledged changes checked; "
        f"{tallies['watch_errors']} broken streams"
        + (f"; e.g. {examples}" if examples else ""),
    )
    verdict.check(
        buyers.get("units_granted", 0) > 0 and requests > 0
        and failures <= args.max_failure_ratio * requests,
        f"progress: {buyers.get('granted', 0)} carts granted; {failures} of {requests} "
        f"requests failed (at most {args.max_failure_ratio:.1%} allowed)",
    )
    verdict.check(
        not unresolved and not lost,
        f"resolved {len(open_reservations)} open reservations and "
        f"{len(tallies['unknown_adjustments'])} unknown restocks; {lost} granted holds lost, "
        f"{unresolved} unresolved",
    )
    return final


def check_recovery(args, data_dir: Path, final: dict[str, pb.Stock], env: dict,
                   verdict: Verdict) -> None:
    daemon = DaemonProcess("--data-dir", str(data_dir), env=env).start()
    try:
        with grpc.insecure_channel(daemon.target) as channel:
            recovered = stock_of(pb_grpc.ReservationsStub(channel), sorted(final))
    finally:
        daemon.signal(signal.SIGTERM)
        daemon.wait()
    differ = [
        sku for sku, row in final.items()
        if sku not in recovered or recovered[sku].SerializeToString() != row.SerializeToString()
    ]
    verdict.check(
        not differ,
        f"recovery: a restart recovered {len(final) - len(differ)}/{len(final)} SKUs exactly"
        + (f" (differ: {differ[:3]})" if differ else ""),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--scenario", choices=SCENARIOS, default="last-unit")
    parser.add_argument("--users", "-u", type=int, default=20)
    parser.add_argument("--spawn-rate", "-r", type=float, default=10)
    parser.add_argument("--time", "-t", default="30s", help="locust's -t (30s, 2m, 1h30m)")
    parser.add_argument("--watchers", type=int, default=2, help="of the users")
    parser.add_argument("--viral-buyers", type=int, default=20,
                        help="of the users, scenario viral: they make the bursts")
    parser.add_argument("--viral-baseline", type=int, default=630,
                        help="scenario viral: the pinned baseline, units/h per channel (a "
                        "short run needs a low one: its 1-minute buckets hold few units)")
    parser.add_argument("--reports", type=Path, default=ROOT / "loadtest" / "reports")
    parser.add_argument("--redis-url", default=None, help="run the daemon with the mirror")
    parser.add_argument("--stop-timeout", type=int, default=10,
                        help="seconds the buyers get to finish their cart at the end")
    parser.add_argument("--max-failure-ratio", type=float, default=0.01)
    parser.add_argument("--keep-data", action="store_true", help="keep the data directory")
    parser.add_argument("locust_args", nargs="*", help="after --: passed on to locust")
    args = parser.parse_args(argv)
    seconds(args.time)
    fixed = args.watchers + 1 + (args.viral_buyers if args.scenario == "viral" else 0)
    if args.users < fixed + 1:
        parser.error(f"--users must leave room for buyers: {fixed} fixed users (watchers, "
                     "restocker, viral buyers)")

    args.reports.mkdir(parents=True, exist_ok=True)
    data_dir = Path(tempfile.mkdtemp(prefix="reservd-load-"))
    metrics_port = free_port()
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    if args.scenario == "viral":
        env.update(viral.DAEMON_ENV)
    daemon_args = ["--data-dir", str(data_dir), "--metrics-port", str(metrics_port)]
    if args.redis_url:
        daemon_args += ["--redis-url", args.redis_url]
    verdict = Verdict()
    daemon = DaemonProcess(*daemon_args, env=env)
    try:
        daemon.start()
        serving = daemon.logged("serving")[0]
        print(f"reservd on {daemon.target}, data {data_dir}, "
              f"extension={serving.get('extension')}", flush=True)
        code, tallies_path, log_path = run_locust(args, daemon.target, args.reports)
        if code != 0 or not tallies_path.exists():
            print(f"locust failed (exit {code}); see {log_path}:", file=sys.stderr)
            print(log_path.read_text()[-3000:], file=sys.stderr)
            return 2
        tallies = json.loads(tallies_path.read_text())
        requests, failures = print_requests(tallies)
        buyers = tallies["buyers"]
        print("\nbuyers: " + ", ".join(f"{key} {value}" for key, value in sorted(buyers.items())))
        print(f"restocks: {tallies['restock_drops']} drops, "
              f"{sum(tallies['restocked'].values())} units"
              + "".join(f", {key} {value}" for key, value in tallies["restocker"].items()))
        if daemon.process.poll() is not None:
            verdict.check(False, f"reservd died during the run: {daemon.lines[-3:]}")
            verdict.print(args.scenario)
            return 1
        metrics = scrape(metrics_port)
        fsyncs = metrics.get("reservd_wal_fsyncs", 0)
        records = metrics.get("reservd_wal_records", 0)
        print(f"reservd: sequence {metrics.get('reservd_sequence', 0):.0f}, {records:.0f} WAL "
              f"records in {fsyncs:.0f} fsyncs ({records / max(fsyncs, 1):.1f} per fsync)")
        final = judge(args, daemon, tallies, requests, failures, verdict)
        daemon.signal(signal.SIGTERM)
        verdict.check(daemon.wait() == 0, "reservd drained and stopped cleanly on SIGTERM")
        errors = [line for line in daemon.lines if line.get("level") in ("error", "critical")]
        if errors:
            print(f"reservd logged {len(errors)} errors, e.g. {errors[:2]}")
        if args.scenario == "viral":
            viral.judge(data_dir, tallies, verdict)
        check_recovery(args, data_dir, final, env, verdict)
    finally:
        daemon.kill()
        if not args.keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)
    verdict.print(args.scenario)
    print(f"reports: {args.reports}/{args.scenario}.html, {args.scenario}_stats.csv, "
          f"{args.scenario}-tallies.json")
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
