"""Shared benchmark plumbing: free ports, real peer processes, wrk runs and their parsing,
and where results go.

Results are the user's, not the package's: `write_results` puts each run under the
*working directory*, `bench-results/<bench>/<UTC>.json`, never beside this file (which in
an installed wheel is site-packages). Each file names the machine that produced it
(`device()`), since a figure means nothing without the hardware it was measured on;
`nearvoice bench report` (bench/report.py) reads the latest of each.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nearvoice
from nearvoice.edge.stack import stop_processes

ROOT = Path(nearvoice.__file__).resolve().parent.parent
"""The directory holding the `nearvoice` package: the checkout, or site-packages. Child
processes get it on PYTHONPATH, so they import the same code as this one from any
working directory."""
RESULTS_DIR = Path("bench-results")
"""Where results go, relative to the working directory."""
STAMP = "%Y%m%dT%H%M%SZ"
"""UTC time of a run, as its file name: sorts as it happened."""


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment for a child process, with ROOT first on PYTHONPATH."""
    env = {**os.environ, **(extra or {})}
    paths = [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def results_path(bench: str, when: datetime.datetime, root: Path | None = None) -> Path:
    """`<root>/<bench>/<UTC stamp>.json`; a chart of the same run goes beside it, with the
    suffix `.png` (`path.with_suffix(".png")`)."""
    if not bench or "/" in bench or bench.startswith("."):
        raise ValueError(f"bad benchmark name {bench!r}")
    stamp = when.astimezone(datetime.UTC).strftime(STAMP)
    return (RESULTS_DIR if root is None else root) / bench / f"{stamp}.json"


def write_results(
    bench: str,
    figures: Mapping[str, Any],
    context: Mapping[str, Any] | None = None,
    *,
    root: Path | None = None,
    when: datetime.datetime | None = None,
) -> Path:
    """Writes one run's results and returns the file's path.

    `figures` are what the run measured, and nothing else; `context` is what it was told
    or compared against (its parameters, targets, references), kept apart so no input is
    ever read back as a measurement. The device is detected here."""
    when = when or datetime.datetime.now(datetime.UTC)
    path = results_path(bench, when, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "bench": bench,
        "utc": when.astimezone(datetime.UTC).strftime(STAMP),
        "figures": figures,
        "context": dict(context or {}),
        "device": device(),
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)  # a report never reads half a file
    return path


def device() -> dict[str, Any]:
    """The machine a run measured: host, CPU, memory, Python, platform, GPU and the
    code's git commit (None where unknown)."""
    return {
        "hostname": socket.gethostname(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": _memory_bytes(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": _gpu(),
        "git_commit": _git_commit(),
    }


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _memory_bytes() -> int | None:
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def _gpu() -> str | None:
    """The GPUs nvidia-smi lists, else those torch sees (torch is imported only if it is
    installed), else None."""
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [smi, "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout
            names = [line.strip() for line in out.splitlines() if line.strip()]
            if names:
                return ", ".join(names)
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return None
    with contextlib.suppress(Exception):  # a broken CUDA install is "no GPU", not a failure
        import torch

        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            return ", ".join(torch.cuda.get_device_name(i) for i in range(count))
    return None


def _git_commit() -> str | None:
    """The commit of the checkout this code runs from; None from an installed wheel (its
    directory is not the top of a git work tree)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        top = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.split()
        if len(top) == 2 and Path(top[0]).resolve() == ROOT:
            dirty = subprocess.run(
                ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            return top[1] + ("-dirty" if dirty else "")
    return None


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
    proc = subprocess.Popen(cmd, env=child_env(env), stdout=log, stderr=log)
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
        env=child_env(),
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


def listening_pids(port: int) -> list[int]:
    """The processes holding the loopback TCP socket listening on `port` (an nginx's
    master and worker, an edge's workers), found through /proc: Linux only."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                # local address as HEX_IP:HEX_PORT; state 0A is LISTEN
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    inodes.add(f"socket:[{fields[9]}]")
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                pids.append(int(entry.name))
    return sorted(pids)


def pin(pids: list[int], cpus: set[int]) -> None:
    """Keeps every thread of `pids` on `cpus` (threads started later inherit it)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task.name), cpus)


def run_wrk(
    url: str,
    *,
    seconds: int,
    connections: int,
    threads: int = 1,
    script: Path | None = None,
    cpus: set[int] | None = None,
) -> WrkResult:
    """wrk in its own process, with the latency distribution; on `cpus` only if given."""
    cmd = [require("wrk"), f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if cpus is not None:
        cmd = [require("taskset"), "-c", ",".join(map(str, sorted(cpus))), *cmd]
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
