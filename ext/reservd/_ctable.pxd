# Declarations of reservd._ctable (the counter table): the C layout of its rows, shards and
# change entries, and the Table class's typed fields and C methods. _ctable.pyx implements them.

cimport cython
from libc.stdint cimport int64_t, uint32_t, uint64_t


cdef struct row_t:
    # One SKU's counters, in units of stock items. available is derived, never stored.
    int64_t on_hand
    int64_t reserved
    int64_t committed
    # Units on hand but not sellable (quarantine + damaged + quality_control), maintained by the
    # ledger from reservd.stockstates; subtracted from available so reserve checks it atomically.
    int64_t unsellable
    # Scratch of the check phase of one bulk call: what the call's earlier lines take from this
    # row, so a SKU repeated within the call is checked against them. Zero between calls.
    int64_t pending


cdef struct shard_t:
    row_t* rows           # malloc'd; capacity rows, the first count in use; index = slot
    Py_ssize_t count
    Py_ssize_t capacity
    # sku -> slot: open addressing with linear probing (no deletion: rows are never removed).
    # An entry is (upper 32 bits of the sku's str hash) << 32 | (slot + 1); 0 is empty. NULL
    # until the shard's first SKU; kept at most 3/4 full.
    uint64_t* index
    uint64_t index_mask
    # The shard's SKUs, UTF-8, each after its u32 byte length (a str per SKU would cost ~64
    # bytes more); name_at[slot] is the offset of the slot's (capacity entries, like rows).
    char* names
    uint64_t names_used
    uint64_t names_capacity
    uint32_t* name_at


cdef struct entry_t:
    # One change-ring entry: a SKU's counters right after the mutation numbered seq changed it.
    int64_t seq
    int64_t handle
    int64_t on_hand
    int64_t reserved
    int64_t committed
    int64_t unsellable


@cython.final
cdef class Table:
    cdef:
        readonly Py_ssize_t shards
        int _shard_bits
        int64_t _shard_mask
        shard_t* _shard       # shards entries, calloc'd
        Py_ssize_t _count

        entry_t* _ring        # ring capacity entries; position p lives at p & _ring_mask
        int64_t _ring_capacity
        int64_t _ring_mask
        int64_t _head         # position of the next entry; only ever grows
        int64_t _seq_last     # seq of the newest entry (INT64_MIN before the first)

    cdef int64_t _find(self, object sku) except -2
    cdef int64_t _handle(self, object handle) except -1
    cdef row_t* _row(self, int64_t handle) noexcept
    cdef str _sku_of(self, int64_t handle)
    cdef int _grow(self, shard_t* shard) except -1
    cdef int _index_slot(self, Py_ssize_t s, uint64_t hash_value, Py_ssize_t slot) except -1
    cdef int64_t _begin(self, object seq) except? -1
    cdef void _append(self, int64_t seq, int64_t handle, const row_t* row) noexcept
    cdef int _check_row(self, int64_t handle) except -1
    cdef void _clear_pending(self, const int64_t* handles, Py_ssize_t n) noexcept
    cdef tuple _available_tuple(self, const int64_t* handles, Py_ssize_t n)
    cdef int _bulk(self, int op, object handles, object amounts, object committed, object seq) except -1
