"""Renderer.warmup: every render and pass thread loads its sessions at warmup, so renders
that come later, on any thread, load none (a node's memory is what warmup left)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.metrics import Metrics
from nearvoice.edge.spec import Spec
from nearvoice.edge.synth import durations, piper_engine, windows
from nearvoice.edge.synth.piper_engine import PiperEngine
from nearvoice.edge.synth.renderer import Renderer

TEXTS = [
    "Your order has shipped and will arrive on Tuesday. Please hold for the next agent.",
    "The meeting has moved to three thirty. Turn left at the next light, then keep right.",
    "Welcome back, it is good to hear from you again. The quick brown fox jumps.",
    "Please hold while we connect you. The train to the airport leaves at noon.",
]


@pytest.mark.slow
async def test_renders_after_warmup_load_no_session(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = PiperEngine(threads=1)
    renderer = Renderer([engine], workers=2, metrics=Metrics())
    loaded: list[str] = []
    for module in (durations, windows, piper_engine):
        real = module.session

        def spy(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            loaded.append(threading.current_thread().name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, "session", spy)
    try:
        await renderer.warmup()
        threads = set(loaded)
        assert {n.rsplit("_", 1)[0] for n in threads} == {"synth", "pass"}
        assert len(threads) == 4  # two render threads, two pass threads
        loaded.clear()
        specs = [
            Spec.create(text=t, voice="joe", format=AudioFormat.WAV, model=engine.model_id("joe"))
            for t in TEXTS
        ]
        sizes = await asyncio.gather(
            *(renderer.render(engine, spec, lambda data: None) for spec in specs)
        )
        assert all(seconds > 1.0 for seconds in sizes)
        assert loaded == []  # every thread that rendered or counted had its sessions
    finally:
        renderer.close()
