"""What the duration pass costs (docs/contracts.md#exact-length-from-the-first-byte):
`Engine.samples` runs before the first audio byte of every miss, so it is measured against
the render it precedes.

Per voice (`heart`, hibari; `joe`, piper) on one onnxruntime thread, as nodes run them,
and per text (a short one-sentence text; a long one, the first 16 of the fixed sentences
of export/sentences.py), the median over `--repeats` rounds of:

* `pass_ms`: `samples()` on a text this thread has not seen, front end included (G2P and
  ids of every piece, which the render that follows then reuses);
* `pass_model_ms`: `samples()` again on the same text: the graph part alone;
* `render_ms`: `stream()` of a text not seen before, consumed whole, without a pass (on
  the CPU that is, piece by piece, the pass's part of the graph and then the rest: the
  same nodes as the whole graph, run once);
* `first_chunk_ms`: that render's time to its first chunk of audio;
* `render_after_pass_ms`: `stream()` right after `samples()` of the same text;
* `pass_ratio` = pass_ms / render_ms, `pass_over_first_chunk` = pass_ms / first_chunk_ms
  (what the pass adds before the first byte, relative to what the first byte cost
  before), and `overhead` = (pass_ms + render_after_pass_ms) / render_ms - 1: what a miss
  pays in all for knowing its length. On the CPU neither engine runs the pass's part of
  the graph again after the pass (it runs the rest of the graph on what the pass handed
  off), so by design a miss pays no second pass, only a later first byte. Ratios are
  medians of each round's ratio; `pass_ratio_of_fastest` divides the fastest pass by the
  fastest render, the figure least moved by other work on the machine.

"Not seen" texts are the same text with i trailing spaces: the chunker strips them, so
the work is identical and only the front-end cache misses. Each round measures every
quantity once, interleaved, so load on a shared machine hits all of them alike; counts are
checked against the render's length every time.

    nearvoice bench duration-pass [--repeats 7]

Results: bench-results/duration_pass/.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from nearvoice.bench.common import write_results
from nearvoice.edge.synth.engine import Engine
from nearvoice.edge.synth.hibari_engine import HibariEngine
from nearvoice.edge.synth.piper_engine import PiperEngine
from nearvoice.export.sentences import SENTENCES

TEXTS = {
    "short": SENTENCES[1],
    "long": " ".join(SENTENCES[:16]),
}


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)


def _timed(call: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def _render(engine: Engine, text: str, voice: str) -> tuple[float, float, int]:
    """Seconds to the first chunk, seconds in all, samples."""
    start = time.perf_counter()
    first = 0.0
    samples = 0
    for audio in engine.stream(text, voice, 1.0, 0):
        if not first:
            first = time.perf_counter() - start
        samples += len(audio)
    return first, time.perf_counter() - start, samples


def measure(engine: Engine, voice: str, text: str, repeats: int, salt: int) -> dict[str, Any]:
    rows: dict[str, list[float]] = {
        k: [] for k in ("pass", "pass_model", "render", "first_chunk", "render_after_pass")
    }
    for i in range(repeats):
        fresh = text + " " * (salt + 2 * i)
        seconds, counted = _timed(lambda: engine.samples(fresh, voice, 1.0))  # noqa: B023
        rows["pass"].append(seconds)
        rows["pass_model"].append(_timed(lambda: engine.samples(fresh, voice, 1.0))[0])  # noqa: B023
        _, after, samples = _render(engine, fresh, voice)
        rows["render_after_pass"].append(after)
        first, whole, plain = _render(engine, fresh + " ", voice)
        rows["first_chunk"].append(first)
        rows["render"].append(whole)
        if not counted == samples == plain:
            raise AssertionError(f"{voice}: counted {counted}, rendered {samples} and {plain}")
    med = {k: statistics.median(v) for k, v in rows.items()}

    def ratio(top: Callable[[int], float], bottom: str) -> float:
        # per round, then the median: a round's figures are taken moments apart, so a
        # burst of load elsewhere on the machine moves both
        return round(statistics.median(top(i) / rows[bottom][i] for i in range(repeats)), 4)

    return {
        "samples": counted,
        "audio_s": round(counted / engine.sample_rate, 2),
        **{f"{k}_ms": _ms(v) for k, v in med.items()},
        "pass_ratio": ratio(lambda i: rows["pass"][i], "render"),
        "pass_model_ratio": ratio(lambda i: rows["pass_model"][i], "render"),
        "pass_over_first_chunk": ratio(lambda i: rows["pass"][i], "first_chunk"),
        "overhead": round(
            ratio(lambda i: rows["pass"][i] + rows["render_after_pass"][i], "render") - 1, 4
        ),
        "pass_ratio_of_fastest": round(min(rows["pass"]) / min(rows["render"]), 4),
        "pass_ms_each_round": [_ms(v) for v in rows["pass"]],
        "render_ms_each_round": [_ms(v) for v in rows["render"]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nearvoice bench duration-pass", description=__doc__)
    parser.add_argument("--repeats", type=int, default=7, help="rounds per voice and text")
    args = parser.parse_args(argv)
    engines: dict[str, Engine] = {"heart": HibariEngine(), "joe": PiperEngine()}
    report: dict[str, Any] = {"voices": {}}
    for voice, engine in engines.items():
        engine.warmup()
        report["voices"][voice] = {
            name: measure(engine, voice, text, args.repeats, salt)
            for salt, (name, text) in enumerate(TEXTS.items())
        }
    heads = ("audio s", "pass ms", "model ms", "render ms", "ratio", "fastest", "1st chunk ms")
    heads += ("pass/1st",)
    print(f"{'voice':6} {'text':6} " + " ".join(f"{h:>12}" for h in (*heads, "overhead")))
    for voice, by_text in report["voices"].items():
        for name, row in by_text.items():
            keys = ("audio_s", "pass_ms", "pass_model_ms", "render_ms", "pass_ratio")
            keys += ("pass_ratio_of_fastest",)
            keys += ("first_chunk_ms", "pass_over_first_chunk", "overhead")
            print(f"{voice:6} {name:6} " + " ".join(f"{row[k]:12.3f}" for k in keys))
    context = {"ort_threads": 1, "repeats": args.repeats, "texts": TEXTS}
    print(f"results: {write_results('duration_pass', report, context)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
