"""A real redis-server for tests, a TCP proxy in front of it that the test controls, and a
MONITOR audit of what Redis really applied and when.

:class:`RedisServer` runs ``redis-server`` on a free loopback port in its own directory and can
pause it (SIGSTOP), resume it (SIGCONT), kill it (SIGKILL) and restart it on the same port,
with or without its data. :class:`Proxy` forwards a loopback port to it on its own thread and
loop; ``black_hole()`` stops forwarding in both directions without closing anything (bytes wait
in the buffers, as they do in a partition while TCP retransmits) and ``restore()`` delivers them
and forwards again, like asyncpg's ``_testbase/fuzzer.py``. :class:`Monitor` records every write
of a hash under a prefix that Redis executed, with Redis's own timestamp.
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
START_SECONDS_MAX = 10.0


def require_redis_server() -> str:
    """The redis-server path; a clear error (never a skip) when it is missing."""
    if not os.access(REDIS_SERVER, os.X_OK):
        raise RuntimeError(
            "redis-server is not installed: the Redis mirror tests need a real one "
            "(`./dev test` installs it; or `apt-get install redis-server`)"
        )
    return REDIS_SERVER


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ping(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """``redis-server`` on 127.0.0.1:``port`` with its files in ``directory``. ``persistent``
    turns on the append-only file (fsynced every second, and on a clean shutdown); without it
    only an explicit SAVE writes dump.rdb, which a start loads."""

    def __init__(self, directory: Path, *, persistent: bool = False) -> None:
        self.binary = require_redis_server()
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.persistent = persistent
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.process is None, "already running"
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.directory), "--logfile", "redis.log", "--save", "",
            "--daemonize", "no",
        ]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            args += ["--appendonly", "no"]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        self.starts += 1
        deadline = time.monotonic() + START_SECONDS_MAX
        while not ping(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                log_path = self.directory / "redis.log"
                tail = log_path.read_text()[-2000:] if log_path.exists() else ""
                raise RuntimeError(f"redis-server did not answer PING on {self.port}:\n{tail}")
            time.sleep(0.01)

    def stop(self) -> None:
        """Pause the process (SIGSTOP): connections stay open, nothing answers."""
        self.process.send_signal(signal.SIGSTOP)

    def cont(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.process = None

    def terminate(self) -> None:
        """A clean shutdown (SIGTERM): a persistent server flushes its append-only file."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGCONT)
        self.process.terminate()
        self.process.wait(START_SECONDS_MAX)
        self.process = None

    def restart(self, keep_data: bool) -> None:
        """Start again on the same port (shutting down cleanly first if running), with the
        data files or without them."""
        if keep_data:
            self.terminate()
        else:
            self.kill()
            for name in ("dump.rdb", "appendonly.aof", "appendonlydir"):
                path = self.directory / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        self.start()

    def close(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)
        self.kill()


class Proxy:
    """127.0.0.1:``port`` forwarded to 127.0.0.1:``backend_port``, on its own thread."""

    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._forwarding: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._main, name="redis-proxy", daemon=True)
        self._started = threading.Event()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._thread.start()
        if not self._started.wait(5):
            raise RuntimeError("the proxy did not start")

    def black_hole(self) -> None:
        """Stop forwarding both ways, closing nothing; new connections are accepted and hang."""
        self._call(self._forwarding.clear)

    def restore(self) -> None:
        """Deliver what waited and forward again."""
        self._call(self._forwarding.set)

    def close(self) -> None:
        if self.loop is not None and self.loop.is_running():
            self._call(self._shutdown)
            self._thread.join(5)

    def _call(self, function) -> None:
        async def run():
            function()

        asyncio.run_coroutine_threadsafe(run(), self.loop).result(5)

    def _main(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._serve())
        self.loop.close()

    async def _serve(self) -> None:
        self._forwarding = asyncio.Event()
        self._forwarding.set()
        self._stopped = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._started.set()
        await self._stopped.wait()
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await asyncio.sleep(0.01)

    def _shutdown(self) -> None:
        self._stopped.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            backend_reader, backend_writer = await asyncio.open_connection(
                "127.0.0.1", self.backend_port
            )
        except OSError:
            writer.close()
            return
        self._writers |= {writer, backend_writer}
        await asyncio.gather(
            self._pump(reader, backend_writer), self._pump(backend_reader, writer),
            return_exceptions=True,
        )
        for end in (writer, backend_writer):
            self._writers.discard(end)
            end.close()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        forwarding = self._forwarding
        try:
            while True:
                await forwarding.wait()
                data = await source.read(65536)
                if not data:
                    break
                await forwarding.wait()  # read just before the black hole: hold it
                sink.write(data)
                await sink.drain()
        finally:
            sink.close()


_ARGUMENT = re.compile(rb'"((?:[^"\\]|\\.)*)"')


class Monitor:
    """MONITOR on the redis-server (directly, not through a proxy), on its own thread: records
    ``(redis unix seconds, key, fields)`` for every HSET of a key starting with ``key_prefix``
    that Redis executed (inside scripts too), across restarts of the server."""

    def __init__(self, port: int, key_prefix: str) -> None:
        self.port = port
        self.key_prefix = key_prefix.encode()
        self.writes: list[tuple[float, str, dict[str, str]]] = []
        self.markers: set[str] = set()
        self.attached = 0  # MONITOR sessions started (one per server process)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="redis-monitor", daemon=True)
        self._ready = threading.Event()

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("MONITOR did not start")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def wait_marker(self, marker: str, seconds: float = 5.0) -> None:
        """Wait until MONITOR has shown ``ECHO marker`` (sent by the test after the writes it
        wants to see), so every earlier command has been recorded."""
        deadline = time.monotonic() + seconds
        while marker not in self.markers:
            if time.monotonic() > deadline:
                raise AssertionError(f"MONITOR never showed marker {marker!r}")
            time.sleep(0.01)

    def wait_attached(self, sessions: int, seconds: float = 5.0) -> None:
        deadline = time.monotonic() + seconds
        while self.attached < sessions:
            if time.monotonic() > deadline:
                raise AssertionError(f"MONITOR session {sessions} did not start")
            time.sleep(0.005)

    def _main(self) -> None:
        while not self._stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"MONITOR\r\n")
                    self._read(sock)
            except OSError:
                time.sleep(0.01)

    def _read(self, sock: socket.socket) -> None:
        buffer = b""
        while not self._stop.is_set():
            try:
                data = sock.recv(1 << 20)
            except socket.timeout:
                continue
            if not data:
                return
            buffer += data
            *lines, buffer = buffer.split(b"\r\n")
            for line in lines:
                if line == b"+OK":
                    self.attached += 1
                    self._ready.set()
                else:
                    self._line(line)

    def _line(self, line: bytes) -> None:
        # +1700000000.123456 [0 lua] "HSET" "key" "field" "value" ...
        if b'"HSET"' not in line and b'"ECHO"' not in line and b'"hset"' not in line:
            return  # cheaply: most lines are EVALSHA and HMGET
        if not line.startswith(b"+"):
            return
        stamp, _, rest = line[1:].partition(b" ")
        arguments = _ARGUMENT.findall(rest)
        if len(arguments) >= 2 and arguments[0].upper() == b"ECHO":
            self.markers.add(arguments[1].decode())
            return
        if len(arguments) < 4 or arguments[0].upper() != b"HSET":
            return
        if not arguments[1].startswith(self.key_prefix):
            return
        fields = [argument.decode() for argument in arguments[2:]]
        self.writes.append(
            (float(stamp), arguments[1].decode(), dict(zip(fields[::2], fields[1::2])))
        )
