"""The inspection backlog alert: returns waiting for inspection longer than
``inspection_backlog_seconds_max``.

Time passing is no command, so this is a *runtime* alert (reservd.alerts): a task checks every
``inspection_backlog_check_seconds`` and raises ``inspection_backlog`` level 2 when the oldest
return in quarantine is older than the bound, level 0 once none is. Like every runtime alert it
is not replayed: after a restart the first check raises it again if the backlog is still there.
"""
from __future__ import annotations

import asyncio

INSPECTION_BACKLOG = "inspection_backlog"


def check(ledger, now_ms: int, age_seconds_max: int, raised: bool) -> bool:
    """Raise or end the alert for the backlog at ``now_ms``; returns whether it is raised."""
    states = ledger.states
    oldest_ms = states.oldest_quarantine_ms()
    age_ms = 0 if oldest_ms is None else max(0, now_ms - oldest_ms)
    late = oldest_ms is not None and age_ms > age_seconds_max * 1000
    if late and not raised:
        return_id = states.oldest_quarantine_id()
        ledger.alerts.raise_runtime(INSPECTION_BACKLOG, 2, {
            "oldest_return_id": return_id, "sku": states.returns[return_id].sku,
            "oldest_age_seconds": age_ms // 1000, "returns_awaiting": states.awaiting,
            "age_seconds_max": age_seconds_max,
        })
    elif raised and not late:
        ledger.alerts.raise_runtime(INSPECTION_BACKLOG, 0, {
            "returns_awaiting": states.awaiting, "age_seconds_max": age_seconds_max,
        })
    return late


async def watch(ledger, clock, config) -> None:
    """Check the backlog forever (run under Supervisor.spawn)."""
    raised = False
    while True:
        await asyncio.sleep(config.inspection_backlog_check_seconds)
        raised = check(ledger, clock.now_ms(), config.inspection_backlog_seconds_max, raised)
