"""`reservd alerts [--follow]`: the alerts feed on the command line, one JSON line per alert
(reservd.cli wires it in)."""
from __future__ import annotations

COMMANDS = ("alerts",)


def add_parsers(command, connection_options) -> None:
    """Add the alerts command; ``command``/``connection_options`` are reservd.cli's helpers."""
    sub = command(
        "alerts",
        "recent alerts, oldest first; --follow streams new ones (ctrl-C stops it: exit 130)",
    )
    connection_options(sub)
    sub.add_argument("--kind", action="append", default=[],
                     help="only this kind, repeatable (default: every kind)")
    sub.add_argument("--sku", default="", help="only this SKU (default: every SKU)")
    sub.add_argument("--level-min", type=int, default=0, help="only alerts at or above this level")
    sub.add_argument("--limit", type=int, default=0,
                     help="the newest N (default: the server's get_alerts_max)")
    sub.add_argument("--follow", action="store_true",
                     help="after the retained alerts, print new ones as they are raised")
    sub.add_argument("--from-sequence", type=int, default=0,
                     help="with --follow: resume after this sequence (0: every retained alert)")
    sub.add_argument("--count", type=int, default=0,
                     help="with --follow: stop after N alerts printed (0: never)")
    sub.add_argument(
        "--deadline", type=float, default=None,
        help="seconds the call may take (default: 5); with --follow, stop following after "
        "this many seconds (default: never)",
    )


def _wanted(args, alert) -> bool:
    return (not args.kind or alert.kind in args.kind) and (
        not args.sku or alert.sku == args.sku) and alert.level >= args.level_min


async def run(client, args, emit) -> int:
    """Print the alerts; ``emit`` prints a message as one JSON line (or a table row)."""
    if not args.follow:
        for alert in await client.get_alerts(args.kind, args.sku, args.level_min, args.limit):
            emit(alert)
        return 0
    import grpc

    from reservd.client import ReservdError

    seen = 0
    try:
        async for alert in client.watch_alerts(args.from_sequence, args.deadline):
            if not _wanted(args, alert):
                continue  # the stream carries every kind: the filters apply here
            emit(alert)
            seen += 1
            if args.count and seen >= args.count:
                break
    except ReservdError as error:
        # Reaching --deadline is how a time-boxed follow ends, unless COUNT alerts were due.
        if error.code is not grpc.StatusCode.DEADLINE_EXCEEDED or args.count:
            raise
    return 0
