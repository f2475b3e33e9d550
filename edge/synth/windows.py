"""First audio from the first frames: a render's time-local tail, run window by window.

A VITS-family graph spends most of a render after the durations are known, in parts that
are local in time: the flow (stacks of convolutions over frames) and the vocoder (more
convolutions, upsampling each frame to `hop` samples). An output sample there depends on
the frames within a bounded radius of its own, not on the whole utterance. So the tail can
run over the first few frames (with some frames of context on each side) and hand out
their samples before the rest of the utterance has been vocoded: the first byte of a
render waits for the text encoder, the durations and one small window, not for the whole
sentence's audio.

The cut (`cut`): walking back from the graph's output through time-local operators only
(convolutions, elementwise arithmetic and activations, channel splits and concatenations,
shape arithmetic), the tensors where that walk stops are the tail's inputs. Any of those
whose last axis has the frame count is sliced per window; the others (a scale, a speaker
embedding) are fed whole. The walk does not prove locality (a Slice could cut the time
axis, a Conv could be given huge dilations), so engines compare windowed renders with
whole ones at warmup and run the tail whole when they differ (`Windowed.close_to`).

The plan (`plan`) is a function of the frame count alone, so the same text renders to the
same bytes on every node. The first window is short, every later one is `growth` times the
audio already out (so it is vocoded well before the audio ahead of it has played), and the
last takes all that remains. Each window recomputes `context` frames on each side that
another window owns: the price of the early first byte, a few tenths of a window. With
enough context the samples are those of the whole tail up to float rounding at the window
edges (a few millionths here, at most about a 16-bit step); the render revision
(edge.cache.meta) names these bytes.

The context is the flow's: its stacks of convolutions see about thirty frames each way.
The vocoder after it sees about a dozen, and costs most of a window, so the tail is cut
once more, at its first upsampling (`Vocoder`): the front (the flow) runs over the
window with `context`, the back (the upsampling stacks) over the window with only
`vocoder_context` frames each side, taken from what the front computed. The back is cut
again at each later upsampling (`Vocoder.stages`): a stack's receptive field is a number
of its own samples, so the higher its rate the fewer frames it sees (piper's medium
voices: about 45 samples each way at every stage, 5.6 frames at 8 samples a frame, 0.7 at
64, 0.2 at 256). Each later stage runs over the window with `upsampled_context` frames
each side, cut from what the stage before computed, and those stages are where a HiFi-GAN
spends most of its work.

The first window runs on `first_threads` onnxruntime threads, whatever the engine's own
(`[synth] ort_threads`, one by default). Nothing else of a render is running while the
first byte waits for it (edge.synth.renderer starts a length-free render's duration pass
after the first chunk), so a second core there is time off the first byte. For piper's
`joe` with 16 frames first (48 with the flow's context, 28 with the vocoder's) the first
window took 36 ms on one thread with the tail whole, 21 ms on two, and 17 ms on two with
the vocoder cut; with 8 frames first (40 and 20), 14 ms; and side by side, 18.5 ms with
every upsampling stage over those 20 frames against 15.0 with the later two over 10
(`Vocoder.stages`). The text encoder before it runs
on the same threads for the first piece (edge.synth.durations.Durations.count). The
count is a constant of the plan, not of the node, since onnxruntime's float rounding may
depend on how many threads share an operator: every node vocodes the first window alike,
and the render revision names it. Its sessions sleep rather than spin between runs
(edge.synth.providers.session), so their idle threads take nothing from the renders
beside them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from nearvoice.edge.synth.onnxgraph import behind, build_model, reads_of
from nearvoice.edge.synth.providers import session

LOCAL_OPS = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Neg", "Exp", "Log", "Sqrt", "Pow", "Abs", "Clip",
        "Tanh", "Sigmoid", "Relu", "LeakyRelu", "Softplus", "Identity", "Cast",
        "Conv", "ConvTranspose",
        "Split", "Concat", "Slice", "Shape", "ConstantOfShape", "Constant", "Gather",
        "Unsqueeze", "Squeeze",
    }
)  # fmt: skip
"""Operators the tail may hold: per frame, per channel, or convolutions along time. Shape
arithmetic (Shape, Gather, ConstantOfShape) follows the window's own shape. Slice, Split
and Concat are taken to act on channels; warmup checks that they do."""


@dataclass(frozen=True, slots=True)
class Settings:
    """How a render's first piece is windowed. Frames are the duration frames (one frame is
    `hop` samples of audio: 256 at 22.05 kHz is 11.6 ms)."""

    first: int = 8
    """Frames in the first window (93 ms of audio at 22.05 kHz): what the first byte waits
    for, with its context. Measured on `joe`'s first pieces (20 texts, two threads): 16.6
    ms at 16 frames, 14.1 at 8. Over the 20 export sentences, windowed first pieces at 8
    frames differ from the whole graph's by 1.2e-5 at most (3.2e-5 at 16)."""
    context: int = 32
    """Frames of context computed on each side of a window and thrown away."""
    growth: int = 4
    """Each later window holds at most `growth` times the frames already out: vocoding
    it (at about 0.8 ms a frame on one core for piper's medium voices, more with the
    duration pass counting on the other) takes less time than playing the audio already
    out (11.6 ms a frame). Measured on `joe`'s stream of a one-minute text over the
    speech API, with the pass beside: after a first window of 16 frames (186 ms of
    audio), the second came 24 to 47 ms after that audio had played at 12 and 17 to 42
    ms before it at 8; after a first window of 8 frames (93 ms), 5 to 12 ms before it at
    8 and 32 to 34 ms before it at 4."""
    tolerance: float = 1e-4
    """Largest difference from the whole tail's samples that warmup accepts (a 16-bit
    step is 3.1e-5; over the 20 export sentences the windows measure 1.4e-6 at the
    median and 1.2e-5 at most)."""
    first_threads: int = 2
    """onnxruntime threads that vocode the first window, on every node (see above)."""
    vocoder_context: int = 12
    """Frames of context the vocoder (the tail from its first upsampling on, `Vocoder`)
    computes on each side of a window, within the window's `context`: it sees fewer
    frames than the flow before it (HiFi-GAN's receptive field is about a dozen frames,
    the flow's about thirty), and it is most of a window's cost. Measured on piper's
    `joe`: 12 frames agree with 32 to the last float rounding (8e-6 from the whole tail's
    samples, as 32 does), 8 frames do not (1e-3)."""
    upsampled_context: int = 2
    """Frames of context each upsampling stage after the vocoder's first computes on each
    side of a window, within `vocoder_context` (`Vocoder.stages`). Their receptive fields
    are under a frame on piper's medium voices, so from 1 frame on the samples are those
    of stages run over the first stage's frames, to the bit; 0 is wrong by 0.16. Measured
    on `joe`'s first pieces (20 texts x 4, on the engine's threads): 32.5 ms to the first
    window with every stage over the first stage's 20 frames, 29.8 ms with the later two
    over 10, which hold about four fifths of a HiFi-GAN's work."""


