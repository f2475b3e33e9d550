"""`nearvoice` command line (docs/contracts.md#command-line, a contract)."""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import ssl
import sys
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from prometheus_client.multiprocess import mark_process_dead

from nearvoice.edge.config import NodeConfig, Role, load
from nearvoice.edge.controls import check_duration, check_voice, natural_samples
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.http.logs import access_logger_class, install_redaction
from nearvoice.edge.http.proxies import TrustedProxies
from nearvoice.edge.http.tls import server_context
from nearvoice.edge.keyring import KEYS_ENV, Keyring, KeyringError, generate_pair
from nearvoice.edge.memory import apply_allocator_settings
from nearvoice.edge.metrics import MULTIPROC_ENV
from nearvoice.edge.policy import Policy
from nearvoice.edge.realtime.command import realtime_url
from nearvoice.edge.spec import Emotion, Ref, Spec, SpecError
from nearvoice.edge.token import check_sign_limits, parse_network, sign_url
from nearvoice.edge.voices import UnknownVoice, for_config, resolve

DEFAULT_TTL = 3600
MIN_WORKER_UPTIME = 5.0  # seconds: a worker that dies sooner died "during start-up"
MAX_QUICK_DEATHS = 3  # start-up deaths in a row after which a worker is not restarted
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
        config = load(Path(args.config), role=None) if args.config else NodeConfig()
        voices = for_config(config) if args.config else None
        voice = resolve(args.voice, voices)
        if args.realtime:
            print(realtime_url(keyring, args.base, args.tenant or "", voice, args.ttl))
            return 0
        if args.text is None:
            return _fail("--text is required (except with --realtime)")
        spec = Spec.create(
            text=args.text,
            voice=voice.name,
            format=AudioFormat(args.format),
            model=voice.model_id,
            speed=args.speed,
            seed=args.seed,
            **_controls(args),
        )
        check_voice(voice, spec)
        if args.config and spec.duration is not None:
            _check_natural(load(Path(args.config)), spec)
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
    try:
        check_sign_limits(
            spec,
            url,
            args.base,
            max_text_chars=config.synth.max_text_chars,
            max_line_size=config.http.max_line_size,
        )
    except ValueError as exc:
        return _fail(str(exc))
    print(url)
    return 0


def _controls(args: argparse.Namespace) -> dict[str, Any]:
    """`Spec.create` arguments of the expressive flags (docs/contracts.md#command-line)."""
    out: dict[str, Any] = {}
    if args.duration is not None:
        out["duration"] = args.duration
    if args.lang is not None:
        out["lang"] = args.lang
    given = [x for x in (args.emotion, args.emotion_vector, args.emotion_text) if x is not None]
    if len(given) > 1:
        raise SpecError("bad_emotion", "give one of --emotion, --emotion-vector, --emotion-text")
    if given:
        vector = None
        if args.emotion_vector is not None:
            try:
                vector = [float(x) for x in args.emotion_vector.split(",")]
            except ValueError as exc:
                raise SpecError("bad_emotion", "--emotion-vector takes numbers a,b,...,h") from exc
        out["emotion"] = Emotion.create(
            label=args.emotion, vector=vector, text=args.emotion_text, alpha=args.emotion_alpha
        )
    elif args.emotion_alpha is not None:
        raise SpecError("bad_emotion", "--emotion-alpha goes with an emotion")
    if (args.ref is None) != (args.ref_sha256 is None):
        raise SpecError("bad_ref", "--ref and --ref-sha256 go together")
    if args.ref is not None:
        out["ref"] = Ref.create(args.ref, args.ref_sha256)
    return out


def _check_natural(config: NodeConfig, spec: Spec) -> None:
    """With --config, the voice's natural length is known here (its engine loads in this
    process): a duration outside 0.5-2.0x of it is refused before a URL exists."""
    import dataclasses

    from nearvoice.edge.app import default_engines

    synth = dataclasses.replace(config.synth, enabled=True, voices=(spec.voice,))
    try:
        engines = default_engines(dataclasses.replace(config, synth=synth))
    except ValueError:  # an external server's voice: its length is the server's to know
        return
    for engine in engines:
        if spec.voice in engine.voices and engine.model_id(spec.voice) == spec.model:
            check_duration(spec, natural_samples(engine, spec), engine.sample_rate)
            return


