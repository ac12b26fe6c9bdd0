"""What the write-ahead log raises."""
from __future__ import annotations

import errno
import os
from pathlib import Path

from reservd.wal.format import LOCK_NAME

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
