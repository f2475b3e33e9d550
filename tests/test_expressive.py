# ruff: noqa: RUF001  (IPA letters look like Latin ones; they are meant)
"""Expressive controls (docs/contracts.md#spec-and-key): the spec fields `duration`, `emotion`,
`ref`, `lang` and inline pronunciation hints; which engine honours which control, and misses it
does not honour going upstream as `capability`; durations fitted by the duration pass at the
local engines (real hibari and piper models), announced before the first byte and byte-identical
across renders; and the refusals at `nearvoice sign` and the minting API."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from nearvoice.edge.app import create_app
from nearvoice.edge.config import OriginSettings, SynthSettings
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.spec import Emotion, Ref, Spec, SpecError
from nearvoice.edge.synth import fit, hints
from nearvoice.edge.synth.hibari_engine import HibariEngine, hibari_model_id
from nearvoice.edge.synth.piper_engine import PiperEngine, piper_model_id
from nearvoice.edge.voices import catalog, refused_control
from nearvoice.origin.app import create_origin_app
from nearvoice.origin.mint import MINT_TOKEN_ENV
from tests.support import make_config, make_keyring, metric, node_of, sign, wait_ready

Client = TestClient[Any, Any]
KEYRING = make_keyring()
LINE = "The quick brown fox jumps over the lazy dog, and then it runs away."
GOLDEN = {
    # Computed by the code before these fields existed: URLs handed out then still verify.
    "637e0f480f6801a3a697c451ddebb05b8976062580bbe2fe71b3b55b07ae2fc7": dict(
        text="Hello [world] there.",
        voice="heart",
        format=AudioFormat.WAV,
        model="hibari-heart@abc",
        speed=1.25,
        seed=7,
    ),
    "8d160eb606670e5c4c1117a8c20f638a52605cf88a9c7aa90028f835ca21aef3": dict(
        text="Hello world.",
        voice="joe",
        format=AudioFormat.PCM,
        model="piper-joe-medium@def",
        rate=24000,
    ),
}


def spec(text: str = LINE, voice: str = "heart", **kwargs: Any) -> Spec:
    model = hibari_model_id("heart") if voice == "heart" else piper_model_id("joe")
    return Spec.create(text=text, voice=voice, format=AudioFormat.WAV, model=model, **kwargs)


# -- the spec ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(GOLDEN))
def test_specs_without_the_new_fields_keep_their_keys(key: str) -> None:
    made = Spec.create(**GOLDEN[key])
    assert made.key == key
    assert Spec.from_json(made.to_json()).key == key
    assert made.controls() == frozenset()


def test_each_control_is_in_the_canonical_json_only_when_set() -> None:
    plain = spec()
    assert set(plain.canonical()) == {"v", "text", "voice", "format", "speed", "seed", "model"}
    full = spec(
        duration=2.404,
        emotion=Emotion.create(vector=[0.1, 0, 0, 0, 0, 0, 0.333, 0.9], alpha=0.456),
        ref=Ref.create("ref_" + "ab" * 32, "CD" * 32),
        lang="EN-us",
    )
    canonical = full.canonical()
    assert canonical["duration"] == 2.4
    assert canonical["emotion"] == {
        "vector": [0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.33, 0.9],
        "alpha": 0.46,
    }
    assert canonical["ref"] == {"id": "ref_" + "ab" * 32, "sha256": "cd" * 32}
    assert canonical["lang"] == "en-US"
    assert full.controls() == {"duration", "emotion", "ref", "lang"}
    again = Spec.from_json(full.to_json())
    assert again == full and again.key == full.key != plain.key
    # alpha 1 is the default: left out, so one object has one key.
    assert Emotion.create(label="excited", alpha=1).canonical() == {"label": "excited"}


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"duration": 2.0, "speed": 1.2}, "conflicting_controls"),
        ({"duration": 0}, "bad_duration"),
        ({"lang": "english please"}, "bad_lang"),
    ],
)
def test_bad_controls_are_refused(kwargs: dict[str, Any], code: str) -> None:
    with pytest.raises(SpecError) as caught:
        spec(**kwargs)
    assert caught.value.code == code


@pytest.mark.parametrize(
    "kwargs",
    [
        {"vector": [0.5] * 7},
        {"vector": [0.5] * 7 + [1.5]},
        {"vector": [0.5] * 7 + [True]},
        {"label": "happy", "alpha": 1.2},
        {"label": "happy", "text": "calmly"},
        {"text": " "},
        {},
    ],
)
def test_bad_emotions_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(SpecError) as caught:
        Emotion.create(**kwargs)
    assert caught.value.code == "bad_emotion"


def test_hints_parse_and_malformed_ones_are_refused() -> None:
    parts = hints.parse(r"Say [tomato](/təmˈɑːtoʊ/) and [为](pinyin:wei4), \[sic] and [laughs].")
    assert parts == [
        "Say ",
        hints.Hint("tomato", "ipa", "təmˈɑːtoʊ"),
        " and ",
        hints.Hint("为", "pinyin", "wei4"),
        ", [sic] and [laughs].",
    ]
    assert spec(r"Say [tomato](/təmˈɑːtoʊ/).").controls() == {"ipa"}
    assert spec("Say [为](pinyin:wei4).").controls() == {"pinyin"}
    assert spec(r"A \[literal](bracket) and [laughs].").controls() == frozenset()
    for bad in ["Say [tomato](tomato).", "Say [](/x/).", "Say [a](/x/", "Say [a](pinyin:wei)."]:
        with pytest.raises(SpecError) as caught:
            spec(bad)
        assert caught.value.code == "bad_hint", bad


# -- capabilities -------------------------------------------------------------------------


def test_local_engines_declare_what_they_honour() -> None:
    heart, joe = catalog()["heart"], catalog()["joe"]
    assert set(heart.controls) == set(joe.controls) == {"duration", "ipa", "lang"}
    assert refused_control(heart, spec(duration=4.0, lang="en-US")) is None
    assert refused_control(heart, spec(lang="en")) is None
    assert refused_control(heart, spec(lang="en-GB")) == "lang"
    assert refused_control(heart, spec(emotion=Emotion.create(label="sad"))) == "emotion"
    assert refused_control(heart, spec("Say [为](pinyin:wei4).")) == "pinyin"
    # IPA hints: each engine maps them to its own phoneme set; a click it cannot say.
    assert refused_control(heart, spec("Say [tomato](/təmˈɑːtoʊ/).")) is None
    assert refused_control(joe, spec("Say [tomato](/təmˈɑːtoʊ/).", voice="joe")) is None
    assert refused_control(heart, spec("Say [tsk](/ʘ/).")) == "ipa"
    assert refused_control(joe, spec("Say [tsk](/ʘ͡/).", voice="joe")) == "ipa"


def test_an_ipa_hint_changes_how_a_word_is_said() -> None:
    heart = HibariEngine()
    plain = heart.samples("Say tomato please.", "heart", 1.0)
    hinted = heart.samples("Say [tomato](/təmˈɑːtoʊ/) please.", "heart", 1.0)
    rendered = sum(
        len(a) for a in heart.stream("Say [tomato](/təmˈɑːtoʊ/) please.", "heart", 1.0, 0)
    )
    assert hinted == rendered and hinted != plain
    joe = PiperEngine()
    assert joe.samples("Say [tomato](/təmˈɑːtoʊ/) please.", "joe", 1.0) != joe.samples(
        "Say tomato please.", "joe", 1.0
    )


# -- duration fitting ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines() -> dict[str, Any]:
    return {"heart": HibariEngine(), "joe": PiperEngine()}


@pytest.mark.parametrize("voice", ["heart", "joe"])
@pytest.mark.parametrize("ratio", [0.6, 0.85, 1.25, 1.6])
def test_a_fit_lasts_its_target(engines: dict[str, Any], voice: str, ratio: float) -> None:
    engine = engines[voice]
    natural = engine.samples(LINE, voice, 1.0)
    duration = round(natural / engine.sample_rate * ratio, 2)
    fitted = fit.fit(engine, LINE, voice, duration)
    rendered = np.concatenate(list(engine.stream(LINE, voice, fitted.speed, 0)))
    target = fit.target_samples(duration, engine.sample_rate)
    assert len(rendered) == fitted.samples
    assert abs(len(rendered) - target) <= fit.tolerance(target, fit.frame_samples(engine))
    again = fit.fit(engine, LINE, voice, duration)
    assert again == fitted  # the same speed on every node


def test_an_exported_piper_variant_fits_durations(joe_export: Path) -> None:
    from nearvoice.edge.synth import exported

    export = exported.load(joe_export)
    variant = next(v for v in export.variants if v.name == "fp32-opt")
    choice = exported.Chosen("joe", export, variant, "cpu", "piper-joe.fp32-opt@x")
    engine = PiperEngine(exported={"joe": choice})
    natural = engine.samples(LINE, "joe", 1.0)
    assert natural is not None
    duration = round(natural / engine.sample_rate * 0.7, 2)
    fitted = fit.fit(engine, LINE, "joe", duration)
    target = fit.target_samples(duration, engine.sample_rate)
    assert sum(len(a) for a in engine.stream(LINE, "joe", fitted.speed, 0)) == fitted.samples
    assert abs(fitted.samples - target) <= fit.tolerance(target, fit.frame_samples(engine))


def test_a_duration_outside_half_to_twice_the_natural_length_is_refused(
    engines: dict[str, Any],
) -> None:
    with pytest.raises(fit.DurationOutOfRange):
        fit.fit(engines["heart"], "Hello there.", "heart", 9.0)
    with pytest.raises(fit.DurationOutOfRange):
        fit.fit(engines["joe"], "Hello there.", "joe", 0.2)


async def test_a_node_renders_a_fitted_object_exactly_and_deterministically(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    config = make_config(tmp_path, synth=SynthSettings(workers=1, voices=("heart",)))
    client = await aiohttp_client(create_app(config, KEYRING))
    await wait_ready(client)
    fitted = spec("Dubbing this line to fit.", duration=2.4)
    async with client.get(sign(KEYRING, fitted), headers={"Range": "bytes=0-"}) as resp:
        assert resp.status == 206
        first = await resp.read()
        announced = int(resp.headers["Content-Range"].rsplit("/", 1)[1])
    assert len(first) == announced
    audio, rate = soundfile.read(io.BytesIO(first))
    assert abs(len(audio) / rate - 2.4) <= max(0.02 * 2.4, 600 / rate)
    # Another node renders the same bytes.
    other = make_config(tmp_path / "b", synth=SynthSettings(workers=1, voices=("heart",)))
    client2 = await aiohttp_client(create_app(other, KEYRING))
    await wait_ready(client2)
    async with client2.get(sign(KEYRING, fitted)) as resp:
        assert resp.status == 200 and await resp.read() == first
    assert await metric(client, "nearvoice_duration_error_ratio_count", engine="hibari") == 1
    # Out of range at the rendering node: refused before any byte.
    far = spec("Hello there.", duration=9.0)
    async with client.get(sign(KEYRING, far)) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "duration_out_of_range"


async def test_a_control_the_engine_does_not_honour_goes_upstream_as_capability(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    config = make_config(tmp_path, synth=SynthSettings(workers=1, voices=("heart",)))
    client = await aiohttp_client(create_app(config, KEYRING))
    await wait_ready(client)
    assert await metric(client, "nearvoice_upstream_requests_total", reason="capability") == 0
    sad = spec("Hello there.", emotion=Emotion.create(label="sad"))
    from nearvoice.edge.policy import Policy
    from nearvoice.edge.token import Grant

    producer = node_of(client.server.app).producer
    assert producer.choose(Grant(sad, Policy.HOT, 0)) == "capability"
    assert producer.choose(Grant(spec("Hello there."), Policy.HOT, 0)) != "capability"
    # This node has no upstream: a spec nobody here can render is a 400 naming why.
    async with client.get(sign(KEYRING, sad)) as resp:
        assert resp.status == 400
        body = await resp.json()
        assert body["error"] == "unsupported_control" and "emotion" in body["message"]


# -- sign and mint --------------------------------------------------------------------------


def _sign(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NEARVOICE_KEYS": "k1:" + "c2VjcmV0" * 5 + "MTI="}
    command = [
        sys.executable,
        "-m",
        "nearvoice.edge.cli",
        "sign",
        "--base",
        "http://edge.test",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def test_sign_takes_the_expressive_flags_and_refuses_what_no_engine_honours() -> None:
    ok = _sign("--text", "Hello there.", "--voice", "joe", "--duration", "1.2", "--lang", "en-US")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("http://edge.test/v1/speech/")
    refused = {
        "a duration or a speed": ["--duration", "1.2", "--speed", "1.5"],
        "'emotion'": ["--emotion-vector", "0,0,0,0,0,0,0,1", "--emotion-alpha", "0.5"],
        "'ref'": ["--ref", "ref_" + "a" * 64, "--ref-sha256", "b" * 64],
        "--ref and --ref-sha256": ["--ref", "ref_" + "a" * 64],
        "8 numbers": ["--emotion-vector", "1,2"],
    }
    for message, flags in refused.items():
        done = _sign("--text", "Hello there.", "--voice", "heart", *flags)
        assert done.returncode == 2 and message in done.stderr, (flags, done.stderr)
        assert done.stdout == ""


def test_sign_with_a_config_knows_the_natural_length() -> None:
    config = str(Path(__file__).parent.parent / "configs" / "edge.toml")
    far = _sign("--text", "Hello there.", "--voice", "heart", "--duration", "9", "--config", config)
    assert far.returncode == 2 and "outside 0.5-2.0x" in far.stderr
    near = _sign(
        "--text", "Hello there.", "--voice", "heart", "--duration", "1", "--config", config
    )
    assert near.returncode == 0, near.stderr


@pytest.fixture
async def origin(
    aiohttp_client: AiohttpClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Client:
    monkeypatch.setenv(MINT_TOKEN_ENV, "mint-token-0123456789")
    config = make_config(
        tmp_path, origin=OriginSettings(), synth=SynthSettings(workers=1, voices=("heart",))
    )
    client = await aiohttp_client(create_origin_app(config, KEYRING, persistent=None))
    await wait_ready(client)
    return client


async def test_mint_takes_the_controls_and_validates_them(origin: Client) -> None:
    auth = {"Authorization": "Bearer mint-token-0123456789"}

    async def mint(**body: Any) -> tuple[int, Any]:
        async with origin.post(
            "/v1/speech", json={"text": "Hello there.", **body}, headers=auth
        ) as r:
            return r.status, await r.json()

    status, body = await mint(duration=1.0, lang="en-US")
    assert status == 201, body
    assert body["key"] == spec("Hello there.", duration=1.0, lang="en-US").key
    cases = {
        "conflicting_controls": {"duration": 1.0, "speed": 1.3},
        "duration_out_of_range": {"duration": 9.0},
        "unsupported_control": {"emotion": {"label": "excited"}},
        "bad_emotion": {"emotion": {"vector": [0.1] * 9}},
        "unknown_ref": {"ref": "ref_" + "a" * 64},
        "bad_hint": {"text": "Say [x](y)."},
    }
    for code, fields in cases.items():
        status, body = await mint(**fields)
        assert (status, body["error"]) == (400, code), fields


def test_sign_with_a_config_takes_what_an_external_engine_declares(tmp_path: Path) -> None:
    config = tmp_path / "edge.toml"
    config.write_text(
        """
[[external]]
name = "indextts"
base_url = "http://127.0.0.1:9"
protocol = "indextts2"
sample_rate = 22050
controls = ["duration", "emotion", "ref"]
clip_dir = "/srv/clips"
[[external.voices]]
name = "alice"
remote = "/srv/clips/alice.wav"
model_id = "indextts2-alice@test"
"""
    )
    ref = ["--ref", "ref_" + "a" * 64, "--ref-sha256", "a" * 64]
    flags = ["--emotion", "excited", "--emotion-alpha", "0.6", "--duration", "2.4", *ref]
    done = _sign("--text", "Hi.", "--voice", "alice", "--config", str(config), *flags)
    assert done.returncode == 0, done.stderr
    refused = _sign("--text", "Hi.", "--voice", "alice", "--config", str(config), "--lang", "fr")
    assert refused.returncode == 2 and "'lang'" in refused.stderr
