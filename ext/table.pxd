# C layout of the counter table: the row, shard and change-entry structs.
#
# table.pyx includes this file: Cython pairs a module with its own .pxd by the module's dotted
# name (reservd._ctable), not by the .pyx file name, so ext/table.pxd would never be found as
# the module's .pxd. Hence the Table class declares its typed fields at the top of its body in
# table.pyx instead of here.

from libc.stdint cimport int64_t


cdef struct row_t:
    # One SKU's counters, in units of stock items. available is derived, never stored.
    int64_t on_hand
    int64_t reserved
    int64_t committed
    # Scratch of the check phase of one bulk call: what the call's earlier lines take from this
    # row, so a SKU repeated within the call is checked against them. Zero between calls.
    int64_t pending


cdef struct shard_t:
    row_t* rows           # malloc'd; capacity rows, the first count in use; index = slot
    Py_ssize_t count
    Py_ssize_t capacity


cdef struct entry_t:
    # One change-ring entry: a SKU's counters right after the mutation numbered seq changed it.
    int64_t seq
    int64_t handle
    int64_t on_hand
    int64_t reserved
    int64_t committed
