"""Layer norms as one operator: a model's decomposed layer norms rewritten, before any
session loads it, as onnxruntime's LayerNormalization.

A VITS text encoder and duration predictor normalize over channels after every block
(piper's voices: 36 times per piece). Exported below ONNX opset 17, which has no
LayerNormalization, each is nine operators: ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt,
Div, Mul, Add. onnxruntime's own fusion (LayerNormFusion) does not take piper's graphs,
so each of the nine runs as an operator of its own, with an allocation and a dispatch,
on tensors of a few hundred values to a few tens of thousands. On a render's first
piece that overhead is much of the cost. For piper's `joe` (2,345 operators in the
duration pass's part as exported, 2,057 with its 36 layer norms as one operator each),
first pieces of about 100 ids, p50 of 20 texts run 4 times, interleaved, in three rounds:
18.3 to 19.0 ms as exported and 16.6 to 17.4 ms fused on the first window's two threads,
22.9 to 23.3 and 21.3 to 21.7 ms on one.

onnxruntime registers LayerNormalization in the ONNX domain for every opset, below 17 as
its own operator, with the same inputs and attributes as the standard one (`axis`,
`epsilon`, float accumulation). Its float rounding is not the nine operators': it moves
the pass's handed-off tensors by about 1e-6, and the render revision (edge.cache.meta)
names the bytes. Every part of a model (the pass, the rest, the windowed tail, the
whole graph) is cut from the same rewritten model, so they agree with each other bit
for bit, which engines check at warmup as before. Only the CPU provider is given the
rewrite: the CUDA and TensorRT providers' kernels for it below opset 17 are not
exercised here.

The match is exact or nothing: each intermediate result read only by the next operator
(the centred value by the Pow and the Div), axes the last one, the power a constant 2,
the epsilon a scalar constant, the scale and bias constants. Anything else is left as
it was.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nearvoice.edge.synth.onnxgraph import reads_of

log = logging.getLogger("nearvoice.fusion")


@dataclass(frozen=True, slots=True)
class Norm:
    """One decomposed layer norm found in a graph."""

    nodes: tuple[int, ...]
    """Indices of its nine operators, in the order torch.onnx exports `F.layer_norm`
    below opset 17: ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add."""
    x: str
    scale: str
    bias: str
    output: str
    epsilon: float


def load(path: Path) -> Any:
    """The ONNX model at `path`, its layer norms fused (`fuse`)."""
    import onnx

    model = onnx.load(str(path))
    fuse(model)
    return model


@contextlib.contextmanager
def fused_source(path: Path) -> Iterator[Path | bytes]:
    """`load(path)` for a session to load: saved to a temporary file, removed after.
    onnxruntime holds more of a model it loads from bytes than from a file: measured on
    `joe`'s whole graph (63 MB), one session took 162 MiB loaded from bytes, 102 from the
    file, 110 from this file (with what fusing leaves to the allocator). Where no
    temporary file can be written (a read-only root without TMPDIR, a full disk), the
    serialized model: more memory, the same session."""
    import onnx

    model = load(path)
    with contextlib.ExitStack() as stack:
        source: Path | bytes
        try:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="nearvoice-"))
            source = Path(directory) / path.name
            onnx.save(model, str(source))
        except OSError as exc:
            log.warning("loading the fused %s from memory: %s", path.name, exc)
            source = model.SerializeToString()
        yield source


def fuse(model: Any) -> int:
    """Rewrites each decomposed layer norm in `model`'s main graph as one
    LayerNormalization operator, in place; returns how many it rewrote."""
    from onnx import helper

    graph = model.graph
    norms = list(find(graph))
    if not norms:
        return 0
    gone = {i for norm in norms for i in norm.nodes}
    made = {
        norm.nodes[-1]: helper.make_node(
            "LayerNormalization",
            [norm.x, norm.scale, norm.bias],
            [norm.output],
            name=f"{graph.node[norm.nodes[0]].name}/LayerNormalization",
            axis=-1,
            epsilon=norm.epsilon,
        )
        for norm in norms
    }
    # Each fused operator takes the place of its last node: its inputs are computed
    # before the first one, so the order stays topological.
    nodes = [made.get(i, node) for i, node in enumerate(graph.node) if i not in gone or i in made]
    read = {name for node in nodes for name in reads_of(node)}
    read |= {output.name for output in graph.output}
    nodes = [n for n in nodes if n.op_type != "Constant" or any(o in read for o in n.output)]
    del graph.node[:]
    graph.node.extend(nodes)
    return len(norms)


def find(graph: Any) -> Iterator[Norm]:
    """The decomposed layer norms in `graph`, as `fuse` matches them."""
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in reads_of(node):  # (subgraphs' reads of outer names count)
            readers.setdefault(name, []).append(i)
    for output in graph.output:
        readers.setdefault(output.name, []).append(-1)
    constants = _constants(graph)
    for i, node in enumerate(graph.node):
        if node.op_type == "ReduceMean":
            norm = _match(graph, i, readers, constants)
            if norm is not None:
                yield norm


def _match(
    graph: Any, first: int, readers: dict[str, list[int]], constants: dict[str, Any]
) -> Norm | None:
    nodes = graph.node
    mean = nodes[first]
    if not _last_axis(mean, constants):
        return None
    x = mean.input[0]

    def only(name: str, op: str) -> int | None:
        """The one node that reads `name`, if it is an `op`."""
        found = readers.get(name, [])
        return (
            found[0]
            if len(found) == 1 and found[0] >= 0 and nodes[found[0]].op_type == op
            else None
        )

    sub = only(mean.output[0], "Sub")
    if sub is None or list(nodes[sub].input) != [x, mean.output[0]]:
        return None
    centred = nodes[sub].output[0]
    after = sorted(readers.get(centred, []))
    if len(after) != 2 or -1 in after:
        return None
    kinds = {nodes[i].op_type: i for i in after}
    pow_, div = kinds.get("Pow"), kinds.get("Div")
    if pow_ is None or div is None or nodes[pow_].input[0] != centred:
        return None
    if not _is(constants.get(nodes[pow_].input[1]), 2.0):
        return None
    var = only(nodes[pow_].output[0], "ReduceMean")
    if var is None or not _last_axis(nodes[var], constants):
        return None
    add = only(nodes[var].output[0], "Add")
    if add is None:
        return None
    epsilon = _other(nodes[add], nodes[var].output[0])
    if epsilon is None or not _scalar(constants.get(epsilon)):
        return None
    sqrt = only(nodes[add].output[0], "Sqrt")
    if sqrt is None or only(nodes[sqrt].output[0], "Div") != div:
        return None
    if list(nodes[div].input) != [centred, nodes[sqrt].output[0]]:
        return None
    mul = only(nodes[div].output[0], "Mul")
    if mul is None:
        return None
    scale = _other(nodes[mul], nodes[div].output[0])
    shift = only(nodes[mul].output[0], "Add")
    if scale is None or shift is None:
        return None
    bias = _other(nodes[shift], nodes[mul].output[0])
    if bias is None or not _vector(constants.get(scale)) or not _vector(constants.get(bias)):
        return None
    return Norm(
        nodes=(first, sub, pow_, var, add, sqrt, div, mul, shift),
        x=x,
        scale=scale,
        bias=bias,
        output=nodes[shift].output[0],
        epsilon=float(constants[epsilon].reshape(-1)[0]),
    )


def _constants(graph: Any) -> dict[str, Any]:
    """The graph's initializers and Constant nodes' values, by name."""
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1:
            attribute = node.attribute[0]
            if attribute.name == "value":
                values[node.output[0]] = numpy_helper.to_array(attribute.t)
    return values


def _last_axis(node: Any, constants: dict[str, Any]) -> bool:
    """A ReduceMean over the last axis only, keeping it (opset 18 takes the axes as an
    input, earlier opsets as an attribute)."""
    from onnx import helper

    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attributes.get("keepdims", 1) != 1:
        return False
    if len(node.input) > 1:
        axes = constants.get(node.input[1])
        return axes is not None and axes.reshape(-1).tolist() == [-1]
    return list(attributes.get("axes", [])) == [-1]


def _other(node: Any, name: str) -> str | None:
    """The input of a two-input node that is not `name`."""
    inputs = list(node.input)
    if len(inputs) != 2 or inputs.count(name) != 1:
        return None
    other: str = inputs[1 - inputs.index(name)]
    return other


def _is(value: Any, wanted: float) -> bool:
    return value is not None and value.size == 1 and float(value.reshape(-1)[0]) == wanted


def _scalar(value: Any) -> bool:
    return value is not None and value.size == 1 and value.dtype.kind == "f"


def _vector(value: Any) -> bool:
    return value is not None and value.ndim == 1 and value.dtype.kind == "f"
