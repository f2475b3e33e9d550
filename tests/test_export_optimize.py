"""export/optimize.py: variants of the shipped voices and of a from-transformers export,
each measured against the source, reported, and selected only when they pass parity."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from nearvoice.edge.synth import exported
from nearvoice.edge.synth.piper_engine import BUNDLED
from nearvoice.export.errors import CorruptModel, ExportError
from nearvoice.export.measure import Thresholds
from nearvoice.export.optimize import Options, optimize
from nearvoice.export.sentences import SENTENCES

pytestmark = pytest.mark.slow


def manifest_of(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((path / "manifest.json").read_text())
    return data


def by_name(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in manifest["variants"]}


def test_twenty_fixed_sentences() -> None:
    assert len(SENTENCES) == 20
    assert len(set(SENTENCES)) == 20


def test_joe_gets_every_variant_or_the_reason(joe_export: Path) -> None:
    variants = by_name(manifest_of(joe_export))
    assert list(variants) == ["fp32", "fp32-sim", "fp32-opt", "fp16", "int8"]
    for name in ("fp32", "fp32-sim", "fp32-opt", "fp16"):
        assert (joe_export / variants[name]["file"]).is_file()
    # piper's MatMuls multiply activations by activations: no weights to quantize.
    assert "nothing to quantize" in variants["int8"]["skipped"]


def test_joe_fp16_keeps_durations_and_passes_parity(joe_export: Path) -> None:
    fp16 = by_name(manifest_of(joe_export))["fp16"]
    assert fp16["parity"]["length_mismatches"] == 0
    assert fp16["parity"]["passed"]
    assert fp16["bytes"] < 0.8 * by_name(manifest_of(joe_export))["fp32"]["bytes"]


def test_every_variant_is_deterministic(joe_export: Path) -> None:
    for variant in manifest_of(joe_export)["variants"]:
        if variant.get("file"):
            assert variant["deterministic"], variant["name"]


def test_sizes_and_hashes_are_the_files(joe_export: Path) -> None:
    for variant in manifest_of(joe_export)["variants"]:
        if variant.get("file"):
            data = (joe_export / variant["file"]).read_bytes()
            assert variant["bytes"] == len(data)
            assert variant["sha256"] == hashlib.sha256(data).hexdigest()


def test_speed_is_measured_on_one_cpu_thread(joe_export: Path) -> None:
    for variant in manifest_of(joe_export)["variants"]:
        if variant.get("file"):
            cpu = variant["speed"]["cpu"]
            assert cpu["threads"] == 1
            assert cpu["x_realtime"] == pytest.approx(cpu["audio_s"] / cpu["wall_s"], rel=0.01)


def test_reference_parity_is_exact(joe_export: Path) -> None:
    fp32 = by_name(manifest_of(joe_export))["fp32"]
    assert fp32["parity"]["snr_db_min"] == 99.0
    assert fp32["parity"]["mel_db_max"] == 0.0
    assert fp32["sha256"] == hashlib.sha256(BUNDLED["joe"].model_path().read_bytes()).hexdigest()


def test_tensorrt_section_records_a_profile(joe_export: Path) -> None:
    trt = manifest_of(joe_export)["tensorrt"]
    assert trt["opset"] == 15 and trt["opset_ok"]
    assert trt["provider_options"]["trt_profile_min_shapes"].startswith("input:1x1,")
    assert "input:1x1024" in trt["provider_options"]["trt_profile_max_shapes"]
    assert trt["simplify"]["nodes_after"] < trt["simplify"]["nodes_before"]


def test_ort_optimised_variant_is_cpu_only(joe_export: Path) -> None:
    opt = by_name(manifest_of(joe_export))["fp32-opt"]
    assert opt["providers"] == ["cpu"]
    assert not opt["tensorrt"]["friendly"]  # fused contrib ops are not TensorRT's


def test_selection_in_the_manifest_is_the_engines_choice(joe_export: Path) -> None:
    manifest = manifest_of(joe_export)
    choice = exported.select(exported.load(joe_export), "cpu")
    assert manifest["selected"]["cpu"] == choice.name
    assert by_name(manifest)[choice.name]["parity"]["passed"]


def test_report_table_and_chart(joe_export: Path) -> None:
    report = (joe_export / "report.md").read_text()
    assert "| fp16 |" in report and "| int8 |" in report
    assert "skipped: no MatMul or Gemm" in report
    assert (joe_export / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_piper_config_travels_with_the_variants(joe_export: Path) -> None:
    assert (joe_export / "model.onnx.json").read_bytes() == BUNDLED[
        "joe"
    ].config_path().read_bytes()


def test_hibari_variants(tmp_path: Path) -> None:
    from hibari.voices import voice_path

    out = tmp_path / "heart"
    optimize(
        Path(voice_path("heart")),
        out,
        opts=Options(sentences=SENTENCES[:2], repeats=1, progress=False),
    )
    manifest = manifest_of(out)
    variants = by_name(manifest)
    assert manifest["family"] == "hibari"
    assert variants["fp32-opt"]["parity"]["passed"]
    # hibari ships int8 already: TensorRT cannot take its integer MatMuls.
    assert "MatMulInteger" in manifest["tensorrt"]["unsupported"]
    assert manifest["selected"]["cpu"] in variants


def test_from_transformers_output_is_optimised(tiny_optimized: Path) -> None:
    manifest = manifest_of(tiny_optimized)
    variants = by_name(manifest)
    assert manifest["family"] == "vits"
    assert manifest["sample_rate"] == 16000
    assert variants["int8"]["quantized_nodes"] > 0  # transformers' attention has weights
    assert (tiny_optimized / "vits.json").is_file()


def test_a_variant_failing_parity_is_reported_and_never_selected(
    tiny_export: Path, tmp_path: Path
) -> None:
    out = tmp_path / "strict"
    strict = Thresholds(max_mel_db=3.0, min_snr_db=98.0)  # only bit-exact variants pass
    optimize(
        tiny_export / "model.onnx", out, opts=Options(repeats=1, thresholds=strict, progress=False)
    )
    manifest = manifest_of(out)
    variants = by_name(manifest)
    assert not variants["fp16"]["parity"]["passed"]
    assert "FAIL" in (out / "report.md").read_text()
    assert variants[manifest["selected"]["cpu"]]["parity"]["passed"]
    for provider in manifest["providers"]:
        assert exported.select(exported.load(out), provider).name != "fp16"


def test_a_failed_run_keeps_the_previous_export(tiny_optimized: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(CorruptModel):
        optimize(bad, out, opts=Options(progress=False))
    assert (out / "manifest.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "out"]


def test_unknown_variant_names_are_refused(tiny_export: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="bf16"):
        optimize(tiny_export / "model.onnx", tmp_path / "o", opts=Options(variants=["bf16"]))


def test_a_model_that_does_not_render_leaves_nothing(tmp_path: Path) -> None:
    from tests.export_support import graph_with_inputs

    # piper's input names, but float inputs where piper feeds phoneme ids
    fake = graph_with_inputs(tmp_path / "fake.onnx", ["input", "input_lengths", "scales"])
    (tmp_path / "fake.onnx.json").write_bytes(BUNDLED["joe"].config_path().read_bytes())
    with pytest.raises(CorruptModel, match="does not render"):
        optimize(fake, tmp_path / "out", opts=Options(sentences=SENTENCES[:1], progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.onnx", "fake.onnx.json"]


def test_out_may_not_contain_the_model(tiny_export: Path) -> None:
    with pytest.raises(ExportError, match="contains the model"):
        optimize(tiny_export / "model.onnx", tiny_export, opts=Options(progress=False))
    assert (tiny_export / "model.onnx").is_file()


def test_cli_unknown_variant_is_an_error_with_a_code(
    tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nearvoice.edge.cli import main as nearvoice

    args = ["export", "optimize", str(tiny_export / "model.onnx"), "--out", str(tmp_path / "o")]
    assert nearvoice([*args, "--variants", "bf16"]) == 1
    assert "[export_failed]" in capsys.readouterr().err


def test_cli_help_is_the_export_steps(capsys: pytest.CaptureFixture[str]) -> None:
    from nearvoice.edge.cli import main as nearvoice

    with pytest.raises(SystemExit):
        nearvoice(["export", "--help"])
    assert "from-transformers" in capsys.readouterr().out


def test_a_provider_that_does_not_start_gets_an_error_row(
    tiny_export: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o"
    opts = Options(repeats=1, variants=["fp32"], providers=["cpu", "cuda"], progress=False)
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):
        optimize(tiny_export / "model.onnx", out, opts=opts)
    cuda = by_name(manifest_of(out))["fp32"]["speed"]["cuda"]
    assert "error" in cuda and "x_realtime" not in cuda
