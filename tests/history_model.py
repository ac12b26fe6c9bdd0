"""The history checker's reference model: reservd's rules as plain Python over dicts, written
from the README and the shared rules (shortfall: reality wins; fulfil always succeeds and takes
min(q, on_hand)), never from the ledger's code."""
from __future__ import annotations

import bisect
import dataclasses
from typing import Iterable

from history_buckets import ChannelModel

HELD, COMMITTED, RELEASED, EXPIRED, FULFILLED = 1, 2, 3, 4, 5
STATE_NAMES = {HELD: "HELD", COMMITTED: "COMMITTED", RELEASED: "RELEASED", EXPIRED: "EXPIRED",
               FULFILLED: "FULFILLED"}
ON_HAND_MAX = 10**12


@dataclasses.dataclass
class _Reservation:
    request: tuple  # (skus, requested, channel, ttl_seconds, allow_partial)
    lines: list[tuple[str, int]]  # lines holding units, in request order (granted > 0)
    committed: list[int] | None
    state: int
    expires_at_ms: int
    seqs: list[int]  # every mutation of this reservation, in order
    states: list[int]  # the state after each of them

    def at(self, seq: int) -> tuple[int, int] | None:
        """(latest mutation seq, state) as of ``seq``; None before it was granted."""
        index = bisect.bisect_right(self.seqs, seq) - 1
        return None if index < 0 else (self.seqs[index], self.states[index])

    def answer_lines(self) -> tuple[tuple[str, int], ...]:
        if self.committed is not None:
            return tuple((sku, q) for (sku, _), q in zip(self.lines, self.committed))
        return tuple(self.lines)


