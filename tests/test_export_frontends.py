"""export/frontends.py: each model family is recognised from its inputs, and anything
else is refused with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from nearvoice.edge.synth.piper_engine import BUNDLED
from nearvoice.export.errors import CorruptModel, ModelNotFound, UnsupportedArchitecture
from nearvoice.export.frontends import HibariFrontend, PiperFrontend, detect
from tests.export_support import graph_with_inputs


def test_recognises_piper_with_its_config() -> None:
    files = BUNDLED["joe"]
    frontend = detect(files.model_path(), files.config_path())
    assert isinstance(frontend, PiperFrontend)
    assert frontend.sample_rate == 22050
    assert frontend.sidecars == {"model.onnx.json": files.config_path()}


def test_piper_inputs_are_phoneme_ids_with_zero_noise() -> None:
    files = BUNDLED["joe"]
    feeds = detect(files.model_path(), files.config_path()).encode("Hello there.")
    assert len(feeds) == 1
    assert feeds[0]["input"].shape[0] == 1
    assert feeds[0]["input_lengths"].tolist() == [feeds[0]["input"].shape[1]]
    assert feeds[0]["scales"][0] == 0.0 and feeds[0]["scales"][2] == 0.0


def test_recognises_hibari() -> None:
    from hibari.voices import voice_path

    frontend = detect(Path(voice_path("heart")))
    assert isinstance(frontend, HibariFrontend)
    assert frontend.sample_rate == 24000


def test_piper_without_its_config_is_reported(tmp_path: Path) -> None:
    model = tmp_path / "voice.onnx"
    model.write_bytes(BUNDLED["joe"].model_path().read_bytes())
    with pytest.raises(ModelNotFound, match=r"voice\.onnx\.json"):
        detect(model)


def test_missing_model_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound):
        detect(tmp_path / "none.onnx")


def test_corrupt_model_is_reported(tmp_path: Path) -> None:
    model = tmp_path / "bad.onnx"
    model.write_bytes(b"this is not protobuf" * 10)
    with pytest.raises(CorruptModel):
        detect(model)


def test_truncated_model_is_reported(tmp_path: Path) -> None:
    model = tmp_path / "cut.onnx"
    model.write_bytes(BUNDLED["joe"].model_path().read_bytes()[:100_000])
    with pytest.raises(CorruptModel):
        detect(model)


def test_unknown_inputs_are_an_unsupported_architecture(tmp_path: Path) -> None:
    model = graph_with_inputs(tmp_path / "clip.onnx", ["pixel_values"])
    with pytest.raises(UnsupportedArchitecture, match="pixel_values"):
        detect(model)


def test_external_weights_are_refused(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(__import__("numpy").ones((64, 64), "float32"), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [weight],
    )
    model = tmp_path / "ext.onnx"
    onnx.save(
        helper.make_model(graph, ir_version=10),
        str(model),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        size_threshold=0,
    )
    with pytest.raises(CorruptModel, match="external data"):
        detect(model)


@pytest.mark.slow
def test_a_phonemizing_vits_tokenizer_is_unsupported(tiny_export: Path, tmp_path: Path) -> None:
    import json
    import shutil

    copy = tmp_path / "vits"
    shutil.copytree(tiny_export, copy)
    sidecar = json.loads((copy / "vits.json").read_text())
    (copy / "vits.json").write_text(json.dumps({**sidecar, "phonemize": True}))
    with pytest.raises(UnsupportedArchitecture, match="phonemize"):
        detect(copy / "model.onnx")
