"""`nearvoice export optimize`: an ONNX TTS model becomes measured variants.

The source model's front end encodes the fixed sentences once; every variant renders the
same inputs, so differences are the variant's alone. The reference (fp32, the source
graph) is rendered first; each other variant is built, rendered, compared and timed in
turn. Everything is written to a staging directory that replaces the output only when the
whole report is complete.
"""

from __future__ import annotations

import datetime
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nearvoice.edge.synth import exported
from nearvoice.edge.synth.engine import Audio
from nearvoice.edge.synth.exported import REFERENCE, file_sha256
from nearvoice.edge.synth.providers import NAMES
from nearvoice.export.errors import CorruptModel, ExportError, ParityFailure
from nearvoice.export.frontends import Feeds, Frontend, detect
from nearvoice.export.measure import Speed, Thresholds, parity, render, session
from nearvoice.export.report import chart, markdown, write_manifest
from nearvoice.export.sentences import SENTENCES
from nearvoice.export.staging import staged_dir
from nearvoice.export.tensorrt import check, simplify
from nearvoice.export.variants import SIMPLIFIED, Recipe, SkipVariant, recipes


@dataclass
class Options:
    """What `optimize` builds and how it measures."""

    variants: list[str] | None = None
    """Variant names to build (default: all); fp32, the reference, is always built."""
    repeats: int = 2
    """Renders per chunk when timing; the fastest counts."""
    threads: int = 1
    """onnxruntime threads when timing on the CPU."""
    thresholds: Thresholds = field(default_factory=Thresholds)
    max_tokens: int = 1024
    """Longest input (tokens) the TensorRT profile covers."""
    providers: list[str] | None = None
    """Providers to time on (default: the CPU plus every GPU provider installed)."""
    sentences: Sequence[str] = SENTENCES
    name: str = ""
    """Name in the report (default: the output directory's name)."""
    progress: bool = True


def installed_providers() -> list[str]:
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    return [short for short, full in NAMES.items() if full in available]


def _bar(total: int, desc: str, enabled: bool) -> tqdm[Any]:
    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False)


def _audio_seconds(audios: Sequence[Audio], rate: int) -> float:
    return sum(len(a) for a in audios) / rate


def _time_on(
    provider: str,
    model: Path,
    frontend: Frontend,
    encoded: Sequence[Sequence[Feeds]],
    refs: Sequence[Audio],
    opts: Options,
    trt_options: dict[str, str],
    cache: Path,
) -> dict[str, Any]:
    """A speed row for a GPU provider, with parity of that provider's audio against the
    CPU reference: fp16 can pass on the CPU and fail where its kernels really are fp16."""
    threads = opts.threads if provider == "cpu" else 1
    provider_options: dict[str, Any] = {}
    if provider == "tensorrt":
        cache.mkdir(exist_ok=True)
        provider_options = {
            **trt_options,
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(cache),
        }
    try:
        sess = session(model, provider, threads, provider_options)
        render(sess, frontend, encoded[:1], repeats=1)  # warm up (and build engines)
        audios, wall, _ = render(sess, frontend, encoded, opts.repeats)
    except Exception as exc:  # onnxruntime's provider errors have no public type
        return {"provider": provider, "error": str(exc).splitlines()[0][:300]}
    row = Speed(provider, threads, _audio_seconds(audios, frontend.sample_rate), wall).as_dict()
    result = parity(refs, audios, frontend.sample_rate, opts.thresholds)
    return {**row, "parity_passed": result.passed, "snr_db_min": round(result.snr_db_min, 2)}


