"""Shared test harness: real servers on ephemeral loopback ports, real files."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import sys
from pathlib import Path

import grpc
import pytest
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from reservd.config import Config, Limits  # noqa: E402
from reservd.server import Daemon  # noqa: E402
from reservd.v1 import reservd_pb2 as pb  # noqa: E402
from reservd.v1 import reservd_pb2_grpc as pb_grpc  # noqa: E402


def aio(test):
    """Run an ``async def`` test on a fresh uvloop loop, bounded in time."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        return uvloop.run(asyncio.wait_for(test(*args, **kwargs), timeout=120))

    return wrapper


def test_config(data_dir: Path | None = None, **overrides) -> Config:
    base = dict(bind="127.0.0.1:0", data_dir=data_dir, expiry_tick_ms=10)
    base.update(overrides)
    return Config(**base)


test_config.__test__ = False  # a helper, not a test


@dataclasses.dataclass
class Running:
    daemon: Daemon
    target: str
    channel: grpc.aio.Channel
    reservations: pb_grpc.ReservationsStub
    admin: pb_grpc.AdminStub

    async def set_stock(self, sku: str, on_hand: int) -> pb.StockAdjustmentResponse:
        return await self.admin.SetStock(
            pb.SetStockRequest(sku=sku, on_hand=on_hand, adjustment_id=f"set-{sku}-{on_hand}")
        )

    async def stock(self, sku: str) -> pb.Stock:
        response = await self.reservations.GetStock(pb.GetStockRequest(skus=[sku]))
        return response.stock[0]


@contextlib.asynccontextmanager
async def running(config: Config | None = None, clock=None, wal_files=None, prepare=None):
    """A Daemon serving on 127.0.0.1:<ephemeral>, with stubs; stopped on exit. ``prepare(daemon)``
    runs before it starts (to wrap a part of it in a test)."""
    daemon = Daemon(config or test_config(), clock=clock, wal_files=wal_files)
    if prepare is not None:
        prepare(daemon)
    port = await daemon.start()
    target = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(target)
    try:
        yield Running(
            daemon, target, channel, pb_grpc.ReservationsStub(channel), pb_grpc.AdminStub(channel)
        )
    finally:
        await channel.close()
        await daemon.stop(grace_seconds=1)


async def eventually(predicate, what: str, checks_max: int = 6000) -> None:
    """Wait until ``predicate()`` (sync or async) is true, checking every 10 ms; the bound is a
    count of checks (60 s), far beyond what any healthy run needs, so a busy machine cannot
    make it flake. For states the daemon offers no event for (an expiry sweep, a metric)."""
    for _ in range(checks_max):
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"still not {what} after {checks_max} checks")


def cart(reservation_id: str, *lines: tuple[str, int], **fields) -> pb.ReserveRequest:
    return pb.ReserveRequest(
        reservation_id=reservation_id,
        lines=[pb.Line(sku=sku, quantity=quantity) for sku, quantity in lines],
        **fields,
    )


@pytest.fixture
def limits() -> Limits:
    return Limits()


def pytest_report_header(config):
    from reservd.table import EXTENSION

    return f"reservd table: {'Cython extension' if EXTENSION else 'pure-Python twin'}"


@pytest.fixture(autouse=True)
def _extension_loaded():
    """The suite tests the table it was asked to: the Cython one under RESERVD_REQUIRE_EXT=1
    (never silently its twin), the twin under RESERVD_NO_EXT=1."""
    from reservd.table import EXTENSION

    if os.environ.get("RESERVD_REQUIRE_EXT") == "1":
        assert EXTENSION, "RESERVD_REQUIRE_EXT=1 but reservd._ctable did not load"
    if os.environ.get("RESERVD_NO_EXT") == "1":
        assert not EXTENSION, "RESERVD_NO_EXT=1 but the Cython table is in use"


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server of its own on a loopback port, for one test (a module may override
    this, e.g. to parametrize persistence)."""
    from redisserver import RedisServer, require_redis_server

    try:
        require_redis_server()
    except RuntimeError as error:
        pytest.fail(str(error), pytrace=False)
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.close()


def twins(python_class, extension: str, name: str) -> list:
    """pytest params: the pure-Python twin, and the C class ``reservd.<extension>.<name>``
    (skipped when the extension is not built)."""
    import importlib

    params = [pytest.param(python_class, id="python")]
    try:
        module = importlib.import_module(f"reservd.{extension}")
    except ImportError:
        params.append(pytest.param(None, id="cython", marks=pytest.mark.skip("no extension")))
    else:
        params.append(pytest.param(getattr(module, name), id="cython"))
    return params
