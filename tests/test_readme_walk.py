"""The README's walk through expressive speech, run as written, so that it cannot rot.

The block after `<!-- walk: expressive` in README.md starts the IndexTTS2 stand-in
(tests/indextts2_server.py) and the three tiers, registers a clip, mints a cloned line
with an emotion and a duration, plays it from the edge, greps the `capability` counters,
renders a dubbing line fitted to 2.40 s and deletes the voice. It runs here in bash,
word for word, with two changes only: its four ports are swapped for free ones (other
runs may hold 8080-8082), and it runs in a scratch directory whose `.venv` is this
interpreter's environment (the repository is on PYTHONPATH, for `python -m tests...`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nearvoice.edge.config import ADMIN_TOKEN_ENV, MINT_TOKEN_ENV
from nearvoice.edge.keyring import KEYS_ENV
from tests.test_stack import free_port_run

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
MARKER = "<!-- walk: expressive"
PORTS = ("8080", "8081", "8082", "9880")  # edge, shield, origin, the stand-in
WALK_TIMEOUT = 600.0  # seconds for the whole walk on a small, shared CPU
STOP_TIMEOUT = 30.0  # seconds the walk's processes get to exit after it ends


def walk_block() -> str:
    text = (REPO / "README.md").read_text()
    found = re.compile(r"```sh\n(.*?)```", re.S).search(text, text.index(MARKER))
    assert found is not None, "no sh block after the walk's marker"
    return found.group(1)


def on_free_ports(script: str) -> tuple[str, dict[str, int]]:
    base = free_port_run(4)
    ports = {old: base + i for i, old in enumerate(PORTS)}
    for old in PORTS:
        assert re.search(rf"\b{old}\b", script), f"the walk no longer uses port {old}"
    # A node left on its role's default port could not be moved.
    for line in re.findall(r"^nearvoice (?:edge|shield|origin) .*$", script, re.M):
        assert "--port " in line, line
    swapped = re.sub(r"\b(8080|8081|8082|9880)\b", lambda m: str(ports[m.group(1)]), script)
    return swapped, ports


def group_is_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def stop_group(pgid: int) -> None:
    """SIGTERM to every process the walk left, then SIGKILL to what outlasts STOP_TIMEOUT."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while not group_is_gone(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def test_the_readme_walk_through_expressive_speech_works_as_written(tmp_path: Path) -> None:
    script, ports = on_free_ports(walk_block())
    (tmp_path / ".venv").symlink_to(sys.prefix)
    # `wait`: the walk's last line stops its background processes; let them finish.
    (tmp_path / "walk.sh").write_text(script + "\nwait\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEARVOICE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    assert not {KEYS_ENV, MINT_TOKEN_ENV, ADMIN_TOKEN_ENV} & set(env)
    proc = subprocess.Popen(
        ["bash", "-e", "-o", "pipefail", "walk.sh"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: everything it starts, stopped below
    )
    try:
        out, err = proc.communicate(timeout=WALK_TIMEOUT)
    except subprocess.TimeoutExpired:
        stop_group(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"the walk did not end in {WALK_TIMEOUT:.0f} s:\n{out}\n{err[-4000:]}")
    finally:
        stop_group(proc.pid)
    assert proc.returncode == 0, f"{out}\n{err[-4000:]}"

    # 3. the cloned line played, and the edge and the shield sent it upstream as capability
    capability = 'nearvoice_upstream_requests_total{reason="capability"} 1.0'
    assert out.count(capability) == 2, out
    durations = [float(x) for x in re.findall(r"^duration=([0-9.]+)$", out, re.M)]
    assert len(durations) == 2, out
    cloned, dubbed = durations
    assert cloned > 0
    # 4. the dubbing line lasts 2.40 s within 2 % (heart's fit, docs/contracts.md#spec-and-key)
    assert abs(dubbed - 2.4) <= 0.02 * 2.4, dubbed
    # 5. the deletion purged the edge, and the line answers 410 unknown_ref through it
    deleted = json.loads(next(line for line in out.splitlines() if '"deleted": true' in line))
    assert deleted["edges"] == {f"http://127.0.0.1:{ports['8080']}": 200}
    assert len(deleted["purged"]) >= 1
    last = out.rstrip().splitlines()[-1]
    assert last.endswith(" 410"), out
    assert json.loads(last.removesuffix(" 410"))["error"] == "unknown_ref"
