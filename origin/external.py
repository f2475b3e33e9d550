"""An engine that renders through another TTS server over HTTP
(docs/contracts.md#voices-in-the-default-install).

An origin can put a heavy model it cannot run itself, say a zero-shot model on a GPU box,
behind the same Engine interface as the bundled ONNX voices. Two wire formats:

openai  `POST {base_url}/v1/audio/speech` with JSON `{"model", "input", "voice",
        "response_format": "pcm", "speed"}`, the OpenAI-compatible endpoint most TTS
        servers offer. The answer is raw s16le mono PCM (OpenAI's is 24 kHz; other
        servers differ, and nothing in the answer says which, so `sample_rate` is
        configuration). The body is read as it arrives, one chunk at a time, and yielded
        as float32 arrays of MIN_CHUNK_SECONDS..MAX_CHUNK_SECONDS, so the renderer
        encodes and delivers the first sentence while the server still renders the
        rest; a sample split across two network chunks is put back together.
piper   `POST {base_url}/synthesize` to piper's own HTTP server (`python -m
        piper.http_server`), JSON `{"text", "voice", "length_scale", "noise_scale",
        "noise_w_scale"}`. The answer is a whole WAV file (piper's HTTP API does not
        stream), yielded as one array. Its header's rate must equal `sample_rate`: a
        mismatch raises rather than deliver audio at the wrong speed. `speed` becomes
        `length_scale = 1 / speed`, i.e. relative to a voice whose configured length
        scale is 1 (joe's is): the server's API replaces the voice's own length scale
        rather than scaling it. Both noise scales are sent as 0, so, like the local
        PiperEngine, the same text and speed give the same samples every time.
        Quirks of piper's server: it peak-normalizes every sentence to full scale (its
        SynthesisConfig keeps normalize_audio on, and the API cannot turn it off), so
        its audio is louder than the local engine's and is not byte-identical to it;
        and it renders an unknown `voice` with its default voice, with only a warning
        in its log, which is why `warmup` checks every remote voice in `GET /voices`.

indextts2
        `POST {base_url}/tts_url` to index-tts-vllm's API server (how IndexTTS2 is usually
        deployed), JSON `{"text", "audio_paths": [path]}` answered with a whole WAV. The
        speaker is a reference clip the server reads from a path: for a spec with a `ref`,
        the adapter writes the registered clip (from the origin's object store, which
        may be S3) into `clip_dir`, a directory shared with the server, as
        `<sha256>.wav`, and sends its path as the server sees it (`remote_clip_dir`);
        without a `ref`, the voice's `remote` is the server's own clip path. IndexTTS2's
        controls go along under their own names: `emo_vector` and `emo_alpha` (a label
        of the eight is sent as a one-hot vector), `emo_text` with `use_emo_text` (other
        labels too, as text), and IndexTTS 2.5's `duration_factor` (the spec's duration
        over `seconds_per_char` per character: the server decides the length, and the
        renderer measures what it achieved in `nearvoice_duration_error_ratio`). The v2
        server's own names are sent as well (`spk_audio_path`, `emo_control_method`,
        `emo_vec`, `emo_weight`), so either generation of the server understands.

Controls: what a server honours is configuration (`controls`; none by default), and a spec
with a control it does not declare never reaches it (edge.synth.capability). Engines here
take whole specs (`stream_spec`, edge.synth.engine.SpecEngine): the OpenAI wire sends an
emotion text (or label) as `instructions`, where the server takes it; it has no field for
an emotion vector, which is refused (`unsupported_control`). Each wire accepts only the
controls it can carry (`WIRE_CONTROLS`). A spec whose `ref` is no longer registered (or
whose clip's hash is not the one the spec binds) is refused with `unknown_ref` (410)
before the server is asked, and a deleted voice's clip is removed from `clip_dir`.

Identity: a spec names its model, and a remote model's bytes are out of reach, so each
voice's `model_id` is configured by the operator (`<engine>-<voice>@<hash or version>`)
and must change whenever the server's model does (docs/contracts.md#spec-and-key).

Determinism: the Engine contract says the same arguments give the same samples. `seed`
is not sent (the OpenAI wire format has no such field, and not every server accepts
unknown ones); a zero-shot model is usually seeded server-side, so determinism is the
server's to keep. With piper it holds (no noise, see above).

Transport: the stdlib's blocking urllib, called in the renderer's inference threads
(`stream` is a blocking generator). `timeout` is the socket timeout of each blocking
step (connecting, each read), not a bound on the whole render, so a long render that
keeps streaming is not cut off. Connections go straight to `base_url`: *_proxy
variables in the environment are ignored. A bearer token, if any, comes from the
environment variable named by `api_key_env`, read at every request (never from a config
file), and is sent with both protocols (a proxy in front of piper may want one).

Errors: refused connections, timeouts, answers other than 200, cut-off bodies and
malformed audio raise ExternalEngineError, a RuntimeError carrying the HTTP status when
there was one; the renderer turns it into a RenderError (a 503 or an upstream fallback).
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import re
import tempfile
import urllib.error
import urllib.request
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from typing import Protocol as Interface

import numpy as np

from nearvoice.edge.spec import CONTROLS, EMOTIONS, Spec
from nearvoice.edge.synth import capability
from nearvoice.edge.synth.engine import Audio
from nearvoice.edge.synth.renderer import RenderRefused

Protocol = Literal["openai", "piper", "indextts2"]
PROTOCOLS: tuple[Protocol, ...] = ("openai", "piper", "indextts2")

WIRE_CONTROLS: dict[Protocol, frozenset[str]] = {
    "openai": frozenset(("emotion", "lang", "ipa", "pinyin")),
    "piper": frozenset(("lang", "ipa")),
    "indextts2": frozenset(("duration", "emotion", "ref", "lang", "ipa", "pinyin")),
}
"""Controls each wire can carry to its server (emotion reaches an OpenAI-compatible server
as `instructions`; the others ride in the text). A server may declare fewer."""

MIN_CHUNK_SECONDS = 0.2
"""A streamed array is yielded once at least this much audio has arrived..."""
MAX_CHUNK_SECONDS = 0.5
"""...and holds at most this much."""
READ_SIZE = 32768
"""Bytes asked of the socket per read: one network chunk or less."""
EXCERPT_CHARS = 200
"""How much of an error answer's body an ExternalEngineError quotes."""
WARMUP_TEXT = "Warm up."
PCM16_SCALE = 32768.0

