"""`[realtime]`: realtime speech sessions (edge.handlers.realtime,
docs/contracts.md#realtime-speech)."""

from __future__ import annotations

from dataclasses import dataclass

from nearvoice.edge.checks import at_least, between, positive, require


@dataclass(frozen=True, slots=True)
class RealtimeSettings:
    idle_timeout: float = 60.0
    """Seconds a session may go without a client message while it has nothing to send
    before it is closed with 4002."""
    max_message_bytes: int = 16384
    """Largest client message, in bytes; a larger one closes the session with 1009."""
    max_segment_chars: int = 1000
    """Characters of text that may wait for a segment end; beyond it the waiting text is
    dropped with an `error` event (`segment_too_long`). Also capped by
    `[synth] max_text_chars`."""
    queue_frames: int = 32
    """Outgoing frames a session buffers before its segments wait for the reader
    (back-pressure)."""
    frame_bytes: int = 16384
    """Audio bytes per binary frame at most."""
    send_timeout: float = 10.0
    """Seconds a session waits for a reader that takes no frames before closing with 4004."""
    socket_send_buffer: int = 0
    """Bytes of kernel send buffer (SO_SNDBUF) per session socket; 0 keeps the kernel's
    default. Smaller buffers bound how much audio sits past the node's own queue, so
    back-pressure (and a `cancel`) acts sooner."""
    render_slots: int = 0
    """Segments of all sessions that may be rendering at once, handed out round robin
    between sessions; 0 means one per inference thread."""
    token_ttl: int = 300
    """Seconds a session token minted without a `ttl` stays valid."""
    max_token_ttl: int = 3600
    """Longest validity, in seconds, a minted session token may ask for."""

    def validate(self) -> None:
        positive(self, "idle_timeout")
        between(self, "max_message_bytes", 64, 16 * 1024 * 1024)
        at_least(self, "max_segment_chars", 1)
        at_least(self, "queue_frames", 1)
        between(self, "frame_bytes", 256, 16 * 1024 * 1024)
        positive(self, "send_timeout")
        at_least(self, "socket_send_buffer", 0)
        at_least(self, "render_slots", 0)
        at_least(self, "token_ttl", 1)
        at_least(self, "max_token_ttl", 1)
        require(self.token_ttl <= self.max_token_ttl, "token_ttl", "must not exceed max_token_ttl")
