"""A `[[torch]]` voice without torch: its settings, the fixed shapes its batches run at,
and the model identity its specs carry (DESIGN.md section 2).

Batch invariance. A spec must render to the same bytes whatever shares its batch and
however full the batch is: objects are immutable, and a re-render after eviction must
match what was delivered. Floating-point kernels choose their blocking and reduction
order by the shapes they are given, and VITS's vocoder is convolutional, so audio near an
utterance's end depends on how much padding follows it. Every tensor an utterance passes
through therefore has a shape that depends only on that utterance:

* the batch dimension is always `max_batch` rows (unused rows are padding);
* the text dimension is the smallest of `buckets` that holds the utterance's own tokens
  (only utterances of one bucket share a batch);
* the frame dimension is the smallest step of a fixed ladder (`frame_bucket`) that holds
  the utterance's own predicted frames (the batch's utterances are decoded in groups of
  one frame bucket).

Without batching (`max_batch` 1, the CPU's default) an utterance runs alone at its own
lengths, exactly as an unbatched model would. The device, `max_batch` and the buckets are
part of the model identity (`model_id`), so an origin on the CPU and one on a GPU, or two
with other batch layouts, never claim one key for different bytes.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from nearvoice.edge.checks import ConfigError, between, one_of, require
from nearvoice.edge.synth.batching import BatchSettings

ENGINE_NAME = "torch"
CONTROLS = frozenset(("duration",))
"""Durations fit through the duration pass (the text stage); a character vocabulary takes
no phoneme hints."""
DEVICES = ("auto", "cuda", "cpu")
LAYOUT_REVISION = 1
"""Version of the rules below (padding, frame ladder): part of the identity, so a change
to them names new objects instead of serving other bytes under old keys."""
FRAME_LADDER_BASE = 16
"""Smallest frame bucket; the ladder goes 16, 24, 32, 48, 64, 96 ... (x1.5, x1.33)."""
MAX_ROWS = 1024
MAX_WINDOW_MS = 1000.0


@dataclass(frozen=True, slots=True)
class TorchSettings:
    """`[[torch]]`: a transformers VITS checkpoint the origin renders with torch."""

    voice: str = ""
    """The voice name specs and URLs carry."""
    checkpoint: str = ""
    """Local directory of a `VitsModel` checkpoint (config.json, weights, vocab.json and
    tokenizer_config.json), as `nearvoice export from-transformers` takes."""
    device: str = "auto"
    """"auto" (CUDA when torch sees a GPU, else the CPU), "cuda" or "cpu"."""
    buckets: tuple[int, ...] = (64, 128, 256, 512, 1024)
    """Text lengths in tokens an utterance is padded up to when batching; longer text is
    cut into pieces that fit the largest."""
    cuda_max_batch: int = 32
    """Most utterances in one batch on a GPU."""
    cuda_window_ms: float = 5.0
    """Milliseconds a render on a GPU waits for batch-mates."""
    cpu_max_batch: int = 1
    """Most utterances in one batch on the CPU; 1 (the default) is no batching, since
    batches measured slower there."""
    cpu_window_ms: float = 0.0
    """Milliseconds a render on the CPU waits for batch-mates (with cpu_max_batch > 1)."""
    threads: int = 0
    """torch intra-op threads on the CPU; 0: one per render without batching (the
    inference threads run side by side, as onnxruntime's do), every core with batching
    (one batch at a time)."""

    def validate(self) -> None:
        require(bool(self.voice), "voice", "must not be empty")
        require(bool(self.checkpoint), "checkpoint", "must not be empty")
        one_of(self, "device", DEVICES)
        require(bool(self.buckets), "buckets", "must name at least one length")
        require(
            list(self.buckets) == sorted(set(self.buckets)),
            "buckets",
            f"must be strictly increasing, not {list(self.buckets)}",
        )
        require(
            self.buckets[0] >= 8, "buckets", f"must be at least 8 tokens, not {self.buckets[0]}"
        )
        for name in ("cuda_max_batch", "cpu_max_batch"):
            between(self, name, 1, MAX_ROWS)
        for name in ("cuda_window_ms", "cpu_window_ms"):
            between(self, name, 0, MAX_WINDOW_MS)
        between(self, "threads", 0, MAX_ROWS)

    def batch(self, device: str) -> BatchSettings:
        """The batching this voice gets on `device` ("cuda" or "cpu")."""
        if device == "cuda":
            return BatchSettings(self.cuda_max_batch, self.cuda_window_ms / 1000)
        return BatchSettings(self.cpu_max_batch, self.cpu_window_ms / 1000)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What a checkpoint directory says without loading it."""

    path: Path
    sha256: str
    """Over every file's name and bytes, in name order."""
    sample_rate: int


def checkpoint_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


@functools.lru_cache(maxsize=16)
def read_checkpoint(path: str) -> Checkpoint:
    """The checkpoint at `path` (hashed once per process); ConfigError when it is not a
    VITS checkpoint."""
    root = Path(path)
    config = root / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"[[torch]] checkpoint {path}: cannot read config.json: {exc}") from None
    if not isinstance(data, dict) or data.get("model_type") != "vits":
        kind = data.get("model_type") if isinstance(data, dict) else None
        raise ConfigError(f"[[torch]] checkpoint {path} is a {kind!r} model, not 'vits'")
    if int(data.get("num_speakers", 1)) > 1:
        raise ConfigError(f"[[torch]] checkpoint {path} has several speakers; one is supported")
    return Checkpoint(root, checkpoint_sha256(root), int(data.get("sampling_rate", 16000)))


