"""A segment's object bytes as the session's binary frames.

pcm   s16le at the session's sample rate. Frames hold whole samples (a byte left over from
      an upstream's odd-sized read waits for the next), at most `frame_bytes` each, so a
      client can turn every frame into samples as it comes.
opus  A chained Ogg stream (RFC 3533 section 4, RFC 7845 section 3): each segment is one
      link, a complete Ogg Opus stream with its own headers. Links of one chain must have
      distinct serial numbers, and every object is stored with the same pinned serial
      (edge.synth.ogg: renders are byte-identical), so the door rewrites each page's serial
      to the segment's own (`link_serial`) and recomputes its CRC. The cached object is
      untouched; only what goes out on the socket differs. Frames are whole Ogg pages.

`audio_ms` is the segment's duration: from the byte count for pcm, from the last page's
granule position less the pre-skip of the OpusHead (RFC 7845 section 4) for opus.
"""

from __future__ import annotations

import struct

from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.synth.ogg import (
    OGG_SERIAL,  # what every stored object carries
    SerialPinner,
)

OPUS_CLOCK = 48000  # Hz: Ogg Opus granule positions count 48 kHz samples (RFC 7845 s4)


def link_serial(index: int) -> int:
    """The Ogg serial of segment `index`'s link: distinct for every segment of a session
    (and from the stored objects' own)."""
    return (OGG_SERIAL + 1 + index) & 0xFFFFFFFF


class Framer:
    def __init__(self, fmt: AudioFormat, sample_rate: int, index: int, frame_bytes: int) -> None:
        self.format = fmt
        self.sample_rate = sample_rate
        self.frame_bytes = max(2, frame_bytes - frame_bytes % 2)
        self.sent = 0
        self._carry = b""
        self._pinner = SerialPinner(link_serial(index)) if fmt is AudioFormat.OPUS else None
        self._granule = 0
        self._pre_skip: int | None = None

    def push(self, data: bytes | memoryview) -> list[bytes]:
        if self._pinner is not None:
            pages = self._pinner.push(data)
            self._scan(pages)
            return self._slices(pages)
        raw = self._carry + bytes(data)
        whole = len(raw) - len(raw) % 2
        self._carry = raw[whole:]
        return self._slices(raw[:whole])

    def finish(self) -> list[bytes]:
        if self._pinner is not None:
            return self._slices(self._pinner.finish())
        return []  # a trailing odd byte is no sample

    @property
    def audio_ms(self) -> int:
        if self.format is AudioFormat.OPUS:
            return max(0, self._granule - (self._pre_skip or 0)) * 1000 // OPUS_CLOCK
        return (self.sent // 2) * 1000 // self.sample_rate

    def _slices(self, data: bytes) -> list[bytes]:
        step = self.frame_bytes
        if self._pinner is not None:
            frames = [data] if data else []  # whole pages: a page is at most ~64 KiB
        else:
            frames = [data[i : i + step] for i in range(0, len(data), step)]
        self.sent += len(data)
        return frames

    def _scan(self, pages: bytes) -> None:
        """Reads the granule position of each page, and the pre-skip of the OpusHead."""
        pos = 0
        while pos + 27 <= len(pages):
            granule = struct.unpack_from("<q", pages, pos + 6)[0]
            segments = pages[pos + 26]
            body = pos + 27 + segments
            size = sum(pages[pos + 27 : body])
            if self._pre_skip is None and pages[body : body + 8] == b"OpusHead":
                self._pre_skip = struct.unpack_from("<H", pages, body + 10)[0]
            if granule >= 0:
                self._granule = max(self._granule, granule)
            pos = body + size
