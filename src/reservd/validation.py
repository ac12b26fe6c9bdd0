"""Input rules. A violation names the field and the rule; the service answers it with
INVALID_ARGUMENT and nothing changes."""
from __future__ import annotations

import unicodedata

from reservd.config import Limits


class Invalid(ValueError):
    """``field``: the (dotted) request field; ``rule``: what it broke."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


def text(field: str, value: str, bytes_max: int, *, required: bool = True) -> str:
    """An identifier: non-empty (if required), at most ``bytes_max`` UTF-8 bytes, printable,
    no white space at either end, in Unicode NFC.

    Look-alikes are refused rather than normalised: "sku-1 " and "sku-1", or "é" composed and
    decomposed, would otherwise be two SKUs that every person reads as one. Refusing tells the
    caller at once; normalising would silently answer for a key the caller did not send.
    """
    if not value:
        if required:
            raise Invalid(field, "must not be empty")
        return value
    if _is_clean(value, bytes_max):
        return value
    # UTF-8 takes at most 4 bytes a character: only long strings need encoding to measure.
    if len(value) * 4 > bytes_max and len(value.encode()) > bytes_max:
        raise Invalid(field, f"must be at most {bytes_max} bytes (UTF-8)")
    if not value.isprintable():
        raise Invalid(field, "must contain only printable characters")
    if value[0].isspace() or value[-1].isspace():
        raise Invalid(field, f"must not begin or end with white space: {value!r}")
    if not value.isascii() and not unicodedata.is_normalized("NFC", value):
        raise Invalid(
            field, f"must be in Unicode normal form NFC: {value!r} is not (normalise it first)"
        )
    return value


def _is_clean(value: str, bytes_max: int) -> bool:
    """Whether a non-empty ``value`` passes every rule of :func:`text`: the common case, checked
    without building a field name or a message."""
    return (
        value.isprintable()
        # UTF-8 takes at most 4 bytes a character: only long strings need encoding to measure.
        and (len(value) * 4 <= bytes_max or len(value.encode()) <= bytes_max)
        and not value[0].isspace()
        and not value[-1].isspace()
        and (value.isascii() or unicodedata.is_normalized("NFC", value))
    )


def quantity(field: str, value: int, limits: Limits, *, zero_allowed: bool = False) -> int:
    low = 0 if zero_allowed else 1
    if not low <= value <= limits.quantity_max:
        raise Invalid(field, f"must be between {low} and {limits.quantity_max}, not {value}")
    return value


def ttl_seconds(field: str, value: int, limits: Limits, *, default_allowed: bool = True) -> int:
    """A hold's time to live in seconds; 0 is the default TTL where ``default_allowed`` (Reserve),
    and refused where a TTL must be given (Extend)."""
    if value == 0 and default_allowed:
        return limits.ttl_seconds_default
    if not limits.ttl_seconds_min <= value <= limits.ttl_seconds_max:
        zero = f"0 (default {limits.ttl_seconds_default}) or " if default_allowed else ""
        raise Invalid(
            field,
            f"must be {zero}between {limits.ttl_seconds_min} and {limits.ttl_seconds_max} "
            f"seconds, not {value}",
        )
    return value


def lines(field: str, request_lines, limits: Limits, *, zero_allowed: bool = False):
    """A cart: (skus, quantities) tuples; at least one line, at most lines_max, no SKU twice."""
    count = len(request_lines)
    if count == 0:
        raise Invalid(field, "must have at least one line")
    if count > limits.lines_max:
        raise Invalid(field, f"must have at most {limits.lines_max} lines, not {count}")
    skus = tuple([line.sku for line in request_lines])
    quantities = tuple([line.quantity for line in request_lines])
    # The hot path (every Reserve, every op of a Batch) checks without building a field name;
    # only a line that may be wrong goes through text()/quantity() for the exact message.
    bytes_max, low = limits.id_bytes_max, 0 if zero_allowed else 1
    for i, sku in enumerate(skus):
        if not sku or not _is_clean(sku, bytes_max):
            text(f"{field}[{i}].sku", sku, bytes_max)
    high = limits.quantity_max
    for i, value in enumerate(quantities):
        if not low <= value <= high:
            quantity(f"{field}[{i}].quantity", value, limits, zero_allowed=zero_allowed)
    if count > 1 and len(set(skus)) != count:
        seen: set[str] = set()
        for i, sku in enumerate(skus):
            if sku in seen:
                raise Invalid(f"{field}[{i}].sku", f"duplicate sku {sku!r}: one line per sku")
            seen.add(sku)
    return skus, quantities


def skus(field: str, values, limits: Limits, count_max: int, *, required: bool = True):
    if required and not values:
        raise Invalid(field, "must name at least one sku")
    if len(values) > count_max:
        raise Invalid(field, f"must name at most {count_max} skus, not {len(values)}")
    return tuple(
        text(f"{field}[{i}]", sku, limits.id_bytes_max) for i, sku in enumerate(values)
    )


def on_hand(field: str, value: int, limits: Limits) -> int:
    if not 0 <= value <= limits.on_hand_max:
        raise Invalid(field, f"must be between 0 and {limits.on_hand_max}, not {value}")
    return value


def delta(field: str, value: int, limits: Limits) -> int:
    if value == 0 or abs(value) > limits.on_hand_max:
        raise Invalid(
            field, f"must be non-zero and at most {limits.on_hand_max} in size, not {value}"
        )
    return value


# -- whole requests: the unary RPCs and each op of a Batch share these, so both answer the same
# status and words (a Batch prefixes the field names with ``ops[i].<kind>.``).


def reservation_id(request, limits: Limits, prefix: str = "") -> str:
    return text(prefix + "reservation_id", request.reservation_id, limits.id_bytes_max)


def reserve_request(request, limits: Limits, prefix: str = ""):
    """A ReserveRequest: (reservation_id, skus, quantities, channel, ttl_seconds)."""
    reservation = reservation_id(request, limits, prefix)
    skus, quantities = lines(prefix + "lines", request.lines, limits)
    channel = text(prefix + "channel", request.channel, limits.channel_bytes_max, required=False)
    ttl = ttl_seconds(prefix + "ttl_seconds", request.ttl_seconds, limits)
    return reservation, skus, quantities, channel, ttl


def commit_request(request, limits: Limits, prefix: str = ""):
    """A CommitRequest: (reservation_id, {sku: quantity} or None to commit everything held)."""
    reservation = reservation_id(request, limits, prefix)
    if not request.lines:
        return reservation, None
    skus, quantities = lines(prefix + "lines", request.lines, limits, zero_allowed=True)
    return reservation, dict(zip(skus, quantities))


def extend_request(request, limits: Limits, prefix: str = ""):
    """An ExtendRequest: (reservation_id, ttl_seconds); a TTL must be given."""
    reservation = reservation_id(request, limits, prefix)
    ttl = ttl_seconds(
        prefix + "ttl_seconds", request.ttl_seconds, limits, default_allowed=False
    )
    return reservation, ttl
