"""edge.synth.windows: the plan, the cut of a real piper graph, windowed renders against
the whole tail, and the engine's first piece in windows."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nearvoice.edge import activity
from nearvoice.edge.synth import windows
from nearvoice.edge.synth.durations import Durations, extract
from nearvoice.edge.synth.piper_engine import BUNDLED, PiperEngine
from nearvoice.edge.synth.providers import session
from nearvoice.edge.synth.windows import Settings, Window, plan
from nearvoice.export.sentences import SENTENCES

CPU = ["CPUExecutionProvider"]
HOP = 256


# The plan: pure


@given(
    frames=st.integers(0, 5000),
    first=st.integers(1, 64),
    context=st.integers(0, 64),
    growth=st.integers(1, 16),
)
def test_windows_tile_the_frames_in_order_with_bounded_context(
    frames: int, first: int, context: int, growth: int
) -> None:
    config = Settings(first=first, context=context, growth=growth)
    windows_ = plan(frames, config)
    assert plan(frames, config) == windows_  # a function of the frame count alone
    assert (windows_ == []) == (frames == 0)
    assert [w.start for w in windows_] == [0, *(w.stop for w in windows_)][: len(windows_)]
    assert (windows_[-1].stop if windows_ else 0) == frames
    out = 0
    for i, w in enumerate(windows_):
        assert w.start < w.stop
        assert w.lo == max(0, w.start - context) and w.hi == min(frames, w.stop + context)
        if len(windows_) > 1:  # the vocoder's frames: its own context, within the window's
            vocoder = config.vocoder_context
            assert w.vlo == max(w.lo, w.start - vocoder) and w.vhi == min(w.hi, w.stop + vocoder)
        else:
            assert (w.vlo, w.vhi) == (0, frames)
        if i == 0 and len(windows_) > 1:
            assert w.stop == first
        elif i < len(windows_) - 1:
            assert w.stop - w.start <= growth * out
        out = w.stop


def test_short_pieces_run_in_one_window_and_long_ones_grow() -> None:
    config = Settings(first=16, context=32, growth=12, vocoder_context=12)
    assert plan(48, config) == [Window(0, 48, 0, 48, 0, 48)]
    assert plan(212, config) == [Window(0, 16, 0, 48, 0, 28), Window(16, 212, 0, 212, 4, 212)]
    assert [(w.start, w.stop) for w in plan(603, config)] == [(0, 16), (16, 208), (208, 603)]
    assert plan(0, config) == []


# The cut and the windowed tail, on piper's joe graph


@pytest.fixture(scope="module")
def joe_rest() -> Iterator[tuple[object, windows.Tail, PiperEngine]]:
    graph = extract(Path(BUNDLED["joe"].model_path()), split=True)
    assert graph.rest is not None
    tail = windows.cut(graph.rest)
    assert tail is not None
    yield graph, tail, PiperEngine()


def test_the_cut_takes_the_flow_and_the_vocoder_and_stops_at_the_expansion(
    joe_rest: tuple[object, windows.Tail, PiperEngine],
) -> None:
    import onnx

    _, tail, _ = joe_rest
    ops = {node.op_type for node in onnx.load_from_string(tail.tail).graph.node}
    assert "ConvTranspose" in ops and ops <= windows.LOCAL_OPS
    assert "MatMul" not in ops  # the alignment that lays tokens out over frames is before
    assert tail.feeds == frozenset({"scales"})  # the noise scale, read as given


def test_the_vocoder_is_cut_at_each_upsampling(
    joe_rest: tuple[object, windows.Tail, PiperEngine],
) -> None:
    import onnx

    _, tail, _ = joe_rest
    vocoder = tail.vocoder
    assert vocoder is not None
    front = onnx.load_from_string(vocoder.front).graph
    stages = [onnx.load_from_string(stage.model).graph for stage in vocoder.stages]
    assert "ConvTranspose" not in {node.op_type for node in front.node}
    assert len(stages) == 3  # piper's medium voices upsample 8, 8 and 4 times
    for stage in stages:  # each starts at an upsampling and holds only that one
        assert stage.node[0].op_type == "ConvTranspose"
        assert [node.op_type for node in stage.node].count("ConvTranspose") == 1
    assert len(front.node) + sum(len(stage.node) for stage in stages) == tail.nodes
    # One tensor crosses each cut: the upsampling's input.
    assert vocoder.joints == vocoder.stages[0].inputs == (stages[0].node[0].input[0],)
    assert [o.name for o in front.output] == list(vocoder.joints)
    for before, after, graph in zip(vocoder.stages, vocoder.stages[1:], stages[1:], strict=False):
        assert before.outputs == after.inputs == (graph.node[0].input[0],)
    assert vocoder.stages[-1].outputs == ("output",)
    assert vocoder.back_inputs == frozenset()  # nothing else of the tail's inputs


def test_a_later_stage_that_reads_more_than_the_stage_before_is_not_cut_off() -> None:
    """An upsampling part that reads a tensor from before the stage ahead of it (here a
    scale that the tail takes as an input) cannot run on that stage's window alone: it
    stays in that stage."""
    plain = windows.cut(_upsampler(scaled_after_second=False))
    scaled = windows.cut(_upsampler(scaled_after_second=True))
    assert plain is not None and plain.vocoder is not None
    assert scaled is not None and scaled.vocoder is not None
    assert len(plain.vocoder.stages) == 2
    assert len(scaled.vocoder.stages) == 1


def test_staged_windows_of_a_built_upsampler_are_its_whole_output() -> None:
    model = _upsampler(scaled_after_second=False)
    tail = windows.cut(model)
    assert tail is not None and tail.vocoder is not None and len(tail.vocoder.stages) == 2
    frames = 64
    x = np.random.default_rng(7).standard_normal((1, 4, frames)).astype(np.float32)
    scale = np.array([0.5], np.float32)
    whole = session(model, 1, CPU).run(None, {"x": x, "scale": scale})[0].reshape(-1)
    inputs = {"x": x, "scale": scale}  # the windowed graph runs its head itself
    config = Settings(first=4, context=8, growth=2, vocoder_context=6, upsampled_context=2)
    windowed = windows.Windowed(tail, 4, 1, CPU, config)
    pieces = list(windowed.run(inputs, frames))
    assert len(pieces) > 3
    np.testing.assert_allclose(np.concatenate(pieces), whole, atol=1e-5)
    bare = windows.Windowed(tail, 4, 1, CPU, dataclasses.replace(config, upsampled_context=0))
    assert not bare.close_to(np.concatenate(list(bare.run(inputs, frames))), whole)


def _upsampler(*, scaled_after_second: bool) -> bytes:
    """A small vocoder-like graph: a Softmax (the end of what windows may not cut), a
    convolution at the frame rate, then two upsamplings by 2, each followed by a
    convolution; 4 samples a frame. With `scaled_after_second`, the last convolution's
    output is multiplied by the graph input `scale`."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)

    def weight(name: str, *shape: int) -> TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    nodes = [
        helper.make_node("Softmax", ["x"], ["h"], axis=1),
        helper.make_node("Conv", ["h", "w0"], ["a"], pads=[1, 1]),
        helper.make_node("LeakyRelu", ["a"], ["a1"], alpha=0.1),
        helper.make_node("ConvTranspose", ["a1", "u1"], ["b"], strides=[2], pads=[1, 1]),
        helper.make_node("Conv", ["b", "w1"], ["b1"], pads=[2, 2], dilations=[2]),
        helper.make_node("Add", ["b", "b1"], ["b2"]),
        helper.make_node("ConvTranspose", ["b2", "u2"], ["c"], strides=[2], pads=[1, 1]),
        helper.make_node(
            "Conv", ["c", "w2"], ["y" if not scaled_after_second else "c1"], pads=[1, 1]
        ),
    ]
    if scaled_after_second:
        nodes.append(helper.make_node("Mul", ["c1", "scale"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "upsampler",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, "frames"]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            weight("w0", 6, 4, 3),
            weight("u1", 6, 5, 4),
            weight("w1", 5, 5, 3),
            weight("u2", 5, 3, 4),
            weight("w2", 1, 3, 3),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    serialized: bytes = model.SerializeToString()
    return serialized


@settings(max_examples=12, deadline=None)
@given(text=st.sampled_from(SENTENCES), speed=st.sampled_from([0.6, 1.0, 1.7]))
def test_a_windowed_tail_is_the_whole_tail_within_tolerance(
    joe_rest: tuple[object, windows.Tail, PiperEngine], text: str, speed: float
) -> None:
    graph, tail, engine = joe_rest
    loaded = engine._voice("joe")
    ids = next(engine._pieces(loaded, text))
    feeds = engine._feeds(loaded, ids, engine._synthesis(loaded, speed))
    durations = engine._durations["joe"]
    counted = durations.count(feeds)
    assert counted is not None
    whole = np.asarray(durations.rest(counted, feeds)[0], np.float32).reshape(-1)
    windowed = windows.Windowed(tail, HOP, 1, CPU, Settings())
    inputs = dict(zip(graph.handoff, counted.handoff, strict=True))  # type: ignore[attr-defined]
    inputs.update({k: v for k, v in feeds.items() if k in graph.rest_inputs})  # type: ignore[attr-defined]
    pieces = list(windowed.run(inputs, counted.samples // HOP))
    assert [len(p) for p in pieces] == [
        (w.stop - w.start) * HOP for w in plan(counted.samples // HOP, Settings())
    ]
    assert windowed.close_to(np.concatenate(pieces), whole)
    # The later upsampling stages, each over the window with its own context, compute what
    # they would over the first stage's frames, to the bit.
    wide = windows.Windowed(
        tail, HOP, 1, CPU, Settings(upsampled_context=Settings().vocoder_context)
    )
    assert [p.tobytes() for p in wide.run(inputs, counted.samples // HOP)] == [
        p.tobytes() for p in pieces
    ]
    # Without context the window edges are wrong, the flow's, the vocoder's or a later
    # stage's: the check can fail.
    for bare_settings in (
        Settings(context=0),
        Settings(vocoder_context=0),
        Settings(upsampled_context=0),
    ):
        bare = windows.Windowed(tail, HOP, 1, CPU, bare_settings)
        if len(pieces) > 1:
            bare_pieces = list(bare.run(inputs, len(whole) // HOP))
            assert not bare.close_to(np.concatenate(bare_pieces), whole)


def test_a_graph_without_a_vocoder_has_no_tail() -> None:
    from onnx import TensorProto, helper

    node = helper.make_node("Mul", ["x", "x"], ["y"])
    graph = helper.make_graph(
        [node],
        "square",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert windows.cut(model.SerializeToString()) is None
    assert session(model.SerializeToString(), 1, CPU).run(None, {"x": np.ones((1, 4), np.float32)})


# The engine


def test_the_first_piece_comes_in_windows_and_the_render_keeps_its_length() -> None:
    engine = PiperEngine()
    engine.warmup()
    assert engine._durations["joe"].windowed() is not None
    text = "Your order has shipped and will arrive on Tuesday. Please hold for the next agent."
    counted = engine.samples(text, "joe", 1.0)
    audio = list(engine.stream(text, "joe", 1.0, 0))
    assert len(audio[0]) == Settings().first * HOP
    assert sum(map(len, audio)) == counted
    again = PiperEngine()
    assert [a.tobytes() for a in again.stream(text, "joe", 1.0, 0)] == [a.tobytes() for a in audio]


def test_the_first_window_runs_on_its_own_threads_and_sleeps_between_runs(
    joe_rest: tuple[object, windows.Tail, PiperEngine],
) -> None:
    _, tail, _ = joe_rest
    sessions = windows.Windowed(tail, HOP, 1, CPU, Settings())._sessions()
    for first in (sessions.first.front, *sessions.first.back):
        options = first.get_session_options()
        assert options.intra_op_num_threads == Settings().first_threads == 2
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    for other in (sessions.head, sessions.tail.front, *sessions.tail.back):  # the engine's own
        assert other.get_session_options().intra_op_num_threads == 1


def test_the_spinning_first_window_is_the_sleeping_one_bit_for_bit(
    joe_rest: tuple[object, windows.Tail, PiperEngine],
) -> None:
    graph, tail, engine = joe_rest
    windowed = windows.Windowed(tail, HOP, 1, CPU, Settings())
    windowed.prepare(spinning=True)
    spinning = windowed._spinning
    assert spinning is not None and spinning.front is not None
    for stage in (spinning.front, *spinning.back):  # onnxruntime's default: spinning
        options = stage.get_session_options()
        assert options.intra_op_num_threads == Settings().first_threads
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    durations = engine._durations["joe"]
    loaded = engine._voice("joe")
    for text in SENTENCES[:6]:
        feeds = engine._feeds(
            loaded, next(engine._pieces(loaded, text)), engine._synthesis(loaded, 1.0)
        )
        counted = durations.count(feeds)
        assert counted is not None
        inputs = dict(zip(graph.handoff, counted.handoff, strict=True))  # type: ignore[attr-defined]
        inputs.update({k: v for k, v in feeds.items() if k in graph.rest_inputs})  # type: ignore[attr-defined]
        frames = counted.samples // HOP
        assert [p.tobytes() for p in windowed.run(inputs, frames, spin=True)] == [
            p.tobytes() for p in windowed.run(inputs, frames)
        ]


class Runs:
    """A real onnxruntime session that counts its runs."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.runs = 0

    def run(self, names: object, feeds: object) -> object:
        self.runs += 1
        return self.inner.run(names, feeds)  # type: ignore[attr-defined]


def test_a_render_alone_spins_its_first_piece_and_one_beside_another_does_not() -> None:
    engine = PiperEngine(voices=("joe",))
    engine.warmup()
    durations = engine._durations["joe"]
    graph = durations.graph()
    assert graph is not None and durations.unspun is None
    spy = Runs(durations._spinning_session(graph))
    durations._spinning = spy
    text = "Your order has shipped and will arrive on Tuesday. Please hold for the next agent."
    stream = engine.stream(text, "joe", 1.0, 0)
    alone = [next(stream).tobytes()]
    assert spy.runs == 1  # the first piece's count
    assert not durations._spin.locked()  # held for the first window only
    alone += [a.tobytes() for a in stream]
    activity.RENDERS.started()
    activity.RENDERS.started()  # this render and another
    try:
        beside = [a.tobytes() for a in engine.stream(text + " Again.", "joe", 1.0, 0)]
    finally:
        activity.RENDERS.ended()
        activity.RENDERS.ended()
    assert spy.runs == 1 and beside[: len(alone) - 1] == alone[:-1]


def test_first_windows_rendered_side_by_side_are_the_bytes_of_one_alone() -> None:
    """The first window's two threads share the cores with another render's: what each
    computes must not depend on how the threads were scheduled."""
    text = "Your order has shipped and will arrive on Tuesday. Please hold for the next agent."
    engines = [PiperEngine(voices=("joe",)) for _ in range(3)]

    def render(engine: PiperEngine) -> list[bytes]:
        return [a.tobytes() for a in engine.stream(text, "joe", 1.0, 0)]

    alone = render(engines[0])
    with ThreadPoolExecutor(2) as pool:
        side_by_side = list(pool.map(render, engines[1:]))
    assert side_by_side == [alone, alone]


def test_warmup_runs_first_pieces_whole_when_windows_differ_from_the_graph() -> None:
    engine = PiperEngine()
    durations: Durations = engine._durations["joe"]
    durations._windows = Settings(context=0)  # window edges without context are wrong
    engine.warmup()
    assert durations.windowed() is None and durations.unwindowed is not None
    assert durations.splits()  # the split itself still holds
    text = "Your order has shipped and will arrive on Tuesday."
    whole = list(engine._whole("joe", text))
    assert [a.tobytes() for a in engine.stream(text, "joe", 1.0, 0)] == [a.tobytes() for a in whole]


def test_warmup_runs_first_pieces_whole_when_windows_cannot_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(
        self: windows.Windowed, feeds: object, frames: int, spin: bool = False
    ) -> Iterator[object]:
        raise RuntimeError("a cut onnxruntime cannot run on a window")
        yield  # a generator, as the real one

    monkeypatch.setattr(windows.Windowed, "run", broken)
    engine = PiperEngine()
    engine.warmup()
    durations: Durations = engine._durations["joe"]
    assert durations.windowed() is None and "cannot run" in (durations.unwindowed or "")
    text = "Your order has shipped and will arrive on Tuesday."
    whole = list(engine._whole("joe", text))
    assert [a.tobytes() for a in engine.stream(text, "joe", 1.0, 0)] == [a.tobytes() for a in whole]
