"""Supervision: every background task is watched, and a bug stops the daemon loudly.

A bug (a failed assertion, an exception nobody expected, a background task that dies or ends
while the daemon runs) means the in-memory state can no longer be trusted. Carrying on could
grant stock that is not there, so the daemon fails closed at once and exits: ``fail`` trips the
guard for grants and writes, logs one structured ``fatal`` line, and wakes ``serve()``, which
stops and returns EXIT_FATAL. Recovery from the log on the next start takes over: every command
in it was fully decided before it was logged, so replaying it is safe.
"""
from __future__ import annotations

import asyncio
import logging
import traceback
from typing import Any, Coroutine

from reservd.guard import Guard

log = logging.getLogger("reservd.supervisor")

# EX_SOFTWARE in sysexits.h: an internal software error.
EXIT_FATAL = 70
SOURCE = "fatal"


def _raised_at(error: BaseException) -> str | None:
    """``file:line in function`` of the innermost frame that raised ``error``."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return None
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}"


def log_fatal(error: BaseException, where: str, **fields: Any) -> str:
    """Log the one structured ``fatal`` line for ``error``; returns its ``invariant`` text."""
    invariant = f"{type(error).__name__}: {error}"
    log.critical(
        "fatal",
        extra={"invariant": invariant, "where": where, "raised_at": _raised_at(error), **fields},
    )
    return invariant


class Supervisor:
    """Owns the daemon's background tasks and its one fatal failure.

    ``failure`` is the first error given to ``fail`` (None while healthy); ``failed`` is set
    with it, for ``serve()`` to wait on.
    """

    def __init__(self, guard: Guard, *, stop_seconds_max: float = 5.0) -> None:
        """``stop_seconds_max``: how long ``stop`` waits for cancelled tasks to end."""
        self.guard = guard
        self.stop_seconds_max = stop_seconds_max
        self.failure: BaseException | None = None
        self.failed = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False

    def spawn(
        self, coro: Coroutine[Any, Any, Any], name: str, *, finishes: bool = False
    ) -> asyncio.Task:
        """Run ``coro`` as a task on the running loop and keep a reference to it until it ends.

        A task that raises calls ``fail``. So does one that returns while the daemon runs,
        unless ``finishes`` says returning is its normal end (a one-off update, say).
        Cancellation is never a failure: ``stop`` cancels.
        """
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._ended(done, finishes))
        return task

    def fail(self, error: BaseException, where: str, **fields: Any) -> None:
        """A bug: close grants and writes now, log one ``fatal`` line, make ``serve()`` exit
        with EXIT_FATAL. ``fields`` (sku, seq, ...) go into the line. Only the first failure
        is logged; later ones are consequences of it."""
        if self.failure is not None:
            return
        self.failure = error
        invariant = log_fatal(error, where, **fields)
        self.guard.trip(SOURCE, f"internal error, reservd is stopping ({invariant})",
                        blocks_writes=True)
        self.failed.set()

    def stopping(self) -> None:
        """The daemon is stopping: from now on a task that returns is not a failure (its owner
        may be ending it), one that raises still is."""
        self._stopping = True

    async def stop(self) -> None:
        """Cancel every task still running and wait for them (at most ``stop_seconds_max``;
        a task that ignores its cancellation is a bug). A task that raised has called ``fail``
        through its done callback: nothing is swallowed here."""
        self.stopping()
        # A failure while stopping may spawn one more task (a health update): cancel it too.
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            # asyncio.wait never raises for a task's exception (its done callback reported
            # it), unlike gather, which would hide all but the first.
            _, pending = await asyncio.wait(tasks, timeout=self.stop_seconds_max)
            if pending:
                names = sorted(task.get_name() for task in pending)
                self.fail(
                    RuntimeError(f"tasks {names} did not end within {self.stop_seconds_max} s "
                                 "of their cancellation"),
                    where="stop",
                )
                self._tasks.difference_update(pending)

    @property
    def tasks(self) -> int:
        """Tasks running now."""
        return len(self._tasks)

    def _ended(self, task: asyncio.Task, finishes: bool) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self.fail(error, where=f"task {task.get_name()}")
        elif not finishes and not self._stopping:
            self.fail(
                RuntimeError(f"background task {task.get_name()!r} ended while reservd runs"),
                where=f"task {task.get_name()}",
            )
