"""The wheel is the software: built from this checkout, installed (not editable) into a
fresh virtual environment, and run from a directory where the checkout is not importable,
it serves, shows its configuration and its demo page, and every module it runs is the
wheel's copy.

The fresh environment gets its dependencies from the interpreter running the tests (the
wheel goes in with --no-deps: nothing is downloaded). That interpreter is itself a venv
with an editable install of a checkout, so `--system-site-packages` would not help (it
names the base interpreter, which lacks the dependencies), and exposing that venv through
`site.addsitedir` would run its editable finder. Instead a `.pth` file in the new venv
names the shared site-packages as a plain path: after the venv's own site-packages, and
without processing the `.pth` files in it, so no editable finder is installed. The child
processes get no PYTHONPATH and start in a scratch directory; `nearvoice.edge.__file__`
proves which copy ran.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import aiohttp
import pytest
import soundfile

from nearvoice.edge.keyring import KEYS_ENV
from tests.support import KID, SECRET, wait_process_ready

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 120.0
STOP_TIMEOUT = 15.0


def _sources(into: Path) -> None:
    """The checkout's files as git sees them (tracked, and untracked but not ignored),
    copied with their symlinks, so the build writes nothing into the checkout."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        source = REPO / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the work tree, not yet in the index
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)


def _env(data: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "NEARVOICE_"))}
    return {**env, KEYS_ENV: f"{KID}:{SECRET}", "HOME": str(data)}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("build")
    source = work / "src"
    _sources(source)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
         "-q", "-w", str(work / "dist")],
        cwd=source,
        check=True,
        env=_env(work),
    )  # fmt: skip
    (built,) = (work / "dist").glob("nearvoice-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel; returns its bin/ directory."""
    root = tmp_path_factory.mktemp("venv")
    venv.create(root, with_pip=False, symlinks=True)
    python = root / "bin" / "python"
    # pip runs on the new interpreter (--python), which sees only its own site-packages
    # yet: nothing there is "already satisfied" and nothing outside it is touched.
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
         "--no-index", str(wheel)],
        check=True,
        env=_env(root),
    )  # fmt: skip
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    shared = [p for p in site.getsitepackages() if Path(p).is_dir()]
    assert sysconfig.get_path("purelib") in shared
    (Path(purelib) / "zz_shared_dependencies.pth").write_text("\n".join(shared) + "\n")
    return root / "bin"


def test_the_wheel_holds_the_package_its_data_and_nothing_else(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    (info,) = tops - {"nearvoice"}  # no top-level edge, origin, export, bench or tests
    assert info.startswith("nearvoice-") and info.endswith(".dist-info")
    for role in ("edge", "shield", "origin"):
        assert f"nearvoice/configs/{role}.toml" in names
    assert "nearvoice/edge/static/demo.html" in names
    for package in ("edge", "origin", "export", "bench"):
        assert f"nearvoice/{package}/__init__.py" in names
    assert "nearvoice/edge/cli.py" in names and "nearvoice/bench/report.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "nearvoice = nearvoice.edge.cli:main" in text


def test_the_installed_wheel_runs_its_own_copy(installed: Path, tmp_path: Path) -> None:
    where = subprocess.run(
        [str(installed / "python"), "-c",
         "import json, importlib.metadata as m, nearvoice, nearvoice.edge as e, "
         "nearvoice.bench.report as r; print(json.dumps([e.__file__, r.__file__, "
         "str(m.distribution('nearvoice').locate_file('')), nearvoice.__version__]))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env=_env(tmp_path),
    ).stdout  # fmt: skip
    edge_file, report_file, dist, version = json.loads(where)
    venv_root = installed.parent.resolve()
    for path in (edge_file, report_file, dist):
        assert Path(path).resolve().is_relative_to(venv_root), path
        assert not Path(path).resolve().is_relative_to(REPO), path
    assert version != "0+unknown"


def test_config_show_reads_the_packaged_defaults(installed: Path, tmp_path: Path) -> None:
    shown = subprocess.run(
        [str(installed / "nearvoice"), "config", "show", "--role", "edge"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env=_env(tmp_path),
    ).stdout
    assert 'role = "edge"' in shown and "port = 8080" in shown
    assert SECRET not in shown and f"{KID}:********" in shown


async def test_the_installed_edge_serves(installed: Path, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    base = f"http://127.0.0.1:{port}"
    env = _env(tmp_path)
    log_path = tmp_path / "edge.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            str(installed / "nearvoice"), "edge", "--port", str(port),
            "--data-dir", str(tmp_path / "data"),
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        sign = await asyncio.create_subprocess_exec(
            str(installed / "nearvoice"), "sign", "--base", base, "--voice", "heart",
            "--text", "Installed from a wheel.",
            cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        url = (await sign.communicate())[0].decode().strip()
        assert sign.returncode == 0 and url.startswith(f"{base}/v1/speech/")
        async with aiohttp.ClientSession() as session:
            await wait_process_ready(session, base, proc, START_TIMEOUT)
            async with session.get(f"{base}/healthz") as resp:
                assert resp.status == 200
            async with session.get(f"{base}/demo") as resp:
                assert resp.status == 200
                page = await resp.read()
            async with session.get(url) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"] == "audio/wav"
                body = await resp.read()
        (installed_page,) = installed.parent.rglob("nearvoice/edge/static/demo.html")
        assert page == installed_page.read_bytes()  # package data, read from the venv
        assert soundfile.info(io.BytesIO(body)).frames > 0
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), STOP_TIMEOUT) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert "Traceback" not in log_path.read_text(errors="replace")
