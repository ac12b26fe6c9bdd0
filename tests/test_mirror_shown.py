"""Channel fields sent as deltas over what Redis holds (reservd.mirrorshown) leave every hash
exactly as the full fields would: the same script, a real redis-server, two prefixes written
side by side, one with the deltas and one without."""
from __future__ import annotations

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reservd import mirrorwrite
from reservd.mirrorshown import ShownFields, channel_delta

pytestmark = pytest.mark.redis

NAME_SETS = (
    ("ats:a", "level:a", "level", "free:shared"),
    ("ats:a", "level:a", "ats:b", "level:b", "level", "free:shared", "free:p"),
    ("ats:b", "level:b", "level", "free:shared", "free:q"),
)


def test_a_delta_holds_what_the_rule_changes():
    base = (4, 1, (("ats:a", 9), ("level:a", 0), ("level", 1), ("free:shared", 6)))
    newer = (5, 1, (("ats:a", 8), ("level:a", 0), ("level", 0), ("free:shared", 6)))
    assert channel_delta(newer, False, base) == (
        "4,1", "ats:a\n8\nlevel\n0", newer[2])
    # "lower": each field only the safe way (a level never goes down).
    assert channel_delta((5, 0, newer[2]), True, base) == (
        "4,1", "ats:a\n8", (("ats:a", 8), ("level:a", 0), ("level", 1), ("free:shared", 6)))
    # Other names: no delta (the script must remove the stale fields).
    assert channel_delta((5, 1, newer[2][:3]), False, base) is None
    assert channel_delta((5, 1, (("ats:b", 8),) + newer[2][1:]), False, base) is None


def test_known_skus_are_bounded_least_recently_written_first():
    shown = ShownFields(skus_max=2)
    rows = [(n, sku, 10, 0, 0, 0) for n, sku in enumerate("abc", 1)]
    channels = {sku: (n, 1, (("ats:x", n),)) for n, sku, *_ in rows}
    shown.note(rows[:2], b"xx", (), channels, {})
    shown.note(rows[:1], b"x", (), channels, {})  # "a" written again: "b" is now the oldest
    shown.note(rows[2:], b"x", (), channels, {})
    assert sorted(shown._rows) == ["a", "c"]
    shown.note(rows[:1], b"u", (), channels, {})  # not known any more
    assert sorted(shown._rows) == ["c"]
    shown.forget()
    assert len(shown) == 0


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from redisserver import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    connection = redis.Redis(port=server.port)
    yield connection
    connection.close()
    server.close()


_value = st.integers(0, 9)

_write = st.tuples(
    st.integers(-1, 2),  # the version's step (an older or the same version changes nothing)
    st.booleans(),  # exact (durable) or not
    st.booleans(),  # by the "lower" rule
    st.sampled_from(range(len(NAME_SETS))),
    st.lists(_value, min_size=7, max_size=7),
    st.sampled_from(("write", "write", "write", "lost", "no fields", "unnoted")),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=st.lists(_write, min_size=1, max_size=25))
def test_deltas_leave_every_hash_as_the_full_fields_would(client, writes):
    """Random writes of one SKU's channel fields (versions forward, repeated and back; both
    rules; names changing; Redis losing the hash; a restart without channels; a write whose
    reply reservd never read, so what it knows is stale), each written twice: under "d:" with
    the deltas :class:`ShownFields` proposes, under "f:" with the full fields only. After each,
    both hashes are equal field for field, and what is known of the SKU is what its hash
    holds (once a reply was read again)."""
    sha = client.script_load(mirrorwrite.BATCH_SCRIPT)
    client.flushall()
    shown = ShownFields(skus_max=10)
    for prefix in ("d:", "f:"):
        keys, args = mirrorwrite.batch_command(prefix, "mark", 1, 0, 1, 0, 1_000, [])
        client.evalsha(sha, len(keys), *keys, *args)
    seq = 1
    stale = False
    for step, exact, lower, names, values, what in writes:
        if what == "lost":
            client.delete("d:stock:s", "f:stock:s")
            shown.forget()  # the mirror's resync after Redis lost data
            continue
        seq = max(1, seq + step)
        fields = () if what == "no fields" else tuple(zip(NAME_SETS[names], values))
        row = (seq, "s", 10, values[0], 0, 0)
        channels = {"s": (seq, int(exact), fields)}
        rule = {"s"} if lower else set()
        deltas = shown.deltas([row], rule, channels)
        codes = []
        for prefix, given_deltas in (("d:", deltas), ("f:", {})):
            keys, args = mirrorwrite.batch_command(
                prefix, "apply", 1, seq, 1, 0, 1_000, [row], rule, channels, None,
                given_deltas)
            codes.append(client.evalsha(sha, len(keys), *keys, *args)[1])
        with_deltas = client.hgetall("d:stock:s")
        assert with_deltas == client.hgetall("f:stock:s")
        stale = what == "unnoted"
        if not stale:
            shown.note([row], codes[0], rule, channels, deltas)
        known = shown._rows.get("s")
        if known is not None and not stale:
            held = {name.decode(): int(value) for name, value in with_deltas.items()
                    if name.decode().split(":")[0] in ("ats", "level", "free")}
            assert held == dict(known[2])
            assert (int(with_deltas[b"channels_seq"]), int(with_deltas[b"channels_exact"])) \
                == known[:2]
