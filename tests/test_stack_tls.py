"""`nearvoice up --tls`: the three tiers over TLS with a development CA, every hop
verified: a URL minted at the origin over https plays at the edge over https, fetched
edge -> shield -> origin with certificates checked and node signatures bound to each
https upstream."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from nearvoice.edge.config import ADMIN_TOKEN_ENV, MINT_TOKEN_ENV
from nearvoice.edge.keyring import KEYS_ENV
from tests.test_stack import (
    REPO,
    REQUEST_TIMEOUT,
    START_TIMEOUT,
    children_of,
    free_port_run,
    kill_pid,
    stop_process,
)

pytestmark = pytest.mark.slow


def _https(url: str, ca: Path, body: bytes | None = None, token: str = "") -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method="POST" if body else "GET")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT, context=context) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    where = tmp_path_factory.mktemp("up-tls")
    data = where / "data"
    base_port = free_port_run()
    env = {
        k: v for k, v in os.environ.items() if k not in (KEYS_ENV, ADMIN_TOKEN_ENV, MINT_TOKEN_ENV)
    }
    stdout = where / "stdout.log"
    with stdout.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nearvoice.edge.cli", "up", "--tls", "--data-dir", str(data),
             "--base-port", str(base_port)],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    children: list[int] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while "stack is up" not in stdout.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"nearvoice up --tls did not come up:\n{stdout.read_text()[-4000:]}")
            time.sleep(0.2)
        children = children_of(proc.pid)
        yield data, base_port
    finally:
        stop_process(proc, signal.SIGINT)
        for pid in children:
            kill_pid(pid)


def test_a_minted_url_plays_at_the_edge_through_tls_tiers(tls_stack: tuple[Path, int]) -> None:
    data, base_port = tls_stack
    ca = data / "tls" / "ca.pem"
    token = (data / "mint-token").read_text().strip()
    body = json.dumps({"text": "Over TLS, tier by tier.", "voice": "joe"}).encode()
    status, minted = _https(f"https://127.0.0.1:{base_port + 2}/v1/speech", ca, body, token)
    assert status == 201, minted
    url = json.loads(minted)["url"]
    assert url.startswith(f"https://127.0.0.1:{base_port}/")
    status, audio = _https(url, ca)
    assert status == 200
    assert audio[:4] == b"RIFF"
    with pytest.raises(OSError):  # plain HTTP on a TLS listener gets no answer
        urllib.request.urlopen(url.replace("https://", "http://"), timeout=10)
