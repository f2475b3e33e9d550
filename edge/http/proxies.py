"""Which address a request comes from, behind trusted proxies.

A node behind a load balancer sees the balancer's address; URLs bound to a player's
address (docs/contracts.md#signed-urls, `ip`) and per-address limits need the player's. Only from
peers in `[http] trusted_proxies` is the client taken from `X-Forwarded-For` (the
rightmost address that is not itself a trusted proxy: every proxy appends the address it
received from, and only the hops we trust wrote honestly, MDN/RFC 7239 section 5.2
semantics) or from a PROXY protocol header (edge.http.proxy_protocol). From anyone else
forwarding headers are ignored. Addresses are compared as IPv4 when they are
IPv4-mapped IPv6 (`::ffff:192.0.2.1`, RFC 4291 section 2.5.5.2), as dual-stack sockets
report them.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

from aiohttp import hdrs, web

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_HOPS = 32  # X-Forwarded-For entries looked at; a longer chain is a forgery anyway


def address(text: str | None) -> Address | None:
    """`text` as an address, IPv4-mapped IPv6 unwrapped; None when it is not one."""
    if not text:
        return None
    try:
        parsed = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped
    return parsed


class TrustedProxies:
    def __init__(self, cidrs: Iterable[str]) -> None:
        self.networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(cidr.strip(), strict=False) for cidr in cidrs
        )

    def __bool__(self) -> bool:
        return bool(self.networks)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (one instance per node, bounded)
    def trusts(self, peer: str | None) -> bool:
        found = address(peer)
        return found is not None and any(found in net for net in self.networks)

    def client(self, peer: str | None, forwarded_for: Iterable[str]) -> str | None:
        """The client behind `peer`: from `X-Forwarded-For` values (in the order the
        fields came) when `peer` is trusted, else `peer` itself."""
        if not self.networks or not self.trusts(peer):
            return peer
        hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
        for hop in reversed(hops[-MAX_HOPS:]):
            found = address(hop)
            if found is None:
                return peer  # a garbled chain: trust nothing in it
            if not self.trusts(str(found)):
                return str(found)
        return str(address(hops[0])) if hops and address(hops[0]) else peer


TRUSTED = web.AppKey("trusted_proxies", TrustedProxies)
"""The app's trusted proxies (`[http] trusted_proxies`), set by edge.app.create_app."""


def client_address(request: web.BaseRequest) -> str | None:
    """The request's client: its peer (already the PROXY header's client when there was
    one, edge.http.protocol), or whom a trusted peer's X-Forwarded-For names."""
    peer = request.remote
    proxies = request.app.get(TRUSTED) if isinstance(request, web.Request) else None
    if not proxies:
        return peer
    return proxies.client(peer, request.headers.getall(hdrs.X_FORWARDED_FOR, ()))
