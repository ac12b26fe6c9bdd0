"""The history checker's part for channels and buckets (README "Channels, buckets and ats"):
which log record is which SetChannel, SetSkuPolicy or Allocate call, what the model
(history_buckets.ChannelModel, written from the README) says of each, each Reserve line's
draws and ``ats``, and the final GetBuckets and GetAts.

The admin answers (a ChannelResponse's policy, an AllocateResponse's buckets) are read once the
change is durable, so they show the state at one sequence between the change's own and the
call's completion: they are checked against the model at every such point, as sold-out answers
are. An Allocate refused with FAILED_PRECONDITION must have found its source bucket with too
few free units at one point the call could have seen."""
from __future__ import annotations

import grpc
from history_buckets import DEFAULTS, NUMBERS, SHARED

from reservd.records import RecordType
from reservd.v1 import reservd_pb2 as pb

KINDS = {
    "set_channel": RecordType.SET_CHANNEL,
    "set_sku_policy": RecordType.SET_SKU_POLICY,
    "allocate": RecordType.ALLOCATE,
}
RECORD_KINDS = {record_type: kind for kind, record_type in KINDS.items()}
# The layout of a SET_CHANNEL record's numbers: the policy's fields after pool and reserve.
_RECORD_NUMBERS = ("pool_only", "share_bp", "buffer_units", "max_units", "floor_units",
                   "enforcement", "warning_units", "critical_units", "emergency_units",
                   "zero_units", "hold_units")


def key(message) -> str:
    """Every channel change is idempotent by its change id (one namespace for the three)."""
    return message.change_id


def overrides_of(message: pb.ChannelPolicy) -> dict:
    """The fields a ChannelPolicy message sets (unset ones are not overridden)."""
    out = {name: getattr(message, name) for name in NUMBERS if message.HasField(name)}
    if message.enforcement:
        out["enforcement"] = message.enforcement
    return out


def policy_of(message: pb.ChannelPolicy) -> dict:
    """A SetChannel request's whole policy: unset fields take their defaults."""
    return {**DEFAULTS, "pool": message.pool, "reserve": message.reserve,
            "pool_only": message.pool_only, **overrides_of(message)}


def _answered_policy(message: pb.ChannelPolicy) -> dict:
    """An answer's policy ("every field set", max_units absent when there is no cap)."""
    return {"pool": message.pool, "reserve": message.reserve, "pool_only": message.pool_only,
            "enforcement": message.enforcement,
            **{name: getattr(message, name) if message.HasField(name) else None
               for name in NUMBERS}}


def _logged_policy(command) -> dict:
    numbers = dict(zip(_RECORD_NUMBERS, command.numbers))
    return {**DEFAULTS, "pool": command.pool, "reserve": command.reserve, **numbers,
            "pool_only": bool(numbers["pool_only"])}


def _change(kind: str, request, command) -> tuple:
    """(change id, what it changes): from the log record when there is one, else the call."""
    if kind == "set_channel":
        if command is not None:
            return command.change_id, (command.channel, _logged_policy(command))
        return request.change_id, (request.channel, policy_of(request.policy))
    if kind == "set_sku_policy":
        if command is not None:
            return command.change_id, (command.sku, command.channel, dict(command.overrides))
        return request.change_id, (request.sku, request.channel, overrides_of(request.overrides))
    source = command if command is not None else request
    return source.change_id, (source.sku, source.from_bucket, source.to_bucket, source.units)


def record_matches(op, command) -> bool:
    return _change(op.kind, op.request, command) == _change(op.kind, op.request, None)


def apply(model, seq: int, op, command):
    """Apply the change at ``seq``; nothing to compare then (the answer is read after the
    wait: :func:`check_answers`)."""
    change_id, what = _change(op.kind, op.request, command)
    book = model.channels
    if op.kind == "set_channel":
        return book.set_channel(seq, change_id, *what)
    if op.kind == "set_sku_policy":
        return book.set_sku_policy(seq, change_id, *what)
    return book.allocate(seq, change_id, *what)


def _model_request(kind: str, what: tuple) -> tuple:
    """What ChannelModel remembers of a change (see its set_channel, set_sku_policy,
    allocate)."""
    if kind == "set_channel":
        return ("set_channel", what[0], tuple(sorted(what[1].items())))
    if kind == "set_sku_policy":
        return ("set_sku_policy", *what[:2], tuple(sorted(what[2].items())))
    return ("allocate", *what)


