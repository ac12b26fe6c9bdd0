"""File layers for WAL fault tests: injected OS errors, and a power-loss model.

:class:`FaultyFiles` runs the real ``os`` calls and lets a test make one of them fail.

:class:`PowerLossFiles` also runs the real calls (so the WAL reads what it wrote) and keeps, per
file, what a real disk would still hold after the power is cut: the bytes as of the file's last
``fsync``/``fdatasync``, and the directory entries as of the directory's last fsync. When its
trigger fires, the "power goes out": that call and every later one raise EIO, and
:meth:`PowerLossFiles.power_loss` rewrites the directory to the durable state (optionally with
the last 512-byte sector of the unsynced bytes torn). Recovery then runs on the real files.
"""
from __future__ import annotations

import errno
import os
import random
import threading
from pathlib import Path
from typing import Callable

from reservd.walfile import FileLayer

SECTOR_BYTES = 512
LOCK_NAME = "LOCK"

Trigger = Callable[[str, str], bool]  # (operation, file name) -> fail now?


class FaultyFiles(FileLayer):
    """Real file calls; ``fail(op, errno, when)`` makes the matching call raise that error.

    A failing ``write`` first writes half its bytes and returns a short count (as a filling
    disk does), then raises on the next call. Every call is counted in ``calls``.
    """

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self._faults: list[tuple[str, int, Trigger]] = []
        self._fd_names: dict[int, str] = {}
        self._short_written: dict[int, int] = {}  # fd -> errno its next write raises
        self._lock = threading.Lock()

    def fail(self, op: str, error_number: int, when: Trigger = lambda op, name: True) -> None:
        self._faults.append((op, error_number, when))

    def _match(self, op: str, name: str) -> int | None:
        with self._lock:
            self.calls[op] = self.calls.get(op, 0) + 1
            for fault_op, error_number, when in self._faults:
                if fault_op == op and when(op, name):
                    return error_number
            return None

    def _check(self, op: str, name: str) -> None:
        error_number = self._match(op, name)
        if error_number is not None:
            raise OSError(error_number, os.strerror(error_number))

    def open(self, path, flags, mode=0o644):
        self._check("open", Path(path).name)
        fd = super().open(path, flags, mode)
        self._fd_names[fd] = Path(path).name
        return fd

    def write(self, fd, data):
        error_number = self._short_written.pop(fd, None)
        if error_number is not None:
            self._match("write", "")
            raise OSError(error_number, os.strerror(error_number))
        error_number = self._match("write", self._fd_names.get(fd, ""))
        if error_number is None:
            return super().write(fd, data)
        if len(data) > 1:
            self._short_written[fd] = error_number
            return super().write(fd, bytes(data[: len(data) // 2]))
        raise OSError(error_number, os.strerror(error_number))

    def fdatasync(self, fd):
        self._check("fdatasync", self._fd_names.get(fd, ""))
        super().fdatasync(fd)

    def fsync(self, fd):
        self._check("fsync", self._fd_names.get(fd, ""))
        super().fsync(fd)

    def close(self, fd):
        self._fd_names.pop(fd, None)
        self._short_written.pop(fd, None)
        super().close(fd)

    def fsync_dir(self, path):
        self._check("fsync_dir", Path(path).name)
        super().fsync_dir(path)

    def rename(self, src, dst):
        self._check("rename", Path(dst).name)
        super().rename(src, dst)

    def unlink(self, path):
        self._check("unlink", Path(path).name)
        super().unlink(path)


def at_call(n: int, op: str | None = None, name_prefix: str = "") -> Trigger:
    """A trigger that fires exactly once, on the n-th call (1-based) it is asked about,
    counting only calls of ``op`` (any if None) on files whose name starts with
    ``name_prefix``."""
    count = 0

    def trigger(called_op: str, name: str) -> bool:
        nonlocal count
        if (op is not None and called_op != op) or not name.startswith(name_prefix):
            return False
        count += 1
        return count == n

    return trigger


class PowerLost(OSError):
    def __init__(self) -> None:
        super().__init__(errno.EIO, "power lost (simulated)")


class PowerLossFiles(FileLayer):
    """Tracks what is durable in one directory; see the module docstring.

    ``trigger(op, name)`` is asked before each tracked call (``write``, ``fdatasync``,
    ``fsync``, ``fsync_dir``, ``rename``, ``unlink``, ``truncate``, ``open``); the first time it
    answers True the power goes out. ``fsyncs`` counts syncs of file data.
    """

    def __init__(self, directory: Path, trigger: Trigger | None = None) -> None:
        self.directory = Path(directory)
        self.trigger = trigger
        self.dead = False
        self.fsyncs = 0
        self._lock = threading.RLock()
        self._next_inode = 0
        self._entries: dict[str, int] = {}  # name -> inode, as the running program sees it
        self._durable_entries: dict[str, int] = {}  # as of the last directory fsync
        self._content: dict[int, bytearray] = {}
        self._durable_content: dict[int, bytes] = {}
        self._fd_inode: dict[int, int] = {}
        os.makedirs(self.directory, exist_ok=True)
        for name in os.listdir(self.directory):
            if name == LOCK_NAME:
                continue
            inode = self._new_inode()
            data = (self.directory / name).read_bytes()
            self._content[inode] = bytearray(data)
            self._durable_content[inode] = data
            self._entries[name] = self._durable_entries[name] = inode

    def _new_inode(self) -> int:
        self._next_inode += 1
        return self._next_inode

    def _name(self, path) -> str:
        path = Path(path)
        assert path.parent == self.directory, f"{path} is outside {self.directory}"
        return path.name

    def _step(self, op: str, name: str) -> None:
        """Called with the lock held, before a tracked call."""
        if self.dead:
            raise PowerLost()
        if self.trigger is not None and self.trigger(op, name):
            self.dead = True
            raise PowerLost()

    # -- tracked calls --------------------------------------------------------------------

    def open(self, path, flags, mode=0o644):
        with self._lock:
            name = self._name(path)
            self._step("open", name)
            fd = super().open(path, flags, mode)
            inode = self._entries.get(name)
            if inode is None:
                assert flags & os.O_CREAT, path
                inode = self._new_inode()
                self._entries[name] = inode
                self._content[inode] = bytearray()
                self._durable_content[inode] = b""
            elif flags & os.O_TRUNC:
                self._content[inode] = bytearray()
            self._fd_inode[fd] = inode
            return fd

    def write(self, fd, data):
        with self._lock:
            inode = self._fd_inode[fd]
            self._step("write", self._inode_name(inode))
            written = super().write(fd, data)
            # The WAL only appends and only writes fresh files from the start.
            self._content[inode] += bytes(data[:written])
            return written

    def _sync(self, op: str, fd: int) -> None:
        with self._lock:
            inode = self._fd_inode[fd]
            self._step(op, self._inode_name(inode))
            self._durable_content[inode] = bytes(self._content[inode])
            self.fsyncs += 1

    def fdatasync(self, fd):
        self._sync("fdatasync", fd)

    def fsync(self, fd):
        self._sync("fsync", fd)

    def close(self, fd):
        with self._lock:
            self._fd_inode.pop(fd, None)
            super().close(fd)  # even after the power loss: the test process keeps running

    def fsync_dir(self, path):
        if Path(path) != self.directory:
            return super().fsync_dir(path)
        with self._lock:
            self._step("fsync_dir", "")
            self._durable_entries = dict(self._entries)

    def rename(self, src, dst):
        with self._lock:
            self._step("rename", self._name(dst))
            super().rename(src, dst)
            self._entries[self._name(dst)] = self._entries.pop(self._name(src))

    def unlink(self, path):
        with self._lock:
            self._step("unlink", self._name(path))
            super().unlink(path)
            del self._entries[self._name(path)]

    def truncate(self, path, size):
        with self._lock:
            name = self._name(path)
            self._step("truncate", name)
            super().truncate(path, size)
            del self._content[self._entries[name]][size:]

    def read_file(self, path):
        with self._lock:
            if self.dead:
                raise PowerLost()
            return super().read_file(path)

    def _inode_name(self, inode: int) -> str:
        for name, candidate in self._entries.items():
            if candidate == inode:
                return name
        return ""

    # -- the outage -----------------------------------------------------------------------

    def restart(self) -> None:
        """After a process crash without a power loss: calls work again, the page cache (the
        real files) keeps everything, and what is durable is unchanged."""
        with self._lock:
            self.dead = False
            self.trigger = None
            self._fd_inode.clear()

    def power_loss(self, tear: random.Random | None = None) -> dict[str, int]:
        """Cut the power (if the trigger has not) and leave on disk only what was durable.

        With ``tear``, each file keeps a random part of its unsynced appended bytes, the last
        512-byte sector of which is torn (garbage, zeros, or cut short). Returns, per file,
        how many unsynced bytes were kept.
        """
        with self._lock:
            self.dead = True
            kept: dict[str, int] = {}
            for name in os.listdir(self.directory):
                if name != LOCK_NAME:
                    os.unlink(self.directory / name)
            for name, inode in self._durable_entries.items():
                data = self._durable_content[inode]
                current = bytes(self._content.get(inode, b""))
                if tear is not None and len(current) > len(data) and current.startswith(data):
                    cut = tear.randint(len(data), len(current))
                    torn_end = min(len(current), cut - cut % SECTOR_BYTES + SECTOR_BYTES)
                    style = tear.choice(("garbage", "zeros", "short"))
                    if style == "garbage":
                        torn = tear.randbytes(torn_end - cut)
                    elif style == "zeros":
                        torn = bytes(torn_end - cut)
                    else:
                        torn = b""
                    data = current[:cut] + torn
                    kept[name] = len(data) - len(self._durable_content[inode])
                (self.directory / name).write_bytes(data)
            return kept
