"""Stock states and the returns flow in the ledger: quarantine, inspection, damaged, write-off;
idempotency, refusals that change nothing, replay of the log and snapshots (both tables)."""
from __future__ import annotations

import pytest

from reservd import _pytable, records
from reservd.clock import ManualClock
from reservd.config import Config
from reservd.ledger import Code, Ledger, Rejection
from reservd.records import RecordType
from reservd.stockstates import StateOutcome

from test_ledger_model import RecordingLog

try:
    from reservd import _ctable
except ImportError:
    _ctable = None

TABLES = [
    pytest.param(_ctable.Table if _ctable else None, id="c",
                 marks=pytest.mark.skipif(_ctable is None, reason="reservd._ctable not built")),
    pytest.param(_pytable.Table, id="py"),
]


@pytest.fixture(params=TABLES)
def table_class(request):
    return request.param


@pytest.fixture
def ledger(table_class):
    ledger = Ledger(table_class(), RecordingLog(), ManualClock(), Config())
    assert not isinstance(ledger.set_stock("s1", "A", 5, None, ""), Rejection)
    return ledger


def available(ledger: Ledger, sku: str) -> int:
    return ledger._available((sku,))[0]


def reserve_all(ledger: Ledger, rid: str, sku: str, units: int) -> bool:
    return ledger.reserve(rid, (sku,), (units,), "web", 60, False).granted


def test_a_returned_unit_is_not_available_before_inspection(ledger):
    outcome = ledger.receive_return("ret-1", "A", 3, "order-7")
    assert isinstance(outcome, StateOutcome)
    assert (outcome.on_hand, outcome.quarantine, outcome.damaged) == (8, 3, 0)
    assert available(ledger, "A") == 5
    assert not reserve_all(ledger, "r1", "A", 6)
    assert reserve_all(ledger, "r2", "A", 5) and available(ledger, "A") == 0
    outcome = ledger.inspect("ret-1", 2, 1)
    assert (outcome.on_hand, outcome.quarantine, outcome.damaged) == (8, 0, 1)
    assert available(ledger, "A") == 2
    # The damaged unit is never available: only the two that passed can be reserved.
    assert not reserve_all(ledger, "r3", "A", 3)
    assert reserve_all(ledger, "r4", "A", 2) and available(ledger, "A") == 0
    outcome = ledger.write_off("wo-1", "A", 1, "damaged")
    assert (outcome.on_hand, outcome.damaged, outcome.reserved) == (7, 0, 7)
    assert available(ledger, "A") == 0


def test_idempotent_by_id_and_conflicting_repeats_refused(ledger):
    first = ledger.receive_return("ret-1", "A", 2, "")
    seq = ledger.seq
    assert ledger.receive_return("ret-1", "A", 2, "") == first._replace(replayed=True)
    refused = ledger.receive_return("ret-1", "A", 3, "")
    assert isinstance(refused, Rejection) and refused.code is Code.ALREADY_EXISTS
    inspected = ledger.inspect("ret-1", 1, 1)
    assert ledger.inspect("ret-1", 1, 1) == inspected._replace(replayed=True)
    assert ledger.inspect("ret-1", 2, 0).code is Code.ALREADY_EXISTS
    written = ledger.write_off("wo-1", "A", 1, "damaged")
    assert ledger.write_off("wo-1", "A", 1, "damaged") == written._replace(replayed=True)
    assert ledger.write_off("wo-1", "A", 2, "damaged").code is Code.ALREADY_EXISTS
    assert ledger.seq == seq + 2  # repeats logged nothing


@pytest.mark.parametrize("call, code, field", [
    (lambda l: l.receive_return("ret-x", "NOPE", 1, ""), Code.NOT_FOUND, "sku"),
    (lambda l: l.receive_return("ret-x", "A", 10**12, ""), Code.FAILED_PRECONDITION, "units"),
    (lambda l: l.inspect("ret-none", 1, 0), Code.NOT_FOUND, "return_id"),
    (lambda l: l.inspect("ret-1", 1, 0), Code.FAILED_PRECONDITION, "sellable_units"),
    (lambda l: l.write_off("wo-x", "A", 1, "damaged"), Code.FAILED_PRECONDITION, "units"),
    (lambda l: l.write_off("wo-x", "A", 1, "on_hand"), Code.FAILED_PRECONDITION, "state"),
])
def test_refusals_name_the_field_and_change_nothing(ledger, call, code, field):
    ledger.receive_return("ret-1", "A", 2, "")
    seq, counters = ledger.seq, ledger.table.counters(ledger.table.lookup("A"))
    refused = call(ledger)
    assert isinstance(refused, Rejection) and (refused.code, refused.field) == (code, field)
    assert ledger.seq == seq and ledger.table.counters(ledger.table.lookup("A")) == counters
    assert ledger.states.of("A") == (2, 0, 0, 0)


