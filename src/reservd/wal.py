"""The write-ahead log: opaque records, group commit, snapshots and crash recovery.

What a payload means is the ledger's business; this module only makes records durable and gives
them back in order after a crash.

Directory layout
    ``wal-<first seq, 20 digits>.log``  segments, each a stream of frames
    ``snap-<seq, 20 digits>.snap``      snapshots (the newest two are kept)
    ``snap-<seq>.snap.tmp``            a snapshot being written; removed at recovery
    ``wal-<seq>.log.broken-<offset>``   a torn tail trimmed at recovery, kept for forensics
    ``LOCK``                           flock held while a WriteAheadLog has the directory

Frame layout (little-endian; every frame starts at an 8-byte aligned offset of its segment)::

    0   u32  crc     zlib.crc32 of bytes [4, frame end): length, seq, type, magic, payload, padding
    4   u32  length  payload bytes
    8   u64  seq
    16  u32  type
    20  u32  magic   b"rWAL"
    24  payload, then 0-7 zero bytes of padding to the next 8-byte boundary

As in etcd's WAL, frames are 8-byte aligned, so the first word (crc and length) always lies
inside one 512-byte sector: a torn write leaves it whole or absent, never half-written. Unlike
etcd, the CRC is not chained over earlier records: the sequence numbers catch reordering and
loss, and an independent CRC lets recovery look past a bad frame for a later valid one.

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

Snapshot layout: a 32-byte header ``b"RSVDSNAP", u32 version, u32 crc, u64 seq, u64 length``
then the payload; the crc is zlib.crc32 of ``seq, length, payload``.

Threading: ``append``, ``commit``, ``start``, ``close``, ``snapshot`` and the durable listeners
all run on the event loop thread. Writes and syncs run on one dedicated worker thread (the
flusher's), snapshots on another, so the loop never waits for the disk.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import os
import re
import struct
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TextIO

from reservd.futures import SharedFuture
from reservd.walfile import OS_FILES, FileLayer

__all__ = [
    "DataDirectoryInUse",
    "FileLayer",
    "NotADataDirectory",
    "OS_FILES",
    "Record",
    "Snapshot",
    "VerifyReport",
    "WalCorruption",
    "WalFailed",
    "WalStats",
    "WriteAheadLog",
    "dump",
    "read",
    "verify",
]

FRAME_ALIGN_BYTES = 8
FRAME_HEAD = struct.Struct("<IIQII")  # crc, length, seq, type, magic
FRAME_HEAD_BYTES = FRAME_HEAD.size
RECORD_MAGIC_BYTES = b"rWAL"
RECORD_MAGIC = int.from_bytes(RECORD_MAGIC_BYTES, "little")
RECORD_PAYLOAD_BYTES_MAX = 16 << 20
_MAGIC_OFFSET = 20
_FRAME_BODY = struct.Struct("<IQII")  # the header after the crc: length, seq, type, magic
_CRC = struct.Struct("<I")
_LENGTH = struct.Struct("<I")
_SEQ = struct.Struct("<Q")
_PADDING = tuple(b"\0" * (-length & 7) for length in range(8))

SNAPSHOT_MAGIC = b"RSVDSNAP"
SNAPSHOT_VERSION = 1
SNAPSHOT_HEAD = struct.Struct("<8sIIQQ")  # magic, version, crc, seq, length
SNAPSHOT_HEAD_BYTES = SNAPSHOT_HEAD.size
_SNAPSHOT_CRC_FIELDS = struct.Struct("<QQ")  # seq, length
SNAPSHOTS_KEPT = 2

_SEGMENT_NAME = re.compile(r"wal-(\d{20})\.log")
_SNAPSHOT_NAME = re.compile(r"snap-(\d{20})\.snap")
_SNAPSHOT_TMP_NAME = re.compile(r"snap-(\d{20})\.snap\.tmp")
LOCK_NAME = "LOCK"

_SEGMENT_FLAGS = os.O_WRONLY | os.O_APPEND


def segment_name(first_seq: int) -> str:
    return f"wal-{first_seq:020d}.log"


def snapshot_name(seq: int) -> str:
    return f"snap-{seq:020d}.snap"


# -- Errors and values ------------------------------------------------------------------------


class WalCorruption(Exception):
    """The log or a snapshot on disk is damaged in a way recovery must not paper over."""

    def __init__(self, path: str | os.PathLike[str], offset: int, reason: str) -> None:
        self.path = Path(path)
        self.offset = offset
        self.reason = reason
        super().__init__(f"{self.path}: offset {offset}: {reason}")


class NotADataDirectory(Exception):
    """The path given to verify or dump is missing, a file, or a directory with no log in it."""

    def __init__(self, path: Path, why: str) -> None:
        self.path = path
        super().__init__(f"{path}: not a data directory ({why})")


class DataDirectoryInUse(Exception):
    """Another process (a running daemon) holds the directory's lock."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        super().__init__(
            f"{directory} is in use by another reservd (it holds {directory / LOCK_NAME}): "
            "stop that daemon first, or give this one another --data-dir"
        )


