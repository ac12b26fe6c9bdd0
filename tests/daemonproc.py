"""Run `reservd serve` as a real subprocess (for SIGTERM, SIGKILL and CLI tests)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


class DaemonProcess:
    """A `reservd serve` child on an ephemeral loopback port; its JSON log lines are kept."""

    def __init__(
        self, *args: str, env: dict | None = None, wrapper: list[str] | None = None,
        launcher: list[str] | None = None,
    ):
        """``launcher``: what python runs instead of ``-m reservd`` (a test script)."""
        self.args = args
        self.launcher = launcher or ["-m", "reservd"]
        self.env = {**os.environ, **(env or {})}
        self.wrapper = wrapper or []
        self.lines: list[dict] = []
        self.process: subprocess.Popen | None = None
        self.port: int | None = None

    def start(self, timeout_seconds: float = 30) -> "DaemonProcess":
        command = [*self.wrapper, sys.executable, *self.launcher, "serve",
                   "--bind", "127.0.0.1:0", *self.args]
        self.lines = []
        self.port = None
        self.process = subprocess.Popen(
            command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=self.env, text=True
        )
        ready = threading.Event()
        threading.Thread(target=self._read, args=(self.process, ready), daemon=True).start()
        if not ready.wait(timeout_seconds):
            self.kill()
            raise RuntimeError(f"reservd did not start: {self.lines[-5:]}")
        if self.port is None:
            raise RuntimeError(f"reservd exited at start: {self.lines[-5:]}")
        return self

    def _read(self, process: subprocess.Popen, ready: threading.Event) -> None:
        for raw in process.stderr:
            try:
                entry = json.loads(raw)
            except ValueError:
                entry = {"msg": raw.rstrip()}
            self.lines.append(entry)
            if entry.get("msg") == "serving":
                self.port = entry["port"]
                ready.set()
        ready.set()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout_seconds: float = 30) -> int:
        return self.process.wait(timeout_seconds)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def logged(self, message: str) -> list[dict]:
        return [line for line in self.lines if line.get("msg") == message]


def reservd_cli(*args: str, timeout_seconds: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reservd", *args], capture_output=True, text=True,
        timeout=timeout_seconds,
    )


def wait_for(predicate, timeout_seconds: float = 10, interval_seconds: float = 0.02) -> bool:
    end = time.monotonic() + timeout_seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval_seconds)
    return predicate()


__all__ = ["DaemonProcess", "reservd_cli", "wait_for", "Path"]
