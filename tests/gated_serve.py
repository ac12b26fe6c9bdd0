"""Run a command line of reservd with its WAL behind a gate: while the gate file exists, every
write of the log waits, as on a disk that has stopped taking writes. Nothing is in the page
cache then, so a kill -9 loses the records still waiting, as a power cut would.

    python tests/gated_serve.py GATE_FILE python -m reservd serve ...

It is a wrapper for :class:`daemonproc.DaemonProcess` (``wrapper=[...]``), like fiu-run or
faketime: the daemon is the real ``reservd serve``; only the default file layer's ``write``
is gated (the WAL's file-layer seam, reservd.walfile).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from reservd import walfile

GATE_POLL_SECONDS = 0.002


def install(gate: Path) -> None:
    layer = walfile.OS_FILES
    write = layer.write

    def gated_write(fd, data):
        while gate.exists():  # in the WAL's flusher thread: the event loop runs on
            time.sleep(GATE_POLL_SECONDS)
        return write(fd, data)

    layer.write = gated_write


def main() -> int:
    gate, command = Path(sys.argv[1]), sys.argv[2:]
    # command: [python, "-m", "reservd", *arguments]
    assert command[1:3] == ["-m", "reservd"], command
    install(gate)
    from reservd.cli import main as reservd_main

    return reservd_main(command[3:])


if __name__ == "__main__":
    sys.exit(main())
