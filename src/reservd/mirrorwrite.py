"""What the Redis mirror writes: the Lua scripts that apply a batch, their arguments, and the
per-SKU :func:`plan` that keeps Redis on the safe side of the truth across crashes.

Pure functions and constants, no I/O: reservd.mirror owns the connection and sends them.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Container, Iterable, Mapping

from reservd import stockstates
from reservd.extension import compiled
from reservd.mirrorfields import SAFEST_FIELDS, Fields
from reservd.table import Change, CounterTable

# One batch, applied atomically. KEYS[1]: the watermark; KEYS[2..]: stock hashes.
# ARGV: mode, epoch, seq, time_ms (0: leave the time), expected_seq, stale_after_ms, then twelve
# per stock hash: rule, seq, on_hand, reserved, committed, available, channels_seq,
# channels_exact, its channel fields as one string "name\nvalue\nname\nvalue..." (one
# argument, not two per field: packing them was most of a write's cost; names are printable),
# its stock states "quarantine,damaged,quality_control,safety_stock,incoming" at the same
# version, written with the counters under the counters' rule ("" writes none): the rule
# protects `available`, which already counts them; a "lower" write may show a state command
# that is not durable yet, as it shows the counters; then a *base* "channels_seq,channels_exact"
# and a *delta* (reservd.mirrorshown.channel_delta): "" and "" without one.
#   apply:   refuse the whole batch unless the watermark is of this epoch and at least
#            expected_seq (otherwise Redis lost what it held: reservd must rewrite everything);
#            write each stock hash by its rule; move the watermark forward.
#   rewrite: stock hashes only (a chunk of a full rewrite in a new epoch).
#   mark:    the watermark only: the full rewrite is complete.
# Rules: "newer": write when the stored version is older (the values are safe to show as they
# are); "lower": write only over a hash of this epoch with an older version *and* more
# available (the values are not durable yet: they may only take availability down).
# The channel fields (ats:<channel>, level:<channel>, level, free:<bucket>) have their own
# version, (channels_seq, channels_exact), and the same two rules: "newer" replaces them all
# (removing fields no longer there: a scan of the hash, skipped when channels_names, the names
# the hash holds, equals the new ones; "" when not known); "lower" takes each one only the safe
# way: the lower ats or free units, the higher level, a bucket absent from the hash or from the
# new state counting 0 free units there.
# A delta is what the rule would change over a hash whose channel fields reservd knows exactly
# (the base version, of this epoch, with the same names): when the hash is at the base version,
# only the delta's fields are written (the same result, without reading or parsing the rest;
# most of what channels cost Redis). Otherwise the full fields are taken as above.
# Returns {stock hashes written, one letter per stock hash}: "x" its channel fields are now
# exactly the written ones (the new fields by "newer", base + delta by "lower"), "k" they were
# not touched and are still the base, "u" not known.
BATCH_SCRIPT = """
local mode = ARGV[1]
local epoch = tonumber(ARGV[2])
local seq = tonumber(ARGV[3])
local mark = redis.call('HMGET', KEYS[1], 'epoch', 'seq', 'time_ms')
local mark_epoch = tonumber(mark[1])
local mark_seq = tonumber(mark[2]) or -1
if mode == 'apply' and (mark_epoch ~= epoch or mark_seq < tonumber(ARGV[5])) then
  return redis.error_reply('RESERVD_LOST the watermark is at epoch ' .. tostring(mark[1]) ..
    ' seq ' .. tostring(mark[2]) .. ', not epoch ' .. ARGV[2] .. ' seq >= ' .. ARGV[5])
end
if mark_epoch and mark_epoch > epoch then
  return redis.error_reply('RESERVD_NEWER the watermark has epoch ' .. mark[1] ..
    ', newer than ' .. ARGV[2] .. ': is another reservd mirroring under this prefix?')