def check_replay(model, op, bad) -> None:
    """A replayed change: the model applied that change id with that payload, at the
    sequence the answer names."""
    change_id, what = _change(op.kind, op.request, None)
    entry = model.channels.changes.get(change_id)
    if entry is None or entry[0] != _model_request(op.kind, what):
        bad(f"replayed a {op.kind} the model never applied with that payload: {op}")
    elif entry[1] != op.response.sequence:
        bad(f"replayed seq {op.response.sequence}, the change was seq {entry[1]}: {op}")


def seen_draws(line: pb.LineOutcome) -> tuple:
    """Where a Reserve line's units came from; no bucket listed: every unit from shared."""
    parts = tuple((part.bucket, part.units) for part in line.buckets)
    return parts or (((SHARED, line.granted),) if line.granted else ())


def _answer_at(model, op, point: int):
    """What the answer of ``op`` would say at ``point``."""
    book = model.channels
    request = op.request
    if op.kind == "set_channel":
        policy = book.policies_at(point).channels.get(request.channel)
        return (request.channel, policy)
    if op.kind == "set_sku_policy":
        policies = book.policies_at(point)
        if request.channel not in policies.channels:
            return None
        return (request.sku, request.channel, policies.of(request.sku, request.channel))
    view = book.view_at(request.sku, point)
    return None if view is None else (request.sku, view.rows())


def _seen_answer(op):
    response = op.response
    if op.kind == "set_channel":
        return (response.channel.channel, _answered_policy(response.channel.policy))
    if op.kind == "set_sku_policy":
        return (response.sku, response.channel.channel,
                _answered_policy(response.channel.policy))
    return (response.buckets.sku, tuple((b.bucket, b.free, b.reserved, b.committed)
                                        for b in response.buckets.buckets))


def check_answers(model, ops, lo: dict, hi: dict, last_seq: int, bad) -> int:
    """The admin answers and the refused Allocates, once the whole history is in the model;
    returns how many were checked."""
    book = model.channels
    checked = 0
    for op in ops:
        if op.kind not in KINDS:
            continue
        skus = [op.request.sku] if op.kind != "set_channel" else []
        if op.acked and not op.response.replayed:
            start, end = op.response.sequence, hi.get(id(op), last_seq)
            seen = _seen_answer(op)
            if not any(_answer_at(model, op, p) == seen for p in book.points(skus, start, end)):
                bad(f"answered {seen}, which the model never had between seq {start} and "
                    f"{end}: {op}")
            checked += 1
        elif op.kind == "allocate" and op.code == grpc.StatusCode.FAILED_PRECONDITION:
            request = op.request
            views = [book.view_at(request.sku, p)
                     for p in book.points(skus, lo.get(id(op), 0), hi.get(id(op), last_seq))]
            if not op.details.startswith("from_bucket") or not any(
                view is not None and (view.free(request.from_bucket) or 0) < request.units
                for view in views
            ):
                bad(f"refused, but {request.from_bucket!r} had at least {request.units} free "
                    f"units at every point the call could have seen: {op}")
            checked += 1
    return checked


async def read_final(admin, reservations, skus, channels) -> tuple[dict, dict]:
    """GetBuckets of every SKU and GetAts of every (sku, channel), for history.FinalState."""
    skus = sorted(set(skus))
    buckets = {
        row.sku: tuple((b.bucket, b.free, b.reserved, b.committed) for b in row.buckets)
        for row in (await admin.GetBuckets(pb.GetBucketsRequest(skus=skus))).skus
    }
    ats = {}
    if channels:
        response = await reservations.GetAts(pb.GetAtsRequest(skus=skus,
                                                              channels=sorted(channels)))
        ats = {(a.sku, a.channel): (a.ats, a.level, a.stale) for a in response.ats}
    return buckets, ats


def check_final(model, buckets: dict | None, ats: dict | None, bad) -> None:
    book = model.channels
    for sku, rows in (buckets or {}).items():
        view = book.view(sku)
        want = None if view is None else view.rows()
        if rows != want:
            bad(f"final buckets of {sku!r}: reservd {rows}, the model {want}")
    for (sku, channel), seen in (ats or {}).items():
        want = None if sku not in model.stock else (*book.ats_of(sku, channel), False)
        if seen != want:
            bad(f"final ats of {sku!r} on {channel!r}: reservd (ats, level, stale) {seen}, "
                f"the model {want}")
