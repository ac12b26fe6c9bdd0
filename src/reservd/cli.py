"""`reservd`: the daemon (`serve`), operator commands over the client, and WAL forensics."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import uuid
from pathlib import Path

from reservd import cli_alerts, cli_channels, cli_planning, cli_rules, cli_stock, logs, output
from reservd.config import Config, ConfigError


def _line(text: str) -> tuple[str, int]:
    sku, sep, quantity = text.rpartition(":")
    if not sep or not sku:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SKU:QUANTITY")
    return sku, int(quantity)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already says what the default means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _connection_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """--target and the TLS/token options, accepted before or after the subcommand: the
    top-level parser holds the defaults (from RESERVD_* variables), a subcommand only what is
    given to it."""
    env = os.environ

    def default(value):
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--target", default=default(env.get("RESERVD_TARGET", "127.0.0.1:50051")),
        help="HOST:PORT of reservd (default: $RESERVD_TARGET, else 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--ca", default=default(env.get("RESERVD_CA")),
        help="trusted CA (PEM) for TLS (default: $RESERVD_CA, else plain text)",
    )
    parser.add_argument(
        "--cert", default=default(env.get("RESERVD_CERT")),
        help="client certificate (PEM) for mutual TLS (default: $RESERVD_CERT, else none)",
    )
    parser.add_argument(
        "--key", default=default(env.get("RESERVD_KEY")),
        help="the client certificate's key (PEM) (default: $RESERVD_KEY, else none)",
    )
    parser.add_argument(
        "--token", default=default(env.get("RESERVD_TOKEN")),
        help="bearer token sent with every call (default: $RESERVD_TOKEN, else none)",
    )
    parser.add_argument(
        "--tls", action="store_true", default=default(False),
        help="TLS trusting the system's roots; implied by --ca or --cert (default: off)",
    )
    parser.add_argument(
        "--server-name", default=default(None),
        help="name to check in the server certificate (default: the target's host)",
    )
    parser.add_argument(
        "--format", choices=("json", "table"), default=default("json"),
        help="JSON lines (integers as numbers, UTF-8) or an aligned table (default: json)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reservd", description=__doc__, formatter_class=_Formatter
    )
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error"),
        help="the least severe log lines written (JSON, one a line, on stderr)",
    )
    _connection_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_: str, subparsers=commands) -> argparse.ArgumentParser:
        return subparsers.add_parser(
            name, help=help_, description=help_, formatter_class=_Formatter
        )

    # Flags default to None: only what is given overrides RESERVD_* and the --config file.
    serve = command("serve", "run the daemon (flags > RESERVD_* env > --config file > defaults)")
    serve.add_argument(
        "--config", type=Path, default=None,
        help="a TOML file of settings (default: none; see reservd.example.toml)",
    )
    serve.add_argument(
        "--bind", default=None, help="HOST:PORT to listen on, port 0: any (default: 127.0.0.1:50051)"
    )
    serve.add_argument(
        "--data-dir", type=Path, default=None,
        help="directory of the write-ahead log and snapshots, created 0700 (default: reservd-data)",
    )
    serve.add_argument(
        "--in-memory", action="store_true", help="no WAL: state dies with the process"
    )
    serve.add_argument(
        "--metrics-port", type=int, default=None,
        help="serve Prometheus metrics on 127.0.0.1:PORT (default: no metrics endpoint)",
    )
    serve.add_argument(
        "--metrics-bind", default=None,
        help="serve Prometheus metrics on HOST:PORT (default: see --metrics-port)",
    )
    serve.add_argument(
        "--redis-url", default=None,
        help="mirror stock to this Redis (redis://host:port/db); grants wait for it "
        "(default: no mirror)",
    )
    serve.add_argument(
        "--redis-prefix", default=None, help="prefix of every mirror key (default: reservd:)"
    )
    serve.add_argument(
        "--shards", type=int, default=None,
        help="counter table shards, a power of two (default: 64)",
    )
    serve.add_argument(
        "--snapshot-records-interval", type=int, default=None,
        help="write a snapshot after this many log records (default: 1,000,000)",
    )
    serve.add_argument(
        "--segment-bytes-max", type=int, default=None,
        help="start a new log segment beyond this size in bytes (default: 64 MiB)",
    )
    serve.add_argument("--tls-cert-file", type=Path, default=None,
                       help="server certificate chain, PEM (default: plain text)")
    serve.add_argument("--tls-key-file", type=Path, default=None,
                       help="its private key, PEM (default: plain text)")
    serve.add_argument("--tls-client-ca-file", type=Path, default=None,
                       help="CA that signs client certificates, PEM (default: none)")
    serve.add_argument("--tls-require-client-auth", action="store_true", default=None,
                       help="mutual TLS: refuse clients without a certificate (default: off)")
    serve.add_argument("--auth-tokens-file", type=Path, default=None,
                       help='TOML file of identity = "token" (default: no tokens)')
    serve.add_argument(
        "--insecure", action="store_true", default=None,
        help="allow plain text with no authentication on a non-loopback bind (default: refused)",
    )

    config = command("config", "configuration files")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    command(
        "check", "check a file as start-up would; exit 1 with one line naming the key",
        config_commands,
    ).add_argument("file", type=Path, help="the TOML file")
    command("example", "print every key with its default", config_commands)

    def client_command(name: str, help_: str) -> argparse.ArgumentParser:
        sub = command(name, help_)
        _connection_options(sub, suppress=True)
        sub.add_argument(
            "--deadline", type=float, default=5.0,
            help="seconds the call may take, retries included",
        )
        return sub

    def stock_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--reason", default="cli", help="why, kept in the log")
        sub.add_argument(
            "--adjustment-id", default=None,
            help="makes a retry safe: the same id is applied once (default: a random UUID)",
        )
        sub.add_argument(
            "--expected-on-hand", type=int, default=None,
            help="refuse (FAILED_PRECONDITION) unless on_hand is this now (default: no check)",
        )

    sub = client_command("set", "recount: set a SKU's on_hand (creates it)")
    sub.add_argument("sku", help="the SKU")
    sub.add_argument("on_hand", type=int, help="units physically in stock now")
    stock_options(sub)
    sub = client_command("adjust", "receipt (+) or damage/shrinkage (-)")
    sub.add_argument("sku", help="the SKU")
    sub.add_argument("delta", type=int, help="units to add (negative: remove)")
    stock_options(sub)
    sub = client_command("reserve", "reserve a cart: ID SKU:QTY [SKU:QTY ...]")
    sub.add_argument("reservation_id", help="the cart's id (a retry reuses it)")
    sub.add_argument("lines", nargs="+", type=_line, help="SKU:QUANTITY, one per SKU")
    sub.add_argument("--ttl", type=int, default=0, help="seconds (0: server default)")
    sub.add_argument("--channel", default="", help="sales channel, kept with the reservation")
    sub.add_argument(
        "--partial", action="store_true",
        help="grant what is available of each line instead of all or nothing",
    )
    sub = client_command("commit", "commit a reservation (optionally fewer units)")
    sub.add_argument("reservation_id", help="the reservation")
    sub.add_argument(
        "lines", nargs="*", type=_line, help="SKU:QUANTITY to commit (default: every unit held)"
    )
    sub = client_command("extend", "extend a held reservation")
    sub.add_argument("reservation_id", help="the reservation")
    sub.add_argument("ttl", type=int, help="seconds from now it is held at least")
    for name, help_ in (
        ("release", "release a reservation"), ("fulfil", "mark shipped"),
        ("get-reservation", "a reservation's state, lines and expiry"),
    ):
        client_command(name, help_).add_argument("reservation_id", help="the reservation")
    sub = client_command("get", "stock of SKUs")
    sub.add_argument("skus", nargs="+", help="SKUs to read")
    sub = command("watch", "stream stock updates (ctrl-C stops it: exit status 130)")
    sub.add_argument("skus", nargs="*", help="SKUs to watch (default: every SKU)")
    _connection_options(sub, suppress=True)
    sub.add_argument(
        "--deadline", type=float, default=0.0,
        help="stop watching after this many seconds (0: never); with --count, not seeing "
        "COUNT updates by then is an error (exit status 2)",
    )
    sub.add_argument(
        "--from-sequence", type=int, default=0,
        help="resume after this sequence (0: the current state first)",
    )
    sub.add_argument("--count", type=int, default=0, help="stop after N updates (0: never)")

    cli_channels.add_parsers(command, client_command)
    cli_stock.add_parsers(client_command)
    cli_rules.add_parsers(command, client_command, _connection_options)
    cli_alerts.add_parsers(command, lambda sub: _connection_options(sub, suppress=True))
    cli_planning.add_parsers(client_command)

    wal = command("wal", "inspect a data directory without starting")
    wal_commands = wal.add_subparsers(dest="wal_command", required=True)
    command(
        "verify", "check every file and replay the log through the ledger; exit 1 on damage",
        wal_commands,
    ).add_argument("directory", type=Path, help="the daemon's --data-dir")
    command("dump", "print every record", wal_commands).add_argument(
        "directory", type=Path, help="the daemon's --data-dir"
    )
    return parser


def _refused(message: str, error: BaseException, **fields) -> int:
    """Start-up refused by an operator-fixable cause: one structured line, exit status 1."""
    logging.getLogger("reservd").error(message, extra={"error": str(error), **fields})
    return 1


# serve's options that are not Config fields.
_NOT_CONFIG = ("config", "in_memory")


def _serve(args) -> int:
    # gRPC core writes its own log lines, not JSON, and a failed bind would come out twice:
    # reservd says what matters. GRPC_VERBOSITY=error (or debug) brings them back.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    import uvloop

    from reservd import settings
    from reservd.recovery import ReplayError
    from reservd.server import serve
    from reservd.wal import DataDirectoryInUse, WalCorruption

    flags = {
        key: value for key, value in vars(args).items()
        if value is not None and key in Config.__dataclass_fields__ and key not in _NOT_CONFIG
    }
    if args.in_memory:
        flags["data_dir"] = None
    try:
        config = settings.resolve(args.config, os.environ, flags)
    except ConfigError as error:
        return _refused("start-up refused: a setting is wrong", error)
    if config.redis_url is not None:
        from redis.connection import parse_url

        try:
            parse_url(config.redis_url)
        except ValueError as error:
            return _refused(
                "start-up refused: --redis-url is malformed", error, redis_url=config.redis_url,
                hint="expected redis://HOST:PORT/DB (or rediss:// or unix://)",
            )
    # The data directory and the WAL files are the owner's alone, whatever the umask.
    os.umask(0o077)
    if config.data_dir is not None and config.data_dir.is_dir():
        config.data_dir.chmod(0o700)
    try:
        return uvloop.run(serve(config))
    except ConfigError as error:
        return _refused("start-up refused: a setting is wrong", error)
    except WalCorruption as error:
        return _refused(
            "start-up refused: the data directory is damaged before its tail", error,
            path=str(error.path), offset=error.offset,
            hint=f"inspect with: reservd wal verify {config.data_dir}",
        )
    except ReplayError as error:
        return _refused(
            "start-up refused: a logged command cannot be replayed", error, **error.fields()
        )
    except DataDirectoryInUse as error:
        return _refused("start-up refused: the data directory is in use", error,
                        data_dir=str(config.data_dir))
    except OSError as error:
        return _refused("start-up failed", error, bind=config.bind,
                        data_dir=str(config.data_dir))
    except Exception as error:  # a bug during start-up or shutdown: one line, no traceback
        from reservd.supervisor import EXIT_FATAL, log_fatal

        log_fatal(error, "serve")
        return EXIT_FATAL


async def _client(args) -> int:
    from reservd.client import ReservdClient

    client = ReservdClient(
        # `watch` and `alerts --follow` may have no deadline: their unary calls still do.
        args.target, deadline_seconds=args.deadline or 5.0, ca_file=args.ca, cert_file=args.cert,
        key_file=args.key, token=args.token, server_name=args.server_name, tls=args.tls,
    )

    def _print(message) -> None:
        output.emit(message, args.format)

    async with client:
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
        elif command == "get-reservation":
            _print(await client.get_reservation(args.reservation_id))
        elif command == "get":
            output.emit_all(list((await client.get_stock(args.skus)).values()), args.format)
        elif command == "watch":
            return await _watch(client, args)
        elif command in cli_channels.COMMANDS:
            return await cli_channels.run(client, args, _print)
        elif command in cli_stock.COMMANDS:
            return await cli_stock.run(client, args, _print)
        elif command in cli_rules.COMMANDS:
            return await cli_rules.run(client, args, _print)
        elif command in cli_alerts.COMMANDS:
            return await cli_alerts.run(client, args, _print)
        elif command in cli_planning.COMMANDS:
            return await cli_planning.run(client, args, _print)
    return 0


async def _watch(client, args) -> int:
    import grpc

    from reservd.client import ReservdError

    seen = 0
    try:
        async for update in client.watch(
            args.skus, args.from_sequence, deadline_seconds=args.deadline or None
        ):
            output.emit(update, args.format)
            seen += 1
            if args.count and seen >= args.count:
                break
    except ReservdError as error:
        # Reaching --deadline is how a time-boxed watch ends, unless COUNT updates were due.
        if error.code is not grpc.StatusCode.DEADLINE_EXCEEDED or args.count:
            raise
    return 0


def _wal(args) -> int:
    from reservd import recovery, wal

    if args.wal_command == "dump":
        wal.require_data_directory(args.directory)
        wal.dump(args.directory, sys.stdout, decoded=True)
        return 0
    report = recovery.verify(args.directory)
    print(report)
    return 0 if report.ok else 1


def _config(args) -> int:
    from reservd import settings

    if args.config_command == "example":
        sys.stdout.write(settings.example())
        return 0
    try:
        settings.check(args.file)
    except ConfigError as error:
        print(f"reservd: {error}", file=sys.stderr)
        return 1
    print(f"{args.file}: ok")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.configure(args.log_level)
    if args.command == "serve":
        return _serve(args)
    if args.command == "config":
        return _config(args)
    if args.command == "wal":
        from reservd.wal import NotADataDirectory

        try:
            return _wal(args)
        except NotADataDirectory as error:
            print(f"reservd: {error}", file=sys.stderr)
            return 2
        except BrokenPipeError:
            return 0
    from reservd.client import ReservdError

    try:
        return asyncio.run(_client(args))
    except (ReservdError, ConfigError) as error:
        print(f"reservd: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130  # 128 + SIGINT, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
