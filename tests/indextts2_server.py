"""A small, real server that speaks index-tts-vllm's wire format, for the IndexTTS2
adapter's tests (origin/external.py, protocol `indextts2`).

`POST /tts_url` with JSON `{"text", "audio_paths": [path], ...}` answers a whole 16-bit
mono WAV, as index-tts-vllm's API server does. It CANNOT clone: it renders every request
with the bundled piper `joe` voice (edge.synth.piper_engine.PiperEngine, 22050 Hz), so the
audio is real speech but never in the reference speaker's voice. What it checks and
reports instead, so tests can assert what reached it:

* each path in `audio_paths` must be a readable file (400 otherwise); a file named
  `<64 hex>.wav` must hash to that name (409 otherwise), so a clip written half, or the
  wrong clip, is caught;
* `duration_factor` is applied through piper's length scale (speed = 1 / factor);
* the controls it received (`emo_vector`, `emo_alpha`, `emo_text`, `use_emo_text`,
  `duration_factor`) come back as JSON in the `X-Received-Controls` header, and the
  clip's SHA-256 in `X-Clip-Sha256`; every request is also kept in `log`.

It runs on its own event loop in a background thread, on a free loopback port; rendering
runs in one dedicated thread (one piper session).

As a process, it stands in for an IndexTTS2 server in the README's walk through
expressive speech (`python -m tests.indextts2_server --port 9880 --speaker FILE`):
`--speaker` writes a few seconds of speech to FILE, the server's own speaker clip for a
voice rendered without a reference voice (IndexTTS2 always needs one), unless it exists.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import re
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

import numpy as np
import soundfile
from aiohttp import web

from nearvoice.edge.synth.piper_engine import PiperEngine
from tests.loop_server import LoopServer

SAMPLE_RATE = 22050
CONTROLS = ("emo_vector", "emo_alpha", "emo_text", "use_emo_text", "duration_factor")
_HASHED = re.compile(r"[0-9a-f]{64}")


class IndexTTS2Server:
    def __init__(self, engine: PiperEngine | None = None) -> None:
        self._engine = engine or PiperEngine(voices=("joe",), threads=1)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="indextts2")
        self._server = LoopServer("indextts2-loop")
        self.url = ""
        self.log: list[dict[str, Any]] = []

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application()
        app.router.add_post("/tts_url", self._tts_url)
        self.url = self._server.serve(app, host, port)
        return self.url

    def stop(self) -> None:
        self._server.close()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _tts_url(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"status": "error", "error": "not JSON"}, status=400)
        self.log.append(body)
        text, paths = body.get("text"), body.get("audio_paths")
        if not isinstance(text, str) or not isinstance(paths, list) or not paths:
            return web.json_response({"status": "error", "error": "text, audio_paths"}, status=400)
        loop = asyncio.get_running_loop()
        digests = []
        for path in paths:
            try:
                data = await loop.run_in_executor(self._pool, Path(path).read_bytes)
            except (OSError, TypeError):
                return web.json_response({"status": "error", "error": f"cannot read {path}"}, 400)
            digest = hashlib.sha256(data).hexdigest()
            stem = Path(path).stem
            if _HASHED.fullmatch(stem) and stem != digest:
                return web.json_response({"status": "error", "error": "clip hash mismatch"}, 409)
            digests.append(digest)
        factor = float(body.get("duration_factor", 1.0))
        audio = await loop.run_in_executor(self._pool, self._render, text, 1.0 / factor)
        out = io.BytesIO()
        soundfile.write(out, audio, SAMPLE_RATE, format="WAV", subtype="PCM_16")
        received = {name: body[name] for name in CONTROLS if name in body}
        headers = {
            "X-Received-Controls": json.dumps(received, sort_keys=True),
            "X-Clip-Sha256": ",".join(digests),
        }
        return web.Response(body=out.getvalue(), content_type="audio/wav", headers=headers)

    def _render(self, text: str, speed: float) -> np.ndarray[Any, np.dtype[np.float32]]:
        return np.concatenate(list(self._engine.stream(text, "joe", speed, 0)))


SPEAKER_TEXT = (
    "This is the stand-in server's own speaker. It reads a few sentences, so that a voice "
    "has a clip to be rendered from."
)


def write_speaker(engine: PiperEngine, path: Path) -> None:
    """A few seconds of real speech (piper joe) at `path`, as a 16-bit WAV."""
    audio = np.concatenate(list(engine.stream(SPEAKER_TEXT, "joe", 1.0, 0)))
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, audio, SAMPLE_RATE, format="WAV", subtype="PCM_16")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.indextts2_server",
        description="index-tts-vllm's wire format, rendered with piper: it cannot clone.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9880)
    parser.add_argument("--speaker", type=Path, help="write a speaker clip here if missing")
    args = parser.parse_args(argv)
    # Blocked before any other thread starts (onnxruntime's, the server's: they inherit
    # the mask), so this thread alone takes them, in sigwait.
    stopping = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stopping)
    engine = PiperEngine(voices=("joe",), threads=1)
    if args.speaker is not None and not args.speaker.exists():
        write_speaker(engine, args.speaker)
    server = IndexTTS2Server(engine)
    url = server.start(args.host, args.port)
    print(f"IndexTTS2 stand-in (piper; it cannot clone) on {url}", flush=True)
    try:
        signal.sigwait(stopping)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
