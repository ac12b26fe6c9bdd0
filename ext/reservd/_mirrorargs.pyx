"""The C twins of the Redis mirror's per-row arguments: reservd.mirrorwrite.fields_text and
reservd.mirrorshown.channel_delta, which are the definitions (tests/test_mirror_ext.py checks
them equal on random fields). Every mirrored row of a SKU with channels passes through both,
a few times per Reserve (ahead of the fsync, then once durable): in Python they were most of
what channel fields cost the daemon's mirror task.
"""


def fields_text(tuple fields):
    """``(("ats:a", 9), ("level", 0))`` -> ``"ats:a\\n9\\nlevel\\n0"``."""
    cdef list parts = []
    cdef tuple pair
    for pair in fields:
        parts.append(pair[0])
        parts.append(str(pair[1]))
    return "\n".join(parts)


def channel_delta(tuple row, bint lower, tuple base):
    """See reservd.mirrorshown.channel_delta."""
    cdef tuple fields = row[2]
    cdef tuple held = base[2]
    cdef Py_ssize_t count = len(fields)
    cdef Py_ssize_t i
    cdef tuple pair, held_pair
    cdef list changed = []
    cdef list result = None
    if count != len(held) or count == 0:
        return None
    for i in range(count):
        pair = fields[i]
        held_pair = held[i]
        name = pair[0]
        if name is not held_pair[0] and name != held_pair[0]:
            return None
        value = pair[1]
        before = held_pair[1]
        if value == before:
            continue
        if lower:
            if name.startswith("level"):
                safe = value if value > before else before
            else:
                safe = value if value < before else before
            if safe is not value:
                if result is None:
                    result = list(fields)
                result[i] = (name, safe)
                value = safe
            if value == before:
                continue
        changed.append(name)
        changed.append(str(value))
    return (
        f"{base[0]},{base[1]}", "\n".join(changed),
        fields if result is None else tuple(result),
    )


def safest_fields(list states):
    """See reservd.mirrorfields.safest_fields. States whose names are the same, in the same
    order (a SKU whose channels and buckets did not change between them: nearly always) are
    merged position by position; any others by the definition."""
    cdef Py_ssize_t count = len(states[0])
    cdef Py_ssize_t i, j
    cdef tuple first = states[0]
    cdef tuple fields, pair
    cdef list names = [pair[0] for pair in first]
    cdef list values = [pair[1] for pair in first]
    cdef list higher = [name.startswith("level") for name in names]
    if len(set(names)) != count:
        return _by_definition(states)
    for j in range(1, len(states)):
        fields = states[j]
        if len(fields) != count:
            return _by_definition(states)
        for i in range(count):
            pair = fields[i]
            name = pair[0]
            if name is not names[i] and name != names[i]:
                return _by_definition(states)
            value = pair[1]
            if higher[i]:
                if value > values[i]:
                    values[i] = value
            elif value < values[i]:
                values[i] = value
    return tuple(zip(names, values))


def _by_definition(list states):
    from reservd.mirrorfields import safest_fields

    return safest_fields(states)