end
local function channel_field(name)
  return string.sub(name, 1, 4) == 'ats:' or string.sub(name, 1, 5) == 'level' or
    string.sub(name, 1, 5) == 'free:'
end
local written = 0
local codes = {}
for i = 2, #KEYS do
  local at = 7 + (i - 2) * 12
  local key = KEYS[i]
  local rule = ARGV[at]
  local version = tonumber(ARGV[at + 1])
  local cseq = tonumber(ARGV[at + 6])
  local cexact = tonumber(ARGV[at + 7])
  local some = ARGV[at + 8] ~= ''
  local stored = redis.call('HMGET', key, 'epoch', 'seq', 'available', 'channels_seq',
    'channels_exact', 'channels_names')
  local stored_epoch = tonumber(stored[1])
  if stored_epoch and stored_epoch > epoch then
    return redis.error_reply('RESERVD_NEWER ' .. key .. ' has epoch ' .. stored[1] ..
      ', newer than ' .. ARGV[2] .. ': is another reservd mirroring under this prefix?')
  end
  local older = (tonumber(stored[2]) or -1) < version
  local stored_cseq = tonumber(stored[4])
  local colder = not stored_cseq or stored_cseq < cseq or
    (stored_cseq == cseq and (tonumber(stored[5]) or 0) < cexact)
  local lower = rule == 'lower'
  local write, cwrite
  if lower then
    write = stored_epoch == epoch and older and
      tonumber(ARGV[at + 5]) < (tonumber(stored[3]) or 0)
    cwrite = stored_epoch == epoch and colder and some
  else
    local replace = not stored_epoch or stored_epoch < epoch
    write = replace or older
    cwrite = (replace or colder) and (some or stored_cseq ~= nil)
  end
  local base = ARGV[at + 10]
  local known = base ~= '' and stored_epoch == epoch and stored_cseq ~= nil and
    stored[4] .. ',' .. tostring(stored[5]) == base
  local code = 'u'
  if not cwrite and known then
    code = 'k'
  end
  if write then
    local states = ARGV[at + 9]
    if states == '' then
      redis.call('HSET', key, 'on_hand', ARGV[at + 2], 'reserved', ARGV[at + 3],
        'committed', ARGV[at + 4], 'available', ARGV[at + 5], 'seq', ARGV[at + 1],
        'epoch', ARGV[2])
    else
      local q, d, qc, ss, inc = string.match(states, '^(%d+),(%d+),(%d+),(%d+),(%d+)$')
      redis.call('HSET', key, 'on_hand', ARGV[at + 2], 'reserved', ARGV[at + 3],
        'committed', ARGV[at + 4], 'available', ARGV[at + 5], 'seq', ARGV[at + 1],
        'epoch', ARGV[2], 'quarantine', q, 'damaged', d, 'quality_control', qc,
        'safety_stock', ss, 'incoming', inc)
    end
  end
  if cwrite and known then
    local values = {}
    for part in string.gmatch(ARGV[at + 11], '[^\\n]+') do
      values[#values + 1] = part
    end
    values[#values + 1] = 'channels_seq'
    values[#values + 1] = ARGV[at + 6]
    values[#values + 1] = 'channels_exact'
    values[#values + 1] = ARGV[at + 7]
    redis.call('HSET', key, unpack(values))
    code = 'x'
  elseif cwrite then
    local parts = {}
    for part in string.gmatch(ARGV[at + 8], '[^\\n]+') do
      parts[#parts + 1] = part
    end
    local count = #parts / 2
    local values = {}
    local names = {}
    for j = 0, count - 1 do
      names[j + 1] = parts[2 * j + 1]
    end
    -- The hash's channel field names, when known: equal to these, there is nothing stale to
    -- find, and the scan of the whole hash is skipped.
    local joined = table.concat(names, '\\n')
    local same = count > 0 and stored[6] == joined
    if lower then
      local given = {}
      for j = 1, count do
        given[names[j]] = true
      end
      if stored_cseq ~= nil and not same then
        -- A bucket the hash shows and the new state lacks has 0 free units there.
        local shown = redis.call('HGETALL', key)
        for j = 1, #shown, 2 do
          local name = shown[j]
          if string.sub(name, 1, 5) == 'free:' and not given[name] and
              tonumber(shown[j + 1]) > 0 then
            values[#values + 1] = name
            values[#values + 1] = '0'
          end
        end
      end
      local old = redis.call('HMGET', key, unpack(names))
      for j = 0, count - 1 do
        local name = names[j + 1]
        local value = tonumber(parts[2 * j + 2])
        local before = tonumber(old[j + 1])
        if before == nil and string.sub(name, 1, 5) == 'free:' then
          before = 0
        end
        if before ~= nil then
          if string.sub(name, 1, 5) == 'level' then
            value = math.max(value, before)
          else
            value = math.min(value, before)
          end
        end
        values[#values + 1] = name
        values[#values + 1] = string.format('%d', value)
      end
      if not same then
        joined = ''  -- new names beside the old: unknown until a "newer" write
      end
    else
      local keep = {}
      for j = 0, count - 1 do
        local name = parts[2 * j + 1]
        keep[name] = true
        values[#values + 1] = name
        values[#values + 1] = parts[2 * j + 2]
      end
      if stored_cseq ~= nil and not same then
        local stale = {}
        for _, name in ipairs(redis.call('HKEYS', key)) do
          if channel_field(name) and not keep[name] then
            stale[#stale + 1] = name
          end
        end
        if #stale > 0 then
          redis.call('HDEL', key, unpack(stale))
        end
      end
    end
    if count > 0 then
      values[#values + 1] = 'channels_seq'
      values[#values + 1] = ARGV[at + 6]
      values[#values + 1] = 'channels_exact'
      values[#values + 1] = ARGV[at + 7]
      values[#values + 1] = 'channels_names'
      values[#values + 1] = joined
      redis.call('HSET', key, unpack(values))
      if not lower then
        code = 'x'
      end
    else
      redis.call('HDEL', key, 'channels_seq', 'channels_exact', 'channels_names')
    end
  end
  codes[#codes + 1] = code
  if write or cwrite then
    written = written + 1
  end
end
if mode ~= 'rewrite' then
  local time_ms = tonumber(ARGV[4])
  local newer = mark_epoch ~= epoch or mark_seq < seq
  if newer or (mark_seq == seq and (tonumber(mark[3]) or 0) < time_ms) then
    local stamp = ARGV[4]
    if time_ms == 0 then
      stamp = mark[3] or '0'
    end
    redis.call('HSET', KEYS[1], 'epoch', ARGV[2], 'seq', ARGV[3], 'time_ms', stamp,
      'stale_after_ms', ARGV[6])
  end
end
return {written, table.concat(codes)}
"""

# A new epoch, above the counter, the watermark and the caller's current epoch (Redis may have
# lost the counter with the rest of its data while reservd still remembers its epoch).
# KEYS[1]: the epoch counter; KEYS[2]: the watermark. ARGV[1]: the caller's epoch.
EPOCH_SCRIPT = """
local epoch = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'),
  tonumber(redis.call('HGET', KEYS[2], 'epoch') or '0'), tonumber(ARGV[1])) + 1
redis.call('SET', KEYS[1], epoch)
return epoch
"""

def batch_command(
    prefix: str, mode: str, epoch: int, seq: int, time_ms: int, expected_seq: int,
    stale_after_ms: int, rows: Iterable[Change], lower: Container[str] = (),
    channels: Mapping[str, ChannelRow] | None = None,
    states: Callable[[str, int], str] | None = None,
    deltas: Mapping[str, Delta] | None = None,
) -> tuple[list[str], list]:
    """KEYS and ARGV of one :data:`BATCH_SCRIPT` call; ``rows`` as the change ring has them:
    (seq, sku, on_hand, reserved, committed, unsellable); the SKUs in ``lower`` are written by
    the "lower" rule (not durable yet), the others by the "newer" rule. ``channels``: per SKU
    its channel fields and their version (a SKU without: none, at the row's own version).
    ``states(sku, seq)``: the SKU's stock states at the row's version as the script takes
    them (reservd.statehistory.StateHistory.text_at), written with its counters (none: not
    written). ``deltas``: per SKU its :func:`reservd.mirrorshown.channel_delta` (a SKU without:
    none)."""
    stock = prefix + "stock:"
    keys = [prefix + "watermark"]
    args: list = [mode, epoch, seq, time_ms, expected_seq, stale_after_ms]
    channels = channels or {}
    deltas = deltas or {}
    for version, sku, on_hand, reserved, committed, unsellable in rows:
        keys.append(stock + sku)
        channels_seq, channels_exact, fields = channels.get(sku) or (version, 1, ())
        delta = deltas.get(sku)
        args += (
            "lower" if sku in lower else "newer", version, on_hand, reserved, committed,
            stockstates.available(on_hand, reserved, committed, unsellable),
            channels_seq, channels_exact,
            FIELDS_TEXT(fields),
            "" if states is None else states(sku, version),
            *(("", "") if delta is None else delta[:2]),
        )
    return keys, args


def fields_text(fields: Fields) -> str:
    """A row's channel fields as the script takes them: ``"name\nvalue\nname\nvalue..."``.
    The definition; :data:`FIELDS_TEXT` is its C twin when built (reservd._mirrorargs)."""
    return "\n".join([f"{name}\n{value}" for name, value in fields])


# What batch_command calls: the C twin when built.
FIELDS_TEXT = compiled("reservd._mirrorargs", "fields_text", fields_text)


def pack(arguments: Iterable[str | int]) -> bytes:
    """One command in RESP, as redis-py's pack_command makes it, without its per-argument
    cost (the mirror's hot path sends one per batch)."""
    parts = [b""]
    for argument in arguments:
        data = argument.encode() if isinstance(argument, str) else b"%d" % argument
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    parts[0] = b"*%d\r\n" % (len(parts) - 1)
    return b"".join(parts)


# A SKU's channel fields in one write: (channels_seq, channels_exact, fields). channels_seq is
# the sequence of the SKU's newest change they account for; channels_exact 1 when they are its
# state then (durable), 0 when the safest value over the states a recovery could bring back.
ChannelRow = tuple[int, int, Fields]

# What the script writes for a SKU whose channel fields Redis holds exactly (the base, a
# ChannelRow): (base version "channels_seq,channels_exact", the changed fields as one string,
# the fields the hash then holds); see reservd.mirrorshown.
Delta = tuple[str, str, Fields]


def _available(change: Change) -> int:
    return stockstates.available(*change[2:])


def read_entries(table: CounterTable, position: int, seq_max: int, read_max: int):
    """Every ring entry from ``position`` up to ``seq_max``: (position after them, entries)."""
    entries: list[Change] = []
    while True:
        position, changes = table.changes(position, read_max, seq_max)
        entries += changes
        if len(changes) < read_max:
            return position, entries


@dataclasses.dataclass
class Plan:
    """One mirror write: ``rows`` (one per SKU), the SKUs among them written by the "lower"
    rule, their channel fields, and the ring position after the last durable entry read (where
    the next plan starts).
    """

    rows: list[Change]
    lower: set[str]
    settled_position: int
    settled_entries: int  # durable entries read (changes mirrored for good)
    channels: dict[str, ChannelRow] = dataclasses.field(default_factory=dict)
    # SKUs with entries not durable yet: their rows may come again, unchanged, in the next plan.
    pending: set[str] = dataclasses.field(default_factory=set)


def plan(
    table: CounterTable, position: int, durable_seq: int, target: int, read_max: int,
    fields_at: Callable[[int], Fields] | None = None,
) -> Plan:
    """What to write so that Redis shows every change up to ``target`` that lowers
    availability, and never more available than any state a recovery could bring back.

    ``position`` is the ring position of the first entry after the last durable sequence the
    mirror wrote (every entry before it is in Redis, or superseded there by a lower one). The
    entries from it up to ``target`` split at ``durable_seq``: per SKU, its *base* is its newest
    durable entry, and its *pending* entries are the ones after (applied, not yet fsync'd). After
    a crash the log holds the changes up to some sequence between ``durable_seq`` and
    ``target`` (or beyond, with changes no write has covered), so per SKU the state a recovery
    brings back is its base or one of its pending entries: the write shows their minimum.

    - A SKU with a base: whichever of the base and its least-available pending entry has less
      available (the newer on a tie), by the "newer" rule. Both the base and every pending
      entry are >= it. Versions never go back: the base is newer than anything the previous
      write could have chosen below it, and a pending entry stays chosen until one newer and
      no higher replaces it.
    - A SKU with pending entries only: its durable state is the one Redis already reflects
      (Redis holds it or something lower), so its least-available pending entry is written by
      the "lower" rule: only if it has less available than Redis holds.

    Releases, expiries, commits of fewer units, restocks (anything that raises availability)
    therefore reach Redis once durable; grants and stock taken down reach it ahead of the fsync.

    The channel fields (``fields_at``: ring position -> that entry's fields; None: there are
    none) take the same states field by field: each shows its safest value over the base and
    the pending entries (:func:`reservd.mirrorfields.safest`: an ``ats`` or free units its
    lowest, a level its highest), versioned (newest entry's sequence, exact once no entry is
    pending), so an ``ats`` or a bucket going down reaches Redis ahead of the fsync and one
    going up only once durable.
    """
    settled_position, durable = read_entries(table, position, durable_seq, read_max)
    _, pending = read_entries(table, settled_position, target, read_max)
    base: dict[str, Change] = {change[1]: change for change in durable}
    least: dict[str, Change] = {}
    for change in pending:
        sku = change[1]
        current = least.get(sku)
        if current is None or _available(change) <= _available(current):
            least[sku] = change
    channels: dict[str, ChannelRow] = {}
    if fields_at is not None:
        channels = _channel_rows(position, durable, settled_position, pending, fields_at)
    waiting = set(least)
    rows: list[Change] = []
    lower: set[str] = set()
    for sku, change in base.items():
        candidate = least.pop(sku, None)
        if candidate is not None and _available(candidate) <= _available(change):
            change = candidate
        rows.append(change)
    rows += least.values()
    lower.update(least)
    return Plan(rows, lower, settled_position, len(durable), channels, waiting)


def _channel_rows(
    position: int, durable: list[Change], settled_position: int, pending: list[Change],
    fields_at: Callable[[int], Fields],
) -> dict[str, ChannelRow]:
    """Per SKU, its channel fields over its base (newest durable entry) and pending entries."""
    base_at: dict[str, int] = {}
    newest: dict[str, int] = {}
    for offset, change in enumerate(durable):
        base_at[change[1]] = position + offset
        newest[change[1]] = change[0]
    states: dict[str, list[Fields]] = {sku: [fields_at(at)] for sku, at in base_at.items()}
    waiting: set[str] = set()
    for offset, change in enumerate(pending):
        sku = change[1]
        states.setdefault(sku, []).append(fields_at(settled_position + offset))
        newest[sku] = change[0]
        waiting.add(sku)
    rows: dict[str, ChannelRow] = {}
    for sku, seen in states.items():
        fields = seen[0] if len(seen) == 1 else SAFEST_FIELDS(seen)
        rows[sku] = (newest[sku], 0 if sku in waiting else 1, fields)
    return rows
