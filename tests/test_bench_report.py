"""Benchmark results and `nearvoice bench report`: runs are written by the benchmarks' own
helper under the working directory, with the device; the report takes the newest run of
each benchmark, lists only measured figures, and draws charts when matplotlib is there."""

from __future__ import annotations

import datetime
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from nearvoice.bench import report
from nearvoice.bench.common import write_results
from nearvoice.edge import cli

PNG = b"\x89PNG\r\n\x1a\n"


def _at(hour: int) -> datetime.datetime:
    return datetime.datetime(2026, 11, 28, hour, 15, 0, tzinfo=datetime.UTC)


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Three runs of two benchmarks, written by write_results into ./bench-results of a
    scratch working directory."""
    monkeypatch.chdir(tmp_path)
    write_results(
        "hit_path",
        {"edge": {"rps": 1000.0, "p50_ms": 1.5}, "ratio edge / nginx": 0.41},
        {"rounds": 5, "target_edge_over_nginx": 0.5},
        when=_at(6),
    )
    write_results(
        "hit_path",
        {
            "nginx": {"rps": 2000.0, "p50_ms": 0.8, "rps_each_round": [1990, 2010]},
            "edge": {"rps": 1500.0, "p50_ms": 1.1},
            "ratio edge / nginx": 0.75,
            "load_sweep": {"edge": {"plateau": True}},
        },
        {"rounds": 5, "target_edge_over_nginx": 0.5},
        when=_at(7),
    )
    write_results("workers", {"renders_per_key": 1, "other_over_owning_p50": 1.3}, when=_at(5))
    return tmp_path / "bench-results"


def test_results_go_under_the_working_directory_with_the_device(results: Path) -> None:
    path = results / "hit_path" / "20261128T071500Z.json"
    record = json.loads(path.read_text())
    assert record["bench"] == "hit_path" and record["utc"] == "20261128T071500Z"
    assert record["figures"]["edge"]["rps"] == 1500.0
    assert record["context"] == {"rounds": 5, "target_edge_over_nginx": 0.5}
    device = record["device"]
    assert device["cpu_count"] >= 1 and device["memory_bytes"] > 0
    assert device["python"] == ".".join(map(str, sys.version_info[:3]))
    for key in ("hostname", "cpu_model", "platform", "gpu", "git_commit"):
        assert key in device
    assert sorted(p.name for p in (results / "hit_path").iterdir()) == [
        "20261128T061500Z.json",
        "20261128T071500Z.json",
    ]


def test_the_report_lists_the_latest_figures_of_every_bench(results: Path) -> None:
    assert cli.main(["bench", "report"]) == 0
    text = (results / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    cells = [[c.strip() for c in row.strip("|").split(" | ")] for row in rows[1:]]
    figures = {(c[0], c[1]): c[2] for c in cells}
    assert figures == {
        ("hit_path", "nginx.rps"): "2000",
        ("hit_path", "nginx.p50_ms"): "0.8",
        ("hit_path", "edge.rps"): "1500",
        ("hit_path", "edge.p50_ms"): "1.1",
        ("hit_path", "ratio edge / nginx"): "0.75",
        ("hit_path", "load_sweep.edge.plateau"): "yes",
        ("workers", "renders_per_key"): "1",
        ("workers", "other_over_owning_p50"): "1.3",
    }  # the newer hit_path run only; no context (rounds, targets) and no lists
    assert {c[4] for c in cells if c[0] == "hit_path"} == {"2026-11-28 07:15:00Z"}
    assert {c[4] for c in cells if c[0] == "workers"} == {"2026-11-28 05:15:00Z"}
    device = json.loads((results / "workers" / "20261128T051500Z.json").read_text())["device"]
    assert all(c[3].startswith(f"{device['hostname']}: ") for c in cells)
    for bench in ("hit_path", "workers"):
        chart = results / "report" / f"{bench}.png"
        assert chart.read_bytes().startswith(PNG)
        assert f"report/{bench}.png" in text


def test_without_matplotlib_the_markdown_is_written_and_charts_skipped(
    results: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    assert report.main([]) == 0
    assert "charts skipped" in capsys.readouterr().out
    text = (results / "report.md").read_text()
    assert "| workers | renders_per_key | 1 |" in text
    assert "Charts skipped" in text
    assert not (results / "report").exists()


def test_a_broken_file_is_skipped_for_the_previous_run(
    results: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (results / "hit_path" / "20261128T081500Z.json").write_text("{not json")
    runs = {run.bench: run for run in report.latest_runs(results)}
    assert runs["hit_path"].utc == "20261128T071500Z"
    assert "skipping" in capsys.readouterr().err


def test_no_results_is_an_error_not_an_empty_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "report"]) == 1
    assert "no benchmark results" in capsys.readouterr().err
    assert not (tmp_path / "bench-results" / "report.md").exists()


def test_report_is_not_a_benchmark_name() -> None:
    assert "report" not in cli.BENCHMARKS
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["bench", "no-such-bench"])


@pytest.mark.parametrize("name", sorted(cli.BENCHMARKS))
def test_every_benchmark_writes_through_the_helper(name: str) -> None:
    # Read, not imported: a benchmark's own dependencies may be heavy.
    spec = importlib.util.find_spec(cli.BENCHMARKS[name])
    assert spec is not None and spec.origin is not None
    source = Path(spec.origin).read_text()
    assert "write_results(" in source, f"{name} does not write through bench.common"
    assert "Path(__file__)" not in source, f"{name} writes beside its own file"
