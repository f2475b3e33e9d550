"""`nearvoice` command line (DESIGN.md section 4, a contract)."""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import signal
import ssl
import sys
from pathlib import Path

from edge.config import NodeConfig, Role, load
from edge.formats import AudioFormat
from edge.http.logs import access_logger_class, install_redaction
from edge.http.proxies import TrustedProxies
from edge.http.tls import server_context
from edge.keyring import KEYS_ENV, Keyring, KeyringError, generate_pair
from edge.metrics import MULTIPROC_ENV
from edge.policy import Policy
from edge.spec import Spec, SpecError
from edge.token import parse_network, sign_url
from edge.voices import UnknownVoice, for_config, resolve

DEFAULT_TTL = 3600
EXIT_USAGE = 2


def _fail(message: str) -> int:
    print(f"nearvoice: {message}", file=sys.stderr)
    return EXIT_USAGE


def cmd_keygen(_: argparse.Namespace) -> int:
    print(generate_pair())
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    try:
        keyring = Keyring.from_env()
        voices = for_config(load(Path(args.config))) if args.config else None
        voice = resolve(args.voice, voices)
        spec = Spec.create(
            text=args.text,
            voice=voice.name,
            format=AudioFormat(args.format),
            model=voice.model_id,
            speed=args.speed,
            seed=args.seed,
        )
        if args.ip:
            parse_network(args.ip)
    except KeyringError as exc:
        return _fail(str(exc))
    except UnknownVoice as exc:
        return _fail(f"unknown voice {exc.voice!r}; known: {', '.join(exc.known)}")
    except (SpecError, ValueError, OSError) as exc:
        return _fail(str(exc))
    if args.ttl <= 0:
        return _fail("--ttl must be positive")
    url = sign_url(keyring, args.base, spec, policy=Policy(args.policy), ttl=args.ttl, ip=args.ip)
    print(url)
    return 0


def _node_config(args: argparse.Namespace, role: Role) -> NodeConfig:
    config = load(Path(args.config) if args.config else None, role)
    return config.replace(
        host=args.host,
        port=args.port,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        upstreams=tuple(args.upstream) if args.upstream else None,
        workers=args.workers,
    )


