"""Shared benchmark plumbing: free ports, real peer processes, wrk runs and their parsing."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nearvoice.edge.stack import stop_processes

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 60.0, tls: ssl.SSLContext | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(url, timeout=2, context=tls) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer 200 within {timeout}s")


def require(binary: str) -> str:
    found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin")
    if found is None:
        raise SystemExit(f"{binary} not found: run `make sysdeps` (installs Debian packages)")
    return found


@contextlib.contextmanager
def nginx(
    root: Path, port: int, extra: str = "", tls: tuple[Path, Path, Path] | None = None
) -> Iterator[str]:
    """A real nginx, one worker, serving `root` statically on loopback; over TLS with
    `tls` = (certificate, key, CA that signed it)."""
    listen = f"127.0.0.1:{port}"
    if tls is not None:
        listen += f" ssl;\n        ssl_certificate {tls[0]};\n        ssl_certificate_key {tls[1]}"
    binary = require("nginx")
    work = Path(tempfile.mkdtemp(prefix="nv-nginx-"))
    work.chmod(0o755)  # the unprivileged worker writes its proxy temp files in here
    conf = work / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    types {{ audio/wav wav; }}
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    {extra}
    server {{
        listen {listen};
        root {root};
        location /healthz {{ return 200 "ok"; }}
    }}
}}
"""
    )
    proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(work)], stderr=subprocess.PIPE)
    scheme, context = _scheme(tls[2] if tls else None)
    try:
        wait_http(f"{scheme}://127.0.0.1:{port}/healthz", timeout=15, tls=context)
        yield f"{scheme}://127.0.0.1:{port}"
    finally:
        stop_processes([proc])
        shutil.rmtree(work, ignore_errors=True)


def _scheme(ca: Path | None) -> tuple[str, ssl.SSLContext | None]:
    if ca is None:
        return "http", None
    return "https", ssl.create_default_context(cafile=str(ca))


@contextlib.contextmanager
def edge_process(
    data_dir: Path,
    port: int,
    env: dict[str, str],
    workers: int = 1,
    config: Path | None = None,
    ca: Path | None = None,
) -> Iterator[str]:
    """A real `nearvoice edge` process, with the TOML `config` if given (over TLS when it
    says so: then `ca` verifies it)."""
    cmd = [
        sys.executable, "-m", "nearvoice.edge.cli", "edge",
        "--port", str(port), "--data-dir", str(data_dir), "--workers", str(workers),
    ]  # fmt: skip
    if config is not None:
        cmd += ["--config", str(config)]
    data_dir.mkdir(parents=True, exist_ok=True)
    log = (data_dir / "edge.log").open("wb")
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=log, cwd=REPO)
    scheme, context = _scheme(ca)
    try:
        wait_http(f"{scheme}://127.0.0.1:{port}/readyz", timeout=120, tls=context)
        yield f"{scheme}://127.0.0.1:{port}"
    finally:
        stop_processes([proc])
        log.close()


@contextlib.contextmanager
def python_server(module: str, *args: str, port: int) -> Iterator[str]:
    """`python -m module args... port` as a separate process, until it answers /healthz."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args, str(port)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_processes([proc])


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    errors: int

    def as_dict(self) -> dict[str, float]:
        return {
            "rps": round(self.rps, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "non_2xx": self.non_2xx,
            "errors": self.errors,
        }


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _latency(text: str, pct: str) -> float:
    m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if m is None:
        raise ValueError(f"no {pct}% latency in wrk output:\n{text}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(url: str, *, seconds: int, connections: int, script: Path | None = None) -> WrkResult:
    """wrk in its own process, one thread, with the latency distribution."""
    cmd = [require("wrk"), "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if script is not None:
        cmd += ["-s", str(script)]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    err = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return WrkResult(
        rps=rps,
        p50_ms=_latency(out, "50"),
        p99_ms=_latency(out, "99"),
        non_2xx=int(non.group(1)) if non else 0,
        errors=sum(int(g) for g in err.groups()) if err else 0,
    )