class WalFailed(Exception):
    """The disk failed under the log (EIO, ENOSPC...): it is closed for writing for good.

    ``error`` is the OSError (also ``__cause__``), ``operation`` and ``path`` say what failed.
    The daemon must be restarted; recovery then reads whatever really reached the disk.
    """

    def __init__(self, operation: str, path: str | os.PathLike[str] | None, error: BaseException):
        self.operation = operation
        self.path = None if path is None else Path(path)
        self.error = error
        self.__cause__ = error
        if isinstance(error, OSError) and error.errno is not None:
            name = errno.errorcode.get(error.errno, str(error.errno))
            what = f"{name} ({os.strerror(error.errno)})"
        else:
            what = repr(error)
        where = f" of {self.path}" if self.path is not None else ""
        super().__init__(
            f"write-ahead log failed: {operation}{where} returned {what}; nothing from that batch "
            "on is acknowledged and the log accepts no more writes (a failed fsync may have "
            "dropped the dirty pages, so it is never retried): restart the daemon to recover "
            "from what is on disk"
        )


@dataclass(frozen=True, slots=True)
class Record:
    seq: int
    type: int
    payload: bytes
    # Where the frame starts, for error messages (not part of the record's value).
    path: Path | None = field(default=None, compare=False)
    offset: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Snapshot:
    seq: int
    payload: bytes
    path: Path


@dataclass(slots=True)
class WalStats:
    """Counters for metrics; mean records per fsync is ``records / fsyncs``."""

    fsyncs: int = 0  # fdatasync/fsync calls on segments (batches and rotations)
    records: int = 0  # records written by the flusher
    batches: int = 0  # flushes (one write and one fdatasync each)
    bytes: int = 0  # frame bytes written
    rotations: int = 0
    snapshots: int = 0


# -- Framing ----------------------------------------------------------------------------------


def encode_frame(seq: int, type: int, payload: bytes) -> bytes:
    """One frame (see the module docstring). The WAL inlines this in ``append``."""
    length = len(payload)
    body = _FRAME_BODY.pack(length, seq, type, RECORD_MAGIC) + payload + _PADDING[length & 7]
    return _CRC.pack(zlib.crc32(body)) + body


def _frame_error(data: bytes, offset: int) -> tuple[str, int, int, int]:
    """Check the frame at ``offset``: ``("", seq, type, frame_bytes)`` if valid, else
    ``(reason, 0, 0, 0)``."""
    present = len(data) - offset
    if present < FRAME_HEAD_BYTES:
        return f"truncated frame header ({present} of {FRAME_HEAD_BYTES} bytes)", 0, 0, 0
    crc, length, seq, type_, magic = FRAME_HEAD.unpack_from(data, offset)
    if magic != RECORD_MAGIC:
        return "no frame here (bad magic: zeroed or garbage bytes)", 0, 0, 0
    if length > RECORD_PAYLOAD_BYTES_MAX:
        return f"length {length} exceeds the record limit {RECORD_PAYLOAD_BYTES_MAX}", 0, 0, 0
    frame_bytes = FRAME_HEAD_BYTES + length + (-length & 7)
    if frame_bytes > present:
        return f"truncated record (frame of {frame_bytes} bytes, {present} present)", 0, 0, 0
    if zlib.crc32(memoryview(data)[offset + 4 : offset + frame_bytes]) != crc:
        return "checksum mismatch", 0, 0, 0
    return "", seq, type_, frame_bytes


