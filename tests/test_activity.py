"""edge.activity: whether a render is alone on its node: renders and passes in flight, as
the renderer counts them with real engines, and requests, as the app and the fast path
report them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from nearvoice.edge.activity import QUIET_SECONDS, RENDERS, Activity
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.metrics import Metrics
from nearvoice.edge.spec import Spec
from nearvoice.edge.synth.piper_engine import PiperEngine
from nearvoice.edge.synth.renderer import Renderer
from tests.support import Clock


def test_one_render_is_alone_and_two_are_not() -> None:
    count = Activity()
    assert count.alone() and count.renders == 0
    count.started()
    assert count.alone() and count.renders == 1
    count.started()
    assert not count.alone() and count.renders == 2
    count.ended()
    count.ended()
    assert count.alone() and count.renders == 0


def test_a_nodes_workers_see_each_others_renders(tmp_path: Path) -> None:
    """Each worker counts in its own slot of one file: a render is alone only while the
    other workers render nothing."""
    path = tmp_path / "activity"
    first, second = Activity(), Activity()
    first.share(path, 0, 2)
    second.share(path, 1, 2)
    assert path.stat().st_size == 32
    second.started()  # a render in the second worker
    assert second.alone()
    first.started()  # and one in the first: neither is alone
    assert not first.alone() and not second.alone()
    second.ended()
    assert first.alone() and second.alone()  # the first's own render, alone again
    first.ended()
    assert first.renders == second.renders == 0
    restarted = Activity()  # a worker restarted after dying with a render in flight
    first.started()
    first.started()
    restarted.share(path, 0, 2)  # its slot starts again from its own count: none
    assert second.alone()


def test_a_render_right_after_another_request_is_not_alone() -> None:
    clock = Clock()
    node = Activity(clock)
    node.request()  # a render's own request
    node.started()
    assert node.alone()
    node.ended()
    clock.now += QUIET_SECONDS / 2
    node.request()  # another request, then a render's
    clock.now += 0.001
    node.request()
    node.started()
    assert not node.alone()  # two requests within QUIET_SECONDS: traffic
    node.ended()
    clock.now += QUIET_SECONDS * 1.5
    node.request()  # a render whose request came after a quiet spell is alone
    node.started()
    assert node.alone()
    clock.now += 0.001
    node.request()  # until another request comes
    assert not node.alone()
    node.ended()


def test_a_request_in_another_worker_keeps_a_render_from_being_alone(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "activity"
    first, second = Activity(clock), Activity(clock)
    first.share(path, 0, 2)
    second.share(path, 1, 2)
    second.request()  # a hit in the second worker
    clock.now += QUIET_SECONDS / 2
    first.request()  # then a render's request in the first
    first.started()
    assert not first.alone()
    clock.now += QUIET_SECONDS * 1.5
    first.request()
    assert first.alone()
    first.ended()


@pytest.fixture(scope="module")
def joe() -> PiperEngine:
    engine = PiperEngine(voices=("joe",), threads=1)
    engine.warmup()
    return engine


def spec(engine: PiperEngine, text: str) -> Spec:
    return Spec.create(text=text, voice="joe", format=AudioFormat.PCM, model=engine.model_id("joe"))


async def test_the_renderer_counts_each_render_from_its_queueing_to_its_end(
    joe: PiperEngine,
) -> None:
    renderer = Renderer([joe], workers=1, metrics=Metrics())
    seen: dict[str, list[int]] = {"one": [], "two": []}

    def sink(name: str) -> object:
        return lambda data: seen[name].append(RENDERS.renders)

    try:
        assert RENDERS.renders == 0
        await renderer.render(joe, spec(joe, "A render alone, counted once."), sink("one"))
        assert RENDERS.renders == 0
        # One inference thread: the second waits in the queue while the first renders,
        # and counts from there, so the first is not alone once the second is asked for.
        await asyncio.gather(
            renderer.render(joe, spec(joe, "The first of two renders, side by side."), sink("two")),
            renderer.render(joe, spec(joe, "The second of two, queued behind it."), sink("two")),
        )
        assert RENDERS.renders == 0
    finally:
        renderer.close()
    assert seen["one"] and set(seen["one"]) == {1}
    assert seen["two"][0] == 2 and seen["two"][-1] == 1


async def test_a_first_piece_spins_alone_and_not_beside_its_own_duration_pass() -> None:
    """A PCM miss whose reader takes the length later (the speech API's) starts its pass
    once its first chunk has left, so the first piece is alone; a WAV miss's pass counts
    the whole text beside the first piece, whose header waits for the length, so it is
    not."""
    engine = PiperEngine(voices=("joe",), threads=1)
    engine.warmup()
    durations = engine._durations["joe"]
    decided: list[bool] = []
    spinning = durations.spinning

    @contextmanager
    def recorded() -> Iterator[bool]:
        with spinning() as spin:
            decided.append(spin)
            yield spin

    durations.spinning = recorded  # type: ignore[method-assign]
    renderer = Renderer([engine], workers=1, metrics=Metrics())
    # Long enough that the WAV's pass (a minute of speech) is still counting when the
    # first piece asks.
    text = " ".join(f"Sentence {n} of a long text, read for a minute or so." for n in range(40))
    try:
        for fmt in (AudioFormat.PCM, AudioFormat.WAV):
            spec = Spec.create(text=text, voice="joe", format=fmt, model=engine.model_id("joe"))
            await renderer.render(engine, spec, lambda data: None, lambda n: None, lambda: None)
    finally:
        renderer.close()
    assert decided == [True, False]
    assert RENDERS.renders == 0
