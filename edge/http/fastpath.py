"""The fast path: the commonest cache hit answered beneath aiohttp's request machinery.

A player seeking through a popular line sends `GET /v1/speech/...` with one Range, over
and over, on a keep-alive connection. On the ordinary path each such hit pays for a
Request object, the middleware chain, the router and a response object, which together
cost more than the hit itself. `FastHitHandler`, aiohttp's connection protocol with one
override, answers such a request straight from `data_received` when every one of these
holds, and hands the bytes to aiohttp unchanged otherwise:

* the connection is idle: aiohttp's request loop is waiting for the next message, nothing
  is queued or half-parsed, and writing is not paused (so answers stay in order and
  back-pressure stays aiohttp's);
* the bytes are exactly one complete request head (RFC 9112 section 2.1), with no body:
  `GET <canonical speech path>?<query> HTTP/1.1`, a Host field, and only the fields of
  `SIMPLE_FIELDS`, each at most once (no conditional field, no `Connection: close`, no
  node signature);
* the node verified this exact request target before (`Node.remembered`), and its expiry
  and client address pass again now; a refusal is left to the ordinary path, which counts
  it;
* the object is fresh in the hot tier, held in memory, nothing is rendering it, and the
  Range is absent or selects one range (416 and multipart answers are the ordinary path's).

The answer is `direct_parts` and `direct_head`: the bytes `DirectResponse` writes for the
same request on the ordinary path, so status line, headers and body are identical.

Two memos keep a hit's Python work to the checks that can change from one request to the
next (the connection's state, the URL's expiry and client address, the entry's freshness,
a fill, the rate limits). The parse of a head that was answered is remembered by its bytes
(`EdgeServer.heads`): players of a popular object send the very same head again and again.
An answer's status line and headers up to Date, and its body view, are kept ready on the
hot entry (`HotEntry.prepared`, by URL policy and Range), so they go when the entry goes.
Both are bounded and emptied when full. Measured in one process, they took a hit's Python
time from 13.7 to 6.3 microseconds.

Hit accounting, metrics and access records are those of `edge.handlers.speech` and
edge.http.logs. `EdgeRunner` installs the handler (`[http] fast_path`), and `run` serves
an app with it, as `web.run_app` would.

This relies on `RequestHandler` internals of aiohttp 3.14 (its idle waiter, message
queue, keep-alive deadline), all listed in edge.http.aiohttp_private, whose start-up
self-check falls back to aiohttp's ordinary path when they drift.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_protocol import RequestHandler

from nearvoice.edge import activity
from nearvoice.edge.cache.hot import HotEntry
from nearvoice.edge.handlers.keys import NODE
from nearvoice.edge.handlers.speech import admission
from nearvoice.edge.http import aiohttp_private
from nearvoice.edge.http.deliver import direct_parts
from nearvoice.edge.http.direct import date_line, head_without_date
from nearvoice.edge.http.logs import EdgeAccessLogger, write_access
from nearvoice.edge.http.protocol import EdgeHandler, Guard
from nearvoice.edge.http.proxies import TrustedProxies
from nearvoice.edge.http.ranges import ByteRange, RangeError, parse_range
from nearvoice.edge.http.tls import TlsSettings, server_context
from nearvoice.edge.http.tls import reload as tls_reload
from nearvoice.edge.limits import Scope
from nearvoice.edge.metrics import Result, Source
from nearvoice.edge.node import Node
from nearvoice.edge.policy import Policy

KEEPALIVE_TIMEOUT = 75.0  # seconds an idle connection is kept: web.run_app's default
SHUTDOWN_TIMEOUT = 60.0  # seconds requests under way get at shutdown: web.run_app's default

HEAD_MEMO = 1024  # answered request heads whose parse is remembered (emptied when full)
HEAD_MEMO_MAX_BYTES = 2048  # longer heads are parsed every time
PREPARED_PER_ENTRY = 16  # answers kept ready per hot object (emptied when full)

_SPEECH_GET = b"GET /v1/speech/"
_KID = re.compile(r"[?&]kid=([^&]*)")
# RFC 9112 section 3: request-line = method SP request-target SP HTTP-version. Only the
# canonical speech path, with no percent-encoding, so the raw target is the path the
# router would match; the query must be there, since no URL verifies without one.
_REQUEST_LINE = re.compile(rb"GET (/v1/speech/[0-9a-f]{64}\.[a-z0-9]{1,8}\?[!-~]+) HTTP/1\.1")
# Any request line aiohttp might take: enough to tell whether a head has a body.
_ANY_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) [!-~]+ HTTP/1\.[01]")
# RFC 9112 section 5: field-line = field-name ":" OWS field-value OWS, names being tokens
# (RFC 9110 section 5.6.2). Held here to leading spaces and a value of visible ASCII with
# inner spaces, so that the value is the same however a parser trims whitespace; a tab,
# trailing whitespace, obs-text or a control character sends the head to aiohttp.
_FIELD_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+): *((?:[!-~]+ +)*[!-~]+)?")
SIMPLE_FIELDS = frozenset(
    (
        b"host",
        b"user-agent",
        b"accept",
        b"accept-encoding",
        b"accept-language",
        b"range",
        b"connection",
    )
)
"""Fields that cannot change the answer to a GET hit: Host (a node is one origin server),
content negotiation (one representation, never compressed), User-Agent, Range (evaluated
here by the same `parse_range`), and Connection when it says `keep-alive`."""
# RFC 9112 section 6.3: a request has a body only with Content-Length or Transfer-Encoding;
# after Upgrade (RFC 9110 section 7.8) the bytes may not be HTTP at all.
_FRAMING_FIELDS = frozenset((b"content-length", b"transfer-encoding", b"upgrade"))


def fast_path_enabled(node: Node) -> bool:
    """The switch, direct answers allowed, and aiohttp's internals as expected."""
    return node.config.http.fast_path and node.delivery.direct and aiohttp_private.compatible()


