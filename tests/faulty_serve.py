"""Test-only launcher: `reservd serve` with a bug injected, to prove a bug is fatal.

``RESERVD_TEST_FAULT=OWNER.METHOD:N`` makes the N-th call of that method raise AssertionError,
as a broken invariant would: ``table.commit:3`` (the counter table, under an RPC),
``ledger.expire_due:3`` (the ledger, under the expiry task) or ``hub.on_durable:3`` (the
WatchStock hub, told by the log that a batch is durable). Arguments are `reservd`'s.
"""
from __future__ import annotations

import functools
import os
import sys

from reservd import cli, server
from reservd.ledger import Ledger
from reservd.table import Table
from reservd.watch import WatchHub


def _faulty(name: str, method, call_number: int):
    calls = 0

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == call_number:
            raise AssertionError(f"injected: call {calls} of {name} broke an invariant")
        return method(self, *args, **kwargs)

    return wrapper


def main() -> int:
    target, _, call_number = os.environ["RESERVD_TEST_FAULT"].partition(":")
    owner, name = target.split(".")
    if owner == "table":
        # The Cython table is a final type: wrap it instead of patching or subclassing it.
        method = _faulty(target, lambda table, *args: getattr(table, name)(*args),
                         int(call_number))

        class FaultyTable:
            def __init__(self, **kwargs) -> None:
                self._table = Table(**kwargs)

            def __getattr__(self, attribute: str):
                if attribute == name:
                    return lambda *args: method(self._table, *args)
                return getattr(self._table, attribute)

            def __len__(self) -> int:
                return len(self._table)

        server.Table = FaultyTable
    elif owner == "hub":
        setattr(WatchHub, name, _faulty(target, getattr(WatchHub, name), int(call_number)))
    else:
        assert owner == "ledger", owner
        setattr(Ledger, name, _faulty(target, getattr(Ledger, name), int(call_number)))
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
