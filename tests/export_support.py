"""Builders for the export tests: a tiny random VITS checkpoint (transformers' own
VitsModel from a VitsConfig, nothing downloaded) and hand-made ONNX graphs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TINY_VITS: dict[str, Any] = {
    "vocab_size": 40,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "ffn_dim": 64,
    "flow_size": 32,
    "spectrogram_bins": 33,
    "upsample_initial_channel": 32,
    "upsample_rates": [8, 8],
    "upsample_kernel_sizes": [16, 16],
    "resblock_kernel_sizes": [3],
    "resblock_dilation_sizes": [[1, 3]],
    "prior_encoder_num_flows": 2,
    "prior_encoder_num_wavenet_layers": 1,
    "posterior_encoder_num_wavenet_layers": 1,
    "duration_predictor_num_flows": 1,
    "duration_predictor_filter_channels": 32,
    "depth_separable_num_layers": 2,
    "sampling_rate": 16000,
}
"""About 114k parameters: exports in seconds, renders 64 samples per token."""

VOCAB = {c: i for i, c in enumerate("_ abcdefghijklmnopqrstuvwxyz.,!?'-", start=0)}


def save_tiny_vits(path: Path, seed: int = 0, tokenizer: bool = True) -> Path:
    import torch
    from transformers import VitsConfig, VitsModel

    torch.manual_seed(seed)
    model = VitsModel(VitsConfig(**TINY_VITS)).eval()
    model.save_pretrained(str(path))
    if tokenizer:
        (path / "vocab.json").write_text(json.dumps(VOCAB), encoding="utf-8")
        (path / "tokenizer_config.json").write_text(
            json.dumps({"add_blank": True, "normalize": True, "phonemize": False}), encoding="utf-8"
        )
    return path


def graph_with_inputs(path: Path, names: list[str]) -> Path:
    """A valid ONNX graph (an Identity per input) whose inputs have the given names."""
    import onnx
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, "t"]) for n in names]
    outputs = [
        helper.make_tensor_value_info(f"{n}_out", TensorProto.FLOAT, [1, "t"]) for n in names
    ]
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n in names]
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.save(model, str(path))
    return path


MMS_PINNED = {"k": 0, "'": 1, "h": 10, "i": 11, " ": 19}
"""Where facebook/mms-tts-eng's vocabulary puts these: its blank, the id 0 that
`add_blank` puts between characters, is also its pad token, the letter "k"."""


def mms_vocab() -> dict[str, int]:
    """A 38-character vocabulary (transformers' default `vocab_size`) laid out as MMS's
    are: characters in no particular order, the pad token a letter at id 0."""
    import random

    rest = [c for c in "abcdefghijklmnopqrstuvwxyz -'_0123456|" if c not in MMS_PINNED]
    random.Random(0).shuffle(rest)
    free = iter(rest)
    by_id = {i: c for c, i in MMS_PINNED.items()}
    return {by_id.get(i) or next(free): i for i in range(len(rest) + len(MMS_PINNED))}


def save_mms_sized_vits(path: Path, seed: int = 0) -> Path:
    """transformers' default `VitsConfig` (the architecture of every facebook/mms-tts-*
    checkpoint: 36 M parameters, a stochastic duration predictor with four spline flows)
    with random weights, and the tokenizer files such checkpoints ship, written by
    `VitsTokenizer.save_pretrained` from an MMS-like character vocabulary."""
    import torch
    from transformers import VitsConfig, VitsModel, VitsTokenizer

    torch.manual_seed(seed)
    VitsModel(VitsConfig()).eval().save_pretrained(str(path))
    vocab = path / "source-vocab.json"
    vocab.write_text(json.dumps(mms_vocab()), encoding="utf-8")
    tokenizer = VitsTokenizer(
        str(vocab), pad_token="k", language="eng", normalize=True, phonemize=False
    )
    tokenizer.save_pretrained(str(path))
    vocab.unlink()
    return path
