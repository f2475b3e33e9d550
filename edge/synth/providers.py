"""Choosing onnxruntime execution providers: the best one installed, from a preference list.

TensorRT needs an engine cache, or it rebuilds its engines (minutes) on every start; CUDA
and CPU need nothing. The choice is logged and exposed as `nearvoice_engine_provider`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("nearvoice.providers")

NAMES = {  # short name -> onnxruntime's provider name
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


def available() -> list[str]:
    import onnxruntime as ort

    names: list[str] = ort.get_available_providers()
    return names


def choose(preference: tuple[str, ...], cache_dir: Path | None = None) -> list[Any]:
    """The provider list to give an InferenceSession: every preferred provider that is
    installed, in order, always ending with CPU (onnxruntime falls back node by node)."""
    unknown = [p for p in preference if p not in NAMES]
    if unknown:
        raise ValueError(f"unknown execution provider(s) {unknown}; known: {sorted(NAMES)}")
    installed = set(available())
    chosen: list[Any] = []
    for name in preference:
        provider = NAMES[name]
        if provider not in installed or provider == NAMES["cpu"]:
            continue
        if name == "tensorrt":
            cache = cache_dir or Path(".nearvoice/trt-cache")
            cache.mkdir(parents=True, exist_ok=True)
            chosen.append(
                (
                    provider,
                    {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)},
                )
            )
        else:
            chosen.append(provider)
    chosen.append(NAMES["cpu"])
    return chosen


def primary(preference: tuple[str, ...]) -> str:
    """The short name of the provider sessions will run on: the first preferred one that
    is installed (no side effects, unlike `choose`)."""
    installed = set(available())
    for name in preference:
        if NAMES.get(name) in installed:
            return name
    return "cpu"


def with_profile(providers: list[Any], profile: dict[str, str]) -> list[Any]:
    """`providers` with an export's TensorRT optimisation profile (`trt_profile_min_shapes`
    and friends) merged into the TensorRT entry: one engine built for the whole range of
    text lengths instead of a rebuild for every new length. Others are left as they are."""
    if not profile:
        return providers
    merged: list[Any] = []
    for provider in providers:
        name = provider[0] if isinstance(provider, tuple) else provider
        if name == NAMES["tensorrt"]:
            options = dict(provider[1]) if isinstance(provider, tuple) else {}
            merged.append((name, {**options, **profile}))
        else:
            merged.append(provider)
    return merged


def session(
    model: Path | str | bytes, threads: int, providers: list[Any], spin: bool = True
) -> Any:
    """An onnxruntime session as every engine runs one, and as `nearvoice export` times
    one: `threads` intra- and inter-op threads, sequential execution (the owner sizes
    its pool so threads times workers fits the cores), errors-only logging. `model` is a
    file or a serialized model (the duration pass's part of a graph).

    A session of more than one thread has a pool of its own, whose threads take each
    operator's share of the work. With `spin` (the default) they spin between operators
    while a run lasts, and stop when it returns (`session.force_spinning_stop`), rather
    than spin on as onnxruntime's default has them: about 40 ms of a core after every
    run, while a render's next session (the pass, the rest, each window has its own)
    needs those cores. Measured on piper's `joe` with `ort_threads = 2`, one worker
    rendering whole texts: 15.2 times real time spinning on, 20.2 and 21.3 stopping;
    two workers: 13.3 to 13.7 against 16.3 to 16.9. `spin=False` has them sleep between
    operators too: for a session whose run shares the cores with other renders (edge.
    synth.windows's first window), where spinning would take a core from them (measured:
    46.6 ms to the first window sleeping, 68.6 spinning, beside a render)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if spin:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    else:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=providers)


def short_name(provider: Any) -> str:
    """ "cuda" for "CUDAExecutionProvider" (or a (name, options) pair)."""
    name = provider[0] if isinstance(provider, tuple) else str(provider)
    for short, full in NAMES.items():
        if full == name:
            return short
    return name
