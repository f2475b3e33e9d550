"""`nearvoice up`: the local stack as three processes, edge on N, shield on N+1 and origin
on N+2 (docs/contracts.md#command-line). Missing secrets are generated into the data directory for
development, and never printed; Ctrl-C stops all three cleanly. When one tier dies the
others are stopped, and the last line says which tier it was, how it ended (exit status or
signal) and its last words on stderr."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from nearvoice.edge.config import ADMIN_TOKEN_ENV, MINT_TOKEN_ENV
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.keyring import KEYS_ENV, Keyring, generate_pair
from nearvoice.edge.policy import Policy
from nearvoice.edge.spec import Spec
from nearvoice.edge.token import sign_url
from nearvoice.edge.voices import resolve

READY_TIMEOUT = 180.0  # seconds for every node to load and warm its engines
STOP_TIMEOUT = 20.0  # seconds each node gets to finish what it is serving
RELAY_JOIN = 2.0  # seconds to let a dead node's last stderr lines arrive


TAIL_LINES = 20  # lines of each node's stderr kept to say why it died


@dataclass
class Tier:
    """One node process of the stack, and the last lines it wrote to stderr (which are
    passed on to ours as they come)."""

    role: str
    port: int
    proc: subprocess.Popen[bytes]
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    _relay: threading.Thread | None = None

    def start_relay(self) -> None:
        """Forwards the process's stderr to ours, keeping the last lines."""
        stream = self.proc.stderr
        if stream is None:
            return

        def relay() -> None:
            with stream:
                for raw in stream:
                    line = raw.decode(errors="replace")
                    self.tail.append(line.rstrip("\n"))
                    sys.stderr.write(line)
                    sys.stderr.flush()

        self._relay = threading.Thread(target=relay, name=f"{self.role}-stderr", daemon=True)
        self._relay.start()

    def death(self) -> str:
        """Which tier died and why, in one paragraph: how it ended and its last words."""
        code = self.proc.wait()
        if self._relay is not None:
            self._relay.join(timeout=RELAY_JOIN)
        if code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with status {code}"
        report = f"the {self.role} tier (port {self.port}, pid {self.proc.pid}) {how}"
        last = [line for line in self.tail if line.strip()]
        if last:
            report += "; its last output:\n" + "\n".join(f"  {line}" for line in last[-5:])
        return report


def watch(tiers: list[Tier], stopping: Callable[[], bool], interval: float = 0.2) -> Tier | None:
    """Until `stopping()` or a tier dies; returns the dead tier, or None when stopped."""
    while not stopping():
        for tier in tiers:
            if tier.proc.poll() is not None:
                return tier
        time.sleep(interval)
    return None


def _secret(env: dict[str, str], name: str, path: Path, make: str) -> bool:
    """Uses the environment's value, else one kept in `path` (created once, mode 0600);
    True when it came from the environment."""
    if env.get(name):
        return True
    if not path.exists():
        # Created private: never world-readable, even for an instant.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(make + "\n")
    env[name] = path.read_text().strip()
    return False


def banner(
    data: Path, urls: tuple[str, str, str], sample: str, mint_from_env: bool, tls: bool = False
) -> str:
    """What `nearvoice up` prints once every tier is ready. Never a secret: the mint
    example names where the token is, in the environment or in the data directory."""
    edge, shield, origin = urls
    token = f"${MINT_TOKEN_ENV}" if mint_from_env else f"$(cat {data}/mint-token)"
    cacert = f"--cacert {data / 'tls' / 'ca.pem'} " if tls else ""
    mint_example = (
        f'curl -s {cacert}-H "Authorization: Bearer {token}" '
        f'-d \'{{"text": "Hi there.", "voice": "joe"}}\' {origin}/v1/speech'
    )
    return (
        f"nearvoice stack is up (data in {data}):\n"
        f"  edge    {edge}\n  shield  {shield}\n  origin  {origin}\n"
        + (f"TLS: development CA {data}/tls/ca.pem (curl --cacert)\n" if tls else "")
        + f"secrets: {data}/keys, {data}/admin-token, {data}/mint-token "
        f"(or {KEYS_ENV}, {ADMIN_TOKEN_ENV}, {MINT_TOKEN_ENV})\n"
        f"sample signed URL:\n  {sample}\n"
        f"mint one: {mint_example}\n"
        "Ctrl-C stops everything."
    )


