# cython: language_level=3
"""The finished-record table in C: idempotency records of finished reservations and of stock
adjustments, kept compactly until their retention ends (reservd.finished defines the records).

reservd/_pyfinished.py is the pure-Python twin: same behaviour and exceptions.

A record is a packed bytes value (layout in reservd.finished: a 48-byte header holding its kind,
its 128-bit key and its finished_at_ms, then its body; 8-byte aligned). This table knows only
the header: it stores records oldest first and finds one by key. No Python object is kept per
record, so a finished reservation costs its 64 bytes plus about 16 bytes of index.

- The arena holds the records in the order they were added, at logical byte positions that only
  ever grow, in blocks of 1 MiB (a record never straddles two blocks; the unused end of a block
  starts with a zero kind byte). Forgetting is oldest first (the retention queue), so whole
  blocks are freed from the front as records age out: memory follows what is kept.
- The index is open addressing with linear probing over slots holding position + 1 (0: empty).
  A key is already a uniform hash, so its first 8 bytes choose the slot. Deletion shifts the
  following entries back (no tombstones), so probes stay short whatever the churn. The index is
  kept at most 3/4 full (doubling) and shrinks when under 1/8 full.

Adding a key that is kept already replaces its record: the ledger only does so when replaying a
log, which does not repeat the forgetting (an id forgotten, then used again). The replaced record
stays in the arena, marked dead (its kind's high bit), until the head passes it.

Ids are hashed here too (BLAKE2b in C, ext/reservd/blake2b.h: the same bytes as the hashlib
keys of reservd._pyfinished), so a Reserve hashes and probes within the counter table's own call
(reservd._ctable.CounterTable.reserve) and needs no hashlib object.

Errors: a record that does not parse is ValueError.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove

cdef extern from "blake2b.h":
    void reservd_blake2b(uint8_t* out, size_t outlen, const uint8_t* data, size_t length,
                         const uint8_t* person) noexcept

KIND_RESERVATION = 1
KIND_ADJUSTMENT = 2
HEADER_BYTES = 48
RECORD_BYTES_MAX = 1 << 20

cdef enum:
    _BLOCK_BITS = 20
    _KEY = 8            # offset of the 16-byte key in a record
    _KEY_BYTES = 16
    _FINISHED_AT = 40   # offset of finished_at_ms (i64)
    _HEADER = 48
    _FLAG_INLINE = 2    # a reservation whose one line is in its body
    _DEAD = 0x80        # kind bit of a replaced record
    _SLOTS_MIN = 1024

cdef uint64_t _BLOCK_BYTES = (<uint64_t>1) << _BLOCK_BITS
cdef uint64_t _BLOCK_MASK = _BLOCK_BYTES - 1


cdef inline uint64_t _le64(const char* p) noexcept:
    cdef const unsigned char* b = <const unsigned char*>p
    cdef uint64_t value = 0
    cdef int i
    for i in range(7, -1, -1):
        value = (value << 8) | b[i]
    return value


cdef inline uint32_t _le32(const char* p) noexcept:
    cdef const unsigned char* b = <const unsigned char*>p
    return b[0] | (<uint32_t>b[1] << 8) | (<uint32_t>b[2] << 16) | (<uint32_t>b[3] << 24)


cdef inline uint64_t _record_size(const char* record) noexcept:
    """Bytes of a record, from its header (0 for a kind this table does not know)."""
    cdef unsigned char kind = (<unsigned char>record[0]) & ~_DEAD
    if kind == KIND_ADJUSTMENT:
        return 80
    if kind != KIND_RESERVATION:
        return 0
    if (<unsigned char>record[2]) & _FLAG_INLINE:
        return 64
    return 64 + ((12 * <uint64_t>_le32(record + 56) + 7) & ~(<uint64_t>7))


# Personalisations (16 bytes, zero-padded as hashlib pads them): the two id spaces apart.
cdef const uint8_t* _RESERVE_PERSON = <const uint8_t*>b"reservd.reserve\0"
cdef const uint8_t* _ADJUST_PERSON = <const uint8_t*>b"reservd.adjust\0\0"
cdef const uint8_t* _PAYLOAD_PERSON = <const uint8_t*>b"reservd.payload\0"


cdef inline void _id_key(object id_, const uint8_t* person, uint8_t* key) except *:
    """key[0..16) = the 128-bit BLAKE2b of ``id_`` (a str) as UTF-8."""
    cdef Py_ssize_t length
    cdef const char* data
    if type(id_) is not str:
        raise TypeError(f"id must be str, not {type(id_).__name__}")
    data = PyUnicode_AsUTF8AndSize(id_, &length)
    reservd_blake2b(key, _KEY_BYTES, <const uint8_t*>data, length, person)


def reservation_key(reservation_id):
    """The 16-byte key of a reservation id (reservd.finished)."""
    cdef uint8_t key[_KEY_BYTES]
    _id_key(reservation_id, _RESERVE_PERSON, key)
    return PyBytes_FromStringAndSize(<char*>key, _KEY_BYTES)


def adjustment_key(adjustment_id):
    """The 16-byte key of an adjustment id (reservd.finished)."""
    cdef uint8_t key[_KEY_BYTES]
    _id_key(adjustment_id, _ADJUST_PERSON, key)
    return PyBytes_FromStringAndSize(<char*>key, _KEY_BYTES)


def payload_digest(data):
    """The 64-bit digest (int) of a request's encoded payload (bytes; reservd.finished)."""
    cdef unsigned char out[8]
    if type(data) is not bytes:
        raise TypeError(f"data must be bytes, not {type(data).__name__}")
    reservd_blake2b(out, 8, <const uint8_t*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data),
                    _PAYLOAD_PERSON)
    return _le64(<const char*>out)