def _without_body(head: bytes) -> bool:
    """True when `head` (one complete request head) is a whole request: after aiohttp
    parses it, its parser holds nothing and the next byte starts a new request."""
    lines = head.split(b"\r\n")
    request_line = _ANY_REQUEST_LINE.fullmatch(lines[0])
    if request_line is None or request_line[1] == b"CONNECT":
        return False
    for line in lines[1:]:
        name, colon, _ = line.partition(b":")
        if not colon or name.strip().lower() in _FRAMING_FIELDS:
            return False
    return True


class FastHitHandler(EdgeHandler):
    __slots__ = ("_aligned", "_last_answer", "_node", "_pending", "_server")

    def __init__(self, server: EdgeServer, node: Node, guard: Guard, **kwargs: Any) -> None:
        super().__init__(server, guard, **kwargs)
        self._server = server
        self._node = node
        self._last_answer = (0, 0)
        self._pending = b""
        """The start of a request head that arrived without its end (RFC 9112 section
        2.1 lets a message arrive in any number of segments)."""
        self._aligned = True
        """aiohttp's parser holds no partial message: all it was given so far made
        complete requests without bodies, so the next byte starts a request head. Once a
        body, a pipeline or anything unclear went to aiohttp, the connection stays
        aiohttp's for good."""

    def http_received(self, data: bytes) -> None:
        if not self._aligned or not data:
            # b"" comes from aiohttp resuming its own parsing; nothing of ours is in it.
            RequestHandler.data_received(self, data)
            return
        buffer = self._pending + data if self._pending else data
        self._pending = b""
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if self._may_complete(buffer):
                self._pending = buffer
                return
            self._aligned = False
        elif end + 4 == len(buffer):
            head = buffer[:end]
            if self._answer(head):
                return
            self._aligned = _without_body(head)
        else:
            self._aligned = False  # a body, or pipelined requests: aiohttp's to parse
        RequestHandler.data_received(self, buffer)

    def _client(self) -> str | None:
        """The client address as aiohttp's BaseRequest.remote reads it."""
        peer = self.peername
        return str(peer[0]) if isinstance(peer, list | tuple) else None

    def _may_complete(self, partial: bytes) -> bool:
        """Whether a head without its end is worth holding back: it may still become a
        request this path answers, with CRLF line ends only (a bare LF or CR is aiohttp's
        to judge, and must not leave the client waiting for an end that never comes)."""
        crlf = partial.count(b"\r\n")
        # A CR at the very end may still get its LF; any other lone CR or LF never will.
        lone_cr = partial.count(b"\r") - crlf - (1 if partial.endswith(b"\r") else 0)
        return (
            partial[: len(_SPEECH_GET)] == _SPEECH_GET[: len(partial)]
            and len(partial) < self.max_line_size + self.max_field_size
            and partial.count(b"\n") == crlf
            and lone_cr == 0
        )

    def _answer(self, head: bytes) -> bool:
        """Answers `head` if it is a simple hit (module docstring); False to hand it on."""
        started = time.perf_counter()
        if not aiohttp_private.idle(self):
            return False
        # A popular object's players send the very same head again and again: its parse,
        # a pure function of the bytes, is looked up rather than redone. Only heads that
        # were answered are remembered, so the memo holds requests for verified URLs.
        heads = self._server.heads
        parsed = heads.get(head)
        known = parsed is not None
        if parsed is None:
            parsed = self._parse(head)
            if parsed is None:
                return False
        target, range_header, agent = parsed
        if not self._send_hit(target, range_header, started):
            return False
        if not known and len(head) <= HEAD_MEMO_MAX_BYTES:
            if len(heads) >= HEAD_MEMO:
                heads.clear()
            heads[head] = parsed
        self._log_access(target, started, agent)
        return True

    def _parse(self, head: bytes) -> tuple[str, str | None, str] | None:
        """The target, Range and User-Agent of a head this path may answer, else None."""
        lines = head.split(b"\r\n")
        request = _REQUEST_LINE.fullmatch(lines[0])
        if request is None or len(lines[0]) > self.max_line_size:
            return None
        range_header: str | None = None
        agent = ""
        seen: set[bytes] = set()
        for line in lines[1:]:
            field = _FIELD_LINE.fullmatch(line)
            if field is None or len(line) > self.max_field_size:
                return None
            name = field[1].lower()
            if name not in SIMPLE_FIELDS or name in seen:
                return None
            seen.add(name)
            value = field[2] or b""
            if name == b"range":
                range_header = value.decode("ascii")
            elif name == b"connection" and value.lower() != b"keep-alive":
                return None
            elif name == b"user-agent":
                agent = value.decode("ascii")
        if b"host" not in seen:
            return None  # RFC 9112 section 3.2: a 400, aiohttp's to send
        return request[1].decode("ascii"), range_header, agent

    def _log_access(self, target: str, started: float, agent: str) -> None:
        """The access record aiohttp's path would write (edge.http.logs)."""
        logger = self.access_logger
        if isinstance(logger, EdgeAccessLogger) and logger.enabled:
            status, size = self._last_answer
            write_access(logger.logger, logger.fmt, self._client(), "GET", target, status, size,
                         time.perf_counter() - started, agent)  # fmt: skip

    def _send_hit(self, target: str, range_header: str | None, started: float) -> bool:
        """`edge.handlers.speech.speech` for a hit in memory, or False before any effect."""
        node = self._node
        now = time.time()
        client = self._client()
        grant = node.remembered(target, client, now)
        if grant is None or not grant.policy.stored or node.running_fill(grant) is not None:
            return False
        admit = None
        if node.config.limits.enabled:
            kid = _KID.search(target)
            admit = admission(node, client, kid[1] if kid else "", grant.policy, via_node=False)
        key = grant.spec.key
        entry = node.hot_entry(key, now)
        if entry is None or entry.body is None:
            return False
        answer = entry.prepared.get((grant.policy, range_header))
        if not isinstance(answer, Prepared):
            answer = _prepare(entry, grant.policy, range_header, node.delivery.max_ranges)
            if answer is None:
                return False  # 416 or multipart: the ordinary path's
        if admit is not None:
            if not admit.allows(Scope.HIT):
                return False  # the ordinary path answers and counts the 429
            admit(Scope.HIT)
        transport = self.transport
        assert transport is not None  # idle() checked it
        node.count_hit(key)
        payload = answer.payload
        transport.writelines((answer.head, date_line(), payload))
        self._last_answer = (answer.status, len(payload))
        metrics = node.metrics
        metrics.requests_by[Result.HIT].inc()
        metrics.bytes_by[Source.CACHE].inc(len(payload))
        metrics.ttfb_by[Result.HIT].observe(time.perf_counter() - started)
        aiohttp_private.answered_keepalive(self, self._server)
        self._server.fast_answers += 1
        activity.RENDERS.request()  # traffic, as the app's requests are (edge.http.middleware)
        return True


