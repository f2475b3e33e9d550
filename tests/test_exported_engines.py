"""Engines run what export made: a `[synth.exports]` directory puts its selected variant
behind a voice, in the renders and in the model identity that URLs carry."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pytest_aiohttp import AiohttpClient

from nearvoice.edge.app import create_app, default_engines
from nearvoice.edge.cli import main as nearvoice
from nearvoice.edge.config import SynthSettings
from nearvoice.edge.synth import exported
from nearvoice.edge.synth.hibari_engine import HibariEngine, hibari_model_id
from nearvoice.edge.synth.piper_engine import PiperEngine, piper_model_id
from nearvoice.edge.voices import for_config
from nearvoice.export.measure import snr
from tests.support import (
    make_config,
    make_keyring,
    make_spec,
    metric,
    render_through_node,
    sign,
    wait_ready,
)

pytestmark = pytest.mark.slow
TEXT = "Generate near, deliver near."


def chosen(export_dir: Path, name: str) -> exported.Chosen:
    export = exported.load(export_dir)
    variant = next(v for v in export.variants if v.name == name)
    model_id = f"piper-joe-medium.{name}@{variant.sha256}"
    return exported.Chosen("joe", export, variant, "cpu", model_id)


def joe_audio(engine: PiperEngine) -> np.ndarray:
    return np.concatenate(list(engine.stream(TEXT, "joe", 1.0, 0)))


def exports_config(tmp_path: Path, export_dir: Path) -> Any:
    return make_config(
        tmp_path,
        synth=SynthSettings(workers=1, voices=("joe",), exports={"joe": str(export_dir)}),
    )


def test_the_voice_carries_the_selected_variants_identity(joe_export: Path, tmp_path: Path) -> None:
    voice = for_config(exports_config(tmp_path, joe_export))["joe"]
    selected = exported.select(exported.load(joe_export), "cpu")
    assert voice.model_id == f"piper-joe-medium.{selected.name}@{selected.sha256}"
    assert voice.model_id != piper_model_id("joe")


def test_piper_renders_the_variant_file(joe_export: Path) -> None:
    packaged = joe_audio(PiperEngine())
    fp32 = joe_audio(PiperEngine(exported={"joe": chosen(joe_export, "fp32")}))
    fp16 = joe_audio(PiperEngine(exported={"joe": chosen(joe_export, "fp16")}))
    assert np.array_equal(packaged, fp32)  # the reference is the packaged model
    assert not np.array_equal(packaged, fp16)
    assert len(fp16) == len(packaged)
    assert snr(packaged, fp16) > 20.0


def test_a_variant_renders_identically_on_two_engines(joe_export: Path) -> None:
    one = PiperEngine(exported={"joe": chosen(joe_export, "fp16")})
    two = PiperEngine(exported={"joe": chosen(joe_export, "fp16")})
    assert np.array_equal(joe_audio(one), joe_audio(two))


def test_engine_reports_the_variant_model_id(joe_export: Path) -> None:
    choice = chosen(joe_export, "fp32-opt")
    assert PiperEngine(exported={"joe": choice}).model_id("joe") == choice.model_id


def test_hibari_renders_an_exported_variant(tmp_path: Path) -> None:
    from hibari.voices import voice_path

    from nearvoice.export.optimize import Options, optimize
    from nearvoice.export.sentences import SENTENCES

    out = tmp_path / "heart"
    optimize(
        Path(voice_path("heart")),
        out,
        opts=Options(sentences=SENTENCES[:1], repeats=1, variants=["fp32-opt"], progress=False),
    )
    export = exported.load(out)
    variant = next(v for v in export.variants if v.name == "fp32-opt")
    choice = exported.Chosen("heart", export, variant, "cpu", "hibari-heart.fp32-opt@x")
    engine = HibariEngine(exported={"heart": choice})
    audio = np.concatenate(list(engine.stream(TEXT, "heart", 1.0, 7)))
    packaged = np.concatenate(list(HibariEngine().stream(TEXT, "heart", 1.0, 7)))
    assert engine.model_id("heart") == "hibari-heart.fp32-opt@x"
    assert engine.model_id("heart") != hibari_model_id("heart")
    assert snr(packaged, audio) > 40.0


def test_a_tampered_variant_stops_the_node_from_starting(joe_export: Path, tmp_path: Path) -> None:
    copy = tmp_path / "joe"
    shutil.copytree(joe_export, copy)
    selected = exported.select(exported.load(copy), "cpu")
    selected.path.write_bytes(b"not the measured model")
    with pytest.raises(exported.ExportDirError, match="sha256"):
        default_engines(exports_config(tmp_path, copy))


def test_an_unknown_export_voice_is_refused(joe_export: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path, synth=SynthSettings(exports={"nova": str(joe_export)}))
    with pytest.raises(ValueError, match="nova"):
        for_config(config)


async def test_the_node_renders_urls_for_the_variant(
    aiohttp_client: AiohttpClient, joe_export: Path, tmp_path: Path
) -> None:
    config = exports_config(tmp_path, joe_export)
    client, audio, rate = await render_through_node(aiohttp_client, config, "joe", TEXT)
    assert rate == 22050 and len(audio) > rate // 2
    assert await metric(client, "nearvoice_synth_total", engine="piper") == 1.0


async def test_urls_for_the_packaged_model_are_not_rendered_by_a_variant(
    aiohttp_client: AiohttpClient, joe_export: Path, tmp_path: Path
) -> None:
    keyring = make_keyring()
    client = await aiohttp_client(create_app(exports_config(tmp_path, joe_export), keyring))
    await wait_ready(client)
    spec = make_spec(TEXT, voice="joe", model=piper_model_id("joe"))
    async with client.get(sign(keyring, spec)) as resp:
        assert resp.status >= 400
    assert await metric(client, "nearvoice_synth_total", engine="piper") == 0.0


def test_sign_with_the_config_names_the_variant(
    joe_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    config = tmp_path / "edge.toml"
    config.write_text(f'[synth]\nvoices = ["joe"]\n[synth.exports]\njoe = "{joe_export}"\n')
    monkeypatch.setenv("NEARVOICE_KEYS", "k1:" + "s" * 43)
    code = nearvoice(
        ["sign", "--base", "http://e", "--text", TEXT, "--voice", "joe", "--config", str(config)]
    )
    assert code == 0
    url = capsys.readouterr().out.strip()
    from nearvoice.edge.config import load

    spec = make_spec(TEXT, voice="joe", model=for_config(load(config))["joe"].model_id)
    assert f"/v1/speech/{spec.key}.wav?" in url


def test_a_node_with_exports_imports_no_export_dependencies(
    joe_export: Path, tiny_optimized: Path, tmp_path: Path
) -> None:
    # (onnx is an edge dependency: the duration pass reads the model's graph with it)
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; "
        "from edge.app import default_engines; from edge.config import NodeConfig, SynthSettings; "
        "c = NodeConfig(data_dir=Path(sys.argv[1]), synth=SynthSettings(voices=('joe', 'tiny'), "
        "exports={'joe': sys.argv[2], 'tiny': sys.argv[3]})); "
        "[e.warmup() for e in default_engines(c)]; "
        "print(sorted(m for m in ('torch', 'transformers', 'onnxscript', 'export') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), str(joe_export), str(tiny_optimized)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_variant_follows_the_configured_provider_not_the_host(
    joe_export: Path, tmp_path: Path
) -> None:
    config = make_config(
        tmp_path,
        synth=SynthSettings(providers=("tensorrt", "cpu"), exports={"joe": str(joe_export)}),
    )
    # The export measured no TensorRT rows, so a TensorRT tier runs the reference, even
    # on this CPU-only host, and every CPU-only signer agrees.
    fp32 = next(v for v in exported.load(joe_export).variants if v.name == "fp32")
    assert for_config(config)["joe"].model_id == f"piper-joe-medium.fp32@{fp32.sha256}"


def test_a_pinned_variant_names_the_voice(joe_export: Path, tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        synth=SynthSettings(exports={"joe": str(joe_export)}, variants={"joe": "fp16"}),
    )
    assert for_config(config)["joe"].model_id.startswith("piper-joe-medium.fp16@")


def test_engines_run_a_private_copy_of_the_variant(joe_export: Path, tmp_path: Path) -> None:
    config = exports_config(tmp_path, joe_export)
    (engine,) = default_engines(config)
    assert isinstance(engine, PiperEngine)
    copies = list((tmp_path / "node" / "models").iterdir())
    selected = exported.select(exported.load(joe_export), "cpu")
    assert [c.name for c in copies] == [f"{selected.sha256}.onnx"]


def test_a_node_with_a_broken_export_fails_to_start_with_a_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    config = tmp_path / "edge.toml"
    config.write_text(f'[synth.exports]\njoe = "{tmp_path / "missing"}"\n')
    monkeypatch.setenv("NEARVOICE_KEYS", "k1:" + "s" * 43)
    code = nearvoice(["edge", "--config", str(config), "--data-dir", str(tmp_path / "d")])
    assert code != 0
    err = capsys.readouterr().err
    assert "no manifest.json" in err and "Traceback" not in err
