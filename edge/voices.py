"""The voice catalog: which engine renders each voice and the model identity that goes
into its specs (docs/contracts.md#spec-and-key and
docs/contracts.md#voices-in-the-default-install). Signing and verifying both resolve voices
here, without loading any model: hibari's ids come from its package metadata, piper's from a
hash of the installed .onnx file, computed once per process."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from nearvoice.edge.synth import capability, hibari_engine, piper_engine
from nearvoice.edge.synth.hibari_engine import ENGINE_NAME as HIBARI
from nearvoice.edge.synth.hibari_engine import HibariEngine, hibari_model_id
from nearvoice.edge.synth.piper_engine import ENGINE_NAME as PIPER
from nearvoice.edge.synth.piper_engine import piper_model_id

if TYPE_CHECKING:
    from nearvoice.edge.config import ExternalSettings, NodeConfig
    from nearvoice.edge.spec import Spec
    from nearvoice.edge.synth.exported import Chosen


@dataclass(frozen=True, slots=True)
class Voice:
    name: str
    engine: str
    model_id: str
    sample_rate: int
    """Hz of the voice's own audio (what its objects carry unless a spec sets `rate`)."""
    controls: tuple[str, ...] = ()
    """Optional spec controls (docs/contracts.md#spec-and-key) the voice's engine honours."""
    languages: tuple[str, ...] = ()
    """BCP 47 tags the voice speaks (empty: whatever its engine is asked)."""


def _engine_controls(engine: str) -> tuple[str, ...]:
    from nearvoice.edge.synth import torch_layout, vits_engine

    known = {
        HIBARI: hibari_engine.CONTROLS,
        PIPER: piper_engine.CONTROLS,
        vits_engine.ENGINE_NAME: vits_engine.CONTROLS,
        torch_layout.ENGINE_NAME: torch_layout.CONTROLS,
    }
    return tuple(sorted(known.get(engine, ())))


def refused_control(voice: Voice, spec: Spec) -> str | None:
    """The first control of `spec` that `voice`'s engine does not honour, decided without
    loading a model, as signing and minting need (edge.synth.capability)."""
    ipa: capability.IpaCheck | None = None
    if voice.engine == HIBARI:
        ipa = hibari_engine.check_ipa
    elif voice.engine == PIPER and voice.name in piper_engine.BUNDLED:
        ipa = functools.partial(_piper_ipa, config=_piper_config(voice.name))
    return capability.refused(spec, voice.controls, voice.languages, ipa)


def _piper_ipa(text: str, config: dict[str, object]) -> None:
    piper_engine.check_ipa(text, config)


@functools.cache
def _piper_config(voice: str) -> dict[str, object]:
    import json

    from nearvoice.edge.synth.piper_engine import BUNDLED

    loaded: dict[str, object] = json.loads(BUNDLED[voice].config_path().read_text("utf-8"))
    return loaded


def _piper_rate(voice: str) -> int:
    """The rate a bundled piper voice's config declares, read without loading its model."""
    import json

    from nearvoice.edge.synth.piper_engine import BUNDLED

    config = json.loads(BUNDLED[voice].config_path().read_text(encoding="utf-8"))
    return int(config["audio"]["sample_rate"])


@functools.cache
def catalog() -> Mapping[str, Voice]:
    """Every voice of the default install (read-only; built once per process)."""
    joe = piper_engine.config_languages(_piper_config("joe"))
    voices = [
        Voice(
            "heart",
            HIBARI,
            hibari_model_id("heart"),
            HibariEngine.sample_rate,
            _engine_controls(HIBARI),
            hibari_engine.LANGUAGES,
        ),
        Voice(
            "joe", PIPER, piper_model_id("joe"), _piper_rate("joe"), _engine_controls(PIPER), joe
        ),
    ]
    return MappingProxyType({v.name: v for v in voices})


class UnknownVoice(KeyError):
    def __init__(self, voice: str, known: list[str]) -> None:
        super().__init__(voice)
        self.voice = voice
        self.known = known


def with_external(external: Iterable[ExternalSettings]) -> Mapping[str, Voice]:
    """The catalog plus the voices of configured external servers."""
    voices = dict(catalog())
    for server in external:
        for voice in server.voices:
            if voice.name in voices:
                raise ValueError(f"voice {voice.name!r} is defined twice")
            voices[voice.name] = Voice(
                voice.name,
                server.name,
                voice.model_id,
                server.sample_rate,
                tuple(sorted(server.controls)),
            )
    return MappingProxyType(voices)