@dataclass(frozen=True, slots=True)
class Prepared:
    """A fast answer about one hot entry, ready but for its Date line."""

    status: int
    head: bytes
    """Status line and headers up to Date (edge.http.direct.head_without_date)."""
    payload: memoryview | bytes


def _prepare(
    entry: HotEntry, policy: Policy, range_header: str | None, max_ranges: int
) -> Prepared | None:
    """The answer `direct_parts` gives for `range_header` on `entry` under `policy`, kept
    with the entry (a bounded number per entry); None for a 416 or a multipart answer."""
    assert entry.body is not None
    ranges: list[ByteRange] = []
    if range_header is not None:
        try:
            ranges = parse_range(range_header, entry.meta.length, max_ranges) or []
        except RangeError:
            return None  # 416, a JSON answer
        if len(ranges) > 1:
            return None  # multipart/byteranges
    status, fixed, varying, payload = direct_parts(entry.meta, policy, entry.body, ranges)
    answer = Prepared(status.value, head_without_date(status, fixed, varying), payload)
    if len(entry.prepared) >= PREPARED_PER_ENTRY:
        entry.prepared.clear()
    entry.prepared[(policy, range_header)] = answer
    return answer


class EdgeServer(web.Server):
    """aiohttp's connection factory, making `EdgeHandler`s (edge.http.protocol), or
    `FastHitHandler`s when the node takes the fast path."""

    def __init__(self, node: Node, plain: web.Server, fast: bool) -> None:
        # The plain server's settings as aiohttp assembled them (handler_args, access log,
        # keep-alive timeout): the same connections, one override apart.
        super().__init__(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            **aiohttp_private.server_kwargs(plain),
        )
        self.node = node
        self.fast = fast
        http = node.config.http
        metrics = node.metrics
        self.guard = Guard(
            trusted=TrustedProxies(http.trusted_proxies),
            proxy_protocol=http.proxy_protocol,
            header_timeout=http.header_timeout,
            max_connections_per_client=http.max_connections_per_client,
            on_rejected=lambda: metrics.requests_by[Result.REJECTED].inc(),
        )
        self.fast_answers = 0
        """Requests answered by the fast path, for tests and debugging."""
        self.heads: dict[bytes, tuple[str, str | None, str]] = {}
        """Request heads this path has parsed: their target, Range and User-Agent."""

    def __call__(self) -> RequestHandler:
        loop = aiohttp_private.loop_of(self)
        kwargs = aiohttp_private.server_kwargs(self)
        if self.fast:
            return FastHitHandler(self, self.node, self.guard, loop=loop, **kwargs)
        return EdgeHandler(self, self.guard, loop=loop, **kwargs)