@dataclass(frozen=True, slots=True)
class Window:
    """Frames [start, stop) of the output, computed from input frames [lo, hi); the
    vocoder runs over frames [vlo, vhi) of those."""

    start: int
    stop: int
    lo: int
    hi: int
    vlo: int
    vhi: int


def plan(frames: int, settings: Settings) -> list[Window]:
    """The windows a tail of `frames` frames runs in, in order; one window when the
    utterance is too short for windows to pay."""
    if frames <= 0:
        return []
    if frames <= settings.first + settings.context:
        return [Window(0, frames, 0, frames, 0, frames)]
    windows: list[Window] = []
    start, size = 0, settings.first
    while start < frames:
        stop = frames if frames - start <= size + settings.context else start + size
        lo, hi = max(0, start - settings.context), min(frames, stop + settings.context)
        vlo = max(lo, start - settings.vocoder_context)
        vhi = min(hi, stop + settings.vocoder_context)
        windows.append(Window(start, stop, lo, hi, vlo, vhi))
        start = stop
        size = settings.growth * stop
    return windows


@dataclass(frozen=True, slots=True)
class Tail:
    """A graph cut at the start of its time-local tail."""

    head: bytes
    """The graph up to the tail's inputs (its outputs are `inputs`)."""
    tail: bytes
    """The tail: `inputs` in, the source's first output out."""
    inputs: tuple[str, ...]
    """Tensors the head computes and the tail reads."""
    feeds: frozenset[str]
    """The source's own inputs the tail reads too (a noise scale), fed as given."""
    nodes: int
    """Nodes in the tail."""
    vocoder: Vocoder | None = None
    """The tail in two, before and from its first upsampling (None: run it whole)."""