def _node_config(args: argparse.Namespace, role: Role) -> NodeConfig:
    config = load(Path(args.config) if args.config else None, role)
    return config.replace(
        host=args.host,
        port=args.port,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        upstreams=tuple(args.upstream) if args.upstream else None,
        workers=args.workers,
    ).validate()


def _check_environment(config: NodeConfig) -> None:
    """What the configuration cannot say about itself: a usable data directory and a free
    port. Raises OSError with a one-line message."""
    data = Path(config.data_dir)
    try:
        data.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"data directory {data}: {exc.strerror or exc}") from None
    if not os.access(data, os.W_OK | os.X_OK):
        raise OSError(f"data directory {data} is not writable")
    try:
        infos = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise OSError(f"cannot resolve host {config.host!r}: {exc}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As the server will bind: SO_REUSEADDR, so sockets in TIME_WAIT do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            where = f"{config.host}:{config.port}"
            raise OSError(f"cannot listen on {where}: {exc.strerror or exc}") from None


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


def _serve(config: NodeConfig, reuse_port: bool, worker: int = 0) -> None:
    from nearvoice.edge.app import create_app
    from nearvoice.edge.http.fastpath import run
    from nearvoice.edge.workers import WORKER_ENV

    _configure_logging()  # a spawned worker starts with none
    os.environ[WORKER_ENV] = str(worker)  # read by the node's Siblings (edge.workers)

    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    apply_allocator_settings(config.memory)  # before threads allocate
    keyring = Keyring.from_env()
    if config.role is Role.ORIGIN:
        from nearvoice.origin.app import create_origin_app

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
        _check_environment(config)
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
    return _supervise(config)


def _supervise(config: NodeConfig) -> int:
    """Runs the workers, each with its index (edge.workers), until SIGINT or SIGTERM. A
    worker that dies is started again under the same index, so the keys it owns come back
    to it; one that keeps dying during start-up stops the node, since it would only die
    again."""
    log = logging.getLogger("nearvoice")
    ctx = multiprocessing.get_context("spawn")
    procs: dict[int, tuple[BaseProcess, float]] = {}
    quick_deaths = dict.fromkeys(range(config.workers), 0)
    stopping = False

    def start(index: int) -> None:
        proc = ctx.Process(target=_serve, args=(config, True, index), name=f"worker-{index}")
        proc.start()
        procs[index] = (proc, time.monotonic())

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc, _ in procs.values():
            if proc.pid is not None and proc.exitcode is None:
                os.kill(proc.pid, signal.SIGINT)

    def forward(signum: int, _frame: object) -> None:
        for proc, _ in procs.values():
            if proc.pid is not None and proc.exitcode is None:
                os.kill(proc.pid, signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, forward)  # certificate reload, in every worker
    for index in range(config.workers):
        if not stopping:
            start(index)
    code = 0
    while procs:
        wait([proc.sentinel for proc, _ in procs.values()])
        for index, (proc, started) in list(procs.items()):
            if proc.exitcode is None:
                continue
            del procs[index]
            assert proc.pid is not None
            # Its live gauges no longer add to the node's.
            mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]
            if stopping:
                continue
            quick = time.monotonic() - started < MIN_WORKER_UPTIME
            quick_deaths[index] = quick_deaths[index] + 1 if quick else 0
            if quick_deaths[index] >= MAX_QUICK_DEATHS:
                log.error("worker %d keeps exiting during start-up; stopping", index)
                code = 1
                stop(signal.SIGTERM, None)
                continue
            log.warning("worker %d exited with %s; starting it again", index, proc.exitcode)
            start(index)
    return code


BENCHMARKS = {
    "api": "nearvoice.bench.api",
    "duration-fit": "nearvoice.bench.duration_fit",
    "duration-pass": "nearvoice.bench.duration_pass",
    "hit-path": "nearvoice.bench.hit_path",
    "miss-latency": "nearvoice.bench.miss_latency",
    "offload": "nearvoice.bench.offload",
    "origin-batching": "nearvoice.bench.origin_batching",
    "workers": "nearvoice.bench.workers",
    "soak": "nearvoice.bench.soak",
    "realtime": "nearvoice.bench.realtime",
}
"""`nearvoice bench NAME` -> the module whose main(argv) runs it; each writes its results
under ./bench-results (bench/common.py, write_results)."""
BENCH_REPORT = ("report", "nearvoice.bench.report")
"""`nearvoice bench report`: the latest results of every benchmark, as Markdown and charts;
a subcommand of its own, never a benchmark's name."""


