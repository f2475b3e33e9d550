"""The self-check over aiohttp's private internals (edge.http.aiohttp_private): the
installed aiohttp has all of them, and a missing one is reported by name."""

from __future__ import annotations

import pytest
from aiohttp.web_protocol import RequestHandler

from nearvoice.edge.http import aiohttp_private


def test_the_installed_aiohttp_has_every_internal_the_node_uses() -> None:
    assert aiohttp_private.problems() == []
    assert aiohttp_private.compatible()


def test_a_missing_internal_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        aiohttp_private, "HANDLER_ATTRIBUTES", (*aiohttp_private.HANDLER_ATTRIBUTES, "_gone")
    )
    monkeypatch.delattr(RequestHandler, "_process_keepalive")
    found = aiohttp_private.problems()
    assert "RequestHandler._gone" in found
    assert "RequestHandler._process_keepalive()" in found
