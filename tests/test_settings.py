"""Configuration layering (file < environment < flags), `reservd config check`, the example
file, the CLI's output and options, and the data directory's permissions."""
from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from daemonproc import DaemonProcess

from reservd import cli, output, settings
from reservd.config import Config, ConfigError, Limits
from reservd.v1 import reservd_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


def test_precedence_flags_over_environment_over_file(tmp_path):
    file = tmp_path / "reservd.toml"
    file.write_text(
        'bind = "127.0.0.1:7000"\nshards = 8\nexpiry_tick_ms = 50\n'
        '[limits]\nlines_max = 10\nquantity_max = 20\n'
        '[auth_roles]\n"shop.example" = ["checkout"]\n'
    )
    environ = {"RESERVD_SHARDS": "16", "RESERVD_EXPIRY_TICK_MS": "1_000",
               "RESERVD_LIMITS_LINES_MAX": "11", "RESERVD_INSECURE": "yes",
               "RESERVD_TARGET": "not the daemon's"}
    config = settings.resolve(file, environ, {"shards": 32})
    assert config.bind == "127.0.0.1:7000"  # file
    assert config.expiry_tick_ms == 1000  # environment over file
    assert config.shards == 32  # flag over environment
    assert config.limits == dataclasses.replace(Limits(), lines_max=11, quantity_max=20)
    assert config.insecure is True
    assert config.auth_roles == {"shop.example": ("checkout",)}
    assert settings.resolve() == Config()


@pytest.mark.parametrize(
    "text, message",
    [
        ('bnid = "x"\n', "bnid: unknown key"),
        ("[limits]\nline_max = 3\n", "limits.line_max: unknown key"),
        ('shards = "8"\n', "shards: expected an integer, got '8'"),
        ("insecure = 1\n", "insecure: expected true or false"),
        ("bind = \n", "not valid TOML"),
        ('[auth_roles]\nx = [1]\n', "auth_roles.x: expected a list of role names"),
    ],
)
def test_bad_files_are_one_line_naming_the_key(tmp_path, text, message):
    file = tmp_path / "bad.toml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=message):
        settings.resolve(file)


def test_bad_environment_values_name_the_variable_key():
    with pytest.raises(ConfigError, match="shards: expected an integer, got 'many'"):
        settings.resolve(environ={"RESERVD_SHARDS": "many"})
    assert settings.resolve(environ={"RESERVD_METRICS_PORT": ""}).metrics_port is None


def test_the_example_file_is_generated_and_lists_every_key():
    text = (ROOT / "reservd.example.toml").read_text()
    assert text == settings.example(), "regenerate: reservd config example > reservd.example.toml"
    for field in dataclasses.fields(Config):
        if field.name != "limits":
            assert f"{field.name} =" in text or f"[{field.name}]" in text, field.name
    for field in dataclasses.fields(Limits):
        assert f"\n{field.name} = " in text, field.name
    # It parses to the defaults.
    assert settings.resolve(ROOT / "reservd.example.toml") == Config()


def test_config_check_command(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text('bind = "127.0.0.1:7000"\n')
    assert cli.main(["config", "check", str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: ok\n"
    exposed = tmp_path / "exposed.toml"
    exposed.write_text('bind = "0.0.0.0:7000"\n')
    assert cli.main(["config", "check", str(exposed)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "bind: 0.0.0.0:7000 is not loopback" in error
    tls = tmp_path / "tls.toml"
    tls.write_text(f'tls_cert_file = "{tmp_path}/none.crt"\ntls_key_file = "{tmp_path}/k"\n')
    assert cli.main(["config", "check", str(tls)]) == 1
    assert "tls_cert_file: cannot read" in capsys.readouterr().err


def test_json_output_keeps_integers_and_utf8(capsys):
    stock = pb.Stock(sku="café-1", on_hand=10**12, reserved=2, committed=0, available=10**12 - 2)
    output.emit(stock)
    line = capsys.readouterr().out
    assert "café-1" in line
    assert json.loads(line) == {
        "sku": "café-1", "on_hand": 10**12, "reserved": 2, "committed": 0,
        "available": 10**12 - 2,
    } | {key: value for key, value in json.loads(line).items()
         if key not in ("sku", "on_hand", "reserved", "committed", "available")}
    assert list(json.loads(line))[:2] == ["sku", "on_hand"]
    output.emit_all([stock, stock], "table")
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["sku", "on_hand"] and len(table) == 3


def test_serve_makes_the_data_directory_private_whatever_the_umask(tmp_path):
    data = tmp_path / "data"
    daemon = DaemonProcess(
        "--data-dir", str(data), env={"PYTHONPATH": str(ROOT / "src")},
        wrapper=["sh", "-c", 'umask 000; exec "$@"', "sh"],
    ).start()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "reservd", "set", "sku-1", "3", "--target", daemon.target],
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr
        # --target after the subcommand or before it; JSON with integers as numbers.
        result = subprocess.run(
            [sys.executable, "-m", "reservd", "--target", daemon.target, "get", "sku-1"],
            capture_output=True, text=True, timeout=60,
        )
        assert json.loads(result.stdout)["on_hand"] == 3
    finally:
        daemon.kill()
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    files = [path for path in data.iterdir() if path.is_file()]
    assert files
    for path in files:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