def optimize(
    model: Path, out: Path, config: Path | None = None, opts: Options | None = None
) -> dict[str, Any]:
    """Builds and measures the variants of `model` into the directory `out`; returns the
    manifest. Raises ExportError subclasses for models it cannot use."""
    opts = opts or Options()
    chosen: list[Recipe] = recipes(opts.variants)
    frontend = detect(model, config)
    providers = opts.providers or installed_providers()
    if "cpu" not in providers:
        providers = ["cpu", *providers]
    sentences = tqdm(opts.sentences, desc="encoding", disable=not opts.progress, leave=False)
    try:
        encoded = [frontend.encode(s) for s in sentences]
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CorruptModel(f"the text front end fails on this model's config: {exc!r}") from exc
    if not any(encoded):
        raise ParityFailure("the front end produced no input for any sentence")

    if out.resolve() in model.resolve().parents:
        raise ExportError(f"--out {out} contains the model {model}; choose another directory")
    with staged_dir(out, exported.MANIFEST) as stage:
        steps = _bar(2 + len(chosen) * (1 + len(providers)), "optimizing", opts.progress)
        # The reference: the source graph as given.
        reference = stage / f"{REFERENCE}.onnx"
        shutil.copyfile(model, reference)
        try:
            refs, ref_wall, ref_det = render(
                session(reference, "cpu", opts.threads), frontend, encoded, opts.repeats
            )
        except Exception as exc:  # onnxruntime's errors have no public type
            raise CorruptModel(f"{model} does not render: {exc}") from exc
        steps.update()

        # Simplification is kept only if the simplified graph renders what the source does.
        simplified = stage / SIMPLIFIED
        base = reference
        try:
            record = simplify(reference, simplified)
            if record.get("applied"):
                audios, _, _ = render(session(simplified), frontend, encoded)
                result = parity(refs, audios, frontend.sample_rate, opts.thresholds)
                record["parity"] = result.as_dict()
                if result.passed:
                    base = simplified
                else:
                    record["applied"] = False
                    record["reason"] = "parity failed after simplification"
        except Exception as exc:  # a simplifier bug must not cost the other variants
            simplified.unlink(missing_ok=True)
            record = {"applied": False, "reason": f"simplification failed: {exc!r}"[:300]}
        steps.update()
        trt = check(base, encoded, opts.max_tokens)
        trt.simplify = record

        entries: list[dict[str, Any]] = []
        for recipe in chosen:
            steps.set_postfix_str(recipe.name)
            path = stage / f"{recipe.name}.onnx"
            entry: dict[str, Any] = {"name": recipe.name, "summary": recipe.summary}
            try:
                if recipe.name == REFERENCE:
                    audios, wall, deterministic = refs, ref_wall, ref_det
                else:
                    recipe.build(base, path)
                    audios, wall, deterministic = render(
                        session(path, "cpu", opts.threads), frontend, encoded, opts.repeats
                    )
            except SkipVariant as exc:
                entries.append({**entry, "skipped": str(exc)})
                steps.update(1 + len(providers))
                continue
            except Exception as exc:  # converters and onnxruntime raise anything at all
                path.unlink(missing_ok=True)
                entries.append({**entry, "error": str(exc).splitlines()[0][:300]})
                steps.update(1 + len(providers))
                continue
            steps.update()
            result = parity(refs, audios, frontend.sample_rate, opts.thresholds)
            speed: dict[str, Any] = {
                "cpu": Speed(
                    "cpu", opts.threads, _audio_seconds(audios, frontend.sample_rate), wall
                ).as_dict()
            }
            steps.update()
            for provider in providers:
                if provider == "cpu":
                    continue
                if provider in recipe.providers:
                    speed[provider] = _time_on(
                        provider,
                        path,
                        frontend,
                        encoded,
                        refs,
                        opts,
                        trt.provider_options,
                        stage / "trt-cache",
                    )
                steps.update()
            variant_trt = check(path, encoded, opts.max_tokens)
            entries.append(
                {
                    **entry,
                    "file": path.name,
                    "bytes": path.stat().st_size,
                    "sha256": file_sha256(path),
                    "providers": list(recipe.providers),
                    "parity": result.as_dict(),
                    "deterministic": deterministic,
                    "speed": speed,
                    "nodes": variant_trt.nodes,
                    "quantized_nodes": variant_trt.quantized,
                    "tensorrt": {
                        "friendly": variant_trt.friendly,
                        "unsupported": variant_trt.unsupported,
                    },
                }
            )
        steps.close()
        simplified.unlink(missing_ok=True)
        shutil.rmtree(stage / "trt-cache", ignore_errors=True)
        for name, source in frontend.sidecars.items():
            shutil.copyfile(source, stage / name)

        manifest: dict[str, Any] = {
            "format": exported.MANIFEST_FORMAT,
            "name": opts.name or out.name,
            "family": frontend.family,
            "sample_rate": frontend.sample_rate,
            "source": {
                "path": str(model),
                "sha256": file_sha256(model),
                "bytes": model.stat().st_size,
            },
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "sentences": len(opts.sentences),
            "repeats": opts.repeats,
            "threads": opts.threads,
            "thresholds": {
                "max_mel_db": opts.thresholds.max_mel_db,
                "min_snr_db": opts.thresholds.min_snr_db,
            },
            "providers": providers,
            "tensorrt": trt.as_dict(),
            "variants": entries,
            "sidecars": sorted(frontend.sidecars),
        }
        # What engines will run, by the same function they use.
        written = stage / exported.MANIFEST
        write_manifest(written, manifest)
        loaded = exported.load(stage)
        manifest["selected"] = {p: exported.select(loaded, p).name for p in providers}
        write_manifest(written, manifest)
        (stage / "report.md").write_text(markdown(manifest), encoding="utf-8")
        chart(stage / "report.png", manifest)
    return manifest
