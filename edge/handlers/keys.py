"""Typed application state."""

from __future__ import annotations

from aiohttp import web

from nearvoice.edge.apikeys import ApiKeys
from nearvoice.edge.node import Node

NODE = web.AppKey("node", Node)
API_KEYS = web.AppKey("api_keys", ApiKeys)
"""Tenants' keys for the OpenAI-compatible API (NEARVOICE_API_KEYS)."""
