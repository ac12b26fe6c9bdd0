"""What the ledger answers: refusals (:class:`Code`, :class:`Rejection`) and the outcomes of
reservation commands. Values, not exceptions; shared by the ledger and the modules beside it."""
from __future__ import annotations

import enum
from typing import NamedTuple

from reservd.store import Reservation, State


class Code(enum.Enum):
    """Why a request was refused (mapped one to one onto gRPC status codes)."""

    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"


class Rejection(NamedTuple):
    """A refused request: ``code``, the rule it broke, and the request ``field`` it names
    (empty when it concerns the request as a whole)."""

    code: Code
    message: str
    field: str = ""

    def text(self, prefix: str = "") -> str:
        """The answer's message: ``field: message``, the field under ``prefix`` (a batch's
        ``ops[3].reserve.``)."""
        return f"{prefix}{self.field}: {self.message}" if self.field else self.message


class ReserveOutcome(NamedTuple):
    granted: bool
    skus: tuple[str, ...]
    requested: tuple[int, ...]
    quantities: tuple[int, ...]  # granted per line (0 when refused)
    available: tuple[int, ...]
    expires_at_ms: int
    state: State | None
    seq: int
    replayed: bool


class ReservationOutcome(NamedTuple):
    reservation: Reservation
    seq: int  # the mutation to wait for before answering (0: nothing to wait for)
    replayed: bool
