# ruff: noqa: RUF001, RUF002  (IPA letters look like Latin ones; they are meant)
"""Inline pronunciation hints (docs/contracts.md#spec-and-key, a contract) and the maps from their
symbols to each local engine's phoneme set.

A hint stays inside the spec's text, so it is part of the object's identity:

* `[word](/phonemes/)`: say `word` as these IPA phonemes, written as misaki and Kokoro take
  them (`/kəˈkɔɹoʊ/` or misaki's own `/kəkˈOɹO/`);
* `[字](pinyin:wei4)`: say a Chinese character with this pinyin (tone digits 1-5);
* `\\[` is a literal bracket and starts no hint.

A `[` whose `]` is not followed by `(` is ordinary text ("[laughs]"), so texts written
before hints existed keep their meaning; a `[...](` that does not close as one of the two
forms above is malformed (`bad_hint`), refused when the spec is made, never later.

Each engine maps a hint's IPA to its own phonemes: hibari to misaki's alphabet (its
diphthongs and affricates are single letters), piper to espeak-ng's IPA as its voice's
`phoneme_id_map` lists it. A symbol the engine cannot map means it does not honour the
spec (`Unmappable`), and the node sends the miss upstream with reason `capability`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

IPA = "ipa"
PINYIN = "pinyin"

_PINYIN = re.compile(r"[a-zü:v]+[1-5](?: [a-zü:v]+[1-5])*")


class HintError(ValueError):
    """A malformed hint; `code` is the JSON error code, as SpecError's."""

    code = "bad_hint"


class Unmappable(ValueError):
    """A hint symbol an engine's phoneme set cannot express."""

    def __init__(self, symbol: str, engine: str) -> None:
        super().__init__(f"{engine} cannot say the hint symbol {symbol!r}")
        self.symbol = symbol


@dataclass(frozen=True, slots=True)
class Hint:
    word: str
    kind: str
    """`ipa` or `pinyin`."""
    value: str
    """The phonemes between the slashes, or the pinyin after `pinyin:`."""


Part = str | Hint


def parse(text: str) -> list[Part]:
    """The text as plain runs (escapes resolved) and hints, in order. Raises HintError."""
    parts: list[Part] = []
    plain: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text) and text[i + 1] == "[":
            plain.append("[")
            i += 2
            continue
        close = text.find("]", i + 1) if char == "[" else -1
        if close < 0 or not text.startswith("(", close + 1):
            plain.append(char)
            i += 1
            continue
        end = text.find(")", close + 2)
        word, body = text[i + 1 : close], text[close + 2 : end]
        if end < 0 or not word.strip() or "[" in word:
            raise HintError(f"malformed pronunciation hint at character {i}")
        if len(body) > 2 and body[0] == "/" and body[-1] == "/" and "/" not in body[1:-1]:
            hint = Hint(word, IPA, body[1:-1])
        elif body.startswith("pinyin:") and _PINYIN.fullmatch(body[7:]):
            hint = Hint(word, PINYIN, body[7:])
        else:
            raise HintError(
                f"hint {text[i : end + 1]!r} must be [word](/phonemes/) or [字](pinyin:wei4)"
            )
        if plain:
            parts.append("".join(plain))
            plain = []
        parts.append(hint)
        i = end + 1
    if plain:
        parts.append("".join(plain))
    return parts


def kinds(text: str) -> frozenset[str]:
    """The hint kinds in `text` (the controls a spec with this text needs)."""
    if "[" not in text:
        return frozenset()
    return frozenset(p.kind for p in parse(text) if isinstance(p, Hint))


def hints(text: str) -> Iterator[Hint]:
    return (p for p in parse(text) if isinstance(p, Hint))


# IPA as people write it -> misaki's alphabet, longest sequences first.
_MISAKI_SEQUENCES = (
    ("eɪ", "A"),
    ("aɪ", "I"),
    ("oʊ", "O"),
    ("əʊ", "Q"),
    ("aʊ", "W"),
    ("ɔɪ", "Y"),
    ("dʒ", "ʤ"),
    ("tʃ", "ʧ"),
    ("ɝ", "ɜɹ"),
    ("ɚ", "əɹ"),
    ("r", "ɹ"),
    ("g", "ɡ"),
)

# misaki's letters -> espeak-ng's IPA (what piper's phoneme maps list).
_ESPEAK_SEQUENCES = (
    ("A", "eɪ"),
    ("I", "aɪ"),
    ("O", "oʊ"),
    ("Q", "əʊ"),
    ("W", "aʊ"),
    ("Y", "ɔɪ"),
    ("ʤ", "dʒ"),
    ("ʧ", "tʃ"),
    ("ᵊ", "ə"),
    ("g", "ɡ"),
    ("r", "ɹ"),
)


def _rewrite(ipa: str, sequences: Iterable[tuple[str, str]]) -> list[str]:
    pairs = sorted(sequences, key=lambda p: -len(p[0]))
    out: list[str] = []
    i = 0
    while i < len(ipa):
        for source, target in pairs:
            if ipa.startswith(source, i):
                out.extend(target)
                i += len(source)
                break
        else:
            out.append(ipa[i])
            i += 1
    return out


def to_misaki(ipa: str, vocab: Iterable[str], engine: str = "hibari") -> str:
    """A hint's IPA in misaki's alphabet; raises Unmappable for a symbol not in `vocab`."""
    known = set(vocab)
    symbols = _rewrite(ipa, _MISAKI_SEQUENCES)
    for symbol in symbols:
        if symbol not in known:
            raise Unmappable(symbol, engine)
    return "".join(symbols)


def to_espeak(ipa: str, vocab: Iterable[str], engine: str = "piper") -> list[str]:
    """A hint's IPA as espeak-ng phonemes, one per list item; raises Unmappable for a
    symbol not in `vocab` (the voice's phoneme_id_map)."""
    known = set(vocab)
    symbols = _rewrite(ipa, _ESPEAK_SEQUENCES)
    for symbol in symbols:
        if symbol not in known:
            raise Unmappable(symbol, engine)
    return symbols


def check_ipa(text: str, vocab: Iterable[str], espeak: bool, engine: str) -> None:
    """Raises Unmappable when a hint in `text` has a symbol the engine cannot say."""
    known = frozenset(vocab)
    for hint in hints(text):
        if hint.kind != IPA:
            continue
        if espeak:
            to_espeak(hint.value, known, engine)
        else:
            to_misaki(hint.value, known, engine)
