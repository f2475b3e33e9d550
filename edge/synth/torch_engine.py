"""The origin's torch engine: a transformers `VitsModel` checkpoint (MMS-TTS and the like)
rendered with torch, on CUDA when torch sees a GPU and on the CPU otherwise, with dynamic
batching (edge.synth.batching) at the fixed shapes of edge.synth.torch_layout.

The model runs in two stages, as transformers' `VitsModel.forward` does, but with its
shapes pinned per utterance so that batch-mates never change an utterance's bytes:

1. text: the text encoder and the duration predictor over [rows, text bucket], giving each
   utterance its frame count (the duration pass is this stage alone, so the length a
   render announces is the one it produces);
2. audio: the flow and the HiFi-GAN vocoder over [rows, frame bucket], once per frame
   bucket present in the batch; each utterance's audio is cut from its row by its own
   length (frames x the vocoder's upsampling).

Noise is off (both noise scales 0), deterministic algorithms are on, TF32 is off and
cuDNN does not benchmark, so a spec renders the same bytes on every run. torch and
transformers are imported here only, when a `[[torch]]` table is configured: the edge
install stays free of them.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from nearvoice.edge.synth import capability
from nearvoice.edge.synth.batching import Batcher, BatchFailed, Dispatch, describe
from nearvoice.edge.synth.chunking import split_chunks
from nearvoice.edge.synth.engine import Audio
from nearvoice.edge.synth.torch_layout import (
    CONTROLS,
    ENGINE_NAME,
    Checkpoint,
    Layout,
    TorchSettings,
    checkpoint_sha256,
    model_id,
    read_checkpoint,
    resolve_device,
)
from nearvoice.edge.synth.vits_text import MAX_CHARS, chunks

if TYPE_CHECKING:
    from collections.abc import Callable

    from nearvoice.edge.spec import Spec

log = logging.getLogger("nearvoice.torch")

COUNT, RENDER = "count", "render"


class CheckpointChanged(RuntimeError):
    """The checkpoint's files changed while the engine loaded them."""


@dataclass(frozen=True, slots=True)
class Piece:
    """One utterance of a batch: token ids and its length scale (1 / speed)."""

    ids: tuple[int, ...]
    length_scale: float


