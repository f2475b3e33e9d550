"""Where an object's chunks end: the rule every engine and the realtime door share
(docs/contracts.md#exact-length-from-the-first-byte, a contract).

An engine renders text chunk by chunk and the first chunk's audio is what a player hears
first, so the first chunk must be short: a long first sentence would put its whole render
between the request and the first byte. The rule:

* A sentence ends at `.`, `!`, `?` or `…` (closing quotes and brackets may follow), then
  whitespace or the end of the text. It does not end after a listed abbreviation
  ("Dr. Smith", "e.g. this") or a single capital initial ("J. K. Rowling"), inside a
  number ("3.5" has no whitespace after its point), or inside a pronunciation hint
  (`[word](/phonemes/)`, `[字](pinyin:wei4)`; `\\[` is a literal bracket, no hint).
* The first chunk also ends at its first clause boundary: `,`, `;`, `:` or a dash (em or en dash,
  or `-` standing alone) followed by whitespace, once the chunk has at least
  `MIN_CLAUSE_WORDS` words. Only the first chunk: later ones are rendered while the first
  plays, and cutting them would only add pauses.

The cut points depend only on the text (and, for realtime sessions, the positions of
explicit flushes), never on how the text arrived: `Segmenter` decides a sentence end only
once it has seen the whitespace after it, so feeding a text in any number of pieces gives
the same segments as feeding it whole, which is what makes renders identical on every node.
"""

from __future__ import annotations

MIN_CLAUSE_WORDS = 4
"""Words the first chunk needs before a clause boundary may end it: "Well, ..." is not
worth a chunk of its own, four words are about 300 ms of speech."""

SENTENCE_ENDS = frozenset(".!?…")
CLAUSE_MARKS = frozenset(",;:\u2014\u2013")  # em and en dashes
CLOSERS = frozenset("\"')]}\u201d\u2019\u00bb")  # closing quotes and brackets
"""Characters that may stand between a sentence's end mark and the whitespace after it."""

ABBREVIATIONS = frozenset(
    {
        "mr", "mrs", "ms", "mx", "dr", "prof", "sr", "jr", "st", "mt", "ft", "vs", "etc",
        "e.g", "i.e", "cf", "al", "inc", "ltd", "co", "corp", "no", "nos", "fig", "figs",
        "approx", "dept", "est", "gen", "gov", "sen", "rep", "rev", "sgt", "capt", "lt",
        "col", "maj", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct",
        "nov", "dec", "mon", "tue", "wed", "thu", "fri", "sat", "sun", "a.m", "p.m", "u.s",
        "u.k", "ph.d", "vol", "p", "pp", "ch", "sec",
    }
)  # fmt: skip
"""Words (lowercase, without their final period) after which a period ends no sentence."""


class Segmenter:
    """Cuts a text that arrives in pieces into segments by the rule above.

    `feed` returns the segments the new text completed; `flush` ends the current segment
    wherever it stands (a realtime client's `text.flush`); `finish` ends the text. Segments
    are stripped of surrounding whitespace and never empty."""

    def __init__(self, *, first_clause: bool = True) -> None:
        self._buffer = ""
        self._scanned = 0
        """How far `_buffer` has been searched: each character is looked at once."""
        self._first = first_clause
        """The next segment is the first and may end at a clause boundary."""
        self._hint = _HintState()

    def feed(self, text: str) -> list[str]:
        self._buffer += text
        out: list[str] = []
        while (cut := self._next_cut()) is not None:
            self._emit(cut, out)
        return out

    def flush(self) -> list[str]:
        out: list[str] = []
        self._emit(len(self._buffer), out)
        return out

    def finish(self) -> list[str]:
        out: list[str] = []
        # At the end of the text a final end mark needs no whitespace after it; whatever
        # is left is the last segment either way.
        self._emit(len(self._buffer), out)
        return out

    @property
    def pending(self) -> str:
        """Text received and not yet part of a segment."""
        return self._buffer

    def _emit(self, cut: int, out: list[str]) -> None:
        segment = self._buffer[:cut].strip()
        self._buffer = self._buffer[cut:]
        self._scanned = 0
        self._hint = _HintState()
        if segment:
            out.append(segment)
            self._first = False

    def _next_cut(self) -> int | None:
        """The end of the next complete segment in the buffer, or None for more text."""
        text = self._buffer
        # A candidate at i needs text[i + 1 ...] to decide, so stop one short of the end.
        while self._scanned < len(text) - 1:
            i = self._scanned
            char = text[i]
            if self._hint.step(text, i):
                self._scanned += 1
                continue
            if char in SENTENCE_ENDS:
                after = _skip_closers(text, i + 1)
                if after >= len(text):
                    return None  # the closers may go on: decide when more text arrives
                if text[after].isspace() and not _abbreviation(text, i):
                    return after
            elif self._first and _clause_mark(text, i) and _words(text[:i]) >= MIN_CLAUSE_WORDS:
                return i + 1
            self._scanned += 1
        return None


def split_chunks(text: str) -> list[str]:
    """A whole text cut into the chunks an engine renders one after another."""
    segmenter = Segmenter()
    return segmenter.feed(text) + segmenter.finish()


class _HintState:
    """Tracks whether the scan is inside a pronunciation hint, `[text](spec)`."""

    __slots__ = ("depth", "in_spec")

    def __init__(self) -> None:
        self.depth = 0  # inside [ ... ]
        self.in_spec = False  # inside the ( ... ) that follows ]

    def step(self, text: str, i: int) -> bool:
        """Advances over text[i]; True if that character is part of a hint."""
        char = text[i]
        if self.in_spec:
            if char == ")":
                self.in_spec = False
            return True
        if self.depth:
            if char == "]":
                self.depth = 0
                self.in_spec = i + 1 < len(text) and text[i + 1] == "("
            return True
        if char == "[" and not (i > 0 and text[i - 1] == "\\"):
            self.depth = 1
            return True
        return False


def _skip_closers(text: str, i: int) -> int:
    while i < len(text) and text[i] in CLOSERS:
        i += 1
    return i


def _clause_mark(text: str, i: int) -> bool:
    char, nxt = text[i], text[i + 1]
    if not nxt.isspace():
        return False  # "1,000", "a-b", "3:30": no boundary
    if char in CLAUSE_MARKS:
        return True
    # A hyphen counts only standing alone between spaces, as a dash typed as "-".
    return char == "-" and i > 0 and text[i - 1].isspace()


def _abbreviation(text: str, i: int) -> bool:
    """Whether the period at text[i] closes an abbreviation or an initial."""
    if text[i] != ".":
        return False
    start = i
    while start > 0 and not text[start - 1].isspace() and text[start - 1] not in _OPENERS:
        start -= 1
    word = text[start:i]
    if len(word) == 1 and word.isalpha() and word.isupper():
        return True  # an initial: "J. K. Rowling"
    return word.lower() in ABBREVIATIONS


_OPENERS = "([\"'\u201c\u2018"


def _words(text: str) -> int:
    """Words in `text`: runs without whitespace that hold a letter or a digit, so a dash,
    an ellipsis or a quote standing alone is no word."""
    return sum(1 for token in text.split() if any(c.isalnum() for c in token))
