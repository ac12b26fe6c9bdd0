"""How a servicer refuses a call: bad input, a ledger's rejection, writes closed. One home for
the status each maps to, shared by every service module (and Batch's per-op errors)."""
from __future__ import annotations

import grpc

from reservd.guard import Guard
from reservd.ledger import Code, Rejection
from reservd.validation import Invalid

# The ledger's refusal codes onto gRPC status codes, one to one.
STATUS = {code: getattr(grpc.StatusCode, code.value) for code in Code}


async def invalid(context, error: Invalid) -> None:
    """INVALID_ARGUMENT naming the field."""
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))


async def reject(context, rejection: Rejection) -> None:
    """The ledger's rejection as its status and ``field: message``."""
    await context.abort(STATUS[rejection.code], rejection.text())


async def writable(guard: Guard, context) -> None:
    """Refuse a mutation while the log cannot make it durable (UNAVAILABLE)."""
    if guard.write_reason is not None:
        await context.abort(
            grpc.StatusCode.UNAVAILABLE, f"writes are closed: {guard.write_reason}"
        )
