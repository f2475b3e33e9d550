"""edge/synth/torch_engine.py with real torch on the CPU (and on CUDA where torch sees a
GPU): a tiny random VitsModel and its VitsTokenizer files built locally, rendered through
the real renderer and batcher, and served by a real origin app.

Batch invariance is the contract under test: a spec renders to the same bytes alone, in
a full batch of random others and in a batch of half padding, and when its batch is split
after running out of memory or because a batch-mate failed."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from nearvoice.edge.checks import ConfigError
from nearvoice.edge.config import NodeConfig, Role, SynthSettings, load
from nearvoice.edge.metrics import Metrics
from nearvoice.edge.spec import AudioFormat, Spec
from nearvoice.edge.synth.batching import Dispatch
from nearvoice.edge.synth.renderer import Renderer, RenderError
from nearvoice.edge.synth.torch_engine import Piece, TorchEngine
from nearvoice.edge.synth.torch_layout import Layout, TorchSettings, frame_ladder, model_id
from nearvoice.edge.synth.torch_layout import read_checkpoint as read
from nearvoice.edge.voices import for_config
from nearvoice.edge.workers import Siblings
from tests.support import make_keyring, metric, scrape_until, sign, wait_ready

pytestmark = pytest.mark.slow

VOICE = "tiny"
SPEC_TEXT = "the quick brown fox jumps over the lazy dog"
WINDOW_MS = 400.0
"""Long enough that renders started together on a loaded machine share their batches."""
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no GPU"),
            # Deterministic mode warns about CUDA kernels without a deterministic variant
            # (the sums it flags add whole numbers or one term: exact in any order).
            pytest.mark.filterwarnings("ignore::UserWarning"),
        ],
    ),
]


def settings(checkpoint: Path, rows: int = 4, **more: Any) -> TorchSettings:
    return TorchSettings(
        voice=VOICE,
        checkpoint=str(checkpoint),
        cpu_max_batch=rows,
        cpu_window_ms=WINDOW_MS,
        cuda_max_batch=rows,
        cuda_window_ms=WINDOW_MS,
        **more,
    )


@pytest.fixture(params=DEVICES)
def engine(request: pytest.FixtureRequest, tiny_checkpoint: Path) -> Any:
    built = TorchEngine(settings(tiny_checkpoint), device=request.param)
    yield built
    built.close()


@pytest.fixture
def batches(engine: TorchEngine) -> Any:
    seen: list[Dispatch] = []
    assert engine.batcher is not None
    engine.batcher.listeners.append(seen.append)
    yield seen
    engine.batcher.listeners.remove(seen.append)
    engine.model.fault = None


def spec_of(engine: TorchEngine, text: str, speed: float = 1.0) -> Spec:
    return Spec.create(
        text=text, voice=VOICE, format=AudioFormat.WAV, model=engine.model_id(VOICE), speed=speed
    )


def random_texts(count: int, seed: int) -> list[str]:
    """Lines of 35-60 characters: the same text bucket (128 tokens) as SPEC_TEXT."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = []
    for _ in range(count):
        words = []
        while sum(len(w) + 1 for w in words) < rng.randint(35, 55):
            words.append("".join(rng.choice(letters) for _ in range(rng.randint(2, 7))))
        out.append(" ".join(words))
    return out


async def render(renderer: Renderer, engine: TorchEngine, spec: Spec) -> bytes:
    chunks: list[bytes] = []
    lengths: list[int | None] = []
    await renderer.render(engine, spec, chunks.append, lengths.append)
    await asyncio.sleep(0)  # chunks handed over with call_soon_threadsafe land first
    body = b"".join(chunks)
    assert lengths == [len(body)]  # the exact length was announced before the first byte
    return body


async def test_a_spec_renders_the_same_bytes_whatever_shares_its_batch(
    engine: TorchEngine, batches: list[Dispatch]
) -> None:
    renderer = Renderer([engine], workers=1, metrics=Metrics(), max_queue=16)
    # Admission reads the batcher: idle, a render would start when its window ends.
    assert renderer.estimated_wait(engine) == pytest.approx(WINDOW_MS / 1000)
    try:
        spec = spec_of(engine, SPEC_TEXT)
        others = [
            spec_of(engine, t, speed)
            for t, speed in zip(random_texts(4, 1), (0.8, 1.0, 1.3, 1.7), strict=True)
        ]
        alone = await render(renderer, engine, spec)
        assert [d.size for d in batches] == [1, 1]  # its duration pass, then its render
        batches.clear()
        full = await asyncio.gather(
            render(renderer, engine, others[0]),
            render(renderer, engine, spec),
            *(render(renderer, engine, o) for o in others[1:3]),
        )
        assert sorted(d.size for d in batches) == [4, 4]
        batches.clear()
        half = await asyncio.gather(
            render(renderer, engine, spec), render(renderer, engine, others[3])
        )
        assert sorted(d.size for d in batches) == [2, 2]
    finally:
        renderer.close()
    assert full[1] == alone
    assert half[0] == alone
    assert len({alone, *full, *half}) == 5  # the others are other objects


