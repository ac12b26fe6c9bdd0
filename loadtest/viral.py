"""The viral scenario's own verdict (loadtest/run.py calls it once the daemon has stopped): what
the velocity rules did, read from the daemon's WAL (every firing is a logged RULE command), and
seed 000's effectiveness metrics from the run."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from reservd import records, wal
from reservd.records import RecordType
from reservd.rules import Op, Rule

VIRAL_SKU = "viral"
# The daemon measures velocity over 1-minute windows in this scenario (see locustfile.py).
DAEMON_ENV = {"RESERVD_VELOCITY_WINDOW_MINUTES": "1"}


def rule_history(data_dir: Path) -> tuple[Counter, Counter, int, int]:
    """(firings by rule, reversals by rule, units released into pools, units reclaimed)."""
    framing, _, log_records = wal.read(data_dir)
    assert framing.ok, framing
    fired, ended = Counter(), Counter()
    released = reclaimed = 0
    for record in log_records:
        if record.type != RecordType.RULE:
            continue
        command = records.decode(record.type, record.payload)
        if command.sku != VIRAL_SKU:
            continue
        rule, op = Rule(command.rule).name.lower(), Op(command.op)
        if op is Op.FIRE:
            fired[rule] += 1
            released += command.effect if command.rule == Rule.POOL_RELEASE else 0
        elif op is Op.END:
            ended[rule] += 1
            reclaimed += command.effect if command.rule == Rule.POOL_RELEASE else 0
        else:
            fired[f"{rule} reassessed"] += 1
    return fired, ended, released, reclaimed


def judge(data_dir: Path, tallies: dict, verdict) -> None:
    fired, ended, released, reclaimed = rule_history(data_dir)
    viral = tallies.get("viral", {})
    verdict.check(
        fired["spike"] > 0 and fired["viral"] > 0,
        f"buffers tightened during the burst: spike fired {fired['spike']} times, viral "
        f"{fired['viral']} (reassessed {fired['viral reassessed']}); reversals "
        f"{dict(ended)}",
    )
    verdict.check(
        fired["pool_release"] > 0,
        f"spike reserve deployed: {released} units into the TikTok pool "
        f"({fired['pool_release']} releases), {reclaimed} reclaimed after",
    )
    bursts = (10, 40)
    survived = sum(1 for x in bursts if not viral.get(f"sold_out x{x}"))
    units = {key.split()[1]: value for key, value in viral.items() if key.startswith("units ")}
    spikes = fired["spike"] + fired["viral"]
    print(f"\nviral: spike survival {survived}/{len(bursts)} bursts with stock throughout; "
          f"buffer utilisation {fired['pool_release']}/{spikes} spike events deployed the "
          f"reserve; units sold per channel {units}; sold out answers "
          f"{ {k: v for k, v in viral.items() if k.startswith('sold_out')} }")
