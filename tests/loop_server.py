"""An aiohttp application served from its own event loop in a background thread, for the
test servers that stand in for external TTS servers (tests/openai_tts_server.py,
tests/indextts2_server.py): tests and benchmarks talk to them over real HTTP while their
own code stays synchronous."""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web


class LoopServer:
    def __init__(self, name: str) -> None:
        self._name = name
        self.loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    def serve(self, app: web.Application, host: str, port: int) -> str:
        """Starts serving `app`; returns its base URL (`http://host:port`, the port bound)."""
        runner = self._runner = web.AppRunner(app, shutdown_timeout=5.0)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, host, port).start())
        bound_host, bound_port = runner.addresses[0][:2]
        self._thread = threading.Thread(target=self.loop.run_forever, name=self._name, daemon=True)
        self._thread.start()
        return f"http://{bound_host}:{bound_port}"

    def close(self) -> None:
        """Stops serving (in-flight requests get `shutdown_timeout`) and closes the loop."""
        if self._thread is not None and self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(30)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
            self._thread = None
        self.loop.close()
