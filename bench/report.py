"""`nearvoice bench report`: the latest results of every benchmark, in one place.

Each benchmark writes its runs to `bench-results/<bench>/<UTC>.json` (bench/common.py,
`write_results`). This reads the newest file of each, and writes

* `bench-results/report.md`: one Markdown table of every measured figure (bench, figure,
  value, device, when). Only `figures` are listed, never a run's `context` (its
  parameters, targets and references), so nothing in the table is an echoed input;
* `bench-results/report/<bench>.png`: per benchmark, one bar chart per kind of figure
  (the last part of its name: `rps`, `p50_ms`, ...), if matplotlib is installed (the
  export extra has it); without it the Markdown is written and the charts are skipped.

Runs from different machines can sit side by side; the device column says which is which.

    nearvoice bench report [--dir bench-results]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nearvoice.bench.common import RESULTS_DIR

REPORT = "report"
"""The report's file stem and chart directory under the results directory."""
RUN_FILE = re.compile(r"^\d{8}T\d{6}Z\.json$")
MAX_CHARTS = 16
"""Bar charts per benchmark at most (the figures' kinds, in the order they first appear)."""


@dataclass(frozen=True)
class Run:
    bench: str
    path: Path
    utc: str
    figures: dict[str, Any]
    device: dict[str, Any]


def latest_runs(root: Path) -> list[Run]:
    """The newest well-formed run of each benchmark under `root`, by benchmark name. A
    file that is not JSON or lacks `figures` is reported on stderr and skipped."""
    runs: list[Run] = []
    if not root.is_dir():
        return runs
    for bench_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name != REPORT):
        for path in sorted(
            (p for p in bench_dir.iterdir() if RUN_FILE.match(p.name)), reverse=True
        ):
            try:
                record = json.loads(path.read_text())
                figures, device = record["figures"], record.get("device") or {}
                if not isinstance(figures, dict) or not isinstance(device, dict):
                    raise TypeError("figures and device must be objects")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                print(f"skipping {path}: {exc}", file=sys.stderr)
                continue
            runs.append(Run(bench_dir.name, path, path.stem, figures, device))
            break
    return runs


def flatten(figures: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float | bool]]:
    """Every number and flag under `figures`, by dotted name. Lists (per-round samples,
    per-fit rows) and text are the JSON's to keep, not the table's."""
    for key, value in figures.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flatten(value, f"{name}.")
        elif isinstance(value, int | float) and math.isfinite(value):  # bool is an int too
            yield name, value


def describe(device: dict[str, Any]) -> str:
    """One short line: host, CPU model and count, GPU."""
    cpu = device.get("cpu_model") or "unknown CPU"
    count = device.get("cpus_usable") or device.get("cpu_count")
    parts = [f"{cpu} x{count}" if count else str(cpu)]
    if device.get("gpu"):
        parts.append(str(device["gpu"]))
    host = device.get("hostname") or "?"
    return f"{host}: {', '.join(parts)}"


def when(utc: str) -> str:
    """20261128T071500Z as 2026-11-28 07:15:00Z."""
    return f"{utc[0:4]}-{utc[4:6]}-{utc[6:8]} {utc[9:11]}:{utc[11:13]}:{utc[13:15]}Z"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _value(value: float | bool) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:g}" if isinstance(value, float) else str(value)


def markdown(runs: list[Run], root: Path, charts: dict[str, Path] | None) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"The latest run of each benchmark in `{root}`; every value was measured by that run.",
        "",
        "| bench | figure | value | device | when |",
        "|---|---|---:|---|---|",
    ]
    for run in runs:
        device, at = _cell(describe(run.device)), when(run.utc)
        for name, value in flatten(run.figures):
            lines.append(f"| {run.bench} | {_cell(name)} | {_value(value)} | {device} | {at} |")
    lines += ["", "Sources:", ""]
    lines += [f"- {run.bench}: `{run.path}`" for run in runs]
    lines.append("")
    if charts is None:
        lines.append(
            "Charts skipped: matplotlib is not installed (`pip install nearvoice[export]`)."
        )
    else:
        lines += ["## Charts", ""]
        lines += [f"![{bench}]({path.relative_to(root)})" for bench, path in charts.items()]
    return "\n".join(lines) + "\n"


