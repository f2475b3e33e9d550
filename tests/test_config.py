"""Configuration: every file in configs/ lists every setting with its default, and a value
of the wrong type, out of range or against another setting is refused when the node
starts (one line, exit 2), never accepted to break a request later."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from nearvoice.edge import cli
from nearvoice.edge.checks import ConfigError
from nearvoice.edge.config import NodeConfig, Role, load
from nearvoice.edge.keyring import KEYS_ENV
from tests.support import KID, SECRET

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.toml"))
KEYS = f"{KID}:{SECRET}"
ROLE_ONLY = {"origin": {Role.ORIGIN}}
"""Sections that only a role's own file lists (the others ignore them)."""
OPTIONAL_TABLES = {"external", "torch", "api.tenants", "limits.policy"}
"""Arrays and maps of tables, empty by default: the files show them as commented examples."""


def _leaves(config: Any, prefix: str = "") -> dict[str, Any]:
    """Every setting under a settings dataclass, by dotted name."""
    names: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        name = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            names |= _leaves(value, f"{name}.")
        else:
            names[name] = value
    return names


def _listed(data: dict[str, Any], tables: set[str], prefix: str = "") -> set[str]:
    """Dotted names of the settings a TOML file sets; `tables` are settings whose value is
    itself a table (voice -> directory and the like)."""
    names: set[str] = set()
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in tables:
            names |= _listed(value, tables, f"{name}.")
        else:
            names.add(name)
    return names


def _optional(name: str) -> bool:
    return any(name == t or name.startswith(f"{t}.") for t in OPTIONAL_TABLES)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_each_config_file_lists_every_setting_with_its_default(path: Path) -> None:
    role = Role(path.stem)
    defaults = load(None, role)
    settings = _leaves(defaults)
    expected = {
        name
        for name in settings
        if not _optional(name) and role in ROLE_ONLY.get(name.split(".")[0], {role})
    }
    tables = {name for name, value in settings.items() if isinstance(value, dict)}
    with path.open("rb") as f:
        listed = _listed(tomllib.load(f), tables)
    assert sorted(expected - listed) == [], f"{path.name} does not list these settings"
    assert sorted(listed - expected) == [], f"{path.name} lists settings that do not exist"
    assert load(path, role) == defaults, f"{path.name} differs from the defaults"


def test_the_roles_cover_every_config_file() -> None:
    assert sorted(p.stem for p in CONFIGS) == sorted(r.value for r in Role)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


