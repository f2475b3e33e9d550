"""edge/voices.py: the catalog of the default install
(docs/contracts.md#voices-in-the-default-install)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from nearvoice.edge.synth.hibari_engine import hibari_model_id
from nearvoice.edge.synth.piper_engine import piper_model_id
from nearvoice.edge.voices import UnknownVoice, Voice, catalog, resolve

HEX64 = "[0-9a-f]{64}"


def test_catalog_has_heart_and_joe() -> None:
    voices = catalog()
    assert sorted(voices) == ["heart", "joe"]
    controls = ("duration", "ipa", "lang")
    assert voices["heart"] == Voice(
        "heart", "hibari", hibari_model_id("heart"), 24000, controls, ("en-US",)
    )
    assert voices["joe"] == Voice(
        "joe", "piper", piper_model_id("joe"), 22050, controls, ("en-US",)
    )
    assert re.fullmatch(f"hibari-heart@{HEX64}", voices["heart"].model_id)
    assert re.fullmatch(f"piper-joe-medium@{HEX64}", voices["joe"].model_id)


def test_catalog_is_built_once_and_read_only() -> None:
    assert catalog() is catalog()
    with pytest.raises(TypeError):
        catalog()["nova"] = Voice("nova", "piper", "x", 22050)  # type: ignore[index]


def test_resolve() -> None:
    assert resolve("joe") == catalog()["joe"]
    assert resolve("heart").engine == "hibari"
    with pytest.raises(UnknownVoice) as caught:
        resolve("nova")
    assert caught.value.voice == "nova"
    assert caught.value.known == ["heart", "joe"]


def test_catalog_loads_no_model() -> None:
    code = (
        "import edge.voices, sys; edge.voices.catalog(); "
        "print(sorted(m for m in ('onnxruntime', 'piper') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
