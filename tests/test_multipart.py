"""edge/http/multipart.py: multipart/byteranges framing (RFC 9110 section 14.6)."""

from __future__ import annotations

import re

from nearvoice.edge.http.multipart import Multipart

BODY = bytes(range(256)) * 4  # 1024 bytes
RANGES = [(0, 10), (500, 600), (1000, 1024)]
CONTENT_TYPE = "audio/ogg;codecs=opus"


def plan() -> Multipart:
    return Multipart.plan(RANGES, CONTENT_TYPE, len(BODY))


def assemble(mp: Multipart) -> bytes:
    out = bytearray()
    for head, (start, end) in mp.pieces():
        out += head + BODY[start:end]
    return bytes(out + mp.tail)


def test_part_head_is_crlf_delimited_with_type_and_range() -> None:
    mp = plan()
    expected = (
        f"\r\n--{mp.boundary}\r\n"
        f"Content-Type: {CONTENT_TYPE}\r\n"
        "Content-Range: bytes 500-599/1024\r\n"
        "\r\n"
    ).encode()
    assert mp.part_head((500, 600)) == expected


def test_part_head_has_no_bare_line_feeds() -> None:
    head = plan().part_head((0, 10))
    assert head.count(b"\n") == head.count(b"\r\n") == 5


def test_tail_closes_the_boundary() -> None:
    mp = plan()
    assert mp.tail == f"\r\n--{mp.boundary}--\r\n".encode()


def test_body_length_equals_the_assembled_length() -> None:
    mp = plan()
    assert mp.body_length == len(assemble(mp))


def test_body_length_with_a_single_range() -> None:
    mp = Multipart.plan([(3, 4)], "audio/wav", 10)
    assert mp.body_length == len(mp.part_head((3, 4))) + 1 + len(mp.tail)


def test_pieces_follow_the_ranges_in_order() -> None:
    assert [r for _, r in plan().pieces()] == RANGES


def test_assembled_body_parts_carry_the_right_bytes() -> None:
    mp = plan()
    parts = assemble(mp).split(f"\r\n--{mp.boundary}".encode())
    assert parts[0] == b""
    assert parts[-1] == b"--\r\n"
    for part, (start, end) in zip(parts[1:-1], RANGES, strict=True):
        _, _, data = part.partition(b"\r\n\r\n")
        assert data == BODY[start:end]


def test_boundary_appears_in_header_value() -> None:
    mp = plan()
    assert mp.header_value == f"multipart/byteranges; boundary={mp.boundary}"


def test_boundary_is_a_valid_token_and_random() -> None:
    one, two = plan(), plan()
    assert re.fullmatch(r"[0-9a-f]{24}", one.boundary)
    assert one.boundary != two.boundary