BAD = [
    ('[store]\nsize_limit = "big"\n', "store.size_limit: must be an integer"),
    ("[store]\nsize_limit = 0\n", "[store] size_limit"),
    ("[http]\nclock_skew = -100000\n", "[http] clock_skew"),
    ("[http]\nmax_ranges = 0\n", "[http] max_ranges"),
    ('role = "shield"\n', "sets role = 'shield', but this command runs the 'edge' role"),
    ("[synth]\nworkers = -3\n", "[synth] workers"),
    ('[synth]\nproviders = ["gpu"]\n', "[synth] providers"),
    ("port = 70000\n", "port: must be in 1..65535"),
    ("workers = 0\n", "workers: must be in"),
    ("[upstream]\nretries = 1.5\n", "upstream.retries: must be an integer"),
    ("[upstream]\ndeadline = 1.0\n", "connect_timeout <= first_byte_timeout <= deadline"),
    ("[upstream]\nbackoff_max = 0.01\n", "[upstream] backoff_max"),
    ("[hot]\nmemory_budget = 1024\n", "[hot] max_object_bytes"),
    ("[retention]\nhot = 60\n", "[retention] hot"),
    ("[prefetch]\nmax_specs = 0\n", "[prefetch] max_specs"),
    ('upstreams = ["shield:8081"]\n', "upstreams: must be an http"),
    ("[http]\nsendfile = 1\n", "http.sendfile: must be true or false"),
    ("[store\n", "not valid TOML"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_values_are_refused_at_load(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load(_write(tmp_path, text), Role.EDGE)
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


def test_integers_are_accepted_where_seconds_may_be_fractional(tmp_path: Path) -> None:
    config = load(_write(tmp_path, "[http]\nclock_skew = 5\n"), Role.EDGE)
    assert config.http.clock_skew == 5.0
    assert isinstance(config.http.clock_skew, float)


def test_origin_settings_are_checked_on_an_origin(tmp_path: Path) -> None:
    text = 'role = "origin"\n[origin]\ndefault_ttl = 7200\nmax_ttl = 3600\n'
    with pytest.raises(ConfigError, match=r"\[origin\] max_ttl"):
        load(_write(tmp_path, text), Role.ORIGIN)


def test_validate_checks_overrides_applied_after_load() -> None:
    with pytest.raises(ConfigError, match="port"):
        NodeConfig().replace(port=70000).validate()


# -- the command line: one line on stderr, exit 2 -----------------------------------------


def _node(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(["edge", "--data-dir", str(tmp_path / "data"), *args])
    err = capsys.readouterr().err
    return code, err


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEYS_ENV, KEYS)


@pytest.mark.usefixtures("keys")
@pytest.mark.parametrize(("text", "message"), BAD[:6], ids=[m for _, m in BAD[:6]])
def test_the_cli_refuses_bad_configs_with_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    code, err = _node(tmp_path, capsys, "--config", str(_write(tmp_path, text)))
    assert code == 2
    assert err.startswith("nearvoice: ") and err.count("\n") == 1
    assert message in err


@pytest.mark.usefixtures("keys")
def test_a_port_out_of_range_is_refused_not_wrapped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _node(tmp_path, capsys, "--port", "70000")
    assert code == 2
    assert "port: must be in 1..65535, not 70000" in err


@pytest.mark.usefixtures("keys")
def test_a_port_in_use_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = _node(tmp_path, capsys, "--port", str(port))
    assert code == 2
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in err
    assert err.count("\n") == 1


@pytest.mark.usefixtures("keys")
def test_a_data_dir_that_is_a_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "data").write_text("not a directory")
    code, err = _node(tmp_path, capsys, "--port", "1")
    assert code == 2
    assert f"data directory {tmp_path / 'data'}" in err
    assert err.count("\n") == 1


def test_a_real_process_with_a_bad_config_exits_2_without_a_traceback(tmp_path: Path) -> None:
    config = _write(tmp_path, '[store]\nsize_limit = "big"\n')
    env = {**os.environ, KEYS_ENV: KEYS}
    done = subprocess.run(
        [sys.executable, "-m", "nearvoice.edge.cli", "edge", "--config", str(config)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0
    assert "store.size_limit: must be an integer, not 'big'" in done.stderr


# -- signing within the nodes' limits -------------------------------------------------------


@pytest.mark.usefixtures("keys")
def test_sign_refuses_a_text_every_node_would_refuse(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["sign", "--base", "http://edge.example", "--voice", "heart"]
    code = cli.main([*args, "--text", "word " * 1200])  # 6,000 characters, 5,999 normalized
    out = capsys.readouterr()
    assert code == 2
    assert out.out == ""
    assert out.err.startswith("nearvoice: the text is 5999 characters after normalization")
    assert out.err.count("\n") == 1
    assert cli.main([*args, "--text", "word " * 999]) == 0  # 4,994 characters: signed
    assert capsys.readouterr().out.startswith("http://edge.example/v1/speech/")


@pytest.mark.usefixtures("keys")
def test_sign_uses_the_limits_of_the_given_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _write(tmp_path, "[http]\nmax_line_size = 8190\n")
    text = "é" * 4000  # within max_text_chars, but a sealed spec of 8,000 UTF-8 bytes
    code = cli.main(
        ["sign", "--base", "http://e", "--voice", "heart", "--text", text, "--config", str(config)]
    )
    assert code == 2
    assert "request line; nodes refuse more than 8190 ([http] max_line_size)" in (
        capsys.readouterr().err
    )


@pytest.mark.usefixtures("keys")
def test_sign_reads_a_config_of_any_role(capsys: pytest.CaptureFixture[str]) -> None:
    origin = str(REPO / "configs" / "origin.toml")
    args = ["sign", "--base", "http://e", "--voice", "joe", "--text", "Hi.", "--config", origin]
    assert cli.main(args) == 0
    assert capsys.readouterr().out.startswith("http://e/v1/speech/")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[limits]\nmiss_rate = -1.0\n", "[limits] miss_rate"),
        ("[limits]\nmax_buckets = 0\n", "[limits] max_buckets"),
        ("[limits.policy.forever]\nmiss_rate = 1.0\n", "[limits.policy] 'forever'"),
        ("[api]\nurl_ttl = 0\n", "[api] url_ttl"),
        ('[api]\npublic_base = "cdn.example"\n', "[api] public_base"),
        ("[api.tenants.acme]\nhit_rate = -2.0\n", "[api.tenants.acme] hit_rate"),
    ],
)
def test_rate_limits_and_the_api_are_checked_too(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load(_write(tmp_path, text), Role.EDGE)
    assert message in str(refused.value)
