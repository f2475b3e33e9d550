"""Ogg page rewriting. libsndfile gives each Ogg stream a random serial number (RFC 3533
section 6), which would make two renders of one spec differ; we pin the serial and
recompute each page's CRC, so ogg-opus objects are byte-identical on every node.

`SerialPinner` does this incrementally for streams from other muxers (the realtime
links, edge.realtime.framing): bytes go in in whatever pieces the muxer wrote them, and
only complete, pinned pages come out, so nothing it returns ever needs rewriting.
`pin_serial` is the one-shot form of the same code.

`ogg_page` writes pages from packets, for the Ogg Opus muxer (edge.synth.opus), which
gives every object `OGG_SERIAL`.
"""

from __future__ import annotations

import struct
import zlib

OGG_SERIAL = 0x6E766F78  # b"nvox": fixed so renders are byte-identical on every node

_CAPTURE = b"OggS"
_HEADER = 27
_SEGMENTS_AT = 26
_SERIAL_AT = 14
_CRC_AT = 22

# The Ogg CRC-32 is the MSB-first CRC with polynomial 0x04C11DB7, initial value 0 and no
# final xor. zlib's crc32 is the LSB-first (bit-reflected) CRC with the reflected
# polynomial, initial value and final xor 0xFFFFFFFF. An MSB-first CRC of a message is
# the bit reversal of the LSB-first CRC of the message with every byte bit-reversed, so
# reversing the bytes (one bytes.translate), cancelling zlib's pre- and post-inversion
# (start from 0xFFFFFFFF, xor the result) and reversing the 32-bit result gives the Ogg
# CRC at zlib's speed: about a microsecond per page instead of a Python loop per byte.
_REVERSED_BITS = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def ogg_crc(page: bytes | bytearray) -> int:
    """The Ogg CRC-32: polynomial 0x04C11DB7, not reflected, initial value 0."""
    mirrored = page.translate(_REVERSED_BITS)
    reflected = zlib.crc32(mirrored, 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int.from_bytes(reflected.to_bytes(4, "little").translate(_REVERSED_BITS), "big")


class SerialPinner:
    """Rewrites an Ogg stream fed in arbitrary pieces: every page gets `serial` and a
    recomputed CRC, and `push` returns only whole pages, in order."""

    def __init__(self, serial: int) -> None:
        self._serial = serial
        self._pending = bytearray()
        self._offset = 0  # stream offset of _pending[0], for error messages

    def push(self, data: bytes | bytearray | memoryview) -> bytes:
        """The pinned pages completed by `data`; a partial page waits for more bytes.
        Raises ValueError where the stream is not Ogg pages."""
        self._pending += data
        buf = self._pending
        pos = 0
        while True:
            end = _page_end(buf, pos, self._offset)
            if end is None:
                break
            struct.pack_into("<I", buf, pos + _SERIAL_AT, self._serial)
            struct.pack_into("<I", buf, pos + _CRC_AT, 0)
            struct.pack_into("<I", buf, pos + _CRC_AT, ogg_crc(buf[pos:end]))
            pos = end
        out = bytes(buf[:pos])
        del buf[:pos]
        self._offset += pos
        return out

    def finish(self) -> bytes:
        """Ends the stream; raises ValueError if it stopped inside a page."""
        if self._pending:
            if not _CAPTURE.startswith(bytes(self._pending[:4])):
                raise ValueError(f"not an Ogg page at byte {self._offset}")
            raise ValueError(f"truncated Ogg page at byte {self._offset}")
        return b""


def _page_end(buf: bytearray, pos: int, base: int) -> int | None:
    """Where the page starting at `pos` ends, or None while it is incomplete."""
    have = len(buf) - pos
    if have >= len(_CAPTURE) and buf[pos : pos + len(_CAPTURE)] != _CAPTURE:
        raise ValueError(f"not an Ogg page at byte {base + pos}")
    if have < _HEADER:
        return None
    nsegs = buf[pos + _SEGMENTS_AT]
    if have < _HEADER + nsegs:
        return None
    end = pos + _HEADER + nsegs + sum(buf[pos + _HEADER : pos + _HEADER + nsegs])
    return end if end <= len(buf) else None


def pin_serial(data: bytes, serial: int) -> bytes:
    """A complete Ogg stream with every page's serial set to `serial`."""
    pinner = SerialPinner(serial)
    return pinner.push(data) + pinner.finish()


# -- writing pages -------------------------------------------------------------------------

BEGINNING_OF_STREAM = 0x02
END_OF_STREAM = 0x04
PAGE_HEADER_BYTES = _HEADER
MAX_SEGMENT = 255


def lacing(size: int) -> bytes:
    """The lacing values of one packet of `size` bytes (RFC 3533 section 5): 255 for each
    whole 255 bytes, then the remainder, which is 0 when the size is a multiple of 255."""
    return bytes([MAX_SEGMENT] * (size // MAX_SEGMENT) + [size % MAX_SEGMENT])


def page_length(packet_sizes: list[int] | tuple[int, ...]) -> int:
    """Bytes in a page that holds packets of these sizes, each complete on it."""
    return PAGE_HEADER_BYTES + sum(size // MAX_SEGMENT + 1 + size for size in packet_sizes)


def ogg_page(
    packets: list[bytes], *, serial: int, sequence: int, granule: int, flags: int = 0
) -> bytes:
    """One page holding `packets`, each complete on it (RFC 3533 section 6): no packet
    continues from the previous page or onto the next, so the page stands on its own."""
    segments = b"".join(lacing(len(packet)) for packet in packets)
    if len(segments) > MAX_SEGMENT:
        raise ValueError(f"{len(segments)} lacing values do not fit one page")
    page = bytearray(
        _CAPTURE
        + struct.pack("<BBqIII", 0, flags, granule, serial, sequence, 0)
        + bytes([len(segments)])
        + segments
    )
    for packet in packets:
        page += packet
    struct.pack_into("<I", page, _CRC_AT, ogg_crc(page))
    return bytes(page)
