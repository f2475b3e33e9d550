"""Cutting ONNX graphs into parts that run as models of their own: the duration pass
(edge.synth.durations) and the windowed tail (edge.synth.windows) are both cut this way.
Node order is kept from the source, which ONNX requires to be topological."""

from __future__ import annotations

from typing import Any


def build_model(
    source: Any, nodes: list[Any], inputs: list[Any], outputs: list[Any], reads: set[str]
) -> bytes:
    """A model of `nodes` from `source`, with the initializers and value infos they read."""
    from onnx import helper

    graph = helper.make_graph(
        nodes,
        source.graph.name,
        inputs,
        outputs,
        initializer=[t for t in source.graph.initializer if t.name in reads],
    )
    graph.value_info.extend(v for v in source.graph.value_info if v.name in reads)
    model = helper.make_model(
        graph, opset_imports=source.opset_import, ir_version=source.ir_version
    )
    model.functions.extend(source.functions)
    serialized: bytes = model.SerializeToString()
    return serialized


def behind(graph: Any, producers: dict[str, int], tensor: str) -> tuple[set[int], set[str]]:
    """Indices of the nodes that `tensor` is computed from, and every tensor they read."""
    nodes: set[int] = set()
    tensors: set[str] = set()
    stack = [tensor]
    while stack:
        name = stack.pop()
        if name in tensors:
            continue
        tensors.add(name)
        index = producers.get(name)
        if index is not None and index not in nodes:
            nodes.add(index)
            stack.extend(reads_of(graph.node[index]))
    return nodes, tensors


def reads_of(node: Any) -> list[str]:
    """A node's inputs, with the outer names its subgraphs (If, Loop, Scan bodies) read."""
    names = [i for i in node.input if i]
    for attribute in node.attribute:
        for body in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            inner = {i.name for i in body.input} | {t.name for t in body.initializer}
            inner |= {out for n in body.node for out in n.output}
            names.extend(i for n in body.node for i in reads_of(n) if i not in inner)
    return names
