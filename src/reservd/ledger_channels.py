"""The ledger's channel commands: SetChannel, SetSkuPolicy, Allocate, and the channel's limits
on a Reserve. Mixed into reservd.ledger.Ledger, so they follow its one order (check every
precondition -> apply -> append the command -> advance the sequence) and its replay path; the
rules themselves are reservd.channels'.

The channel state travels in snapshots as a JSON section after the ledger's own bytes
(:func:`wrap`/:func:`unwrap`): readable from any language, and older snapshots without it still
restore.
"""
from __future__ import annotations

import dataclasses
import json
import struct
from typing import NamedTuple

from reservd import records
from reservd.channelpolicy import Enforcement, Policy, policy_row
from reservd.records import RecordType
from reservd.table import (
    RESERVE_FINISHED, RESERVE_INSUFFICIENT, RESERVE_OK, RESERVE_UNKNOWN_SKU,
)

_MAGIC = b"RSVDCH1\n"
_LENGTH = struct.Struct("<Q")


class ChangeOutcome(NamedTuple):
    seq: int  # the mutation to wait for before answering
    replayed: bool  # an identical earlier change (same change_id and payload)


def _tupled(value):
    return tuple(_tupled(item) for item in value) if isinstance(value, list) else value


def wrap(ledger_payload: bytes, channel_rows: dict) -> bytes:
    """A snapshot payload: the ledger's bytes, then the channel state as JSON."""
    if not any(channel_rows.values()):
        return ledger_payload
    section = json.dumps(channel_rows, separators=(",", ":")).encode()
    return b"".join((_MAGIC, _LENGTH.pack(len(ledger_payload)), ledger_payload, section))


def unwrap(payload: bytes) -> tuple[bytes, dict]:
    if not payload.startswith(_MAGIC):
        return payload, {}
    (length,) = _LENGTH.unpack_from(payload, len(_MAGIC))
    start = len(_MAGIC) + _LENGTH.size
    if start + length > len(payload):
        raise ValueError("snapshot: the channel section's ledger length runs past the end")
    try:
        rows = json.loads(payload[start + length:])
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(
            f"snapshot: the channel section is truncated or damaged ({error})"
        ) from None
    if not isinstance(rows, dict):
        raise ValueError("snapshot: the channel section is not a JSON object")
    return payload[start:start + length], {kind: _tupled(value) for kind, value in rows.items()}


