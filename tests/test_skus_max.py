"""skus_max: a SetStock creating a SKU beyond it is refused RESOURCE_EXHAUSTED before anything is
logged; existing SKUs still change; a log written under a larger bound still replays."""
from __future__ import annotations

import grpc
import pytest
from conftest import aio, running, test_config

from reservd import _pytable
from reservd.clock import ManualClock
from reservd.config import Config
from reservd.ledger import Code, Ledger, Rejection

from test_ledger_model import RecordingLog


def _gauges(daemon) -> dict[str, float]:
    return {family.name: family.samples[0].value for family in daemon.metrics.collect()
            if family.samples}


async def _refused_new_sku(server, sku: str, bound: int) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.set_stock(sku, 1)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.details().startswith("sku: ")
    assert f"skus_max {bound}" in caught.value.details()


def test_the_refusal_is_decided_before_anything_is_logged():
    ledger = Ledger(_pytable.Table(), RecordingLog(), ManualClock(), Config(skus_max=1))
    assert not isinstance(ledger.set_stock("s1", "A", 5, None, ""), Rejection)
    logged = len(ledger.log.records)
    refused = ledger.set_stock("s2", "B", 5, None, "")
    assert isinstance(refused, Rejection) and refused.code is Code.RESOURCE_EXHAUSTED
    assert (refused.field, len(ledger.log.records), len(ledger.table)) == ("sku", logged, 1)
    # AdjustStock never creates a SKU: an unknown one is still NOT_FOUND, not the bound.
    assert ledger.adjust_stock("s3", "B", 1, None, "").code is Code.NOT_FOUND


@aio
async def test_the_bound_refuses_new_skus_and_a_smaller_one_still_replays(tmp_path):
    async with running(test_config(tmp_path, skus_max=3)) as server:
        for sku in "ABC":
            await server.set_stock(sku, 5)
        await _refused_new_sku(server, "D", 3)
        await server.set_stock("A", 7)  # an existing SKU still changes at the bound
        assert (await server.stock("A")).on_hand == 7
        gauges = _gauges(server.daemon)
        assert (gauges["reservd_skus"], gauges["reservd_skus_max"]) == (3, 3)
    # A WAL written under skus_max 3 replays under 2: replay never refuses, new SKUs are.
    async with running(test_config(tmp_path, skus_max=2)) as server:
        assert [(await server.stock(sku)).on_hand for sku in "ABC"] == [7, 5, 5]
        await _refused_new_sku(server, "E", 2)
        await server.set_stock("C", 9)
        assert (await server.stock("C")).on_hand == 9
        gauges = _gauges(server.daemon)
        assert (gauges["reservd_skus"], gauges["reservd_skus_max"]) == (3, 2)
