"""Typed application state."""

from __future__ import annotations

from aiohttp import web

from edge.node import Node

NODE = web.AppKey("node", Node)
