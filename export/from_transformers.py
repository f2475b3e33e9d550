"""`nearvoice export from-transformers`: a local transformers VITS checkpoint becomes ONNX.

The graph takes `input_ids` and `attention_mask` ([1, tokens], dynamic) and
`length_scale` ([1]: 2.0 speaks half as fast) and returns `waveform` [1, samples]. The
noise scales are fixed at 0 when exporting: renders must be deterministic
(docs/contracts.md#spec-and-key), as piper's voices are with their noise scales at 0. The
torch exporter (dynamo, opset 18) traces the model once with a symbolic token dimension,
with the duration predictor's spline swapped for a trace-friendly equivalent
(export/vits_tracing.py: the original asserts on data, which has no ONNX form); parity is
then checked against the unmodified torch model with the noise off on fixed inputs of
several lengths, and a graph that disagrees is never written.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from nearvoice.edge.synth.vits_engine import VITS_SIDECAR
from nearvoice.export.errors import (
    CorruptModel,
    ExportError,
    ModelNotFound,
    ParityFailure,
    UnsupportedArchitecture,
)
from nearvoice.export.staging import staged_dir
from nearvoice.export.vits_tracing import traceable_splines

MODEL_FILE = "model.onnx"
RECORD_FILE = "export.json"
OPSET = 18
PARITY_LENGTHS = (3, 17, 64, 200)
"""Token counts of the fixed parity inputs: shorter and longer than the traced example."""
TRACE_LENGTH = 24
MAX_TOKENS = 4096
"""Upper bound of the symbolic token dimension."""
EXPORTER_NOISE = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    (UserWarning, r"# The axis name: \w+ will not be used"),
)
"""torch 2.13's exporter warns about its own internals, and that two inputs sharing one
symbolic dimension keep one name: nothing for a user to act on."""


def _load(checkpoint: Path) -> Any:
    if not checkpoint.is_dir():
        raise ModelNotFound(f"checkpoint directory {checkpoint} does not exist")
    config_path = checkpoint / "config.json"
    if not config_path.is_file():
        raise ModelNotFound(f"{checkpoint} has no config.json: not a transformers checkpoint")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptModel(f"{config_path} is not JSON: {exc}") from exc
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "vits":
        raise UnsupportedArchitecture(
            f"{checkpoint} is a {model_type!r} model; from-transformers exports 'vits' "
            "(VITS/MMS text-to-speech) checkpoints"
        )
    from transformers import VitsModel

    try:
        model: Any = VitsModel.from_pretrained(str(checkpoint), local_files_only=True)
    except Exception as exc:  # safetensors, torch and transformers each raise their own
        raise CorruptModel(f"cannot load {checkpoint}: {exc}") from exc
    return model.eval()


class _Scaled:
    """Builds the wrapper module lazily so that importing this file needs no torch."""

    @staticmethod
    def wrap(model: Any) -> Any:
        import torch

        class Scaled(torch.nn.Module):
            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, input_ids: Any, attention_mask: Any, length_scale: Any) -> Any:
                return self.inner(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    speaking_rate=1.0 / length_scale[0],
                ).waveform

        model.noise_scale = 0.0
        model.noise_scale_duration = 0.0
        return Scaled(model).eval()


def _inputs(length: int, vocab_size: int) -> tuple[Any, Any, Any]:
    import torch

    rng = np.random.default_rng(length)
    ids = torch.from_numpy(rng.integers(1, max(2, vocab_size), size=(1, length), dtype=np.int64))
    return ids, torch.ones_like(ids), torch.tensor([1.0], dtype=torch.float32)


def _sidecar(checkpoint: Path, config: Any) -> dict[str, Any]:
    """What the text front end needs: the sample rate and, when the checkpoint has a
    tokenizer, its character vocabulary."""
    data: dict[str, Any] = {
        "sample_rate": int(config.sampling_rate),
        "vocab_size": int(config.vocab_size),
    }
    vocab = checkpoint / "vocab.json"
    if vocab.is_file():
        tokenizer = checkpoint / "tokenizer_config.json"
        try:
            data["vocab"] = json.loads(vocab.read_text(encoding="utf-8"))
            settings = (
                json.loads(tokenizer.read_text(encoding="utf-8")) if tokenizer.is_file() else {}
            )
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptModel(f"{checkpoint}: tokenizer files are not JSON: {exc}") from exc
        # VitsTokenizer's defaults where the checkpoint leaves a setting out.
        data["add_blank"] = bool(settings.get("add_blank", True))
        data["lowercase"] = bool(settings.get("normalize", True))
        data["phonemize"] = bool(settings.get("phonemize", True))
        data["is_uroman"] = bool(settings.get("is_uroman", False))
    return data


def _torch_export(wrapped: Any, example: tuple[Any, ...], target: Path) -> None:
    import torch

    tokens = torch.export.Dim("tokens", min=1, max=MAX_TOKENS)
    # The swap's self-check raises its own UnsupportedArchitecture, outside the `try`.
    with warnings.catch_warnings(), traceable_splines():
        for category, message in EXPORTER_NOISE:
            warnings.filterwarnings("ignore", message=message, category=category)
        try:
            torch.onnx.export(
                wrapped,
                example,
                str(target),
                input_names=["input_ids", "attention_mask", "length_scale"],
                output_names=["waveform"],
                dynamic_shapes={
                    "input_ids": {1: tokens},
                    "attention_mask": {1: tokens},
                    "length_scale": None,
                },
                opset_version=OPSET,
                dynamo=True,
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many internal types
            raise UnsupportedArchitecture(f"torch.onnx.export failed: {exc}") from exc


def _inline_weights(path: Path) -> None:
    """The exporter keeps weights in a `.data` file beside the graph; a TTS model is far
    below protobuf's 2 GB limit, and one file is what engines, hashes and copies expect."""
    import onnx

    model = onnx.load(str(path))  # reads the external data too
    for extra in path.parent.iterdir():
        if extra != path:
            extra.unlink()
    onnx.save(model, str(path), save_as_external_data=False)