def test_the_duration_pass_counts_what_the_render_produces(engine: TorchEngine) -> None:
    text = "One sentence here. And a second, longer one follows it! Then a third?"
    for speed in (0.7, 1.0, 1.6):
        rendered = sum(len(a) for a in engine.stream(text, VOICE, speed, 0))
        assert engine.samples(text, VOICE, speed) == rendered > 0


def test_unbatched_renders_are_transformers_own_forward(tiny_checkpoint: Path) -> None:
    from transformers import VitsModel, VitsTokenizer

    alone = TorchEngine(settings(tiny_checkpoint, rows=1), device="cpu")
    assert alone.batcher is None
    (audio,) = list(alone.stream("hello there", VOICE, 1.0, 0))
    model: Any = VitsModel.from_pretrained(str(tiny_checkpoint), local_files_only=True)
    model.eval()
    model.noise_scale = model.noise_scale_duration = 0.0
    ids = VitsTokenizer.from_pretrained(str(tiny_checkpoint))("hello there", return_tensors="pt")
    with torch.inference_mode():
        expected = model(**ids).waveform[0].numpy()
    assert audio.tobytes() == expected.clip(-1, 1).astype("float32").tobytes()


async def test_a_batch_out_of_memory_is_split_with_the_same_bytes(
    engine: TorchEngine, batches: list[Dispatch]
) -> None:
    renderer = Renderer([engine], workers=1, metrics=Metrics(), max_queue=16)
    specs = [spec_of(engine, t) for t in random_texts(3, 2)]
    try:
        alone = [await render(renderer, engine, s) for s in specs]

        def fault(pieces: list[Piece]) -> None:  # as a GPU with room for one utterance
            if len(pieces) > 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

        engine.model.fault = fault
        batches.clear()
        split = await asyncio.gather(*(render(renderer, engine, s) for s in specs))
    finally:
        renderer.close()
    assert split == alone
    renders = [d for d in batches if d.reason == "retry"]
    assert renders and all(d.size < 3 for d in renders)


async def test_an_utterance_that_fails_fails_alone(
    engine: TorchEngine, batches: list[Dispatch]
) -> None:
    renderer = Renderer([engine], workers=1, metrics=Metrics(), max_queue=16)
    _, bad = random_texts(2, 3)
    specs = [spec_of(engine, t) for t in random_texts(2, 4)] + [spec_of(engine, bad)]
    try:
        alone = [await render(renderer, engine, s) for s in specs[:2]]
        bad_ids = next(iter(engine._pieces(bad, 1.0))).ids

        def fault(pieces: list[Piece]) -> None:
            if any(p.ids == bad_ids for p in pieces):
                raise RuntimeError("this utterance breaks the model (injected)")

        engine.model.fault = fault
        batches.clear()
        outcomes = await asyncio.gather(
            *(render(renderer, engine, s) for s in specs), return_exceptions=True
        )
    finally:
        renderer.close()
    assert outcomes[:2] == alone
    assert isinstance(outcomes[2], RenderError) and "injected" in str(outcomes[2])
    assert any(d.reason == "retry" for d in batches)


def test_a_lone_render_waits_for_its_window_and_no_longer(
    engine: TorchEngine, batches: list[Dispatch]
) -> None:
    (audio,) = list(engine.stream("a lone line", VOICE, 1.0, 0))
    assert audio.size
    (dispatch,) = batches
    assert dispatch.reason == "window" and dispatch.size == 1
    assert dispatch.waits[0] >= WINDOW_MS / 1000
    assert engine.batcher is not None and engine.batcher.clock() >= dispatch.deadline


def test_identity_names_the_device_the_batch_and_the_buckets(tiny_checkpoint: Path) -> None:
    checkpoint = read(str(tiny_checkpoint))
    base = settings(tiny_checkpoint)
    ids = {
        model_id(VOICE, checkpoint, Layout.of(base, "cpu")),
        model_id(VOICE, checkpoint, Layout.of(base, "cuda")),
        model_id(VOICE, checkpoint, Layout.of(settings(tiny_checkpoint, rows=8), "cpu")),
        model_id(VOICE, checkpoint, Layout.of(settings(tiny_checkpoint, buckets=(32, 512)), "cpu")),
        model_id(VOICE, checkpoint, Layout.of(settings(tiny_checkpoint, rows=1), "cpu")),
    }
    assert len(ids) == 5
    assert all(i.startswith(f"torch-{VOICE}.") and i.endswith(f"@{checkpoint.sha256}") for i in ids)
    # Without batching the CPU's renders are the model's own: no buckets in the name.
    assert model_id(VOICE, checkpoint, Layout.of(TorchSettings(VOICE, "x"), "cpu")).startswith(
        f"torch-{VOICE}.cpu-b1@"
    )


