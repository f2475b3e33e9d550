"""`POST /v1/speech`: the URL-minting API an application backend calls.

    {"text": "...", "voice": "heart", "format": "wav", "speed": 1.0,
     "policy": "hot", "ttl": 3600, "ip": "203.0.113.0/24",
     "duration": 2.4, "emotion": {"label": "excited"}, "ref": "ref_...", "lang": "en-US"}
    -> 201 {"url": "<public edge base>/v1/speech/<key>.<ext>?...", "key": "...",
            "expires_at": 1700000000}

It authenticates with `Authorization: Bearer $NEARVOICE_MINT_TOKEN` (constant-time), and
validates everything an edge would check, so a minted URL never fails at the edge for a
reason the backend could have been told about: controls no engine of the voice honours
(`unsupported_control`), a duration outside 0.5-2.0x of the voice's natural length
(`duration_out_of_range`, when this origin renders the voice), a `ref` that is not
registered here (`unknown_ref`; the origin fills in the clip's hash itself).
"""

from __future__ import annotations

import asyncio
import os
import time
from http import HTTPStatus
from typing import Any

from aiohttp import web

from nearvoice.edge import controls
from nearvoice.edge.config import MINT_TOKEN_ENV
from nearvoice.edge.controls import FIELDS
from nearvoice.edge.errors import BadRequest
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.handlers.keys import NODE
from nearvoice.edge.http.requests import read_json, require_bearer
from nearvoice.edge.policy import Policy
from nearvoice.edge.spec import Ref, Spec, SpecError
from nearvoice.edge.token import parse_network, sign_url
from nearvoice.edge.voices import UnknownVoice, resolve
from nearvoice.origin.refvoices import RefVoices

_FIELDS = frozenset(("text", "voice", "format", "speed", "seed", "policy", "ttl", "ip")) | FIELDS
REFS: web.AppKey[RefVoices] = web.AppKey("refs", RefVoices)
"""The origin's reference voices, to fill in a `ref`'s clip hash."""


def _field(body: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = body.get(name, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise BadRequest(f"bad_{name}", f"{name} must be a {kind.__name__}")
    return value


async def _ref(request: web.Request, ref_id: str) -> Ref:
    refs = request.app.get(REFS)
    sha256 = None
    if refs is not None:
        loop = asyncio.get_running_loop()
        sha256 = await loop.run_in_executor(request.app[NODE].io, refs.sha256_of, ref_id)
    if sha256 is None:
        raise SpecError("unknown_ref", f"no reference voice {ref_id!r} is registered here")
    return Ref.create(ref_id, sha256)


async def mint(request: web.Request) -> web.Response:
    require_bearer(request, os.environ.get(MINT_TOKEN_ENV), env=MINT_TOKEN_ENV, realm="mint")
    body = await read_json(request)
    if not isinstance(body, dict):
        raise BadRequest("bad_json", "body must be a JSON object")
    node = request.app[NODE]
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise BadRequest("unknown_field", f"unknown field(s): {', '.join(unknown)}")
    settings = node.config.origin
    text = _field(body, "text", str, None) if "text" in body else None
    if text is None:
        raise BadRequest("missing_text", "text is required")
    try:
        voice = resolve(_field(body, "voice", str, "heart"), node.voices)
    except UnknownVoice as exc:
        raise BadRequest("unknown_voice", f"unknown voice {exc.voice!r}", known=exc.known) from exc
    fmt = AudioFormat.parse(_field(body, "format", str, AudioFormat.WAV.value))
    if fmt is None:
        raise BadRequest(
            "unsupported_format", "unknown format", known=[f.value for f in AudioFormat]
        )
    policy = Policy.parse(_field(body, "policy", str, Policy.HOT.value))
    if policy is None:
        raise BadRequest("bad_policy", "policy must be hot, personal or draft")
    ttl = _field(body, "ttl", int, settings.default_ttl)
    if not 0 < ttl <= settings.max_ttl:
        raise BadRequest("bad_ttl", f"ttl must be within 1..{settings.max_ttl} seconds")
    ip = _field(body, "ip", str, "") or None
    if ip is not None:
        try:
            parse_network(ip)
        except ValueError as exc:
            raise BadRequest("bad_ip", str(exc)) from exc
    try:
        extra = controls.from_json(body)
        ref_id = extra.pop("ref_id", None)
        if ref_id is not None:
            extra["ref"] = await _ref(request, ref_id)
        spec = Spec.create(
            text=text,
            voice=voice.name,
            format=fmt,
            model=voice.model_id,
            speed=_field(body, "speed", float, 1.0),
            seed=_field(body, "seed", int, 0),
            **extra,
        )
        controls.check_voice(voice, spec)
        renderer = node.renderer
        engine = renderer.engine_for(spec) if renderer else None
        if renderer is not None and engine is not None and spec.duration is not None:
            natural = await renderer.natural_samples(engine, spec)
            controls.check_duration(spec, natural, engine.sample_rate)
    except SpecError as exc:
        raise BadRequest(exc.code, str(exc)) from exc
    limit = node.config.synth.max_text_chars
    if len(spec.text) > limit:
        raise BadRequest("text_too_long", f"text is longer than {limit} characters")
    now = int(time.time())
    url = sign_url(node.keyring, settings.public_base, spec, policy=policy, ttl=ttl, ip=ip, now=now)
    return web.json_response(
        {"url": url, "key": spec.key, "expires_at": now + ttl}, status=HTTPStatus.CREATED
    )
