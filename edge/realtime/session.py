"""One realtime session's protocol state, apart from any socket (h11's style).

`Session.receive(event, now)` takes a parsed client message and returns what to do:
`Send` a message, `Render` a segment, `Drop` segments a `cancel` removed, or `Finish` the
session with a close code. The door (edge.handlers.realtime) tells it when a segment's
audio starts and ends going out (`started`, `finished`), which is how it knows when the
last segment after `text.done` is through and `done` can be sent.

Lifecycle:

    configuring --session.update--> open --text.done--> draining --last segment--> closed

Text before the first `session.update` is an error (`no_session`): the session does not
know its voice and format. Segments come from `edge.synth.chunking.Segmenter`, so they
depend only on the concatenated text and the flushes, never on how the deltas were cut
(docs/contracts.md#exact-length-from-the-first-byte); each carries the voice, format and
speed in force when it was completed, and the time its last text arrived (for the
first-audio histogram).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, auto

from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.realtime import protocol
from nearvoice.edge.realtime.protocol import (
    Cancel,
    ClientEvent,
    Close,
    Message,
    SessionUpdate,
    TextDelta,
    TextDone,
    TextFlush,
)
from nearvoice.edge.spec import MAX_SPEED, MIN_SPEED
from nearvoice.edge.synth.chunking import Segmenter
from nearvoice.edge.synth.opus import opus_rate

FORMATS: Mapping[str, AudioFormat] = {"pcm": AudioFormat.PCM, "opus": AudioFormat.OPUS}


@dataclass(frozen=True, slots=True)
class VoiceInfo:
    name: str
    """The voice's own name (an alias resolves to it): what specs carry."""
    sample_rate: int


@dataclass(frozen=True, slots=True)
class Segment:
    index: int
    text: str
    voice: str
    format: AudioFormat
    speed: float
    completed_at: float
    """When the text that completed this segment arrived (the caller's clock)."""


@dataclass(frozen=True, slots=True)
class Send:
    message: Message


@dataclass(frozen=True, slots=True)
class Render:
    segment: Segment


@dataclass(frozen=True, slots=True)
class Drop:
    indices: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Finish:
    code: Close


Action = Send | Render | Drop | Finish


class State(Enum):
    CONFIGURING = auto()
    OPEN = auto()
    DRAINING = auto()
    CLOSED = auto()


def sample_rate(voice: VoiceInfo, fmt: AudioFormat) -> int:
    """The rate the session's audio is at: the voice's for pcm, the Opus coding rate for
    opus (the next one up, as the encoder resamples)."""
    if fmt is AudioFormat.OPUS:
        return opus_rate(voice.sample_rate)
    return voice.sample_rate


class Session:
    def __init__(
        self,
        voices: Mapping[str, VoiceInfo],
        *,
        bound_voice: str | None = None,
        max_segment_chars: int = 1000,
    ) -> None:
        self._voices = voices
        self._bound = bound_voice
        """The voice a session token allows (its own name), or None: any."""
        self._max_chars = max_segment_chars
        self.state = State.CONFIGURING
        self.voice: VoiceInfo | None = None
        self.format = AudioFormat.PCM
        self.speed = 1.0
        self._segmenter = Segmenter()
        self._next = 0
        self._waiting: list[int] = []
        """Segments handed out to render whose audio has not started going out."""
        self._playing: set[int] = set()

    @property
    def outstanding(self) -> int:
        return len(self._waiting) + len(self._playing)

    def receive(self, event: ClientEvent, now: float) -> list[Action]:
        if self.state is State.CLOSED:
            return []
        if isinstance(event, SessionUpdate):
            return self._update(event)
        if isinstance(event, Cancel):
            return self._cancel()
        if self.state is State.DRAINING:
            return [_error("text_after_done", "the session already received text.done")]
        if self.state is State.CONFIGURING:
            return [_error("no_session", "send session.update (voice, format) before text")]
        if isinstance(event, TextDelta):
            return self._segments(self._segmenter.feed(event.text), now, check_pending=True)
        if isinstance(event, TextFlush):
            return self._segments(self._segmenter.flush(), now)
        assert isinstance(event, TextDone)
        actions = self._segments(self._segmenter.finish(), now)
        self.state = State.DRAINING
        return actions + self._maybe_done()

    def started(self, index: int) -> None:
        """The segment's `segment.started` went out (it can no longer be cancelled)."""
        if index in self._waiting:
            self._waiting.remove(index)
            self._playing.add(index)

    def finished(self, index: int) -> list[Action]:
        """The segment is through (its `segment.done` or its `error` went out)."""
        if index in self._waiting:
            self._waiting.remove(index)
        self._playing.discard(index)
        return self._maybe_done()

    def _update(self, event: SessionUpdate) -> list[Action]:
        voice = self.voice
        if event.voice is not None:
            voice = self._voices.get(event.voice)
            if voice is None:
                known = ", ".join(sorted(self._voices))
                return [_error("unknown_voice", f"unknown voice {event.voice!r}; known: {known}")]
        if voice is None:
            if self._bound is None:
                return [_error("invalid_value", "the first session.update must name a voice")]
            voice = self._voices[self._bound]
        if self._bound is not None and voice.name != self._bound:
            return [
                _error("voice_not_allowed", f"this session's token allows voice {self._bound!r}")
            ]
        fmt = self.format
        if event.format is not None:
            found = FORMATS.get(event.format)
            if found is None:
                known = ", ".join(FORMATS)
                return [_error("unsupported_format", f"format must be one of: {known}")]
            fmt = found
        speed = self.speed
        if event.speed is not None:
            if not MIN_SPEED <= event.speed <= MAX_SPEED:
                return [_error("bad_speed", f"speed must be within {MIN_SPEED}..{MAX_SPEED}")]
            speed = round(event.speed, 2)
        self.voice, self.format, self.speed = voice, fmt, speed
        if self.state is State.CONFIGURING:
            self.state = State.OPEN
        rate = sample_rate(voice, fmt)
        return [Send(protocol.session_updated(voice.name, fmt.value, speed, rate))]

    def _segments(self, texts: list[str], now: float, check_pending: bool = False) -> list[Action]:
        assert self.voice is not None
        actions: list[Action] = []
        for text in texts:
            if len(text) > self._max_chars:
                actions.append(_too_long(len(text), self._max_chars))
                continue
            index = self._next
            self._next += 1
            self._waiting.append(index)
            segment = Segment(index, text, self.voice.name, self.format, self.speed, now)
            actions.append(Render(segment))
        if check_pending and len(self._segmenter.pending) > self._max_chars:
            actions.append(_too_long(len(self._segmenter.pending), self._max_chars))
            self._segmenter = Segmenter(first_clause=self._next == 0)
        return actions

    def _cancel(self) -> list[Action]:
        dropped = tuple(self._waiting)
        self._waiting.clear()
        self._segmenter = Segmenter(first_clause=self._next == 0)
        actions: list[Action] = [Drop(dropped)] if dropped else []
        return actions + self._maybe_done()

    def _maybe_done(self) -> list[Action]:
        if self.state is State.DRAINING and not self.outstanding:
            self.state = State.CLOSED
            return [Send(protocol.done()), Finish(Close.NORMAL)]
        return []


def _error(code: str, message: str) -> Send:
    return Send(protocol.error(code, message))


def _too_long(chars: int, limit: int) -> Send:
    return _error(
        "segment_too_long",
        f"{chars} characters without a sentence end or a flush (at most {limit}); dropped",
    )
