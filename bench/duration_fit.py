"""What fitting a line to a target length costs, and how close it lands
(docs/contracts.md#spec-and-key, `duration`; edge.synth.fit).

For `heart` (hibari) and `joe` (piper), on one onnxruntime thread as nodes run them, each
of `--sentences` fixed sentences (export/sentences.py, cycled) gets a target between 0.6x and 1.6x
of its natural length (spread evenly over the sentences, rounded to 2 decimals as a spec
rounds it). Per fit it records:

* the absolute error of the fitted length against the target, in ms and in %, and whether
  it is within the contract's tolerance (2 % or one frame, whichever is larger);
* duration passes per fit (the natural length's included): the renders never repeat;
* fits refused because no speed lands within the tolerance (the render would fail rather
  than miss the length);
* the time of the whole fitted miss (fit + render at the chosen speed) against a plain
  miss of the same sentence and the same length (duration pass + render at that speed):
  `overhead` = fitted / plain, what fitting costs (target at most 1.3); and against a
  plain miss at the natural length, `vs_natural` (a longer object takes longer to render
  whatever fits it). Measured interleaved, so load on a shared machine hits all alike.

    nearvoice bench duration-fit [--sentences 50]

Results: bench-results/duration_fit/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from nearvoice.bench.common import write_results
from nearvoice.edge.synth import fit
from nearvoice.edge.synth.engine import Engine
from nearvoice.edge.synth.hibari_engine import HibariEngine
from nearvoice.edge.synth.piper_engine import PiperEngine
from nearvoice.export.sentences import SENTENCES

LOW, HIGH = 0.6, 1.6
"""Targets span these multiples of the natural length."""


def _render(engine: Engine, text: str, voice: str, speed: float) -> int:
    return sum(len(audio) for audio in engine.stream(text, voice, speed, 0))


def _one(engine: Engine, voice: str, text: str, ratio: float, variant: int) -> dict[str, Any]:
    # Trailing spaces: the same work, but no front-end cache from another measurement.
    fit_text, same_text, natural_text = (text + " " * (3 * variant + k) for k in (1, 2, 3))
    natural = engine.samples(text, voice, 1.0)
    assert natural is not None
    duration = round(natural / engine.sample_rate * ratio, 2)
    start = time.perf_counter()
    try:
        fitted = fit.fit(engine, fit_text, voice, duration)
    except fit.CannotFit:  # refused rather than rendered at a wrong length: counted
        return {"ratio": round(ratio, 3), "target_s": duration, "refused": True}
    rendered = _render(engine, fit_text, voice, fitted.speed)
    fitted_seconds = time.perf_counter() - start
    assert rendered == fitted.samples, "the fitted length is the rendered length"
    # A plain miss of the same length (the duration pass at that speed, then the render)
    # and one at the natural length.
    start = time.perf_counter()
    engine.samples(same_text, voice, fitted.speed)
    _render(engine, same_text, voice, fitted.speed)
    same = time.perf_counter() - start
    start = time.perf_counter()
    engine.samples(natural_text, voice, 1.0)
    _render(engine, natural_text, voice, 1.0)
    plain = time.perf_counter() - start
    target = fit.target_samples(duration, engine.sample_rate)
    error = abs(rendered - target)
    return {
        "ratio": round(ratio, 3),
        "target_s": duration,
        "error_ms": error / engine.sample_rate * 1e3,
        "error_pct": error / target * 100,
        "within": error <= fit.tolerance(target, fit.frame_samples(engine)),
        "passes": fitted.passes,
        "overhead": fitted_seconds / same,
        "vs_natural": fitted_seconds / plain,
    }


def run(sentences: int) -> dict[str, Any]:
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(sentences)]
    report: dict[str, Any] = {}
    for voice, engine in (("heart", HibariEngine()), ("joe", PiperEngine())):
        engine.warmup()
        rows, refused = [], 0
        for i, text in enumerate(texts):
            ratio = LOW + (HIGH - LOW) * i / max(1, len(texts) - 1)
            row = _one(engine, voice, text, ratio, i)
            refused += bool(row.get("refused"))
            if not row.get("refused"):
                rows.append(row)
        errors_ms = [r["error_ms"] for r in rows]
        errors_pct = [r["error_pct"] for r in rows]
        report[voice] = {
            "fits": len(rows),
            "refused": refused,
            "mean_error_ms": round(statistics.fmean(errors_ms), 1),
            "max_error_ms": round(max(errors_ms), 1),
            "mean_error_pct": round(statistics.fmean(errors_pct), 2),
            "max_error_pct": round(max(errors_pct), 2),
            "within_tolerance": sum(r["within"] for r in rows),
            "mean_passes": round(statistics.fmean(r["passes"] for r in rows), 2),
            "max_passes": max(r["passes"] for r in rows),
            "median_overhead": round(statistics.median(r["overhead"] for r in rows), 3),
            "median_vs_natural": round(statistics.median(r["vs_natural"] for r in rows), 3),
            "rows": rows,
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nearvoice bench duration-fit")
    parser.add_argument("--sentences", type=int, default=50)
    args = parser.parse_args(argv)
    report = run(args.sentences)
    for voice, summary in report.items():
        print(voice, json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    context = {
        "sentences": args.sentences,
        "target_ratio_span": [LOW, HIGH],
        "ort_threads": 1,
        "target_median_overhead": 1.3,
    }
    print(f"results: {write_results('duration_fit', report, context)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