@functools.lru_cache(maxsize=64)
def _choice(
    voice: str, directory: str, provider: str, family: str, base_id: str, pin: str | None
) -> Chosen:
    """One load per process and setting: the node's voices and its engines then agree even
    if the export is replaced between the two."""
    from pathlib import Path

    from nearvoice.edge.synth import vits_engine
    from nearvoice.edge.synth.exported import choose

    chosen = choose(voice, Path(directory), provider, family, base_id, pin)
    if family == vits_engine.FAMILY:
        model_id = vits_engine.vits_model_id(voice, chosen)
        chosen = dataclasses.replace(chosen, model_id=model_id)
    return chosen


def exported_variants(config: NodeConfig) -> dict[str, Chosen]:
    """The variant each voice of `[synth.exports]` renders: an installed voice's own model
    exported, or a new voice defined by a `vits` export. The variant is chosen for the
    first configured provider (or pinned in `[synth.variants]`), not for what this host
    has installed, so that signing and every node with this configuration agree.
    Raises ValueError (ExportDirError) for a voice or export directory it cannot use."""
    from nearvoice.edge.synth import vits_engine

    synth = config.synth
    chosen: dict[str, Chosen] = {}
    stray = sorted(set(synth.variants) - set(synth.exports))
    if stray:
        raise ValueError(f"[synth.variants] names voice(s) without an export: {stray}")
    provider = synth.providers[0] if synth.providers else "cpu"
    external = {v.name for server in config.external for v in server.voices}
    for voice, directory in sorted(synth.exports.items()):
        if not isinstance(directory, str):
            raise ValueError(f"[synth.exports] {voice} must be a directory path string")
        if voice in external:
            raise ValueError(f"[synth.exports] names {voice!r}, an external server's voice")
        known = catalog().get(voice)
        # A voice of its own: only what `from-transformers` made can define one.
        family = known.engine if known else vits_engine.FAMILY
        base_id = known.model_id if known else ""
        pin = synth.variants.get(voice)
        chosen[voice] = _choice(voice, directory, provider, family, base_id, pin)
    return chosen


def torch_voices(config: NodeConfig) -> dict[str, Voice]:
    """The voices of `[[torch]]` tables, with identities that name the device, the batch
    layout and the checkpoint's hash (edge.synth.torch_layout). Reads each checkpoint's
    config and hashes its files; imports torch only to resolve `device = "auto"`."""
    from nearvoice.edge.synth import torch_layout

    voices: dict[str, Voice] = {}
    for settings in config.torch:
        checkpoint = torch_layout.read_checkpoint(settings.checkpoint)
        layout = torch_layout.Layout.of(settings, torch_layout.resolve_device(settings.device))
        voices[settings.voice] = Voice(
            settings.voice,
            torch_layout.ENGINE_NAME,
            torch_layout.model_id(settings.voice, checkpoint, layout),
            checkpoint.sample_rate,
            _engine_controls(torch_layout.ENGINE_NAME),
        )
    return voices


def for_config(config: NodeConfig) -> Mapping[str, Voice]:
    """Every voice a node with this configuration accepts, with the model identity its
    specs carry: the catalog's, exported variants in place of the packaged models, voices
    of `vits` exports, the voices of external servers and of `[[torch]]` checkpoints.
    `sign --config` resolves voices the same way."""
    voices = dict(with_external(config.external))
    for name, defined in torch_voices(config).items():
        if name in voices:
            raise ValueError(f"voice {name!r} is defined twice ([[torch]])")
        voices[name] = defined
    for voice, chosen in exported_variants(config).items():
        known = voices.get(voice)
        engine = known.engine if known else chosen.export.family
        voices[voice] = Voice(
            voice,
            engine,
            chosen.model_id,
            chosen.export.sample_rate,
            _engine_controls(engine),
            known.languages if known else (),
        )
    return MappingProxyType(voices)


def resolve(voice: str, voices: Mapping[str, Voice] | None = None) -> Voice:
    voices = catalog() if voices is None else voices
    found = voices.get(voice)
    if found is None:
        raise UnknownVoice(voice, sorted(voices))
    return found
