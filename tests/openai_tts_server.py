"""A small, real OpenAI-compatible TTS server for the external engine's tests.

It speaks the `POST /v1/audio/speech` wire format (JSON `model`, `input`, `voice`,
`response_format`, `speed`; answer: raw s16le mono PCM, chunked) and renders real speech
with the bundled piper `joe` voice at 22050 Hz through piper's own API, as servers built
on piper do: `PiperVoice.synthesize` on piper's own session (onnxruntime's default
threads, one per core), sentence by sentence, with zero noise so renders are
deterministic, each sentence written to the response as soon as it is rendered. It is a
peer for the wire format and for benchmarks, not a mock: what a client receives is a real
render of the same model the edge renders.

For tests it also has:
  token         answer 401 unless `Authorization: Bearer <token>` is sent;
  chunk_bytes   cut the PCM into HTTP chunks of this many bytes (odd: samples split
                across chunk boundaries);
  hold          after the first sentence of a render is written, wait until `release()`
                before rendering the next: a client can observe that it received audio
                while the server had not finished, without measuring time;
  counters      `sentences` (rendered so far), `completed` (renders finished),
                `requests` (every request, with its headers and JSON in `log`).

It runs an aiohttp application on its own event loop in a background thread, on a free
loopback port; rendering runs in one dedicated thread (one piper session).

Run by hand: `python -m tests.openai_tts_server --port 8880 [--token-env VAR]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Self

import numpy as np
from aiohttp import web
from piper import PiperVoice, SynthesisConfig

from nearvoice.edge.synth.engine import Audio
from nearvoice.edge.synth.piper_engine import BUNDLED
from tests.loop_server import LoopServer

VOICES = {"joe": "joe"}
"""The voices this server offers (OpenAI name -> piper voice)."""
SAMPLE_RATE = 22050
HOLD_TIMEOUT = 60.0
"""A held render gives up waiting for `release()` after this long."""


def to_pcm16(audio: Audio) -> bytes:
    """float32 to s16le, rounding: what this server sends for `audio`."""
    scaled = np.round(np.clip(audio, -1.0, 1.0) * 32767.0)
    return scaled.astype("<i2").tobytes()


def _error(status: int, message: str) -> web.Response:
    """An error in OpenAI's shape."""
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    body = {"error": error}
    return web.json_response(body, status=status)


@dataclass
class Logged:
    headers: dict[str, str]
    body: dict[str, Any] = field(default_factory=dict)


class OpenAITTSServer:
    def __init__(
        self,
        *,
        token: str | None = None,
        chunk_bytes: int | None = None,
        hold: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.token = token
        self.chunk_bytes = chunk_bytes
        self.hold = hold
        self._host = host
        self._port = port
        self._voice = PiperVoice.load(BUNDLED["joe"].model_path())
        self._render_pool = ThreadPoolExecutor(1, thread_name_prefix="openai-tts")
        self._released = threading.Event()
        self._server = LoopServer("openai-tts-loop")
        self.url = ""
        self.requests = 0
        self.sentences = 0
        self.completed = 0
        self.chunks_sent: list[int] = []
        self.log: list[Logged] = []

    # Lifecycle.

    def start(self) -> str:
        """Starts serving; returns the base URL (`http://127.0.0.1:<port>`)."""
        app = web.Application()
        app.router.add_post("/v1/audio/speech", self._speech)
        self.url = self._server.serve(app, self._host, self._port)
        return self.url

    def stop(self) -> None:
        self._released.set()
        self._server.close()
        self._render_pool.shutdown(wait=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def release(self) -> None:
        """Lets held renders go on (and every later one run through)."""
        self._released.set()

    def warmup(self) -> None:
        """Loads the piper session in the render thread."""
        self._render_pool.submit(lambda: list(self.render("Warm up.", 1.0))).result()

    # The endpoint.

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        logged = Logged(dict(request.headers))
        self.log.append(logged)
        if self.token is not None and (
            request.headers.get("Authorization") != f"Bearer {self.token}"
        ):
            return _error(401, "Incorrect API key provided.")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "The body is not JSON.")
        if not isinstance(body, dict):
            return _error(400, "The body is not a JSON object.")
        logged.body = body
        text = body.get("input")
        if not isinstance(text, str) or not text.strip():
            return _error(400, "'input' is required.")
        voice = VOICES.get(body.get("voice", ""))
        if voice is None:
            return _error(400, f"Unknown voice; offered: {sorted(VOICES)}.")
        if body.get("response_format", "mp3") != "pcm":
            return _error(400, "Only response_format 'pcm' is implemented.")
        speed = body.get("speed", 1.0)
        if not isinstance(speed, int | float) or not 0.25 <= speed <= 4.0:
            return _error(400, "'speed' must be within 0.25..4.0.")

        response = web.StreamResponse(headers={"Content-Type": "audio/pcm"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        sentences = self.render(text, float(speed))
        first = True
        while True:
            audio = await loop.run_in_executor(self._render_pool, _next, sentences)
            if audio is None:
                break
            self.sentences += 1
            await self._write(response, to_pcm16(audio))
            if first and self.hold:
                await loop.run_in_executor(None, self._released.wait, HOLD_TIMEOUT)
            first = False
        self.completed += 1  # before the last chunk: a client that saw the end sees this
        await response.write_eof()
        return response

    def render(self, text: str, speed: float) -> Iterator[Audio]:
        """`text`'s sentences, one array each, as piper renders them (no normalization)."""
        synthesis = SynthesisConfig(
            length_scale=self._voice.config.length_scale / speed,
            noise_scale=0.0,
            noise_w_scale=0.0,
            normalize_audio=False,
        )
        for chunk in self._voice.synthesize(text, synthesis):
            audio: Audio = np.clip(np.asarray(chunk.audio_float_array, np.float32), -1.0, 1.0)
            yield audio

    async def _write(self, response: web.StreamResponse, data: bytes) -> None:
        """One HTTP chunk per write (aiohttp frames each write when chunked)."""
        size = self.chunk_bytes or len(data)
        for start in range(0, len(data), size):
            piece = data[start : start + size]
            self.chunks_sent.append(len(piece))
            await response.write(piece)


def _next(sentences: Iterator[Audio]) -> Audio | None:
    return next(sentences, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8880)
    parser.add_argument("--token-env", help="environment variable holding the bearer token")
    args = parser.parse_args()
    token = os.environ[args.token_env] if args.token_env else None
    server = OpenAITTSServer(token=token, host=args.host, port=args.port)
    server.start()
    print(json.dumps({"url": server.url, "voices": sorted(VOICES), "sample_rate": SAMPLE_RATE}))
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
