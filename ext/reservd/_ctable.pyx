# cython: language_level=3
"""The SKU counter table in C: reservd.table.CounterTable over int64 counters (units: stock items).

reservd/_pytable.py is the pure-Python twin: it must keep the same behaviour and exceptions
(tests/test_table.py runs both side by side against a reference model).

Layout. A SKU lives in shard ``hash(sku) & (shards - 1)``, at a slot of that shard: the shard's
C index maps sku -> slot (open addressing on the str hash; a Python dict would cost a slot and
an int object per SKU, ~80 bytes), its name arena holds each SKU as UTF-8 (a str is made when
one is asked for: ~16 bytes kept instead of a ~64-byte str), and its C array of row_t holds the
counters.
A handle is ``slot << shard_bits | shard`` and stays valid for the table's life (rows are never
removed). The shard is chosen with Python's str hash because a str caches it, so the index
lookup that follows hashes nothing again; the hash is salted per process, so handles and the order of
items() are deterministic within one process only, which is all handles promise.

Bulk mutations (reserve, release, commit, uncommit, fulfil) run in three phases:

1. resolve: every line becomes C integers (handle, amounts) in a scratch buffer. This is the only
   phase that touches Python objects, hence the only one that raises on bad arguments; it changes
   no counter.
2. check: pure C. Each line is checked against its row minus what the call's earlier lines take
   (row_t.pending), so a SKU repeated within one call is checked against the counters as the
   earlier lines would leave them. Pending is cleared again before phase 3 or before failing.
3. apply: pure C. Counters change and one change entry is appended per line that changed its SKU,
   holding the counters right after that line.

Check and apply run with no Python code in between, so no caller can see a partial application.

Errors: a bad handle is IndexError; a non-int (a float included) is TypeError; a SKU with no
UTF-8 form (a lone surrogate; validation refuses them first) UnicodeEncodeError on ensure; an
int outside int64 OverflowError; sequences of different lengths ValueError. Amounts a correct ledger never
passes (negative, a reserve quantity below 1, committed above held, a mutation that would take a
counter below zero, a seq older than the newest change) are bugs and raise AssertionError, naming
the SKU and its counters where there is one, with nothing applied. These checks are always on:
they are a few comparisons per line. The RESERVD_DEBUG build (setup.py) adds a whole-table scan
after every mutation.
"""

cimport cython
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.ref cimport PyObject, Py_INCREF
from cpython.unicode cimport PyUnicode_DecodeUTF8
from cpython.sequence cimport PySequence_Fast, PySequence_Fast_GET_ITEM, PySequence_Fast_GET_SIZE
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from libc.stdint cimport INT64_MAX, INT64_MIN, int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memcmp, memcpy

from reservd._cfinished cimport FinishedTable

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object text, Py_ssize_t* size) except NULL

cdef extern from *:
    """
    #ifndef RESERVD_DEBUG
    #define RESERVD_DEBUG 0
    #endif
    """
    # A C macro, so the C compiler drops the debug scans from a normal build (setup.py defines
    # it for RESERVD_DEBUG=1).
    const bint RESERVD_DEBUG


RESERVE_OK = 0
RESERVE_INSUFFICIENT = 1
RESERVE_UNKNOWN_SKU = 2
RESERVE_FINISHED = 3

SHARDS_MAX = 1 << 16
RING_CAPACITY_MAX = 1 << 24  # entries of 40 bytes: at most 640 MiB

cdef enum:
    _ROWS_INITIAL = 16  # rows of a shard's first array
    _INDEX_INITIAL = 16  # entries of a shard's first index

cdef enum:
    # _bulk operations
    _RELEASE = 0
    _COMMIT = 1
    _UNCOMMIT = 2
    _FULFIL = 3


cdef inline int64_t _int64(object value, str name) except? -1:
    # Cython would also accept a float (through __int__); the twin and the protocol take ints only.
    if not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return value


cdef object _lines(object values, str name):
    """``values`` as a list or tuple (PySequence_Fast) so lines are read by index, unchecked."""
    # A str is a sequence of characters: reserve("SKU-1", ...) would reserve SKUs "S", "K", ...
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of lines, not {type(values).__name__}")
    return PySequence_Fast(values, b"lines must be a sequence")


cdef inline object _line(object lines, Py_ssize_t i):
    return <object>PySequence_Fast_GET_ITEM(lines, i)


cdef inline int64_t _available(const row_t* row) noexcept:
    # reserved + committed never exceeds INT64_MAX (reserve grants at most on_hand - both, commit
    # moves at most what it takes, restore checks it), so neither step can overflow; unsellable
    # is bounded by the ledger (every unit entering it entered on_hand, <= on_hand_max).
    return row.on_hand - (row.reserved + row.committed) - row.unsellable


