"""What aiohttp's request machinery costs, for the hit-path benchmark: aiohttp on uvloop answering a
fixed 64 KiB Range slice of an in-memory object with no verification, no cache lookup and
no metrics. Run by bench/hit_path.py as a reference row; it is not a server to deploy.

    python -m nearvoice.bench.bare_aiohttp FILE PORT
"""

from __future__ import annotations

import sys

import uvloop
from aiohttp import web

from nearvoice.edge.http.ranges import content_range, parse_range


def main() -> None:
    path, port = sys.argv[1], int(sys.argv[2])
    with open(path, "rb") as f:
        body = f.read()

    async def serve(request: web.Request) -> web.Response:
        ranges = parse_range(request.headers.get("Range", ""), len(body), 1) or [(0, len(body))]
        start, end = ranges[0]
        return web.Response(
            status=206,
            body=body[start:end],
            headers={"Content-Range": content_range((start, end), len(body))},
            content_type="audio/wav",
        )

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/object.wav", serve)
    app.router.add_get("/healthz", healthz)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
