"""``reservd wal verify|dump DIR``: what recovery would find, without modifying anything."""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO

from reservd import records
from reservd.wal.errors import NotADataDirectory, WalCorruption
from reservd.wal.format import (
    _SEGMENT_NAME,
    _SNAPSHOT_NAME,
    FRAME_ALIGN_BYTES,
    FRAME_HEAD_BYTES,
    Record,
    Snapshot,
    _find_valid_frame,
    LOCK_NAME,
    _frame_error,
)
from reservd.wal.scan import _inspect, _iter_records, _read_snapshot
from reservd.walfile import OS_FILES, FileLayer

@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What recovery would find in ``directory``; ``error`` is what it would raise."""

    directory: Path
    snapshot_seq: int | None
    segments: tuple[str, ...]
    records: int  # records in the live segments (including those the snapshot covers)
    last_seq: int
    torn_tail: str | None  # what recovery would trim, with file and offset
    stale_segments: tuple[str, ...]
    error: WalCorruption | None

    @property
    def ok(self) -> bool:
        return self.error is None

    def __str__(self) -> str:
        lines = [f"directory {self.directory}"]
        if self.error is not None:
            lines.append(f"ERROR {self.error}")
            return "\n".join(lines)
        if self.snapshot_seq is None:
            lines.append("no snapshot")
        else:
            lines.append(f"snapshot seq {self.snapshot_seq}")
        lines.append(
            f"{len(self.segments)} segments, {self.records} records, last seq {self.last_seq}"
        )
        if self.stale_segments:
            stale = ", ".join(self.stale_segments)
            lines.append(f"stale segments (covered by the snapshot): {stale}")
        if self.torn_tail is not None:
            lines.append(f"torn tail (recovery trims it): {self.torn_tail}")
        lines.append("ok")
        return "\n".join(lines)


def _listdir(directory: Path, files: FileLayer) -> list[str]:
    """The names in ``directory``; NotADataDirectory if it is missing or a file."""
    try:
        return files.listdir(directory)
    except FileNotFoundError:
        raise NotADataDirectory(directory, "it does not exist") from None
    except NotADirectoryError:
        raise NotADataDirectory(directory, "it is a file; give the directory holding it") from None


def require_data_directory(
    directory: str | os.PathLike[str], files: FileLayer = OS_FILES
) -> None:
    """Raise NotADataDirectory unless ``directory`` holds a lock, a segment or a snapshot."""
    directory = Path(directory)
    names = _listdir(directory, files)
    if not any(
        name == LOCK_NAME or _SEGMENT_NAME.fullmatch(name) or _SNAPSHOT_NAME.fullmatch(name)
        for name in names
    ):
        raise NotADataDirectory(directory, "no wal-*.log, snap-*.snap or LOCK file in it")


def verify(directory: str | os.PathLike[str], files: FileLayer = OS_FILES) -> VerifyReport:
    """Check a WAL directory as recovery would, without modifying anything. Raises
    NotADataDirectory for a path that is not one."""
    return read(directory, files)[0]


def read(
    directory: str | os.PathLike[str], files: FileLayer = OS_FILES
) -> tuple[VerifyReport, Snapshot | None, Iterator[Record]]:
    """Check a WAL directory as recovery would, without modifying anything: the report, then
    (when it is ok) the newest snapshot and the records after it, as recovery would hand them
    out (a torn tail is left out, not trimmed). Raises NotADataDirectory."""
    directory = Path(directory)
    require_data_directory(directory, files)
    try:
        found = _inspect(directory, files)
    except WalCorruption as error:
        return VerifyReport(directory, None, (), 0, 0, None, (), error), None, iter(())
    tail = found.torn_tail
    report = VerifyReport(
        directory=directory,
        snapshot_seq=found.snapshot.seq if found.snapshot else None,
        segments=tuple(segment.path.name for segment in found.segments),
        records=sum(segment.records for segment in found.segments),
        last_seq=found.last_seq,
        torn_tail=None if tail is None else f"{tail.path}: offset {tail.offset}: {tail.reason}",
        stale_segments=tuple(path.name for path in found.stale_segments),
        error=None,
    )
    snapshot = found.snapshot
    after_seq = snapshot.seq if snapshot is not None else 0
    return report, snapshot, _iter_records(found.segments, files, after_seq)


def _decoded(record_type: int, payload: bytes) -> tuple[str, str]:
    """(type name, the command as JSON) for ``dump``; a payload that does not decode is shown
    in hex after the reason."""
    try:
        name = records.RecordType(record_type).name
        command = records.decode(record_type, payload)
    except ValueError as error:
        return str(record_type), f"undecodable ({error}): {payload.hex()}"
    return name, json.dumps(command._asdict(), ensure_ascii=False)


def dump(
    directory: str | os.PathLike[str], out: TextIO, *, payload_prefix_bytes: int = 32,
    files: FileLayer = OS_FILES, decoded: bool = False,
) -> int:
    """Print every record of every segment, one tab-separated line each: seq, type, length,
    crc, segment, offset, payload hex prefix. Snapshots and bad frames are ``#`` comment lines;
    after a bad frame the dump resumes at the next valid frame. Returns the records printed.
    ``decoded`` (``reservd wal dump``): the type by name and the payload as the command it
    holds, in JSON (who asked, for an audited change).
    Raises NotADataDirectory for a missing path or a file; an empty directory has no records.
    """
    directory = Path(directory)
    names = sorted(_listdir(directory, files))
    for name in names:
        if _SNAPSHOT_NAME.fullmatch(name):
            try:
                snapshot = _read_snapshot(directory / name, files)
            except WalCorruption as error:
                out.write(f"# snapshot {name} CORRUPT: {error}\n")
            else:
                out.write(f"# snapshot {name} seq {snapshot.seq} length {len(snapshot.payload)}\n")
    out.write("# seq\ttype\tlength\tcrc\tsegment\toffset\tpayload\n")
    printed = 0
    for name in names:
        if not _SEGMENT_NAME.fullmatch(name):
            continue
        data = files.read_file(directory / name)
        offset = 0
        while offset < len(data):
            reason, seq, type_, frame_bytes = _frame_error(data, offset)
            if reason:
                follower = _find_valid_frame(data, offset + FRAME_ALIGN_BYTES)
                resume = f"resuming at offset {follower[0]}" if follower else "nothing after it"
                out.write(f"# bad frame in {name} at offset {offset}: {reason}; {resume}\n")
                if follower is None:
                    break
                offset = follower[0]
                continue
            crc, length = struct.unpack_from("<II", data, offset)
            start = offset + FRAME_HEAD_BYTES
            if decoded:
                type_, shown = _decoded(type_, data[start : start + length])
            else:
                prefix = data[start : start + min(length, payload_prefix_bytes)].hex()
                shown = prefix + ("..." if length > payload_prefix_bytes else "")
            out.write(f"{seq}\t{type_}\t{length}\t{crc:08x}\t{name}\t{offset}\t{shown}\n")
            printed += 1
            offset += frame_bytes
    return printed