def deterministic(device: str) -> None:
    """Process-wide torch settings for reproducible renders (set before CUDA starts)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


class VitsBatchModel:
    """A VitsModel run in the two stages above, at fixed shapes. Not thread-safe: one
    thread (the batcher's, or the render thread without batching) calls it at a time per
    batch; without batching each render thread calls it with its own inputs, which torch
    allows for inference."""

    def __init__(self, model: Any, layout: Layout, device: str) -> None:
        self.model = model
        self.layout = layout
        self.device = device
        self.upsampling = int(np.prod(model.config.upsample_rates))
        self.stochastic = bool(model.config.use_stochastic_duration_prediction)
        self.speaking_rate = float(getattr(model, "speaking_rate", 1.0) or 1.0)
        self.fault: Callable[[list[Piece]], None] | None = None
        """Fault injection for tests: called with each batch before it runs."""

    def _text(self, pieces: list[Piece]) -> tuple[Any, Any, Any, int]:
        """Stage 1: (durations [rows, 1, T], input mask [rows, 1, T], prior means
        [rows, T, C], T) for `pieces`, all of one text bucket, padded to `rows` rows."""
        import torch

        rows = max(self.layout.rows, len(pieces))
        width = self.layout.text_bucket(max(len(p.ids) for p in pieces))
        ids = torch.zeros((rows, width), dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.long)
        scales = torch.ones((rows, 1, 1), dtype=torch.float32)
        for row, piece in enumerate(pieces):
            ids[row, : len(piece.ids)] = torch.tensor(piece.ids, dtype=torch.long)
            mask[row, : len(piece.ids)] = 1
            scales[row, 0, 0] = piece.length_scale / self.speaking_rate
        mask[len(pieces) :, 0] = 1  # padding rows: one blank token, so nothing is empty
        ids, mask, scales = ids.to(self.device), mask.to(self.device), scales.to(self.device)
        model = self.model
        padding = mask.unsqueeze(-1).to(model.text_encoder.embed_tokens.weight.dtype)
        encoded = model.text_encoder(input_ids=ids, padding_mask=padding, attention_mask=mask)
        hidden = encoded.last_hidden_state.transpose(1, 2)
        padding = padding.transpose(1, 2)
        if self.stochastic:
            log_duration = model.duration_predictor(
                hidden, padding, None, reverse=True, noise_scale=0.0
            )
        else:
            log_duration = model.duration_predictor(hidden, padding, None)
        duration = torch.ceil(torch.exp(log_duration) * padding * scales)
        return duration, padding, encoded.prior_means, width

    @staticmethod
    def _frames(duration: Any, count: int) -> list[int]:
        import torch

        totals = torch.clamp_min(torch.sum(duration, [1, 2]), 1).long()
        return [int(v) for v in totals[:count].cpu()]

    def count(self, pieces: list[Piece]) -> list[int]:
        """The samples each piece renders to (stage 1 only)."""
        import torch

        with torch.inference_mode():
            duration, _, _, _ = self._text(pieces)
            return [f * self.upsampling for f in self._frames(duration, len(pieces))]

    def render(self, pieces: list[Piece]) -> list[Audio]:
        """Each piece's audio (both stages)."""
        import torch

        if self.fault is not None:
            self.fault(pieces)
        with torch.inference_mode():
            duration, padding, means, _ = self._text(pieces)
            frames = self._frames(duration, len(pieces))
            out: list[Audio | None] = [None] * len(pieces)
            groups: dict[int, list[int]] = {}
            for row, count in enumerate(frames):
                groups.setdefault(self.layout.frame_bucket(count), []).append(row)
            for length, members in sorted(groups.items()):
                audio = self._audio(duration, padding, means, members, length)
                for slot, row in enumerate(members):
                    samples = frames[row] * self.upsampling
                    out[row] = np.ascontiguousarray(audio[slot, :samples])
        return [a for a in out if a is not None]

    def _audio(
        self, duration: Any, padding: Any, means: Any, members: list[int], length: int
    ) -> Any:
        """Stage 2 for the rows `members` of a batch, all of one frame bucket `length`,
        padded to `rows` rows of zeros: float32 audio [len(members), length x upsampling]
        on the host."""
        import torch
        from torch import nn

        rows = max(self.layout.rows, len(members))
        pick = torch.tensor(members, dtype=torch.long, device=duration.device)
        width = duration.shape[-1]
        dur = torch.zeros((rows, 1, width), dtype=duration.dtype, device=duration.device)
        pad = torch.zeros_like(dur)
        prior = torch.zeros((rows, width, means.shape[-1]), dtype=means.dtype, device=means.device)
        dur[: len(members)] = duration.index_select(0, pick)
        pad[: len(members)] = padding.index_select(0, pick)
        prior[: len(members)] = means.index_select(0, pick)
        totals = torch.sum(dur, [1, 2]).long()
        indices = torch.arange(length, device=dur.device)
        out_mask = (indices.unsqueeze(0) < totals.unsqueeze(1)).unsqueeze(1).to(pad.dtype)
        attn_mask = torch.unsqueeze(pad, 2) * torch.unsqueeze(out_mask, -1)
        cumulative = torch.cumsum(dur, -1).view(rows * width, 1)
        valid = (indices.to(dur.dtype).unsqueeze(0) < cumulative).to(attn_mask.dtype)
        valid = valid.view(rows, width, length)
        padded = valid - nn.functional.pad(valid, [0, 0, 1, 0, 0, 0])[:, :-1]
        attn = padded.unsqueeze(1).transpose(2, 3) * attn_mask
        prior_means = torch.matmul(attn.squeeze(1), prior).transpose(1, 2)
        latents = self.model.flow(prior_means, out_mask, None, reverse=True)
        waveform = self.model.decoder(latents * out_mask, None).squeeze(1)
        return waveform[: len(members)].float().cpu().numpy()


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError)