cdef inline bint _row_ok(const row_t* row) noexcept:
    return row.on_hand >= 0 and row.reserved >= 0 and row.committed >= 0 and row.unsellable >= 0


cdef tuple _int_tuple(const int64_t* values, Py_ssize_t n):
    cdef tuple result = PyTuple_New(n)
    cdef object item
    cdef Py_ssize_t i
    for i in range(n):
        item = values[i]
        Py_INCREF(item)  # PyTuple_SET_ITEM steals the reference
        PyTuple_SET_ITEM(result, i, item)
    return result


cdef int64_t* _scratch(Py_ssize_t n, Py_ssize_t columns) except NULL:
    """Per-call buffer of ``columns`` int64 columns of n lines (n >= 1); PyMem_Free it."""
    cdef int64_t* buffer = <int64_t*>PyMem_Malloc(n * columns * sizeof(int64_t))
    if buffer == NULL:
        raise MemoryError()
    return buffer


cdef int _debug_check(Table table) except -1:
    """Whole-table scan: row invariants, dict/list/array agreement, ring seq order."""
    cdef Py_ssize_t s, slot, total = 0
    cdef const row_t* row
    cdef int64_t position
    for s in range(table.shards):
        assert table._shard[s].count <= table._shard[s].capacity, s
        total += table._shard[s].count
        for slot in range(table._shard[s].count):
            row = &table._shard[s].rows[slot]
            assert _row_ok(row) and row.pending == 0, (table.sku(slot << table._shard_bits | s), row[0])
            assert table.lookup(table.sku(slot << table._shard_bits | s)) == slot << table._shard_bits | s, (s, slot)
    assert total == table._count, (total, table._count)
    position = max(0, table._head - table._ring_capacity)
    while position + 1 < table._head:
        assert (table._ring[position & table._ring_mask].seq
                <= table._ring[(position + 1) & table._ring_mask].seq), position
        position += 1
    return 0


