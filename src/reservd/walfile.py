"""The file layer under the write-ahead log: every OS call the WAL makes on files.

It is a seam, not an abstraction: :class:`FileLayer` is the real thing (``os.*``), and tests
subclass it to inject faults (EIO on ``fdatasync``, ENOSPC on ``write``) or to model a power
loss (``tests/walfaults.py`` keeps what was written but not yet synced and drops it). The WAL
calls these methods from its worker threads as well as from the event loop thread, so a
subclass must be thread-safe.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

PathLike = str | os.PathLike[str]


class FileLayer:
    """The OS calls of the WAL, one method per call, with ``os`` semantics (errors are OSError)."""

    def open(self, path: PathLike, flags: int, mode: int = 0o644) -> int:
        """Open a file and return its descriptor (``O_CLOEXEC`` is always added)."""
        return os.open(path, flags | os.O_CLOEXEC, mode)

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        """Write once; return the byte count written, which may be short."""
        return os.write(fd, data)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def fsync_dir(self, path: PathLike) -> None:
        """Make the directory's entries (creates, renames, unlinks) durable."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src: PathLike, dst: PathLike) -> None:
        os.rename(src, dst)

    def unlink(self, path: PathLike) -> None:
        os.unlink(path)

    def truncate(self, path: PathLike, size: int) -> None:
        os.truncate(path, size)

    def read_file(self, path: PathLike) -> bytes:
        return Path(path).read_bytes()

    def listdir(self, path: PathLike) -> list[str]:
        return os.listdir(path)

    def makedirs(self, path: PathLike) -> None:
        os.makedirs(path, exist_ok=True)

    def lock(self, path: PathLike) -> int:
        """Take an exclusive, non-blocking ``flock`` on ``path`` (created if missing) and return
        the descriptor holding it; ``close`` releases it. BlockingIOError if another holder has
        it: two daemons appending to one log would interleave records."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        return fd


OS_FILES = FileLayer()
