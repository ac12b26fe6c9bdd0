"""Admin RPCs of replenishment and cycle counts (SetReplenishment, GetReplenishment, GetAudit):
validate and translate; the rules are in reservd.planning, reached through the ledger."""
from __future__ import annotations

import grpc

from reservd import validation
from reservd.planning import CLASSES
from reservd.v1 import reservd_pb2 as pb
from reservd.validation import Invalid

_DAYS_MAX = 3650.0


def _days(field: str, value: float) -> float:
    if not 0 <= value <= _DAYS_MAX:  # also false for NaN
        raise Invalid(field, f"must be within [0, {_DAYS_MAX:g}] days, not {value}")
    return value


def settings_of(request: pb.SetReplenishmentRequest, limits) -> tuple:
    """(sku, lead_time_days, lead_time_sigma_days, service_level, abc_class, seasonal), or
    Invalid naming the field."""
    sku = validation.text("sku", request.sku, limits.id_bytes_max)
    lead_time = _days("lead_time_days", request.lead_time_days)
    lead_sigma = _days("lead_time_sigma_days", request.lead_time_sigma_days)
    level = request.service_level
    if level != 0 and not 0.5 <= level < 1:
        raise Invalid("service_level", f"must be in [0.5, 1) or 0 (by class), not {level}")
    if request.abc_class not in ("", *CLASSES):
        raise Invalid("abc_class", f"must be A, B, C or empty, not {request.abc_class!r}")
    seasonal = tuple(request.seasonal_indices)
    if seasonal and (len(seasonal) != 12 or not all(0 < v <= 100 for v in seasonal)):
        raise Invalid("seasonal_indices", "must be empty or 12 numbers in (0, 100], January "
                      f"first (got {len(seasonal)})")
    return sku, lead_time, lead_sigma, level, request.abc_class, seasonal


def replenishment_message(row) -> pb.Replenishment:
    return pb.Replenishment(**row._asdict())


class PlanningRpcs:
    """Mixed into AdminService (needs ledger, limits, _decided)."""

    def _limit(self, limit: int) -> int:
        return min(limit or self.limits.get_skus_max, self.limits.get_skus_max)

    async def SetReplenishment(self, request: pb.SetReplenishmentRequest, context):
        try:
            settings = settings_of(request, self.limits)
        except Invalid as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        outcome = await self._decided(lambda: self.ledger.set_replenishment(*settings), context)
        row = self.ledger.replenishment_rows((settings[0],), "", 1)[0]
        return pb.SetReplenishmentResponse(
            replenishment=replenishment_message(row), sequence=outcome.seq
        )

    async def GetReplenishment(self, request: pb.GetReplenishmentRequest, context):
        limits = self.limits
        try:
            skus = validation.skus("skus", request.skus, limits, limits.get_skus_max,
                                   required=False)
            after = validation.text("after_sku", request.after_sku, limits.id_bytes_max,
                                    required=False)
        except Invalid as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        rows = self.ledger.replenishment_rows(skus, after, self._limit(request.limit))
        return pb.GetReplenishmentResponse(rows=[replenishment_message(row) for row in rows])

    async def GetAudit(self, request: pb.GetAuditRequest, context):
        rows = self.ledger.audit_rows(not request.all, self._limit(request.limit))
        return pb.GetAuditResponse(
            skus=[pb.CountStatus(**row._asdict()) for row in rows],
            ghost_overall=self.ledger.planning.ghost_overall(),
        )
