"""Rebuilding the ledger from a data directory: at start-up, and for ``reservd wal verify``.

The WAL checks the framing (checksums, sequence numbers, torn tails); this module replays what
it hands back through the ledger, the same code that decided each command. A command the ledger
cannot apply (a log written by a buggier version, or damaged in a way its checksum cannot see)
stops recovery with a ReplayError that names the file, offset, seq and the command decoded.
Nothing is ever skipped: every record after it may have been acknowledged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from reservd import records
from reservd.clock import SystemClock
from reservd.config import Config
from reservd.ledger import Ledger
from reservd.memlog import MemoryLog
from reservd.table import Table
from reservd.wal import Record, Snapshot, VerifyReport

__all__ = ["ReplayError", "ReplayReport", "replay", "verify"]


def _describe_command(record_type: int, payload: bytes) -> str:
    try:
        return repr(records.decode(record_type, payload))
    except ValueError as error:
        return f"type {record_type}, {len(payload)} bytes, undecodable: {error}"


class ReplayError(Exception):
    """A snapshot or logged command the ledger cannot apply: recovery stops, nothing is lost.

    ``path`` and ``offset`` locate it, ``seq`` is its sequence number, ``command`` the command
    decoded (or why it does not decode), ``why`` what the ledger said.
    """

    def __init__(
        self, path: Path | None, offset: int, seq: int, command: str, why: str, directory: Path
    ) -> None:
        self.path = path
        self.offset = offset
        self.seq = seq
        self.command = command
        self.why = why
        self.directory = directory
        super().__init__(
            f"{path}: offset {offset}: seq {seq} cannot be replayed: {why}; command {command}"
        )

    @property
    def hint(self) -> str:
        """What the operator can do, for the one line logged or printed."""
        return (
            f"`reservd wal verify {self.directory}` reports the same without starting; "
            f"records before seq {self.seq} replay cleanly. Keep this directory as it is (every "
            "record after it may have been acknowledged) and restore it from a backup, or "
            "start it with the reservd version that wrote the log"
        )

    def fields(self) -> dict:
        """The structured log fields."""
        return {
            "file": str(self.path), "offset": self.offset, "seq": self.seq,
            "command": self.command, "why": self.why, "hint": self.hint,
        }


def replay(
    ledger: Ledger, snapshot: Snapshot | None, log_records: Iterable[Record], directory: Path
) -> int:
    """Load ``snapshot`` into the empty ``ledger`` and re-apply ``log_records``; returns how
    many were replayed. Raises ReplayError at the first one the ledger refuses."""
    if snapshot is not None:
        try:
            ledger.restore(snapshot.payload)
        except Exception as error:
            raise ReplayError(
                snapshot.path, 0, snapshot.seq, f"snapshot of {len(snapshot.payload)} bytes",
                f"{type(error).__name__}: {error}", directory,
            ) from error
    replayed = 0
    for record in log_records:
        try:
            ledger.replay(record.seq, record.type, record.payload)
        except Exception as error:
            raise ReplayError(
                record.path, record.offset, record.seq,
                _describe_command(record.type, record.payload),
                f"{type(error).__name__}: {error}", directory,
            ) from error
        replayed += 1
    return replayed


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """``reservd wal verify``: the framing check and the replay through the ledger."""

    framing: VerifyReport
    replayed: int  # records replayed after the snapshot
    skus: int
    live: int  # held + committed reservations at the end of the log
    error: ReplayError | None

    @property
    def ok(self) -> bool:
        return self.framing.ok and self.error is None

    def __str__(self) -> str:
        text = str(self.framing)
        if not self.framing.ok:
            return text
        if self.error is not None:
            return (
                f"{text.removesuffix('ok')}ERROR {self.error}\n"
                f"what to do: {self.error.hint}"
            )
        return (
            f"{text.removesuffix('ok')}replayed {self.replayed} records through the ledger: "
            f"{self.skus} skus, {self.live} live reservations\nok"
        )


def verify(directory: str | os.PathLike[str], config: Config | None = None) -> ReplayReport:
    """Check ``directory`` as start-up would, without modifying anything: the framing, then a
    replay of the snapshot and every record through a fresh ledger in memory."""
    from reservd import wal

    framing, snapshot, log_records = wal.read(directory)
    if not framing.ok:
        return ReplayReport(framing, 0, 0, 0, None)
    config = config or Config()
    table = Table(shards=config.shards, ring_capacity=1024)
    ledger = Ledger(table, MemoryLog(), SystemClock(), config)
    try:
        replayed = replay(ledger, snapshot, log_records, Path(directory))
    except ReplayError as error:
        return ReplayReport(framing, 0, len(table), ledger.live, error)
    return ReplayReport(framing, replayed, len(table), ledger.live, None)