_MODEL_ID = re.compile(r"[^@\s]+@[^@\s]+")


class ClipSource(Interface):
    """The origin's reference voices (origin.refvoices.RefVoices), as engines need them."""

    def clip(self, ref: str) -> bytes | None:
        """The canonical WAV of a registered voice; None when it is not (or no longer)."""
        ...

    def record(self, sha: str, key: str) -> None:
        """Notes that object `key` is rendered from clip `sha` (purged with it)."""
        ...

    def on_delete(self, forget: Callable[[str], None]) -> None:
        """Has `forget` called with a clip's hash once that clip is deleted."""
        ...


class ExternalEngineError(RuntimeError):
    """The external server could not be reached or gave no usable audio. `status` is the
    HTTP status when the server answered, else None."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class ExternalVoice:
    """One voice rendered by an external server."""

    name: str
    """The nearvoice voice name, e.g. `indextts-alice`."""
    remote: str
    """The server's own voice id: OpenAI's `voice`, piper's `voice` (its model's name)."""
    model_id: str
    """Identity in specs, `<engine>-<voice>@<hash or version>`; configured by the operator,
    and it must change when the server's model does."""
    remote_model: str = "tts-1"
    """OpenAI's `model` field (openai protocol only); many servers ignore it."""


class Pcm16Chunker:
    """s16le mono bytes, in pieces of any size, to float32 arrays of `min_samples` to
    `max_samples` samples (the last may be shorter). An odd byte at the end of a piece
    waits for the next one."""

    def __init__(self, min_samples: int, max_samples: int) -> None:
        if not 0 < min_samples <= max_samples:
            raise ValueError("need 0 < min_samples <= max_samples")
        self._min = min_samples
        self._max = max_samples
        self._pending = bytearray()

    def feed(self, data: bytes) -> list[Audio]:
        self._pending += data
        return self._take(self._min)

    def finish(self) -> list[Audio]:
        """What is left. Raises ExternalEngineError if half a sample is."""
        if len(self._pending) % 2:
            raise ExternalEngineError("PCM stream ended in the middle of a sample")
        return self._take(1)

    def _take(self, at_least: int) -> list[Audio]:
        out: list[Audio] = []
        while len(self._pending) // 2 >= at_least:
            samples = min(len(self._pending) // 2, self._max)
            out.append(pcm16_to_float(bytes(self._pending[: samples * 2])))
            del self._pending[: samples * 2]
        return out


def pcm16_to_float(data: bytes) -> Audio:
    """s16le bytes to float32 in [-1, 1): sample / 32768, exact and reversible."""
    audio: Audio = np.frombuffer(data, dtype="<i2").astype(np.float32) / np.float32(PCM16_SCALE)
    return audio


def _excerpt(body: bytes) -> str:
    text = " ".join(body.decode("utf-8", "replace").split())
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "..."


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ExternalEngine:
    """Renders through an external TTS server; see the module docstring.

    Holds no connection or per-thread state: each render is one request, so any number of
    inference threads can share an instance.
    """

    provider = "remote"
    """What `nearvoice_engine_provider` reports: the execution happens elsewhere."""

    def __init__(
        self,
        *,
        base_url: str,
        protocol: Protocol,
        voices: list[ExternalVoice],
        sample_rate: int,
        timeout: float = 30.0,
        api_key_env: str | None = None,
        name: str | None = None,
        controls: frozenset[str] = frozenset(),
        clips: ClipSource | None = None,
        clip_dir: str | None = None,
        remote_clip_dir: str | None = None,
        seconds_per_char: float = 0.065,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
        if not re.match(r"https?://[^/]", base_url):
            raise ValueError(f"base_url must be an http:// or https:// URL, not {base_url!r}")
        if not voices:
            raise ValueError("an external engine needs at least one voice")
        names = [v.name for v in voices]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate voice names: {names}")
        bad = [v.model_id for v in voices if not _MODEL_ID.fullmatch(v.model_id)]
        if bad:
            raise ValueError(f"model ids must look like '<engine>-<voice>@<version>': {bad}")
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, not {sample_rate}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        self.name: str = name or f"external-{protocol}"
        self.protocol: Protocol = protocol
        self.base_url = base_url.rstrip("/")
        self.sample_rate: int = sample_rate
        self.voices: tuple[str, ...] = tuple(names)
        self.timeout = timeout
        self.api_key_env = api_key_env
        self._voices = {v.name: v for v in voices}
        unknown = sorted(set(controls) - CONTROLS)
        if unknown:
            raise ValueError(f"unknown controls {unknown}; known: {sorted(CONTROLS)}")
        unsent = sorted(set(controls) - WIRE_CONTROLS[protocol])
        if unsent:
            raise ValueError(f"the {protocol} wire cannot carry the controls {unsent}")
        self.controls: frozenset[str] = frozenset(controls)
        """What the configured server supports (configuration: the server cannot say)."""
        if "ref" in self.controls and protocol == "indextts2" and not clip_dir:
            raise ValueError("an indextts2 server that clones needs clip_dir (shared with it)")
        if not seconds_per_char > 0:
            raise ValueError(f"seconds_per_char must be positive, not {seconds_per_char}")
        self.clips = clips
        self.clip_dir = Path(clip_dir) if clip_dir else None
        self.remote_clip_dir = remote_clip_dir or clip_dir
        self.seconds_per_char = seconds_per_char
        if clips is not None and self.clip_dir is not None:
            clips.on_delete(self.forget_clip)

    def forget_clip(self, sha256: str) -> None:
        """Removes a deleted voice's clip from the directory shared with the server: a
        deleted voice leaves no copy behind (blocking; a render already reading it keeps
        its open file)."""
        if self.clip_dir is not None:
            (self.clip_dir / f"{sha256}.wav").unlink(missing_ok=True)

    def _voice(self, voice: str) -> ExternalVoice:
        found = self._voices.get(voice)
        if found is None:
            raise ValueError(f"voice {voice!r} is not one of this engine's {self.voices}")
        return found

    def model_id(self, voice: str) -> str:
        return self._voice(voice).model_id

    def refuses(self, spec: Spec) -> str | None:
        return capability.refused(spec, self.controls)

    def warmup(self) -> None:
        """Checks that the server is up and knows every voice (piper: at the configured
        rate), with one tiny render per voice. Raises ExternalEngineError if not."""
        if self.protocol == "piper":
            configs = self._get_json("/voices")
            for v in self._voices.values():
                rate = _piper_rate(configs, v.remote)
                if rate != self.sample_rate:
                    raise ExternalEngineError(
                        f"piper voice {v.remote!r} at {self.base_url} renders at {rate} Hz, "
                        f"not the configured {self.sample_rate} Hz"
                    )
        for voice in self.voices:
            for _ in self.stream(WARMUP_TEXT, voice, 1.0, 0):
                pass

    def samples(self, text: str, voice: str, speed: float) -> int | None:
        return None  # the server decides; its length is known only at the end

    def stream(self, text: str, voice: str, speed: float, seed: int) -> Iterator[Audio]:
        remote = self._voice(voice)
        if not speed > 0:
            raise ValueError(f"speed must be positive, not {speed}")
        if self.protocol == "openai":
            return self._stream_openai(text, remote, speed)
        if self.protocol == "indextts2":
            return self._stream_indextts2(text, remote.remote, None)
        return self._stream_piper(text, remote, speed)

    def stream_spec(self, spec: Spec) -> Iterator[Audio]:
        """Renders a whole spec: its controls go to the server in its own terms."""
        remote = self._voice(spec.voice)
        clip = self._clip(spec)
        if self.protocol == "indextts2":
            return self._stream_indextts2(spec.text, clip or remote.remote, spec)
        if self.protocol == "openai":
            emotion = spec.emotion
            if emotion is not None and emotion.vector is not None:
                raise RenderRefused("unsupported_control", "the OpenAI wire has no emotion vector")
            said = (emotion.text or emotion.label) if emotion else None
            extra = {"instructions": said} if said else {}
            return self._stream_openai(spec.text, remote, spec.speed, extra)
        return self._stream_piper(spec.text, remote, spec.speed)

    def _clip(self, spec: Spec) -> str | None:
        """The path (as the server sees it) of the spec's reference clip, written into the
        shared directory; None for a spec without a `ref`. Raises RenderRefused
        `unknown_ref` for a clip no longer registered, or not the one the spec binds."""
        if spec.ref is None:
            return None
        data = self.clips.clip(spec.ref.id) if self.clips is not None else None
        if data is None or hashlib.sha256(data).hexdigest() != spec.ref.sha256:
            raise RenderRefused(
                "unknown_ref",
                f"reference voice {spec.ref.id} was deleted (or is not the clip this line names)",
            )
        assert self.clips is not None
        self.clips.record(spec.ref.sha256, spec.key)
        if self.clip_dir is None:
            return None
        name = f"{spec.ref.sha256}.wav"
        path = self.clip_dir / name
        if not path.exists():  # content-addressed: an existing file is this clip
            self.clip_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.clip_dir, delete=False) as tmp:
                tmp.write(data)
            os.replace(tmp.name, path)  # whole or absent, for a server reading it
        return f"{str(self.remote_clip_dir).rstrip('/')}/{name}"

    # The protocols.

    def _stream_indextts2(self, text: str, path: str, spec: Spec | None) -> Iterator[Audio]:
        body: dict[str, Any] = {
            "text": text,
            "audio_paths": [path],
            "spk_audio_path": path,
            "emo_control_method": 0,
        }
        emotion = spec.emotion if spec else None
        if emotion is not None:
            vector = emotion.vector
            if vector is None and emotion.label in EMOTIONS:
                vector = tuple(1.0 if e == emotion.label else 0.0 for e in EMOTIONS)
            body["emo_alpha"] = body["emo_weight"] = emotion.alpha
            if vector is not None:
                body["emo_vector"] = body["emo_vec"] = list(vector)
                body["emo_control_method"] = 2
            else:
                body["emo_text"] = emotion.text or emotion.label
                body["use_emo_text"] = True
                body["emo_control_method"] = 3
        if spec is not None and spec.duration is not None:
            natural = max(len(text), 1) * self.seconds_per_char
            body["duration_factor"] = round(spec.duration / natural, 3)
        with self._post("/tts_url", body) as response:
            data = self._read(response)
        yield self._decode_wav(data)

    def _stream_openai(
        self,
        text: str,
        voice: ExternalVoice,
        speed: float,
        extra: dict[str, Any] | None = None,
    ) -> Iterator[Audio]:
        body = {
            "model": voice.remote_model,
            "input": text,
            "voice": voice.remote,
            "response_format": "pcm",
            "speed": speed,
            **(extra or {}),
        }
        chunker = Pcm16Chunker(
            max(1, round(MIN_CHUNK_SECONDS * self.sample_rate)),
            max(1, round(MAX_CHUNK_SECONDS * self.sample_rate)),
        )
        with self._post("/v1/audio/speech", body) as response:
            kind = response.headers.get_content_type()
            if kind == "application/json" or kind.startswith("text/"):
                raise ExternalEngineError(
                    f"{self.base_url} answered {kind}, not PCM audio: "
                    f"{_excerpt(self._read(response, 4096))}",
                    response.status,
                )
            while data := self._read1(response):
                yield from chunker.feed(data)
            if response.length:  # a Content-Length the body fell short of
                raise ExternalEngineError(
                    f"{self.base_url} closed the connection {response.length} bytes short"
                )
        yield from chunker.finish()

    def _stream_piper(self, text: str, voice: ExternalVoice, speed: float) -> Iterator[Audio]:
        body = {
            "text": text,
            "voice": voice.remote,
            "length_scale": 1.0 / speed,
            "noise_scale": 0.0,
            "noise_w_scale": 0.0,
        }
        with self._post("/synthesize", body) as response:
            data = self._read(response)
        yield self._decode_wav(data)

    def _decode_wav(self, data: bytes) -> Audio:
        try:
            with wave.open(io.BytesIO(data), "rb") as wav:
                rate, width, channels = wav.getframerate(), wav.getsampwidth(), wav.getnchannels()
                frames = wav.readframes(wav.getnframes())
        except (wave.Error, EOFError) as exc:
            raise ExternalEngineError(
                f"{self.base_url} answered no WAV ({exc}): {_excerpt(data[:4096])}"
            ) from exc
        if (width, channels) != (2, 1):
            raise ExternalEngineError(
                f"{self.base_url} answered {width * 8}-bit audio with {channels} channels; "
                "16-bit mono expected"
            )
        if rate != self.sample_rate:
            raise ExternalEngineError(
                f"{self.base_url} answered {rate} Hz audio, but this engine is configured for "
                f"{self.sample_rate} Hz: fix sample_rate rather than play it at the wrong speed"
            )
        if len(frames) % 2:
            raise ExternalEngineError(f"{self.base_url} answered a WAV cut mid-sample")
        return pcm16_to_float(frames)

    # HTTP.

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "User-Agent": "nearvoice-origin"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env, "")
            if not key:
                raise ExternalEngineError(
                    f"{self.name}: environment variable {self.api_key_env} (the API key) is not set"
                )
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _post(self, path: str, body: dict[str, Any]) -> http.client.HTTPResponse:
        return self._open(self._request(path, json.dumps(body).encode()))

    def _request(self, path: str, data: bytes | None = None) -> urllib.request.Request:
        # base_url was checked to be http(s) in __init__, so no file: or custom scheme.
        return urllib.request.Request(  # noqa: S310
            self.base_url + path,
            data=data,
            headers=self._headers(),
            method="GET" if data is None else "POST",
        )

    def _get_json(self, path: str) -> Any:
        with self._open(self._request(path)) as response:
            data = self._read(response)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise ExternalEngineError(
                f"{self.base_url}{path} answered no JSON: {_excerpt(data[:4096])}",
                response.status,
            ) from exc

    def _open(self, request: urllib.request.Request) -> http.client.HTTPResponse:
        url = request.full_url
        try:
            response = _OPENER.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            with exc:
                try:
                    body = exc.read(4096)
                except (OSError, http.client.HTTPException):
                    body = b""
            raise ExternalEngineError(
                f"{request.get_method()} {url} answered {exc.code}: {_excerpt(body)}", exc.code
            ) from exc
        except urllib.error.URLError as exc:
            raise ExternalEngineError(f"{request.get_method()} {url} failed: {exc.reason}") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise ExternalEngineError(
                f"{request.get_method()} {url} failed: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(response, http.client.HTTPResponse):  # pragma: no cover
            response.close()
            raise ExternalEngineError(f"{url}: not an HTTP response")
        if response.status != 200:
            with response:
                body = self._read(response, 4096)
            raise ExternalEngineError(
                f"{request.get_method()} {url} answered {response.status}: {_excerpt(body)}",
                response.status,
            )
        return response

    def _read(self, response: http.client.HTTPResponse, size: int = -1) -> bytes:
        try:
            return response.read(size)
        except (OSError, http.client.HTTPException) as exc:
            raise ExternalEngineError(
                f"reading from {self.base_url} failed: {type(exc).__name__}: {exc}"
            ) from exc

    def _read1(self, response: http.client.HTTPResponse) -> bytes:
        """What has arrived, up to READ_SIZE bytes: at most one network chunk's worth, so a
        chunk is handed on without waiting for the next. Empty at the end."""
        try:
            return response.read1(READ_SIZE)
        except (OSError, http.client.HTTPException) as exc:
            raise ExternalEngineError(
                f"reading from {self.base_url} failed: {type(exc).__name__}: {exc}"
            ) from exc


def _piper_rate(configs: Any, remote: str) -> int:
    """A voice's sample rate from piper's `GET /voices` (voice name -> its config)."""
    try:
        return int(configs[remote]["audio"]["sample_rate"])
    except (KeyError, TypeError, ValueError) as exc:
        known = sorted(configs) if isinstance(configs, dict) else []
        raise ExternalEngineError(
            f"piper server has no voice {remote!r} with a sample rate; it lists {known}"
        ) from exc


def discover_piper_sample_rate(
    base_url: str, remote: str, timeout: float = 30.0, api_key_env: str | None = None
) -> int:
    """The rate piper's server renders `remote` at, from its `GET /voices`, for an operator
    who would rather not configure it."""
    probe = ExternalEngine(
        base_url=base_url,
        protocol="piper",
        voices=[ExternalVoice("probe", remote, "probe@0")],
        sample_rate=1,
        timeout=timeout,
        api_key_env=api_key_env,
    )
    return _piper_rate(probe._get_json("/voices"), remote)
