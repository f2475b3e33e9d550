"""Realtime speech (docs/contracts.md#realtime-speech): a WebSocket door over the one request core.

    GET  /v1/realtime/speech     upgrades to a WebSocket (API key or ?token=)
    POST /v1/realtime/tokens     mints a browser session token with an API key
    GET  /demo                   a page that streams typed text and plays the audio

The protocol state is `edge.realtime.session.Session` (no I/O); this module runs it over
aiohttp's WebSocketResponse. Each segment the session completes is an ordinary speech
object: its own spec (the session's voice, format and speed; the tenant's policy), signed
into the URL an upstream would be asked for, and served by `edge.core.serve` exactly as a
signed URL is, so a repeated phrase is a hit, concurrent sessions saying the same phrase
share one render, and a voice this node does not render comes from upstream. The door
(`SegmentDoor`) frames what the core found as `segment.started`, binary frames and
`segment.done`, in segment order, however the renders finish.

Scheduling and pressure:
* a segment that would start a render takes a turn first (edge.realtime.turns): sessions
  take turns, so one session's pasted essay does not queue ahead of everyone else;
* frames go through a bounded queue to one writer task: a slow reader holds back its own
  segments (their fills go on, owned by the node), and a reader that takes nothing for
  `[realtime] send_timeout` is closed with 4004;
* per tenant, at most `realtime_sessions` open sessions (4003) and
  `realtime_chars_per_second` of text per session (4001), through the node's one limiter;
  no tenant's sessions count against another's.

A client that disconnects abandons only its own reads: fills belong to the node and go on
for whoever else shares them. A segment whose render or upstream fails gets an `error`
event with its index, and the session goes on.

Authentication happens before the upgrade, and failures are the HTTP JSON errors of
signed URLs: 401 without credentials, 403 for a token that does not verify, 410 for one
that has expired. `?token=` is never logged (edge.http.accesslog redacts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from urllib.parse import urlencode

from aiohttp import WSMsgType, hdrs, web

from nearvoice.edge.cache.fill import Fill, FillFailed
from nearvoice.edge.cache.hot import SharedFile
from nearvoice.edge.core import serve
from nearvoice.edge.errors import BadRequest, RequestError, Unauthorized
from nearvoice.edge.handlers.keys import API_KEYS, NODE
from nearvoice.edge.handlers.openai import authenticate, parse_json, read_body
from nearvoice.edge.http.deliver import Delivered
from nearvoice.edge.limits import RateLimited, Rates, Scope
from nearvoice.edge.metrics import Result
from nearvoice.edge.node import Held, Node
from nearvoice.edge.realtime import protocol, tokens
from nearvoice.edge.realtime.framing import Framer
from nearvoice.edge.realtime.protocol import CLIENT_CLOSED, CLOSE_REASONS, Close, ProtocolError
from nearvoice.edge.realtime.session import (
    Drop,
    Finish,
    Render,
    Segment,
    Send,
    Session,
    VoiceInfo,
    sample_rate,
)
from nearvoice.edge.realtime.turns import Turn, Turns
from nearvoice.edge.seats import Seats, SharedSeats
from nearvoice.edge.spec import Spec, SpecError
from nearvoice.edge.token import Grant, sign_query, speech_path

log = logging.getLogger("nearvoice.realtime")
CLOSE_WAIT = 5.0  # seconds a closing session waits for the client's close frame
TOKEN_FIELDS = frozenset(("voice", "ttl"))
_CACHE = {
    Result.HIT: "hit",
    Result.STALE: "hit",
    Result.MISS: "miss",
    Result.BYPASS: "miss",
    Result.COLLAPSED: "collapsed",
}


class UpgradeRequired(RequestError):
    status = HTTPStatus.UPGRADE_REQUIRED


@dataclass
class Hub:
    """What a node's sessions share: open sessions per tenant (for the node, whichever
    worker holds them) and the render turns."""

    turns: Turns
    seats: Seats = field(default_factory=Seats)
    ids: itertools.count[int] = field(default_factory=itertools.count)
    process: str = field(default_factory=lambda: os.urandom(8).hex())
    """Names this process's sessions in the node's shared rate-limit buckets, where the
    session ids of another worker (or of this worker's previous life) count too."""

    def enter(self, tenant: str, limit: int) -> bool:
        return self.seats.enter(tenant, limit)

    def leave(self, tenant: str) -> None:
        self.seats.leave(tenant)

    def close(self) -> None:
        self.seats.close()


HUB = web.AppKey("realtime_hub", Hub)


def create_hub(node: Node, tenants: Sequence[str]) -> Hub:
    """The hub of a node with these API tenants; with several workers, their sessions are
    counted in `<data>/realtime.seats` (edge.seats)."""
    slots = node.config.realtime.render_slots
    if not slots:
        slots = node.renderer.workers if node.renderer is not None else os.cpu_count() or 1
    seats = Seats()
    if node.config.workers > 1:
        path = Path(node.config.data_dir) / "realtime.seats"
        seats = SharedSeats(path, tenants, node.config.workers, node.siblings.index)
    return Hub(Turns(slots), seats)


def voices_of(node: Node) -> dict[str, VoiceInfo]:
    """Names a session may ask for (aliases of [api.voices] included) and what each is."""
    found = {name: VoiceInfo(name, v.sample_rate) for name, v in node.voices.items()}
    for alias, name in node.config.api.voices.items():
        if name in found:
            found[alias] = found[name]
    return found


# -- authentication -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Caller:
    tenant: str
    voice: str | None = None
    """The voice a session token binds the session to."""
    expires: int | None = None


def _authenticate(request: web.Request, node: Node) -> Caller:
    token = request.query.get("token")
    if token is not None:
        if len(request.query.getall("token")) > 1 or set(request.query) != {"token"}:
            raise BadRequest("unknown_parameter", "the only query parameter is `token`")
        found = tokens.verify(
            node.keyring, token, now=time.time(), skew=node.config.http.clock_skew
        )
        if found.voice not in node.voices:
            raise BadRequest("unknown_voice", f"unknown voice {found.voice!r}")
        return Caller(found.tenant, found.voice, found.expires)
    if request.query:
        raise BadRequest("unknown_parameter", "the only query parameter is `token`")
    keys = request.app[API_KEYS]
    if not keys:
        raise Unauthorized(
            "realtime_disabled", "realtime sessions need NEARVOICE_API_KEYS on this node"
        )
    return Caller(authenticate(keys, request))


async def mint_token(request: web.Request) -> web.StreamResponse:
    """`POST /v1/realtime/tokens` with `Authorization: Bearer <api key>` and
    `{"voice": name, "ttl": seconds}`: a session token for a browser, and its URL."""
    node = request.app[NODE]
    settings = node.config.realtime
    tenant = authenticate(request.app[API_KEYS], request)
    data = parse_json(await read_body(request, 4096))
    unknown = sorted(set(data) - TOKEN_FIELDS)
    if unknown:
        raise BadRequest("unknown_parameter", f"unknown field {unknown[0]!r}")
    named = data.get("voice")
    info = voices_of(node).get(named) if isinstance(named, str) else None
    if info is None:
        raise BadRequest("unknown_voice", "voice must name one of the node's voices")
    ttl = data.get("ttl", settings.token_ttl)
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 1 <= ttl <= settings.max_token_ttl:
        raise BadRequest("bad_ttl", f"ttl must be an integer within 1..{settings.max_token_ttl}")
    token = tokens.SessionToken(tenant, info.name, int(time.time()) + ttl)
    text = tokens.encode(node.keyring, token)
    scheme = "wss" if request.secure else "ws"
    url = f"{scheme}://{request.host}/v1/realtime/speech?{urlencode({'token': text})}"
    return web.json_response(
        {"token": text, "url": url, "voice": info.name, "expires_at": token.expires}
    )


# -- the session over a socket --------------------------------------------------------------


async def speech(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    caller = _authenticate(request, node)
    settings = node.config.realtime
    ws = web.WebSocketResponse(max_msg_size=settings.max_message_bytes, timeout=CLOSE_WAIT)
    if not ws.can_prepare(request).ok:
        raise UpgradeRequired(
            "websocket_required", "GET /v1/realtime/speech upgrades to a WebSocket"
        )
    await ws.prepare(request)
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if settings.socket_send_buffer and sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.socket_send_buffer)
    await Connection(request, node, ws, caller).run()
    return ws


_Done = object()  # writer sentinel: `done` went out, close normally


class _Closed(Exception):
    """The session is closing: nothing more goes into its queue."""


class Connection:
    def __init__(
        self, request: web.Request, node: Node, ws: web.WebSocketResponse, caller: Caller
    ) -> None:
        self.request = request
        self.node = node
        self.ws = ws
        self.caller = caller
        self.hub = request.app[HUB]
        self.settings = node.config.realtime
        self.tenant = node.config.api.tenant(caller.tenant)
        self.id = next(self.hub.ids)
        self.voices = voices_of(node)
        max_chars = min(self.settings.max_segment_chars, node.config.synth.max_text_chars)
        bound = self.voices[caller.voice].name if caller.voice else None
        self.session = Session(self.voices, bound_voice=bound, max_segment_chars=max_chars)
        self.queue: asyncio.Queue[str | bytes | object] = asyncio.Queue(
            max(1, self.settings.queue_frames)
        )
        self.close_code: Close | None = None
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.order: dict[int, asyncio.Event] = {}
        """Per segment not yet through: set once it is (sent, failed or dropped)."""
        self.background: set[asyncio.Task[None]] = set()
        self._closer: asyncio.Task[None] | None = None

    async def run(self) -> None:
        metrics = self.node.metrics
        if not self.hub.enter(self.caller.tenant, self.tenant.realtime_sessions):
            self.close_code = Close.TOO_MANY_SESSIONS
            await self._close(Close.TOO_MANY_SESSIONS, "too many sessions for this tenant")
            metrics.realtime_closes.labels(CLOSE_REASONS[Close.TOO_MANY_SESSIONS]).inc()
            return
        metrics.realtime_sessions.inc()
        writer = asyncio.create_task(self._write(), name=f"realtime-{self.id}-writer")
        expiry = None
        if self.caller.expires is not None:
            delay = self.caller.expires + self.node.config.http.clock_skew - time.time()
            expiry = asyncio.get_running_loop().call_later(
                max(0.0, delay), self._finish, Close.POLICY, "session token expired"
            )
        try:
            await self._read()
        finally:
            if expiry is not None:
                expiry.cancel()
            for task in list(self.tasks.values()):
                task.cancel()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            if self._closer is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await self._closer
            self.hub.leave(self.caller.tenant)
            self.hub.turns.forget(self.id)
            metrics.realtime_sessions.dec()
            reason = CLIENT_CLOSED if self.close_code is None else CLOSE_REASONS[self.close_code]
            metrics.realtime_closes.labels(reason).inc()

    # -- reading --------------------------------------------------------------------------
    async def _read(self) -> None:
        ws = self.ws
        while True:
            try:
                msg = await ws.receive(timeout=self.settings.idle_timeout)
            except TimeoutError:
                if self.session.outstanding == 0 and self.queue.empty():
                    self._finish(Close.IDLE, "idle")
                continue
            if msg.type is WSMsgType.TEXT:
                await self._text(msg.data)
            elif msg.type is WSMsgType.BINARY:
                self._finish(Close.BINARY, "binary frames are not accepted")
            elif msg.type is WSMsgType.ERROR:
                # aiohttp has closed with the frame error's own code (1009 when too big).
                if ws.close_code == Close.TOO_BIG and self.close_code is None:
                    self.close_code = Close.TOO_BIG
                return
            elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return

    async def _text(self, raw: str) -> None:
        if self.close_code is not None:
            return
        try:
            try:
                event = protocol.parse(raw)
            except ProtocolError as exc:
                await self._put(protocol.encode(protocol.error(exc.code, str(exc))))
                return
            if isinstance(event, protocol.TextDelta) and not self._allowed(len(event.text)):
                return
            for action in self.session.receive(event, time.perf_counter()):
                await self._act(action)
        except _Closed:
            return

    def _allowed(self, chars: int) -> bool:
        cps = self.tenant.realtime_chars_per_second
        if cps <= 0 or chars == 0:
            return True
        burst = max(cps, float(self.settings.max_message_bytes))
        try:
            self.node.limiter.take(
                ("realtime", self.caller.tenant, self.hub.process, self.id),
                Scope.MISS,
                Rates(miss_rate=cps, miss_burst=burst),
                "realtime",
                "realtime",
                cost=chars,
            )
        except RateLimited:
            self._finish(Close.RATE_LIMIT, f"over {cps:g} characters per second")
            return False
        return True

    async def _act(self, action: Send | Render | Drop | Finish) -> None:
        if isinstance(action, Send):
            await self._put(protocol.encode(action.message))
        elif isinstance(action, Render):
            self._start(action.segment)
        elif isinstance(action, Drop):
            for index in action.indices:
                task = self.tasks.get(index)
                if task is not None:
                    task.cancel()
        else:
            await self._put(_Done)

    # -- segments -------------------------------------------------------------------------
    def _start(self, segment: Segment) -> None:
        earlier = list(self.order.values())
        self.order[segment.index] = asyncio.Event()
        task = asyncio.create_task(
            self._segment(segment, earlier), name=f"realtime-{self.id}-{segment.index}"
        )
        self.tasks[segment.index] = task

    async def _segment(self, segment: Segment, earlier: list[asyncio.Event]) -> None:
        door = SegmentDoor(self, segment, earlier)
        try:
            try:
                grant, target = self._grant(segment)
                if self.node.hot_entry(grant.spec.key, time.time()) is None and not (
                    self.node.joinable(grant)
                ):
                    door.turn = await self.hub.turns.take(self.id)
                await serve(self.node, grant, target, door, started=time.perf_counter())
            except RequestError as exc:  # refused, or its fill failed before a byte was sent
                door.release()
                await door.in_order()
                error = protocol.error(exc.code, exc.message, segment.index)
                await self._put(protocol.encode(error))
            for action in self.session.finished(segment.index):
                await self._act(action)
        except _Closed:
            pass
        except asyncio.CancelledError:
            self.session.finished(segment.index)
            raise
        finally:
            door.release()
            self.tasks.pop(segment.index, None)
            event = self.order.pop(segment.index)
            event.set()

    def _grant(self, segment: Segment) -> tuple[Grant, str]:
        voice = self.node.voices[segment.voice]
        try:
            spec = Spec.create(
                text=segment.text,
                voice=voice.name,
                format=segment.format,
                model=voice.model_id,
                speed=segment.speed,
            )
        except SpecError as exc:
            raise BadRequest(exc.code, str(exc)) from exc
        policy = self.tenant.policy
        query = sign_query(self.node.keyring, spec, policy=policy, ttl=self.node.config.api.url_ttl)
        grant = Grant(spec=spec, policy=policy, expires=int(query["exp"]))
        return grant, f"{speech_path(spec)}?{urlencode(query)}"

    # -- writing --------------------------------------------------------------------------
    async def _put(self, item: str | bytes | object) -> None:
        """Queues a frame for the writer; a reader that takes nothing for `send_timeout`
        closes the session (the queue is full because the socket is)."""
        if self.close_code is not None:
            raise _Closed
        try:
            await asyncio.wait_for(self.queue.put(item), self.settings.send_timeout)
        except TimeoutError:
            self._finish(Close.SLOW_READER, "the client is not reading")
            raise _Closed from None

    async def _write(self) -> None:
        ws = self.ws
        try:
            while True:
                item = await self.queue.get()
                if item is _Done:
                    self._finish(Close.NORMAL, "done")
                    return
                if isinstance(item, str):
                    await ws.send_str(item)
                elif isinstance(item, bytes):
                    await ws.send_bytes(item)
        except (ConnectionError, RuntimeError):
            return  # the client went away; the reader sees the socket close

    def _finish(self, code: Close, message: str) -> None:
        """Closes the session with `code` (the first reason given wins)."""
        if self.close_code is not None:
            return
        self.close_code = code
        self._closer = asyncio.create_task(self._close(code, message))

    async def _close(self, code: Close, message: str) -> None:
        try:
            async with asyncio.timeout(self.settings.send_timeout + CLOSE_WAIT):
                await self.ws.close(code=code, message=message.encode()[:123])
        except (TimeoutError, ConnectionError):
            if self.request.transport is not None:
                self.request.transport.abort()


class SegmentDoor:
    """One segment's framing over the core (edge.core.Door): waits for the segments
    before it, then `segment.started`, the audio frames, `segment.done`."""

    def __init__(self, conn: Connection, segment: Segment, earlier: list[asyncio.Event]) -> None:
        self.conn = conn
        self.segment = segment
        self.earlier = earlier
        self.turn: Turn | None = None

    def release(self) -> None:
        if self.turn is not None:
            self.turn.release()

    async def in_order(self) -> None:
        for event in self.earlier:
            await event.wait()

    async def send_object(
        self, held: Held, file: SharedFile | None, result: Result, age: int | None
    ) -> Delivered:
        self.release()
        body = held.body
        if body is None:
            assert file is not None
            loop = asyncio.get_running_loop()
            body = await loop.run_in_executor(
                self.conn.node.io, os.pread, file.fd, held.meta.length, 0
            )
        await self.in_order()
        framer = await self._begin(result)
        sent, first = await self._audio(framer, _whole(body))
        await self._end(framer)
        return Delivered(web.Response(), sent, first)

    async def send_fill(self, fill: Fill, result: Result) -> Delivered:
        if result in (Result.MISS, Result.BYPASS):
            self._release_when_done(fill)
        else:
            self.release()  # joined: someone else's render
        await self.in_order()
        await fill.until_started()
        framer = await self._begin(result)
        try:
            sent, first = await self._audio(framer, fill.read(0, None))
        except FillFailed as exc:
            log.warning("realtime segment %s cut: %s", fill.key, exc)
            message = protocol.error(exc.code, str(exc), self.segment.index)
            await self.conn._put(protocol.encode(message))
            return Delivered(web.Response(), framer.sent)
        await self._end(framer)
        return Delivered(web.Response(), sent, first)

    def _release_when_done(self, fill: Fill) -> None:
        async def wait() -> None:
            try:
                while fill.is_running():
                    await fill.changed()
            finally:
                self.release()

        task = asyncio.create_task(wait())
        self.conn.background.add(task)
        task.add_done_callback(self.conn.background.discard)

    async def _begin(self, result: Result) -> Framer:
        conn, segment = self.conn, self.segment
        conn.session.started(segment.index)
        voice = conn.voices[segment.voice]
        rate = sample_rate(voice, segment.format)
        framer = Framer(segment.format, rate, segment.index, conn.settings.frame_bytes)
        cache = _CACHE.get(result, "miss")
        conn.node.metrics.realtime_segments.labels(cache).inc()
        started = protocol.segment_started(segment.index, segment.text, cache)
        await conn._put(protocol.encode(started))
        return framer

    async def _audio(
        self, framer: Framer, chunks: AsyncIterator[bytes | memoryview]
    ) -> tuple[int, float | None]:
        """Sends the segment's audio; returns the bytes sent and when the first went."""
        first = None
        async for chunk in chunks:
            frames = framer.push(chunk)
            first = await self._send(frames, first)
        first = await self._send(framer.finish(), first)
        return framer.sent, first

    async def _send(self, frames: list[bytes], first: float | None) -> float | None:
        for frame in frames:
            if first is None:
                first = time.perf_counter()
                waited = first - self.segment.completed_at
                self.conn.node.metrics.realtime_first_audio.observe(waited)
            await self.conn._put(frame)
        return first

    async def _end(self, framer: Framer) -> None:
        message = protocol.segment_done(self.segment.index, framer.audio_ms)
        await self.conn._put(protocol.encode(message))


# -- the demo page --------------------------------------------------------------------------


async def demo(request: web.Request) -> web.StreamResponse:
    """The demo page (edge/static/demo.html), served from the installed package."""
    page = resources.files("nearvoice.edge").joinpath("static/demo.html").read_bytes()
    return web.Response(
        body=page,
        content_type="text/html",
        charset="utf-8",
        headers={hdrs.CACHE_CONTROL: "no-cache"},
    )


async def _whole(body: bytes) -> AsyncIterator[bytes]:
    yield body