def test_frame_buckets_pad_by_less_than_half() -> None:
    assert [frame_ladder(n) for n in (1, 16, 17, 24, 25, 33, 100)] == [16, 16, 24, 24, 32, 48, 128]
    for frames in range(1, 5000, 7):
        assert frames <= frame_ladder(frames) < 1.5 * frames + 16


def test_torch_tables_are_validated(tmp_path: Path, tiny_checkpoint: Path) -> None:
    def origin(table: str) -> Path:
        path = tmp_path / "origin.toml"
        path.write_text(f'role = "origin"\n[[torch]]\n{table}\n', encoding="utf-8")
        return path

    good = load(origin(f'voice = "{VOICE}"\ncheckpoint = "{tiny_checkpoint}"'), Role.ORIGIN)
    assert good.torch[0].batch("cpu").max_batch == 1  # the CPU does not batch by default
    assert good.torch[0].batch("cuda").max_batch == 32
    for table, complaint in [
        (f'voice = "{VOICE}"\ncheckpoint = "x"\ndevice = "tpu"', "device"),
        (f'voice = "{VOICE}"\ncheckpoint = "x"\nbuckets = [128, 64]', "buckets"),
        (f'voice = "{VOICE}"\ncheckpoint = "x"\ncuda_max_batch = 0', "cuda_max_batch"),
        (f'voice = "{VOICE}"\ncheckpoint = "x"\ncpu_window_ms = -1.0', "cpu_window_ms"),
        ('checkpoint = "x"', "voice"),
        (f'voice = "{VOICE}"\ncheckpoint = "x"\nwindow = 5', "unknown setting"),
    ]:
        with pytest.raises(ConfigError, match=complaint):
            load(origin(table), Role.ORIGIN)


def test_a_batching_voice_belongs_to_one_worker(tmp_path: Path, tiny_checkpoint: Path) -> None:
    config = NodeConfig(
        role=Role.ORIGIN, data_dir=tmp_path, workers=4, torch=(settings(tiny_checkpoint),)
    )
    siblings = Siblings(config, make_keyring(), Metrics().registry, 0)
    model = for_config(config)[VOICE].model_id
    specs = [
        Spec.create(text=f"line {n}", voice=VOICE, format=AudioFormat.WAV, model=model)
        for n in range(40)
    ]
    assert len({siblings.owner_of_spec(s) for s in specs}) == 1
    assert len({siblings.owner(s.key) for s in specs}) > 1  # what keys alone would give


async def test_an_origin_serves_a_torch_voice_in_batches(
    aiohttp_client: Any, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    from nearvoice.origin.app import create_origin_app

    config = NodeConfig(
        role=Role.ORIGIN,
        data_dir=tmp_path / "origin",
        synth=SynthSettings(workers=1, voices=()),
        torch=(settings(tiny_checkpoint),),
        recency_flush=3600.0,
    )
    keyring = make_keyring()
    client = await aiohttp_client(create_origin_app(config, keyring))
    await wait_ready(client)
    assert await metric(client, "nearvoice_batch_size_count", engine="torch") == 2  # warm-up
    model = for_config(config)[VOICE].model_id
    texts = random_texts(4, 5)

    async def fetch(text: str) -> tuple[int, bytes, str | None]:
        spec = Spec.create(text=text, voice=VOICE, format=AudioFormat.WAV, model=model)
        async with client.get(sign(keyring, spec)) as resp:
            return resp.status, await resp.read(), resp.headers.get("Content-Length")

    answers = await asyncio.gather(*(fetch(t) for t in texts))
    assert all(status == 200 and body[:4] == b"RIFF" for status, body, _ in answers)
    assert all(length == str(len(body)) for _, body, length in answers)  # exact from the start
    again = await fetch(texts[0])  # a hit now, the same object
    assert again[1] == answers[0][1]
    scraped = await scrape_until(
        client,
        lambda text: 'nearvoice_synth_total{engine="torch"} 4.0' in text,
    )
    assert 'nearvoice_batch_size_bucket{engine="torch",le="4.0"}' in scraped
    # Warm-up (its pass and render: 2 batches), then the four renders' passes and renders,
    # which arrived within one window: at most two batches for eight pieces of work.
    batched = await metric(client, "nearvoice_batch_size_sum", engine="torch")
    count = await metric(client, "nearvoice_batch_size_count", engine="torch")
    assert batched == 2 + 8 and count <= 2 + 2 + 2  # some of the four may miss a window
    assert await metric(client, "nearvoice_synth_seconds_count") == 4  # per utterance


def test_an_edge_never_imports_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from nearvoice.edge.app import create_app\n"
        "from nearvoice.edge.config import load\n"
        "from nearvoice.edge.voices import for_config\n"
        "from nearvoice.origin.app import torch_engines\n"
        "config = load(None)\n"
        "for_config(config); torch_engines(config)\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
