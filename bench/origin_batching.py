"""Dynamic batching at the origin (edge.synth.batching, edge.synth.torch_engine).

A random-weight transformers `VitsModel` of MMS-TTS size (VitsConfig's defaults, about
36 M parameters; `--quick`: a small one) is saved with its tokenizer files, and a real
`nearvoice origin` process serves it as a `[[torch]]` voice, once with batching off
(max batch 1) and once with it on, in the same run and on the same device. At each
concurrency (1, 8, 32, 128 distinct misses in flight at once, each a ~160-token
utterance; at least 8 misses per level) it reports:

* audio seconds rendered per wall second, and its ratio on/off;
* first-byte time p50 and p99;
* mean batch size (`nearvoice_batch_size`, duration passes included).

In this process it also times, rounds interleaved, transformers' own `VitsModel.forward`
against the torch engine with the device's default settings, one line after another: what
the engine costs over the bare model (on the CPU, where batching is off by default, the
target is within 5 %).
The device is reported (torch.cuda.get_device_name on a GPU).

    python -m nearvoice.bench.origin_batching [--quick] [--levels 1,8,32,128]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from nearvoice.bench.common import child_env, free_port, wait_http, write_results
from nearvoice.edge.config import Role, load
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.keyring import Keyring, generate_pair
from nearvoice.edge.policy import Policy
from nearvoice.edge.spec import Spec
from nearvoice.edge.stack import stop_processes
from nearvoice.edge.token import sign_url
from nearvoice.edge.voices import for_config

VOICE = "mms"
LEVELS = (1, 8, 32, 128)
MIN_REQUESTS = 8
"""Misses per level at least: concurrency 1 is eight renders one after another."""
VOCAB = {c: i for i, c in enumerate("_ abcdefghijklmnopqrstuvwxyz.,!?'-")}
SMALL = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "ffn_dim": 256,
    "flow_size": 64,
    "upsample_initial_channel": 64,
    "prior_encoder_num_flows": 2,
    "duration_predictor_filter_channels": 64,
}
"""`--quick`: about a million parameters, so two CPU cores finish in minutes."""
WORDS = [
    "the",
    "a",
    "voice",
    "line",
    "plays",
    "near",
    "every",
    "listener",
    "while",
    "the",
    "origin",
    "renders",
    "heavy",
    "models",
    "quickly",
    "and",
    "each",
    "edge",
    "keeps",
    "what",
    "it",
    "delivered",
    "so",
    "one",
    "render",
    "serves",
    "thousands",
]


def save_checkpoint(path: Path, quick: bool) -> int:
    """A random VitsModel and its VitsTokenizer files; returns its parameter count."""
    import torch
    from transformers import VitsConfig, VitsModel

    torch.manual_seed(0)
    config = VitsConfig(**(SMALL if quick else {}), vocab_size=len(VOCAB))
    model = VitsModel(config).eval()
    model.save_pretrained(str(path))
    (path / "vocab.json").write_text(json.dumps(VOCAB), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(
        json.dumps({"add_blank": True, "normalize": True, "phonemize": False}), encoding="utf-8"
    )
    return int(sum(p.numel() for p in model.parameters()))


def texts(count: int, seed: int) -> list[str]:
    """Distinct lines of about 80 characters: about 160 tokens with blanks."""
    rng = random.Random(seed)
    out = []
    for n in range(count):
        words = [f"line {seed} {n}"]
        while sum(len(w) + 1 for w in words) < 80:
            words.append(rng.choice(WORDS))
        out.append(" ".join(words)[:80])
    return out


def write_config(path: Path, checkpoint: Path, batching: bool, window_ms: float) -> Path:
    batch = 32 if batching else 1
    cpu_batch = 8 if batching else 1
    path.write_text(
        f"""role = "origin"
