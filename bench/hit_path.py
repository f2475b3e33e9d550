"""Cache-hit throughput: 64 KiB Range hits on a cached 1 MiB object, edge vs nginx.

Both servers hold the same bytes, run one worker each, and are loaded in the same run by
wrk in its own process (one thread, 16 connections), with the Range offset cycling over
the object so no single answer can be memoized by the load generator. The figure that
matters is the ratio of requests per second, edge / nginx, measured side by side on one
machine; absolute numbers depend on the machine and its neighbours.

    python -m bench.hit_path [--seconds 10] [--connections 16] [--workers 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from bench.common import edge_process, free_port, nginx, python_server, run_wrk
from edge.cache.meta import ObjectMeta, etag_for
from edge.cache.store import DiskStore, StoreSettings
from edge.formats import AudioFormat
from edge.keyring import Keyring, generate_pair
from edge.policy import Policy
from edge.spec import Spec
from edge.token import sign_url
from edge.voices import resolve

OBJECT_BYTES = 1024 * 1024
SLICE = 64 * 1024
RESULTS = Path(__file__).resolve().parent / "results"


def wrk_script(path: Path, target: str) -> None:
    """Cycles the Range over the 16 aligned 64 KiB slices of the object."""
    slices = OBJECT_BYTES // SLICE
    path.write_text(
        f"""
local i = 0
request = function()
  local start = (i % {slices}) * {SLICE}
  i = i + 1
  local range = "bytes=" .. start .. "-" .. (start + {SLICE} - 1)
  return wrk.format("GET", "{target}", {{Range = range}})
end
"""
    )


def fetch_range(url: str, start: int, end: int) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-{end}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read()


def prepare(work: Path) -> tuple[bytes, Spec, Keyring, str]:
    body = random.Random(7).randbytes(OBJECT_BYTES)
    voice = resolve("heart")
    spec = Spec.create(
        text="The hit path benchmark object.",
        voice=voice.name,
        format=AudioFormat.WAV,
        model=voice.model_id,
    )
    pair = generate_pair()
    keyring = Keyring.parse(pair)
    store = DiskStore(work / "edge" / "cache", StoreSettings())
    meta = ObjectMeta(
        key=spec.key,
        content_type="audio/wav",
        length=len(body),
        etag=etag_for(spec.key),
        sha256=hashlib.sha256(body).hexdigest(),
        policy=Policy.HOT,
        stored_at=time.time(),
        ttl=86400,
    )
    store.put(meta, body)
    store.close()
    (work / "www").mkdir()
    (work / "www" / "object.wav").write_bytes(body)
    return body, spec, keyring, pair


def measure(args: argparse.Namespace) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="nv-bench-hit-"))
    work.chmod(0o755)  # nginx's worker runs unprivileged and must read the document root
    try:
        body, spec, keyring, pair = prepare(work)
        env = {"NEARVOICE_KEYS": pair}
        report: dict[str, object] = {
            "object_bytes": OBJECT_BYTES,
            "range_bytes": SLICE,
            "seconds": args.seconds,
            "connections": args.connections,
        }
        with nginx(work / "www", free_port()) as nginx_base:
            nginx_url = f"{nginx_base}/object.wav"
            runs = [("edge", 1)] + ([("edge", args.workers)] if args.workers > 1 else [])
            for name, workers in runs:
                port = free_port()
                with edge_process(work / "edge", port, env, workers=workers) as base:
                    url = sign_url(keyring, base, spec, policy=Policy.HOT, ttl=3600)
                    for server_url in (url, nginx_url):
                        status, got = fetch_range(server_url, SLICE, 2 * SLICE - 1)
                        assert status == 206 and got == body[SLICE : 2 * SLICE], server_url
                    target = urlsplit(url)
                    script = work / "edge.lua"
                    wrk_script(script, f"{target.path}?{target.query}")
                    run_wrk(url, seconds=2, connections=args.connections, script=script)  # warm
                    result = run_wrk(
                        url, seconds=args.seconds, connections=args.connections, script=script
                    )
                    label = name if workers == 1 else f"edge --workers {workers}"
                    report[label] = result.as_dict()
                # nginx measured right after each edge run, so both see the same machine state
                script = work / "nginx.lua"
                wrk_script(script, "/object.wav")
                run_wrk(nginx_url, seconds=2, connections=args.connections, script=script)
                result = run_wrk(
                    nginx_url, seconds=args.seconds, connections=args.connections, script=script
                )
                report["nginx" if workers == 1 else f"nginx (after {workers} workers)"] = (
                    result.as_dict()
                )
            # The framework's ceiling: aiohttp alone, slicing memory, nothing else.
            bare_file = str(work / "www" / "object.wav")
            with python_server("bench.bare_aiohttp", bare_file, port=free_port()) as base:
                script = work / "bare.lua"
                wrk_script(script, "/object.wav")
                bare_url = f"{base}/object.wav"
                run_wrk(bare_url, seconds=2, connections=args.connections, script=script)
                result = run_wrk(
                    bare_url, seconds=args.seconds, connections=args.connections, script=script
                )
                report["bare aiohttp (ceiling)"] = result.as_dict()
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nearvoice bench hit-path", description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="also run the edge with N workers")
    args = parser.parse_args(argv)
    report = measure(args)
    edge, ng = report["edge"], report["nginx"]
    assert isinstance(edge, dict) and isinstance(ng, dict)
    print(f"{'server':<26}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'non-2xx':>9}")
    for name, row in report.items():
        if isinstance(row, dict):
            print(
                f"{name:<26}{row['rps']:>10.0f}{row['p50_ms']:>10.2f}"
                f"{row['p99_ms']:>10.2f}{row['non_2xx']:>9}"
            )
    ratio = edge["rps"] / ng["rps"]
    report["ratio_rps_edge_over_nginx"] = round(ratio, 3)
    print(f"edge / nginx requests per second: {ratio:.2f}x (target >= 0.5x)")
    bare = report["bare aiohttp (ceiling)"]
    assert isinstance(bare, dict)
    report["ratio_rps_bare_aiohttp_over_nginx"] = round(bare["rps"] / ng["rps"], 3)
    print(f"bare aiohttp / nginx (framework ceiling): {bare['rps'] / ng['rps']:.2f}x")
    multi = report.get(f"edge --workers {args.workers}")
    if isinstance(multi, dict):
        other = report[f"nginx (after {args.workers} workers)"]
        assert isinstance(other, dict)
        print(f"edge --workers {args.workers} / nginx: {multi['rps'] / other['rps']:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hit_path.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