class ChannelCommands:
    """Needs the Ledger's channels, table, clock, config, seq and its _execute, _unwritable,
    _rejection and _available."""

    # -- Reserve ------------------------------------------------------------------------------

    def _reserve_in_table(
        self, skus: tuple[str, ...], quantities: tuple[int, ...], channel: str,
        allow_partial: bool, seq: int, reservation_id: str,
    ):
        """The table's reserve within what the channel may draw (its buckets, a strict
        channel's ats), in the same synchronous step, unless ``reservation_id`` has a finished
        record (RESERVE_FINISHED). Same answer shape as table.reserve."""
        table = self.table
        if not self.channels.active:
            # The common case: one call hashes the id, probes the finished records and reserves.
            return table.reserve(
                skus, quantities, allow_partial, seq, self.finished, reservation_id
            )
        kept = self.finished.reservation(reservation_id)
        if kept is not None:
            return RESERVE_FINISHED, kept, None, None
        limits = self.channels.limits(skus, channel)
        if limits is None:
            return table.reserve(skus, quantities, allow_partial, seq)
        asked = tuple(
            quantity if limit < 0 else min(quantity, limit)
            for quantity, limit in zip(quantities, limits)
        )
        if asked == quantities:
            return table.reserve(skus, quantities, allow_partial, seq)
        nothing = (0,) * len(skus)
        handles = tuple(table.lookup(sku) for sku in skus)
        if -1 in handles:
            return RESERVE_UNKNOWN_SKU, handles, nothing, nothing
        if not allow_partial or not any(asked):
            return RESERVE_INSUFFICIENT, handles, nothing, self._available(skus)
        kept = [i for i, quantity in enumerate(asked) if quantity]
        status, _, kept_granted, _ = table.reserve(
            tuple(skus[i] for i in kept), tuple(asked[i] for i in kept), True, seq
        )
        if status != RESERVE_OK:
            return status, handles, nothing, self._available(skus)
        granted = [0] * len(skus)
        for i, quantity in zip(kept, kept_granted):
            granted[i] = quantity
        return RESERVE_OK, handles, tuple(granted), self._available(skus)

    # -- Admin --------------------------------------------------------------------------------

    def set_channel(
        self, change_id: str, channel: str, policy: Policy
    ) -> ChangeOutcome:
        """Create or replace ``channel``'s policy."""
        request = ("channel", channel, policy_row(policy))
        return self._channel_change(
            change_id, request, lambda: self.channels.check_set_channel(channel, policy),
            RecordType.SET_CHANNEL,
            lambda at_ms: records.SetChannel(
                at_ms, change_id, channel, policy.pool, policy.reserve,
                policy_row(policy)[2:],
            ),
        )

    def set_sku_policy(
        self, change_id: str, sku: str, channel: str, overrides: dict[str, object]
    ) -> ChangeOutcome:
        """Replace ``sku``'s overrides of ``channel``'s policy (empty: none)."""
        items = tuple(sorted(
            (name, None if value is None else int(value)) for name, value in overrides.items()
        ))
        request = ("sku_policy", sku, channel, items)
        return self._channel_change(
            change_id, request, lambda: self.channels.check_sku_policy(sku, channel),
            RecordType.SET_SKU_POLICY,
            lambda at_ms: records.SetSkuPolicy(at_ms, change_id, sku, channel, items),
        )

    def allocate(
        self, change_id: str, sku: str, from_bucket: str, to_bucket: str, units: int
    ) -> ChangeOutcome:
        """Move ``units`` free units of ``sku`` from one bucket to another."""
        request = ("allocate", sku, from_bucket, to_bucket, units)
        return self._channel_change(
            change_id, request,
            lambda: self.channels.check_allocate(sku, from_bucket, to_bucket, units),
            RecordType.ALLOCATE,
            lambda at_ms: records.Allocate(at_ms, change_id, sku, from_bucket, to_bucket, units),
        )

    def _channel_change(self, change_id, request, check, kind, command_at):
        earlier = self.channels.check_change(change_id, request)
        if isinstance(earlier, tuple):
            return self._rejection(*earlier)
        if earlier is not None:
            return ChangeOutcome(earlier, True)
        refused = self._unwritable()
        if refused is not None:
            return refused
        refusal = check()
        if refusal is not None:
            return self._rejection(*refusal)
        _, seq = self._execute(kind, command_at(self.clock.now_ms()))
        return ChangeOutcome(seq, False)

    def _apply_channels(self, kind: RecordType, command, seq: int) -> None:
        """The one apply path of the channel commands, live and in replay."""
        channels = self.channels
        if kind is RecordType.SET_CHANNEL:
            policy = policy_from_command(command)
            channels.apply_set_channel(command.channel, policy)
            request = ("channel", command.channel, policy_row(policy))
        elif kind is RecordType.SET_SKU_POLICY:
            channels.apply_sku_policy(command.sku, command.channel, overrides_from_command(command))
            request = ("sku_policy", command.sku, command.channel, command.overrides)
        else:
            assert kind is RecordType.ALLOCATE, kind
            channels.apply_allocate(
                command.sku, command.from_bucket, command.to_bucket, command.units
            )
            request = (
                "allocate", command.sku, command.from_bucket, command.to_bucket, command.units
            )
        # A change ring entry for every SKU whose ats or buckets this may have moved: the
        # mirror and WatchAts read what changed from the ring.
        if kind is RecordType.SET_CHANNEL:
            self.table.touch_all(seq)
        else:
            handle = self.table.lookup(command.sku)
            assert handle >= 0, f"{kind.name} of unknown sku {command.sku!r}"
            self.table.touch(handle, seq)
        channels.note_change(
            command.change_id, request, seq, command.at_ms,
            self.config.retention_seconds * 1000,
        )


def policy_from_command(command: records.SetChannel) -> Policy:
    policy = Policy(command.pool, command.reserve, *command.numbers)
    return dataclasses.replace(
        policy, pool_only=bool(policy.pool_only), enforcement=Enforcement(policy.enforcement)
    )


def overrides_from_command(command: records.SetSkuPolicy) -> dict[str, object]:
    overrides: dict[str, object] = dict(command.overrides)
    if "enforcement" in overrides:
        overrides["enforcement"] = Enforcement(overrides["enforcement"])
    return overrides
