"""Bounds of the stock-state tables (returns, write-offs, purchase orders, receipts): refused
RESOURCE_EXHAUSTED before anything is logged; forgotten only after retention_seconds; format-4
snapshots (without the retention times) still restore; bytes per record measured."""
from __future__ import annotations

import struct
import tracemalloc

import grpc
import pytest
from conftest import aio, running, test_config

from reservd import _pytable, state_codec
from reservd.clock import ManualClock
from reservd.config import Config
from reservd.ledger import Code, Ledger, Rejection
from reservd.records import put_str
from reservd.v1 import reservd_pb2 as pb

from test_ledger_model import RecordingLog

BOUNDED = Config(returns_max=2, write_offs_max=1, purchase_orders_max=1, receipts_max=2,
                 retention_seconds=60)


def _ledger(config: Config = BOUNDED, clock: ManualClock | None = None) -> Ledger:
    ledger = Ledger(_pytable.Table(), RecordingLog(), clock or ManualClock(), config)
    assert not isinstance(ledger.set_stock("s1", "A", 5, None, ""), Rejection)
    return ledger


def test_each_table_refuses_beyond_its_bound_and_logs_nothing():
    ledger = _ledger()
    ledger.receive_return("ret-1", "A", 2, "")
    ledger.receive_return("ret-2", "A", 1, "")
    ledger.inspect("ret-2", 0, 1)
    ledger.write_off("wo-1", "A", 1, "damaged")
    ledger.expect_receipt("po-1", "A", 5, 0)
    ledger.receive("rc-1", "po-1", 2)
    ledger.receive("rc-2", "po-1", 1)
    logged = len(ledger.log.records)
    for refused, bound in (
        (ledger.receive_return("ret-3", "A", 1, ""), "returns_max"),
        (ledger.write_off("wo-2", "A", 1, "damaged"), "write_offs_max"),
        (ledger.expect_receipt("po-2", "A", 1, 0), "purchase_orders_max"),
        (ledger.receive("rc-3", "po-1", 1), "receipts_max"),
    ):
        assert isinstance(refused, Rejection) and refused.code is Code.RESOURCE_EXHAUSTED
        assert bound in refused.message
    assert len(ledger.log.records) == logged
    # Repeats of kept ids are still answered at the bound.
    assert ledger.receive("rc-1", "po-1", 2).replayed
    assert ledger.write_off("wo-1", "A", 1, "damaged").replayed


def test_records_are_forgotten_only_after_retention_seconds():
    clock = ManualClock()
    ledger = _ledger(clock=clock)
    ledger.receive_return("ret-1", "A", 2, "")
    ledger.receive_return("ret-2", "A", 1, "")
    ledger.inspect("ret-2", 0, 1)
    ledger.write_off("wo-1", "A", 1, "damaged")
    ledger.expect_receipt("po-1", "A", 2, 0)
    ledger.receive("rc-1", "po-1", 2)  # the order is received in full: closed now
    clock.advance(59_000)
    ledger.expire_due(100)
    assert set(ledger.states.returns) == {"ret-1", "ret-2"}
    assert set(ledger.states.write_offs) == {"wo-1"} and set(ledger.incoming.receipts) == {"rc-1"}
    clock.advance(1_000)
    ledger.expire_due(100)
    # The return in quarantine is kept however old: its units are still waiting.
    assert set(ledger.states.returns) == {"ret-1"}
    assert not ledger.states.write_offs and not ledger.incoming.receipts
    assert not ledger.incoming.orders
    # Room again under the bounds.
    assert not isinstance(ledger.receive_return("ret-3", "A", 1, ""), Rejection)
    assert not isinstance(ledger.expect_receipt("po-2", "A", 1, 0), Rejection)


def test_a_format_5_snapshot_keeps_the_retention_times():
    clock = ManualClock()
    ledger = _ledger(clock=clock)
    ledger.receive_return("ret-1", "A", 1, "")
    ledger.inspect("ret-1", 1, 0)
    ledger.expect_receipt("po-1", "A", 1, 0)
    ledger.receive("rc-1", "po-1", 1)
    _, encode = ledger.snapshot_state()
    clock.advance(30_000)
    restored = Ledger(_pytable.Table(), RecordingLog(), clock, BOUNDED)
    restored.restore(encode())
    assert restored.incoming.orders == ledger.incoming.orders
    assert restored.incoming.receipts == ledger.incoming.receipts
    clock.advance(30_000)  # 60 s after the commands, not after the restore
    restored.log.last_seq = restored.seq
    restored.expire_due(100)
    assert not restored.states.returns and not restored.incoming.orders


