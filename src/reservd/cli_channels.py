"""`reservd channel set|list|apply`, `reservd allocate`, `reservd buckets`, `reservd ats` and
`reservd watch-ats`: the channel commands of the CLI (reservd.cli wires them in)."""
from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

from google.protobuf.json_format import ParseDict, ParseError

from reservd.cli_stream import follow
from reservd.v1 import reservd_pb2 as pb

COMMANDS = ("channel", "allocate", "buckets", "ats", "watch-ats")

_NUMBERS = (
    ("--share-bp", "share of what the channel may draw, basis points (default 10000)"),
    ("--buffer-units", "units held back (default 0)"),
    ("--max-units", "the most it shows (default: no cap)"),
    ("--floor-units", "an ats at or below this shows 0 (default 0)"),
    ("--warning-units", "level 1 at or below this many available units (default 20)"),
    ("--critical-units", "level 2 (default 10)"),
    ("--emergency-units", "level 3 (default 5)"),
    ("--zero-units", "level 4: shows 0 (default 0)"),
    ("--hold-units", "at levels 2 and 3 show at most available minus this (default 3)"),
)


def add_parsers(command, client_command) -> None:
    """Add the channel commands; ``command``/``client_command`` are reservd.cli's helpers."""
    channel = command("channel", "channel policies: set, list, apply")
    sub = channel.add_subparsers(dest="channel_command", required=True)
    for name, help_ in (("set", "create or replace a channel's policy"),
                        ("list", "every channel's policy"),
                        ("apply", "set every channel of a JSON file (see examples/)")):
        parser = sub.add_parser(name, help=help_, description=help_,
                                formatter_class=channel.formatter_class)
        parser.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of reservd")
        parser.add_argument("--deadline", type=float, default=5.0,
                            help="seconds the call may take, retries included")
        if name == "set":
            parser.add_argument("channel", help="the channel's name (as in Reserve)")
            parser.add_argument("--pool", default="", help="its own bucket, drawn first")
            parser.add_argument("--reserve", default="", help="a reserve it draws next")
            parser.add_argument("--pool-only", action="store_true", help="never draw shared")
            parser.add_argument("--enforcement", choices=("display", "strict"),
                                default="display", help="strict: never beyond its ats")
            for option, text in _NUMBERS:
                parser.add_argument(option, type=int, default=None, help=text)
            parser.add_argument("--change-id", default=None,
                                help="makes a retry safe (default: a random UUID)")
        elif name == "apply":
            parser.add_argument("file", type=Path, help='{"channels": {NAME: ChannelPolicy}}')
    sub = client_command("allocate", "move free units between a SKU's buckets")
    sub.add_argument("sku", help="the SKU")
    sub.add_argument("from_bucket", help='"shared" or a bucket')
    sub.add_argument("to_bucket", help='"shared" or a bucket (a new name creates it)')
    sub.add_argument("units", type=int, help="free units to move")
    sub.add_argument("--change-id", default=None,
                     help="makes a retry safe (default: a random UUID)")
    sub = client_command("buckets", "each bucket's free, reserved and committed units")
    sub.add_argument("skus", nargs="+", help="SKUs to read")
    sub = client_command("ats", "what each channel may show of a SKU")
    sub.add_argument("sku", help="the SKU")
    sub.add_argument("--channel", action="append", default=[],
                     help="a channel (repeatable; default: every configured channel)")
    sub = command("watch-ats", "stream ats changes (ctrl-C stops it: exit status 130)")
    sub.add_argument("skus", nargs="*", help="SKUs to watch (default: every SKU)")
    sub.add_argument("--channel", action="append", default=[],
                     help="a channel (repeatable; default: every configured channel)")
    sub.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of reservd")
    sub.add_argument("--deadline", type=float, default=0.0,
                     help="stop watching after this many seconds (0: never)")
    sub.add_argument("--from-sequence", type=int, default=0,
                     help="resume after this sequence (0: the current values first)")
    sub.add_argument("--count", type=int, default=0, help="stop after N updates (0: never)")


def _policy(args) -> pb.ChannelPolicy:
    numbers = {
        option[2:].replace("-", "_"): getattr(args, option[2:].replace("-", "_"))
        for option, _ in _NUMBERS
    }
    return pb.ChannelPolicy(
        pool=args.pool, reserve=args.reserve, pool_only=args.pool_only,
        enforcement=pb.Enforcement.Value(args.enforcement.upper()),
        **{name: value for name, value in numbers.items() if value is not None},
    )


def _file_policies(path: Path) -> dict[str, pb.ChannelPolicy]:
    """The channels of a JSON file; ValueError names what is wrong in one line."""
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: {error}") from None
    channels = document.get("channels") if isinstance(document, dict) else None
    if not isinstance(channels, dict):
        raise ValueError(f'{path}: expected {{"channels": {{NAME: policy, ...}}}}')
    out = {}
    for name, policy in channels.items():
        try:
            out[name] = ParseDict(policy, pb.ChannelPolicy())
        except ParseError as error:
            raise ValueError(f"{path}: channels.{name}: {error}") from None
    return out


async def run(client, args, emit) -> int:
    """Run one channel command; ``emit`` prints a message as one JSON line."""
    command = args.command
    if command == "channel":
        if args.channel_command == "set":
            emit(await client.set_channel(
                args.channel, _policy(args), args.change_id or str(uuid.uuid4())
            ))
        elif args.channel_command == "list":
            for channel in await client.list_channels():
                emit(channel)
        else:
            try:
                policies = _file_policies(args.file)
            except ValueError as error:
                print(f"reservd: {error}", file=sys.stderr)  # one line, as every CLI error
                return 2
            for name, policy in policies.items():
                # The same file applied twice changes nothing the second time.
                change_id = f"apply:{name}:{policy.SerializeToString(deterministic=True).hex()}"
                emit(await client.set_channel(name, policy, change_id[:128]))
    elif command == "allocate":
        emit(await client.allocate(
            args.sku, args.from_bucket, args.to_bucket, args.units,
            args.change_id or str(uuid.uuid4()),
        ))
    elif command == "buckets":
        for buckets in await client.get_buckets(args.skus):
            emit(buckets)
    elif command == "ats":
        channels = args.channel or [c.channel for c in await client.list_channels()]
        for value in await client.get_ats([args.sku], channels):
            emit(value)
    else:
        return await _watch_ats(client, args, emit)
    return 0


async def _watch_ats(client, args, emit) -> int:
    channels = args.channel or [c.channel for c in await client.list_channels()]
    return await follow(client.watch_ats(
        channels, args.skus, args.from_sequence, deadline_seconds=args.deadline or None
    ), emit, args.count)
