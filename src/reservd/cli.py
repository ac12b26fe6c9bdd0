"""`reservd`: the daemon (`serve`), operator commands over the client, and WAL forensics."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import uuid
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from reservd import logs
from reservd.config import Config


def _print(message) -> None:
    print(json.dumps(MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )), flush=True)


def _line(text: str) -> tuple[str, int]:
    sku, sep, quantity = text.rpartition(":")
    if not sep or not sku:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SKU:QUANTITY")
    return sku, int(quantity)


def _parser() -> argparse.ArgumentParser:
    defaults = Config()
    parser = argparse.ArgumentParser(prog="reservd", description=__doc__)
    parser.add_argument("--log-level", default="info")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the daemon")
    serve.add_argument("--bind", default=defaults.bind)
    serve.add_argument("--data-dir", type=Path, default=defaults.data_dir)
    serve.add_argument(
        "--in-memory", action="store_true", help="no WAL: state dies with the process"
    )
    serve.add_argument("--metrics-port", type=int, default=None)
    serve.add_argument("--redis-url", default=None)
    serve.add_argument("--redis-prefix", default=defaults.redis_prefix)
    serve.add_argument("--shards", type=int, default=defaults.shards)
    serve.add_argument(
        "--snapshot-records-interval", type=int, default=defaults.snapshot_records_interval
    )
    serve.add_argument("--segment-bytes-max", type=int, default=defaults.segment_bytes_max)

    def client_command(name: str, help_: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_)
        sub.add_argument("--target", default="127.0.0.1:50051")
        sub.add_argument("--deadline", type=float, default=5.0, help="seconds")
        return sub

    sub = client_command("set", "recount: set a SKU's on_hand (creates it)")
    sub.add_argument("sku")
    sub.add_argument("on_hand", type=int)
    sub.add_argument("--reason", default="cli")
    sub.add_argument("--adjustment-id", default=None)
    sub.add_argument("--expected-on-hand", type=int, default=None)
    sub = client_command("adjust", "receipt (+) or damage/shrinkage (-)")
    sub.add_argument("sku")
    sub.add_argument("delta", type=int)
    sub.add_argument("--reason", default="cli")
    sub.add_argument("--adjustment-id", default=None)
    sub.add_argument("--expected-on-hand", type=int, default=None)
    sub = client_command("reserve", "reserve a cart: ID SKU:QTY [SKU:QTY ...]")
    sub.add_argument("reservation_id")
    sub.add_argument("lines", nargs="+", type=_line)
    sub.add_argument("--ttl", type=int, default=0, help="seconds (0: server default)")
    sub.add_argument("--channel", default="")
    sub.add_argument("--partial", action="store_true")
    sub = client_command("commit", "commit a reservation (optionally fewer units)")
    sub.add_argument("reservation_id")
    sub.add_argument("lines", nargs="*", type=_line)
    sub = client_command("extend", "extend a held reservation")
    sub.add_argument("reservation_id")
    sub.add_argument("ttl", type=int)
    for name, help_ in (("release", "release a reservation"), ("fulfil", "mark shipped")):
        client_command(name, help_).add_argument("reservation_id")
    sub = client_command("get", "stock of SKUs")
    sub.add_argument("skus", nargs="+")
    sub = client_command("watch", "stream stock updates")
    sub.add_argument("skus", nargs="*")
    sub.add_argument("--from-sequence", type=int, default=0)
    sub.add_argument("--count", type=int, default=0, help="stop after N updates (0: never)")

    wal = commands.add_parser("wal", help="inspect a data directory without starting")
    wal_commands = wal.add_subparsers(dest="wal_command", required=True)
    wal_commands.add_parser("verify", help="check every file; exit 1 on damage").add_argument(
        "directory", type=Path
    )
    wal_commands.add_parser("dump", help="print every record").add_argument(
        "directory", type=Path
    )
    return parser


def _serve(args) -> int:
    import uvloop

    from reservd.server import serve

    config = Config(
        bind=args.bind,
        data_dir=None if args.in_memory else args.data_dir,
        metrics_port=args.metrics_port,
        redis_url=args.redis_url,
        redis_prefix=args.redis_prefix,
        shards=args.shards,
        snapshot_records_interval=args.snapshot_records_interval,
        segment_bytes_max=args.segment_bytes_max,
    )
    from reservd.wal import WalCorruption

    try:
        return uvloop.run(serve(config))
    except WalCorruption as error:
        logging.getLogger("reservd").error(
            "start-up refused: the data directory is damaged before its tail",
            extra={"error": str(error), "path": str(error.path), "offset": error.offset,
                   "hint": f"inspect with: reservd wal verify {config.data_dir}"},
        )
        return 1
    except OSError as error:
        logging.getLogger("reservd").error(
            "start-up failed", extra={"error": str(error), "data_dir": str(config.data_dir)}
        )
        return 1


async def _client(args) -> int:
    from reservd.client import ReservdClient

    async with ReservdClient(args.target, deadline_seconds=args.deadline) as client:
        command = args.command
        if command in ("set", "adjust"):
            call = client.set_stock if command == "set" else client.adjust_stock
            value = args.on_hand if command == "set" else args.delta
            _print(
                await call(
                    args.sku, value, adjustment_id=args.adjustment_id or str(uuid.uuid4()),
                    reason=args.reason, expected_on_hand=args.expected_on_hand,
                )
            )
        elif command == "reserve":
            result = await client.reserve(
                args.reservation_id, args.lines, channel=args.channel, ttl_seconds=args.ttl,
                allow_partial=args.partial,
            )
            if result.error is not None:
                raise result.error
            _print(result.response)
            return 0 if result.granted else 3
        elif command == "commit":
            _print(await client.commit(args.reservation_id, dict(args.lines) or None))
        elif command == "extend":
            _print(await client.extend(args.reservation_id, args.ttl))
        elif command == "release":
            _print(await client.release(args.reservation_id))
        elif command == "fulfil":
            _print(await client.fulfil(args.reservation_id))
        elif command == "get":
            for stock in (await client.get_stock(args.skus)).values():
                _print(stock)
        elif command == "watch":
            seen = 0
            async for update in client.watch(args.skus, args.from_sequence):
                _print(update)
                seen += 1
                if args.count and seen >= args.count:
                    break
    return 0


def _wal(args) -> int:
    from reservd import wal

    if args.wal_command == "dump":
        wal.dump(args.directory, sys.stdout)
        return 0
    report = wal.verify(args.directory)
    print(report)
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.configure(args.log_level)
    if args.command == "serve":
        return _serve(args)
    if args.command == "wal":
        try:
            return _wal(args)
        except FileNotFoundError as error:
            print(f"reservd: {error}", file=sys.stderr)
            return 2
        except BrokenPipeError:
            return 0
    from reservd.client import ReservdError

    try:
        return asyncio.run(_client(args))
    except ReservdError as error:
        print(f"reservd: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