[synth]
voices = []
max_queue = 512
[[torch]]
voice = "{VOICE}"
checkpoint = "{checkpoint}"
cuda_max_batch = {batch}
cuda_window_ms = {window_ms}
cpu_max_batch = {cpu_batch}
cpu_window_ms = {window_ms if batching else 0.0}
""",
        encoding="utf-8",
    )
    return path


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()}"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def batch_totals(text: str) -> tuple[float, float]:
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "nearvoice_batch_size":
            for sample in family.samples:
                if sample.name.endswith("_sum"):
                    total += sample.value
                elif sample.name.endswith("_count"):
                    count += sample.value
    return total, count


async def one(session: aiohttp.ClientSession, url: str) -> tuple[float, float, int]:
    """(first byte seconds, total seconds, body bytes) of one GET."""
    started = time.perf_counter()
    async with session.get(url) as resp:
        resp.raise_for_status()
        first = None
        size = 0
        async for chunk in resp.content.iter_any():
            if first is None:
                first = time.perf_counter() - started
            size += len(chunk)
    return first or 0.0, time.perf_counter() - started, size


async def level(
    session: aiohttp.ClientSession,
    base: str,
    keyring: Keyring,
    model: str,
    rate: int,
    lines: list[str],
    concurrency: int,
) -> dict[str, float]:
    """`lines` as distinct misses, `concurrency` of them in flight at once."""
    urls = [
        sign_url(
            keyring,
            base,
            Spec.create(text=t, voice=VOICE, format=AudioFormat.WAV, model=model),
            policy=Policy.HOT,
            ttl=3600,
        )
        for t in lines
    ]
    async with session.get(f"{base}/metrics") as resp:
        before = batch_totals(await resp.text())
    gate = asyncio.Semaphore(concurrency)

    async def limited(url: str) -> tuple[float, float, int]:
        async with gate:
            return await one(session, url)

    started = time.perf_counter()
    answers = await asyncio.gather(*(limited(u) for u in urls))
    wall = time.perf_counter() - started
    async with session.get(f"{base}/metrics") as resp:
        after = batch_totals(await resp.text())
    audio = sum((size - 44) / 2 / rate for _, _, size in answers)
    firsts = sorted(first for first, _, _ in answers)
    batches = after[1] - before[1]
    return {
        "audio_seconds_per_second": round(audio / wall, 2),
        "first_byte_p50_ms": round(1000 * statistics.median(firsts), 1),
        "first_byte_p99_ms": round(1000 * firsts[min(len(firsts) - 1, int(0.99 * len(firsts)))], 1),
        "mean_batch_size": round((after[0] - before[0]) / batches, 2) if batches else 0.0,
        "wall_seconds": round(wall, 2),
    }


async def measure(
    config: Path, work: Path, keyring: Keyring, pair: str, levels: list[int], seed: int
) -> dict[str, Any]:
    voice = for_config(load(config, Role.ORIGIN))[VOICE]
    port = free_port()
    log = (work / f"{config.stem}.log").open("wb")
    cmd = [
        sys.executable, "-m", "nearvoice.edge.cli", "origin", "--config", str(config),
        "--port", str(port), "--data-dir", str(work / config.stem),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=child_env({"NEARVOICE_KEYS": pair}), stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        await asyncio.to_thread(wait_http, f"{base}/readyz", 600.0)
        timeout = aiohttp.ClientTimeout(total=1800)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            rows = {}
            for n, count in enumerate(levels):
                lines = texts(max(count, MIN_REQUESTS), seed * 100 + n)
                rows[str(count)] = await level(
                    session, base, keyring, voice.model_id, voice.sample_rate, lines, count
                )
                print(config.stem, count, rows[str(count)], file=sys.stderr)
        return {"model_id": voice.model_id, "levels": rows}
    finally:
        stop_processes([proc])
        log.close()


def in_process(checkpoint: Path, lines: list[str], rounds: int) -> dict[str, float]:
    """Audio seconds per second, in this process, one line after another: transformers'
    own `VitsModel.forward` (what rendering costs without the engine) against the torch
    engine with this device's default settings (on the CPU: no batching, one torch
    thread, as each render thread of an origin runs), rounds interleaved; medians."""
    import torch
    from transformers import VitsModel, VitsTokenizer

    from nearvoice.edge.synth.torch_engine import TorchEngine
    from nearvoice.edge.synth.torch_layout import TorchSettings

    engine = TorchEngine(TorchSettings(voice=VOICE, checkpoint=str(checkpoint)))
    device = engine.device
    model: Any = VitsModel.from_pretrained(str(checkpoint)).to(device)
    model.eval()
    model.noise_scale = model.noise_scale_duration = 0.0
    tokenizer = VitsTokenizer.from_pretrained(str(checkpoint))
    rate = model.config.sampling_rate

    def forward() -> float:
        audio = 0
        with torch.inference_mode():
            for line in lines:
                audio += model(**tokenizer(line, return_tensors="pt").to(device)).waveform.shape[-1]
        if device == "cuda":
            torch.cuda.synchronize()
        return audio / rate

    def engine_default() -> float:
        return sum(len(a) for line in lines for a in engine.stream(line, VOICE, 1.0, 0)) / rate

    timings: dict[str, list[float]] = {"forward": [], "engine": []}
    for _ in range(rounds + 1):  # the first round warms up
        for name, run in (("forward", forward), ("engine", engine_default)):
            started = time.perf_counter()
            audio = run()
            timings[name].append(audio / (time.perf_counter() - started))
    engine.close()
    forward_speed = statistics.median(timings["forward"][1:])
    engine_speed = statistics.median(timings["engine"][1:])
    return {
        "forward_audio_seconds_per_second": round(forward_speed, 2),
        "engine_default_audio_seconds_per_second": round(engine_speed, 2),
        "engine_default_over_forward": round(engine_speed / forward_speed, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.origin_batching", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a small model (CPU: minutes)")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)), help="concurrencies")
    parser.add_argument("--window-ms", type=float, default=5.0, help="batching window")
    args = parser.parse_args(argv)
    levels = [int(v) for v in args.levels.split(",")]
    work = Path(tempfile.mkdtemp(prefix="nv-batching-"))
    checkpoint = work / "checkpoint"
    params = save_checkpoint(checkpoint, args.quick)
    pair = generate_pair()
    keyring = Keyring.parse(pair)
    context: dict[str, Any] = {
        "torch_device": device_name(),
        "parameters": params,
        "quick": args.quick,
        "window_ms": args.window_ms,
        "levels": levels,
    }
    report: dict[str, Any] = {"in_process": in_process(checkpoint, texts(4, 1), rounds=15)}
    for name, batching in (("off", False), ("on", True)):
        config = write_config(work / f"batching-{name}.toml", checkpoint, batching, args.window_ms)
        report[f"batching_{name}"] = asyncio.run(
            measure(config, work, keyring, pair, levels, seed=1 if batching else 2)
        )
    report["throughput_on_over_off"] = {
        str(n): round(
            report["batching_on"]["levels"][str(n)]["audio_seconds_per_second"]
            / report["batching_off"]["levels"][str(n)]["audio_seconds_per_second"],
            2,
        )
        for n in levels
    }
    print(json.dumps({"context": context, "figures": report}, indent=2))
    print(f"results: {write_results('origin_batching', report, context)}")
    return 0  # a report, not a test (docs/benchmarks.md)


if __name__ == "__main__":
    raise SystemExit(main())