def _find_valid_frame(data: bytes, start: int) -> tuple[int, int] | None:
    """The first valid frame at an aligned offset >= ``start``: ``(offset, seq)``, or None."""
    start += -start & (FRAME_ALIGN_BYTES - 1)
    index = data.find(RECORD_MAGIC_BYTES, start + _MAGIC_OFFSET)
    while index != -1:
        offset = index - _MAGIC_OFFSET
        if offset % FRAME_ALIGN_BYTES == 0:
            reason, seq, _, _ = _frame_error(data, offset)
            if not reason:
                return offset, seq
        index = data.find(RECORD_MAGIC_BYTES, index + 1)
    return None


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


# -- Reading a directory (shared by recovery, verify and dump) -------------------------------


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


# -- verify and dump (the CLI's `reservd wal verify|dump DIR`) --------------------------------


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


def _data_directory(directory: Path, files: FileLayer) -> None:
    """Raise NotADataDirectory unless ``directory`` holds a lock, a segment or a snapshot."""
    try:
        names = files.listdir(directory)
    except FileNotFoundError:
        raise NotADataDirectory(directory, "it does not exist") from None
    except NotADirectoryError:
        raise NotADataDirectory(directory, "it is a file; give the directory holding it") from None
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
    _data_directory(directory, files)
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


def dump(
    directory: str | os.PathLike[str], out: TextIO, *, payload_prefix_bytes: int = 32,
    files: FileLayer = OS_FILES,
) -> int:
    """Print every record of every segment, one tab-separated line each: seq, type, length,
    crc, segment, offset, payload hex prefix. Snapshots and bad frames are ``#`` comment lines;
    after a bad frame the dump resumes at the next valid frame. Returns the records printed.
    Raises NotADataDirectory."""
    directory = Path(directory)
    _data_directory(directory, files)
    names = sorted(files.listdir(directory))
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
            prefix = data[start : start + min(length, payload_prefix_bytes)].hex()
            more = "..." if length > payload_prefix_bytes else ""
            out.write(f"{seq}\t{type_}\t{length}\t{crc:08x}\t{name}\t{offset}\t{prefix}{more}\n")
            printed += 1
            offset += frame_bytes
    return printed


# -- The log ----------------------------------------------------------------------------------


