"""Shared test fixtures.

`nginx_server` runs a real nginx (Debian's package, installed by `make sysdeps`) as the
reference peer for the Range differential tests. Its fixtures and helpers are prefixed
`nginx_` / `Nginx` so other fixtures can live here without clashing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nearvoice.edge.config import HttpSettings

NGINX_FALLBACK_PATHS = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
NGINX_START_TIMEOUT = 10.0
NGINX_STOP_TIMEOUT = 10.0

_NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections 256;
}}

http {{
    access_log off;
    client_body_temp_path {prefix}/temp/client_body;
    proxy_temp_path {prefix}/temp/proxy;
    fastcgi_temp_path {prefix}/temp/fastcgi;
    uwsgi_temp_path {prefix}/temp/uwsgi;
    scgi_temp_path {prefix}/temp/scgi;

    types {{
        audio/wav wav;
    }}
    default_type application/octet-stream;
    sendfile on;
    keepalive_timeout 30s;
    max_ranges {max_ranges};

    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
        root {root};
        location / {{
        }}
    }}
}}
"""


NGINX_MISSING = (
    "nginx is not installed, and the Range differential tests need a real nginx as "
    "their reference: run `make sysdeps` (Debian package nginx-light)"
)


def find_nginx() -> str | None:
    """The nginx executable: on PATH, or where Debian and source builds put it."""
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in NGINX_FALLBACK_PATHS:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class NginxServer:
    """A running nginx serving the static files under `root` (write files there; nginx
    opens them per request, so files added later are served at once)."""

    root: Path
    port: int
    max_ranges: int
    prefix: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def put(self, name: str, body: bytes) -> str:
        """Writes `body` as the static file `name` and returns its URL."""
        (self.root / name).write_bytes(body)
        return self.url(name)

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _start_nginx(prefix: Path, binary: str, max_ranges: int) -> tuple[subprocess.Popen[bytes], int]:
    root = prefix / "www"
    root.mkdir(parents=True, exist_ok=True)
    (prefix / "temp").mkdir(exist_ok=True)
    port = _free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(_NGINX_CONF.format(prefix=prefix, root=root, port=port, max_ranges=max_ranges))
    with (prefix / "stderr.log").open("wb") as log:
        proc = subprocess.Popen(
            [binary, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + NGINX_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if _port_answers(port):
            return proc, port
        time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    output = (prefix / "stderr.log").read_text(errors="replace")
    errors = (
        (prefix / "error.log").read_text(errors="replace")
        if (prefix / "error.log").exists()
        else ""
    )
    raise RuntimeError(f"nginx did not start on port {port}:\n{output}\n{errors}")


def _stop_nginx(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=NGINX_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


@pytest.fixture(scope="session")
def nginx_executable() -> str | None:
    """The nginx executable, or None; `nginx_check_installed` turns None into a failure."""
    return find_nginx()


@pytest.fixture(scope="session")
def nginx_check_installed(nginx_executable: str | None) -> Callable[[], str]:
    """Call it inside a test to fail that test (never skip it) when nginx is missing."""

    def check() -> str:
        if nginx_executable is None:
            pytest.fail(NGINX_MISSING, pytrace=False)
        return nginx_executable

    return check


@pytest.fixture(scope="session")
def nginx_server(
    tmp_path_factory: pytest.TempPathFactory, nginx_executable: str | None
) -> Iterator[NginxServer]:
    """A real nginx on a free loopback port, configured like the edge's Range handling
    (`max_ranges` from `HttpSettings`), serving `.wav` files as `audio/wav`. Fails, never
    skips, when nginx is missing."""
    if nginx_executable is None:
        pytest.fail(NGINX_MISSING, pytrace=False)
    binary = nginx_executable
    prefix = tmp_path_factory.mktemp("nginx")
    max_ranges = HttpSettings().max_ranges
    proc: subprocess.Popen[bytes] | None = None
    last: Exception | None = None
    for _ in range(3):  # the free port can be taken between probing and binding
        try:
            proc, port = _start_nginx(prefix, binary, max_ranges)
            break
        except RuntimeError as exc:
            last = exc
    if proc is None:
        pytest.fail(f"could not start nginx: {last}", pytrace=False)
    try:
        yield NginxServer(root=prefix / "www", port=port, max_ranges=max_ranges, prefix=prefix)
    finally:
        _stop_nginx(proc)


# Export: artifacts built once per session, since exporting and measuring take seconds.


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.export_support import save_tiny_vits

    return save_tiny_vits(tmp_path_factory.mktemp("tiny-vits"))


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nearvoice.export.from_transformers import export

    out = tmp_path_factory.mktemp("tiny-onnx") / "out"
    export(tiny_checkpoint, out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_optimized(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nearvoice.export.optimize import Options, optimize

    out = tmp_path_factory.mktemp("tiny-variants") / "out"
    optimize(tiny_export / "model.onnx", out, opts=Options(repeats=1, progress=False))
    return out


@pytest.fixture(scope="session")
def mms_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.export_support import save_mms_sized_vits

    return save_mms_sized_vits(tmp_path_factory.mktemp("mms-vits"))


@pytest.fixture(scope="session")
def mms_export(mms_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MMS-sized checkpoint through from-transformers (about 40 s on two cores)."""
    from nearvoice.export.from_transformers import export

    out = tmp_path_factory.mktemp("mms-onnx") / "out"
    export(mms_checkpoint, out, progress=False)
    return out


@pytest.fixture(scope="session")
def mms_voice(mms_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MMS-sized export as a voice: `optimize` with the reference variant only."""
    from nearvoice.export.optimize import Options, optimize
    from nearvoice.export.sentences import SENTENCES

    out = tmp_path_factory.mktemp("mms-voice") / "mms"
    opts = Options(variants=["fp32"], sentences=SENTENCES[:1], repeats=1, progress=False)
    optimize(mms_export / "model.onnx", out, opts=opts)
    return out


@pytest.fixture(scope="session")
def joe_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped piper voice `joe` through `optimize`, on 3 of the fixed sentences."""
    from nearvoice.edge.synth.piper_engine import BUNDLED
    from nearvoice.export.optimize import Options, optimize
    from nearvoice.export.sentences import SENTENCES

    out = tmp_path_factory.mktemp("joe-variants") / "joe"
    files = BUNDLED["joe"]
    optimize(
        files.model_path(),
        out,
        files.config_path(),
        Options(sentences=SENTENCES[:3], repeats=1, progress=False),
    )
    return out
