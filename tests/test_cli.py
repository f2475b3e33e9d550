"""The `nearvoice` command line (docs/contracts.md#command-line): keygen, sign, and a real edge
process answering a signed Range request, then stopping cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qsl, quote, quote_plus, urlsplit

import aiohttp
import pytest
import soundfile

from nearvoice.edge import cli
from nearvoice.edge.errors import Forbidden
from nearvoice.edge.keyring import KEYS_ENV, Keyring
from nearvoice.edge.policy import Policy
from nearvoice.edge.spec import normalize_text
from nearvoice.edge.token import Grant, verify
from tests.support import KID, SECRET, wait_process_ready

REPO = Path(__file__).resolve().parent.parent
KEYS = f"{KID}:{SECRET}"
BASE = "http://edge.example:8080"
TEXT = "Hello,   listener\tfrom the CLI."
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


def run_cli(*args: str, keys: str | None = KEYS) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != KEYS_ENV}
    if keys is not None:
        env[KEYS_ENV] = keys
    return subprocess.run(
        [sys.executable, "-m", "nearvoice.edge.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def sign_args(*extra: str, text: str = TEXT) -> list[str]:
    return ["sign", "--base", BASE, "--text", text, "--voice", "heart", *extra]


def verify_url(url: str, *, client_ip: str | None = "127.0.0.1") -> Grant:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    key = parts.path.rsplit("/", 1)[1].split(".", 1)[0]
    return verify(
        Keyring.parse(KEYS), parts.path, key, query, client_ip=client_ip, now=time.time(), skew=0
    )


# -- keygen -------------------------------------------------------------------------------


@pytest.mark.slow
def test_keygen_prints_a_pair_the_keyring_accepts() -> None:
    done = run_cli("keygen", keys=None)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1
    kid, _, secret = lines[0].partition(":")
    keyring = Keyring.parse(lines[0])
    assert keyring.kids == [kid]
    assert secret


def test_keygen_pairs_differ(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["keygen"]) == 0
    assert cli.main(["keygen"]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first != second
    Keyring.parse(f"{first},{second}")


# -- sign ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_sign_prints_exactly_one_url() -> None:
    done = run_cli(*sign_args())
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("\n")
    lines = done.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"{BASE}/v1/speech/")


def test_signed_url_verifies_with_the_keyring(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(KEYS_ENV, KEYS)
    assert cli.main(sign_args()) == 0
    out = capsys.readouterr()
    assert out.err == ""
    grant = verify_url(out.out.strip())
    assert grant.spec.text == normalize_text(TEXT)
    assert grant.spec.voice == "heart"
    assert grant.spec.format.value == "wav"
    assert grant.spec.speed == 1.0
    assert grant.policy is Policy.HOT
    assert grant.network is None


def _sign_in_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *extra: str
) -> str:
    monkeypatch.setenv(KEYS_ENV, KEYS)
    assert cli.main(sign_args(*extra)) == 0
    return capsys.readouterr().out.strip()


@pytest.mark.parametrize("fmt", ["wav", "mp3", "opus", "flac", "pcm"])
def test_sign_honours_format(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    url = _sign_in_process(monkeypatch, capsys, "--format", fmt)
    assert urlsplit(url).path.endswith(f".{fmt}")
    assert verify_url(url).spec.format.value == fmt


@pytest.mark.parametrize("policy", ["hot", "personal", "draft"])
def test_sign_honours_policy(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], policy: str
) -> None:
    url = _sign_in_process(monkeypatch, capsys, "--policy", policy)
    assert verify_url(url).policy.value == policy


def test_sign_honours_ttl(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = int(time.time())
    url = _sign_in_process(monkeypatch, capsys, "--ttl", "120")
    after = int(time.time())
    expires = verify_url(url).expires
    assert before + 120 <= expires <= after + 120


def test_sign_honours_ip(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _sign_in_process(monkeypatch, capsys, "--ip", "192.0.2.0/24")
    grant = verify_url(url, client_ip="192.0.2.7")
    assert str(grant.network) == "192.0.2.0/24"
    with pytest.raises(Forbidden, match="another client address"):
        verify_url(url, client_ip="127.0.0.1")


def test_sign_honours_speed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _sign_in_process(monkeypatch, capsys, "--speed", "1.254")
    assert verify_url(url).spec.speed == 1.25


def test_text_is_not_in_the_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret_text = "Zebra quartz vocabulary"
    url = _sign_in_process(monkeypatch, capsys, "--text", secret_text)
    for form in (secret_text, quote(secret_text), quote_plus(secret_text)):
        assert form not in url
    for word in secret_text.split():
        assert word.lower() not in url.lower()


@pytest.mark.slow
def test_sign_without_keys_exits_2() -> None:
    done = run_cli(*sign_args(), keys=None)
    assert done.returncode == 2
    assert done.stdout == ""
    assert KEYS_ENV in done.stderr


@pytest.mark.slow
def test_sign_with_an_unknown_voice_exits_2_listing_voices() -> None:
    done = run_cli("sign", "--base", BASE, "--text", "Hi.", "--voice", "nobody")
    assert done.returncode == 2
    assert done.stdout == ""
    assert "nobody" in done.stderr
    assert "heart" in done.stderr


@pytest.mark.parametrize(
    "extra",
    [("--ttl", "0"), ("--speed", "9"), ("--ip", "not-an-ip")],
    ids=["ttl", "speed", "ip"],
)
def test_sign_with_bad_options_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], extra: tuple[str, str]
) -> None:
    monkeypatch.setenv(KEYS_ENV, KEYS)
    assert cli.main(sign_args(*extra)) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith("nearvoice: ")


# -- a real edge process ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _sign_with_cli(base: str, text: str) -> str:
    env = {**os.environ, KEYS_ENV: KEYS}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nearvoice.edge.cli",
        *sign_args(text=text),
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode().strip().replace(BASE, base, 1)


@pytest.mark.slow
async def test_edge_process_serves_a_signed_range_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, KEYS_ENV: KEYS}
    log_path = tmp_path / "edge.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "nearvoice.edge.cli",
            "edge",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "data"),
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        url = await _sign_with_cli(base, "Served by a real edge.")
        assert url.startswith(f"{base}/v1/speech/")
        async with aiohttp.ClientSession() as session:
            await wait_process_ready(session, base, proc, START_TIMEOUT)
            async with session.get(url, headers={"Range": "bytes=0-1023"}) as resp:
                assert resp.status == 206
                part = await resp.read()
                content_range = resp.headers["Content-Range"]
                assert resp.headers["Content-Type"] == "audio/wav"
            async with session.get(url) as resp:
                assert resp.status == 200
                whole = await resp.read()
            async with session.get(url, headers={"Range": "bytes=0-1023"}) as resp:
                assert resp.status == 206
                cached_range = resp.headers["Content-Range"]
        # The first answer came while rendering, with the length the duration pass
        # announced; the second from the cache, with the same length.
        assert content_range == f"bytes 0-1023/{len(whole)}"
        assert cached_range == f"bytes 0-1023/{len(whole)}"
        assert part == whole[:1024]
        info = soundfile.info(io.BytesIO(whole))
        assert info.samplerate == 24000
        assert info.frames > 0

        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    output = log_path.read_text(errors="replace")
    assert code == 0, output
    assert "Traceback" not in output, output
