"""Ogg page rewriting. libsndfile gives each Ogg stream a random serial number (RFC 3533
section 6), which would make two renders of one spec differ; we pin the serial and
recompute each page's CRC, so ogg-opus objects are byte-identical on every node."""

from __future__ import annotations

import struct

_CAPTURE = b"OggS"
_HEADER = 27
_SERIAL_AT = 14
_CRC_AT = 22


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return table


_TABLE = _crc_table()


def ogg_crc(page: bytes | bytearray) -> int:
    """The Ogg CRC-32: polynomial 0x04C11DB7, not reflected, initial value 0."""
    crc = 0
    for byte in page:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _TABLE[((crc >> 24) ^ byte) & 0xFF]
    return crc


def pin_serial(data: bytes, serial: int) -> bytes:
    out = bytearray(data)
    pos = 0
    while pos < len(out):
        if out[pos : pos + 4] != _CAPTURE or pos + _HEADER > len(out):
            raise ValueError(f"not an Ogg page at byte {pos}")
        nsegs = out[pos + 26]
        if pos + _HEADER + nsegs > len(out):
            raise ValueError(f"truncated Ogg page at byte {pos}")
        body = sum(out[pos + _HEADER : pos + _HEADER + nsegs])
        end = pos + _HEADER + nsegs + body
        if end > len(out):
            raise ValueError(f"truncated Ogg page at byte {pos}")
        struct.pack_into("<I", out, pos + _SERIAL_AT, serial)
        struct.pack_into("<I", out, pos + _CRC_AT, 0)
        struct.pack_into("<I", out, pos + _CRC_AT, ogg_crc(out[pos:end]))
        pos = end
    return bytes(out)
