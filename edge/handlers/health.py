"""Liveness, readiness and metrics."""

from __future__ import annotations

from http import HTTPStatus

from aiohttp import web

from nearvoice.edge.handlers.keys import NODE


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready only once the engines are warm, so load balancers never send a cold node work."""
    if request.app[NODE].ready:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "warming"}, status=HTTPStatus.SERVICE_UNAVAILABLE)


async def metrics(request: web.Request) -> web.Response:
    node = request.app[NODE]
    await node.refresh_gauges()
    return web.Response(
        body=node.metrics.render(), headers={"Content-Type": node.metrics.content_type}
    )
