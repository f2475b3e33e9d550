"""edge/spec.py: the speech object identity contract (docs/contracts.md#spec-and-key)."""

from __future__ import annotations

import hashlib
import json

import pytest

from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.spec import Spec, SpecError, normalize_text

MODEL = "hibari@" + "ab" * 32


def make(**overrides: object) -> Spec:
    fields: dict[str, object] = {
        "text": "Hello world",
        "voice": "heart",
        "format": AudioFormat.WAV,
        "model": MODEL,
        "speed": 1.0,
        "seed": 0,
    }
    fields.update(overrides)
    return Spec.create(**fields)  # type: ignore[arg-type]


def raw(**overrides: object) -> bytes:
    data: dict[str, object] = {
        "v": 1,
        "text": "Hello world",
        "voice": "heart",
        "format": "wav",
        "speed": 1.0,
        "seed": 0,
        "model": MODEL,
    }
    data.update(overrides)
    return json.dumps(data).encode()


def test_decomposed_and_precomposed_text_give_the_same_key() -> None:
    assert make(text="caf\u0065\u0301").key == make(text="caf\u00e9").key


def test_text_is_stored_in_nfc() -> None:
    assert make(text="e\u0301").text == "\u00e9"


def test_whitespace_runs_including_newlines_and_tabs_collapse_to_one_space() -> None:
    spec = make(text="  Hello\n\n\tbig \r\n  world  ")
    assert spec.text == "Hello big world"
    assert spec.key == make(text="Hello big world").key


def test_normalize_text_keeps_case() -> None:
    assert normalize_text("Hello WORLD") == "Hello WORLD"


def test_different_case_gives_a_different_key() -> None:
    assert make(text="hello world").key != make(text="Hello world").key


def test_speed_is_rounded_to_two_decimals() -> None:
    assert make(speed=1.004).speed == 1.0
    assert make(speed=1.004).key == make(speed=1.0).key


def test_speed_difference_above_rounding_changes_the_key() -> None:
    assert make(speed=1.01).key != make(speed=1.0).key


@pytest.mark.parametrize("speed", [0.5, 2.0, 0.504, 2.004])
def test_speed_at_the_bounds_is_accepted(speed: float) -> None:
    assert 0.5 <= make(speed=speed).speed <= 2.0


@pytest.mark.parametrize("speed", [0.49, 2.01, 0.0, -1.0, 10.0])
def test_speed_out_of_bounds_raises_bad_speed(speed: float) -> None:
    with pytest.raises(SpecError) as excinfo:
        make(speed=speed)
    assert excinfo.value.code == "bad_speed"


@pytest.mark.parametrize("text", ["", "   ", "\n\t \r\n"])
def test_empty_text_raises_empty_text(text: str) -> None:
    with pytest.raises(SpecError) as excinfo:
        make(text=text)
    assert excinfo.value.code == "empty_text"


def test_canonical_json_bytes_are_sorted_compact_and_unescaped_utf8() -> None:
    spec = make(text=" Grüße,\n  Zoë ", speed=1.25, seed=7, format=AudioFormat.OPUS)
    expected = (
        '{"format":"opus","model":"' + MODEL + '","seed":7,"speed":1.25,'
        '"text":"Grüße, Zoë","v":1,"voice":"heart"}'
    ).encode()
    assert spec.to_json() == expected


def test_key_is_lowercase_hex_sha256_of_canonical_json() -> None:
    spec = make(text="Grüße")
    assert spec.key == hashlib.sha256(spec.to_json()).hexdigest()
    assert spec.key == spec.key.lower()
    assert len(spec.key) == 64


def test_model_identity_changes_the_key() -> None:
    assert make(model="hibari@" + "00" * 32).key != make(model="hibari@" + "11" * 32).key


@pytest.mark.parametrize(
    ("field", "a", "b"),
    [
        ("voice", "heart", "joe"),
        ("format", AudioFormat.WAV, AudioFormat.MP3),
        ("seed", 0, 1),
    ],
)
def test_every_other_field_changes_the_key(field: str, a: object, b: object) -> None:
    assert make(**{field: a}).key != make(**{field: b}).key


def test_from_json_round_trips_the_canonical_json() -> None:
    spec = make(text="Grüße, Zoë", speed=1.5, seed=3, format=AudioFormat.FLAC)
    again = Spec.from_json(spec.to_json())
    assert again == spec
    assert again.key == spec.key


def test_from_json_renormalizes_a_non_canonical_spec() -> None:
    spec = Spec.from_json(raw(text="  e\u0301  x  ", speed=1.004))
    assert spec.text == "\u00e9 x"
    assert spec.speed == 1.0


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_from_json_rejects_a_wrong_version(version: object) -> None:
    with pytest.raises(SpecError) as excinfo:
        Spec.from_json(raw(v=version))
    assert excinfo.value.code == "bad_spec"


def test_from_json_rejects_a_missing_version() -> None:
    data = json.loads(raw())
    del data["v"]
    with pytest.raises(SpecError) as excinfo:
        Spec.from_json(json.dumps(data).encode())
    assert excinfo.value.code == "bad_spec"


@pytest.mark.parametrize("payload", [b"not json", b"\xff\xfe", b"[1, 2]", b'"text"'])
def test_from_json_rejects_non_objects(payload: bytes) -> None:
    with pytest.raises(SpecError) as excinfo:
        Spec.from_json(payload)
    assert excinfo.value.code == "bad_spec"


@pytest.mark.parametrize(
    "overrides",
    [
        {"text": 5},
        {"text": None},
        {"voice": ["heart"]},
        {"model": 1},
        {"speed": "1.0"},
        {"speed": True},
        {"speed": None},
        {"seed": 1.5},
        {"seed": "0"},
        {"seed": False},
    ],
)
def test_from_json_rejects_bad_types(overrides: dict[str, object]) -> None:
    with pytest.raises(SpecError) as excinfo:
        Spec.from_json(raw(**overrides))
    assert excinfo.value.code == "bad_spec"


@pytest.mark.parametrize("fmt", ["ogg", "WAV", "", None])
def test_from_json_rejects_an_unknown_format(fmt: object) -> None:
    with pytest.raises(SpecError) as excinfo:
        Spec.from_json(raw(format=fmt))
    assert excinfo.value.code == "unsupported_format"


def test_from_json_applies_speed_bounds() -> None:
    with pytest.raises(SpecError) as excinfo:
        Spec.from_json(raw(speed=3))
    assert excinfo.value.code == "bad_speed"


def test_from_json_accepts_an_integer_speed() -> None:
    assert Spec.from_json(raw(speed=1)).key == make(speed=1.0).key
