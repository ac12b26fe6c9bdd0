"""Reading a data directory and deciding what recovery will do (shared by recovery, verify
and dump). Modifies nothing.

Torn tail or corruption? A frame is bad if its header is cut short, its magic is wrong, its
length runs past the file (or the record limit), or its CRC fails; a valid frame with an
unexpected seq is corruption outright. At the first bad frame recovery searches the rest of that
segment (every aligned offset carrying the magic, then the CRC) and every later segment for a
valid frame. If one exists, the log lost data it had made durable: WalCorruption naming file and
offset. If none exists and the bad frame is in the last segment, it is the torn tail of a write
that never completed (nothing in it was acknowledged): the tail is copied aside and trimmed. A
bad frame in an earlier segment is always corruption, since a segment is fsynced before the next
one is created. Caveat: a disk that persisted the sectors of one unsynced write out of order
could leave a valid frame after a torn one; recovery then refuses to start rather than guess.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from reservd.wal.errors import WalCorruption
from reservd.wal.format import (
    SNAPSHOT_HEAD,
    SNAPSHOT_HEAD_BYTES,
    SNAPSHOT_MAGIC,
    SNAPSHOT_VERSION,
    _SNAPSHOT_CRC_FIELDS,
    _LENGTH,
    _SEGMENT_NAME,
    _SNAPSHOT_NAME,
    _SNAPSHOT_TMP_NAME,
    FRAME_ALIGN_BYTES,
    FRAME_HEAD_BYTES,
    Record,
    Snapshot,
    _find_valid_frame,
    _frame_error,
)
from reservd.walfile import FileLayer


def _read_snapshot(path: Path, files: FileLayer) -> Snapshot:
    data = files.read_file(path)
    match = _SNAPSHOT_NAME.fullmatch(path.name)
    assert match is not None, path
    if len(data) < SNAPSHOT_HEAD_BYTES:
        raise WalCorruption(
            path, len(data),
            f"truncated snapshot header ({len(data)} of {SNAPSHOT_HEAD_BYTES} bytes)",
        )
    magic, version, crc, seq, length = SNAPSHOT_HEAD.unpack_from(data)
    if magic != SNAPSHOT_MAGIC:
        raise WalCorruption(path, 0, f"bad snapshot magic {magic!r}")
    if version != SNAPSHOT_VERSION:
        raise WalCorruption(path, 8, f"unknown snapshot version {version}")
    if seq != int(match[1]):
        raise WalCorruption(
            path, 16, f"snapshot header says seq {seq}, its name says {int(match[1])}"
        )
    if length != len(data) - SNAPSHOT_HEAD_BYTES:
        raise WalCorruption(
            path, 24, f"snapshot header says {length} payload bytes, the file holds "
            f"{len(data) - SNAPSHOT_HEAD_BYTES}"
        )
    payload = data[SNAPSHOT_HEAD_BYTES:]
    if zlib.crc32(payload, zlib.crc32(_SNAPSHOT_CRC_FIELDS.pack(seq, length))) != crc:
        raise WalCorruption(
            path, SNAPSHOT_HEAD_BYTES, "snapshot checksum mismatch (payload or header damaged)"
        )
    return Snapshot(seq=seq, payload=payload, path=path)


@dataclass(slots=True)
class _Segment:
    first_seq: int
    path: Path
    size: int  # bytes of valid frames (after trimming a torn tail)
    records: int


@dataclass(slots=True)
class _TornTail:
    path: Path
    offset: int
    reason: str
    file_bytes: int


@dataclass(slots=True)
class _Inspection:
    snapshot: Snapshot | None
    segments: list[_Segment]  # the live ones, in order, continuous
    stale_segments: list[Path]  # every record in them is covered by the snapshot
    snapshot_tmp_files: list[Path]
    last_seq: int
    torn_tail: _TornTail | None


def _inspect(directory: Path, files: FileLayer) -> _Inspection:
    """Read the whole directory and decide what recovery will do; raise WalCorruption for what
    it must refuse. Modifies nothing."""
    names = files.listdir(directory)
    segment_names: list[tuple[int, str]] = []
    snapshot_names: list[tuple[int, str]] = []
    tmp_files: list[Path] = []
    for name in names:
        if match := _SEGMENT_NAME.fullmatch(name):
            segment_names.append((int(match[1]), name))
        elif match := _SNAPSHOT_NAME.fullmatch(name):
            snapshot_names.append((int(match[1]), name))
        elif _SNAPSHOT_TMP_NAME.fullmatch(name):
            tmp_files.append(directory / name)
    segment_names.sort()
    snapshot_names.sort()

    # The newest snapshot or nothing: falling back to an older one is unsafe, the segments it
    # would need may already be deleted.
    snapshot = _read_snapshot(directory / snapshot_names[-1][1], files) if snapshot_names else None
    base_seq = snapshot.seq if snapshot is not None else 0

    # Segments before the last one starting at or before base_seq + 1 hold only records the
    # snapshot covers: a deletion after a snapshot was interrupted (or not yet durable).
    start = 0
    for index, (first_seq, _) in enumerate(segment_names):
        if first_seq <= base_seq + 1:
            start = index
    stale = [directory / name for _, name in segment_names[:start]]
    live_names = segment_names[start:]

    expected_seq = base_seq + 1
    if live_names and live_names[0][0] > expected_seq:
        first_seq, name = live_names[0]
        covered = f"the snapshot ends at seq {base_seq}" if snapshot else "there is no snapshot"
        raise WalCorruption(
            directory / name, 0,
            f"records {expected_seq}..{first_seq - 1} are missing: {covered} and the first "
            "segment starts later (a segment was deleted?)",
        )
    segments: list[_Segment] = []
    torn_tail: _TornTail | None = None
    if live_names:
        expected_seq = live_names[0][0]
    for index, (first_seq, name) in enumerate(live_names):
        path = directory / name
        if first_seq != expected_seq:
            previous = live_names[index - 1][1]
            raise WalCorruption(
                path, 0,
                f"sequence gap: this segment starts at seq {first_seq} but {previous} ends at "
                f"seq {expected_seq - 1} (a segment between them is missing)",
            )
        data = files.read_file(path)
        offset = 0
        end = len(data)
        reason = ""
        while offset < end:
            reason, seq, _, frame_bytes = _frame_error(data, offset)
            if reason:
                break
            if seq != expected_seq:
                raise WalCorruption(
                    path, offset, f"record seq {seq} where {expected_seq} was expected"
                )
            expected_seq += 1
            offset += frame_bytes
        segments.append(_Segment(first_seq, path, offset, expected_seq - first_seq))
        if not reason:
            continue
        # A bad frame. If any valid frame follows it, in this segment or a later one, the log
        # lost data it had made durable: refuse. Only a bad stretch with nothing valid after it
        # is the torn tail of a write that never completed.
        follower = _find_valid_frame(data, offset + FRAME_ALIGN_BYTES)
        follower_path = path
        for _, later_name in live_names[index + 1 :]:
            if follower is not None:
                break
            follower_path = directory / later_name
            follower = _find_valid_frame(files.read_file(follower_path), 0)
        if follower is not None:
            raise WalCorruption(
                path, offset,
                f"{reason}; a valid record (seq {follower[1]}) follows at {follower_path.name} "
                f"offset {follower[0]}, so this is corruption inside the log, not a torn tail",
            )
        if index != len(live_names) - 1:
            # The log fsyncs a segment before it creates the next one, so only the last
            # segment can hold an unfinished write.
            raise WalCorruption(
                path, offset, f"{reason}; not the last segment, so this is not a torn tail"
            )
        torn_tail = _TornTail(path, offset, reason, len(data))
    last_seq = expected_seq - 1
    if last_seq < base_seq:
        where = segments[-1] if segments else None
        raise WalCorruption(
            where.path if where else directory, where.size if where else 0,
            f"the log ends at seq {last_seq} but the snapshot is at seq {base_seq}: a snapshot "
            "is only taken of durable records, so records were lost",
        )
    return _Inspection(snapshot, segments, stale, tmp_files, last_seq, torn_tail)


def _iter_records(segments: list[_Segment], files: FileLayer, after_seq: int) -> Iterator[Record]:
    for segment in segments:
        data = files.read_file(segment.path)
        offset = 0
        seq = segment.first_seq
        while offset < segment.size:
            reason, seq_read, type_, frame_bytes = _frame_error(data, offset)
            # Recovery already checked every frame; reading it back differently is a bug or a
            # disk returning different bytes.
            assert not reason and seq_read == seq, (segment.path, offset, reason, seq_read, seq)
            if seq > after_seq:
                length = _LENGTH.unpack_from(data, offset + 4)[0]
                start = offset + FRAME_HEAD_BYTES
                yield Record(seq, type_, data[start : start + length], segment.path, offset)
            seq += 1
            offset += frame_bytes
