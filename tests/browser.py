"""A real headless Chromium for the tests (nearvoice.bench.browser: Debian's `chromium`, driven by
Playwright with `executable_path`). A missing browser fails the tests that need it, with
the command that installs it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from playwright.async_api import Browser

from nearvoice.bench import browser


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    if browser.chromium_path() is None:
        pytest.fail("Debian's chromium is not installed: run `make sysdeps`", pytrace=False)
    async with browser.chromium() as launched:
        yield launched
