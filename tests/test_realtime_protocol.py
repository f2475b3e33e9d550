"""The realtime protocol without sockets: message parsing, the session state machine,
round-robin turns, session tokens, framing, and log redaction."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nearvoice.edge.errors import Forbidden, Gone
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.logredact import RedactSecrets, redact
from nearvoice.edge.metrics import REALTIME_CLOSE_REASONS, Metrics
from nearvoice.edge.realtime import protocol, tokens
from nearvoice.edge.realtime.framing import OGG_SERIAL, Framer, link_serial
from nearvoice.edge.realtime.protocol import (
    CLIENT_CLOSED,
    CLOSE_REASONS,
    Cancel,
    Close,
    ProtocolError,
    SessionUpdate,
    TextDelta,
    TextDone,
    TextFlush,
)
from nearvoice.edge.realtime.session import Drop, Finish, Render, Send, Session, State, VoiceInfo
from nearvoice.edge.realtime.turns import Turns
from nearvoice.edge.synth.chunking import Segmenter
from tests.support import eventually, make_keyring

VOICES = {"heart": VoiceInfo("heart", 24000), "alloy": VoiceInfo("heart", 24000)}
TEXT = (
    "Well, hello there, my friend: this is the first clause. Dr. Smith paid $3.50 for it! "
    "Did he, really? Yes… and then [word](/wɜrd/) came. The end"
)


def open_session(**kwargs: object) -> Session:
    session = Session(VOICES, **kwargs)  # type: ignore[arg-type]
    actions = session.receive(SessionUpdate(voice="heart", format="pcm"), 0.0)
    assert actions == [
        Send(
            {
                "type": "session.updated",
                "voice": "heart",
                "format": "pcm",
                "speed": 1.0,
                "sample_rate": 24000,
            }
        )
    ]
    return session


def rendered(actions: list[object]) -> list[str]:
    return [a.segment.text for a in actions if isinstance(a, Render)]


def errors(actions: list[object]) -> list[str]:
    return [
        a.message["error"] for a in actions if isinstance(a, Send) and a.message["type"] == "error"
    ]


# -- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("not json", "invalid_json"),
        ("[1, 2]", "invalid_json"),
        ('{"type": "speak"}', "unknown_type"),
        ("{}", "unknown_type"),
        ('{"type": "text.delta"}', "invalid_value"),
        ('{"type": "text.delta", "text": 3}', "invalid_value"),
        ('{"type": "text.delta", "text": "a", "extra": 1}', "unknown_field"),
        ('{"type": "session.update", "speed": "fast"}', "invalid_value"),
        ('{"type": "session.update", "speed": true}', "invalid_value"),
        ('{"type": "session.update", "voice": 1}', "invalid_value"),
    ],
)
def test_malformed_messages_are_refused_with_their_code(raw: str, code: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        protocol.parse(raw)
    assert caught.value.code == code


def test_messages_parse_into_events() -> None:
    assert protocol.parse('{"type":"text.delta","text":"Hi"}') == TextDelta("Hi")
    assert protocol.parse('{"type":"text.flush"}') == TextFlush()
    assert protocol.parse('{"type":"text.done"}') == TextDone()
    assert protocol.parse('{"type":"cancel"}') == Cancel()
    update = protocol.parse('{"type":"session.update","voice":"heart","format":"opus","speed":1}')
    assert update == SessionUpdate("heart", "opus", 1.0)


# -- the session --------------------------------------------------------------------------


def test_segments_depend_only_on_the_text_and_flushes() -> None:
    whole = open_session()
    expected = rendered(whole.receive(TextDelta(TEXT), 0.0)) + rendered(
        whole.receive(TextDone(), 0.0)
    )
    assert expected[0] == "Well, hello there, my friend:"  # the first clause boundary
    assert "Dr. Smith paid $3.50 for it!" in expected
    assert expected[-1] == "The end"

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.integers(min_value=0, max_value=len(TEXT)), max_size=40))
    def cut_anyhow(cuts: list[int]) -> None:
        session = open_session()
        bounds = [0, *sorted(cuts), len(TEXT)]
        texts: list[str] = []
        for start, end in itertools.pairwise(bounds):
            texts += rendered(session.receive(TextDelta(TEXT[start:end]), 0.0))
        texts += rendered(session.receive(TextDone(), 0.0))
        assert texts == expected

    cut_anyhow()


def test_a_flush_ends_the_segment_where_it_stands() -> None:
    session = open_session()
    assert rendered(session.receive(TextDelta("no end mark yet"), 0.0)) == []
    assert rendered(session.receive(TextFlush(), 0.0)) == ["no end mark yet"]


def test_segments_carry_the_settings_in_force_and_their_time() -> None:
    session = open_session()
    session.receive(SessionUpdate(format="opus", speed=1.234), 0.0)
    (action,) = session.receive(TextDelta("One sentence here. "), 7.5)
    assert isinstance(action, Render)
    segment = action.segment
    assert (segment.index, segment.voice, segment.format, segment.speed) == (
        0,
        "heart",
        AudioFormat.OPUS,
        1.23,
    )
    assert segment.completed_at == 7.5


def test_done_comes_after_the_last_segment_is_through() -> None:
    session = open_session()
    actions = session.receive(TextDelta("First one. Second one."), 0.0)
    actions += session.receive(TextDone(), 0.0)
    assert rendered(actions) == ["First one.", "Second one."]
    assert session.state is State.DRAINING
    session.started(0)
    assert session.finished(0) == []
    session.started(1)
    assert session.finished(1) == [Send({"type": "done"}), Finish(Close.NORMAL)]
    assert session.receive(TextDelta("more"), 0.0) == []  # closed


def test_text_after_done_is_an_error_and_the_session_stays() -> None:
    session = open_session()
    session.receive(TextDelta("Something."), 0.0)
    session.receive(TextDone(), 0.0)
    assert errors(session.receive(TextDelta("late"), 0.0)) == ["text_after_done"]
    assert errors(session.receive(TextFlush(), 0.0)) == ["text_after_done"]


def test_cancel_drops_what_has_not_started_and_keeps_the_session() -> None:
    session = open_session()
    session.receive(TextDelta("One. Two. Three. And pending"), 0.0)
    session.started(0)
    assert session.receive(Cancel(), 0.0) == [Drop((1, 2))]
    assert session.state is State.OPEN
    # The pending text went too; what comes next is new.
    actions = session.receive(TextDelta(" words. Four."), 0.0)
    actions += session.receive(TextDone(), 0.0)
    assert rendered(actions) == ["words.", "Four."]
    assert [a.segment.index for a in actions if isinstance(a, Render)] == [3, 4]


def test_text_before_session_update_is_refused() -> None:
    session = Session(VOICES)
    assert errors(session.receive(TextDelta("Hello."), 0.0)) == ["no_session"]


@pytest.mark.parametrize(
    ("update", "code"),
    [
        (SessionUpdate(voice="nobody"), "unknown_voice"),
        (SessionUpdate(voice="heart", format="mp3"), "unsupported_format"),
        (SessionUpdate(voice="heart", speed=3.0), "bad_speed"),
        (SessionUpdate(format="pcm"), "invalid_value"),  # no voice yet
    ],
)
def test_bad_session_updates_are_refused(update: SessionUpdate, code: str) -> None:
    session = Session(VOICES)
    assert errors(session.receive(update, 0.0)) == [code]
    assert session.state is State.CONFIGURING


def test_a_token_binds_the_voice() -> None:
    session = Session(VOICES, bound_voice="heart")
    (sent,) = session.receive(SessionUpdate(format="opus"), 0.0)
    assert isinstance(sent, Send)
    assert sent.message["voice"] == "heart"
    assert sent.message["sample_rate"] == 24000
    assert errors(session.receive(SessionUpdate(voice="alloy"), 0.0)) == []  # an alias of it
    other = Session({**VOICES, "joe": VoiceInfo("joe", 22050)}, bound_voice="heart")
    assert errors(other.receive(SessionUpdate(voice="joe"), 0.0)) == ["voice_not_allowed"]


def test_text_over_the_limit_is_dropped_with_an_error() -> None:
    session = open_session(max_segment_chars=20)
    actions = session.receive(TextDelta("a" * 25), 0.0)
    assert errors(actions) == ["segment_too_long"]
    assert rendered(actions) == []
    assert rendered(session.receive(TextDelta(" Short one. "), 0.0)) == ["Short one."]
    assert errors(session.receive(TextDelta("b" * 30 + ". "), 0.0)) == ["segment_too_long"]


# -- turns --------------------------------------------------------------------------------


async def test_turns_go_round_robin_between_owners() -> None:
    turns = Turns(1)
    first = await turns.take("a")  # the slot is free
    order: list[str] = []

    async def segment(owner: str, name: str) -> None:
        turn = await turns.take(owner)
        order.append(name)
        turn.release()

    tasks = [asyncio.create_task(segment("a", f"a{i}")) for i in range(3)]
    tasks += [asyncio.create_task(segment("b", f"b{i}")) for i in range(2)]
    tasks += [asyncio.create_task(segment("c", "c0"))]
    await eventually(lambda: turns.waiting == 6)
    first.release()
    await asyncio.gather(*tasks)
    # "a" had the first turn, so the others go before it; then each in turn.
    assert order == ["b0", "c0", "a0", "b1", "a1", "a2"]
    assert turns.busy == 0


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    turns = Turns(1)
    held = await turns.take("a")
    waiter = asyncio.create_task(turns.take("b"))
    await eventually(lambda: turns.waiting == 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert turns.waiting == 0
    held.release()
    held.release()  # idempotent
    assert turns.busy == 0


# -- tokens -------------------------------------------------------------------------------


def test_tokens_verify_and_bind_every_field() -> None:
    keyring = make_keyring()
    text = tokens.encode(keyring, tokens.SessionToken("acme", "heart", 2000))
    assert tokens.verify(keyring, text, now=1000, skew=0) == tokens.SessionToken(
        "acme", "heart", 2000
    )
    kid, payload, sig = text.rsplit(".", 2)
    forged = json.dumps({"e": 2000, "t": "other", "v": "heart"}, separators=(",", ":"))
    forged_payload = base64.urlsafe_b64encode(forged.encode()).rstrip(b"=").decode()
    for bad in (
        f"{kid}.{forged_payload}.{sig}",
        f"{kid}.{payload}.{sig[:-2]}AA",
        f"{kid}.{payload}.",
        "garbage",
    ):
        with pytest.raises(Forbidden):
            tokens.verify(keyring, bad, now=1000, skew=0)
    with pytest.raises(Forbidden) as caught:
        tokens.verify(keyring, f"nokid.{payload}.{sig}", now=1000, skew=0)
    assert caught.value.code == "unknown_kid"
    with pytest.raises(Gone):
        tokens.verify(keyring, text, now=2031, skew=30)
    other = make_keyring("other:another-secret-that-is-long-enough-000")
    with pytest.raises(Forbidden):
        tokens.verify(other, text, now=1000, skew=0)


# -- framing ------------------------------------------------------------------------------


def test_pcm_frames_hold_whole_samples() -> None:
    framer = Framer(AudioFormat.PCM, 24000, 0, frame_bytes=5)
    frames = framer.push(b"\x01" * 7) + framer.push(b"\x02" * 3)
    assert all(len(f) % 2 == 0 and len(f) <= 4 for f in frames)
    assert b"".join(frames) == b"\x01" * 7 + b"\x02" * 3
    assert framer.audio_ms == 5 * 1000 // 24000


def _page(serial: int, granule: int, body: bytes, flags: int = 0) -> bytes:
    from nearvoice.edge.synth.ogg import ogg_crc

    header = bytearray(b"OggS\x00" + bytes([flags]) + struct.pack("<qIII", granule, serial, 0, 0))
    header += bytes([1, len(body)])
    page = header + body
    struct.pack_into("<I", page, 22, ogg_crc(page))
    return bytes(page)


def test_opus_links_get_their_own_serial_and_duration() -> None:
    head = b"OpusHead" + bytes([1, 1]) + struct.pack("<HIhB", 312, 24000, 0, 0)
    stream = _page(OGG_SERIAL, 0, head, 2) + _page(OGG_SERIAL, 48000 + 312, b"x" * 10, 4)
    framer = Framer(AudioFormat.OPUS, 24000, 3, frame_bytes=16384)
    out = b"".join(framer.push(stream[:30]) + framer.push(stream[30:]) + framer.finish())
    assert len(out) == len(stream)
    assert struct.unpack_from("<I", out, 14)[0] == link_serial(3) != OGG_SERIAL
    assert framer.audio_ms == 1000
    assert link_serial(0) != link_serial(1)


# -- logs ---------------------------------------------------------------------------------


def test_tokens_are_redacted_from_access_logs(caplog: pytest.LogCaptureFixture) -> None:
    line = '127.0.0.1 "GET /v1/realtime/speech?token=k1.abc.def HTTP/1.1" 101'
    assert redact(line) == '127.0.0.1 "GET /v1/realtime/speech?token=REDACTED HTTP/1.1" 101'
    logger = logging.getLogger("test.access.redact")
    logger.addFilter(RedactSecrets())
    with caplog.at_level(logging.INFO, logger="test.access.redact"):
        logger.info('%s "%s"', "127.0.0.1", "GET /demo?x=1&token=secret-value HTTP/1.1")
    assert "secret-value" not in caplog.text
    assert "token=REDACTED" in caplog.text


def test_segmenter_is_the_one_rule() -> None:
    # The session cuts exactly where the shared rule does.
    segmenter = Segmenter()
    assert rendered(open_session().receive(TextDelta(TEXT), 0.0)) == segmenter.feed(TEXT)


def test_every_realtime_series_exists_at_zero() -> None:
    text = Metrics().render().decode()
    assert "nearvoice_realtime_sessions 0.0" in text
    assert "nearvoice_realtime_first_audio_seconds_count 0.0" in text
    for result in ("hit", "miss", "collapsed"):
        assert f'nearvoice_realtime_segments_total{{result="{result}"}} 0.0' in text
    reasons = {*CLOSE_REASONS.values(), CLIENT_CLOSED}
    assert reasons == set(REALTIME_CLOSE_REASONS)
    for reason in reasons:
        assert f'nearvoice_realtime_closes_total{{reason="{reason}"}} 0.0' in text