def _write_all(files: FileLayer, fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = files.write(fd, view)
        assert written > 0, written
        view = view[written:]


class WriteAheadLog:
    """Append-only record log in ``directory`` with group commit.

    Life cycle, all on the event loop thread::

        wal = WriteAheadLog(directory)
        snapshot, records = wal.recover()     # synchronous, at start-up
        ...load snapshot, replay records...
        wal.open()                            # synchronous: ready the tail segment
        await wal.start()                     # the flusher task
        wal.append(seq, type, payload); await wal.commit()
        await wal.close()

    ``ack_before_fsync`` is a TEST-ONLY fault: it resolves commit futures after the write but
    before the fdatasync, the bug etcd shipped (etcd-io/etcd#14370). It exists so the power-loss
    test can prove it detects a missing fsync. Never set it in the daemon.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        segment_bytes_max: int = 64 << 20,
        batch_bytes_max: int = 4 << 20,
        pending_bytes_max: int = 256 << 20,
        files: FileLayer = OS_FILES,
        ack_before_fsync: bool = False,
        logger: logging.Logger | None = None,
    ) -> None:
        assert segment_bytes_max > 0 and batch_bytes_max > 0 and pending_bytes_max > 0
        self.directory = Path(directory)
        self.segment_bytes_max = segment_bytes_max
        self.batch_bytes_max = batch_bytes_max
        self.pending_bytes_max = pending_bytes_max
        self.files = files
        self.ack_before_fsync = ack_before_fsync
        self.log = logger or logging.getLogger("reservd.wal")
        self.last_seq = 0
        self.durable_seq = 0
        self.failed: WalFailed | None = None
        self.stats = WalStats()
        self._recovered = False
        self._lock_fd: int | None = None
        # Segments as (first seq, path), oldest first; the flusher thread appends at rotation,
        # the snapshot thread removes from the front.
        self._segments: list[tuple[int, Path]] = []
        self._segments_lock = threading.Lock()
        self._fd: int | None = None  # the tail segment; only the flusher thread writes it
        self._segment_bytes = 0
        self._pending = bytearray()  # frames appended, not yet handed to the flusher
        self._taken_seq = 0  # last seq handed to the flusher
        self._open_future: asyncio.Future[None] | None = None  # covers everything pending
        self._inflight_future: asyncio.Future[None] | None = None  # covers the batch in flight
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._flush_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._snapshot_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._listeners: list[Callable[[int], None]] = []
        self._failure_listeners: list[Callable[[WalFailed], None]] = []

    # -- start-up -----------------------------------------------------------------------------

    def recover(self) -> tuple[Snapshot | None, Iterator[Record]]:
        """Newest valid snapshot (None if none), then every record with seq > snapshot.seq in
        order.

        Everything is checked before this returns; the iterator only reads back what was
        checked. A torn or corrupt stretch at the very end of the last segment is trimmed (its
        bytes are copied to ``<segment>.broken-<offset>`` first, and path and offset logged).
        Raises WalCorruption, naming file and offset, for: a bad frame followed by any valid
        frame (in its segment or a later one), a bad frame in a segment that is not the last, a
        missing segment or any other sequence gap, and a newest snapshot that fails its checks.
        """
        assert not self._recovered, "recover() runs once"
        files = self.files
        try:
            files.listdir(self.directory)
        except FileNotFoundError:
            files.makedirs(self.directory)
            # Its entry in the parent must be durable too, or everything inside can vanish.
            files.fsync_dir(self.directory.parent)
        if self._lock_fd is None:
            try:
                self._lock_fd = files.lock(self.directory / LOCK_NAME)
            except BlockingIOError as error:
                raise DataDirectoryInUse(self.directory) from error
        try:
            return self._recover_locked()
        except BaseException:
            # Nothing will use this log: leave it to verify, dump and the operator's tools.
            fd, self._lock_fd = self._lock_fd, None
            files.close(fd)
            raise

    def _recover_locked(self) -> tuple[Snapshot | None, Iterator[Record]]:
        files = self.files
        found = _inspect(self.directory, files)
        for path in found.snapshot_tmp_files:
            self.log.warning("removing unfinished snapshot %s", path)
            files.unlink(path)
        for path in found.stale_segments:
            self.log.info("removing %s: every record in it is covered by the snapshot", path)
            files.unlink(path)
        if found.torn_tail is not None:
            self._trim(found.torn_tail)
        self._segments = [(segment.first_seq, segment.path) for segment in found.segments]
        self._segment_bytes = found.segments[-1].size if found.segments else 0
        self.last_seq = self.durable_seq = self._taken_seq = found.last_seq
        self._recovered = True
        snapshot = found.snapshot
        self.log.info(
            "recovered %s: snapshot seq %s, %d segments, last seq %d", self.directory,
            snapshot.seq if snapshot else None, len(found.segments), found.last_seq,
        )
        return snapshot, _iter_records(found.segments, files, snapshot.seq if snapshot else 0)

    def _trim(self, tail: _TornTail) -> None:
        """Cut the torn tail off the last segment, after copying it aside (as etcd's repair)."""
        files = self.files
        data = files.read_file(tail.path)
        assert len(data) == tail.file_bytes, (tail.path, len(data), tail.file_bytes)
        broken = tail.path.with_name(f"{tail.path.name}.broken-{tail.offset}")
        fd = files.open(broken, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            _write_all(files, fd, memoryview(data)[tail.offset :])
            files.fsync(fd)
        finally:
            files.close(fd)
        files.truncate(tail.path, tail.offset)
        fd = files.open(tail.path, os.O_WRONLY)
        try:
            files.fsync(fd)
        finally:
            files.close(fd)
        files.fsync_dir(self.directory)
        self.log.warning(
            "trimmed the torn tail of %s at offset %d (%d bytes: %s); the bytes are kept in %s",
            tail.path, tail.offset, tail.file_bytes - tail.offset, tail.reason, broken,
        )

    def open(self) -> None:
        """Ready the tail segment for appends (synchronous, at start-up, after recover())."""
        assert self._recovered, "recover() before open()"
        assert self._fd is None, "open() runs once"
        files = self.files
        if self._segments:
            first_seq, path = self._segments[-1]
            self._fd = files.open(path, _SEGMENT_FLAGS)
            # After a process crash the last batch may be in the page cache only. Recovery has
            # handed it out as durable, so make it so before anything is built on it.
            files.fdatasync(self._fd)
        else:
            path = self.directory / segment_name(self.last_seq + 1)
            self._fd = files.open(path, _SEGMENT_FLAGS | os.O_CREAT | os.O_EXCL)
            files.fsync_dir(self.directory)
            self._segments = [(self.last_seq + 1, path)]
            self._segment_bytes = 0

    async def start(self) -> None:
        """Start the flusher task on the running loop."""
        assert self._fd is not None, "open() before start()"
        assert self._task is None, "start() runs once"
        self._flush_executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="reservd-wal"
        )
        self._snapshot_executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="reservd-snapshot"
        )
        self._task = asyncio.get_running_loop().create_task(
            self._flusher(), name="reservd-wal-flusher"
        )

    def add_durable_listener(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(durable_seq)`` on the loop after each batch becomes durable."""
        self._listeners.append(callback)

    def add_failure_listener(self, callback: Callable[[WalFailed], None]) -> None:
        """Call ``callback(failure)`` on the loop once, when the log fails for good."""
        self._failure_listeners.append(callback)

    # -- the hot path -------------------------------------------------------------------------

    def append(self, seq: int, type: int, payload: bytes) -> None:
        """Frame the record into the current batch: in memory, synchronous, no syscall.

        ``seq`` must be ``last_seq + 1``. Raises WalFailed once the log has failed, so callers
        should check ``failed`` before they apply a mutation they would then have to log.
        """
        if self.failed is not None:
            raise WalFailed(self.failed.operation, self.failed.path, self.failed.error)
        assert seq == self.last_seq + 1, f"append of seq {seq} after {self.last_seq}"
        length = len(payload)
        assert length <= RECORD_PAYLOAD_BYTES_MAX, length
        body = _FRAME_BODY.pack(length, seq, type, RECORD_MAGIC) + payload + _PADDING[length & 7]
        pending = self._pending
        pending += _CRC.pack(zlib.crc32(body))
        pending += body
        self.last_seq = seq
        if not self._wakeup.is_set():
            self._wakeup.set()

    def commit(self) -> asyncio.Future[None]:
        """A future resolved when everything appended so far is durable, rejected with WalFailed
        if its batch or an earlier one failed. Callers in the same batch share one future."""
        if self.failed is not None:
            future = asyncio.get_running_loop().create_future()
            future.set_exception(self.failed)
            return future
        if self.last_seq > self._taken_seq:
            if self._open_future is None:
                self._open_future = SharedFuture(loop=asyncio.get_running_loop())
            return self._open_future
        if self.last_seq > self.durable_seq:
            if self._inflight_future is None:
                self._inflight_future = SharedFuture(loop=asyncio.get_running_loop())
            return self._inflight_future
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    @property
    def pending_bytes(self) -> int:
        """Bytes appended and not yet handed to the disk."""
        return len(self._pending)

    @property
    def backlogged(self) -> bool:
        """True when the disk is behind by ``pending_bytes_max``: refuse new mutations (before
        applying them) until it catches up. ``append`` itself never refuses."""
        return len(self._pending) >= self.pending_bytes_max

    # -- the flusher --------------------------------------------------------------------------

    async def _flusher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            # A flush starts as soon as there is something and none is in flight: a lone
            # request is not held back, and what arrives during a flush is the next batch.
            while self._pending and self.failed is None:
                await self._flush_once(loop)
            if self._closing or self.failed is not None:
                return

    def _take(self) -> tuple[bytes | bytearray, int, int, asyncio.Future[None] | None]:
        """Hand the next batch to the flusher: all pending frames, or as many whole frames as
        fit in batch_bytes_max (at least one)."""
        pending = self._pending
        first_seq = self._taken_seq + 1
        if len(pending) <= self.batch_bytes_max:
            self._pending = bytearray()
            future, self._open_future = self._open_future, None
            self._taken_seq = self.last_seq
            return pending, first_seq, self.last_seq, future
        offset = 0
        last_offset = 0
        while offset < len(pending):
            length = _LENGTH.unpack_from(pending, offset + 4)[0]
            frame_bytes = FRAME_HEAD_BYTES + length + (-length & 7)
            if offset > 0 and offset + frame_bytes > self.batch_bytes_max:
                break
            last_offset = offset
            offset += frame_bytes
        last_seq = _SEQ.unpack_from(pending, last_offset + 8)[0]
        data = bytes(pending[:offset])
        del pending[:offset]
        self._taken_seq = last_seq
        # The open future also covers what stays pending, so it stays with it.
        return data, first_seq, last_seq, None

    async def _flush_once(self, loop: asyncio.AbstractEventLoop) -> None:
        data, first_seq, last_seq, future = self._take()
        if future is not None:
            assert self._inflight_future is None
            self._inflight_future = future
        try:
            if self.ack_before_fsync:
                await loop.run_in_executor(self._flush_executor, self._write, data, first_seq)
                self._durable(first_seq, last_seq, len(data))
                await loop.run_in_executor(self._flush_executor, self._sync)
            else:
                await loop.run_in_executor(
                    self._flush_executor, self._write_and_sync, data, first_seq
                )
                self._durable(first_seq, last_seq, len(data))
        except WalFailed as failure:
            self._fail(failure)
        except BaseException as error:
            # A bug, not a disk error: still fail closed, and say so loudly.
            self.log.exception("write-ahead log flusher crashed")
            self._fail(WalFailed("flush (internal error)", None, error))
            if not isinstance(error, Exception):
                raise

    def _write(self, data: bytes | bytearray, first_seq: int) -> None:
        """Flusher thread: rotate if the batch would overflow the segment, then write it."""
        if self._segment_bytes > 0 and self._segment_bytes + len(data) > self.segment_bytes_max:
            self._rotate(first_seq)
        path = self._segments[-1][1]
        try:
            _write_all(self.files, self._fd, data)
        except OSError as error:
            raise WalFailed("write", path, error) from error
        self._segment_bytes += len(data)

    def _sync(self) -> None:
        """Flusher thread: fdatasync the tail segment. Never retried: after a failed fsync the
        kernel may have dropped the dirty pages and a retry could report success."""
        try:
            self.files.fdatasync(self._fd)
        except OSError as error:
            raise WalFailed("fdatasync", self._segments[-1][1], error) from error
        self.stats.fsyncs += 1

    def _write_and_sync(self, data: bytes | bytearray, first_seq: int) -> None:
        self._write(data, first_seq)
        self._sync()

    def _rotate(self, first_seq: int) -> None:
        """Flusher thread: fsync and close the full segment, create the next, fsync the
        directory, so a segment is complete on disk before any later one exists."""
        files = self.files
        old_path = self._segments[-1][1]
        try:
            files.fsync(self._fd)
        except OSError as error:
            raise WalFailed("fsync", old_path, error) from error
        self.stats.fsyncs += 1
        fd, self._fd = self._fd, None
        try:
            files.close(fd)
        except OSError as error:
            raise WalFailed("close", old_path, error) from error
        path = self.directory / segment_name(first_seq)
        try:
            self._fd = files.open(path, _SEGMENT_FLAGS | os.O_CREAT | os.O_EXCL)
        except OSError as error:
            raise WalFailed("create", path, error) from error
        try:
            files.fsync_dir(self.directory)
        except OSError as error:
            raise WalFailed("directory fsync", self.directory, error) from error
        with self._segments_lock:
            self._segments.append((first_seq, path))
        self._segment_bytes = 0
        self.stats.rotations += 1

    def _durable(self, first_seq: int, last_seq: int, nbytes: int) -> None:
        assert last_seq >= self.durable_seq, (last_seq, self.durable_seq)
        self.durable_seq = last_seq
        stats = self.stats
        stats.records += last_seq - first_seq + 1
        stats.batches += 1
        stats.bytes += nbytes
        future, self._inflight_future = self._inflight_future, None
        if future is not None and not future.done():
            future.set_result(None)
        for callback in self._listeners:
            try:
                callback(last_seq)
            except Exception:
                self.log.exception("durable listener %r failed", callback)

    def _fail(self, failure: WalFailed) -> None:
        if self.failed is not None:
            return
        self.failed = failure
        self.log.error("%s", failure, exc_info=failure.error)
        self._pending = bytearray()
        for future in (self._inflight_future, self._open_future):
            if future is not None and not future.done():
                future.set_exception(failure)
        self._inflight_future = self._open_future = None
        for callback in self._failure_listeners:
            try:
                callback(failure)
            except Exception:
                self.log.exception("failure listener %r failed", callback)

    # -- snapshots ----------------------------------------------------------------------------

    async def snapshot(self, seq: int, payload: bytes) -> Path:
        """Write ``snap-<seq>.snap`` durably in a worker thread, then delete the segments whose
        records are all <= seq and the snapshots older than the newest two.

        The caller guarantees ``payload`` is the state after applying ``seq``. Records up to
        ``seq`` are made durable first, so a snapshot is never ahead of the log. Raises the
        OSError if writing the snapshot fails (the log itself carries on), WalFailed if the log
        has failed.
        """
        assert self._snapshot_executor is not None, "start() before snapshot()"
        assert 0 < seq <= self.last_seq, (seq, self.last_seq)
        if self.durable_seq < seq:
            await self.commit()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._snapshot_executor, self._write_snapshot, seq, payload
        )

    def _write_snapshot(self, seq: int, payload: bytes) -> Path:
        """Snapshot thread: tmp file, write, fsync, rename, fsync dir; only then delete."""
        files = self.files
        final = self.directory / snapshot_name(seq)
        tmp = final.with_name(final.name + ".tmp")
        crc = zlib.crc32(payload, zlib.crc32(_SNAPSHOT_CRC_FIELDS.pack(seq, len(payload))))
        head = SNAPSHOT_HEAD.pack(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, crc, seq, len(payload))
        fd = files.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            _write_all(files, fd, head)
            _write_all(files, fd, payload)
            files.fsync(fd)
        except BaseException:
            files.close(fd)
            try:
                files.unlink(tmp)
            except OSError:
                pass
            raise
        files.close(fd)
        files.rename(tmp, final)
        files.fsync_dir(self.directory)
        # The snapshot is durable: the records it covers are no longer needed.
        with self._segments_lock:
            segments = list(self._segments)
        doomed = [
            path
            for index, (_, path) in enumerate(segments[:-1])
            if segments[index + 1][0] <= seq + 1
        ]
        for path in doomed:  # oldest first, so an interruption never leaves a gap
            files.unlink(path)
            with self._segments_lock:
                assert self._segments[0][1] == path, (self._segments[0], path)
                del self._segments[0]
        snapshots = sorted(
            int(match[1]) for name in files.listdir(self.directory)
            if (match := _SNAPSHOT_NAME.fullmatch(name))
        )
        for old_seq in snapshots[:-SNAPSHOTS_KEPT]:
            files.unlink(self.directory / snapshot_name(old_seq))
        self.stats.snapshots += 1
        self.log.info("snapshot %s written; %d segments deleted", final, len(doomed))
        return final

    # -- shutdown -----------------------------------------------------------------------------

    async def abandon(self) -> None:
        """Close without writing what is pending: after a fatal error, the bug may have produced
        it, and none of it was acknowledged. A batch already being written completes."""
        self._pending = bytearray()
        future, self._open_future = self._open_future, None
        if future is not None and not future.done():
            future.set_exception(
                WalFailed("abandon", None, RuntimeError("reservd stopped after a fatal error"))
            )
        await self.close()

    async def close(self) -> None:
        """Flush what is pending, stop the flusher, close files. Safe after a failure."""
        if self._pending and self._task is None and self._fd is not None and self.failed is None:
            await self.start()
        if self._task is not None:
            self._closing = True
            self._wakeup.set()
            await self._task
            self._task = None
        for executor in (self._flush_executor, self._snapshot_executor):
            if executor is not None:
                executor.shutdown(wait=True)
        self._flush_executor = self._snapshot_executor = None
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                self.files.close(fd)
            except OSError as error:
                self.log.warning("closing the tail segment failed: %s", error)
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            self.files.close(fd)

