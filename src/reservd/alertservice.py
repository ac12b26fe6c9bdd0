"""The gRPC layer of the alerts feed: GetAlerts and WatchAlerts, mixed into ReservationsService
(needs ``ledger``, ``limits`` and ``alert_hub``). The feed is reservd.alerts; the streams
reservd.alertwatch."""
from __future__ import annotations

import grpc

from reservd import validation
from reservd.alerts import LEVEL_MAX
from reservd.alertwatch import TooManyAlertWatchers
from reservd.v1 import reservd_pb2 as pb
from reservd.validation import Invalid

_KINDS_MAX = 32


def _get_request(request: pb.GetAlertsRequest, limits) -> tuple[frozenset[str], str, int, int]:
    if len(request.kinds) > _KINDS_MAX:
        raise Invalid("kinds", f"must name at most {_KINDS_MAX} kinds, not {len(request.kinds)}")
    kinds = frozenset(
        validation.text(f"kinds[{i}]", kind, limits.id_bytes_max)
        for i, kind in enumerate(request.kinds)
    )
    sku = validation.text("sku", request.sku, limits.id_bytes_max, required=False)
    if request.level_min > LEVEL_MAX:
        raise Invalid("level_min", f"must be at most {LEVEL_MAX}, not {request.level_min}")
    limit = request.limit or limits.get_alerts_max
    if limit > limits.get_alerts_max:
        raise Invalid(
            "limit", f"must be at most get_alerts_max ({limits.get_alerts_max}), not {limit}"
        )
    return kinds, sku, request.level_min, limit


class AlertRpcs:
    async def GetAlerts(self, request: pb.GetAlertsRequest, context) -> pb.GetAlertsResponse:
        try:
            kinds, sku, level_min, limit = _get_request(request, self.limits)
        except Invalid as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return pb.GetAlertsResponse(
            alerts=self.ledger.alerts.recent(kinds, sku, level_min, limit)
        )

    async def WatchAlerts(self, request: pb.WatchAlertsRequest, context):
        hub = self.alert_hub
        try:
            watcher = hub.open(request.from_sequence)
        except TooManyAlertWatchers as error:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"watchers: {error}")
        try:
            async for batch in hub.alerts_of(watcher):
                for alert in batch:
                    yield alert
        finally:
            hub.release(watcher)
