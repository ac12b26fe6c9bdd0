"""The C twin of reservd.channelpolicy.ats_values, which is the definition: every channel's
``ats`` and level for one SKU in one call (the Redis mirror asks after every mutation).

It does the same steps on C integers. A number it cannot hold exactly (beyond +-2**61, or a
product that would overflow) sends the whole call to the definition, so the two never differ;
tests/test_channels_ext.py checks them equal on random policies and stock. The policies'
numbers are read once per tuple of policies: the caller passes the same tuple object while its
channels stay the same (reservd.channels.Channels), and policies are frozen.
"""
from libc.stdlib cimport free, malloc

cdef long long _LIMIT = 1LL << 61
cdef long long _BASIS_POINTS = 10000
cdef long long _INT64_MAX = 9223372036854775807LL


cdef struct _Numbers:
    long long zero, emergency, critical, warning, share_bp, buffer_units, max_units, hold, floor
    bint capped, pool_only


class _Outside(Exception):
    """A number beyond what the C steps hold exactly."""


cdef inline long long _small(object value) except? -1:
    cdef long long number
    try:
        number = value
    except OverflowError:
        raise _Outside()
    if number > _LIMIT or number < -_LIMIT:
        raise _Outside()
    return number


cdef class _Pack:
    """The numbers of a tuple of policies, as C structs."""

    cdef _Numbers* numbers
    cdef Py_ssize_t count
    cdef readonly object policies
    cdef readonly tuple buckets  # per policy (pool, reserve)

    def __cinit__(self, policies):
        self.count = len(policies)
        self.numbers = <_Numbers*> malloc(max(1, self.count) * sizeof(_Numbers))
        if self.numbers == NULL:
            raise MemoryError()

    def __init__(self, policies):
        cdef Py_ssize_t i
        cdef _Numbers* n
        self.policies = policies
        buckets = []
        for i in range(self.count):
            policy = policies[i]
            n = &self.numbers[i]
            n.zero = _small(policy.zero_units)
            n.emergency = _small(policy.emergency_units)
            n.critical = _small(policy.critical_units)
            n.warning = _small(policy.warning_units)
            n.share_bp = _small(policy.share_bp)
            n.buffer_units = _small(policy.buffer_units)
            n.capped = policy.max_units is not None
            n.max_units = _small(policy.max_units) if n.capped else 0
            n.hold = _small(policy.hold_units)
            n.floor = _small(policy.floor_units)
            n.pool_only = policy.pool_only
            buckets.append((policy.pool, policy.reserve))
        self.buckets = tuple(buckets)

    def __dealloc__(self):
        free(self.numbers)


cdef _Pack _last = None


cdef tuple _compute(_Pack pack, object available_, object named, object shared_):
    cdef long long available = _small(available_), shared = _small(shared_)
    cdef long long units, drawn, bp
    cdef int level, worst = -1
    cdef Py_ssize_t i, count = pack.count
    cdef bint has_named = bool(named)
    cdef _Numbers* n
    out = [0] * (2 * count + 1)
    for i in range(count):
        n = &pack.numbers[i]
        if available <= n.zero:
            level = 4
        elif available <= n.emergency:
            level = 3
        elif available <= n.critical:
            level = 2
        elif available <= n.warning:
            level = 1
        else:
            level = 0
        units = 0
        if level != 4:
            if available <= 0:
                drawn = 0
            elif not has_named:
                drawn = 0 if n.pool_only else available
            else:
                drawn = 0
                for name in pack.buckets[i]:
                    counters = named.get(name) if name else None
                    if counters is not None:
                        drawn += _small(counters[0])
                if not n.pool_only and shared > 0:
                    drawn += shared
                if drawn > available:
                    drawn = available
            bp = n.share_bp
            if bp != 0 and drawn > _INT64_MAX // (bp if bp > 0 else -bp):
                raise _Outside()
            units = drawn * bp // _BASIS_POINTS - n.buffer_units  # // rounds down, as Python's
            if n.capped and units > n.max_units:
                units = n.max_units
            if level >= 2 and units > available - n.hold:
                units = available - n.hold
            if units <= n.floor:
                units = 0
        out[2 * i] = units
        out[2 * i + 1] = level
        if level > worst:
            worst = level
    out[2 * count] = worst
    return tuple(out)


def ats_values(policies, available, named, shared):
    """See reservd.channelpolicy.ats_values: ``(ats, level, ..., worst level)``."""
    global _last
    try:
        if _last is None or _last.policies is not policies:
            _last = _Pack(policies)
        return _compute(_last, available, named, shared)
    except _Outside:
        from reservd.channelpolicy import ats_values as definition

        return definition(policies, available, named, shared)
