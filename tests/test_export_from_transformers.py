"""export/from_transformers.py: a local transformers VITS checkpoint becomes ONNX with
dynamic text length, checked against torch with the noise off."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from nearvoice.edge.cli import main as nearvoice
from nearvoice.export.errors import (
    CorruptModel,
    ModelNotFound,
    ParityFailure,
    UnsupportedArchitecture,
)
from nearvoice.export.from_transformers import MODEL_FILE, RECORD_FILE, export
from nearvoice.export.frontends import VITS_SIDECAR, VitsFrontend, detect

pytestmark = pytest.mark.slow


def run(model: Path, ids: np.ndarray, length_scale: float = 1.0) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    out = session.run(
        None,
        {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids),
            "length_scale": np.array([length_scale], dtype=np.float32),
        },
    )
    return np.asarray(out[0])


def torch_waveform(checkpoint: Path, ids: np.ndarray) -> np.ndarray:
    from transformers import VitsModel

    model = VitsModel.from_pretrained(str(checkpoint)).eval()
    model.noise_scale = 0.0
    model.noise_scale_duration = 0.0
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).waveform.numpy()


def test_writes_one_self_contained_model_and_its_sidecars(tiny_export: Path) -> None:
    names = sorted(p.name for p in tiny_export.iterdir())
    assert names == sorted(
        [MODEL_FILE, RECORD_FILE, VITS_SIDECAR, "vocab.json", "tokenizer_config.json"]
    )


def test_records_parity_within_the_bound(tiny_export: Path) -> None:
    record = json.loads((tiny_export / RECORD_FILE).read_text())
    checks = record["parity"]["checks"]
    assert [c["tokens"] for c in checks] == [3, 17, 64, 200]
    assert all(c["max_abs_diff"] <= record["parity"]["max_abs_diff_allowed"] for c in checks)


@pytest.mark.parametrize("tokens", [1, 9, 333])
def test_matches_torch_at_lengths_never_traced(
    tiny_checkpoint: Path, tiny_export: Path, tokens: int
) -> None:
    ids = np.random.default_rng(tokens).integers(1, 40, size=(1, tokens), dtype=np.int64)
    expected = torch_waveform(tiny_checkpoint, ids)
    got = run(tiny_export / MODEL_FILE, ids)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_length_scale_is_an_input(tiny_export: Path) -> None:
    ids = np.random.default_rng(0).integers(1, 40, size=(1, 20), dtype=np.int64)
    normal = run(tiny_export / MODEL_FILE, ids, 1.0)
    slow = run(tiny_export / MODEL_FILE, ids, 2.0)
    assert slow.shape[-1] > 1.8 * normal.shape[-1]


def test_zero_noise_renders_identically_twice(tiny_export: Path) -> None:
    ids = np.random.default_rng(1).integers(1, 40, size=(1, 30), dtype=np.int64)
    assert np.array_equal(run(tiny_export / MODEL_FILE, ids), run(tiny_export / MODEL_FILE, ids))


def test_sidecar_carries_the_tokenizer(tiny_export: Path) -> None:
    frontend = detect(tiny_export / MODEL_FILE)
    assert isinstance(frontend, VitsFrontend)
    assert frontend.sample_rate == 16000
    # lowercased, characters outside the vocabulary dropped, blanks (0) between
    vocab = frontend.tokenizer.vocab
    assert frontend.tokenizer.ids("Ab#") == [0, vocab["a"], 0, vocab["b"], 0]


def test_missing_checkpoint_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound):
        export(tmp_path / "nope", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_other_architectures_are_refused(tmp_path: Path) -> None:
    checkpoint = tmp_path / "bert"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnsupportedArchitecture, match="bert"):
        export(checkpoint, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_corrupt_weights_leave_nothing(tiny_checkpoint: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((tiny_checkpoint / "config.json").read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CorruptModel):
        export(broken, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == [broken]


def test_failed_parity_keeps_the_previous_output(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / RECORD_FILE).write_text("previous")
    with pytest.raises(ParityFailure):
        export(tiny_checkpoint, out, max_abs_diff=0.0, progress=False)
    assert [p.name for p in out.iterdir()] == [RECORD_FILE]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left


def test_cli_reports_errors_with_a_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = nearvoice(
        ["export", "from-transformers", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    )
    assert code == ModelNotFound.exit_status
    assert "[model_not_found]" in capsys.readouterr().err
