"""The messages of a realtime session (docs/contracts.md#realtime-speech), as small frozen classes.

Client messages are JSON text frames; `parse` turns one into an event or raises
`ProtocolError` with the `error` code the session answers with. Server messages are built
by the functions below, so their shapes are written down in one place.

Close codes (RFC 6455 section 7.4): 1000 after `done`, 1003 for binary frames from the
client, 1008 for a session token that expires mid-session, 1009 for a message over
`[realtime] max_message_bytes`, and the node's own, 4000-4099: 4001 over the tenant's
characters per second, 4002 idle, 4003 too many sessions for the tenant, 4004 a reader
that took no frames for `[realtime] send_timeout`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import IntEnum
from typing import Any


class Close(IntEnum):
    NORMAL = 1000
    BINARY = 1003
    POLICY = 1008  # the session token expired
    TOO_BIG = 1009
    RATE_LIMIT = 4001
    IDLE = 4002
    TOO_MANY_SESSIONS = 4003
    SLOW_READER = 4004


CLOSE_REASONS: dict[Close, str] = {
    Close.NORMAL: "done",
    Close.BINARY: "binary_frame",
    Close.POLICY: "token_expired",
    Close.TOO_BIG: "message_too_big",
    Close.RATE_LIMIT: "rate_limit",
    Close.IDLE: "idle",
    Close.TOO_MANY_SESSIONS: "too_many_sessions",
    Close.SLOW_READER: "slow_reader",
}
"""`reason` of `nearvoice_realtime_closes_total` for each close the node makes;
`client` counts sessions the client ended."""
CLIENT_CLOSED = "client"


class ProtocolError(ValueError):
    """A client message the session refuses; `code` is the `error` event's field."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class SessionUpdate:
    voice: str | None = None
    format: str | None = None
    speed: float | None = None


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class TextFlush:
    pass


@dataclass(frozen=True, slots=True)
class TextDone:
    pass


@dataclass(frozen=True, slots=True)
class Cancel:
    pass


ClientEvent = SessionUpdate | TextDelta | TextFlush | TextDone | Cancel

_FIELDS: dict[str, frozenset[str]] = {
    "session.update": frozenset(("type", "voice", "format", "speed")),
    "text.delta": frozenset(("type", "text")),
    "text.flush": frozenset(("type",)),
    "text.done": frozenset(("type",)),
    "cancel": frozenset(("type",)),
}


def parse(raw: str) -> ClientEvent:
    """One client text frame as an event; raises ProtocolError."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ProtocolError("invalid_json", f"the message is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ProtocolError("invalid_json", "a message must be a JSON object")
    kind = data.get("type")
    fields = _FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        known = ", ".join(_FIELDS)
        raise ProtocolError("unknown_type", f"unknown message type {kind!r}; known: {known}")
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ProtocolError("unknown_field", f"{kind} has no field {unknown[0]!r}")
    if kind == "session.update":
        voice, fmt, speed = data.get("voice"), data.get("format"), data.get("speed")
        if voice is not None and not isinstance(voice, str):
            raise ProtocolError("invalid_value", "voice must be a string")
        if fmt is not None and not isinstance(fmt, str):
            raise ProtocolError("invalid_value", "format must be a string")
        if speed is not None and (not isinstance(speed, int | float) or isinstance(speed, bool)):
            raise ProtocolError("invalid_value", "speed must be a number")
        return SessionUpdate(voice, fmt, None if speed is None else float(speed))
    if kind == "text.delta":
        text = data.get("text")
        if not isinstance(text, str):
            raise ProtocolError("invalid_value", "text.delta needs a string `text`")
        return TextDelta(text)
    if kind == "text.flush":
        return TextFlush()
    if kind == "text.done":
        return TextDone()
    return Cancel()


# -- server messages ------------------------------------------------------------------------

Message = dict[str, Any]


def session_updated(voice: str, fmt: str, speed: float, sample_rate: int) -> Message:
    return {
        "type": "session.updated",
        "voice": voice,
        "format": fmt,
        "speed": speed,
        "sample_rate": sample_rate,
    }


def segment_started(index: int, text: str, cache: str) -> Message:
    return {"type": "segment.started", "segment": index, "text": text, "cache": cache}


def segment_done(index: int, audio_ms: int) -> Message:
    return {"type": "segment.done", "segment": index, "audio_ms": audio_ms}


def done() -> Message:
    return {"type": "done"}


def error(code: str, message: str, segment: int | None = None) -> Message:
    found: Message = {"type": "error", "error": code, "message": message}
    if segment is not None:
        found["segment"] = segment
    return found


def encode(message: Message) -> str:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)
