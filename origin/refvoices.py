"""Reference voices for zero-shot cloning (docs/contracts.md#reference-voices, a contract),
kept in the origin's object store.

A clip arrives as wav, flac, mp3 or ogg (decoded with libsndfile through soundfile, or
with ffmpeg for what libsndfile does not read), is checked, and is stored once in one
canonical form: 24 kHz mono 16-bit PCM WAV (several channels are averaged). Its id is
`ref_` + the SHA-256 of that canonical WAV, so uploading the same clip again (in any of
the formats, as long as it decodes to the same samples) gives the same id, and a spec that
names the id binds that hash: a replaced clip never serves audio cloned from the old one.

Each check has its own error code: `not_audio` (nothing decodes), `clip_too_short` and
`clip_too_long` (outside 3-30 s), `clip_silent` (RMS below -50 dBFS) and, over 10 MB
before decoding, `clip_too_large` (413).

The clip is an object of the store like the renders (filesystem or S3), under its hash.
Next to it, an index object lists the keys of the objects rendered from it, so that
deleting the voice can purge them from every tier; the index lives under the SHA-256 of
`renders:<clip hash>`, a key no spec can have. A clip never leaves the origin tier: edges
and shields only ever see its id and hash in specs. Engines that keep copies of clips
(the IndexTTS2 adapter's shared directory) are told of each deletion (`on_delete`), so a
deleted voice leaves no copy behind.

Blocking: every method here does I/O or decoding; callers run them in an executor.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from nearvoice.edge.cache.meta import ObjectMeta
from nearvoice.edge.policy import Policy
from nearvoice.edge.producer import PersistentStore

log = logging.getLogger("nearvoice.origin.refvoices")
CANONICAL_RATE = 24000  # Hz of the stored clip
MIN_SECONDS = 3.0
MAX_SECONDS = 30.0
MAX_BYTES = 10 * 1024 * 1024  # of the clip as uploaded
SILENCE_DBFS = -50.0  # a clip quieter than this (RMS) holds no voice to clone
KEEP_SECONDS = 100 * 365 * 86400  # the store's ttl field: a clip stays until deleted
FFMPEG_TIMEOUT = 30.0  # seconds to decode one clip
REF_RE = re.compile(r"ref_([0-9a-f]{64})")
WAV_HEADER = 44  # bytes of a canonical WAV's header (RIFF, fmt, data)


class ClipError(ValueError):
    """A clip refused; `code` is the JSON error code and `status` the HTTP status."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass(frozen=True, slots=True)
class RefVoice:
    id: str
    sha256: str
    seconds: float

    def describe(self) -> dict[str, object]:
        return {"id": self.id, "sha256": self.sha256, "seconds": self.seconds}


def ref_id(sha256: str) -> str:
    return f"ref_{sha256}"


def sha_of(ref: str) -> str | None:
    match = REF_RE.fullmatch(ref)
    return match.group(1) if match else None


def decode(data: bytes) -> tuple[npt.NDArray[np.float32], int]:
    """Float32 frames x channels and the rate; raises ClipError `not_audio`."""
    import soundfile

    try:
        # As integers: libsndfile scales every integer format to int32 the same way, while
        # its float scaling differs between formats (WAV and FLAC of the same samples
        # would otherwise not make the same canonical clip).
        ints, rate = soundfile.read(io.BytesIO(data), dtype="int32", always_2d=True)
        audio: npt.NDArray[np.float32] = (ints / 2.0**31).astype(np.float32)
        return audio, int(rate)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError):
        pass
    return _ffmpeg_decode(data)


