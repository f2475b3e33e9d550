"""The OpenAI-compatible speech API (docs/contracts.md#the-openai-compatible-speech-api): a
door over the one core.

    POST /v1/audio/speech    audio for `input` in `voice` (raw body, or SSE events)
    GET  /v1/models          the model ids `model` may name
    GET  /v1/audio/voices    the voices `voice` may name, aliases included

An application written against OpenAI's speech API points its SDK's `base_url` at a node
and nothing else changes. Each request is parsed into a spec and the tenant's policy and
then takes exactly the signed-URL path (edge.core): it is signed into the URL a player
would use, that URL names the object in `Content-Location` (RFC 9110 section 8.7) and is
what an upstream is asked for on a miss; identical requests hit the cache, concurrent ones
share one render, and a miss streams as it renders.

Request fields are OpenAI's. `model` does not change the render. Speeds outside the
engines' 0.5-2.0 are clamped, and `X-Nearvoice-Speed` gives the speed applied. `pcm` is
24 kHz s16le whatever the voice's own rate: the spec then carries `rate`, a different
object. `instructions` becomes the spec's `emotion.text` for a voice whose engine honours
emotion (an external server's, where configured) and is ignored for the others. The
spec's own extensions `duration`, `emotion` and `lang` are taken under their spec names
and validated as the minting API validates them (`unsupported_control` for a control the
voice's engine does not honour, `conflicting_controls` for a duration with a speed); a
`ref` needs the origin's minting API, which binds the clip's hash.

Answers: the raw audio (`stream_format: "audio"`, the default) or, for `"sse"`,
`text/event-stream` (WHATWG HTML section 9.2) with `speech.audio.delta` events (base64
audio) and a final `speech.audio.done`. The SDK sends `Accept: application/octet-stream`
for both, so the body's field decides, never the Accept header. `X-Nearvoice-Cache` says
what the core found: hit, miss, collapsed, stale or bypass (a `draft` tenant's).

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the
status the SDK maps to its exception types. Once the 200 has gone out, a failing render or
upstream cannot change it: the raw stream is cut without its last chunk (RFC 9112 section
7.1), so no client takes a short body for the whole, and an SSE stream ends with an
`error` event.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import urlencode

from aiohttp import hdrs, web

from nearvoice.edge import controls
from nearvoice.edge.apikeys import ApiKeys
from nearvoice.edge.cache.fill import Fill, FillFailed
from nearvoice.edge.cache.hot import SharedFile
from nearvoice.edge.config import TenantSettings
from nearvoice.edge.core import serve
from nearvoice.edge.errors import BadRequest, PayloadTooLarge, RequestError, Unauthorized
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.handlers.keys import API_KEYS, NODE
from nearvoice.edge.http.deliver import Delivered
from nearvoice.edge.http.requests import MAX_JSON_DEPTH, json_depth
from nearvoice.edge.http.sendfile import send_file_range
from nearvoice.edge.limits import Scope
from nearvoice.edge.metrics import Result
from nearvoice.edge.node import Held, Node
from nearvoice.edge.policy import Policy
from nearvoice.edge.spec import MAX_SPEED, MIN_SPEED, Emotion, Spec, SpecError
from nearvoice.edge.token import Grant, sign_query, speech_path
from nearvoice.edge.voices import Voice, refused_control

log = logging.getLogger("nearvoice.api")

MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "nearvoice")
"""Model ids `model` may name; none changes the render."""
FORMATS: Mapping[str, AudioFormat] = {
    "mp3": AudioFormat.MP3,
    "opus": AudioFormat.OPUS,
    "aac": AudioFormat.AAC,
    "flac": AudioFormat.FLAC,
    "wav": AudioFormat.WAV,
    "pcm": AudioFormat.PCM,
}
PCM_RATE = 24000
"""Hz of `pcm` answers, whatever the voice's rate: what OpenAI's clients play it at."""
API_MIN_SPEED, API_MAX_SPEED = 0.25, 4.0
FIELDS = frozenset(
    ("model", "input", "voice", "instructions", "response_format", "speed", "stream_format")
)
SPEC_EXTENSIONS = frozenset(("duration", "emotion", "ref", "lang"))
"""Spec controls (docs/contracts.md#spec-and-key) this API will take under their spec names."""
MEMO_SIZE = 4096  # parsed, signed requests kept per node; each about 1 KiB with its URL
SSE_SLICE = 16 * 1024  # raw bytes per `speech.audio.delta` when sending a complete object
CACHE_HEADER = "X-Nearvoice-Cache"
SPEED_HEADER = "X-Nearvoice-Speed"
_ERROR_TYPES = {
    HTTPStatus.UNAUTHORIZED: "authentication_error",
    HTTPStatus.TOO_MANY_REQUESTS: "rate_limit_error",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- errors and accounting ----------------------------------------------------------------


def openai_error(
    status: int,
    message: str,
    code: str | None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """An error in OpenAI's shape; `type` follows the status as OpenAI's API sets it."""
    kind = _ERROR_TYPES.get(HTTPStatus(status))
    if kind is None:
        kind = "server_error" if status >= HTTPStatus.INTERNAL_SERVER_ERROR else None
    error = {
        "message": message,
        "type": kind or "invalid_request_error",
        "param": param,
        "code": code,
    }
    return web.json_response({"error": error}, status=status, headers=headers)


def endpoint(name: str) -> Callable[[Handler], Handler]:
    """Answers every refusal of the wrapped handler in OpenAI's shape, and counts each
    answer in `nearvoice_api_requests_total{endpoint,code}`."""

    def wrap(handler: Handler) -> Handler:
        async def run(request: web.Request) -> web.StreamResponse:
            try:
                response = await handler(request)
            except RequestError as exc:
                param = exc.extra.get("param")
                response = openai_error(
                    exc.status, exc.message, exc.code, param if isinstance(param, str) else None
                )
                response.headers.update(exc.headers)
            except web.HTTPException as exc:
                if exc.status < HTTPStatus.BAD_REQUEST:
                    raise
                code = HTTPStatus(exc.status).phrase.lower().replace(" ", "_")
                response = openai_error(exc.status, exc.reason, code)
            except (ConnectionError, TimeoutError):
                raise
            except Exception:
                log.exception("unhandled error on %s %s", request.method, request.path)
                response = openai_error(500, "internal error", "internal_error")
            request.app[NODE].metrics.api_requests.labels(name, str(response.status)).inc()
            return response

        return run

    return wrap


def authenticate(keys: ApiKeys, request: web.Request) -> str:
    """The tenant of the request's bearer token (RFC 6750 section 2.1); raises 401."""
    if not keys:
        raise Unauthorized(
            "api_disabled",
            'the speech API is off on this node: set NEARVOICE_API_KEYS="tenant:secret,..." '
            "in its environment (and [api.tenants.<tenant>] in its config for policy and "
            "rate limits) to enable it",
        )
    challenge = {"WWW-Authenticate": 'Bearer realm="nearvoice"'}
    scheme, _, token = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(
            "missing_api_key", "send your API key as Authorization: Bearer <key>", headers=challenge
        )
    tenant = keys.tenant_for(token.strip())
    if tenant is None:
        raise Unauthorized("invalid_api_key", "incorrect API key provided", headers=challenge)
    return tenant


# -- GET /v1/models, GET /v1/audio/voices ---------------------------------------------------


@endpoint("models")
async def models(request: web.Request) -> web.StreamResponse:
    authenticate(request.app[API_KEYS], request)
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "nearvoice"} for m in MODELS]
    return web.json_response({"object": "list", "data": data})


@endpoint("voices")
async def voices(request: web.Request) -> web.StreamResponse:
    authenticate(request.app[API_KEYS], request)
    node = request.app[NODE]
    listed = [_describe(name, voice) for name, voice in sorted(node.voices.items())]
    for alias, name in sorted(node.config.api.voices.items()):
        listed.append(_describe(alias, node.voices[name]))
    return web.json_response({"voices": listed})


def _describe(name: str, voice: Voice) -> dict[str, Any]:
    return {
        "id": name,
        "name": voice.name,
        "engine": voice.engine,
        "sample_rate": voice.sample_rate,
        "controls": list(voice.controls),
    }


def check_aliases(node: Node) -> None:
    """`[api.voices]` must name voices the node has, and must not shadow one."""
    for alias, name in node.config.api.voices.items():
        if not isinstance(name, str) or name not in node.voices:
            raise ValueError(f"[api.voices] {alias} names an unknown voice {name!r}")
        if alias in node.voices:
            raise ValueError(f"[api.voices] {alias} would shadow the voice of that name")


# -- POST /v1/audio/speech ------------------------------------------------------------------


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body: 413 past `limit` bytes, checked before and while reading."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge("body_too_large", f"the request body exceeds {limit} bytes")
    raw = bytearray()
    while True:
        chunk = await request.content.read(limit + 1 - len(raw))
        if not chunk:
            break
        raw += chunk
        if len(raw) > limit:
            raise PayloadTooLarge("body_too_large", f"the request body exceeds {limit} bytes")
    return bytes(raw)


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or 400."""
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise BadRequest("invalid_json", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest("invalid_json", f"the request body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequest("invalid_json", "the request body must be a JSON object")
    return data


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request parsed and signed: what the core needs, and how to frame the answer."""

    grant: Grant
    target: str
    """The signed URL's path and query: Content-Location, and what an upstream is asked."""
    sse: bool


class PreparedMemo:
    """Requests already parsed and signed, by (body digest, policy), least recently used
    dropped first. A repeated request (an application replaying a line) then skips the
    JSON, the validation, the spec's hash and the signature, as the signed-URL door's
    memo of verified URLs skips verifying them again. An entry is used only while its URL
    has at least half its validity left, so Content-Location never names a URL about to
    expire."""

    def __init__(self, size: int = MEMO_SIZE) -> None:
        self._size = size
        self._entries: OrderedDict[tuple[bytes, Policy], Prepared] = OrderedDict()

    def get(self, key: tuple[bytes, Policy], now: float, ttl: int) -> Prepared | None:
        found = self._entries.get(key)
        if found is None:
            return None
        if found.grant.expires - now < ttl / 2:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return found

    def put(self, key: tuple[bytes, Policy], prepared: Prepared) -> None:
        self._entries[key] = prepared
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)


