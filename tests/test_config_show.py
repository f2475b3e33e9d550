"""`nearvoice config show`: the effective configuration of a role, from the packaged
defaults and `--config`, printed as TOML that loads back to the same settings, with what
comes from the environment listed and every secret in it masked."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from nearvoice.edge import cli
from nearvoice.edge.config import NodeConfig, Role, load
from nearvoice.edge.config_show import packaged_defaults
from tests.support import KID, SECRET

ADMIN = "admin-token-that-must-not-show-0001"
MINT = "mint-token-that-must-not-show-00002"
API_SECRET = "api-secret-that-must-not-show-0003"
AWS_ID = "AKIAMUSTNOTSHOW00004"
AWS_SECRET = "aws-secret-that-must-not-show-00005"
EXTERNAL = "external-bearer-that-must-not-show-6"
SECRETS = (SECRET, ADMIN, MINT, API_SECRET, AWS_ID, AWS_SECRET, EXTERNAL, "hunter2")

ORIGIN = """
role = "origin"
port = 9182

[synth]
voices = ["heart"]

[synth.exports]
heart = "/srv/exports/heart"

[origin]
store = "s3://speech/objects?endpoint=http://minio:hunter2@127.0.0.1:9000"
push_edges = ["http://10.0.0.5:8080"]

[api.voices]
alloy = "heart"

[api.tenants.acme]
policy = "personal"
miss_rate = 2.5

[limits.policy.draft]
miss_rate = 1.0

[[external]]
name = "kokoro"
base_url = "http://127.0.0.1:8880"
api_key_env = "KOKORO_TOKEN"
controls = ["lang"]

[[external.voices]]
name = "af_sky"
remote = "af_sky"
model_id = "kokoro-82m"
"""


def _show(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert cli.main(["config", "show", *args]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def _loads_back(text: str, tmp_path: Path, role: Role) -> NodeConfig:
    path = tmp_path / "shown.toml"
    path.write_text(text)
    return load(path, role)


@pytest.mark.parametrize("role", list(Role))
def test_the_packaged_defaults_are_the_nodes_defaults(role: Role) -> None:
    # A node started without --config runs load(None, role); the command shows the
    # packaged file, read with importlib.resources: the two must agree.
    assert load(None, role, defaults=packaged_defaults(role)) == load(None, role)


@pytest.mark.parametrize("role", list(Role))
def test_show_prints_toml_that_loads_back_to_the_defaults(
    role: Role, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = _show(capsys, "--role", role.value)
    assert tomllib.loads(text)["role"] == role.value
    assert ("[origin]" in text) is (role is Role.ORIGIN)
    assert _loads_back(text, tmp_path, role) == load(None, role)


def test_show_overlays_the_file_and_masks_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "origin.toml"
    config.write_text(ORIGIN)
    monkeypatch.setenv("NEARVOICE_KEYS", f"{KID}:{SECRET},old:{SECRET[::-1]}")
    monkeypatch.setenv("NEARVOICE_ADMIN_TOKEN", ADMIN)
    monkeypatch.setenv("NEARVOICE_MINT_TOKEN", MINT)
    monkeypatch.setenv("NEARVOICE_API_KEYS", f"acme:{API_SECRET}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("KOKORO_TOKEN", EXTERNAL)

    text = _show(capsys, "--config", str(config))  # the role is the file's
    for secret in SECRETS:
        assert secret not in text
    shown = _loads_back(text, tmp_path, Role.ORIGIN)
    expected = load(config, Role.ORIGIN)
    assert shown.replace(origin=expected.origin) == expected  # all but the masked password
    assert shown.origin.store == (
        "s3://speech/objects?endpoint=http://minio:********@127.0.0.1:9000"
    )
    assert shown.port == 9182 and shown.synth.exports == {"heart": "/srv/exports/heart"}
    assert shown.external[0].voices[0].name == "af_sky"
    assert shown.api.tenants["acme"].miss_rate == 2.5

    environment = dict(
        line[1:].strip().split(" = ", 1) for line in text.splitlines() if line.startswith("#   ")
    )
    assert environment == {
        "NEARVOICE_KEYS": f"{KID}:********, old:********",
        "NEARVOICE_ADMIN_TOKEN": "******** (set)",
        "NEARVOICE_API_KEYS": "acme:********",
        "NEARVOICE_MINT_TOKEN": "******** (set)",
        "AWS_ACCESS_KEY_ID": "******** (set)",
        "AWS_SECRET_ACCESS_KEY": "******** (set)",
        "AWS_SESSION_TOKEN": "(not set)",
        "AWS_REGION": '"eu-west-1"',
        "KOKORO_TOKEN": "******** (set)",
    }


def test_a_malformed_secret_is_masked_too(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEARVOICE_KEYS", "no-colon-so-the-whole-thing-may-be-a-secret")
    monkeypatch.setenv("NEARVOICE_API_KEYS", "acme:short")
    text = _show(capsys, "--role", "edge")
    assert "no-colon" not in text and "short" not in text
    assert "# From the environment (secrets masked):" in text


def test_show_refuses_a_file_of_another_role(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "shield.toml"
    config.write_text('role = "shield"\n')
    assert cli.main(["config", "show", "--role", "edge", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nearvoice: ") and "'shield'" in err and len(err.splitlines()) == 1


def test_show_runs_as_a_command(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "nearvoice", "config", "show", "--role", "shield"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout
    assert _loads_back(out, tmp_path, Role.SHIELD) == load(None, Role.SHIELD)
