"""edge/synth/chunking.py: where an object's chunks end
(docs/contracts.md#exact-length-from-the-first-byte), for whole texts and for texts that
arrive in pieces."""

# ruff: noqa: RUF001  (IPA letters and typographic dashes are what these texts test)

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nearvoice.edge.synth.chunking import MIN_CLAUSE_WORDS, Segmenter, split_chunks


@pytest.mark.parametrize(
    ("text", "chunks"),
    [
        ("Hello there. How are you?", ["Hello there.", "How are you?"]),
        ("Stop! Go? Wait… Fine.", ["Stop!", "Go?", "Wait…", "Fine."]),
        ("Wait... what?! Fine", ["Wait...", "what?!", "Fine"]),
        ("No end mark at all", ["No end mark at all"]),
        ("Ends at the end.", ["Ends at the end."]),
        ("Lines end.\nAnd tabs end.\tToo.", ["Lines end.", "And tabs end.", "Too."]),
        ("", []),
        ("   ", []),
    ],
)
def test_sentences_end_at_marks_followed_by_whitespace(text: str, chunks: list[str]) -> None:
    assert split_chunks(text) == chunks


@pytest.mark.parametrize(
    ("text", "chunks"),
    [
        ('He said "stop." Then left.', ['He said "stop."', "Then left."]),
        ("(Hello.) There.", ["(Hello.)", "There."]),
        ("She asked “why?” Nobody knew.", ["She asked “why?”", "Nobody knew."]),
        ("It ended.') Next.", ["It ended.')", "Next."]),
        ('Quoted."x Next.', ['Quoted."x Next.']),  # no whitespace after the closers
    ],
)
def test_closers_stay_with_their_sentence(text: str, chunks: list[str]) -> None:
    assert split_chunks(text) == chunks


@pytest.mark.parametrize(
    ("text", "chunks"),
    [
        ("Dr. Smith went home. He slept.", ["Dr. Smith went home.", "He slept."]),
        ("Ask Mr. and Mrs. Jones. Now.", ["Ask Mr. and Mrs. Jones.", "Now."]),
        ("Use e.g. this or i.e. that. Done.", ["Use e.g. this or i.e. that.", "Done."]),
        ("J. K. Rowling wrote it. Yes.", ["J. K. Rowling wrote it.", "Yes."]),
        ("Meet at 9 a.m. sharp. Ok.", ["Meet at 9 a.m. sharp.", "Ok."]),
        ("See (Fig. 3) below. Ok.", ["See (Fig. 3) below.", "Ok."]),
        ("DR. WHO is back. Yes.", ["DR. WHO is back.", "Yes."]),  # case does not matter
        ("I saw it. Then I left.", ["I saw it.", "Then I left."]),  # "it" is no initial
        ("Plan B. Then C.", ["Plan B. Then C."]),  # a capital letter reads as an initial
    ],
)
def test_abbreviations_and_initials_end_no_sentence(text: str, chunks: list[str]) -> None:
    assert split_chunks(text) == chunks


@pytest.mark.parametrize(
    ("text", "chunks"),
    [
        ("Pi is 3.14 today. Really.", ["Pi is 3.14 today.", "Really."]),
        ("It costs $1,000.50. Next.", ["It costs $1,000.50.", "Next."]),
        ("Version 2.0.1 shipped. Yes.", ["Version 2.0.1 shipped.", "Yes."]),
        ("Count 1, 2, 3. Go.", ["Count 1, 2, 3.", "Go."]),
    ],
)
def test_numbers_end_no_sentence(text: str, chunks: list[str]) -> None:
    assert split_chunks(text) == chunks


@pytest.mark.parametrize(
    ("text", "chunks"),
    [
        ("Say [Dr.](/dˈɑktəɹ/) now. Next.", ["Say [Dr.](/dˈɑktəɹ/) now.", "Next."]),
        ("Read [a. b](/x. y/) here. Next.", ["Read [a. b](/x. y/) here.", "Next."]),
        ("Say [it!](/ɪt! ə/) again. Next.", ["Say [it!](/ɪt! ə/) again.", "Next."]),
        ("[字](pinyin:zi4). Next.", ["[字](pinyin:zi4).", "Next."]),
        ("Then [为](pinyin:wei4) it. Ok.", ["Then [为](pinyin:wei4) it.", "Ok."]),
        # a clause mark inside a hint is no boundary either
        ("one two three four [a, b](/ə, b/) five.", ["one two three four [a, b](/ə, b/) five."]),
        # `\[` is a literal bracket: what follows is text, and its marks count
        ("A \\[note. Next.", ["A \\[note.", "Next."]),
    ],
)
def test_pronunciation_hints_hold_no_boundary(text: str, chunks: list[str]) -> None:
    assert split_chunks(text) == chunks