def _release() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class TorchEngine:
    """One `[[torch]]` voice. Renders cut the text into pieces (sentences, then pieces
    that fit the largest text bucket) and hand each piece to the voice's batcher, which
    runs it with whatever else arrived within the window; without batching each render
    thread runs its pieces itself."""

    name = ENGINE_NAME
    controls = CONTROLS

    def __init__(
        self,
        settings: TorchSettings,
        device: str | None = None,
        on_batch: Callable[[Dispatch], None] | None = None,
    ) -> None:
        import torch
        from transformers import VitsModel, VitsTokenizer

        self.settings = settings
        self.device = device or resolve_device(settings.device)
        deterministic(self.device)
        self.layout = Layout.of(settings, self.device)
        checkpoint: Checkpoint = read_checkpoint(settings.checkpoint)
        path = str(checkpoint.path)
        tokenizer = VitsTokenizer.from_pretrained(path, local_files_only=True)
        if getattr(tokenizer, "phonemize", False) or getattr(tokenizer, "is_uroman", False):
            raise ValueError(
                f"[[torch]] {settings.voice}: the tokenizer phonemizes or romanizes text; "
                "only character tokenizers are supported"
            )
        model: Any = VitsModel.from_pretrained(path, local_files_only=True)
        model.eval()
        if checkpoint_sha256(checkpoint.path) != checkpoint.sha256:
            raise CheckpointChanged(f"{path} changed while it was loaded; start again")
        model.noise_scale = 0.0
        model.noise_scale_duration = 0.0
        threads = settings.threads or (os.cpu_count() or 1 if self.layout.batch.batching else 1)
        if self.device == "cpu":
            torch.set_num_threads(threads)
        self._tokenizer = tokenizer
        self._tokenizer_lock = threading.Lock()
        self.model = VitsBatchModel(model.to(self.device), self.layout, self.device)
        self.voices: tuple[str, ...] = (settings.voice,)
        self.sample_rate: int = checkpoint.sample_rate
        self._model_id = model_id(settings.voice, checkpoint, self.layout)
        self.provider = self.device
        self.batcher: Batcher[tuple[str, Piece], Any] | None = None
        if self.layout.batch.batching:
            self.batcher = Batcher(
                self._run,
                self.layout.batch,
                name=f"batch-{settings.voice}",
                is_oom=_is_oom,
                release=_release,
                on_dispatch=on_batch,
            )
        where = torch.cuda.get_device_name() if self.device == "cuda" else "the CPU"
        log.info(
            "torch voice %s on %s (%s): %s, %d torch threads",
            settings.voice,
            self.device,
            where,
            describe(self.layout.batch),
            torch.get_num_threads(),
        )

    # -- the batch's work -----------------------------------------------------------------
    def _run(self, jobs: list[tuple[str, Piece]]) -> list[Any]:
        """One batch, all of one kind and text bucket (the batcher's key)."""
        kind = jobs[0][0]
        pieces = [piece for _, piece in jobs]
        if kind == COUNT:
            return list(self.model.count(pieces))
        return list(self.model.render(pieces))

    def _submit(self, kind: str, piece: Piece) -> Future[Any]:
        if self.batcher is None:
            done: Future[Any] = Future()
            done.set_result(self._run([(kind, piece)])[0])
            return done
        key = (kind, self.layout.text_bucket(len(piece.ids)))
        return self.batcher.submit(key, (kind, piece))

    def _result(self, future: Future[Any]) -> Any:
        try:
            return future.result()
        except BatchFailed as exc:
            raise RuntimeError(f"{self.name} voice {self.voices[0]}: {exc}") from None

    # -- the Engine protocol --------------------------------------------------------------
    def _pieces(self, text: str, speed: float) -> Iterator[Piece]:
        limit = MAX_CHARS
        if self.layout.max_tokens is not None:
            limit = min(limit, max(1, (self.layout.max_tokens - 1) // 2))
        for chunk in (piece for part in split_chunks(text) for piece in chunks(part, limit)):
            with self._tokenizer_lock:
                ids = list(self._tokenizer(chunk)["input_ids"])
            if not any(ids):
                continue  # nothing the vocabulary can say (blanks only)
            if self.layout.max_tokens is not None:
                ids = ids[: self.layout.max_tokens]
            yield Piece(tuple(ids), 1.0 / speed)

    def _check(self, voice: str, speed: float) -> None:
        if voice not in self.voices:
            raise ValueError(f"voice {voice!r} is not one of this engine's {self.voices}")
        if not speed > 0:
            raise ValueError(f"speed must be positive, not {speed}")

    def model_id(self, voice: str) -> str:
        return self._model_id

    def refuses(self, spec: Spec) -> str | None:
        return capability.refused(spec, self.controls)

    @property
    def frame_samples(self) -> int:
        """Samples per duration frame: the vocoder's upsampling."""
        return self.model.upsampling

    @property
    def max_batch(self) -> int:
        return self.layout.batch.max_batch

    def estimated_wait(self) -> float | None:
        """Seconds until a piece submitted now would run (None without batching)."""
        return None if self.batcher is None else self.batcher.estimated_wait()

    def warmup(self) -> None:
        voice = self.voices[0]
        counted = self.samples("Warm up.", voice, 1.0)
        rendered = sum(len(a) for a in self.stream("Warm up.", voice, 1.0, 0))
        if counted is not None and counted != rendered:
            raise RuntimeError(f"duration pass says {counted} samples, the render {rendered}")

    def stream(self, text: str, voice: str, speed: float, seed: int) -> Iterator[Audio]:
        self._check(voice, speed)
        for piece in self._pieces(text, speed):
            rendered = self._result(self._submit(RENDER, piece))
            audio: Audio = np.clip(rendered, -1.0, 1.0).astype(np.float32)
            yield audio

    def samples(self, text: str, voice: str, speed: float) -> int | None:
        self._check(voice, speed)
        # Every piece's count is queued at once, so they share batches.
        futures = [self._submit(COUNT, piece) for piece in self._pieces(text, speed)]
        return sum(int(self._result(future)) for future in futures)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
