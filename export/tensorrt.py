"""TensorRT-friendliness: what the TensorRT execution provider will make of a graph.

onnxruntime's TensorRT provider hands TensorRT the subgraphs its ONNX parser accepts and
runs the rest on CUDA or the CPU. Every partition boundary costs a copy and a sync, and a
graph with dynamic inputs needs an optimisation profile (min/opt/max shapes) or TensorRT
rebuilds its engine whenever a new length arrives. This module reports the opset, the
ops TensorRT cannot take, the profile to build with, and simplifies the graph where that
removes nodes (folded shape arithmetic is what TensorRT's parser trips on most).
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nearvoice.export.frontends import Feeds

TRT_OPSETS = range(9, 21)
"""ONNX opsets TensorRT 10's parser accepts (9 to 20 inclusive)."""

TRT_UNSUPPORTED = frozenset(
    {
        "BitShift",
        "ConcatFromSequence",
        "ConvInteger",
        "Det",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "MaxRoiPool",
        "MaxUnpool",
        "Multinomial",
        "NegativeLogLikelihoodLoss",
        "QLinearConv",
        "QLinearMatMul",
        "SequenceAt",
        "SequenceConstruct",
        "SequenceEmpty",
        "SequenceErase",
        "SequenceInsert",
        "SequenceLength",
        "SoftmaxCrossEntropyLoss",
        "SplitToSequence",
        "StringNormalizer",
        "TfIdfVectorizer",
        "Unique",
    }
)
"""ONNX ops without a TensorRT 10 importer (onnx-tensorrt's operator matrix); ops of other
domains (com.microsoft contrib ops) are never TensorRT's either."""

DATA_DEPENDENT = frozenset({"NonZero", "RandomNormalLike", "RandomNormal"})
"""Ops TensorRT runs but only with data-dependent shapes or unseeded randomness: they
work, and are listed so that a slow engine build or a nondeterministic render is no
surprise (with zero noise scales, VITS's noise is multiplied away)."""


@dataclass
class TensorRTCheck:
    opset: int
    opset_ok: bool
    unsupported: dict[str, int] = field(default_factory=dict)
    """Op type -> count of nodes TensorRT cannot run (they fall back to CUDA/CPU)."""
    data_dependent: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    """"min"/"opt"/"max" -> input name -> shape: the optimisation profile."""
    provider_options: dict[str, str] = field(default_factory=dict)
    """The TensorRT provider options that build one engine for the whole range."""
    simplify: dict[str, Any] = field(default_factory=dict)
    nodes: int = 0
    quantized: int = 0
    """Integer-arithmetic nodes (MatMulInteger, ConvInteger, QLinear*)."""

    @property
    def friendly(self) -> bool:
        return self.opset_ok and not self.unsupported

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "friendly": self.friendly}


def _opset(model: Any) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def _ops(model: Any) -> Counter[str]:
    counts: Counter[str] = Counter()
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        for node in graph.node:
            domain = node.domain if node.domain not in ("", "ai.onnx") else ""
            counts[f"{domain}:{node.op_type}" if domain else node.op_type] += 1
            stack.extend(a.g for a in node.attribute if a.HasField("g"))
    return counts


def profile(
    encoded: Sequence[Sequence[Feeds]], max_tokens: int
) -> tuple[dict[str, dict[str, list[int]]], dict[str, str]]:
    """min/opt/max shapes from the fixed sentences: the token axis is whichever axis varies
    between them; min is one token, opt the median sentence, max `max_tokens`."""
    feeds = [f for chunks in encoded for f in chunks]
    if not feeds:
        return {}, {}
    lengths: list[int] = []
    varying: dict[str, set[int]] = {}
    for name, array in feeds[0].items():
        axes = {
            axis
            for axis in range(array.ndim)
            if len({f[name].shape[axis] for f in feeds if name in f}) > 1
        }
        varying[name] = axes
        if axes and not lengths:
            lengths = [f[name].shape[min(axes)] for f in feeds]
    opt = int(statistics.median(lengths)) if lengths else 1
    shapes: dict[str, dict[str, list[int]]] = {}
    for label, size in (("min", 1), ("opt", opt), ("max", max(max_tokens, opt))):
        shapes[label] = {
            name: [size if axis in varying[name] else dim for axis, dim in enumerate(a.shape)]
            for name, a in feeds[0].items()
        }

    def spec(label: str) -> str:
        return ",".join(
            f"{name}:{'x'.join(str(d) for d in dims)}" for name, dims in shapes[label].items()
        )

    options = {
        "trt_profile_min_shapes": spec("min"),
        "trt_profile_opt_shapes": spec("opt"),
        "trt_profile_max_shapes": spec("max"),
    }
    return shapes, options


def check(model_path: Path, encoded: Sequence[Sequence[Feeds]], max_tokens: int) -> TensorRTCheck:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    ops = _ops(model)
    opset = _opset(model)
    shapes, options = profile(encoded, max_tokens)
    return TensorRTCheck(
        opset=opset,
        opset_ok=opset in TRT_OPSETS,
        unsupported={op: n for op, n in sorted(ops.items()) if op in TRT_UNSUPPORTED or ":" in op},
        data_dependent={op: n for op, n in sorted(ops.items()) if op in DATA_DEPENDENT},
        shapes=shapes,
        provider_options=options,
        nodes=sum(ops.values()),
        quantized=sum(n for op, n in ops.items() if op.endswith("Integer") or "QLinear" in op),
    )


def simplify(source: Path, dest: Path) -> dict[str, Any]:
    """onnxslim's constant folding and dead-node removal, written to `dest` only when it
    removes nodes. Returns what it did; the caller checks parity before using it."""
    import onnx

    try:
        import onnxslim
    except ImportError:
        return {"applied": False, "reason": "onnxslim is not installed"}
    model = onnx.load(str(source))
    before = len(model.graph.node)
    slimmed = onnxslim.slim(model)
    after = len(slimmed.graph.node)
    record: dict[str, Any] = {"tool": "onnxslim", "nodes_before": before, "nodes_after": after}
    if after >= before:
        return {**record, "applied": False, "reason": "no nodes removed"}
    onnx.save(slimmed, str(dest))
    return {**record, "applied": True}