def export(
    checkpoint: Path, out: Path, max_abs_diff: float = 1e-3, progress: bool = True
) -> dict[str, Any]:
    """Exports `checkpoint` into `out` (model.onnx, vits.json, export.json); returns the
    record. Raises ParityFailure, leaving nothing, when ONNX and torch disagree."""
    import onnxruntime as ort
    import torch
    from tqdm import tqdm

    steps = tqdm(total=3 + len(PARITY_LENGTHS), desc="from-transformers", disable=not progress)
    steps.set_postfix_str("loading")
    model = _load(checkpoint)
    steps.update()
    steps.set_postfix_str("exporting")
    wrapped = _Scaled.wrap(model)
    vocab_size = int(model.config.vocab_size)
    if out.resolve() == checkpoint.resolve() or out.resolve() in checkpoint.resolve().parents:
        raise ExportError(f"--out {out} contains the checkpoint {checkpoint}")
    with staged_dir(out, RECORD_FILE) as stage:
        target = stage / MODEL_FILE
        _torch_export(wrapped, _inputs(TRACE_LENGTH, vocab_size), target)
        _inline_weights(target)
        steps.update()
        steps.set_postfix_str("parity")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
        checks = []
        for length in PARITY_LENGTHS:
            ids, mask, scale = _inputs(length, vocab_size)
            with torch.no_grad():
                expected = wrapped(ids, mask, scale).numpy()
            feeds = {"input_ids": ids, "attention_mask": mask, "length_scale": scale}
            got = session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
            if got.shape != expected.shape:
                raise ParityFailure(
                    f"{length} tokens: ONNX gives {got.shape[-1]} samples, torch "
                    f"{expected.shape[-1]}"
                )
            diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
            checks.append({"tokens": length, "samples": int(got.shape[-1]), "max_abs_diff": diff})
            steps.update()
            if diff > max_abs_diff:
                raise ParityFailure(
                    f"{length} tokens: ONNX and torch differ by {diff:.2e} "
                    f"(allowed {max_abs_diff:.0e})"
                )
        sidecar = _sidecar(checkpoint, model.config)
        (stage / VITS_SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
        for name in ("vocab.json", "tokenizer_config.json"):
            if (checkpoint / name).is_file():
                shutil.copyfile(checkpoint / name, stage / name)
        record = {
            "checkpoint": str(checkpoint),
            "model": MODEL_FILE,
            "opset": OPSET,
            "sample_rate": sidecar["sample_rate"],
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "parity": {"max_abs_diff_allowed": max_abs_diff, "checks": checks},
        }
        (stage / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        steps.update()
    steps.close()
    return record