@cython.final
cdef class FinishedTable:
    """Packed records by 16-byte key, oldest first; see the module docstring."""

    def __cinit__(self):
        self._blocks = NULL
        self._blocks_used = 0
        self._blocks_capacity = 0
        self._first_block = 0
        self._head = 0
        self._tail = 0
        self._count = 0
        self.reservations = 0
        self.adjustments = 0
        self._slots = <uint64_t*>calloc(_SLOTS_MIN, sizeof(uint64_t))
        if self._slots == NULL:
            raise MemoryError()
        self._slot_mask = _SLOTS_MIN - 1

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self._blocks_used):
            free(self._blocks[i])
        free(self._blocks)
        free(self._slots)

    def __len__(self):
        """Records kept."""
        return self._count

    # -- internals --------------------------------------------------------------------------

    cdef char* _at(self, uint64_t position) noexcept:
        # Unchecked: only for positions of kept records (or the tail of a started block).
        return (self._blocks[(position >> _BLOCK_BITS) - self._first_block]
                + (position & _BLOCK_MASK))

    cdef Py_ssize_t _find(self, const char* key) noexcept:
        """The slot holding ``key``'s record, or -1."""
        cdef uint64_t i = _le64(key) & self._slot_mask
        while self._slots[i]:
            if memcmp(self._at(self._slots[i] - 1) + _KEY, key, _KEY_BYTES) == 0:
                return <Py_ssize_t>i
            i = (i + 1) & self._slot_mask
        return -1

    cdef int _rehash(self, uint64_t capacity) except -1:
        """Rebuild the index with ``capacity`` slots (a power of two) from the arena."""
        cdef uint64_t* slots = <uint64_t*>calloc(capacity, sizeof(uint64_t))
        cdef uint64_t mask = capacity - 1
        cdef uint64_t position = self._head
        cdef uint64_t i
        cdef char* record
        if slots == NULL:
            raise MemoryError()
        while position < self._tail:
            record = self._at(position)
            if (position & _BLOCK_MASK) and record[0] == 0:
                position = (position | _BLOCK_MASK) + 1  # the unused end of a block
                continue
            if (<unsigned char>record[0]) & _DEAD:
                position += _record_size(record)
                continue
            i = _le64(record + _KEY) & mask
            while slots[i]:
                i = (i + 1) & mask
            slots[i] = position + 1
            position += _record_size(record)
        free(self._slots)
        self._slots = slots
        self._slot_mask = mask
        return 0

    cdef void _unindex(self, uint64_t position) noexcept:
        """Remove the index entry of the record at ``position`` (kept), shifting back the
        entries after it that probed past its slot."""
        cdef uint64_t mask = self._slot_mask
        cdef uint64_t i = _le64(self._at(position) + _KEY) & mask
        cdef uint64_t j, home
        while self._slots[i] != position + 1:
            i = (i + 1) & mask
        j = i
        while True:
            j = (j + 1) & mask
            if self._slots[j] == 0:
                break
            home = _le64(self._at(self._slots[j] - 1) + _KEY) & mask
            # Move j's entry into the hole at i unless its home lies cyclically in (i, j].
            if (j > i and (home <= i or home > j)) or (j < i and home <= i and home > j):
                self._slots[i] = self._slots[j]
                i = j
        self._slots[i] = 0

    cdef void _forget_at(self, uint64_t position) noexcept:
        """Unindex and uncount the live record at ``position``."""
        self._unindex(position)
        if self._at(position)[0] == KIND_RESERVATION:
            self.reservations -= 1
        else:
            self.adjustments -= 1
        self._count -= 1

    # -- records ------------------------------------------------------------------------------

    def add(self, record):
        """Keep ``record`` (bytes, a packed record) as the newest."""
        cdef Py_ssize_t size, slot
        cdef const char* data
        cdef uint64_t offset, replaced
        cdef char** blocks
        cdef char* block
        if type(record) is not bytes:
            raise TypeError(f"record must be bytes, not {type(record).__name__}")
        size = PyBytes_GET_SIZE(record)
        data = PyBytes_AS_STRING(record)
        if (size < _HEADER or size % 8 or <uint64_t>size > _BLOCK_BYTES
                or _record_size(data) != <uint64_t>size):
            raise ValueError(f"not a finished record ({size} bytes)")
        slot = self._find(data + _KEY)
        if slot >= 0:
            replaced = self._slots[slot] - 1
            self._forget_at(replaced)
            self._at(replaced)[0] |= _DEAD
        if (<uint64_t>self._count + 1) * 4 > (self._slot_mask + 1) * 3:
            self._rehash((self._slot_mask + 1) * 2)
        offset = self._tail & _BLOCK_MASK
        if offset and offset + size > _BLOCK_BYTES:
            self._at(self._tail)[0] = 0  # the rest of this block is unused
            if self._head == self._tail:
                self._head = (self._tail | _BLOCK_MASK) + 1  # empty: the head moves along
            self._tail = (self._tail | _BLOCK_MASK) + 1
            offset = 0
        if offset == 0 and (self._tail >> _BLOCK_BITS) - self._first_block == <uint64_t>self._blocks_used:
            if self._blocks_used == 0:
                self._first_block = self._tail >> _BLOCK_BITS
            if self._blocks_used == self._blocks_capacity:
                blocks = <char**>realloc(
                    self._blocks, (self._blocks_capacity * 2 + 4) * sizeof(char*)
                )
                if blocks == NULL:
                    raise MemoryError()
                self._blocks = blocks
                self._blocks_capacity = self._blocks_capacity * 2 + 4
            block = <char*>malloc(_BLOCK_BYTES)
            if block == NULL:
                raise MemoryError()
            self._blocks[self._blocks_used] = block
            self._blocks_used += 1
        memcpy(self._at(self._tail), data, size)
        offset = _le64(data + _KEY) & self._slot_mask
        while self._slots[offset]:
            offset = (offset + 1) & self._slot_mask
        self._slots[offset] = self._tail + 1
        self._tail += size
        self._count += 1
        if data[0] == KIND_RESERVATION:
            self.reservations += 1
        else:
            self.adjustments += 1

    cdef object _record_of(self, object id_, bint adjustment):
        """The record kept for the id (str) of a reservation or an adjustment, or None."""
        cdef uint8_t key[_KEY_BYTES]
        cdef Py_ssize_t slot
        cdef const char* record
        _id_key(id_, _ADJUST_PERSON if adjustment else _RESERVE_PERSON, key)
        slot = self._find(<const char*>key)
        if slot < 0:
            return None
        record = self._at(self._slots[slot] - 1)
        return PyBytes_FromStringAndSize(record, _record_size(record))

    def reservation(self, reservation_id):
        """The record kept for ``reservation_id`` (str), or None: hashed and probed in one call."""
        return self._record_of(reservation_id, False)

    def adjustment(self, adjustment_id):
        """The record kept for ``adjustment_id`` (str), or None."""
        return self._record_of(adjustment_id, True)

    def get(self, key):
        """The record kept under ``key`` (16 bytes), or None."""
        cdef Py_ssize_t slot
        cdef const char* record
        if type(key) is not bytes or PyBytes_GET_SIZE(key) != _KEY_BYTES:
            raise ValueError("key must be 16 bytes")
        slot = self._find(PyBytes_AS_STRING(key))
        if slot < 0:
            return None
        record = self._at(self._slots[slot] - 1)
        return PyBytes_FromStringAndSize(record, _record_size(record))

    def oldest_ms(self):
        """finished_at_ms of the oldest record (unix ms), or None when none is kept."""
        cdef uint64_t position = self._head
        cdef char* record
        while position < self._tail:
            record = self._at(position)
            if (position & _BLOCK_MASK) and record[0] == 0:
                position = (position | _BLOCK_MASK) + 1
            elif (<unsigned char>record[0]) & _DEAD:
                position += _record_size(record)
            else:
                return <int64_t>_le64(record + _FINISHED_AT)
        return None

    def forget(self, horizon_ms):
        """Forget records oldest first while the oldest finished at or before ``horizon_ms``
        (unix ms); returns how many were forgotten."""
        cdef int64_t horizon = horizon_ms
        cdef Py_ssize_t forgotten = 0
        cdef char* record
        cdef uint64_t capacity
        while self._head < self._tail:
            record = self._at(self._head)
            if (self._head & _BLOCK_MASK) and record[0] == 0:
                self._head = (self._head | _BLOCK_MASK) + 1  # the unused end of a block
                continue
            if not (<unsigned char>record[0]) & _DEAD:
                if <int64_t>_le64(record + _FINISHED_AT) > horizon:
                    break
                self._forget_at(self._head)
                forgotten += 1
            self._head += _record_size(record)
        # Free the blocks wholly before the head (the one the tail writes into stays).
        while self._blocks_used and self._first_block < (self._head >> _BLOCK_BITS):
            free(self._blocks[0])
            self._blocks_used -= 1
            memmove(self._blocks, self._blocks + 1, self._blocks_used * sizeof(char*))
            self._first_block += 1
        capacity = self._slot_mask + 1
        if capacity > _SLOTS_MIN and <uint64_t>self._count * 8 < capacity:
            while capacity > _SLOTS_MIN and <uint64_t>self._count * 4 < capacity:
                capacity //= 2
            self._rehash(capacity)
        return forgotten

    def raw(self):
        """Every record kept, oldest first, concatenated (bytes): a copy for snapshots."""
        cdef bytearray out = bytearray()
        cdef uint64_t position = self._head
        cdef char* record
        cdef uint64_t size
        while position < self._tail:
            record = self._at(position)
            if (position & _BLOCK_MASK) and record[0] == 0:
                position = (position | _BLOCK_MASK) + 1
                continue
            size = _record_size(record)
            if not (<unsigned char>record[0]) & _DEAD:
                out += record[:size]
            position += size
        return bytes(out)
