# Declarations of reservd._cfinished (the finished-record table): its arena of packed records and
# its open-addressing index. _cfinished.pyx implements them; reservd.finished defines the records.

cimport cython
from libc.stdint cimport int64_t, uint64_t


@cython.final
cdef class FinishedTable:
    cdef:
        # The arena: records oldest first, at logical byte positions that only ever grow, in
        # blocks of _BLOCK_BYTES (a record never straddles two). Block b holds positions
        # [b << _BLOCK_BITS, (b + 1) << _BLOCK_BITS); _blocks[i] is block _first_block + i.
        char** _blocks
        Py_ssize_t _blocks_used
        Py_ssize_t _blocks_capacity
        uint64_t _first_block
        uint64_t _head          # position of the oldest record (== _tail when empty)
        uint64_t _tail          # position the next record takes
        # The index: slot = position + 1 of a record (0: empty), linear probing from the first
        # 8 bytes of its key (a hash already), deletion by backward shift (no tombstones).
        uint64_t* _slots
        uint64_t _slot_mask
        Py_ssize_t _count
        readonly Py_ssize_t reservations
        readonly Py_ssize_t adjustments

    cdef char* _at(self, uint64_t position) noexcept
    cdef Py_ssize_t _find(self, const char* key) noexcept
    cdef int _rehash(self, uint64_t capacity) except -1
    cdef void _unindex(self, uint64_t position) noexcept
    cdef void _forget_at(self, uint64_t position) noexcept
    cdef object _record_of(self, object id_, bint adjustment)