class TierDied(RuntimeError):
    """A tier ended while the stack was starting."""

    def __init__(self, tier: Tier) -> None:
        super().__init__(tier.role)
        self.tier = tier


def _wait_ready(tier: Tier, deadline: float, scheme: str, tls: ssl.SSLContext | None) -> None:
    url = f"{scheme}://127.0.0.1:{tier.port}/readyz"
    while time.monotonic() < deadline:
        if tier.proc.poll() is not None:
            raise TierDied(tier)
        # `url` is our own 127.0.0.1 readiness URL, never user input.
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(url, timeout=2, context=tls) as resp,  # noqa: S310
        ):
            if resp.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the {tier.role} tier ({url}) was not ready within {READY_TIMEOUT:.0f} s")


def _tls_configs(data: Path) -> tuple[dict[str, str], ssl.SSLContext]:
    """`up --tls`: a development CA and a certificate per node (edge.http.devca), and each
    node's TOML: TLS on its listener, its upstream verified against the CA (and this
    node's certificate presented to it, ready for a tier that sets `[tls] client_ca`).
    Returns the TOML per role and a client context trusting the CA."""
    from nearvoice.edge.http import devca

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
    mint_from_env = _secret(env, MINT_TOKEN_ENV, data / "mint-token", secrets.token_urlsafe(24))
    scheme = "https" if tls else "http"
    edge, shield, origin = (f"{scheme}://127.0.0.1:{base_port + i}" for i in range(3))
    tomls, client_tls = _tls_configs(data) if tls else ({}, None)
    origin_config = data / "origin.toml"
    origin_config.write_text(
        f'role = "origin"\n[origin]\npublic_base = "{edge}"\npush_edges = ["{edge}"]\n'
        f'store = "{(data / "origin" / "objects").resolve()}"\n' + tomls.get("origin", "")
    )
    for role in ("shield", "edge"):
        (data / f"{role}.toml").write_text(tomls.get(role, ""))
    nodes = [
        ("origin", base_port + 2, ["--config", str(origin_config)]),
        ("shield", base_port + 1, ["--upstream", origin, "--config", str(data / "shield.toml")]),
        ("edge", base_port, ["--upstream", shield, "--config", str(data / "edge.toml")]),
    ]
    tiers: list[Tier] = []
    stopping = False

    def stop(_signum: int = 0, _frame: FrameType | None = None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    died: Tier | None = None
    try:
        for role, port, extra in nodes:
            cmd = [
                sys.executable, "-m", "nearvoice.edge.cli", role, "--port", str(port),
                "--data-dir", str(data / role), *extra,
            ]  # fmt: skip
            tier = Tier(role, port, subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE))
            tier.start_relay()
            tiers.append(tier)
        deadline = time.monotonic() + READY_TIMEOUT
        for tier in tiers:
            _wait_ready(tier, deadline, scheme, client_tls)
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
        print(banner(data, (edge, shield, origin), sample, mint_from_env, tls), flush=True)
        died = watch(tiers, lambda: stopping)
        return 0 if died is None else 1
    except TierDied as exc:
        died = exc.tier
        return 1
    except RuntimeError as exc:
        print(f"nearvoice up: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_processes(
            [t.proc for t in reversed(tiers)]
        )  # edge first: it stops taking players first
        if died is not None:
            # Last, after the others' shutdown logs, so it is what the operator sees.
            print(f"nearvoice up: {died.death()}; the stack was stopped", file=sys.stderr)


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
