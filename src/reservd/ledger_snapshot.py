"""The ledger's snapshots: capture the state after a sequence (encoded by reservd.state_codec,
possibly in a worker thread) and restore it into a fresh ledger, reading every older format;
mixed into reservd.ledger.Ledger."""
from __future__ import annotations

from reservd import alerts, finished_rows, state_codec
from reservd.alertrules import SNAPSHOT_KINDS as _RULE_KINDS
from reservd.ledger_channels import unwrap, wrap
from reservd.store import Reservation, State


class SnapshotCommands:
    """Needs every part of the Ledger's state (table, reservations, finished, states, incoming,
    planning, channels, alerts, alert_rules, the rules' sections) and its counters."""

    def snapshot_state(self):
        """Capture the state after ``self.seq`` now (cheap copies, no encoding); returns
        (seq, encode) where ``encode()`` builds the bytes (reservd.state_codec) and may run in
        a worker thread: the copied records are immutable, and handles and channel indexes
        never change meaning.
        """
        seq = self.seq
        stock = list(self.table.items())
        reservations = self.reservations.raw()
        kept = self.finished.raw()
        decode_reservation = self.reservations.decode
        states, returns, write_offs, safety_stock = self.states.snapshot_rows()
        orders, receipts = self.incoming.snapshot_rows()
        demand, replenishment, counts = self.planning.snapshot_rows()

        # Filled while the reservation rows are encoded, and written after them: one decode each.
        owners: list[tuple[str, str]] = []

        def reservation_rows():
            for reservation_id, data in reservations:
                r = decode_reservation(reservation_id, data)
                if r.owner:
                    owners.append((reservation_id, r.owner))
                yield (
                    r.reservation_id, r.channel, r.request, r.skus, r.quantities, r.committed,
                    int(r.state), r.expires_at_ms, r.seq, r.finished_at_ms,
                )

        channel_rows = {
            **self.channels.snapshot_rows(), **self.alerts.snapshot_rows(),
            **self.alert_rules.snapshot_rows(),
        }
        rule_sections = self._rule_sections()

        def encode() -> bytes:
            return wrap(
                state_codec.encode(
                    seq, stock, reservation_rows(), (), states, returns, write_offs, orders,
                    receipts, owners, demand, replenishment, counts, rule_sections,
                    finished_rows.snapshot_rows(
                        kept, self.table.sku, self.reservations.origin_of
                    ),
                    safety_stock,
                ),
                channel_rows,
            )

        return seq, encode

    def restore(self, payload: bytes) -> None:
        """Load a snapshot into an empty ledger (before replaying the records after it).
        ValueError for a snapshot that does not parse."""
        assert not self.reservations and len(self.table) == 0, "restore into a fresh ledger"
        payload, channel_rows = unwrap(payload)
        for kind, rows in channel_rows.items():
            if kind in alerts.SNAPSHOT_KINDS:
                self.alerts.restore_rows(kind, rows)
            elif kind in _RULE_KINDS:
                self.alert_rules.restore_rows(kind, rows)
            else:
                self.channels.restore_rows(kind, rows)
        seq, rows = state_codec.decode(payload)
        lookup = self.table.lookup
        origin = self.reservations.origin
        # Finished reservations (with their owners) and adjustments of formats 2-6.
        legacy_finished: dict[str, list] = {}
        legacy_adjustments: list[tuple] = []
        now_ms = self.clock.now_ms()
        for kind, row in rows:
            if kind == state_codec.STOCK:
                self.table.restore(*row)
            elif kind == state_codec.STATES:
                self.states.restore_state(row)
            elif kind == state_codec.RETURN:
                self.states.restore_return(row, now_ms)
            elif kind == state_codec.WRITE_OFF:
                self.states.restore_write_off(row)
            elif kind == state_codec.SAFETY_STOCK:
                self.states.restore_safety_stock(row)
            elif kind == state_codec.ORDER:
                self.incoming.restore_order(row, now_ms)
            elif kind == state_codec.RECEIPT:
                self.incoming.restore_receipt(row, now_ms)
            elif kind == state_codec.DEMAND:
                self.planning.restore_demand(row)
            elif kind == state_codec.REPLENISHMENT:
                self.planning.restore_settings(row)
            elif kind == state_codec.COUNT:
                self.planning.restore_count(row)
            elif kind == state_codec.FINISHED:
                self.finished.add(finished_rows.record(row, lookup, origin))
            elif kind == state_codec.RESERVATION:
                (reservation_id, channel, request, skus, quantities, committed, state_value,
                 expires_at_ms, reservation_seq, finished_at_ms) = row
                if finished_rows.is_finished(state_value):
                    legacy_finished[reservation_id] = [row, ""]
                    continue
                state = State(state_value)
                self.reservations[reservation_id] = Reservation(
                    reservation_id, channel, request, skus, tuple(lookup(sku) for sku in skus),
                    quantities, committed, state, expires_at_ms, reservation_seq,
                    finished_at_ms,
                )
                if state is State.HELD:
                    self._deadlines.push(expires_at_ms, reservation_id)
                    self.held += 1
                self.live += 1
            elif kind >= state_codec.FIRST_RULES_SECTION:
                self._restore_rule_row(kind, row)
            elif kind == state_codec.OWNER:
                reservation_id, owner = row
                if reservation_id in legacy_finished:
                    legacy_finished[reservation_id][1] = owner
                else:
                    self.reservations[reservation_id] = self.reservations[
                        reservation_id
                    ]._replace(owner=owner)
            else:
                legacy_adjustments.append(row)
        for packed in finished_rows.from_legacy(
            legacy_finished.values(), legacy_adjustments, lookup, origin
        ):
            self.finished.add(packed)
        self.alert_rules.restart_ring()
        self.states.restored()
        self.incoming.restored()
        for sku in {*self.states.counts, *self.incoming.by_sku}:
            breakdown = self.breakdown(sku)
            if any(breakdown):
                self.state_history.seed(sku, breakdown)
        self.seq = seq
