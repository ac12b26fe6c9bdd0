"""How `watch`, `watch-ats` and `alerts --follow` print a server stream: message by message,
until COUNT are printed, the stream ends, or --deadline passes."""
from __future__ import annotations


async def follow(stream, emit, count: int, wanted=None) -> int:
    """Emit each message of ``stream`` (an async iterator of the client) that ``wanted`` accepts
    (None: every one), stopping after ``count`` of them (0: never). Reaching the deadline ends a
    time-boxed stream normally (exit status 0), unless ``count`` messages were due: then it is
    the client's error (exit status 2)."""
    import grpc

    from reservd.client import ReservdError

    seen = 0
    try:
        async for message in stream:
            if wanted is not None and not wanted(message):
                continue
            emit(message)
            seen += 1
            if count and seen >= count:
                break
    except ReservdError as error:
        if error.code is not grpc.StatusCode.DEADLINE_EXCEEDED or count:
            raise
    return 0
