"""Every stock state in WatchStock and the Redis mirror, exact at each update's sequence: a
watcher resuming from an old sequence sees each state command's breakdown at that command, a
live one the same, the mirror's hash what GetStock says, and a restart the same again; the
breakdowns kept for the ring stay bounded (reservd.statehistory)."""
from __future__ import annotations

import redis.asyncio as aioredis
from conftest import aio, cart, eventually, running, test_config

from reservd.clock import ManualClock
from reservd.config import Config
from reservd.ledger import Ledger
from reservd.table import Table
from reservd.v1 import reservd_pb2 as pb

from test_ledger_model import RecordingLog

PREFIX = Config().redis_prefix
STATES = ("quarantine", "damaged", "quality_control", "safety_stock", "incoming")


def _states(message) -> tuple[int, ...]:
    return tuple(getattr(message, name) for name in STATES)


async def _flow(server) -> list[tuple[int, tuple[int, ...]]]:
    """State commands on "hat" between Reserves; returns (sequence, breakdown after it)."""
    admin = server.admin
    steps = []

    async def step(call, expected):
        answer = await call
        steps.append((answer.sequence, expected))

    await step(admin.ReceiveReturn(pb.ReceiveReturnRequest(
        return_id="rma-1", sku="hat", units=2)), (2, 0, 0, 0, 0))
    await step(admin.HoldStock(pb.HoldStockRequest(
        change_id="h-1", sku="hat", state="safety_stock", units=3)), (2, 0, 0, 3, 0))
    await step(server.reservations.Reserve(cart("c-1", ("hat", 1))), (2, 0, 0, 3, 0))
    await step(admin.Inspect(pb.InspectRequest(
        return_id="rma-1", sellable_units=1, damaged_units=1)), (0, 1, 0, 3, 0))
    await step(admin.HoldStock(pb.HoldStockRequest(
        change_id="h-2", sku="hat", state="quality_control", units=2)), (0, 1, 2, 3, 0))
    await step(admin.ExpectReceipt(pb.ExpectReceiptRequest(
        po_id="po-1", sku="hat", units=20)), (0, 1, 2, 3, 20))
    await step(admin.Receive(pb.ReceiveRequest(
        receipt_id="r-1", po_id="po-1", units=5)), (0, 1, 2, 3, 15))
    await step(admin.WriteOff(pb.WriteOffRequest(
        change_id="w-1", sku="hat", units=1, state="damaged")), (0, 0, 2, 3, 15))
    await step(server.reservations.Reserve(cart("c-2", ("hat", 1))), (0, 0, 2, 3, 15))
    return steps


async def _read(stream, count: int) -> list[pb.StockUpdate]:
    updates = []
    async for update in stream:
        updates.append(update)
        if len(updates) == count:
            break
    stream.cancel()
    return updates


@aio
async def test_watchers_see_each_state_at_its_sequence(tmp_path):
    config = test_config(tmp_path / "data")
    async with running(config) as server:
        start = (await server.set_stock("hat", 10)).sequence
        live = server.reservations.WatchStock(pb.WatchStockRequest(skus=["hat"]))
        first = await live.__aiter__().__anext__()
        assert first.snapshot and _states(first) == (0, 0, 0, 0, 0)
        steps = await _flow(server)
        seen_live = await _read(live, len(steps))
        # A watcher that resumes after the SetStock reads the ring behind the others.
        behind = await _read(server.reservations.WatchStock(
            pb.WatchStockRequest(skus=["hat"], from_sequence=start)), len(steps))
        for seen in (seen_live, behind):
            assert [(u.sequence, _states(u)) for u in seen] == steps
            # available = on_hand - reserved - committed - the unsellable states.
            for u in seen:
                assert u.available == u.on_hand - u.reserved - u.committed - sum(_states(u)[:4])
        stock = (await server.reservations.GetStock(pb.GetStockRequest(skus=["hat"]))).stock[0]
        assert _states(stock) == steps[-1][1]
    async with running(config) as server:  # replayed from the log
        again = await _read(server.reservations.WatchStock(
            pb.WatchStockRequest(skus=["hat"])), 1)
        assert again[0].snapshot and _states(again[0]) == steps[-1][1]


