"""edge.synth.windows: the plan, the cut of a real piper graph, windowed renders against
the whole tail, and the engine's first piece in windows."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_the_vocoder_is_cut_at_its_first_upsampling(
    joe_rest: tuple[object, windows.Tail, PiperEngine],
) -> None:
    import onnx

    _, tail, _ = joe_rest
    vocoder = tail.vocoder
    assert vocoder is not None
    front = onnx.load_from_string(vocoder.front).graph
    back = onnx.load_from_string(vocoder.back).graph
    assert "ConvTranspose" not in {node.op_type for node in front.node}
    assert back.node[0].op_type == "ConvTranspose"
    assert len(front.node) + len(back.node) == tail.nodes  # every node once
    # One tensor crosses: the first upsampling's input, at the frame rate.
    assert vocoder.joints == (back.node[0].input[0],)
    assert [o.name for o in front.output] == list(vocoder.joints)
    assert vocoder.back_inputs == frozenset()  # nothing else of the tail's inputs


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
    # Without context the window edges are wrong, the flow's or the vocoder's: the check
    # can fail.
    for bare_settings in (Settings(context=0), Settings(vocoder_context=0)):
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
    for first in (sessions.first.front, sessions.first.back):
        options = first.get_session_options()
        assert options.intra_op_num_threads == Settings().first_threads == 2
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    for other in (sessions.head, sessions.tail.front, sessions.tail.back):  # the engine's own
        assert other.get_session_options().intra_op_num_threads == 1


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
    def broken(self: windows.Windowed, feeds: object, frames: int) -> Iterator[object]:
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