MEMO = web.AppKey("speech_memo", PreparedMemo)


def prepare(node: Node, raw: bytes, policy: Policy, memo: PreparedMemo) -> Prepared:
    """The request in `raw` as a grant under `policy` and its signed URL; raises 400."""
    settings = node.config.api
    now = time.time()
    key = (hashlib.sha256(raw).digest(), policy)
    found = memo.get(key, now, settings.url_ttl)
    if found is not None:
        return found
    spec, sse = _parse(node, parse_json(raw))
    query = sign_query(node.keyring, spec, policy=policy, ttl=settings.url_ttl, now=now)
    grant = Grant(spec=spec, policy=policy, expires=int(query["exp"]))
    prepared = Prepared(grant, f"{speech_path(spec)}?{urlencode(query)}", sse)
    memo.put(key, prepared)
    return prepared


def _bad(message: str, param: str, code: str = "invalid_value", **extra: Any) -> BadRequest:
    return BadRequest(code, message, param=param, **extra)


def _parse(node: Node, data: Mapping[str, Any]) -> tuple[Spec, bool]:
    settings = node.config.api
    unknown = sorted(set(data) - FIELDS - SPEC_EXTENSIONS)
    if unknown:
        raise _bad(f"unknown parameter {unknown[0]!r}", unknown[0], "unknown_parameter")

    model = data.get("model")
    if model is None:
        raise _bad("you must provide a model parameter", "model", "missing_required_parameter")
    if model not in MODELS:
        raise _bad(f"unknown model {model!r}; known: {', '.join(MODELS)}", "model")

    text = data.get("input")
    if not isinstance(text, str) or not text.strip():
        raise _bad("input must be a non-empty string", "input", "missing_required_parameter")
    if len(text) > settings.max_input_chars:
        raise _bad(
            f"input is longer than {settings.max_input_chars} characters",
            "input",
            "string_above_max_length",
        )

    voice = _voice(node, data.get("voice"))

    instructions = data.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _bad("instructions must be a string", "instructions")
    try:
        extra = controls.from_json({k: data[k] for k in SPEC_EXTENSIONS if k in data})
    except SpecError as exc:
        raise _bad(str(exc), exc.code.removeprefix("bad_"), exc.code) from exc
    if "ref_id" in extra:  # only an origin holds clips and knows their hashes
        raise _bad(
            "reference voices are named in specs minted by the origin", "ref", "unsupported_control"
        )
    if instructions and "emotion" not in extra and "emotion" in voice.controls:
        extra["emotion"] = Emotion.create(text=instructions)

    named = data.get("response_format", "mp3")
    fmt = FORMATS.get(named) if isinstance(named, str) else None
    if fmt is None:
        raise _bad(
            f"unsupported response_format {named!r}; supported: {', '.join(FORMATS)}",
            "response_format",
        )

    speed = data.get("speed", 1.0)
    if (
        not isinstance(speed, int | float)
        or isinstance(speed, bool)
        or not API_MIN_SPEED <= speed <= API_MAX_SPEED
    ):
        raise _bad(f"speed must be a number within {API_MIN_SPEED}..{API_MAX_SPEED}", "speed")
    applied = min(MAX_SPEED, max(MIN_SPEED, float(speed)))

    stream_format = data.get("stream_format", "audio")
    if stream_format not in ("audio", "sse"):
        raise _bad("stream_format must be 'audio' or 'sse'", "stream_format")

    rate = PCM_RATE if fmt is AudioFormat.PCM and voice.sample_rate != PCM_RATE else None
    try:
        spec = Spec.create(
            text=text,
            voice=voice.name,
            format=fmt,
            model=voice.model_id,
            speed=applied,
            rate=rate,
            **extra,
        )
    except SpecError as exc:
        param = "duration" if exc.code == "conflicting_controls" else "input"
        raise _bad(str(exc), param, exc.code) from exc
    control = refused_control(voice, spec)
    if control is not None:
        message = f"voice {voice.name!r} does not honour {control!r} on this service"
        raise _bad(message, control, "unsupported_control")
    if len(spec.text) > node.config.synth.max_text_chars:
        limit = node.config.synth.max_text_chars
        raise _bad(f"input is longer than {limit} characters", "input", "string_above_max_length")
    return spec, stream_format == "sse"


