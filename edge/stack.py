"""`nearvoice up`: the local stack as three processes, edge on N, shield on N+1 and origin
on N+2 (DESIGN.md section 4). Missing secrets are generated into the data directory for
development; Ctrl-C stops all three cleanly."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import FrameType

from edge.config import ADMIN_TOKEN_ENV, MINT_TOKEN_ENV
from edge.formats import AudioFormat
from edge.keyring import KEYS_ENV, Keyring, generate_pair
from edge.policy import Policy
from edge.spec import Spec
from edge.token import sign_url
from edge.voices import resolve

READY_TIMEOUT = 180.0  # seconds for every node to load and warm its engines
STOP_TIMEOUT = 20.0  # seconds each node gets to finish what it is serving


def _secret(env: dict[str, str], name: str, path: Path, make: str) -> None:
    """Uses the environment's value, else one kept in `path` (created once, mode 0600)."""
    if env.get(name):
        return
    if not path.exists():
        # Created private: never world-readable, even for an instant.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(make + "\n")
    env[name] = path.read_text().strip()


def _wait_ready(
    url: str, proc: subprocess.Popen[bytes], deadline: float, tls: ssl.SSLContext | None = None
) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode} during start-up")
        # `url` is our own 127.0.0.1 readiness URL, never user input.
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(url, timeout=2, context=tls) as resp,  # noqa: S310
        ):
            if resp.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} was not ready within {READY_TIMEOUT:.0f} s")


def _tls_configs(data: Path) -> tuple[dict[str, str], ssl.SSLContext]:
    """`up --tls`: a development CA and a certificate per node (edge.http.devca), and each
    node's TOML: TLS on its listener, its upstream verified against the CA (and this
    node's certificate presented to it, ready for a tier that sets `[tls] client_ca`).
    Returns the TOML per role and a client context trusting the CA."""
    from edge.http import devca

    pki = data / "tls"
    ca = devca.make_ca(pki)
    tomls = {}
    for role in ("edge", "shield", "origin"):
        node = devca.issue(ca, pki, role)
        tomls[role] = (
            f'[tls]\ncert = "{node.cert.resolve()}"\nkey = "{node.key.resolve()}"\n'
            + f'[upstream]\nca = "{ca.cert.resolve()}"\ncert = "{node.cert.resolve()}"\n'
            f'key = "{node.key.resolve()}"\nrequire_tls = {str(role != "origin").lower()}\n'
        )
    return tomls, ssl.create_default_context(cafile=str(ca.cert))


def run_stack(data: Path, base_port: int, tls: bool = False) -> int:
    data.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    _secret(env, KEYS_ENV, data / "keys", generate_pair())
    _secret(env, ADMIN_TOKEN_ENV, data / "admin-token", secrets.token_urlsafe(24))
    _secret(env, MINT_TOKEN_ENV, data / "mint-token", secrets.token_urlsafe(24))
    scheme = "https" if tls else "http"
    edge, shield, origin = (f"{scheme}://127.0.0.1:{base_port + i}" for i in range(3))
    tomls, client_tls = _tls_configs(data) if tls else ({}, None)
    origin_config = data / "origin.toml"
    origin_config.write_text(
        f'[origin]\npublic_base = "{edge}"\npush_edges = ["{edge}"]\n'
        f'store = "{(data / "origin" / "objects").resolve()}"\n' + tomls.get("origin", "")
    )
    for role in ("shield", "edge"):
        (data / f"{role}.toml").write_text(tomls.get(role, ""))
    nodes = [
        ("origin", base_port + 2, ["--config", str(origin_config)]),
        ("shield", base_port + 1, ["--upstream", origin, "--config", str(data / "shield.toml")]),
        ("edge", base_port, ["--upstream", shield, "--config", str(data / "edge.toml")]),
    ]
    procs: list[subprocess.Popen[bytes]] = []
    stopping = False

    def stop(_signum: int = 0, _frame: FrameType | None = None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        for role, port, extra in nodes:
            cmd = [
                sys.executable, "-m", "edge.cli", role, "--port", str(port),
                "--data-dir", str(data / role), *extra,
            ]  # fmt: skip
            procs.append(subprocess.Popen(cmd, env=env))
        deadline = time.monotonic() + READY_TIMEOUT
        for (_, port, _), proc in zip(nodes, procs, strict=True):
            _wait_ready(f"{scheme}://127.0.0.1:{port}/readyz", proc, deadline, client_tls)
        spec_voice = resolve("heart")
        sample = sign_url(
            Keyring.parse(env[KEYS_ENV]),
            edge,
            Spec.create(
                text="Hello from the nearvoice edge.",
                voice=spec_voice.name,
                format=AudioFormat.WAV,
                model=spec_voice.model_id,
            ),
            policy=Policy.HOT,
            ttl=86400,
        )
        cacert = f"--cacert {data / 'tls' / 'ca.pem'} " if tls else ""
        mint_example = (
            f"curl -s {cacert}-H 'Authorization: Bearer {env[MINT_TOKEN_ENV]}' "
            f'-d \'{{"text": "Hi there.", "voice": "joe"}}\' {origin}/v1/speech'
        )
        print(
            f"nearvoice stack is up (data in {data}):\n"
            f"  edge    {edge}\n  shield  {shield}\n  origin  {origin}\n"
            + (f"TLS: development CA {data}/tls/ca.pem (curl --cacert)\n" if tls else "")
            + f"secrets: {data}/keys, {data}/admin-token, {data}/mint-token "
            f"(or {KEYS_ENV}, {ADMIN_TOKEN_ENV}, {MINT_TOKEN_ENV})\n"
            f"sample signed URL:\n  {sample}\n"
            f"mint one: {mint_example}\n"
            "Ctrl-C stops everything.",
            flush=True,
        )
        while not stopping:
            for (role, _, _), proc in zip(nodes, procs, strict=True):
                if proc.poll() is not None:
                    print(f"{role} exited with {proc.returncode}; stopping", file=sys.stderr)
                    return 1
            time.sleep(0.2)
        return 0
    except RuntimeError as exc:
        print(f"nearvoice up: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_processes(list(reversed(procs)))  # edge first: it stops taking players first


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM all (in the order given), then wait for each; one that outlasts `timeout`
    seconds is killed."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