@dataclass(frozen=True, slots=True)
class Upsampling:
    """One stage of a vocoder's back: an upsampling (ConvTranspose) and every node computed
    from it before the next upsampling."""

    model: bytes
    """`inputs` in, `outputs` out."""
    inputs: tuple[str, ...]
    """Tensors the stage reads from the front (the first stage) or from the stage before,
    all along time."""
    outputs: tuple[str, ...]
    """What the next stage reads, or the tail's output (the last stage)."""


@dataclass(frozen=True, slots=True)
class Vocoder:
    """A tail cut at its upsamplings (ConvTranspose): the front (a VITS flow, and the
    vocoder's first convolution) at the frame rate, then the back, one stage per
    upsampling. Each runs over its own frames: the first stage sees
    `Settings.vocoder_context` frames of context, the later ones
    `Settings.upsampled_context`, the front all of `Settings.context`."""

    front: bytes
    """The tail's nodes before the first upsampling: the tail's inputs in, `joints` out."""
    stages: tuple[Upsampling, ...]
    """The back, in order: the first stage reads `joints` (and `back_inputs`), each later
    one only what the stage before computed, and the last writes the tail's output."""
    front_inputs: frozenset[str]
    """The tail's inputs the front reads."""
    back_inputs: frozenset[str]
    """The tail's inputs the first stage reads too."""

    @property
    def joints(self) -> tuple[str, ...]:
        """Tensors the front computes and the back reads."""
        return self.stages[0].inputs


def cut(model: bytes) -> Tail | None:
    """`model` cut at the start of its time-local tail; None when there is no such tail
    with a vocoder (ConvTranspose) in it, or its inputs' types are unknown."""
    import onnx

    source = onnx.load_from_string(model)
    graph = source.graph
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    initializers = {t.name for t in graph.initializer}
    sources = {i.name for i in graph.input}
    tail: set[int] = set()
    inputs: set[str] = set()
    stack = [graph.output[0].name]
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen or name in initializers:
            continue
        seen.add(name)
        index = producers.get(name)
        if index is None or graph.node[index].op_type not in LOCAL_OPS:
            inputs.add(name)
            continue
        tail.add(index)
        stack.extend(reads_of(graph.node[index]))
    if not tail or not any(graph.node[i].op_type == "ConvTranspose" for i in tail):
        return None
    ordered = tuple(sorted(inputs - sources))
    if not ordered:
        return None
    try:
        inferred = onnx.shape_inference.infer_shapes(source).graph
    except Exception:  # some contrib ops defeat shape inference: no windows then
        return None
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.value_info}
    if not all(types.get(name) for name in ordered):
        return None
    needed: set[int] = set()
    for name in ordered:  # what the cut inputs are computed from (a mask may be in both)
        needed |= behind(graph, producers, name)[0]
    head_nodes = [graph.node[i] for i in sorted(needed)]
    head_reads = {n for node in head_nodes for n in reads_of(node)} | set(ordered)
    head = build_model(
        source,
        head_nodes,
        list(graph.input),
        [onnx.helper.make_tensor_value_info(name, types[name], None) for name in ordered],
        head_reads,
    )
    tail_nodes = [graph.node[i] for i in sorted(tail)]  # the source's order is topological
    tail_inputs = [
        onnx.helper.make_tensor_value_info(name, types[name], None) for name in ordered
    ] + [i for i in graph.input if i.name in inputs]
    tail_model = build_model(
        source,
        tail_nodes,
        tail_inputs,
        [graph.output[0]],
        {n for node in tail_nodes for n in reads_of(node)},
    )
    return Tail(
        head=head,
        tail=tail_model,
        inputs=ordered,
        feeds=frozenset(inputs & sources),
        nodes=len(tail),
        vocoder=_vocoder(source, tail_nodes, tail_inputs, types),
    )


