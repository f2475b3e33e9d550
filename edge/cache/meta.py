"""Metadata stored with every cached object."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from nearvoice.edge.policy import Policy


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    key: str
    """The spec key (lowercase hex SHA-256 of the canonical spec)."""
    content_type: str
    length: int
    """Body length in bytes."""
    etag: str
    """Strong entity-tag, quoted. Renders are deterministic, so the key identifies the bytes."""
    sha256: str
    """Hex SHA-256 of the body, checked before the object becomes visible."""
    policy: Policy
    stored_at: float
    """Unix seconds when the object was committed."""
    ttl: int
    """Seconds the object stays fresh after `stored_at`."""

    def fresh(self, now: float) -> bool:
        return now < self.stored_at + self.ttl

    @property
    def last_modified(self) -> int:
        return int(self.stored_at)

    def to_tag(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_tag(cls, tag: str) -> ObjectMeta:
        data = json.loads(tag)
        data["policy"] = Policy(data["policy"])
        return cls(**data)


RENDER_REVISION = 6
"""What the encoders and the chunking write, as a number: bumped whenever a change makes
the same spec render to other bytes. 1: streams of unknown length, chunks at sentence
ends. 2: exact sizes in WAV and FLAC headers from the duration pass, a first chunk that
ends at its first clause boundary (docs/contracts.md#exact-length-from-the-first-byte).
3: a render's first piece vocoded in windows (edge.synth.windows), which moves samples at
the window edges by about 1e-7; Ogg Opus in constant-bitrate packets and fixed pages
(edge.synth.opus). 4: the first window vocoded on two onnxruntime threads on every node
(edge.synth.windows.Settings.first_threads), whose float rounding may differ from one
thread's; every window's vocoder run with 12 frames of context rather than the flow's 32
(edge.synth.windows.Vocoder); later windows at most 8 times the frames already out, not
12. 5: a first window of 8 frames, not 16, and later windows at most 4 times the frames
already out, not 8 (edge.synth.windows.Settings). 6: piper's layer norms run as one
operator each on the CPU (edge.synth.fusion), which moves the duration pass's outputs by
about 1e-6."""


def etag_for(key: str, revision: int = RENDER_REVISION) -> str:
    """The strong ETag of `key`'s object as rendered at `revision`. The key names the spec
    and the revision names the bytes: revision 1 objects keep the ETag they were first
    served with (the bare key), later ones add `.r<N>`, so no ETag ever names two byte
    sequences across an upgrade and a player that mixes ranges from two nodes at
    different revisions is told by If-Range, not handed corrupt audio."""
    return f'"{key}"' if revision == 1 else f'"{key}.r{revision}"'


def revision_of(key: str, etag: str) -> int | None:
    """The render revision an ETag of `key`'s object names; None if it names none."""
    if etag == f'"{key}"':
        return 1
    prefix = f'"{key}.r'
    digits = etag[len(prefix) : -1]
    if etag.startswith(prefix) and etag.endswith('"') and digits.isascii() and digits.isdigit():
        return int(digits)
    return None