class Model:
    """reservd's rules as plain Python over dicts: stock counters and reservations.

    Each ``apply_*`` applies one command at one seq and returns what reservd must have
    answered, or a string saying why the command could not have happened then."""

    def __init__(self) -> None:
        self.stock: dict[str, list[int]] = {}  # sku -> [on_hand, reserved, committed]
        self.reservations: dict[str, _Reservation] = {}
        self.adjustments: dict[str, tuple[tuple, tuple]] = {}  # id -> (request, answer)
        # Stock states (README "Stock states"): sku -> [quarantine, damaged, quality_control,
        # safety_stock]; returns by id (sku, units, inspected); write-offs and holds by change
        # id (sku, units, state); purchase orders by id [sku, units,
        # received]; receipts by id; incoming units per sku.
        self.states: dict[str, list[int]] = {}
        self.returns: dict[str, list] = {}
        self.write_offs: dict[str, tuple] = {}
        self.orders: dict[str, list] = {}
        self.receipts: dict[str, tuple] = {}
        self.incoming: dict[str, int] = {}
        # Channels, buckets and ats (README "Channels, buckets and ats").
        self.channels = ChannelModel(self)

    def available(self, sku: str) -> int:
        """on_hand - reserved - committed - units in any unsellable state."""
        on_hand, reserved, committed = self.stock[sku]
        return on_hand - reserved - committed - sum(self.states.get(sku, (0, 0, 0, 0)))

    def _changed(self, seq: int, skus: Iterable[str]) -> None:
        """Remember each SKU's state after ``seq`` (sold-out and admin answers are checked
        against every state their call could have seen)."""
        self.channels.changed(seq, skus)

    def apply_reserve(self, seq, reservation_id, request, expires_at_ms):
        """The all-or-nothing or clamped rule, within what the channel may draw (one line per
        sku: validation refuses duplicates)."""
        skus, requested, channel, _ttl, _allow_partial = request
        if reservation_id in self.reservations:
            return f"reservation {reservation_id!r} already exists: a second grant"
        granted = self.channels.decide(request)
        if isinstance(granted, str):
            return f"granted, but the model says: {granted}"
        for sku, quantity in zip(skus, granted):
            self.stock[sku][1] += quantity
        draws = self.channels.reserve(reservation_id, channel, skus, granted)
        self.reservations[reservation_id] = _Reservation(
            request, [(s, q) for s, q in zip(skus, granted) if q], None, HELD, expires_at_ms,
            [seq], [HELD],
        )
        self._changed(seq, [s for s, q in zip(skus, granted) if q])
        return {
            "granted": True,
            "lines": tuple(
                (sku, asked, given, self.available(sku))
                for sku, asked, given in zip(skus, requested, granted)
            ),
            "draws": tuple(draws),
            "ats": tuple(self.channels.ats_of(sku, channel) for sku in skus),
            "state": HELD,
            "expires_at_ms": expires_at_ms,
        }

    def _held(self, reservation_id, action, at_ms):
        current = self.reservations.get(reservation_id)
        if current is None:
            return f"cannot {action} {reservation_id!r}: unknown"
        if current.state != HELD:
            return f"cannot {action} {reservation_id!r}: {STATE_NAMES[current.state]}"
        if at_ms is not None and current.expires_at_ms <= at_ms:
            return f"cannot {action} {reservation_id!r}: expired at {current.expires_at_ms}"
        return current

    def apply_commit(self, seq, reservation_id, lines: dict[str, int] | None, at_ms):
        current = self._held(reservation_id, "commit", at_ms)
        if isinstance(current, str):
            return current
        committed = []
        for sku, held in current.lines:
            quantity = held if lines is None else lines.get(sku, held)
            if not 0 <= quantity <= held:
                return f"commit of {quantity} of {sku!r} but {held} held"
            committed.append(quantity)
        if lines is not None and set(lines) - {sku for sku, _ in current.lines}:
            return f"commit names skus {reservation_id!r} holds none of"
        for (sku, held), quantity in zip(current.lines, committed):
            row = self.stock[sku]
            row[1] -= held
            row[2] += quantity
        self.channels.commit(reservation_id, {
            sku: quantity for (sku, _), quantity in zip(current.lines, committed)})
        current.committed, current.state = committed, COMMITTED
        current.seqs.append(seq)
        current.states.append(current.state)
        self._changed(seq, [sku for sku, _ in current.lines])
        return self._answer(current)

    def apply_extend(self, seq, reservation_id, expires_at_ms, at_ms):
        current = self._held(reservation_id, "extend", at_ms)
        if isinstance(current, str):
            return current
        if expires_at_ms < current.expires_at_ms:
            return f"extend shortened {reservation_id!r}"
        current.expires_at_ms = expires_at_ms
        current.seqs.append(seq)
        current.states.append(current.state)
        return self._answer(current)

    def apply_release(self, seq, reservation_id, expire: bool = False, at_ms=None):
        current = self.reservations.get(reservation_id)
        if current is None or current.state not in ((HELD,) if expire else (HELD, COMMITTED)):
            state = "unknown" if current is None else STATE_NAMES[current.state]
            return f"cannot {'expire' if expire else 'release'} {reservation_id!r}: {state}"
        if expire and at_ms is not None and at_ms < current.expires_at_ms:
            return f"expired {reservation_id!r} at {at_ms}, before its expiry {current.expires_at_ms}"
        for index, (sku, held) in enumerate(current.lines):
            if current.state == HELD:
                self.stock[sku][1] -= held
            else:
                self.stock[sku][2] -= current.committed[index]
        self.channels.finish(reservation_id, fulfilled=False)
        current.state = EXPIRED if expire else RELEASED
        current.seqs.append(seq)
        current.states.append(current.state)
        self._changed(seq, [sku for sku, _ in current.lines])
        return self._answer(current)

    def apply_fulfil(self, seq, reservation_id):
        current = self.reservations.get(reservation_id)
        if current is None or current.state != COMMITTED:
            state = "unknown" if current is None else STATE_NAMES[current.state]
            return f"cannot fulfil {reservation_id!r}: {state}"
        for (sku, _), quantity in zip(current.lines, current.committed):
            row = self.stock[sku]
            row[2] -= quantity
            row[0] -= min(quantity, row[0])  # the parcel left; on_hand never goes below 0
        self.channels.finish(reservation_id, fulfilled=True)
        current.state = FULFILLED
        current.seqs.append(seq)
        current.states.append(current.state)
        self._changed(seq, [sku for sku, _ in current.lines])
        return self._answer(current)

    def apply_stock(self, seq, kind, adjustment_id, sku, value, expected):
        request = (kind, sku, value, expected)
        if adjustment_id in self.adjustments:
            return f"adjustment {adjustment_id!r} applied twice"
        if kind == "adjust_stock" and sku not in self.stock:
            return f"adjust of unknown sku {sku!r}"
        row = self.stock.setdefault(sku, [0, 0, 0])
        previous = row[0]
        if expected is not None and expected != previous:
            return f"{sku!r}: on_hand {previous}, expected {expected}"
        on_hand = value if kind == "set_stock" else previous + value
        if not 0 <= on_hand <= ON_HAND_MAX:
            return f"{sku!r}: on_hand would be {on_hand}"
        row[0] = on_hand
        answer = {
            "stock": (sku, *row, self.available(sku)),
            "previous_on_hand": previous,
            "shortfall": max(0, row[1] + row[2] - on_hand),
        }
        self.adjustments[adjustment_id] = (request, answer)
        self._changed(seq, [sku])
        return answer

    # -- stock states, returns and incoming stock (README "Stock states", "Incoming stock") --

    def _state_answer(self, sku: str) -> dict:
        return {"stock": (sku, *self.stock[sku], self.available(sku),
                          *self.states.get(sku, (0, 0, 0, 0)))}

    def apply_receive_return(self, seq, return_id, sku, units):
        if return_id in self.returns:
            return f"return {return_id!r} applied twice"
        if sku not in self.stock:
            return f"return of unknown sku {sku!r}"
        self.stock[sku][0] += units
        self.states.setdefault(sku, [0, 0, 0, 0])[0] += units
        self.returns[return_id] = [sku, units, False]
        self._changed(seq, [sku])
        return self._state_answer(sku)

    def apply_inspect(self, seq, return_id, sellable_units, damaged_units):
        entry = self.returns.get(return_id)
        if entry is None or entry[2]:
            return f"inspection of {return_id!r}: {'unknown' if entry is None else 'twice'}"
        sku, units, _ = entry
        if sellable_units + damaged_units != units:
            return f"inspection of {return_id!r}: {sellable_units} + {damaged_units} != {units}"
        row = self.states[sku]
        row[0] -= units
        row[1] += damaged_units
        entry[2] = True
        self._changed(seq, [sku])
        return self._state_answer(sku)

    def apply_write_off(self, seq, change_id, sku, units, state):
        if change_id in self.write_offs:
            return f"write-off {change_id!r} applied twice"
        row = self.states.get(sku, [0, 0, 0, 0])
        if state != "damaged" or units > row[1] or units > self.stock[sku][0]:
            return f"write-off of {units} {state} units of {sku!r}, which has {row[1]}"
        row[1] -= units
        self.stock[sku][0] -= units
        self.write_offs[change_id] = (sku, units, state)
        self._changed(seq, [sku])
        return self._state_answer(sku)

    def apply_hold(self, seq, change_id, sku, units, state):
        """README "Stock states": units > 0 from available (the shared bucket: this history
        has no named buckets) into safety_stock or quality_control, < 0 back."""
        if change_id in self.write_offs:
            return f"hold {change_id!r} applied twice"
        if sku not in self.stock or state not in ("safety_stock", "quality_control"):
            return f"hold of {sku!r} in {state!r}"
        row = self.states.setdefault(sku, [0, 0, 0, 0])
        index = 2 if state == "quality_control" else 3
        if units > self.available(sku) or -units > row[index]:
            return f"hold of {units} {state} units of {sku!r}: available {self.available(sku)}, " \
                   f"held {row[index]}"
        row[index] += units
        self.write_offs[change_id] = (sku, units, state)
        self._changed(seq, [sku])
        return self._state_answer(sku)

    def _incoming_answer(self, po_id: str) -> dict:
        sku, units, received = self.orders[po_id]
        return {"incoming": self.incoming[sku], "on_hand": self.stock[sku][0],
                "received": received, "over_received": max(0, received - units)}

    def apply_expect_receipt(self, seq, po_id, sku, units):
        if po_id in self.orders:
            return f"purchase order {po_id!r} applied twice"
        if sku not in self.stock:
            return f"purchase order of unknown sku {sku!r}"
        self.orders[po_id] = [sku, units, 0]
        self.incoming[sku] = self.incoming.get(sku, 0) + units
        return self._incoming_answer(po_id)

    def apply_receive(self, seq, receipt_id, po_id, units):
        if receipt_id in self.receipts:
            return f"receipt {receipt_id!r} applied twice"
        order = self.orders.get(po_id)
        if order is None:
            return f"receipt against unknown purchase order {po_id!r}"
        sku = order[0]
        self.incoming[sku] -= min(units, max(0, order[1] - order[2]))
        order[2] += units
        self.stock[sku][0] += units
        self.receipts[receipt_id] = (po_id, units)
        self._changed(seq, [sku])
        return self._incoming_answer(po_id)

    @staticmethod
    def _answer(current: _Reservation) -> dict:
        return {
            "state": current.state,
            "lines": current.answer_lines(),
            "expires_at_ms": current.expires_at_ms if current.state == HELD else 0,
        }