def _ffmpeg_decode(data: bytes) -> tuple[npt.NDArray[np.float32], int]:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise ClipError("not_audio", "the clip is not audio this origin can decode")
    command = [ffmpeg, "-v", "error", "-i", "pipe:0", "-f", "f32le", "-ac", "1"]
    command += ["-ar", str(CANONICAL_RATE), "pipe:1"]
    try:
        done = subprocess.run(command, input=data, capture_output=True, timeout=FFMPEG_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise ClipError("not_audio", "the clip took too long to decode") from exc
    if done.returncode != 0 or not done.stdout:
        raise ClipError("not_audio", "the clip is not audio (wav, flac, mp3 or ogg)")
    audio = np.frombuffer(done.stdout, dtype="<f4").astype(np.float32).reshape(-1, 1)
    return audio, CANONICAL_RATE


def canonical(data: bytes) -> tuple[bytes, float]:
    """The clip as a canonical WAV and its seconds; raises ClipError."""
    import soundfile

    from nearvoice.edge.synth.resample import Resampler

    if len(data) > MAX_BYTES:
        raise ClipError("clip_too_large", f"the clip is over {MAX_BYTES} bytes", 413)
    frames, rate = decode(data)
    if frames.size == 0 or rate <= 0:
        raise ClipError("not_audio", "the clip holds no audio")
    mono: npt.NDArray[np.float32] = frames.mean(axis=1, dtype=np.float32)
    seconds = len(mono) / rate
    if seconds < MIN_SECONDS:
        raise ClipError(
            "clip_too_short", f"the clip lasts {seconds:.2f} s; at least {MIN_SECONDS} s"
        )
    if seconds > MAX_SECONDS:
        raise ClipError("clip_too_long", f"the clip lasts {seconds:.2f} s; at most {MAX_SECONDS} s")
    rms = float(np.sqrt(np.mean(np.square(mono, dtype=np.float64))))
    level = 20 * math.log10(rms) if rms > 0 else -math.inf
    if level < SILENCE_DBFS:
        raise ClipError("clip_silent", f"the clip is silent ({level:.1f} dBFS RMS)")
    if rate != CANONICAL_RATE:
        resampler = Resampler(rate, CANONICAL_RATE)
        mono = np.concatenate([resampler.process(mono), resampler.flush()])
    pcm = np.clip(np.round(mono * 32767.0), -32768, 32767).astype("<i2")
    out = io.BytesIO()
    soundfile.write(out, pcm, CANONICAL_RATE, format="WAV", subtype="PCM_16")
    body = out.getvalue()
    return body, round(len(pcm) / CANONICAL_RATE, 2)


class RefVoices:
    """The registry over an origin's object store (blocking; see the module docstring)."""

    def __init__(self, store: PersistentStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        """Serializes index updates (read, add, write) in this process."""
        self._forgetters: list[Callable[[str], None]] = []

    def on_delete(self, forget: Callable[[str], None]) -> None:
        """Has `forget` called with a clip's hash once the clip is deleted (an engine that
        keeps copies of clips, to drop its own)."""
        self._forgetters.append(forget)

    def add(self, data: bytes) -> RefVoice:
        body, seconds = canonical(data)
        sha = hashlib.sha256(body).hexdigest()
        if self.store.get(sha) is None:
            self.store.put(_meta(sha, "audio/wav", body), body)
        return RefVoice(ref_id(sha), sha, seconds)

    def get(self, ref: str) -> RefVoice | None:
        found = self._clip(ref)
        if found is None:
            return None
        sha, body = found
        return RefVoice(ref, sha, round((len(body) - WAV_HEADER) / 2 / CANONICAL_RATE, 2))

    def clip(self, ref: str) -> bytes | None:
        """The canonical WAV of a registered voice."""
        found = self._clip(ref)
        return found[1] if found else None

    def _clip(self, ref: str) -> tuple[str, bytes] | None:
        sha = sha_of(ref)
        found = self.store.get(sha) if sha else None
        if sha is None or found is None:
            return None
        return sha, found[1]

    def sha256_of(self, ref: str) -> str | None:
        found = self._clip(ref)
        return found[0] if found else None

    def delete(self, ref: str) -> list[str] | None:
        """Removes the clip and its index; the keys rendered from it (None: no such voice)."""
        sha = sha_of(ref)
        if sha is None or not self.store.delete(sha):
            return None
        with self._lock:
            keys = self._rendered(sha)
            self.store.delete(_index_key(sha))
        for forget in self._forgetters:
            try:
                forget(sha)
            except OSError as exc:  # logged: the voice is deleted all the same
                log.warning("could not remove a copy of clip %s: %s", sha, exc)
        return keys

    def record(self, sha: str, key: str) -> None:
        """Notes that the object `key` was rendered from the clip `sha`."""
        with self._lock:
            keys = self._rendered(sha)
            if key in keys:
                return
            body = json.dumps([*keys, key]).encode()
            self.store.put(_meta(_index_key(sha), "application/json", body), body)

    def _rendered(self, sha: str) -> list[str]:
        found = self.store.get(_index_key(sha))
        if found is None:
            return []
        keys = json.loads(found[1])
        return [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []


def _index_key(sha: str) -> str:
    return hashlib.sha256(f"renders:{sha}".encode()).hexdigest()


def _meta(key: str, content_type: str, body: bytes) -> ObjectMeta:
    digest = hashlib.sha256(body).hexdigest()
    return ObjectMeta(
        key=key,
        content_type=content_type,
        length=len(body),
        etag=f'"{digest}"',
        sha256=digest,
        policy=Policy.HOT,
        stored_at=time.time(),
        ttl=KEEP_SECONDS,
    )
