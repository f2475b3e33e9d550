"""A real headless Chromium for the tests: Debian's `chromium` package, driven by
Playwright with `executable_path` (Playwright's own browser download is never used).

`make sysdeps` installs the package; Playwright comes with the `dev` extra. A missing
browser fails the tests that need it, with the command that installs it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from playwright.async_api import Browser, async_playwright

CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = (
    "--no-sandbox",  # the tests run as root
    "--disable-gpu",
    "--no-first-run",
    # Autoplay without a user gesture: the tests assert that audio was decoded and
    # played, not heard.
    "--autoplay-policy=no-user-gesture-required",
    # This machine's network is closed: no background connections to Google's hosts.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
)


def chromium_path() -> str:
    found = shutil.which("chromium") or next(
        (p for p in CHROMIUM_PATHS if os.access(p, os.X_OK)), None
    )
    if found is None:
        pytest.fail("Debian's chromium is not installed: run `make sysdeps`", pytrace=False)
    return found


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium_path(), args=list(CHROMIUM_ARGS)
        )
        try:
            yield browser
        finally:
            await browser.close()