@aio
async def test_the_mirror_carries_every_state(tmp_path, redis_server):
    client = aioredis.Redis(port=redis_server.port)
    config = test_config(tmp_path / "data", redis_url=redis_server.url)
    try:
        async with running(config) as server:
            await server.set_stock("hat", 10)
            steps = await _flow(server)
            daemon = server.daemon

            async def mirrored():
                return daemon.mirror.settled_seq == daemon.ledger.seq

            await eventually(mirrored, "mirrored")
            stored = await client.hgetall(PREFIX + "stock:hat")
            assert tuple(int(stored[name.encode()]) for name in STATES) == steps[-1][1]
            assert int(stored[b"seq"]) == steps[-1][0]
    finally:
        await client.aclose()


def test_the_kept_breakdowns_are_bounded_by_the_ring():
    capacity = 64
    config = Config(watch_ring_capacity=capacity)
    ledger = Ledger(Table(ring_capacity=capacity), RecordingLog(), ManualClock(), config)
    ledger.set_stock("s", "hat", 1_000, None, "")
    for n in range(500):
        ledger.hold_stock(f"h-{n}", "hat", "safety_stock", 1 if n % 2 == 0 else -1)
    history = ledger.state_history
    assert history.entries <= capacity + 1
    # Every sequence the ring still holds is answered exactly.
    _, entries = ledger.table.changes(ledger.table.ring_tail, capacity, ledger.seq)
    for seq, sku, *_ in entries:
        held = (seq - 1) % 2  # seq 2 is hold n = 0 (+1), seq 3 n = 1 (-1), ...
        assert history.at(sku, seq) == (0, 0, 0, held, 0)


def test_the_bound_holds_across_skus():
    """A SKU whose state commands left the ring keeps at most one breakdown, even if it never
    gets another state command (the pruning is not per SKU only)."""
    capacity = 64
    config = Config(watch_ring_capacity=capacity)
    ledger = Ledger(Table(ring_capacity=capacity), RecordingLog(), ManualClock(), config)
    skus = [f"sku-{n}" for n in range(10)]
    for sku in skus:
        ledger.set_stock(f"s-{sku}", sku, 1_000, None, "")
    for sku in skus:
        for n in range(100):
            ledger.hold_stock(f"h-{sku}-{n}", sku, "safety_stock", 1)
    history = ledger.state_history
    assert history.entries <= capacity + len(skus)
    for sku in skus:  # the current breakdown, for any sequence from the ring's oldest on
        assert history.at(sku, ledger.seq) == (0, 0, 0, 100, 0)
    _, entries = ledger.table.changes(ledger.table.ring_tail, capacity, ledger.seq)
    for seq, sku, *_ in entries:
        assert history.at(sku, seq) == (0, 0, 0, 100 - (ledger.seq - seq), 0)
    # Counter changes push the state commands out of the ring; the expiry tick prunes.
    ledger.set_stock("s-other", "other", 1, None, "")
    for n in range(capacity):
        ledger.set_stock(f"s-other-{n}", "other", 2 + n, None, "")
    ledger.expire_due(100)
    assert history.entries == len(skus)
    assert all(history.at(sku, ledger.seq) == (0, 0, 0, 100, 0) for sku in skus)


def test_a_snapshot_restore_seeds_the_states():
    """After a restore, a SKU's states at a Reserve's sequence are the snapshot's (a SKU with
    nothing recorded answers no states, so the restore must record them)."""
    ledger = Ledger(Table(), RecordingLog(), ManualClock(), Config())
    ledger.set_stock("s", "hat", 10, None, "")
    ledger.set_stock("s2", "cap", 10, None, "")
    ledger.receive_return("rma-1", "hat", 2, "")
    ledger.hold_stock("h-1", "hat", "safety_stock", 3)
    ledger.expect_receipt("po-1", "cap", 7, 0)
    _, encode = ledger.snapshot_state()
    restored = Ledger(Table(), RecordingLog(), ManualClock(), Config())
    restored.restore(encode())
    restored.log.last_seq = restored.seq
    history = restored.state_history
    assert history.entries == 2
    restored.set_stock("s3", "sock", 1, None, "")
    for sku, expected in (("hat", (2, 0, 0, 3, 0)), ("cap", (0, 0, 0, 0, 7)),
                          ("sock", (0, 0, 0, 0, 0))):
        assert history.at(sku, restored.seq) == expected == restored.breakdown(sku)
        assert history.text_at(sku, restored.seq) == ",".join(map(str, expected))
