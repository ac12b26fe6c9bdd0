"""`reservd serve`: the daemon's options and its start-up, where every refusal an operator
can fix is one structured line, never a traceback (reservd.cli wires it in)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from reservd.config import Config, ConfigError


def add_parser(command) -> None:
    """Add `serve`; ``command`` is reservd.cli's helper."""
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


def _refused(message: str, error: BaseException, **fields) -> int:
    """Start-up refused by an operator-fixable cause: one structured line, exit status 1."""
    logging.getLogger("reservd").error(message, extra={"error": str(error), **fields})
    return 1


# serve's options that are not Config fields.
_NOT_CONFIG = ("config", "in_memory")


def run(args) -> int:
    """`reservd serve`: resolve the settings, start the daemon, and turn every start-up
    failure an operator can fix into one line (exit status 1)."""
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
