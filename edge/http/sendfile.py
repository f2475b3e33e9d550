"""Sending byte ranges of an open file on an aiohttp response.

uvloop implements no `loop.sendfile`, so we call sendfile(2) on the socket ourselves once
aiohttp's transport buffer is empty (so bytes cannot be reordered), for as much as the
socket buffer takes without blocking. Whatever is left, and everything when sendfile is
off or the transport is TLS, goes through the transport in chunks read with pread in an
executor, with back-pressure from `drain`.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

CHUNK = 256 * 1024  # bytes per pread in the fallback path


def _sendfile_nonblocking(sock_fd: int, fd: int, offset: int, count: int) -> int:
    sent = 0
    while sent < count:
        try:
            n = os.sendfile(sock_fd, fd, offset + sent, count - sent)
        except BlockingIOError:
            break
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ConnectionResetError("client went away") from exc
        if n == 0:
            break
        sent += n
    return sent


def _raw_socket_fd(transport: asyncio.Transport | None) -> int | None:
    if transport is None or transport.is_closing():
        return None
    # sendfile(2) would put plaintext on a TLS connection: never on one, whichever event
    # loop's TLS transport this is (asyncio's and uvloop's name the extras alike).
    if (
        transport.get_extra_info("sslcontext") is not None
        or transport.get_extra_info("ssl_object") is not None
    ):
        return None
    sock: Any = transport.get_extra_info("socket")
    return None if sock is None else int(sock.fileno())


async def send_file_range(
    request: web.BaseRequest,
    writer: AbstractStreamWriter,
    fd: int,
    offset: int,
    count: int,
    *,
    use_sendfile: bool,
) -> None:
    transport = request.transport
    if use_sendfile:
        sock_fd = _raw_socket_fd(transport)
        if sock_fd is not None:
            send_headers = getattr(writer, "send_headers", None)
            if send_headers is not None:
                send_headers()
            await writer.drain()
            if transport is not None and transport.get_write_buffer_size() == 0:
                sent = _sendfile_nonblocking(sock_fd, fd, offset, count)
                offset += sent
                count -= sent
                # The StreamWriter clips writes at Content-Length; keep its count honest.
                remaining = getattr(writer, "length", None)
                if isinstance(remaining, int):
                    writer.length = remaining - sent
    loop = asyncio.get_running_loop()
    while count > 0:
        chunk = await loop.run_in_executor(None, os.pread, fd, min(CHUNK, count), offset)
        if not chunk:
            raise OSError(f"file ended {count} bytes early")
        await writer.write(chunk)
        offset += len(chunk)
        count -= len(chunk)
