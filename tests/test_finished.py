"""The finished-record table (reservd.finished): the C table and its twin agree, and the ledger
answers finished ids from it — replays, ALREADY_EXISTS, GetReservation's lines — through
retention, log replay (an id reused after it was forgotten) and snapshots old and new."""
from __future__ import annotations

import random
import struct

import pytest
from conftest import twins

from reservd import _pyfinished, finished, finished_rows, state_codec
from reservd.clock import ManualClock
from reservd.config import Config
from reservd.finished import FinishedAdjustment, FinishedReservation
from reservd.ledger import Code, Ledger, State
from reservd.records import RecordType
from reservd.table import Table
from test_ledger_model import RecordingLog




def _random_record(rng: random.Random, key: bytes, at_ms: int) -> bytes:
    if rng.random() < 0.5:
        return finished.pack_adjustment(key, FinishedAdjustment(
            rng.getrandbits(64), rng.randrange(1 << 40), at_ms, 6, rng.randrange(1 << 32),
            1, 2, 3, 4,
        ))
    lines = tuple(
        (rng.randrange(1 << 32), rng.randrange(10**6), rng.randrange(10**6))
        for _ in range(rng.choice([1, 1, 2, 5, 100]))
    )
    return finished.pack_reservation(key, FinishedReservation(
        rng.getrandbits(64), rng.randrange(1 << 40), at_ms, rng.randint(3, 5), rng.randrange(9),
        at_ms - 5, rng.random() < 0.5, lines,
    ))


@pytest.mark.parametrize("table_class", twins(_pyfinished.FinishedTable, "_cfinished", "FinishedTable"))
def test_the_table_agrees_with_a_plain_model(table_class):
    """Adds (some replacing a kept key, as log replay does), lookups and forgetting, across
    1 MiB blocks and index growth and shrinking, against a dict and a list."""
    rng = random.Random(8)
    table = table_class()
    model: dict[bytes, bytes] = {}
    order: list[bytes] = []
    at_ms = 0
    for step in range(40_000):
        action = rng.random()
        if action < 0.6:
            at_ms += rng.randint(-2, 4)  # a clock step back stays in add order
            key = finished.reservation_key(f"id-{rng.randrange(step + 1)}")
            record = _random_record(rng, key, at_ms)
            table.add(record)
            if key in model:
                order.remove(model[key])
            model[key] = record
            order.append(record)
        elif action < 0.95:
            key = finished.reservation_key(f"id-{rng.randrange(step + 1)}")
            assert table.get(key) == model.get(key)
        else:
            horizon = at_ms - rng.randint(0, 200)
            gone = 0
            while order and struct.unpack_from("<q", order[0], 40)[0] <= horizon:
                del model[order.pop(0)[8:24]]
                gone += 1
            assert table.forget(horizon) == gone
        assert len(table) == len(model)
        assert table.reservations + table.adjustments == len(model)
        assert table.oldest_ms() == (struct.unpack_from("<q", order[0], 40)[0] if order else None)
    assert table.raw() == b"".join(order)
    assert [key for key, _ in finished.records(table.raw())] == [r[8:24] for r in order]
    table.forget(at_ms)
    assert len(table) == 0 and table.raw() == b"" and table.oldest_ms() is None
    with pytest.raises(ValueError):
        table.add(b"\x01" * 40)
    with pytest.raises(ValueError):
        table.get(b"short")


def test_keys_and_digests_in_c_are_hashlib_blake2b():
    """The C BLAKE2b (ext/reservd/blake2b.h) gives the twin's hashlib bytes: ids of every
    length around the 128-byte block, non-ASCII, empty; and the table probes by them."""
    _cfinished = pytest.importorskip("reservd._cfinished")
    rng = random.Random(3)
    ids = ["", "r", "order-l-00012345", "é", "commande-été-🛒", "x" * 127, "x" * 128,
           "x" * 129, "y" * 256, "z" * 257, "ü" * 100]
    ids += ["".join(chr(rng.randrange(32, 0x3000)) for _ in range(rng.randrange(300)))
            for _ in range(200)]
    tables = (_cfinished.FinishedTable(), _pyfinished.FinishedTable())
    for at_ms, id_ in enumerate(ids):
        assert _cfinished.reservation_key(id_) == _pyfinished.reservation_key(id_), id_
        assert _cfinished.adjustment_key(id_) == _pyfinished.adjustment_key(id_), id_
        data = id_.encode()
        assert _cfinished.payload_digest(data) == _pyfinished.payload_digest(data), id_
        record = finished.pack_adjustment(_pyfinished.adjustment_key(id_), FinishedAdjustment(
            1, 2, at_ms, int(RecordType.SET_STOCK), 5, 6, 7, 8, 9,
        ))
        for table in tables:
            table.add(record)
            assert table.adjustment(id_) == record and table.reservation(id_) is None
    for table in tables:
        with pytest.raises(TypeError):
            table.reservation(b"r")


