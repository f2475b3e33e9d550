"""`multipart/byteranges` framing (RFC 9110 section 14.6).

Every delimiter line ends in CRLF, each part carries its own Content-Type and Content-Range,
and the body length is computable up front, so the response has an exact Content-Length.
The layout matches nginx's byte for byte apart from the boundary string.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass

from nearvoice.edge.http.ranges import ByteRange, content_range


@dataclass(frozen=True, slots=True)
class Multipart:
    boundary: str
    content_type: str
    length: int
    ranges: list[ByteRange]

    @classmethod
    def plan(cls, ranges: list[ByteRange], content_type: str, length: int) -> Multipart:
        return cls(secrets.token_hex(12), content_type, length, ranges)

    @property
    def header_value(self) -> str:
        return f"multipart/byteranges; boundary={self.boundary}"

    def part_head(self, byte_range: ByteRange) -> bytes:
        return (
            f"\r\n--{self.boundary}\r\n"
            f"Content-Type: {self.content_type}\r\n"
            f"Content-Range: {content_range(byte_range, self.length)}\r\n\r\n"
        ).encode("latin-1")

    @property
    def tail(self) -> bytes:
        return f"\r\n--{self.boundary}--\r\n".encode("latin-1")

    def pieces(self) -> Iterator[tuple[bytes, ByteRange]]:
        for byte_range in self.ranges:
            yield self.part_head(byte_range), byte_range

    @property
    def body_length(self) -> int:
        framing = sum(len(self.part_head(r)) for r in self.ranges) + len(self.tail)
        return framing + sum(end - start for start, end in self.ranges)