def _voice(node: Node, given: object) -> Voice:
    if isinstance(given, dict) and set(given) == {"id"}:
        given = given["id"]
    if not isinstance(given, str):
        raise _bad('voice must be a voice name or {"id": name}', "voice")
    name = node.config.api.voices.get(given, given)
    found = node.voices.get(name)
    if found is None:
        known = sorted({*node.voices, *node.config.api.voices})
        raise _bad(
            f"unknown voice {given!r}; known voices: {', '.join(known)}",
            "voice",
            "unknown_voice",
        )
    return found


@endpoint("speech")
async def speech(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    node = request.app[NODE]
    try:
        tenant = authenticate(request.app[API_KEYS], request)
        raw = await read_body(request, node.config.api.max_body_bytes)
        settings = node.config.api.tenant(tenant)
        prepared = prepare(node, raw, settings.policy, request.app[MEMO])
    except RequestError:
        node.metrics.requests_by[Result.REJECTED].inc()
        raise
    spec = prepared.grant.spec
    base = node.config.api.public_base or f"{request.scheme}://{request.host}"
    headers = {
        "Content-Location": f"{base.rstrip('/')}{prepared.target}",
        SPEED_HEADER: f"{spec.speed:g}",
    }
    door: SseDoor | AudioDoor
    if prepared.sse:
        door = SseDoor(request, headers, spec, node)
    else:
        door = AudioDoor(request, headers, node.delivery.use_sendfile)
    admit = _admission(node, tenant, settings)
    served = await serve(node, prepared.grant, prepared.target, door, started=started, admit=admit)
    return served.delivered.response


def _admission(node: Node, tenant: str, settings: TenantSettings) -> Callable[[Scope], None]:
    rates = settings.rates

    def admit(scope: Scope) -> None:
        node.limiter.take(("api", tenant), scope, rates, "api", "api")

    return admit


# -- framing --------------------------------------------------------------------------------


class AudioDoor:
    """The raw audio body: the whole object at once, or streamed as it is produced."""

    def __init__(self, request: web.Request, headers: dict[str, str], sendfile: bool) -> None:
        self.request = request
        self.headers = headers
        self.sendfile = sendfile

    def _headers(self, content_type: str, result: Result) -> dict[str, str]:
        return {**self.headers, hdrs.CONTENT_TYPE: content_type, CACHE_HEADER: result.value}

    async def send_object(
        self, held: Held, file: SharedFile | None, result: Result, age: int | None
    ) -> Delivered:
        headers = self._headers(held.meta.content_type, result)
        headers[hdrs.ETAG] = held.meta.etag  # the revision these bytes were rendered at
        if age is not None:
            headers[hdrs.AGE] = str(age)  # RFC 9111 section 5.1
        if held.body is not None:
            return Delivered(web.Response(body=held.body, headers=headers), len(held.body))
        assert file is not None
        response = web.StreamResponse(headers=headers)
        response.content_length = held.meta.length
        writer = await response.prepare(self.request)
        assert writer is not None
        try:
            await send_file_range(
                self.request, writer, file.fd, 0, held.meta.length, use_sendfile=self.sendfile
            )
        except OSError:
            _abort(self.request)
            return Delivered(response, 0)
        await response.write_eof()
        return Delivered(response, held.meta.length)

    async def send_fill(self, fill: Fill, result: Result) -> Delivered:
        # Nothing is committed before the first byte exists: a fill failing before it is
        # still answered with an error status (or a stale copy) by the core.
        await fill.until_started()
        await fill.until_size(1)
        assert fill.content_type is not None and fill.etag is not None
        headers = self._headers(fill.content_type, result)
        headers[hdrs.ETAG] = fill.etag
        if not fill.is_running():
            await fill.until_done()
            body = fill.body()
            return Delivered(web.Response(body=body, headers=headers), len(body))
        response = web.StreamResponse(headers=headers)
        if fill.length is not None:  # announced before the first byte (edge.cache.fill)
            response.content_length = fill.length
        await response.prepare(self.request)
        sent = 0
        first_byte = None
        try:
            async for view in fill.read(0, None):
                await response.write(view)
                first_byte = first_byte or time.perf_counter()
                sent += len(view)
        except FillFailed as exc:
            log.warning("speech stream of %s cut after %d bytes: %s", fill.key, sent, exc)
            _abort(self.request)
            return Delivered(response, sent, first_byte)
        await response.write_eof()
        return Delivered(response, sent, first_byte)


class SseDoor:
    """`text/event-stream`: base64 audio in `speech.audio.delta` events, then
    `speech.audio.done` with usage, or an `error` event if the fill fails mid-way."""

    def __init__(
        self, request: web.Request, headers: dict[str, str], spec: Spec, node: Node
    ) -> None:
        self.request = request
        self.headers = headers
        self.spec = spec
        self.node = node

    async def _open(self, result: Result, age: int | None) -> web.StreamResponse:
        headers = {
            **self.headers,
            hdrs.CONTENT_TYPE: "text/event-stream",
            hdrs.CACHE_CONTROL: "no-store",
            CACHE_HEADER: result.value,
        }
        if age is not None:
            headers[hdrs.AGE] = str(age)
        response = web.StreamResponse(headers=headers)
        await response.prepare(self.request)
        return response

    async def _done(self, response: web.StreamResponse, sent: int) -> None:
        usage = {"input_characters": len(self.spec.text), "output_bytes": sent}
        await response.write(_event({"type": "speech.audio.done", "usage": usage}))
        await response.write_eof()

    async def send_object(
        self, held: Held, file: SharedFile | None, result: Result, age: int | None
    ) -> Delivered:
        body = held.body
        if body is None:  # too large for the hot tier (over 2 MiB by default): rare
            assert file is not None
            loop = asyncio.get_running_loop()
            body = await loop.run_in_executor(self.node.io, os.pread, file.fd, held.meta.length, 0)
        response = await self._open(result, age)
        first_byte = time.perf_counter()
        for offset in range(0, len(body), SSE_SLICE):
            await response.write(_delta(body[offset : offset + SSE_SLICE]))
        await self._done(response, len(body))
        return Delivered(response, len(body), first_byte)

    async def send_fill(self, fill: Fill, result: Result) -> Delivered:
        await fill.until_started()
        await fill.until_size(1)
        response = await self._open(result, None)
        sent = 0
        first_byte = None
        try:
            async for view in fill.read(0, None):
                for offset in range(0, len(view), SSE_SLICE):
                    await response.write(_delta(view[offset : offset + SSE_SLICE]))
                first_byte = first_byte or time.perf_counter()
                sent += len(view)
        except FillFailed as exc:
            error = {"message": str(exc), "type": "server_error", "param": None, "code": exc.code}
            await response.write(_event({"type": "error", "error": error}))
            await response.write_eof()
            return Delivered(response, sent, first_byte)
        await self._done(response, sent)
        return Delivered(response, sent, first_byte)


def _event(data: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _delta(audio: bytes | memoryview) -> bytes:
    encoded = base64.b64encode(audio).decode("ascii")
    return _event({"type": "speech.audio.delta", "audio": encoded})


def _abort(request: web.Request) -> None:
    """Ends the connection without the final chunk: the body is known to be incomplete."""
    if request.transport is not None:
        request.transport.close()