def test_records_round_trip():
    key = finished.reservation_key("r")
    one = FinishedReservation(7, 3, 1_000, 5, 2, 900, True, ((4, 2, 2),))
    many = FinishedReservation(7, 3, 1_000, 3, 0, 900, False, ((4, 2, 0), (9, 0, 0), (1, 1, 0)))
    fewer = FinishedReservation(7, 3, 1_000, 5, 1, 900, True, ((4, 3, 1),))
    for record, size in ((one, 64), (many, 64 + 40), (fewer, 64 + 16)):
        packed = finished.pack_reservation(key, record)
        assert len(packed) == size == finished.record_size(packed)
        assert finished.unpack(packed) == (key, record)
    adjustment = FinishedAdjustment(1, 2, 3, int(RecordType.SET_STOCK), 5, 6, 7, 8, 9)
    packed = finished.pack_adjustment(finished.adjustment_key("r"), adjustment)
    assert len(packed) == 80 and finished.unpack(packed)[1] == adjustment
    # The two id spaces never share a key.
    assert finished.reservation_key("x") != finished.adjustment_key("x")


def _ledger(clock: ManualClock, log: RecordingLog | None = None, **config) -> Ledger:
    ledger = Ledger(Table(), log or RecordingLog(), clock, Config(**config))
    ledger.set_stock("count-a", "a", 10, None, "")
    ledger.set_stock("count-b", "b", 1, None, "")
    return ledger


def test_a_finished_reservation_answers_from_its_record():
    clock = ManualClock()
    ledger = _ledger(clock)
    # Partial: b grants 1 of 2; then commit fewer of a, and ship.
    held = ledger.reserve("cart", ("a", "b"), (3, 2), "web", 60, True)
    assert held.quantities == (3, 1)
    ledger.commit("cart", {"a": 2})
    shipped = ledger.fulfil("cart").reservation
    assert "cart" not in ledger.reservations and ledger.retained == 3
    view = ledger.get("cart")
    assert view == shipped and view.request is None
    assert (view.state, view.skus, view.quantities, view.committed) == (
        State.FULFILLED, ("a", "b"), (3, 1), (2, 1)
    )
    retry = ledger.reserve("cart", ("a", "b"), (3, 2), "web", 60, True)
    assert retry.replayed and retry.granted and retry.quantities == (3, 1)
    assert retry.seq == view.seq and retry.state is State.FULFILLED
    for other in (("a", "b"), (3, 1), "web", 60, True), (("a", "b"), (3, 2), "app", 60, True):
        refused = ledger.reserve("cart", *other)
        assert refused.code is Code.ALREADY_EXISTS
    assert ledger.fulfil("cart").replayed
    assert ledger.release("cart").code is Code.FAILED_PRECONDITION
    assert ledger.reserve("gone", ("a",), (1,), "", 60, False).granted
    ledger.release("gone")
    retry = ledger.reserve("gone", ("a",), (1,), "", 60, False)
    assert retry.replayed and not retry.granted and retry.quantities == (0,)
    assert retry.state is State.RELEASED and ledger.release("gone").replayed
    assert ledger.adjust_stock("count-a", "a", 1, None, "").code is Code.ALREADY_EXISTS
    again = ledger.set_stock("count-a", "a", 10, None, "")
    assert again.replayed and again.seq == 1 and again.on_hand == 10


def test_replay_rebuilds_the_same_records_when_an_id_comes_back_after_it_was_forgotten():
    """Forgetting is not logged: replay meets the id's second life while its first record is
    still kept, and the second replaces it."""
    clock = ManualClock()
    log = RecordingLog()
    ledger = _ledger(clock, log, retention_seconds=60)
    ledger.reserve("r", ("a",), (1,), "", 600, False)
    ledger.release("r")
    clock.advance(61_000)
    ledger.expire_due(100)
    assert ledger.get("r") is None and ledger.retained == 0
    assert ledger.set_stock("count-a", "a", 5, None, "").seq == 5  # a new adjustment now
    assert ledger.reserve("r", ("a",), (2,), "", 600, False).granted
    ledger.commit("r", None)
    ledger.fulfil("r")
    replica = Ledger(Table(), RecordingLog(), clock, Config(retention_seconds=60))
    for record in log.records:
        replica.replay(*record)
    assert replica.retained == 3  # count-b's record is still kept: replay forgets nothing
    replica.expire_due(100)  # the same clock forgets the same
    kept = finished_rows.snapshot_rows(
        ledger.finished.raw(), ledger.table.sku, ledger.reservations.origin_of
    )
    assert list(finished_rows.snapshot_rows(
        replica.finished.raw(), replica.table.sku, replica.reservations.origin_of
    )) == list(kept)
    assert replica.get("r") == ledger.get("r")._replace(handles=replica.get("r").handles)
    assert replica.retained == ledger.retained == 2


