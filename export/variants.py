"""Building the variants of a model, each written to a staging path by one function.

- fp32: the source graph as given, the parity reference and the safe choice everywhere.
- fp32-sim: the source graph simplified (onnxslim), when that removes nodes and keeps
  parity; it is also the base every other variant is built from.
- fp32-opt: onnxruntime's graph optimisations applied once, offline, and saved, so a node
  skips them at load. EXTENDED, not ALL: ALL adds layout transforms specific to the CPU it
  ran on, which a file copied to another machine must not carry. CPU provider only.
- fp16: weights and activations in half precision with fp32 inputs and outputs, so callers
  feed the same arrays. Ops whose precision decides durations or noise stay fp32: a
  duration rounded differently shifts every sample after it.
- int8: dynamic quantisation of MatMul/Gemm weights only. VITS spends most of its time in
  convolutions, so this touches the text encoder; the report measures, never assumes.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nearvoice.edge.synth.exported import REFERENCE
from nearvoice.export.errors import ExportError

FP16_KEEP_FP32 = (
    # onnxruntime's own list (ops without fp16 kernels or with integer semantics) ...
    "Range",
    "CumSum",
    "Min",
    "Max",
    "TopK",
    "Upsample",
    "RandomUniformLike",
    "NonMaxSuppression",
    "RoiAlign",
    "DynamicQuantizeLinear",  # an int8 graph's quantizer reads fp32 only
    # ... and what TTS graphs need exact: noise sources, the duration path (exp, ceil,
    # softplus of log-durations), and the normalisations whose sums overflow half range.
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "Exp",
    "Ceil",
    "Softplus",
    "ReduceSum",
    "ReduceMean",
    "Pow",
    "Sqrt",
    "LayerNormalization",
    "Softmax",
)


class SkipVariant(Exception):
    """A variant that would be the same graph as another (nothing to simplify or to
    quantize): reported with the reason instead of measured twice under two names."""


@dataclass(frozen=True, slots=True)
class Recipe:
    name: str
    build: Callable[[Path, Path], None]
    """Writes the variant made from the model at the first path to the second."""
    providers: tuple[str, ...]
    """Execution providers the variant is meant for, and measured on where installed."""
    summary: str


def copy_source(source: Path, dest: Path) -> None:
    shutil.copyfile(source, dest)


def simplified(base: Path, dest: Path) -> None:
    """The base is the simplified graph whenever simplification applied."""
    if base.name != SIMPLIFIED:
        raise SkipVariant("simplification did not apply (see the TensorRT section)")
    shutil.copyfile(base, dest)


def ort_optimized(source: Path, dest: Path) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dest)
    options.log_severity_level = 3
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


def half_precision(source: Path, dest: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model: Any = onnx.load(str(source))
    blocked = _duration_path(model.graph)
    _own_fp32_weights(model.graph, blocked)
    converted = convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=list(FP16_KEEP_FP32),
        node_block_list=sorted(blocked),
    )
    _dedupe_casts(converted.graph)
    _drop_round_trips(converted.graph, blocked | set(_blocked_by_op(converted.graph)))
    onnx.save(converted, str(dest))


ROUNDING = frozenset({"Ceil", "Floor", "Round"})


FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto element types
INTEGER_TYPES = frozenset({2, 3, 4, 5, 6, 7, 12, 13})  # onnx.TensorProto uint8 .. uint64


def _cast_target(node: Any) -> int | None:
    """The element type a Cast node casts to (onnx.TensorProto's numbering); None for
    any other node."""
    if node.op_type != "Cast":
        return None
    return next((int(a.i) for a in node.attribute if a.name == "to"), None)


def _casts_to_integer(node: Any) -> bool:
    """A float-to-integer Cast truncates, which is rounding too (durations as frame counts)."""
    return _cast_target(node) in INTEGER_TYPES


def _duration_path(graph: Any) -> set[str]:
    """Names of every node that feeds a rounding op or an integer cast: in a TTS graph
    that is the path that decides how many frames each token lasts. A half-precision
    error there flips a ceil, shifts every later sample and ruins the waveform's
    alignment, so it stays fp32 while the decoder, where the time goes, runs in fp16.
    Unnamed nodes are named first."""
    producers: dict[str, Any] = {}
    for index, node in enumerate(graph.node):
        if not node.name:
            node.name = f"node_{index}_{node.op_type}"
        for output in node.output:
            producers[output] = node
    blocked: set[str] = set()
    stack = [n for n in graph.node if n.op_type in ROUNDING or _casts_to_integer(n)]
    while stack:
        node = stack.pop()
        if node.name in blocked:
            continue
        blocked.add(node.name)
        stack.extend(producers[i] for i in node.input if i in producers)
    return blocked


def _own_fp32_weights(graph: Any, blocked: set[str]) -> None:
    """The converter halves an initializer that any fp16 node reads, even when fp32 nodes
    read it too (shared scalars such as epsilons and scales). Blocked nodes get their own
    full-precision copy, so fp32 really means fp32 on the duration path."""
    import onnx

    initializers = {t.name: t for t in graph.initializer}
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            if name in initializers:
                readers.setdefault(name, []).append(node)
    for name, nodes in readers.items():
        if all(n.name in blocked for n in nodes) or not any(n.name in blocked for n in nodes):
            continue
        copy = onnx.TensorProto()
        copy.CopyFrom(initializers[name])
        copy.name = f"{name}__fp32"
        graph.initializer.append(copy)
        for node in nodes:
            if node.name in blocked:
                node.input[:] = [copy.name if i == name else i for i in node.input]


def _blocked_by_op(graph: Any) -> list[str]:
    return [n.name for n in graph.node if n.op_type in FP16_KEEP_FP32]


def _drop_round_trips(graph: Any, fp32_nodes: set[str]) -> None:
    """The converter passes every output of an fp32 node through fp16 and back before the
    next fp32 node reads it, which rounds the fp32 path to half precision anyway. Readers
    of such a Cast(fp32) of a Cast(fp16) of an fp32 node's output read the original."""
    producers = {out: node for node in graph.node for out in node.output}
    outputs = {o.name for o in graph.output}

    replace: dict[str, str] = {}
    candidates: set[str] = set()
    for node in graph.node:
        up = producers.get(node.input[0]) if node.input else None
        if not (_cast_target(node) == FLOAT and up is not None and _cast_target(up) == FLOAT16):
            continue
        source = producers.get(up.input[0])
        if source is None or source.name not in fp32_nodes or node.output[0] in outputs:
            continue
        replace[node.output[0]] = up.input[0]
        candidates.update((node.output[0], up.output[0]))
    for node in graph.node:
        node.input[:] = [replace.get(i, i) for i in node.input]
    # Only the casts made dead here go; subgraphs never read them (they are new names).
    used = {i for node in graph.node for i in node.input} | outputs
    dead = candidates - used
    kept = [n for n in graph.node if not (n.op_type == "Cast" and n.output[0] in dead)]
    del graph.node[:]
    graph.node.extend(kept)


def _dedupe_casts(graph: Any) -> None:
    """The converter inserts one Cast per consumer of a constant that a blocked op reads,
    all with the same name and output, which onnxruntime rightly rejects (a graph is in
    SSA form). Identical copies of a node compute the same value: keep the first."""
    seen: set[tuple[str, tuple[str, ...], tuple[str, ...]]] = set()
    names: set[str] = set()
    keep = []
    for node in graph.node:
        identity = (node.op_type, tuple(node.input), tuple(node.output))
        if node.name and node.name in names:
            if identity in seen:
                continue
            node.name = f"{node.name}_{len(names)}"
        seen.add(identity)
        names.add(node.name)
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def int8_dynamic(source: Path, dest: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        source,
        dest,
        op_types_to_quantize=["MatMul", "Gemm"],
        weight_type=QuantType.QInt8,
        per_channel=False,
    )
    before = _integer_nodes(onnx.load(str(source)))
    if _integer_nodes(onnx.load(str(dest))) <= before:
        dest.unlink()
        raise SkipVariant("no MatMul or Gemm with constant weights: nothing to quantize")


def _integer_nodes(model: Any) -> int:
    return sum(1 for n in model.graph.node if n.op_type in ("MatMulInteger", "QLinearMatMul"))


SIMPLIFIED = "simplified.onnx"
"""Where optimize writes the simplified base graph."""

RECIPES: tuple[Recipe, ...] = (
    Recipe("fp32", copy_source, ("cpu", "cuda", "tensorrt"), "source graph, the reference"),
    Recipe("fp32-sim", simplified, ("cpu", "cuda", "tensorrt"), "source graph, simplified"),
    Recipe("fp32-opt", ort_optimized, ("cpu",), "onnxruntime EXTENDED optimisation, offline"),
    Recipe("fp16", half_precision, ("cpu", "cuda", "tensorrt"), "fp16, fp32 I/O and blocklist"),
    Recipe("int8", int8_dynamic, ("cpu",), "dynamic int8 on MatMul/Gemm weights"),
)


def recipes(names: list[str] | None = None) -> list[Recipe]:
    """The recipes named (in the order given), always with the reference first."""
    if not names:
        return list(RECIPES)
    by_name = {r.name: r for r in RECIPES}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ExportError(f"unknown variant(s) {unknown}; known: {list(by_name)}")
    ordered = [REFERENCE, *[n for n in names if n != REFERENCE]]
    return [by_name[n] for n in ordered]