def _configure_logging() -> None:
    """Once per process (workers are spawned, not forked): the format, and secrets
    masked in every line (edge.http.logs)."""
    if logging.getLogger().handlers:
        return
    logging.basicConfig(
        level=os.environ.get("NEARVOICE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    install_redaction()


def _serve(config: NodeConfig, reuse_port: bool) -> None:
    _configure_logging()
    from edge.app import create_app
    from edge.http.fastpath import run

    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    keyring = Keyring.from_env()
    if config.role is Role.ORIGIN:
        from origin.app import create_origin_app

        app = create_origin_app(config, keyring)
    else:
        app = create_app(config, keyring)
    access_log = logging.getLogger("aiohttp.access") if config.http.access_log else None
    # aiohttp's run_app with the fast path's runner (edge.http.fastpath).
    run(
        app,
        host=config.host,
        port=config.port,
        reuse_port=reuse_port,
        access_log=access_log,
        access_log_class=access_logger_class(config.http.access_log_format),
        tls=config.tls,
        handshake_timeout=config.http.header_timeout or 60.0,
    )


def cmd_node(args: argparse.Namespace) -> int:
    role = Role(args.command)
    try:
        config = _node_config(args, role)
        Keyring.from_env()
        server_context(config.tls)  # unreadable certificates are reported here
        TrustedProxies(config.http.trusted_proxies)  # and malformed CIDRs
        access_logger_class(config.http.access_log_format)
        for_config(config)  # voices and exported variants, reported here, not as tracebacks
    except (KeyringError, ValueError, OSError, ssl.SSLError) as exc:
        return _fail(str(exc))
    _configure_logging()
    log = logging.getLogger("nearvoice")
    log.info(
        "%s listening on %s://%s:%d (data %s, %d worker(s))",
        role.value,
        "https" if config.tls.enabled else "http",
        config.host,
        config.port,
        config.data_dir,
        config.workers,
    )
    if config.workers <= 1:
        _serve(config, reuse_port=False)
        return 0
    # Workers share one metrics view: prometheus_client's multiprocess mode, set up before
    # any worker imports it. Stale files from an earlier run would add to the new counts.
    metrics_dir = Path(config.data_dir) / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(metrics_dir)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_serve, args=(config, True)) for _ in range(config.workers)]
    for proc in procs:
        proc.start()

    def stop(signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.pid is not None:
                os.kill(proc.pid, signal.SIGINT)

    def forward(signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.pid is not None:
                os.kill(proc.pid, signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, forward)  # certificate reload, in every worker
    for proc in procs:
        proc.join()
    return 0


BENCHMARKS = {
    "api": "bench.api",
    "hit-path": "bench.hit_path",
    "miss-latency": "bench.miss_latency",
    "offload": "bench.offload",
}


def cmd_up(args: argparse.Namespace) -> int:
    from edge.stack import run_stack

    return run_stack(Path(args.data_dir), args.base_port, tls=args.tls)


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(BENCHMARKS[args.benchmark])
    code: int = module.main(args.bench_args)
    return code


def cmd_export(args: argparse.Namespace) -> int:
    return run_export(args.export_args)


def run_export(argv: list[str]) -> int:
    # Imported on use: the export step's own dependencies (onnx, torch) are an extra.
    from export.cli import main as export_main

    code: int = export_main(argv)
    return code


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nearvoice", description="Edge delivery of AI speech.")
    sub = p.add_subparsers(dest="command", required=True)

    keygen = sub.add_parser("keygen", help="print a new kid:secret pair")
    keygen.set_defaults(func=cmd_keygen)

    sign = sub.add_parser("sign", help=f"print one signed URL (keys from ${KEYS_ENV})")
    sign.add_argument("--base", required=True, help="edge base URL, e.g. http://127.0.0.1:8080")
    sign.add_argument("--text", required=True)
    sign.add_argument("--voice", required=True)
    sign.add_argument("--format", default="wav", choices=[f.value for f in AudioFormat])
    sign.add_argument("--speed", type=float, default=1.0)
    sign.add_argument("--seed", type=int, default=0)
    sign.add_argument("--policy", default="hot", choices=[p.value for p in Policy])
    sign.add_argument("--ttl", type=int, default=DEFAULT_TTL, help="seconds the URL is valid")
    sign.add_argument("--ip", help="bind the URL to a client address or CIDR")
    sign.add_argument("--config", help="a node's TOML, for the voices of [[external]] servers")
    sign.set_defaults(func=cmd_sign)

    for role in Role:
        node = sub.add_parser(role.value, help=f"run a {role.value} node")
        node.add_argument("--config", help="TOML file (see configs/)")
        node.add_argument("--host")
        node.add_argument("--port", type=int)
        node.add_argument("--data-dir")
        node.add_argument("--upstream", action="append", help="upstream base URL (repeatable)")
        node.add_argument("--workers", type=int, help="processes sharing the port (SO_REUSEPORT)")
        node.set_defaults(func=cmd_node)

    up = sub.add_parser("up", help="run the local stack: edge, shield and origin")
    up.add_argument("--data-dir", default=".nearvoice/stack")
    up.add_argument("--base-port", type=int, default=8080, help="edge on N, shield N+1, origin N+2")
    up.add_argument(
        "--tls", action="store_true", help="TLS everywhere, with a development CA in the data dir"
    )
    up.set_defaults(func=cmd_up)

    bench = sub.add_parser("bench", help="run a benchmark (see bench/)")
    bench.add_argument("benchmark", choices=sorted(BENCHMARKS))
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)

    export = sub.add_parser(
        "export",
        help="models to ONNX variants with parity and speed reports (see export/)",
    )
    export.add_argument("export_args", nargs=argparse.REMAINDER)
    export.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        return run_export(argv[1:])  # all of it, --help included, is the export step's
    args = parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
