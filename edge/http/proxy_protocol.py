"""The PROXY protocol (HAProxy's "PROXY protocol" specification, versions 1 and 2): a
header a proxy such as nginx's stream module (`proxy_protocol on`) sends before the first
byte of the proxied connection, naming the client's address.

`parse(buffer)` is a pure function from the bytes received so far to one of `Proxied`
(the header and how many bytes it took), `NEED_MORE` (a prefix of a valid header) or
`ProxyError`, h11-style: no I/O, so it is tested and fuzzed on its own, and the connection
code (edge.http.protocol) only feeds it. Limits come from the specification: a v1 line is
at most 107 bytes (section 2.1); a v2 header is 16 bytes plus the length it declares
(section 2.2), which we cap at `MAX_V2_LENGTH`.

The header is honoured only on listeners configured for it and from trusted proxies
(`[http] proxy_protocol`, `trusted_proxies`); it is never auto-detected, since anyone
could then claim any address.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

V1_PREFIX: Final = b"PROXY "
V1_MAX: Final = 107  # bytes, CRLF included (section 2.1)
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_V2_LENGTH: Final = 4096  # bytes after the 16-byte fixed part; TLVs included


@dataclass(frozen=True, slots=True)
class Proxied:
    """A complete header. `client` is None for `UNKNOWN` (v1) and `LOCAL` (v2): the
    connection is the proxy's own (e.g. a health check), its peer address stands."""

    client: str | None
    consumed: int


@dataclass(frozen=True, slots=True)
class ProxyError:
    reason: str


class _NeedMore:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE: Final = _NeedMore()
Parsed = Proxied | ProxyError | _NeedMore


def parse(buffer: bytes) -> Parsed:
    """The PROXY header at the start of `buffer` (module docstring)."""
    if buffer[:1] == V2_SIGNATURE[:1]:
        return _parse_v2(buffer)
    if buffer[:1] == V1_PREFIX[:1]:
        return _parse_v1(buffer)
    if not buffer:
        return NEED_MORE
    return ProxyError("no PROXY header")


def _ip(text: bytes, version: int) -> str | None:
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    return str(address) if address.version == version else None


def _port(text: bytes) -> bool:
    if text == b"0":
        return True
    return text.isdigit() and len(text) <= 5 and text[:1] != b"0" and int(text) <= 65535


def _parse_v1(buffer: bytes) -> Parsed:
    head = buffer[: len(V1_PREFIX)]
    if head != V1_PREFIX[: len(head)]:
        return ProxyError("bad v1 signature")
    end = buffer.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(buffer) >= V1_MAX or b"\n" in buffer[:V1_MAX]:
            return ProxyError("v1 header without CRLF within 107 bytes")
        return NEED_MORE
    fields = buffer[:end].split(b" ")
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        return Proxied(None, end + 2)
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        return ProxyError("bad v1 fields")
    version = 4 if fields[1] == b"TCP4" else 6
    source, dest = _ip(fields[2], version), _ip(fields[3], version)
    if source is None or dest is None or not (_port(fields[4]) and _port(fields[5])):
        return ProxyError("bad v1 address")
    return Proxied(source, end + 2)


_FAMILIES: Final = {0x11: (4, 12), 0x12: (4, 12), 0x21: (6, 36), 0x22: (6, 36)}
"""v2 family/transport byte -> (IP version, address block length): TCP or UDP over IPv4
or IPv6 (section 2.2). AF_UNIX and UNSPEC carry no client IP."""


def _parse_v2(buffer: bytes) -> Parsed:
    head = buffer[: len(V2_SIGNATURE)]
    if head != V2_SIGNATURE[: len(head)]:
        return ProxyError("bad v2 signature")
    if len(buffer) < 16:
        return NEED_MORE
    version_command, family, length = struct.unpack_from("!BBH", buffer, 12)
    if version_command >> 4 != 2 or version_command & 0x0F > 1:
        return ProxyError("bad v2 version or command")
    if length > MAX_V2_LENGTH:
        return ProxyError("v2 header too long")
    if len(buffer) < 16 + length:
        return NEED_MORE
    consumed = 16 + length
    if version_command & 0x0F == 0:  # LOCAL
        return Proxied(None, consumed)
    shape = _FAMILIES.get(family)
    if shape is None:
        if family in (0x00, 0x31, 0x32):  # UNSPEC, AF_UNIX: no IP to take
            return Proxied(None, consumed)
        return ProxyError("bad v2 family")
    version, block = shape
    if length < block:
        return ProxyError("v2 address block too short")
    raw = buffer[16 : 16 + (4 if version == 4 else 16)]
    return Proxied(str(ipaddress.ip_address(raw)), consumed)