def _flow(ledger: Ledger) -> None:
    ledger.receive_return("ret-1", "A", 3, "o1")
    ledger.receive_return("ret-2", "A", 2, "")
    ledger.inspect("ret-1", 1, 2)
    reserve_all(ledger, "r1", "A", 6)
    ledger.write_off("wo-1", "A", 1, "damaged")


def _state(ledger: Ledger) -> tuple:
    handle = ledger.table.lookup("A")
    return (ledger.table.counters(handle), ledger.table.unsellable(handle),
            ledger.states.of("A"), available(ledger, "A"), dict(ledger.states.returns).keys())


def test_replay_and_snapshot_rebuild_the_same_states(ledger, table_class):
    _flow(ledger)
    expected = _state(ledger)
    assert expected[:4] == ((9, 6, 0), 3, (2, 1, 0, 0), 0)
    kinds = [record_type for _, record_type, _ in ledger.log.records]
    assert kinds.count(RecordType.RECEIVE_RETURN) == 2 and RecordType.WRITE_OFF in kinds
    for _, record_type, payload in ledger.log.records:  # every new record round-trips
        command = records.decode(record_type, payload)
        if record_type == RecordType.INSPECT:
            assert records.encode_inspect(command) == payload
    replica = Ledger(table_class(), RecordingLog(), ManualClock(), Config())
    for seq, record_type, payload in ledger.log.records:
        replica.replay(seq, record_type, payload)
    assert _state(replica) == expected
    _, encode = ledger.snapshot_state()
    restored = Ledger(table_class(), RecordingLog(), ManualClock(), Config())
    restored.restore(encode())
    restored.log.last_seq = restored.seq  # a recovered WAL goes on after the snapshot
    assert _state(restored) == expected
    # Idempotency survives the snapshot: the repeat is answered, not applied again.
    again = restored.inspect("ret-1", 1, 2)
    assert isinstance(again, StateOutcome) and again.replayed
    assert restored.inspect("ret-2", 2, 0).quarantine == 0
    assert available(restored, "A") == 2


def test_the_mirror_writes_the_one_available():
    from reservd import mirrorwrite

    _, args = mirrorwrite.batch_command("t:", "apply", 1, 5, 0, 0, 1_000, [(5, "A", 9, 2, 1, 4)])
    assert args[6:12] == ["newer", 5, 9, 2, 1, 2]  # 9 - 2 - 1 - 4 unsellable


def test_incoming_is_not_on_hand_and_receipts_book_it(ledger, table_class):
    expected = ledger.expect_receipt("po-1", "A", 10, 1_800_000_000_000)
    assert (expected.incoming, expected.on_hand, expected.received) == (10, 5, 0)
    assert available(ledger, "A") == 5 and not reserve_all(ledger, "r1", "A", 6)
    first = ledger.receive("rc-1", "po-1", 4)
    assert (first.incoming, first.on_hand, first.received, first.over_received) == (6, 9, 4, 0)
    assert ledger.receive("rc-1", "po-1", 4).replayed and ledger.incoming.of("A") == 6
    assert ledger.receive("rc-1", "po-1", 5).code is Code.ALREADY_EXISTS
    over = ledger.receive("rc-2", "po-1", 8)  # 2 more than the order still expects
    assert (over.incoming, over.on_hand, over.received, over.over_received) == (0, 17, 12, 2)
    assert ledger.receive("rc-3", "po-x", 1).field == "po_id"
    assert ledger.expect_receipt("po-2", "NOPE", 1, 0).code is Code.NOT_FOUND
    ledger.expect_receipt("po-2", "A", 3, 0)
    replica = Ledger(table_class(), RecordingLog(), ManualClock(), Config())
    for seq, record_type, payload in ledger.log.records:
        replica.replay(seq, record_type, payload)
    _, encode = ledger.snapshot_state()
    restored = Ledger(table_class(), RecordingLog(), ManualClock(), Config())
    restored.restore(encode())
    for other in (replica, restored):
        assert other.incoming.of("A") == 3 and available(other, "A") == 17
        assert other.incoming.orders == ledger.incoming.orders
        assert other.incoming.receipts == ledger.incoming.receipts