def _format_4(seq: int) -> bytes:
    """A format-4 snapshot: stock A 7, a received order and its receipt (no times)."""
    parts = [struct.pack("<8sIq", state_codec.MAGIC, 4, seq)]
    parts.append(struct.pack("<BI", state_codec.STOCK, 1))
    put_str(parts, "A")
    parts.append(struct.pack("<qqq", 7, 0, 0))
    parts.append(struct.pack("<BI", state_codec.ORDER, 1))
    put_str(parts, "po-1")
    put_str(parts, "A")
    parts.append(struct.pack("<qqq", 2, 0, 2))
    parts.append(struct.pack("<BI", state_codec.RECEIPT, 1))
    put_str(parts, "rc-1")
    put_str(parts, "po-1")
    parts.append(struct.pack("<qq", 2, 3))
    return b"".join(parts)


def test_a_format_4_snapshot_restores_and_keeps_its_records_a_whole_window():
    clock = ManualClock()
    ledger = Ledger(_pytable.Table(), RecordingLog(), clock, BOUNDED)
    ledger.restore(_format_4(9))
    ledger.log.last_seq = ledger.seq
    assert ledger.receive("rc-1", "po-1", 2).replayed
    clock.advance(59_000)
    ledger.expire_due(100)
    assert "rc-1" in ledger.incoming.receipts and "po-1" in ledger.incoming.orders
    clock.advance(1_000)
    ledger.expire_due(100)
    assert not ledger.incoming.receipts and not ledger.incoming.orders


def test_bytes_per_record():
    """The figures in config.py's comment: Python objects kept per record (ids of 10-20
    bytes), measured with tracemalloc over 2,000 records of each kind."""
    count = 2_000
    big = Config(retention_seconds=3_600)
    ledger = _ledger(big)
    ledger.set_stock("s2", "A", 1_000_000, None, "")
    sizes = {}
    for name, run in (
        ("return", lambda i: ledger.receive_return(f"return-{i:08d}", "A", 1, f"order-{i:08d}")),
        ("inspected", lambda i: ledger.inspect(f"return-{i:08d}", 0, 1)),
        ("write_off", lambda i: ledger.write_off(f"write-off-{i:08d}", "A", 1, "damaged")),
        ("order", lambda i: ledger.expect_receipt(f"po-{i:08d}", "A", 5, 0)),
        ("receipt", lambda i: ledger.receive(f"receipt-{i:08d}", f"po-{i:08d}", 1)),
    ):
        ledger.log.records.clear()  # the recording log is the test's, not the daemon's
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(count):
            run(i)
        ledger.log.records.clear()
        sizes[name] = (tracemalloc.get_traced_memory()[0] - before) / count
        tracemalloc.stop()
    print("bytes per record:", {name: round(size) for name, size in sizes.items()})
    # Within 1 KiB each (an inspection grows its return; a receipt's figure includes the order
    # it updates): the figures config.py's comment bounds memory with.
    assert all(size < 1_024 for size in sizes.values()), sizes


def _gauges(daemon) -> dict[str, float]:
    return {family.name: family.samples[0].value for family in daemon.metrics.collect()
            if family.samples}


@aio
async def test_the_daemon_answers_resource_exhausted_and_shows_the_bound():
    async with running(test_config(returns_max=1)) as server:
        await server.set_stock("A", 5)
        await server.admin.ReceiveReturn(pb.ReceiveReturnRequest(return_id="r1", sku="A",
                                                                 units=1))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.admin.ReceiveReturn(pb.ReceiveReturnRequest(return_id="r2", sku="A",
                                                                     units=1))
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "returns_max" in caught.value.details()
        gauges = _gauges(server.daemon)
        assert (gauges["reservd_returns"], gauges["reservd_returns_max"]) == (1, 1)
        assert gauges["reservd_receipts_max"] == Config().receipts_max
        assert gauges["reservd_planned_skus_max"] == Config().replenish_skus_max
        assert gauges["reservd_ghost_stock_ratio"] == 0
        assert (await server.stock("A")).quarantine == 1


def test_planned_skus_are_bounded():
    ledger = _ledger(Config(replenish_skus_max=1))
    ledger.set_stock("s2", "B", 5, None, "")
    assert ledger.set_replenishment("A", 7, 1, 0, "A", ()).seq
    logged = len(ledger.log.records)
    refused = ledger.set_replenishment("B", 7, 1, 0, "", ())
    assert refused.code is Code.RESOURCE_EXHAUSTED and "replenish_skus_max" in refused.message
    assert len(ledger.log.records) == logged
    # Demand and counts of a further SKU are not kept (their commands are never refused).
    assert ledger.reserve("r", ("B",), (1,), "", 60, False).granted
    ledger.commit("r", None)
    ledger.set_stock("count-b", "B", 4, None, "")
    assert set(ledger.planning.plans) == {"A"} and ledger.planning.untracked == 2