def groups(figures: dict[str, Any]) -> dict[str, list[tuple[str, float]]]:
    """Numeric figures, one chart each group, as (bar label, value): a kind of figure found
    under several names (`edge.rps`, `nginx.rps`) is one group, its bars the names; any
    other figure goes with the rest of the table it sits in (`limiter_us_per_hit.*`)."""
    numbers = [
        (name.rpartition(".")[0], name.rpartition(".")[2], float(value))
        for name, value in flatten(figures)
        if not isinstance(value, bool)
    ]
    heads: dict[str, set[str]] = {}
    for head, kind, _ in numbers:
        heads.setdefault(kind, set()).add(head)
    out: dict[str, list[tuple[str, float]]] = {}
    for head, kind, value in numbers:
        if len(heads[kind]) > 1:
            out.setdefault(kind, []).append((head or "(all)", value))
        else:
            out.setdefault(head or "figures", []).append((kind, value))
    return out


def draw(runs: list[Run], directory: Path) -> dict[str, Path] | None:
    """One PNG per benchmark; None if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.png"):
        old.unlink()  # a benchmark whose results are gone keeps no chart
    charts: dict[str, Path] = {}
    for run in runs:
        kinds = list(groups(run.figures).items())[:MAX_CHARTS]
        if not kinds:
            continue
        columns = min(3, len(kinds))
        rows = math.ceil(len(kinds) / columns)
        heights = [max(1, len(bars)) for _, bars in kinds]
        fig, axes = plt.subplots(
            rows,
            columns,
            figsize=(5 * columns, sum(0.3 * h + 1 for h in heights[::columns]) + 0.8),
            squeeze=False,
        )
        for ax, (kind, bars) in zip(axes.flat, kinds, strict=False):
            labels = [label for label, _ in bars]
            ax.barh(range(len(bars)), [v for _, v in bars])
            ax.set_yticks(range(len(bars)), labels, fontsize=7)
            ax.invert_yaxis()
            ax.set_title(kind, fontsize=9)
            ax.tick_params(axis="x", labelsize=7)
        for ax in list(axes.flat)[len(kinds) :]:
            ax.axis("off")
        fig.suptitle(f"{run.bench}: {when(run.utc)}, {describe(run.device)}", fontsize=9)
        fig.tight_layout()
        path = directory / f"{run.bench}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        charts[run.bench] = path
    return charts


def write_report(root: Path) -> tuple[Path, dict[str, Path] | None]:
    """Writes `<root>/report.md` and the charts; returns the Markdown's path and the
    charts by benchmark (None when they were skipped). Raises FileNotFoundError if `root`
    holds no results."""
    runs = latest_runs(root)
    if not runs:
        raise FileNotFoundError(f"no benchmark results under {root}")
    charts = draw(runs, root / REPORT)
    path = root / f"{REPORT}.md"
    path.write_text(markdown(runs, root, charts))
    return path, charts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nearvoice bench report", description=__doc__)
    parser.add_argument(
        "--dir", type=Path, default=RESULTS_DIR, help="results directory (default %(default)s)"
    )
    args = parser.parse_args(argv)
    try:
        path, charts = write_report(args.dir)
    except FileNotFoundError as exc:
        print(f"nearvoice: {exc}; run a benchmark first (nearvoice bench NAME)", file=sys.stderr)
        return 1
    print(f"report: {path}")
    if charts is None:
        print("charts skipped: matplotlib is not installed")
    else:
        for chart in charts.values():
            print(f"chart: {chart}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
