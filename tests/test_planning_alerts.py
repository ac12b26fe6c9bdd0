"""Replenishment's alerts through a real daemon on the injected clock: the reorder point
crossed (with the suggested order), once per crossing, ended by incoming stock; ghost stock
above 2% and 5% at a recount; an inspection backlog older than its bound (a runtime alert);
the command alerts are the same after a restart (log replay, snapshots)."""
from __future__ import annotations

import pytest
from conftest import aio, cart, eventually, running, test_config
from test_planning_daemon import START_MS, _sell

from reservd.clock import ManualClock
from reservd.v1 import reservd_pb2 as pb


async def _alerts(server, *kinds: str) -> list[pb.Alert]:
    response = await server.reservations.GetAlerts(pb.GetAlertsRequest(kinds=list(kinds)))
    return list(response.alerts)


def _figures(alert: pb.Alert) -> dict:
    return {f.name: getattr(f, f.WhichOneof("value")) for f in alert.figures}


@pytest.mark.parametrize("snapshot_records_interval", [1_000_000, 50])
@aio
async def test_the_reorder_point_crossed_is_one_alert_with_the_suggested_order(
    tmp_path, snapshot_records_interval
):
    clock = ManualClock(START_MS)
    config = test_config(tmp_path / "data", snapshot_records_interval=snapshot_records_interval)
    async with running(config, clock=clock) as server:
        await server.set_stock("tent", 5_000)
        await _sell(server, clock, 30)
        await server.admin.SetReplenishment(pb.SetReplenishmentRequest(
            sku="tent", lead_time_days=10, lead_time_sigma_days=2, abc_class="A"))
        row = (await server.admin.GetReplenishment(
            pb.GetReplenishmentRequest(skus=["tent"]))).rows[0]
        assert not row.reorder and not await _alerts(server, "reorder")
        # Hold all but the reorder point: available + incoming reaches it.
        hold = row.available - row.reorder_point
        assert (await server.reservations.Reserve(cart("big", ("tent", hold)))).granted
        crossed = await _alerts(server, "reorder")
        assert [(a.sku, a.level) for a in crossed] == [("tent", 2)]
        figures = _figures(crossed[0])
        row = (await server.admin.GetReplenishment(
            pb.GetReplenishmentRequest(skus=["tent"]))).rows[0]
        assert row.reorder and figures["suggested_units"] == row.suggested_units > 0
        assert (figures["available"], figures["reorder_point"]) == (
            row.reorder_point, row.reorder_point)
        # Lower still: the same crossing, no second alert.
        assert (await server.reservations.Reserve(cart("more", ("tent", 5)))).granted
        assert len(await _alerts(server, "reorder")) == 1
        # An order on the way lifts available + incoming above the point: back to normal.
        await server.admin.ExpectReceipt(pb.ExpectReceiptRequest(
            po_id="po-1", sku="tent", units=row.suggested_units))
        ended = await _alerts(server, "reorder")
        assert [(a.sku, a.level) for a in ended] == [("tent", 2), ("tent", 0)]
        before = await _alerts(server)
    async with running(config, clock=clock) as server:
        assert await _alerts(server) == before


@aio
async def test_ghost_stock_at_a_recount_above_two_and_five_percent():
    async with running(test_config()) as server:
        await server.set_stock("cap", 1_000)
        for on_hand, adjustment_id in ((990, "c1"), (960, "c2"), (900, "c3"), (900, "c4")):
            await server.admin.SetStock(pb.SetStockRequest(
                sku="cap", on_hand=on_hand, adjustment_id=adjustment_id))
        alerts = await _alerts(server, "ghost_stock")
        # 1%: nothing; 3%: above the 2% target; 6.25%: above 5%; 0%: back to normal.
        assert [(a.level, _figures(a)["ghost_bp"]) for a in alerts] == [
            (2, 303), (3, 625), (0, 0)]
        assert _figures(alerts[0])["system"] == 990 and _figures(alerts[0])["counted"] == 960


@aio
async def test_an_inspection_backlog_older_than_its_bound_is_a_runtime_alert():
    clock = ManualClock(START_MS)
    config = test_config(inspection_backlog_seconds_max=3_600,
                         inspection_backlog_check_seconds=0.01)
    async with running(config, clock=clock) as server:
        await server.set_stock("boot", 3)
        await server.admin.ReceiveReturn(pb.ReceiveReturnRequest(
            return_id="rma-1", sku="boot", units=2))
        clock.advance(1_800_000)
        await server.admin.ReceiveReturn(pb.ReceiveReturnRequest(
            return_id="rma-2", sku="boot", units=1))
        clock.advance(1_800_001)  # rma-1 has waited an hour and 1 ms

        async def raised(count: int) -> bool:
            return len(await _alerts(server, "inspection_backlog")) == count

        await eventually(lambda: raised(1), "the backlog alert raised")
        alert = (await _alerts(server, "inspection_backlog"))[0]
        assert alert.level == 2 and alert.runtime
        assert _figures(alert)["oldest_return_id"] == "rma-1"
        assert _figures(alert)["returns_awaiting"] == 2
        await server.admin.Inspect(pb.InspectRequest(return_id="rma-1", sellable_units=2))
        # rma-2 has waited 30 minutes: within the bound, the backlog is over.
        await eventually(lambda: raised(2), "the backlog alert ended")
        assert (await _alerts(server, "inspection_backlog"))[1].level == 0
