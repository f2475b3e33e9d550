"""`[[external]]` servers in a node's TOML: how an operator plugs a heavy model into the
origin. The peer is piper's own HTTP server, started by tests/test_external_engine.py's
fixture; the origin renders through it, edges know its voices, and `sign` resolves them."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import soundfile
from pytest_aiohttp import AiohttpClient

from nearvoice.edge import cli
from nearvoice.edge.app import create_app
from nearvoice.edge.config import ExternalSettings, Role, load
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.keyring import KEYS_ENV
from nearvoice.edge.spec import Spec
from nearvoice.origin.app import create_origin_app
from nearvoice.origin.mint import MINT_TOKEN_ENV
from tests.support import KID, SECRET, make_keyring, metric, sign, wait_ready
from tests.test_external_engine import PIPER_REMOTE, piper_server  # noqa: F401 (fixture)

VOICE = "remote-joe"
MODEL = "piper-remote-joe@v1"
MINT_TOKEN = "mint-token-for-tests"


def write_config(path: Path, base_url: str, data_dir: Path) -> Path:
    path.write_text(
        f"""
data_dir = "{data_dir}"

[synth]
voices = ["heart"]
providers = ["cpu"]

[[external]]
name = "gpu-piper"
base_url = "{base_url}"
protocol = "piper"
sample_rate = 22050

[[external.voices]]
name = "{VOICE}"
remote = "{PIPER_REMOTE}"
model_id = "{MODEL}"
"""
    )
    return path


def test_external_tables_load_into_settings(tmp_path: Path) -> None:
    config = load(write_config(tmp_path / "o.toml", "http://127.0.0.1:9", tmp_path), Role.ORIGIN)
    (server,) = config.external
    assert isinstance(server, ExternalSettings)
    assert (server.name, server.protocol, server.sample_rate) == ("gpu-piper", "piper", 22050)
    assert [(v.name, v.remote, v.model_id) for v in server.voices] == [(VOICE, PIPER_REMOTE, MODEL)]


def test_unknown_keys_in_an_external_table_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[external]]\nname = "x"\nbase_uri = "http://typo"\n')
    with pytest.raises(ValueError, match="base_uri"):
        load(path, Role.ORIGIN)


@pytest.mark.slow
async def test_origin_mints_and_renders_a_configured_external_voice(
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    piper_server: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(MINT_TOKEN_ENV, MINT_TOKEN)
    config = load(write_config(tmp_path / "o.toml", piper_server, tmp_path / "o"), Role.ORIGIN)
    client = await aiohttp_client(create_origin_app(config, make_keyring()))
    await wait_ready(client)
    async with client.post(
        "/v1/speech",
        json={"text": "Rendered on the GPU box, in principle.", "voice": VOICE},
        headers={"Authorization": f"Bearer {MINT_TOKEN}"},
    ) as resp:
        assert resp.status == 201
        minted = await resp.json()
    target = minted["url"].split("://", 1)[1].split("/", 1)[1]
    async with client.get("/" + target) as resp:
        assert resp.status == 200
        body = await resp.read()
    audio, rate = soundfile.read(io.BytesIO(body))
    assert rate == 22050
    assert len(audio) > 22050 // 2
    assert await metric(client, "nearvoice_synth_total", engine="gpu-piper") == 1
    assert await metric(client, "nearvoice_engine_provider", engine="gpu-piper", provider="remote")


async def test_an_edge_knows_external_voices_and_sends_them_upstream(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    config = load(write_config(tmp_path / "e.toml", "http://127.0.0.1:9", tmp_path / "e"))
    client = await aiohttp_client(create_app(config, make_keyring(), engines=[]))
    spec = _external_spec()
    async with client.get(sign(make_keyring(), spec)) as resp:
        # Known, so not 400 unknown_voice; with no upstream to send it to, 503.
        assert resp.status == 503
        assert (await resp.json())["error"] == "no_renderer"


def test_sign_resolves_external_voices_from_a_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(KEYS_ENV, f"{KID}:{SECRET}")
    path = write_config(tmp_path / "o.toml", "http://127.0.0.1:9", tmp_path / "o")
    args = ["sign", "--base", "http://edge", "--text", "Hi.", "--voice", VOICE]
    assert cli.main([*args, "--config", str(path)]) == 0
    assert f"/v1/speech/{_external_spec(text='Hi.').key}.wav?" in capsys.readouterr().out
    assert cli.main(args) == 2  # without the config the voice is unknown


def _external_spec(text: str = "Known at the edge, rendered at the origin.") -> Spec:
    return Spec.create(text=text, voice=VOICE, format=AudioFormat.WAV, model=MODEL)
