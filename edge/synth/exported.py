"""Export directories, as engines read them: the manifest `nearvoice export optimize`
writes, and the choice of variant.

The choice is a pure function of the manifest and the execution provider, so every node
with the same export and provider renders the same variant and names the same model in
its specs (DESIGN.md section 2): a variant's sha256 is part of the model identity, so
audio from one variant is never served under another's key. Only json and hashlib are
needed here; the edge install reads exports without onnx or torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("nearvoice.exported")

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
REFERENCE = "fp32"
"""The source graph: parity is measured against it and it runs on every provider."""


class ExportDirError(ValueError):
    """An export directory an engine cannot use, with what is wrong in the message."""


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    path: Path
    sha256: str
    passed: bool
    """Passed parity against the reference."""
    x_realtime: dict[str, float]
    """Provider -> seconds of audio per second of rendering, as measured."""

    def verify(self) -> None:
        """Raises ExportDirError unless the file is the one the manifest measured."""
        try:
            with self.path.open("rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as exc:
            raise ExportDirError(f"variant {self.name}: cannot read {self.path}: {exc}") from exc
        if digest != self.sha256:
            raise ExportDirError(
                f"variant {self.name}: {self.path} has sha256 {digest}, "
                f"the manifest says {self.sha256}; re-run nearvoice export optimize"
            )


@dataclass(frozen=True, slots=True)
class Export:
    path: Path
    family: str
    sample_rate: int
    variants: tuple[Variant, ...]
    trt_profile: dict[str, str]
    """TensorRT provider options for the min/opt/max text lengths the export measured."""

    def sidecar(self, name: str) -> Path:
        return self.path / name


def _variant(root: Path, entry: dict[str, Any]) -> Variant | None:
    if entry.get("error") or not entry.get("file"):
        return None  # a variant that failed to build is reported, never run
    speed = entry.get("speed", {})
    return Variant(
        name=str(entry["name"]),
        path=root / str(entry["file"]),
        sha256=str(entry["sha256"]),
        passed=bool(entry.get("parity", {}).get("passed", False)),
        x_realtime={
            p: float(row["x_realtime"])
            for p, row in speed.items()
            if isinstance(row, dict) and row.get("x_realtime")
        },
    )


def load(path: Path) -> Export:
    """Reads `path/manifest.json`; raises ExportDirError with the reason when it is not a
    complete export."""
    manifest = path / MANIFEST
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ExportDirError(f"{path} is not an export directory: no {MANIFEST}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportDirError(f"{manifest} is unreadable: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ExportDirError(f"{manifest}: unsupported manifest format")
    try:
        variants = tuple(v for v in (_variant(path, e) for e in data["variants"]) if v is not None)
        profile = data.get("tensorrt", {}).get("provider_options", {})
        return Export(
            path,
            str(data["family"]),
            int(data["sample_rate"]),
            variants,
            {str(k): str(v) for k, v in profile.items()},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportDirError(f"{manifest}: malformed ({exc!r})") from exc


def select(export: Export, provider: str) -> Variant:
    """The fastest variant that passed parity and was measured on `provider`; where no
    variant was measured on it (a GPU the export never saw), the reference, which runs
    everywhere."""
    measured = [v for v in export.variants if v.passed and provider in v.x_realtime]
    if measured:
        return max(measured, key=lambda v: (v.x_realtime[provider], v.name == REFERENCE))
    for variant in export.variants:
        if variant.name == REFERENCE:
            return variant
    raise ExportDirError(f"{export.path}: no variant passed parity and no {REFERENCE} variant")


@dataclass(frozen=True, slots=True)
class Chosen:
    """The variant a voice renders, and the model identity its specs carry."""

    voice: str
    export: Export
    variant: Variant
    provider: str
    model_id: str

    def sidecar(self, name: str) -> Path:
        return self.export.sidecar(name)

    def providers(self, providers: list[Any]) -> list[Any]:
        """The engine's providers with this export's TensorRT profile."""
        from edge.synth.providers import with_profile

        return with_profile(providers, self.export.trt_profile)


def choose(voice: str, path: Path, provider: str, family: str, base_id: str) -> Chosen:
    """Loads the export at `path` for `voice`, checks it is of the engine's `family`, and
    picks its variant; `base_id` is the voice's own `name@sha256`, whose name part the
    variant's identity keeps: `piper-joe-medium.fp16@<variant sha256>`."""
    export = load(path)
    if export.family != family:
        raise ExportDirError(
            f"{path} holds a {export.family} model; voice {voice} renders with {family}"
        )
    variant = select(export, provider)
    model_id = f"{base_id.split('@', 1)[0]}.{variant.name}@{variant.sha256}"
    return Chosen(voice, export, variant, provider, model_id)


def describe(voice: str, export: Export, variant: Variant, provider: str) -> str:
    speed = variant.x_realtime.get(provider)
    measured = f"{speed:.1f}x realtime on {provider}" if speed else f"not measured on {provider}"
    return f"voice {voice}: variant {variant.name} of {export.path} ({measured}, parity passed)"
