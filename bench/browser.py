"""A real headless Chromium for benchmarks and tests: Debian's `chromium` package, driven
by Playwright with `executable_path` (Playwright's own browser download is never used)."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from playwright.async_api import Browser, async_playwright

CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = (
    "--no-sandbox",  # runs as root here
    "--disable-gpu",
    "--no-first-run",
    # Autoplay without a user gesture: what is measured is decoding and playing, not
    # hearing.
    "--autoplay-policy=no-user-gesture-required",
    # No background connections to Google's hosts from a closed network.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
)
EVENT_LIMIT_MS = 20_000
"""A media event that has not come by then never will."""

PLAY = """async (url) => {
    const audio = new Audio();
    window.audio = audio;
    const started = performance.now();
    const outcome = new Promise((resolve, reject) => {
        audio.addEventListener("playing", () => resolve({
            ms: performance.now() - started, duration: audio.duration,
        }), {once: true});
        audio.addEventListener("error", () => reject(new Error(
            "media error " + (audio.error && audio.error.code) + ": " +
            (audio.error && audio.error.message))));
        setTimeout(() => reject(new Error("no playing event")), EVENT_LIMIT);
    });
    audio.src = url;
    audio.play().catch(() => {});
    return await outcome;
}""".replace("EVENT_LIMIT", str(EVENT_LIMIT_MS))
"""Plays `url` in a page; resolves with the ms from `src=` to `playing` and the duration
the element knows then, or rejects with the media error."""

SEEK = """async (at) => {
    const audio = window.audio;
    const done = new Promise((resolve, reject) => {
        audio.addEventListener("seeked", () => resolve({
            time: audio.currentTime, duration: audio.duration,
        }), {once: true});
        setTimeout(() => reject(new Error("no seeked event")), EVENT_LIMIT);
    });
    audio.currentTime = at;
    return await done;
}""".replace("EVENT_LIMIT", str(EVENT_LIMIT_MS))
"""Seeks the page's element to `at` seconds; resolves with where it landed."""


def chromium_path() -> str | None:
    return shutil.which("chromium") or next(
        (p for p in CHROMIUM_PATHS if os.access(p, os.X_OK)), None
    )


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    path = chromium_path()
    if path is None:
        raise SystemExit("Debian's chromium is not installed: run `make sysdeps`")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=path, args=list(CHROMIUM_ARGS))
        try:
            yield browser
        finally:
            await browser.close()


async def time_to_playing(browser: Browser, url: str) -> float:
    """Milliseconds from `src=` to `playing` in a fresh context (no media cache)."""
    context = await browser.new_context()
    try:
        page = await context.new_page()
        outcome: dict[str, float] = await page.evaluate(PLAY, url)
        return float(outcome["ms"])
    finally:
        await context.close()
