"""Text to ids for character-level VITS (MMS-style) voices, as transformers' VitsTokenizer
does it without its optional phonemizer and romanizer: lowercase, drop characters outside
the vocabulary, trim, and put the blank (id 0) between characters when the model was
trained that way. Needs nothing beyond the standard library, so the edge can run
`from-transformers` exports without transformers."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")
MAX_CHARS = 400
"""Longest chunk the model sees at once; longer sentences are cut at spaces."""


UNKNOWN = "<unk>"


class UnsupportedTokenizer(ValueError):
    """A tokenizer setting this front end does not implement."""


@dataclass(frozen=True, slots=True)
class CharTokenizer:
    vocab: Mapping[str, int] = field(default_factory=dict)
    add_blank: bool = True
    lowercase: bool = True
    vocab_size: int = 0
    """Used only without a vocabulary (test checkpoints): ids from the text's hash."""

    @classmethod
    def from_sidecar(cls, data: Mapping[str, Any], require_vocab: bool = True) -> CharTokenizer:
        """From the `vits.json` that `nearvoice export from-transformers` writes. Without
        `require_vocab`, a checkpoint that has no tokenizer gets hash ids (measurement
        only: such a voice would say nothing meaningful)."""
        if data.get("phonemize"):
            raise UnsupportedTokenizer(
                "this checkpoint's tokenizer phonemizes text (phonemizer + espeak); "
                "only character tokenizers are supported"
            )
        if data.get("is_uroman"):
            raise UnsupportedTokenizer(
                "this checkpoint's tokenizer romanizes text with uroman first; "
                "only character tokenizers are supported"
            )
        if require_vocab and not data.get("vocab"):
            raise UnsupportedTokenizer(
                "no vocabulary: export the checkpoint with its tokenizer files (vocab.json)"
            )
        return cls(
            vocab={str(k): int(v) for k, v in dict(data.get("vocab", {})).items()},
            add_blank=bool(data.get("add_blank", True)),
            lowercase=bool(data.get("lowercase", True)),
            vocab_size=int(data.get("vocab_size", 0)),
        )

    def ids(self, text: str) -> list[int]:
        if not self.vocab:
            # No tokenizer in the checkpoint: ids that depend only on the text, so the
            # same text always renders the same audio.
            digest = hashlib.sha256(text.encode("utf-8")).digest()
            size = max(2, self.vocab_size)
            return [1 + b % (size - 1) for b in digest[: max(4, len(text) // 2)]]
        if self.lowercase:
            # normalize=True: lowercase, drop what the vocabulary cannot say, trim
            chars = "".join(c for c in text.lower() if c in self.vocab).strip()
            ids = [self.vocab[c] for c in chars]
        else:
            # normalize=False: every character, unknown ones as <unk> where there is one
            unknown = self.vocab.get(UNKNOWN)
            ids = [i for i in (self.vocab.get(c, unknown) for c in text) if i is not None]
        if not self.add_blank or not ids:
            return ids
        spaced = [0] * (2 * len(ids) + 1)
        spaced[1::2] = ids
        return spaced


def chunks(text: str, limit: int = MAX_CHARS) -> list[str]:
    """Sentences, each cut at spaces into pieces of at most `limit` characters."""
    out: list[str] = []
    for sentence in SENTENCE_END.split(text.strip()):
        current = ""
        for word in sentence.split():
            if current and len(current) + 1 + len(word) > limit:
                out.append(current)
                current = word
            else:
                current = f"{current} {word}" if current else word
        if current:
            out.append(current)
    return out
