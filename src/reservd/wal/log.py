"""The log itself: appends, group commit, segments, snapshots written, recovery applied.

Threading: ``append``, ``commit``, ``start``, ``close``, ``snapshot`` and the durable listeners
all run on the event loop thread. Writes and syncs run on one dedicated worker thread (the
flusher's), snapshots on another, so the loop never waits for the disk.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from reservd.durable import DurableListeners
from reservd.futures import SharedFuture
from reservd.wal.errors import DataDirectoryInUse, WalFailed
from reservd.wal.format import (
    LOCK_NAME,
    _CRC,
    _FRAME_BODY,
    _LENGTH,
    _PADDING,
    _SEQ,
    _SNAPSHOT_CRC_FIELDS,
    _SNAPSHOT_NAME,
    FRAME_HEAD_BYTES,
    RECORD_MAGIC,
    RECORD_PAYLOAD_BYTES_MAX,
    SNAPSHOT_HEAD,
    SNAPSHOT_MAGIC,
    SNAPSHOT_VERSION,
    SNAPSHOTS_KEPT,
    Record,
    Snapshot,
    segment_name,
    snapshot_name,
)
from reservd.wal.scan import _inspect, _iter_records, _TornTail
from reservd.walfile import OS_FILES, FileLayer

_SEGMENT_FLAGS = os.O_WRONLY | os.O_APPEND


@dataclass(slots=True)
class WalStats:
    """Counters for metrics; mean records per fsync is ``records / fsyncs``."""

    fsyncs: int = 0  # fdatasync/fsync calls on segments (batches and rotations)
    records: int = 0  # records written by the flusher
    batches: int = 0  # flushes (one write and one fdatasync each)
    bytes: int = 0  # frame bytes written
    rotations: int = 0
    snapshots: int = 0


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
        # Told each fdatasync's seconds and each batch's records (reservd.metrics.Metrics).
        self.observer = None
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
        self.durable_listeners = DurableListeners()
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
        self.durable_listeners.add(callback)

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
            if self.observer is not None:
                self.observer.batch(last_seq - first_seq + 1)
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
        started = time.perf_counter()
        try:
            self.files.fdatasync(self._fd)
        except OSError as error:
            raise WalFailed("fdatasync", self._segments[-1][1], error) from error
        self.stats.fsyncs += 1
        if self.observer is not None:
            self.observer.fsync(time.perf_counter() - started)

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
        self.durable_listeners.notify(last_seq)

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
