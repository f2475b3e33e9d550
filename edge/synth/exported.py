"""Export directories, as engines read them: the manifest `nearvoice export optimize`
writes, and the choice of variant.

The choice depends only on the manifest and the configuration (the first configured
execution provider, or a pinned variant), never on what the host happens to have
installed, so every node and `sign --config` with the same configuration name the same
model in their specs (docs/contracts.md#spec-and-key). A variant's sha256 is part of that identity,
so audio from one variant is never served under another's key; a node copies the chosen
file into its data directory under that hash and runs the copy, so replacing an export
under a running node changes nothing it renders. Only json and hashlib are needed here:
the edge install reads exports without onnx or torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("nearvoice.exported")

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
REFERENCE = "fp32"
"""The source graph: parity is measured against it and it runs on every provider."""
MARGIN = 1.05
"""A variant replaces the reference only when measured at least this much faster: timing
noise on a shared machine must not decide which model a fleet runs."""


class ExportDirError(ValueError):
    """An export directory an engine cannot use, with what is wrong in the message."""


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    path: Path
    sha256: str
    passed: bool
    """Passed parity against the reference (on the CPU)."""
    deterministic: bool
    """Repeated renders were bit-identical."""
    x_realtime: dict[str, float]
    """Provider -> seconds of audio per second of rendering, as measured."""
    failed_on: frozenset[str] = frozenset()
    """Providers on which the variant's audio failed parity."""

    def usable_on(self, provider: str) -> bool:
        return self.passed and self.deterministic and provider not in self.failed_on

    def verify(self) -> None:
        """Raises ExportDirError unless the file is the one the manifest measured."""
        try:
            digest = file_sha256(self.path)
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
        return None  # a variant that was not built is reported, never run
    rows = {p: row for p, row in entry.get("speed", {}).items() if isinstance(row, dict)}
    return Variant(
        name=str(entry["name"]),
        path=root / str(entry["file"]),
        sha256=str(entry["sha256"]),
        passed=bool(entry.get("parity", {}).get("passed", False)),
        deterministic=bool(entry.get("deterministic", False)),
        x_realtime={p: float(r["x_realtime"]) for p, r in rows.items() if r.get("x_realtime")},
        failed_on=frozenset(p for p, r in rows.items() if r.get("parity_passed") is False),
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
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ExportDirError(f"{manifest}: malformed ({exc!r})") from exc


def _reference(export: Export) -> Variant:
    for variant in export.variants:
        if variant.name == REFERENCE:
            return variant
    raise ExportDirError(f"{export.path}: no {REFERENCE} variant")


def select(export: Export, provider: str, pin: str | None = None) -> Variant:
    """The variant to run on `provider`: the pinned one if given (it must have passed
    parity), else the fastest usable one measured there, unless the reference is within
    MARGIN of it; where nothing was measured on `provider` (a GPU the export never saw),
    the reference, which runs everywhere."""
    if pin:
        for variant in export.variants:
            if variant.name == pin:
                if not variant.usable_on(provider):
                    raise ExportDirError(
                        f"{export.path}: variant {pin} failed parity or is not deterministic"
                    )
                return variant
        names = [v.name for v in export.variants]
        raise ExportDirError(f"{export.path}: no variant {pin!r} (built: {names})")
    reference = _reference(export)
    measured = [v for v in export.variants if v.usable_on(provider) and provider in v.x_realtime]
    if not measured:
        return reference
    fastest = max(measured, key=lambda v: v.x_realtime[provider])
    baseline = reference.x_realtime.get(provider) if reference in measured else None
    if baseline is not None and fastest.x_realtime[provider] < baseline * MARGIN:
        return reference
    return fastest


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
        from nearvoice.edge.synth.providers import with_profile

        return with_profile(providers, self.export.trt_profile)

    def pinned(self, models: Path) -> Chosen:
        """This choice running from a private copy, `models/<sha256>.onnx`, verified: what
        a node runs cannot change under it, whatever happens to the export directory."""
        models.mkdir(parents=True, exist_ok=True)
        target = models / f"{self.variant.sha256}.onnx"
        if not (target.is_file() and file_sha256(target) == self.variant.sha256):
            self.variant.verify()
            partial = models / f".{target.name}.{os.getpid()}.partial"
            try:
                with self.variant.path.open("rb") as src, partial.open("wb") as dst:
                    while block := src.read(1 << 20):
                        dst.write(block)
                    dst.flush()
                    os.fsync(dst.fileno())
                if file_sha256(partial) != self.variant.sha256:
                    raise ExportDirError(
                        f"{self.variant.path} changed while it was copied; start again"
                    )
                partial.replace(target)
            finally:
                partial.unlink(missing_ok=True)
        variant = dataclasses.replace(self.variant, path=target)
        return dataclasses.replace(self, variant=variant)


def choose(
    voice: str, path: Path, provider: str, family: str, base_id: str, pin: str | None = None
) -> Chosen:
    """Loads the export at `path` for `voice`, checks it is of the engine's `family`, and
    picks its variant; `base_id` is the voice's own `name@sha256`, whose name part the
    variant's identity keeps: `piper-joe-medium.fp16@<variant sha256>`."""
    export = load(path)
    if export.family != family:
        raise ExportDirError(
            f"{path} holds a {export.family} model; voice {voice} renders with {family}"
        )
    variant = select(export, provider, pin)
    model_id = f"{base_id.split('@', 1)[0]}.{variant.name}@{variant.sha256}"
    return Chosen(voice, export, variant, provider, model_id)


def describe(chosen: Chosen) -> str:
    speed = chosen.variant.x_realtime.get(chosen.provider)
    measured = (
        f"{speed:.1f}x realtime on {chosen.provider}"
        if speed
        else f"not measured on {chosen.provider}"
    )
    return (
        f"voice {chosen.voice}: variant {chosen.variant.name} of {chosen.export.path} "
        f"({measured}, parity passed), running {chosen.variant.path.name}"
    )