@dataclass(frozen=True, slots=True)
class Layout:
    """The fixed shapes of one voice's batches on one device."""

    device: str
    batch: BatchSettings
    buckets: tuple[int, ...]

    @classmethod
    def of(cls, settings: TorchSettings, device: str) -> Layout:
        batch = settings.batch(device)
        return cls(device, batch, settings.buckets if batch.batching else ())

    @property
    def rows(self) -> int:
        return self.batch.max_batch

    @property
    def max_tokens(self) -> int | None:
        """Longest piece of text in tokens (None: unbounded, no batching)."""
        return self.buckets[-1] if self.buckets else None

    def text_bucket(self, tokens: int) -> int:
        """The text length an utterance of `tokens` runs at."""
        if not self.buckets:
            return tokens
        for bucket in self.buckets:
            if tokens <= bucket:
                return bucket
        raise ValueError(f"{tokens} tokens is more than the largest bucket ({self.buckets[-1]})")

    def frame_bucket(self, frames: int) -> int:
        """The frame length an utterance of `frames` is decoded at."""
        if not self.buckets:
            return frames
        return frame_ladder(frames)

    def identity(self) -> str:
        """What of the layout goes into the model id: `cuda-b32-t64_128_256-l1`."""
        if not self.batch.batching:
            return f"{self.device}-b1"
        tokens = "_".join(str(b) for b in self.buckets)
        return f"{self.device}-b{self.rows}-t{tokens}-l{LAYOUT_REVISION}"


def frame_ladder(frames: int) -> int:
    """The smallest of 16, 24, 32, 48, 64, 96 ... that is at least `frames`: padding
    stays under half an utterance, and a batch's utterances fall into few groups."""
    size = FRAME_LADDER_BASE
    while True:
        if frames <= size:
            return size
        if frames <= size * 3 // 2:
            return size * 3 // 2
        size *= 2


def model_id(voice: str, checkpoint: Checkpoint, layout: Layout) -> str:
    return f"{ENGINE_NAME}-{voice}.{layout.identity()}@{checkpoint.sha256}"


def resolve_device(setting: str) -> str:
    """ "cuda" or "cpu" for a `device` setting; "auto" asks torch (imported only here)."""
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def batched_voices(settings: tuple[TorchSettings, ...]) -> frozenset[str]:
    """The `[[torch]]` voices that batch on the device each resolves to."""
    return frozenset(s.voice for s in settings if s.batch(resolve_device(s.device)).batching)


def check_unique(settings: tuple[TorchSettings, ...]) -> None:
    names = [s.voice for s in settings]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"[[torch]] defines voice(s) {twice} more than once")