@cython.final
cdef class Table:
    """Sharded SKU -> (on_hand, reserved, committed) counters with a bounded change ring.

    ``shards`` (a power of two up to SHARDS_MAX) spreads SKUs over per-shard dicts and arrays so
    no single array or dict grows huge; ``ring_capacity`` (a power of two up to
    RING_CAPACITY_MAX) is how many change entries are retained, in entries.
    """

    def __cinit__(self, shards=64, ring_capacity=65536):
        cdef int64_t shard_count = _int64(shards, "shards")
        cdef int64_t capacity = _int64(ring_capacity, "ring_capacity")
        if shard_count < 1 or shard_count > SHARDS_MAX or shard_count & (shard_count - 1):
            raise ValueError(f"shards must be a power of two in [1, {SHARDS_MAX}], not {shards}")
        if capacity < 1 or capacity > RING_CAPACITY_MAX or capacity & (capacity - 1):
            raise ValueError(
                f"ring_capacity must be a power of two in [1, {RING_CAPACITY_MAX}], "
                f"not {ring_capacity}"
            )
        self.shards = shard_count
        self._shard_bits = 0
        while (1 << self._shard_bits) < shard_count:
            self._shard_bits += 1
        self._shard_mask = shard_count - 1
        self._count = 0
        self._ring_capacity = capacity
        self._ring_mask = capacity - 1
        self._head = 0
        self._seq_last = INT64_MIN
        # calloc: every shard starts with rows NULL, count and capacity 0, so __dealloc__ is
        # safe however far this gets.
        self._shard = <shard_t*>calloc(shard_count, sizeof(shard_t))
        if self._shard == NULL:
            raise MemoryError()
        self._ring = <entry_t*>calloc(capacity, sizeof(entry_t))
        if self._ring == NULL:
            raise MemoryError()

    def __dealloc__(self):
        cdef Py_ssize_t s
        if self._shard != NULL:
            for s in range(self.shards):
                free(self._shard[s].rows)
                free(self._shard[s].index)
                free(self._shard[s].names)
                free(self._shard[s].name_at)
            free(self._shard)
        free(self._ring)

    def __len__(self):
        """Number of SKUs."""
        return self._count

    # -- internals --------------------------------------------------------------------------

    cdef int64_t _find(self, object sku) except -2:
        """The handle of ``sku``, or -1 if unknown."""
        cdef Py_ssize_t shard
        cdef uint64_t hash_value, entry, i, tag
        cdef const shard_t* sh
        cdef const char* utf8 = NULL
        cdef const char* name
        cdef Py_ssize_t utf8_bytes = 0
        cdef uint32_t name_bytes
        # Exactly str: its hash and equality are C code, so resolving runs no Python code.
        if type(sku) is not str:
            raise TypeError(f"sku must be a str, not {type(sku).__name__}")
        hash_value = <uint64_t>hash(sku)
        shard = hash_value & self._shard_mask
        sh = &self._shard[shard]
        if sh.index == NULL:
            return -1
        tag = hash_value >> 32
        i = (hash_value >> self._shard_bits) & sh.index_mask
        while True:
            entry = sh.index[i]
            if entry == 0:
                return -1
            if entry >> 32 == tag:
                if utf8 == NULL:
                    # No copy for an ASCII str (its data is its UTF-8).
                    utf8 = PyUnicode_AsUTF8AndSize(sku, &utf8_bytes)
                name = sh.names + sh.name_at[(entry & 0xFFFFFFFF) - 1]
                memcpy(&name_bytes, name, 4)
                if name_bytes == utf8_bytes and memcmp(name + 4, utf8, name_bytes) == 0:
                    return (<int64_t>((entry & 0xFFFFFFFF) - 1)) << self._shard_bits | shard
            i = (i + 1) & sh.index_mask

    cdef int _index_slot(self, Py_ssize_t s, uint64_t hash_value, Py_ssize_t slot) except -1:
        """Enter ``slot`` (whose sku hashes to ``hash_value``) in shard ``s``'s index, growing it
        (doubling, rehashing every name) beyond 3/4 full."""
        cdef shard_t* shard = &self._shard[s]
        cdef uint64_t capacity = shard.index_mask + 1 if shard.index != NULL else 0
        cdef uint64_t* index
        cdef uint64_t i
        cdef Py_ssize_t other
        if slot >= 0xFFFFFFFF:
            raise OverflowError("a shard holds at most 2^32 - 2 SKUs")
        if (<uint64_t>slot + 1) * 4 > capacity * 3:
            capacity = capacity * 2 if capacity else _INDEX_INITIAL
            index = <uint64_t*>calloc(capacity, sizeof(uint64_t))
            if index == NULL:
                raise MemoryError()
            free(shard.index)
            shard.index = index
            shard.index_mask = capacity - 1
            for other in range(slot):
                self._index_slot(
                    s, <uint64_t>hash(self._sku_of((<int64_t>other) << self._shard_bits | s)),
                    other,
                )
        i = (hash_value >> self._shard_bits) & shard.index_mask
        while shard.index[i]:
            i = (i + 1) & shard.index_mask
        shard.index[i] = (hash_value >> 32) << 32 | <uint64_t>(slot + 1)
        return 0

    cdef int64_t _handle(self, object handle) except -1:
        """``handle`` checked against the table (IndexError if it names no row)."""
        cdef int64_t value
        if not isinstance(handle, int):
            raise TypeError(f"handle must be an int, not {type(handle).__name__}")
        try:
            value = handle
        except OverflowError:
            raise IndexError(f"handle {handle} names no SKU") from None
        if value < 0 or (value >> self._shard_bits) >= self._shard[value & self._shard_mask].count:
            raise IndexError(f"handle {handle} names no SKU")
        return value

    cdef row_t* _row(self, int64_t handle) noexcept:
        # Unchecked: only for handles that went through _handle or _find.
        return &self._shard[handle & self._shard_mask].rows[handle >> self._shard_bits]

    cdef str _sku_of(self, int64_t handle):
        cdef const shard_t* shard = &self._shard[handle & self._shard_mask]
        cdef const char* name = shard.names + shard.name_at[handle >> self._shard_bits]
        cdef uint32_t name_bytes
        memcpy(&name_bytes, name, 4)
        return PyUnicode_DecodeUTF8(name + 4, name_bytes, NULL)

    cdef int _grow(self, shard_t* shard) except -1:
        # Geometric growth keeps ensure() amortised O(1).
        cdef Py_ssize_t capacity = shard.capacity * 2 if shard.capacity else _ROWS_INITIAL
        cdef row_t* rows = <row_t*>realloc(shard.rows, capacity * sizeof(row_t))
        cdef uint32_t* name_at
        if rows == NULL:
            raise MemoryError()
        shard.rows = rows
        name_at = <uint32_t*>realloc(shard.name_at, capacity * sizeof(uint32_t))
        if name_at == NULL:
            raise MemoryError()
        shard.name_at = name_at
        shard.capacity = capacity
        return 0

    cdef int64_t _begin(self, object seq) except? -1:
        """``seq`` as int64, asserted not older than the newest entry (the ring stays ordered)."""
        cdef int64_t value = _int64(seq, "seq")
        if value < self._seq_last:
            raise AssertionError(f"seq {value} is older than the newest change's {self._seq_last}")
        return value

    cdef void _append(self, int64_t seq, int64_t handle, const row_t* row) noexcept:
        cdef entry_t* entry = &self._ring[self._head & self._ring_mask]
        entry.seq = seq
        entry.handle = handle
        entry.on_hand = row.on_hand
        entry.reserved = row.reserved
        entry.committed = row.committed
        entry.unsellable = row.unsellable
        self._head += 1
        self._seq_last = seq

    cdef int _check_row(self, int64_t handle) except -1:
        """Postcondition of every mutation, for each row it touched."""
        cdef const row_t* row = self._row(handle)
        if not _row_ok(row):
            raise AssertionError(
                f"counters of SKU {self._sku_of(handle)!r} went negative: on_hand={row.on_hand}, "
                f"reserved={row.reserved}, committed={row.committed}"
            )
        return 0

    cdef void _clear_pending(self, const int64_t* handles, Py_ssize_t n) noexcept:
        cdef Py_ssize_t i
        for i in range(n):
            self._row(handles[i]).pending = 0

    cdef tuple _available_tuple(self, const int64_t* handles, Py_ssize_t n):
        """Available per line, 0 for unknown SKUs (handle -1)."""
        cdef tuple result = PyTuple_New(n)
        cdef object item
        cdef Py_ssize_t i
        for i in range(n):
            item = _available(self._row(handles[i])) if handles[i] >= 0 else 0
            Py_INCREF(item)
            PyTuple_SET_ITEM(result, i, item)
        return result

    cdef int _bulk(self, int op, object handles, object amounts, object committed,
                   object seq) except -1:
        """release / commit / uncommit / fulfil: resolve, check, apply (see the module doc)."""
        cdef int64_t seq_value = self._begin(seq)
        cdef str name = "held" if op == _COMMIT else "quantities"
        cdef object handle_lines = _lines(handles, "handles")
        cdef object amount_lines = _lines(amounts, name)
        cdef object committed_lines = None
        cdef Py_ssize_t n = PySequence_Fast_GET_SIZE(handle_lines)
        cdef Py_ssize_t i
        cdef int64_t* buffer
        cdef int64_t* hs
        cdef int64_t* amount
        cdef int64_t* moved
        cdef row_t* row
        cdef int64_t taken_from, taken_before

        if PySequence_Fast_GET_SIZE(amount_lines) != n:
            raise ValueError(f"{n} handles but {PySequence_Fast_GET_SIZE(amount_lines)} {name}")
        if op == _COMMIT:
            committed_lines = _lines(committed, "committed")
            if PySequence_Fast_GET_SIZE(committed_lines) != n:
                raise ValueError(
                    f"{n} handles but {PySequence_Fast_GET_SIZE(committed_lines)} committed"
                )
        if n == 0:
            return 0
        buffer = _scratch(n, 3)
        try:
            hs = buffer
            amount = buffer + n
            moved = buffer + 2 * n
            # 1. resolve
            for i in range(n):
                hs[i] = self._handle(_line(handle_lines, i))
                amount[i] = _int64(_line(amount_lines, i), name)
                if amount[i] < 0:
                    raise AssertionError(f"{name}[{i}] is negative: {amount[i]}")
                if op == _COMMIT:
                    moved[i] = _int64(_line(committed_lines, i), "committed")
                    if moved[i] < 0 or moved[i] > amount[i]:
                        raise AssertionError(
                            f"committed[{i}] = {moved[i]} is not within [0, held = {amount[i]}]"
                        )
            # 2. check: each op takes amount[i] from reserved or committed.
            for i in range(n):
                row = self._row(hs[i])
                if op == _RELEASE or op == _COMMIT:
                    taken_from = row.reserved
                else:
                    # uncommit and fulfil take from committed only: fulfil takes on_hand down
                    # by at most what is there (a recount may have left less than committed).
                    taken_from = row.committed
                if taken_from - row.pending < amount[i]:
                    taken_before = row.pending
                    self._clear_pending(hs, n)
                    raise AssertionError(
                        f"{('release', 'commit', 'uncommit', 'fulfil')[op]} of {amount[i]} would "
                        f"take a counter of SKU {self._sku_of(hs[i])!r} below zero: "
                        f"on_hand={row.on_hand}, reserved={row.reserved}, "
                        f"committed={row.committed}, taken by earlier lines={taken_before}"
                    )
                row.pending += amount[i]
            self._clear_pending(hs, n)
            # 3. apply
            for i in range(n):
                if amount[i] == 0:
                    continue  # changes nothing (for commit, moved <= held = 0), appends nothing
                row = self._row(hs[i])
                if op == _RELEASE:
                    row.reserved -= amount[i]
                elif op == _COMMIT:
                    row.reserved -= amount[i]
                    row.committed += moved[i]
                elif op == _UNCOMMIT:
                    row.committed -= amount[i]
                else:
                    row.committed -= amount[i]
                    row.on_hand -= amount[i] if amount[i] < row.on_hand else row.on_hand
                self._check_row(hs[i])
                self._append(seq_value, hs[i], row)
        finally:
            PyMem_Free(buffer)
        if RESERVD_DEBUG:
            _debug_check(self)
        return 0

    # -- lookups ----------------------------------------------------------------------------

    def lookup(self, sku):
        """The handle of ``sku``, or -1 if the table does not know it."""
        return self._find(sku)

    def ensure(self, sku):
        """The handle of ``sku``, creating it with zero counters if unknown."""
        cdef int64_t handle = self._find(sku)
        cdef Py_ssize_t s
        cdef shard_t* shard
        cdef row_t* row
        cdef uint64_t hash_value, capacity
        cdef const char* utf8
        cdef Py_ssize_t utf8_bytes
        cdef uint32_t name_bytes
        cdef char* names
        if handle >= 0:
            return handle
        utf8 = PyUnicode_AsUTF8AndSize(sku, &utf8_bytes)
        hash_value = <uint64_t>hash(sku)
        s = hash_value & self._shard_mask
        shard = &self._shard[s]
        if shard.count == shard.capacity:
            self._grow(shard)
        if shard.names_used + 4 + utf8_bytes > shard.names_capacity:
            capacity = shard.names_capacity * 2 if shard.names_capacity else 256
            while capacity < shard.names_used + 4 + utf8_bytes:
                capacity *= 2
            if capacity > 0xFFFFFFFF:
                raise OverflowError("a shard holds at most 4 GiB of SKU names")
            names = <char*>realloc(shard.names, capacity)
            if names == NULL:
                raise MemoryError()
            shard.names = names
            shard.names_capacity = capacity
        # Stored before it is indexed: growing the index reads every name, this one excepted.
        shard.name_at[shard.count] = <uint32_t>shard.names_used
        name_bytes = <uint32_t>utf8_bytes
        memcpy(shard.names + shard.names_used, &name_bytes, 4)
        memcpy(shard.names + shard.names_used + 4, utf8, utf8_bytes)
        self._index_slot(s, hash_value, shard.count)
        shard.names_used += 4 + utf8_bytes
        row = &shard.rows[shard.count]
        row.on_hand = row.reserved = row.committed = row.unsellable = row.pending = 0
        handle = (<int64_t>shard.count) << self._shard_bits | s
        shard.count += 1
        self._count += 1
        if RESERVD_DEBUG:
            _debug_check(self)
        return handle

    def sku(self, handle):
        """The SKU a handle names."""
        return self._sku_of(self._handle(handle))

    def counters(self, handle):
        """(on_hand, reserved, committed) of the SKU a handle names."""
        cdef const row_t* row = self._row(self._handle(handle))
        return (row.on_hand, row.reserved, row.committed)

    def stock(self, skus):
        """(on_hand, reserved, committed) per SKU, None for an unknown one: GetStock's one call."""
        cdef object lines = _lines(skus, "skus")
        cdef Py_ssize_t n = PySequence_Fast_GET_SIZE(lines)
        cdef list result = []
        cdef Py_ssize_t i
        cdef int64_t handle
        cdef const row_t* row
        for i in range(n):
            handle = self._find(_line(lines, i))
            if handle < 0:
                result.append(None)
            else:
                row = self._row(handle)
                result.append((row.on_hand, row.reserved, row.committed))
        return result

    def items(self):
        """Yield (sku, on_hand, reserved, committed) for every SKU, shard by shard, slot by slot.

        For snapshots: the caller must not mutate the table while it iterates if it wants one
        consistent state (a mutation in between is seen by the rows not yet yielded).
        """
        cdef Py_ssize_t s, slot
        cdef const row_t* row
        for s in range(self.shards):
            slot = 0
            # count and rows are re-read each step: a row added meanwhile may move the array.
            while slot < self._shard[s].count:
                row = &self._shard[s].rows[slot]
                yield (self._sku_of((<int64_t>slot) << self._shard_bits | s), row.on_hand,
                       row.reserved, row.committed)
                slot += 1

    # -- mutations ----------------------------------------------------------------------------

    def reserve(self, skus, quantities, allow_partial, seq, finished=None, reservation_id=None):
        """Reserve ``quantities[i]`` (>= 1 item) of ``skus[i]``, atomically, as mutation ``seq``.

        With ``finished`` (the ledger's finished-record table, reservd.finished) and
        ``reservation_id`` (str), the id is first looked up there, hashed and probed within this
        same call: if a record is kept, (RESERVE_FINISHED, the record, None, None) and nothing
        is applied.

        At least one line (ValueError otherwise); skus and quantities of the same length.

        Returns (status, handles, granted, available), the tuples having one element per line:

        - RESERVE_UNKNOWN_SKU if any SKU is unknown: nothing applied; handle -1 and available 0
          for the unknown lines, the current available for the others; granted all 0.
        - all-or-nothing (not allow_partial): RESERVE_OK with every line granted in full if every
          line fits in available, else RESERVE_INSUFFICIENT with nothing applied.
        - allow_partial: each line is granted min(quantity, max(available, 0)); RESERVE_OK if
          anything was granted, else RESERVE_INSUFFICIENT.

        available is on_hand - reserved - committed once the call is applied (or is not), per
        line; it may be negative after a recount shortfall. A SKU repeated within one call is
        checked against what its earlier lines took. One change entry per line granted > 0.
        """
        cdef object kept
        cdef int64_t seq_value
        if finished is not None:
            if type(finished) is FinishedTable:
                kept = (<FinishedTable>finished)._record_of(reservation_id, False)
            else:
                kept = finished.reservation(reservation_id)
            if kept is not None:
                return (RESERVE_FINISHED, kept, None, None)
        seq_value = self._begin(seq)
        cdef bint partial = allow_partial
        cdef object sku_lines = _lines(skus, "skus")
        cdef object quantity_lines = _lines(quantities, "quantities")
        cdef Py_ssize_t n = PySequence_Fast_GET_SIZE(sku_lines)
        cdef Py_ssize_t i
        cdef int64_t* buffer
        cdef int64_t* hs
        cdef int64_t* quantity
        cdef int64_t* granted
        cdef row_t* row
        cdef int64_t free_now, grant
        cdef bint unknown = False, granted_any = False, fits = True
        cdef int status

        if PySequence_Fast_GET_SIZE(quantity_lines) != n:
            raise ValueError(f"{n} skus but {PySequence_Fast_GET_SIZE(quantity_lines)} quantities")
        if n == 0:
            raise ValueError("reserve needs at least one line")
        buffer = _scratch(n, 3)
        try:
            hs = buffer
            quantity = buffer + n
            granted = buffer + 2 * n
            # 1. resolve: one dict lookup per line; the handle is all later phases use.
            for i in range(n):
                hs[i] = self._find(_line(sku_lines, i))
                quantity[i] = _int64(_line(quantity_lines, i), "quantities")
                if quantity[i] < 1:
                    raise AssertionError(f"quantities[{i}] is not positive: {quantity[i]}")
                granted[i] = 0
                if hs[i] < 0:
                    unknown = True
            if unknown:
                return (RESERVE_UNKNOWN_SKU, _int_tuple(hs, n), _int_tuple(granted, n),
                        self._available_tuple(hs, n))
            # 2. check
            for i in range(n):
                row = self._row(hs[i])
                free_now = _available(row) - row.pending
                if partial:
                    grant = max(min(quantity[i], free_now), 0)
                elif quantity[i] <= free_now:
                    grant = quantity[i]
                else:
                    fits = False
                    break
                granted[i] = grant
                row.pending += grant
                granted_any = granted_any or grant > 0
            self._clear_pending(hs, n)
            if not fits or not granted_any:
                for i in range(n):
                    granted[i] = 0
                status = RESERVE_INSUFFICIENT
            else:
                # 3. apply
                for i in range(n):
                    if granted[i] == 0:
                        continue
                    row = self._row(hs[i])
                    row.reserved += granted[i]
                    self._check_row(hs[i])
                    self._append(seq_value, hs[i], row)
                status = RESERVE_OK
            if RESERVD_DEBUG:
                _debug_check(self)
            return (status, _int_tuple(hs, n), _int_tuple(granted, n),
                    self._available_tuple(hs, n))
        finally:
            PyMem_Free(buffer)

    def release(self, handles, quantities, seq):
        """reserved -= quantities[i] (items) per line, as mutation ``seq``."""
        self._bulk(_RELEASE, handles, quantities, None, seq)

    def commit(self, handles, held, committed, seq):
        """Settle holds: reserved -= held[i], committed += committed[i] (0 <= committed <= held)."""
        self._bulk(_COMMIT, handles, held, committed, seq)

    def uncommit(self, handles, quantities, seq):
        """committed -= quantities[i] (items) per line, as mutation ``seq``."""
        self._bulk(_UNCOMMIT, handles, quantities, None, seq)

    def fulfil(self, handles, quantities, seq):
        """Ship: committed -= quantities[i] and on_hand -= min(quantities[i], on_hand), as
        mutation ``seq``: the parcel left the shelf even when a recount left less on_hand than
        was committed (a shortfall), and on_hand never goes below zero."""
        self._bulk(_FULFIL, handles, quantities, None, seq)

    def set_on_hand(self, handle, on_hand, seq):
        """Recount: on_hand := ``on_hand`` items (>= 0, else ValueError); returns the previous.

        It may fall below reserved + committed: available then goes negative until stock
        arrives or holds end.
        """
        cdef int64_t seq_value = self._begin(seq)
        cdef int64_t h = self._handle(handle)
        cdef int64_t value = _int64(on_hand, "on_hand")
        cdef row_t* row = self._row(h)
        cdef int64_t previous = row.on_hand
        if value < 0:
            raise ValueError(f"on_hand must be >= 0, not {value}")
        row.on_hand = value
        self._check_row(h)
        if value != previous:
            self._append(seq_value, h, row)
        if RESERVD_DEBUG:
            _debug_check(self)
        return previous

    def adjust_on_hand(self, handle, delta, seq):
        """on_hand += ``delta`` items; returns the new on_hand.

        ValueError, with nothing changed, if it would go below zero; OverflowError beyond int64.
        """
        cdef int64_t seq_value = self._begin(seq)
        cdef int64_t h = self._handle(handle)
        cdef int64_t change = _int64(delta, "delta")
        cdef row_t* row = self._row(h)
        if change > 0 and row.on_hand > INT64_MAX - change:
            raise OverflowError(f"on_hand {row.on_hand} + {change} does not fit in int64")
        if row.on_hand + change < 0:
            raise ValueError(
                f"adjusting on_hand of SKU {self._sku_of(h)!r} by {change} would make it "
                f"{row.on_hand + change}"
            )
        row.on_hand += change
        self._check_row(h)
        if change != 0:
            self._append(seq_value, h, row)
        if RESERVD_DEBUG:
            _debug_check(self)
        return row.on_hand

    def touch(self, handle, seq):
        """Append a change entry with the SKU's counters as they are, as mutation ``seq``:
        something derived from the SKU beside the table changed (its channel buckets or
        policies), and the ring's readers (the mirror, WatchAts) must see it."""
        cdef int64_t seq_value = self._begin(seq)
        cdef int64_t h = self._handle(handle)
        self._append(seq_value, h, self._row(h))

    def touch_all(self, seq):
        """:meth:`touch` every SKU, shard by shard (a channel policy changed)."""
        cdef int64_t seq_value = self._begin(seq)
        cdef Py_ssize_t s, slot
        for s in range(self.shards):
            for slot in range(self._shard[s].count):
                self._append(
                    seq_value, (<int64_t>slot) << self._shard_bits | s,
                    &self._shard[s].rows[slot],
                )

    def unsellable(self, handle):
        """Units of the SKU a handle names that are on hand but not sellable."""
        return self._row(self._handle(handle)).unsellable

    def move_unsellable(self, handle, on_hand_delta, unsellable_delta, seq):
        """on_hand += ``on_hand_delta`` and unsellable += ``unsellable_delta`` (items), at once.

        The one mutation of the stock states: a return arriving into quarantine is (+u, +u), an
        inspection passing units is (0, -u), a write-off of damaged units is (-u, -u). Returns
        (on_hand, unsellable). ValueError, with nothing changed, if on_hand or unsellable would
        go below zero; OverflowError beyond int64. One change entry if anything changed.
        unsellable may exceed on_hand after a recount (reality wins): available is then
        negative, as under any shortfall.
        """
        cdef int64_t seq_value = self._begin(seq)
        cdef int64_t h = self._handle(handle)
        cdef int64_t d_on_hand = _int64(on_hand_delta, "on_hand_delta")
        cdef int64_t d_unsellable = _int64(unsellable_delta, "unsellable_delta")
        cdef row_t* row = self._row(h)
        if (d_on_hand > 0 and row.on_hand > INT64_MAX - d_on_hand) or (
                d_unsellable > 0 and row.unsellable > INT64_MAX - d_unsellable):
            raise OverflowError(f"moving stock of SKU {self._sku_of(h)!r} does not fit in int64")
        if row.on_hand + d_on_hand < 0 or row.unsellable + d_unsellable < 0:
            raise ValueError(
                f"moving stock of SKU {self._sku_of(h)!r} by on_hand {d_on_hand:+d}, unsellable "
                f"{d_unsellable:+d} would make on_hand={row.on_hand + d_on_hand}, "
                f"unsellable={row.unsellable + d_unsellable}"
            )
        row.on_hand += d_on_hand
        row.unsellable += d_unsellable
        self._check_row(h)
        if d_on_hand != 0 or d_unsellable != 0:
            self._append(seq_value, h, row)
        if RESERVD_DEBUG:
            _debug_check(self)
        return (row.on_hand, row.unsellable)

    def restore(self, sku, on_hand, reserved, committed, unsellable=0):
        """Snapshot load: set a SKU's counters (creating it); appends no change entry.

        ValueError, with nothing changed, for a negative counter or reserved + committed beyond
        int64 (a damaged snapshot, not a state any mutation can reach).
        """
        cdef int64_t on_hand_value = _int64(on_hand, "on_hand")
        cdef int64_t reserved_value = _int64(reserved, "reserved")
        cdef int64_t committed_value = _int64(committed, "committed")
        cdef int64_t unsellable_value = _int64(unsellable, "unsellable")
        cdef int64_t handle
        cdef row_t* row
        if on_hand_value < 0 or reserved_value < 0 or committed_value < 0 or unsellable_value < 0:
            raise ValueError(
                f"negative counters for SKU {sku!r}: on_hand={on_hand_value}, "
                f"reserved={reserved_value}, committed={committed_value}"
            )
        if reserved_value > INT64_MAX - committed_value:
            raise ValueError(f"reserved + committed of SKU {sku!r} exceeds int64")
        handle = self.ensure(sku)
        row = self._row(handle)
        row.on_hand = on_hand_value
        row.reserved = reserved_value
        row.committed = committed_value
        row.unsellable = unsellable_value
        self._check_row(handle)
        if RESERVD_DEBUG:
            _debug_check(self)
        return handle

    # -- change ring --------------------------------------------------------------------------

    @property
    def ring_head(self):
        """Position the next change entry will take (positions only ever grow)."""
        return self._head

    @property
    def ring_tail(self):
        """Oldest retained position: max(0, ring_head - ring_capacity)."""
        return max(0, self._head - self._ring_capacity)

    def changes(self, position, limit, seq_max):
        """Up to ``limit`` entries from ``position`` (raised to ring_tail if older) with seq <=
        ``seq_max``, stopping at the first newer one.

        Returns (next_position, [(seq, sku, on_hand, reserved, committed, unsellable), ...]); a
        reader that
        finds next_position moved past the position it asked for by more than the entries it
        got has lost entries to wrap-around. ValueError for a position beyond ring_head or a
        negative limit.
        """
        cdef int64_t start = _int64(position, "position")
        cdef int64_t count_max = _int64(limit, "limit")
        cdef int64_t newest = _int64(seq_max, "seq_max")
        cdef int64_t tail = max(0, self._head - self._ring_capacity)
        cdef int64_t taken = 0
        cdef const entry_t* entry
        cdef list result = []
        if start > self._head:
            raise ValueError(f"position {start} is beyond ring_head {self._head}")
        if count_max < 0:
            raise ValueError(f"limit must be >= 0, not {count_max}")
        if start < tail:
            start = tail
        while start < self._head and taken < count_max:
            entry = &self._ring[start & self._ring_mask]
            if entry.seq > newest:
                break
            result.append((entry.seq, self._sku_of(entry.handle), entry.on_hand,
                           entry.reserved, entry.committed, entry.unsellable))
            taken += 1
            start += 1
        return start, result

    def position_after(self, seq):
        """Position of the first retained entry whose seq is > ``seq`` (binary search).

        ring_tail if even the oldest retained entry is newer, ring_head if none is.
        """
        cdef int64_t value = _int64(seq, "seq")
        cdef int64_t low = max(0, self._head - self._ring_capacity)
        cdef int64_t high = self._head
        cdef int64_t middle
        while low < high:
            middle = low + (high - low) // 2
            if self._ring[middle & self._ring_mask].seq > value:
                high = middle
            else:
                low = middle + 1
        return low