@pytest.mark.parametrize("version", [3, 4, 5, 6])
def test_an_older_snapshot_still_restores_its_finished_records_oldest_first(version):
    """Formats 3 to 6 kept finished reservations as reservation rows and adjustments as
    adjustment rows, in no order; with its owner row, as written before format 7."""
    rows = [
        ("held", "web", (("a",), (2,), "web", 60, False), ("a",), (2,), None, 1, 90_000, 5, 0),
        ("sold", "", (("a", "b"), (3, 1), "", 60, True), ("a",), (3,), (2,), 5, 80_000, 6, 3_000),
        ("gone", "", (("a",), (1,), "", 60, False), ("a",), (1,), None, 3, 70_000, 4, 1_000),
    ]
    adjustments = [(
        "count-a", int(RecordType.SET_STOCK), ("a", 10, None),
        ("a", 10, 0, 0, 0, 0, 1, False), 2_000,
    )]
    payload = state_codec.encode(
        7, [("a", 10, 2, 0), ("b", 5, 0, 0)], rows, adjustments, owners=[("sold", "shop")],
    )
    payload = payload[:8] + struct.pack("<I", version) + payload[12:]
    ledger = Ledger(Table(), RecordingLog(), ManualClock(), Config())
    ledger.restore(payload)
    assert (ledger.seq, ledger.live, ledger.held, ledger.retained) == (7, 1, 1, 3)
    assert [row[4] for row in finished_rows.snapshot_rows(
        ledger.finished.raw(), ledger.table.sku, ledger.reservations.origin_of
    )] == [1_000, 2_000, 3_000]
    sold = ledger.get("sold")
    assert (sold.state, sold.skus, sold.quantities, sold.committed, sold.owner) == (
        State.FULFILLED, ("a",), (3,), (2,), "shop"
    )
    assert ledger.reserve("sold", ("a", "b"), (3, 1), "", 60, True).quantities == (3, 0)
    assert ledger.reserve("gone", ("a",), (2,), "", 60, False).code is Code.ALREADY_EXISTS
    assert ledger.set_stock("count-a", "a", 10, None, "").replayed


def test_a_retry_of_a_finished_reservation_is_answered_on_every_reserve_path():
    """The finished records are probed inside the counter table's reserve call; a channel with
    a policy probes first, and so does a Reserve that would be refused (retained_max): each
    replays or says ALREADY_EXISTS, and changes nothing."""
    from reservd.channelpolicy import Policy

    clock = ManualClock()
    ledger = _ledger(clock, retained_max=4)
    ledger.reserve("gone", ("a",), (2,), "", 60, False)
    ledger.release("gone")
    seq = ledger.seq
    replay = ledger.reserve("gone", ("a",), (2,), "", 60, False)
    assert (replay.granted, replay.quantities, replay.replayed) == (False, (0,), True)
    assert ledger.reserve("gone", ("a",), (3,), "", 60, False).code is Code.ALREADY_EXISTS
    status, record, _, _ = ledger.table.reserve(
        ("a",), (1,), False, seq + 1, ledger.finished, "gone"
    )
    assert status == 3 and record == ledger.finished.reservation("gone")
    assert ledger.table.counters(ledger.table.lookup("a")) == (10, 0, 0)
    ledger.set_channel("web-policy", "web", Policy(max_units=4))
    ledger.reserve("web-gone", ("a",), (1,), "web", 60, False)
    ledger.release("web-gone")
    assert ledger.reserve("web-gone", ("a",), (1,), "web", 60, False).replayed
    assert ledger.reserve("web-gone", ("a",), (2,), "web", 60, False).code is Code.ALREADY_EXISTS
    # Two adjustments and two reservations kept: a new Reserve is refused, retries are not.
    assert ledger.reserve("new", ("a",), (1,), "", 60, False).code is Code.RESOURCE_EXHAUSTED
    assert ledger.reserve("gone", ("a",), (2,), "", 60, False).replayed
    assert ledger.reserve("gone", ("b",), (1,), "", 60, False).code is Code.ALREADY_EXISTS
    assert ledger.seq == seq + 3  # the channel change, web-gone's reserve and release