def cmd_up(args: argparse.Namespace) -> int:
    from nearvoice.edge.stack import run_stack

    return run_stack(Path(args.data_dir), args.base_port, tls=args.tls)


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    name, report = BENCH_REPORT
    module = importlib.import_module(
        report if args.benchmark == name else BENCHMARKS[args.benchmark]
    )
    code: int = module.main(args.bench_args)
    return code


def cmd_config_show(args: argparse.Namespace) -> int:
    from nearvoice.edge.config_show import effective, show

    try:
        config = effective(Role(args.role) if args.role else None, args.config)
    except (ValueError, OSError) as exc:  # ConfigError is a ValueError
        return _fail(str(exc))
    sys.stdout.write(show(config))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    return run_export(args.export_args)


def run_export(argv: list[str]) -> int:
    # Imported on use: the export step's own dependencies (onnx, torch) are an extra.
    from nearvoice.export.cli import main as export_main

    code: int = export_main(argv)
    return code


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nearvoice", description="Edge delivery of AI speech.")
    sub = p.add_subparsers(dest="command", required=True)

    keygen = sub.add_parser("keygen", help="print a new kid:secret pair")
    keygen.set_defaults(func=cmd_keygen)

    sign = sub.add_parser("sign", help=f"print one signed URL (keys from ${KEYS_ENV})")
    sign.add_argument("--base", required=True, help="edge base URL, e.g. http://127.0.0.1:8080")
    sign.add_argument("--text")
    sign.add_argument("--voice", required=True)
    sign.add_argument("--format", default="wav", choices=[f.value for f in AudioFormat])
    sign.add_argument("--speed", type=float, default=1.0)
    sign.add_argument("--seed", type=int, default=0)
    sign.add_argument("--policy", default="hot", choices=[p.value for p in Policy])
    sign.add_argument("--ttl", type=int, default=DEFAULT_TTL, help="seconds the URL is valid")
    sign.add_argument("--ip", help="bind the URL to a client address or CIDR")
    sign.add_argument("--config", help="a node's TOML, for the voices of [[external]] servers")
    sign.add_argument(
        "--realtime", action="store_true", help="a ws(s):// realtime session URL, no --text"
    )
    sign.add_argument("--tenant", help="the tenant a --realtime session token is for")
    sign.add_argument("--duration", type=float, help="target length in seconds (replaces speed)")
    sign.add_argument("--emotion", help="an emotion label, e.g. excited")
    sign.add_argument("--emotion-vector", help="8 numbers in 0..1: happy,angry,...,calm")
    sign.add_argument("--emotion-text", help="an emotion instruction")
    sign.add_argument("--emotion-alpha", type=float, help="emotion strength in 0..1 (default 1)")
    sign.add_argument("--ref", help="a registered reference voice id (ref_...)")
    sign.add_argument("--ref-sha256", help="the reference clip's SHA-256 (from the origin)")
    sign.add_argument("--lang", help="BCP 47 language tag, e.g. en-US")
    sign.set_defaults(func=cmd_sign)

    for role in Role:
        node = sub.add_parser(role.value, help=f"run a {role.value} node")
        node.add_argument(
            "--config", help="TOML file over the defaults (see `nearvoice config show`)"
        )
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

    config = sub.add_parser("config", help="a node's configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser(
        "show",
        help="print the effective configuration as TOML (defaults, then --config; "
        "the environment's part as comments, secrets masked)",
    )
    show.add_argument(
        "--role", choices=[r.value for r in Role], help="default: the file's role, else edge"
    )
    show.add_argument("--config", type=Path, help="TOML file over the packaged defaults")
    show.set_defaults(func=cmd_config_show)

    bench = sub.add_parser(
        "bench", help="run a benchmark, or `report` the latest results (see docs/benchmarks.md)"
    )
    assert BENCH_REPORT[0] not in BENCHMARKS
    bench.add_argument("benchmark", choices=[*sorted(BENCHMARKS), BENCH_REPORT[0]])
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
