"""Where the daemon's configuration comes from: a TOML file, ``RESERVD_*`` environment
variables and command-line flags, over the defaults of :class:`reservd.config.Config`.

Precedence: flags > environment > file > defaults. The keys are Config's field names, the same
everywhere: ``data_dir`` in the file, ``RESERVD_DATA_DIR`` in the environment, ``--data-dir``
on the command line. The input bounds are the ``[limits]`` table (``RESERVD_LIMITS_<KEY>``);
roles are the ``[auth_roles]`` table (file only: ``"identity" = ["role", ...]``).

A key the file does not know is an error naming it; so is a value of the wrong type.
:func:`example` renders every key with its default and the comment written above it in
config.py; ``reservd.example.toml`` is that output and a test keeps the two equal.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Mapping

from reservd.config import Config, ConfigError, Limits

ENV_PREFIX = "RESERVD_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_WORDS = {int: "an integer", float: "a number"}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional(hint) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def _coerce(key: str, hint, value: Any, from_text: bool) -> Any:
    """``value`` as the field's type; text (environment) is parsed. Raises ConfigError."""
    kind, nullable = _optional(hint)
    if nullable and (value is None or (from_text and value == "")):
        return None
    origin = typing.get_origin(kind)
    try:
        if kind is bool:
            if from_text:
                text = value.strip().lower()
                if text in _TRUE | _FALSE:
                    return text in _TRUE
            elif isinstance(value, bool):
                return value
            raise TypeError("expected true or false")
        if kind is int:
            if from_text:
                return int(value.replace("_", ""))
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            raise TypeError("expected an integer")
        if kind is float:
            if from_text:
                return float(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            raise TypeError("expected a number")
        if kind is str:
            if isinstance(value, str):
                return value
            raise TypeError("expected a string")
        if kind is Path:
            if isinstance(value, (str, Path)):
                return Path(value)
            raise TypeError("expected a path (a string)")
        if origin is collections.abc.Mapping:
            return _roles(key, value)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        text = str(error) if isinstance(error, TypeError) else "expected " + _WORDS[kind]
        raise ConfigError(f"{key}: {text}, got {value!r}") from None
    raise AssertionError(f"{key}: no conversion for {hint}")


def _roles(key: str, value: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, Mapping):
        raise TypeError("expected a table of identity = [roles]")
    roles = {}
    for identity, granted in value.items():
        if isinstance(granted, str):
            granted = [granted]
        if not isinstance(granted, list) or not all(isinstance(r, str) for r in granted):
            raise ConfigError(f"{key}.{identity}: expected a list of role names")
        roles[identity] = tuple(granted)
    return roles


def _limits(table: Any, base: Limits, from_text: bool) -> Limits:
    if not isinstance(table, Mapping):
        raise ConfigError("limits: expected a table")
    hints = _hints(Limits)
    changes = {}
    for key, value in table.items():
        if key not in hints:
            raise ConfigError(f"limits.{key}: unknown key")
        changes[key] = _coerce(f"limits.{key}", hints[key], value, from_text)
    return dataclasses.replace(base, **changes)


def read_file(path: Path) -> dict[str, Any]:
    """A TOML file's table; ConfigError (one line) when unreadable, malformed or unknown."""
    try:
        with open(path, "rb") as file:
            table = tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    hints = _hints(Config)
    for key in table:
        if key not in hints:
            raise ConfigError(f"{path}: {key}: unknown key")
    return table


def from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """The ``RESERVD_<KEY>`` and ``RESERVD_LIMITS_<KEY>`` variables that name Config fields
    (others, such as the client's RESERVD_TARGET, are not the daemon's and are left alone)."""
    found: dict[str, Any] = {}
    limits = {}
    for key in _hints(Config):
        if key in ("limits", "auth_roles"):
            continue
        name = ENV_PREFIX + key.upper()
        if name in environ:
            found[key] = environ[name]
    for key in _hints(Limits):
        name = f"{ENV_PREFIX}LIMITS_{key.upper()}"
        if name in environ:
            limits[key] = environ[name]
    if limits:
        found["limits"] = limits
    return found


def _apply(config: Config, values: Mapping[str, Any], from_text: bool) -> Config:
    hints = _hints(Config)
    changes = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{key}: unknown key")
        if key == "limits":
            changes[key] = _limits(value, config.limits, from_text)
        else:
            changes[key] = _coerce(key, hints[key], value, from_text)
    return dataclasses.replace(config, **changes)


def resolve(
    file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """The Config from defaults < ``file`` < ``environ`` < ``flags`` (flags: only those the
    operator gave, typed)."""
    config = Config()
    if file is not None:
        config = _apply(config, read_file(Path(file)), from_text=False)
    config = _apply(config, from_environment(environ or {}), from_text=True)
    return _apply(config, flags or {}, from_text=False)


def check(file: Path) -> Config:
    """``reservd config check``: the file alone, then what start-up would refuse (TLS files,
    tokens, roles, an exposed plain-text bind). Raises ConfigError with one line."""
    config = resolve(file)
    from reservd.server import Daemon

    Daemon.security(config)
    return config


# -- the example file --------------------------------------------------------------------------


def _comments(cls) -> dict[str, list[str]]:
    """The comment lines written just above each field in config.py."""
    comments: dict[str, list[str]] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped)
            continue
        match = re.match(r"(\w+): ", stripped)
        if match:
            comments[match.group(1)] = pending
        pending = []
    return comments


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:_}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (str, Path)):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise AssertionError(value)


def example() -> str:
    """reservd.example.toml: every key, its default and its comment (units are in the names)."""
    lines = [
        "# reservd configuration: every key with its default. Units are in the key names.",
        "# Precedence: command-line flags > RESERVD_<KEY> environment variables > this file >",
        "# defaults. Check a file with: reservd config check FILE",
        "",
    ]
    defaults = Config()
    comments = _comments(Config)
    for field in dataclasses.fields(Config):
        if field.name in ("limits", "auth_roles"):
            continue
        lines += comments.get(field.name, [])
        value = getattr(defaults, field.name)
        if value is None:
            lines.append(f"# {field.name} =  (unset by default)")
        else:
            lines.append(f"{field.name} = {_toml(value)}")
    lines += ["", "# Input bounds: INVALID_ARGUMENT beyond them.", "[limits]"]
    limit_comments = _comments(Limits)
    for field in dataclasses.fields(Limits):
        lines += limit_comments.get(field.name, [])
        lines.append(f"{field.name} = {_toml(getattr(defaults.limits, field.name))}")
    lines += [
        "",
        *comments["auth_roles"],
        "# Roles: checkout, sync, ops, admin. Empty by default.",
        "[auth_roles]",
        '# "checkout.example.com" = ["checkout"]',
        '# "spiffe://example.com/ops" = ["ops"]',
        "",
    ]
    return "\n".join(lines)