@pytest.mark.parametrize(
    ("text", "chunks"),
    [
        (
            "One two three four, five six. Seven, eight nine ten, eleven.",
            ["One two three four,", "five six.", "Seven, eight nine ten, eleven."],
        ),
        ("Well, that was unexpected. Ok.", ["Well, that was unexpected.", "Ok."]),
        ("A b c d; e f. G.", ["A b c d;", "e f.", "G."]),
        ("A b c d: e f.", ["A b c d:", "e f."]),
        ("One two three four — five six.", ["One two three four —", "five six."]),
        ("One two three four – five six.", ["One two three four –", "five six."]),
        ("One two three four - five six.", ["One two three four -", "five six."]),
        # no whitespace after the mark: a number, a time, a hyphenated word
        ("One two three four,000 five.", ["One two three four,000 five."]),
        ("Meet at the usual 3:30 place today.", ["Meet at the usual 3:30 place today."]),
        ("One two three well-known words.", ["One two three well-known words."]),
        ("One two three four-five, six.", ["One two three four-five,", "six."]),
    ],
)
def test_the_first_chunk_ends_at_a_clause_after_enough_words(text: str, chunks: list[str]) -> None:
    assert split_chunks(text) == chunks


def test_the_clause_boundary_needs_min_clause_words() -> None:
    words = [f"w{i}" for i in range(MIN_CLAUSE_WORDS + 2)]
    for n in range(1, len(words)):
        text = " ".join(words[:n]) + ", " + " ".join(words[n:]) + "."
        chunks = split_chunks(text)
        if n >= MIN_CLAUSE_WORDS:
            assert chunks == [" ".join(words[:n]) + ",", " ".join(words[n:]) + "."]
        else:
            assert chunks == [text]


def test_marks_standing_alone_are_no_words() -> None:
    assert split_chunks("Yes — no — maybe, later on.") == ["Yes — no — maybe, later on."]
    assert split_chunks('So " well - okay, then go.') == ['So " well - okay, then go.']
    assert split_chunks("One — two three four, five.") == ["One — two three four,", "five."]


def test_only_the_first_chunk_ends_at_a_clause() -> None:
    text = "Short. One two three four, five six seven eight, nine."
    assert split_chunks(text) == ["Short.", "One two three four, five six seven eight, nine."]
    late = Segmenter(first_clause=False)
    assert late.feed("One two three four, five six. ") + late.finish() == [
        "One two three four, five six."
    ]


def test_flush_ends_the_segment_where_it_stands() -> None:
    segmenter = Segmenter()
    assert segmenter.feed("Hello the") == []
    assert segmenter.pending == "Hello the"
    assert segmenter.flush() == ["Hello the"]
    assert segmenter.pending == ""
    assert segmenter.flush() == []  # nothing to flush: no empty segment
    # the flushed segment was the first: clauses no longer end segments
    assert segmenter.feed("re one two three four, five. Next") == ["re one two three four, five."]
    assert segmenter.finish() == ["Next"]


def test_a_sentence_is_decided_only_when_the_whitespace_arrives() -> None:
    segmenter = Segmenter()
    assert segmenter.feed("Dr.") == []
    assert segmenter.feed(" Smith.") == []
    assert segmenter.feed('"') == []  # a closer: the sentence may go on
    assert segmenter.feed(" Next") == ['Dr. Smith."']
    assert segmenter.finish() == ["Next"]


# Feeding a text in pieces gives what splitting it whole gives.

ALPHABET = st.sampled_from(
    [*"abcdefgh ABC  ..,,;:!?…-—–\"')]([\\\n3.5", "Dr.", "e.g.", " J. ", "[x](/y/)"]
)
TEXTS = st.lists(ALPHABET, max_size=60).map("".join) | st.text(max_size=80)


@settings(max_examples=300, deadline=None, database=None)
@given(text=TEXTS, cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=8))
def test_pieces_segment_like_the_whole_text(text: str, cuts: list[int]) -> None:
    bounds = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True)]
    segmenter = Segmenter()
    out = [segment for piece in pieces for segment in segmenter.feed(piece)]
    out += segmenter.finish()
    assert out == split_chunks(text)
    assert all(segment and segment == segment.strip() for segment in out)
    # nothing is lost: the segments are the text's non-space characters, in order
    assert "".join("".join(out).split()) == "".join(text.split())
