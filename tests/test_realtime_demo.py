"""The demo page in a real headless Chromium (tests.browser: Debian's chromium through
Playwright, with `--autoplay-policy=no-user-gesture-required`), and the command line's
realtime URL. The page connects with a session token minted through
POST /v1/realtime/tokens, streams the text in small pieces, decodes the pcm frames into
WebAudio buffers and lists the segments; the test reads the page's counters (audio
decoded, not heard)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import websockets

from tests.api_support import ACME
from tests.browser import chromium
from tests.realtime_support import realtime_node
from tests.support import KID, SECRET

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
TEXT = "Hello from the demo page, spoken as it streams. Here is a second sentence. And a third!"


async def test_the_demo_page_plays_a_streamed_session(tmp_path: Path) -> None:
    async with realtime_node(tmp_path) as api:
        async with api.client.post(
            "/v1/realtime/tokens",
            json={"voice": "heart", "ttl": 120},
            headers={"Authorization": f"Bearer {ACME}"},
        ) as resp:
            assert resp.status == 200
            token = (await resp.json())["token"]
        async with chromium() as browser:
            page = await browser.new_page()
            await page.goto(f"{api.base}/demo?token={token}")
            await page.fill("#text", TEXT)
            await page.click("#speak")
            await page.wait_for_function("window.nearvoiceDemo.done", timeout=60_000)
            stats: dict[str, Any] = await page.evaluate("window.nearvoiceDemo")
            rows = await page.locator("#segments tr").count()
            await page.close()
        assert stats["errors"] == []
        assert stats["sampleRate"] == 24000
        assert stats["frames"] > 0
        assert stats["samplesDecoded"] * 2 == stats["bytes"]
        segments = stats["segments"]
        assert [s["text"] for s in segments] == [
            "Hello from the demo page,",  # the first segment ends at its first clause
            "spoken as it streams.",
            "Here is a second sentence.",
            "And a third!",
        ]
        assert rows == 4
        # Each segment's first audio was measured from the moment its text was sent.
        assert all(s["firstAudioMs"] is not None and s["firstAudioMs"] >= 0 for s in segments)
        assert sum(s["audioMs"] for s in segments) == pytest.approx(
            stats["samplesDecoded"] / 24, rel=0.01
        )


async def test_sign_realtime_prints_a_session_url_a_node_accepts(tmp_path: Path) -> None:
    env = {**os.environ, "NEARVOICE_KEYS": f"{KID}:{SECRET}"}
    async with realtime_node(tmp_path) as api:
        done = await asyncio.to_thread(
            subprocess.run,
            [
                *(
                    sys.executable,
                    "-m",
                    "nearvoice.edge.cli",
                    "sign",
                    "--realtime",
                    "--tenant",
                    "acme",
                ),
                *("--voice", "heart", "--ttl", "60", "--base", api.base),
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        url = done.stdout.strip()
        assert url.startswith("ws://") and "/v1/realtime/speech?token=" in url
        assert len(done.stdout.splitlines()) == 1
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"type": "session.update", "format": "pcm"}))
            updated = json.loads(await ws.recv())
            assert updated["type"] == "session.updated" and updated["voice"] == "heart"
