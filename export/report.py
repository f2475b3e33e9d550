"""The report of an export: `manifest.json` for machines, `report.md` for people and
`report.png` for people who would rather look."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _speed(variant: dict[str, Any], provider: str) -> str:
    row = variant.get("speed", {}).get(provider)
    if not row:
        return "—"
    if row.get("error"):
        return "error"
    return f"{row['x_realtime']:.1f}x"


def markdown(manifest: dict[str, Any]) -> str:
    providers = manifest["providers"]
    thresholds = manifest["thresholds"]
    lines = [
        f"# Export report: {manifest['name']} ({manifest['family']}, {manifest['sample_rate']} Hz)",
        "",
        f"Source `{manifest['source']['path']}` (sha256 `{manifest['source']['sha256'][:12]}…`). "
        f"Parity against fp32 on {manifest['sentences']} fixed sentences; passes at log-mel "
        f"distance ≤ {thresholds['max_mel_db']} dB and SNR ≥ {thresholds['min_snr_db']} dB on "
        f"every sentence. Speed is seconds of audio per second, "
        f"{manifest['threads']} thread, best of {manifest['repeats']}.",
        "",
        "| variant | size | sha256 | mel dB mean / max | SNR dB mean / min | length diffs "
        "| deterministic | parity | " + " | ".join(f"{p} xRT" for p in providers) + " | TensorRT |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(providers) + "---|",
    ]
    for v in manifest["variants"]:
        if v.get("error") or v.get("skipped"):
            why = f"skipped: {v['skipped']}" if v.get("skipped") else f"build failed: {v['error']}"
            lines.append(
                f"| {v['name']} | — | — | — | — | — | — | {_cell(why)} | "
                + " | ".join("—" for _ in providers)
                + " | — |"
            )
            continue
        p = v["parity"]
        trt = v["tensorrt"]
        trt_text = "yes" if trt["friendly"] else f"no: {', '.join(trt['unsupported']) or 'opset'}"
        lines.append(
            f"| {v['name']} | {_mib(v['bytes'])} | `{v['sha256'][:12]}` | "
            f"{p['mel_db_mean']:.2f} / {p['mel_db_max']:.2f} | "
            f"{p['snr_db_mean']:.1f} / {p['snr_db_min']:.1f} | {p['length_mismatches']} | "
            f"{'yes' if v['deterministic'] else 'NO'} | {'pass' if p['passed'] else 'FAIL'} | "
            + " | ".join(_speed(v, pr) for pr in providers)
            + f" | {trt_text} |"
        )
    lines += ["", "Selected (what engines run):", ""]
    for provider, name in manifest["selected"].items():
        lines.append(f"- {provider}: **{name}**")
    trt = manifest["tensorrt"]
    lines += [
        "",
        "TensorRT:",
        "",
        f"- opset {trt['opset']} ({'within' if trt['opset_ok'] else 'outside'} TensorRT's 9-20)",
        f"- ops TensorRT cannot run (fp32): {trt['unsupported'] or 'none'}",
        f"- data-dependent ops: {trt['data_dependent'] or 'none'}",
        f"- simplification: {_simplify_text(trt['simplify'])}",
        f"- profile: min `{trt['provider_options'].get('trt_profile_min_shapes', '')}`, "
        f"opt `{trt['provider_options'].get('trt_profile_opt_shapes', '')}`, "
        f"max `{trt['provider_options'].get('trt_profile_max_shapes', '')}`",
        "",
    ]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _simplify_text(record: dict[str, Any]) -> str:
    if "nodes_before" not in record:
        return str(record.get("reason", "not run"))
    text = f"{record['nodes_before']} → {record['nodes_after']} nodes"
    if record.get("applied"):
        return text + ", used as the base of the other variants"
    return f"{text}, not used: {record.get('reason', '')}"


def chart(path: Path, manifest: dict[str, Any]) -> None:
    """Speed per variant and provider beside parity (SNR), one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    built = [v for v in manifest["variants"] if v.get("file")]
    names = [v["name"] for v in built]
    providers = manifest["providers"]
    fig, (speed_ax, snr_ax) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    width = 0.8 / max(1, len(providers))
    for i, provider in enumerate(providers):
        values = [(v.get("speed", {}).get(provider) or {}).get("x_realtime") or 0.0 for v in built]
        xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(built))]
        bars = speed_ax.bar(xs, values, width, label=provider)
        speed_ax.bar_label(bars, fmt="%.1f", fontsize=8)
    speed_ax.set_xticks(range(len(built)), names)
    speed_ax.set_ylabel("x realtime (1 thread)")
    speed_ax.set_title("Speed")
    speed_ax.legend()
    snrs = [v["parity"]["snr_db_min"] for v in built]
    colours = ["tab:green" if v["parity"]["passed"] else "tab:red" for v in built]
    snr_ax.bar(names, snrs, color=colours)
    snr_ax.axhline(manifest["thresholds"]["min_snr_db"], color="black", linestyle="--")
    snr_ax.set_ylabel("worst-sentence SNR vs fp32 (dB)")
    snr_ax.set_title("Parity (green: pass)")
    fig.suptitle(f"{manifest['name']}: variants")
    fig.savefig(path, dpi=100)
    plt.close(fig)