class EdgeRunner(web.AppRunner):
    """`web.AppRunner` whose server is the node's hardened one (`EdgeServer`), taking the
    fast path when the node allows it."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        node = self.app.get(NODE)
        if node is None or not aiohttp_private.compatible():
            return server
        return EdgeServer(node, server, fast_path_enabled(node))


def run(
    app: web.Application,
    *,
    host: str,
    port: int,
    reuse_port: bool,
    access_log: logging.Logger | None,
    access_log_class: type[AbstractAccessLogger] | None = None,
    tls: TlsSettings | None = None,
    handshake_timeout: float = 60.0,
) -> None:
    """`web.run_app(app, ...)` with `EdgeRunner`: serves until SIGINT or SIGTERM, then
    shuts down gracefully (aiohttp's signal handlers raise GracefulExit). With `tls`
    enabled the listener speaks HTTP/1.1 over TLS, a handshake must end within
    `handshake_timeout` seconds, and SIGHUP reloads its certificate (edge.http.tls)."""

    async def serve() -> None:
        extra: dict[str, Any] = {}
        if access_log_class is not None:
            extra["access_log_class"] = access_log_class
        runner = EdgeRunner(
            app,
            handle_signals=True,
            access_log=access_log,
            keepalive_timeout=KEEPALIVE_TIMEOUT,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            **extra,
        )
        await runner.setup()
        context = server_context(tls) if tls is not None else None
        if context is not None and tls is not None:
            settings = tls
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGHUP, lambda: tls_reload(context, settings)
            )
        listener: asyncio.Server | None = None
        try:
            if context is None:
                await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
            else:
                # aiohttp's TCPSite cannot bound the TLS handshake: a client that opens a
                # connection and never finishes its ClientHello would hold it for asyncio's
                # default minute, before any header timeout can start.
                assert runner.server is not None
                listener = await asyncio.get_running_loop().create_server(
                    runner.server,
                    host,
                    port,
                    ssl=context,
                    reuse_port=reuse_port or None,
                    ssl_handshake_timeout=handshake_timeout,
                )
            await asyncio.Event().wait()
        finally:
            if listener is not None:
                listener.close()  # no new connections; the runner drains the open ones
            await runner.cleanup()

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    task = loop.create_task(serve())
    try:
        loop.run_until_complete(task)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(task)
        leftover = asyncio.all_tasks(loop)
        for other in leftover:
            other.cancel()
        loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
