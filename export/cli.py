"""`nearvoice export …`: the command line of the export step (docs/contracts.md#command-line)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nearvoice.export import deps
from nearvoice.export.errors import ExportError
from nearvoice.export.measure import Thresholds


def bundled(voice: str) -> tuple[Path, Path | None]:
    """The model (and piper config) of a voice installed with nearvoice."""
    if voice == "joe":
        from nearvoice.edge.synth.piper_engine import BUNDLED

        return BUNDLED[voice].model_path(), BUNDLED[voice].config_path()
    from nearvoice.edge.synth.hibari_engine import bundled_voices

    if voice in bundled_voices():
        from hibari.voices import voice_path

        return Path(voice_path(voice)), None
    raise ExportError(f"no installed voice {voice!r}; installed: heart, joe")


def cmd_optimize(args: argparse.Namespace) -> int:
    deps.require(deps.OPTIMIZE, "optimize")
    from nearvoice.export.optimize import Options, optimize

    if args.voice:
        model, config = bundled(args.voice)
    else:
        model, config = Path(args.model), None
    if args.config:
        config = Path(args.config)
    out = Path(args.out)
    manifest = optimize(
        model,
        out,
        config,
        Options(
            variants=args.variants.split(",") if args.variants else None,
            repeats=args.repeats,
            threads=args.threads,
            thresholds=Thresholds(max_mel_db=args.max_mel_db, min_snr_db=args.min_snr_db),
            max_tokens=args.max_tokens,
            providers=args.providers.split(",") if args.providers else None,
            name=args.name or args.voice or out.name,
            progress=not args.quiet,
        ),
    )
    print((out / "report.md").read_text(encoding="utf-8"))
    print(f"wrote {out}/manifest.json, report.md, report.png; engines run: {manifest['selected']}")
    return 0


def cmd_from_transformers(args: argparse.Namespace) -> int:
    deps.require(deps.FROM_TRANSFORMERS, "from-transformers")
    from nearvoice.export.from_transformers import export

    record = export(
        Path(args.checkpoint), Path(args.out), args.max_abs_diff, progress=not args.quiet
    )
    print(json.dumps(record, indent=2))
    print(f"wrote {args.out}/model.onnx; next: nearvoice export optimize {args.out}/model.onnx")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nearvoice export", description=__doc__)
    sub = p.add_subparsers(dest="step", required=True)

    opt = sub.add_parser("optimize", help="build and measure variants of an ONNX TTS model")
    source = opt.add_mutually_exclusive_group(required=True)
    source.add_argument("model", nargs="?", help="path of an ONNX TTS model")
    source.add_argument("--voice", help="an installed voice instead of a path: joe or heart")
    opt.add_argument("--out", required=True, help="export directory (replaced when complete)")
    opt.add_argument("--config", help="piper voice JSON or vits.json (default: beside the model)")
    opt.add_argument("--variants", help="comma-separated subset of fp32-opt,fp16,int8")
    opt.add_argument("--repeats", type=int, default=2, help="timed renders per chunk (best)")
    opt.add_argument("--threads", type=int, default=1, help="CPU threads when timing")
    defaults = Thresholds()
    opt.add_argument("--max-mel-db", type=float, default=defaults.max_mel_db)
    opt.add_argument("--min-snr-db", type=float, default=defaults.min_snr_db)
    opt.add_argument("--max-tokens", type=int, default=1024, help="TensorRT profile maximum")
    opt.add_argument("--providers", help="comma-separated: cpu,cuda,tensorrt (default: installed)")
    opt.add_argument("--name", help="name in the report")
    opt.add_argument("--quiet", action="store_true", help="no progress bars")
    opt.set_defaults(func=cmd_optimize)

    ft = sub.add_parser("from-transformers", help="export a local transformers VITS checkpoint")
    ft.add_argument("checkpoint", help="directory with config.json and model weights")
    ft.add_argument("--out", required=True, help="output directory (replaced when complete)")
    ft.add_argument(
        "--max-abs-diff", type=float, default=1e-3, help="parity bound vs torch (samples)"
    )
    ft.add_argument("--quiet", action="store_true", help="no progress bars")
    ft.set_defaults(func=cmd_from_transformers)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ExportError as exc:
        print(f"nearvoice export: error: {exc} [{exc.code}]", file=sys.stderr)
        return exc.exit_status
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
