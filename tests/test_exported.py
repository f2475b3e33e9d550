"""edge/synth/exported.py: how engines read an export directory and choose its variant."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nearvoice.edge.synth.exported import ExportDirError, choose, load, select


def write_export(root: Path, variants: list[dict[str, Any]], family: str = "piper") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for v in variants:
        if v.get("file"):
            (root / v["file"]).write_bytes(v["name"].encode())
    manifest = {"format": 1, "family": family, "sample_rate": 22050, "variants": variants}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def variant(
    name: str, passed: bool = True, deterministic: bool = True, **speeds: float
) -> dict[str, Any]:
    import hashlib

    return {
        "name": name,
        "file": f"{name}.onnx",
        "sha256": hashlib.sha256(name.encode()).hexdigest(),
        "parity": {"passed": passed},
        "deterministic": deterministic,
        "speed": {p: {"x_realtime": x} for p, x in speeds.items()},
    }


def test_picks_the_fastest_passing_variant_for_the_provider(tmp_path: Path) -> None:
    root = write_export(
        tmp_path / "e",
        [variant("fp32", cpu=10), variant("fp32-opt", cpu=12), variant("fp16", cpu=5, cuda=90)],
    )
    assert select(load(root), "cpu").name == "fp32-opt"
    assert select(load(root), "cuda").name == "fp16"


def test_never_picks_a_variant_that_failed_parity(tmp_path: Path) -> None:
    root = write_export(tmp_path / "e", [variant("fp32", cpu=10), variant("int8", False, cpu=30)])
    assert select(load(root), "cpu").name == "fp32"


def test_an_unmeasured_provider_gets_the_reference(tmp_path: Path) -> None:
    root = write_export(tmp_path / "e", [variant("fp32", cpu=10), variant("fp16", cpu=12)])
    assert select(load(root), "tensorrt").name == "fp32"


def test_variants_that_were_not_built_are_ignored(tmp_path: Path) -> None:
    skipped = {"name": "int8", "skipped": "nothing to quantize"}
    root = write_export(tmp_path / "e", [variant("fp32", cpu=10), skipped])
    assert [v.name for v in load(root).variants] == ["fp32"]


def test_no_manifest_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ExportDirError, match=r"no manifest\.json"):
        load(tmp_path)


def test_a_malformed_manifest_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"format": 1, "variants": []}')
    with pytest.raises(ExportDirError, match="malformed"):
        load(tmp_path)


def test_a_manifest_of_another_format_is_refused(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"format": 99}')
    with pytest.raises(ExportDirError, match="format"):
        load(tmp_path)


def test_a_changed_file_fails_verification(tmp_path: Path) -> None:
    root = write_export(tmp_path / "e", [variant("fp32", cpu=10)])
    chosen = select(load(root), "cpu")
    chosen.verify()
    (root / "fp32.onnx").write_bytes(b"tampered")
    with pytest.raises(ExportDirError, match="sha256"):
        chosen.verify()


def test_the_model_id_names_the_variant_and_its_hash(tmp_path: Path) -> None:
    root = write_export(tmp_path / "e", [variant("fp32", cpu=10), variant("fp32-opt", cpu=11)])
    chosen = choose("joe", root, "cpu", "piper", "piper-joe-medium@" + "0" * 64)
    assert chosen.model_id == f"piper-joe-medium.fp32-opt@{chosen.variant.sha256}"


def test_an_export_of_another_family_is_refused(tmp_path: Path) -> None:
    root = write_export(tmp_path / "e", [variant("fp32", cpu=10)], family="hibari")
    with pytest.raises(ExportDirError, match="hibari"):
        choose("joe", root, "cpu", "piper", "piper-joe-medium@x")


def test_the_tensorrt_profile_travels_with_the_choice(tmp_path: Path) -> None:
    root = write_export(tmp_path / "e", [variant("fp32", cpu=10)])
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["tensorrt"] = {"provider_options": {"trt_profile_opt_shapes": "input:1x64"}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    chosen = choose("joe", root, "tensorrt", "piper", "piper-joe-medium@x")
    trt = chosen.providers([("TensorrtExecutionProvider", {}), "CPUExecutionProvider"])
    assert trt[0] == ("TensorrtExecutionProvider", {"trt_profile_opt_shapes": "input:1x64"})


def test_a_nondeterministic_variant_is_never_picked(tmp_path: Path) -> None:
    root = write_export(
        tmp_path / "e", [variant("fp32", cpu=10), variant("fp16", deterministic=False, cpu=30)]
    )
    assert select(load(root), "cpu").name == "fp32"


def test_the_reference_stays_unless_beaten_by_the_margin(tmp_path: Path) -> None:
    root = write_export(tmp_path / "e", [variant("fp32", cpu=10.0), variant("fp32-opt", cpu=10.4)])
    assert select(load(root), "cpu").name == "fp32"


def test_a_variant_failing_parity_on_a_provider_is_not_picked_there(tmp_path: Path) -> None:
    fp16 = variant("fp16", cpu=5, cuda=90)
    fp16["speed"]["cuda"]["parity_passed"] = False
    root = write_export(tmp_path / "e", [variant("fp32", cpu=10, cuda=40), fp16])
    assert select(load(root), "cuda").name == "fp32"


def test_a_pinned_variant_is_used_whatever_its_speed(tmp_path: Path) -> None:
    root = write_export(tmp_path / "e", [variant("fp32", cpu=10), variant("fp16", cpu=5)])
    assert select(load(root), "cpu", pin="fp16").name == "fp16"


def test_a_pinned_variant_must_have_passed_parity(tmp_path: Path) -> None:
    root = write_export(tmp_path / "e", [variant("fp32", cpu=10), variant("int8", False, cpu=5)])
    with pytest.raises(ExportDirError, match="failed parity"):
        select(load(root), "cpu", pin="int8")


def test_a_pinned_variant_must_exist(tmp_path: Path) -> None:
    root = write_export(tmp_path / "e", [variant("fp32", cpu=10)])
    with pytest.raises(ExportDirError, match="no variant 'bf16'"):
        select(load(root), "cpu", pin="bf16")


def test_a_pinned_copy_keeps_running_when_the_export_changes(tmp_path: Path) -> None:
    root = write_export(tmp_path / "e", [variant("fp32", cpu=10)])
    chosen = choose("joe", root, "cpu", "piper", "piper-joe-medium@x").pinned(tmp_path / "m")
    (root / "fp32.onnx").write_bytes(b"replaced")
    assert chosen.variant.path.parent == tmp_path / "m"
    assert chosen.variant.path.read_bytes() == b"fp32"
    chosen.variant.verify()


def test_a_changed_file_is_never_pinned(tmp_path: Path) -> None:
    root = write_export(tmp_path / "e", [variant("fp32", cpu=10)])
    chosen = choose("joe", root, "cpu", "piper", "piper-joe-medium@x")
    (root / "fp32.onnx").write_bytes(b"replaced")
    with pytest.raises(ExportDirError, match="sha256"):
        chosen.pinned(tmp_path / "m")
    assert list((tmp_path / "m").iterdir()) == []