def _vocoder(
    source: Any, nodes: list[Any], inputs: list[Any], types: Mapping[str, int]
) -> Vocoder | None:
    """The tail `nodes` (in order) cut at their upsamplings (see `Vocoder`); None when a
    tensor that crosses a cut has no known type."""
    import onnx

    upsamplings = [i for i, node in enumerate(nodes) if node.op_type == "ConvTranspose"]
    parts = [_computed_from(nodes, first) for first in upsamplings]
    # A stage ends where the next upsampling's part begins; a later part that reads more
    # than the stage before it (the front, the tail's inputs) stays in that stage.
    everything = {name for node in nodes for name in node.output} | {i.name for i in inputs}
    cuts = [0]
    for n in range(1, len(parts)):
        allowed = {name for i in parts[cuts[-1]] for name in nodes[i].output}
        if {name for i in parts[n] for name in reads_of(nodes[i])} & everything <= allowed:
            cuts.append(n)
    front = [i for i in range(len(nodes)) if i not in parts[0]]
    stages = [
        sorted(parts[n] - (parts[cuts[k + 1]] if k + 1 < len(cuts) else set()))
        for k, n in enumerate(cuts)
    ]  # each in the source's order, which is topological
    tail_inputs = {i.name: i for i in inputs}

    def value(name: str) -> Any:
        return onnx.helper.make_tensor_value_info(name, types[name], None)

    made: list[Upsampling] = []
    produced = {name for i in front for name in nodes[i].output}
    for k, stage in enumerate(stages):
        reads = {name for i in stage for name in reads_of(nodes[i])}
        own = {name for i in stage for name in nodes[i].output}
        later = {name for after in stages[k + 1 :] for i in after for name in reads_of(nodes[i])}
        crossing = tuple(sorted(reads & produced))
        handed = tuple(sorted(later & own))
        if not all(types.get(name) for name in crossing + handed):
            return None
        given = [tail_inputs[name] for name in tail_inputs if name in reads] if k == 0 else []
        last = k + 1 == len(stages)
        outputs = [source.graph.output[0]] if last else [value(name) for name in handed]
        made.append(
            Upsampling(
                model=build_model(
                    source,
                    [nodes[i] for i in stage],
                    [value(name) for name in crossing] + given,
                    outputs,
                    reads,
                ),
                inputs=crossing,
                outputs=tuple(o.name for o in outputs),
            )
        )
        produced = own
    front_reads = {name for i in front for name in reads_of(nodes[i])}
    first_reads = {name for i in stages[0] for name in reads_of(nodes[i])}
    return Vocoder(
        front=build_model(
            source,
            [nodes[i] for i in front],
            [tail_inputs[name] for name in tail_inputs if name in front_reads],
            [value(name) for name in made[0].inputs],
            front_reads,
        ),
        stages=tuple(made),
        front_inputs=frozenset(front_reads & set(tail_inputs)),
        back_inputs=frozenset(first_reads & set(tail_inputs)),
    )


def _computed_from(nodes: list[Any], first: int) -> set[int]:
    """`first` and every node (of `nodes`, in order) computed from its outputs."""
    outputs = set(nodes[first].output)
    part = {first}
    for i in range(first + 1, len(nodes)):  # in order: a node's producers come before it
        if any(name in outputs for name in reads_of(nodes[i])):
            part.add(i)
            outputs.update(nodes[i].output)
    return part


Feeds = Mapping[str, npt.NDArray[Any]]


@dataclass(frozen=True, slots=True)
class Stage:
    """Sessions that run a window's tail: the vocoder's front and its back's stages, or
    (`front` None) the tail whole, as the one stage."""

    front: Any | None
    back: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Sessions:
    """One inference thread's sessions of a cut graph."""

    head: Any
    """The graph up to the tail, on the engine's threads."""
    tail: Stage
    """For every window after the first, on the engine's threads."""
    first: Stage
    """For the first window, on `Settings.first_threads` threads."""


