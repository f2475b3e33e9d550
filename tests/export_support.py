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
