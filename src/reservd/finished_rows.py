"""Finished records in snapshots: to and from reservd.state_codec's FINISHED rows, and the
finished reservations and adjustments of older snapshot formats turned into records.

A record holds counter-table handles and an interned origin index, which mean something in one
process only; a snapshot row names SKUs, channel and owner instead. Keys and digests are the
same in every process (reservd.finished), so they are carried as they are.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

from reservd import finished
from reservd.finished import FinishedAdjustment, FinishedReservation

_FINISHED_STATES = (3, 4, 5)  # released, expired, fulfilled (reservd.store.State)


def snapshot_rows(
    raw: bytes, sku_of: Callable[[int], str], origin_of: Callable[[int], tuple[str, str]]
) -> Iterator[tuple]:
    """FINISHED rows (reservd.state_codec) of :meth:`FinishedTable.raw` bytes, oldest first."""
    for key, kept in finished.records(raw):
        if isinstance(kept, FinishedReservation):
            channel, owner = origin_of(kept.origin)
            yield (
                finished.KIND_RESERVATION, key, kept.digest, kept.seq, kept.finished_at_ms,
                kept.state, kept.committed, kept.expires_at_ms, channel, owner,
                tuple((sku_of(handle), granted, moved) for handle, granted, moved in kept.lines),
            )
        else:
            yield (
                finished.KIND_ADJUSTMENT, key, kept.digest, kept.seq, kept.finished_at_ms,
                kept.kind, sku_of(kept.handle), kept.on_hand, kept.reserved, kept.committed,
                kept.previous_on_hand,
            )


def record(
    row: tuple, lookup: Callable[[str], int], origin: Callable[[str, str], int]
) -> bytes:
    """The packed record of a FINISHED row."""
    kind, key, digest, seq, finished_at_ms, *rest = row
    if kind == finished.KIND_RESERVATION:
        state, committed, expires_at_ms, channel, owner, lines = rest
        return finished.pack_reservation(key, FinishedReservation(
            digest, seq, finished_at_ms, state, origin(channel, owner), expires_at_ms,
            committed, tuple((_handle(lookup, sku), granted, moved) for sku, granted, moved in lines),
        ))
    record_type, sku, on_hand, reserved, committed, previous_on_hand = rest
    return finished.pack_adjustment(key, FinishedAdjustment(
        digest, seq, finished_at_ms, record_type, _handle(lookup, sku), on_hand, reserved,
        committed, previous_on_hand,
    ))


def from_legacy(
    reservations: Iterable[tuple[tuple, str]], adjustments: Iterable[tuple],
    lookup: Callable[[str], int], origin: Callable[[str, str], int],
) -> list[bytes]:
    """Records of the finished reservations ``(RESERVATION row, owner)`` and the ADJUSTMENT
    rows of a format 2-4 snapshot, oldest first (those formats kept them in no order)."""
    dated: list[tuple[int, int, bytes]] = []
    for row, owner in reservations:
        (reservation_id, channel, request, held_skus, granted, committed, state, expires_at_ms,
         seq, finished_at_ms) = row
        given = dict(zip(held_skus, granted))
        moved = dict(zip(held_skus, committed or ()))
        lines = tuple(
            (_handle(lookup, sku), given.get(sku, 0), moved.get(sku, 0)) for sku in request[0]
        )
        dated.append((finished_at_ms, seq, finished.pack_reservation(
            finished.reservation_key(reservation_id),
            FinishedReservation(
                finished.reserve_digest(request), seq, finished_at_ms, state,
                origin(channel, owner), expires_at_ms, committed is not None, lines,
            ),
        )))
    for adjustment_id, record_type, (sku, value, expected), outcome, finished_at_ms in adjustments:
        _, on_hand, reserved, committed_units, previous_on_hand, _, seq, _ = outcome
        dated.append((finished_at_ms, seq, finished.pack_adjustment(
            finished.adjustment_key(adjustment_id),
            FinishedAdjustment(
                finished.adjustment_digest((record_type, sku, value, expected)), seq,
                finished_at_ms, record_type, _handle(lookup, sku), on_hand, reserved,
                committed_units, previous_on_hand,
            ),
        )))
    dated.sort(key=lambda entry: entry[:2])
    return [packed for _, _, packed in dated]


def is_finished(state: int) -> bool:
    return state in _FINISHED_STATES


def _handle(lookup: Callable[[str], int], sku: str) -> int:
    handle = lookup(sku)
    if handle < 0:
        raise ValueError(f"snapshot: finished record names sku {sku!r}, which it does not stock")
    return handle