class Windowed:
    """Runs a graph (the rest after a duration pass) with its tail in windows. Each
    inference thread has its own sessions, as engines keep theirs."""

    def __init__(
        self, cut_tail: Tail, hop: int, threads: int, providers: list[Any], settings: Settings
    ) -> None:
        self._cut = cut_tail
        self._hop = hop
        self._threads = threads
        self._providers = providers
        self.settings = settings
        self._local = threading.local()
        self._lock = threading.Lock()
        self._spinning: Stage | None = None

    def prepare(self, spinning: bool = False) -> None:
        """Loads this thread's sessions of the head and the tail; with `spinning`, the
        process's first-window sessions that spin too (`run`)."""
        self._sessions()
        if spinning:
            self._spinning_stage()

    def _spinning_stage(self) -> Stage:
        """The process's one set of first-window sessions whose threads spin between
        operators (edge.activity): for the render that is alone."""
        if self._spinning is None:
            with self._lock:
                if self._spinning is None:
                    self._spinning = self._stage(self.settings.first_threads, spin=True)
        return self._spinning

    def _sessions(self) -> Sessions:
        sessions: Sessions | None = getattr(self._local, "sessions", None)
        if sessions is None:
            sessions = self._local.sessions = Sessions(
                head=session(self._cut.head, self._threads, self._providers),
                tail=self._stage(self._threads),
                first=self._stage(self.settings.first_threads, spin=False),
            )
        return sessions

    def _stage(self, threads: int, spin: bool = True) -> Stage:
        vocoder, providers = self._cut.vocoder, self._providers
        if vocoder is None:
            return Stage(None, (session(self._cut.tail, threads, providers, spin),))
        return Stage(
            session(vocoder.front, threads, providers, spin),
            tuple(session(stage.model, threads, providers, spin) for stage in vocoder.stages),
        )

    def run(
        self, feeds: Feeds, frames: int, spin: bool = False
    ) -> Iterator[npt.NDArray[np.float32]]:
        """The graph's first output for `feeds`, `frames` frames long, window by window:
        each piece is yielded as soon as its window has run. `spin`: the first window on
        the sessions that spin (the caller holds them; edge.synth.durations.spinning)."""
        sessions = self._sessions()
        head = sessions.head.run(None, dict(feeds))
        inputs = dict(zip(self._cut.inputs, head, strict=True))
        inputs.update((name, feeds[name]) for name in self._cut.feeds)
        first = self._spinning_stage() if spin else sessions.first
        for n, window in enumerate(plan(frames, self.settings)):
            stage = first if n == 0 else sessions.tail
            if stage.front is None:
                out = stage.back[0].run(None, _frames(inputs, frames, window.lo, window.hi))[0]
                lo = window.lo
            else:
                out, lo = self._vocode(stage, inputs, frames, window)
            out = np.asarray(out, dtype=np.float32).reshape(-1)
            begin = (window.start - lo) * self._hop
            yield out[begin : begin + (window.stop - window.start) * self._hop]

    def _vocode(
        self, stage: Stage, inputs: Feeds, frames: int, window: Window
    ) -> tuple[npt.NDArray[Any], int]:
        """One window through the front over frames [lo, hi), the back's first stage over
        [vlo, vhi) of what the front gave, and each later stage over the window with
        `upsampled_context` frames each side of what the stage before gave. Returns the
        tail's output and the frame it starts at."""
        vocoder = self._cut.vocoder
        assert vocoder is not None and stage.front is not None
        front = {name: inputs[name] for name in vocoder.front_inputs}
        computed = stage.front.run(None, _frames(front, frames, window.lo, window.hi))
        joints = dict(zip(vocoder.joints, computed, strict=True))
        lo, width = window.lo, window.hi - window.lo
        feeds = _frames(joints, width, window.vlo - lo, window.vhi - lo)
        given = {name: inputs[name] for name in vocoder.back_inputs}
        feeds.update(_frames(given, frames, window.vlo, window.vhi))
        lo, hi = window.vlo, window.vhi
        context = self.settings.upsampled_context
        for n, (upsampling, run) in enumerate(zip(vocoder.stages, stage.back, strict=True)):
            if n:
                # Within what the stage before computed, the frames this one needs.
                start, stop = max(lo, window.start - context), min(hi, window.stop + context)
                feeds = {
                    name: _rate_cut(value, hi - lo, start - lo, stop - lo)
                    for name, value in feeds.items()
                }
                lo, hi = start, stop
            feeds = dict(zip(upsampling.outputs, run.run(None, feeds), strict=True))
        (out,) = feeds.values()
        return out, lo

    def close_to(self, windowed: npt.NDArray[np.float32], whole: npt.NDArray[np.float32]) -> bool:
        """Whether a windowed render is the whole graph's, within `settings.tolerance`."""
        return windowed.shape == whole.shape and bool(
            np.max(np.abs(windowed - whole), initial=0.0) <= self.settings.tolerance
        )


def _rate_cut(value: npt.NDArray[Any], frames: int, lo: int, hi: int) -> npt.NDArray[Any]:
    """Frames [lo, hi) of `value`, a tensor `frames` frames long along its last axis at
    some whole number of samples a frame."""
    rate, left = divmod(value.shape[-1], frames)
    if left or not rate:
        raise ValueError(f"{value.shape[-1]} samples are no whole number a frame over {frames}")
    return value[..., lo * rate : hi * rate]


def _frames(values: Feeds, frames: int, lo: int, hi: int) -> dict[str, npt.NDArray[Any]]:
    """`values` with each tensor whose last axis has `frames` frames cut to [lo, hi); the
    others (a scale, a speaker) whole."""
    return {
        name: value[..., lo:hi] if value.ndim and value.shape[-1] == frames else value
        for name, value in values.items()
    }
