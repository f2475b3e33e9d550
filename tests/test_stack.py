"""The origin and shield tier as real processes on loopback.

1. `nearvoice up`: edge on N, shield on N+1, origin on N+2, with the secrets generated into
   the data directory; a URL minted at the origin plays at the edge; Ctrl-C (SIGINT) stops
   all of it.
2. Faults, with origin, shield and edge started as separate `python -m nearvoice.edge.cli <role>`
   processes: a dead origin (SIGKILL) leaves cached objects and local renders working and
   turns other misses into quick JSON errors; with two shields, a key whose home shield is
   dead is served through the other one.
3. An origin whose persistent store is full (a 64 KiB tmpfs) still streams every byte to
   the player, counts the store error and logs it.

Processes are started by class-scoped fixtures that do the scenario's action once; the
tests then check one behaviour each. Every child is stopped (and killed if it must be) in
the fixture's teardown. HTTP is plain urllib: nothing here needs an event loop.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import soundfile

from nearvoice.edge.config import ADMIN_TOKEN_ENV
from nearvoice.edge.keyring import KEYS_ENV, Keyring
from nearvoice.edge.policy import Policy
from nearvoice.edge.spec import Spec
from nearvoice.edge.synth.piper_engine import piper_model_id
from nearvoice.edge.upstream import CHECKSUM_HEADER, rendezvous_order
from nearvoice.origin.mint import MINT_TOKEN_ENV
from nearvoice.origin.store import FilesystemStore
from tests.support import KID, SECRET, make_keyring, make_spec, metric_from, sign

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
KEYRING = make_keyring()
START_TIMEOUT = 240.0  # seconds for a node (or the whole stack) to warm its engines
STOP_TIMEOUT = 30.0  # seconds a stopped process gets to exit
REQUEST_TIMEOUT = 120.0  # seconds for one request that renders on a small CPU
CONNECT_TIMEOUT = 0.5  # the edge's [upstream] connect_timeout in the fault tests
FIRST_BYTE_TIMEOUT = 5.0  # the edge's [upstream] first_byte_timeout in the fault tests
STORE_SIZE = 64 * 1024  # bytes of the origin's tiny persistent store
PORT_RANGE = (20000, 32000)  # below Linux's default ephemeral range (32768..60999)
START_TRIES = 5  # a node whose port was taken after all is started again on another
_CASES = itertools.count(1)

# Plain urllib, never through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# -- helpers ------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(
    url: str,
    *,
    method: str = "GET",
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = REQUEST_TIMEOUT,
) -> Answer:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with _OPENER.open(request, timeout=timeout) as resp:
            return Answer(resp.status, dict(resp.headers.items()), resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return Answer(exc.code, dict(exc.headers.items()), exc.read())


def settled(url: str) -> None:
    """Returns once the node at `url` has finished producing the object: a body of known
    length reaches its client before the commit that follows, and a HEAD once every byte
    exists waits for that commit (edge.http.stream) and, through the tiers' own checksum
    HEADs, for the tiers above."""
    answer = http(url, method="HEAD")
    assert answer.status == 200, answer.status
    assert CHECKSUM_HEADER in answer.headers  # an answer about the complete object


def metrics(base: str) -> str:
    answer = http(f"{base}/metrics", timeout=10)
    assert answer.status == 200
    return answer.body.decode()


def delta(before: str, after: str, sample: str, **labels: str) -> float:
    return metric_from(after, sample, **labels) - metric_from(before, sample, **labels)


def port_is_free(port: int) -> bool:
    """Whether a new listener could bind `port` (SO_REUSEADDR: TIME_WAIT does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port_run(count: int = 3) -> int:
    """A port N such that N .. N+count-1 are all free right now. Ports are drawn below
    the kernel's ephemeral range, so no process that binds port 0 (other test runs, their
    nodes) can take one between this check and our node's bind."""
    rng = random.Random()
    low, high = PORT_RANGE
    for _ in range(500):
        base = rng.randrange(low, high - count)
        if all(port_is_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("found no run of free ports")


def free_port() -> int:
    return free_port_run(1)


def wav(body: bytes) -> tuple[int, int]:
    """(sample rate, frames) of a WAV body; soundfile raises if it cannot decode it."""
    audio, rate = soundfile.read(io.BytesIO(body))
    return int(rate), len(audio)


def joe(text: str = "Joe reads this line at the origin.") -> Spec:
    """A joe spec (rendered at the origin only) with a key no other test uses."""
    return make_spec(f"{text} Case {next(_CASES)}.", voice="joe", model=piper_model_id("joe"))


def heart(text: str = "Heart renders this line at the edge.") -> Spec:
    return make_spec(f"{text} Case {next(_CASES)}.")


def children_of(pid: int) -> list[int]:
    """Ids of the live processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) is in parentheses and may hold spaces.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def is_our_node(pid: int) -> bool:
    """Whether `pid` is still a live (not zombie) `edge.cli` process."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return b"edge.cli" in cmdline and state != "Z"


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Asks `proc` to stop, and kills it when it does not within STOP_TIMEOUT."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def kill_pid(pid: int) -> None:
    if is_our_node(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class NodeProcess:
    role: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: the node dies at once, without any shutdown."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        stop_process(self.proc)


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, KEYS_ENV: f"{KID}:{SECRET}"}
    for name in (ADMIN_TOKEN_ENV, MINT_TOKEN_ENV):
        env.pop(name, None)
    return {**env, **(extra or {})}


def start_node(
    role: str,
    where: Path,
    *,
    upstreams: Sequence[str] = (),
    config: str | None = None,
    name: str | None = None,
    preexec: Any = None,
    env: dict[str, str] | None = None,
    port: int | None = None,
) -> NodeProcess:
    """Starts `python -m nearvoice.edge.cli <role>` on a free port with its data under `where`, and
    waits until it listens (its engines may still be warming up). A node that lost its
    port to another process meanwhile is started again on another port, unless `port`
    fixed it (other nodes' settings name it). `env` adds to the node's environment."""
    name = name or role
    (where / name).mkdir(parents=True, exist_ok=True)
    extra: list[str] = []
    for upstream in upstreams:
        extra += ["--upstream", upstream]
    if config is not None:
        path = where / name / "node.toml"
        path.write_text(config)
        extra += ["--config", str(path)]
    fixed = port
    for attempt in range(START_TRIES if fixed is None else 1):
        port = fixed or free_port()
        argv = [
            sys.executable, "-m", "nearvoice.edge.cli", role,
            "--port", str(port), "--data-dir", str(where / name / "data"), *extra,
        ]  # fmt: skip
        log = where / name / f"node-{attempt}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env=node_env(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=preexec,  # only set for the RLIMIT fallback
            )
        node = NodeProcess(role, port, proc, log)
        if wait_listening(node):
            return node
        if "address already in use" not in node.output().lower():
            pytest.fail(f"{role} exited with {proc.returncode} during start-up:\n{node.output()}")
    pytest.fail(f"{role} found no free port in {START_TRIES if fixed is None else 1} tries")


def wait_listening(node: NodeProcess, limit: float = START_TIMEOUT) -> bool:
    """True once `node` answers /healthz; False if it exits first."""
    deadline = time.monotonic() + limit
    while node.proc.poll() is None:
        with contextlib.suppress(OSError):
            if http(f"{node.base}/healthz", timeout=2).status == 200:
                return True
        if time.monotonic() > deadline:
            node.kill()
            pytest.fail(f"{node.role} did not listen in {limit:.0f} s:\n{node.output()[-4000:]}")
        time.sleep(0.1)
    node.proc.wait()
    return False


def wait_ready(*nodes: NodeProcess, limit: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + limit
    for node in nodes:
        while True:
            if node.proc.poll() is not None:
                pytest.fail(
                    f"{node.role} exited with {node.proc.returncode} during start-up:\n"
                    f"{node.output()[-4000:]}"
                )
            with contextlib.suppress(OSError):
                if http(f"{node.base}/readyz", timeout=2).status == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"{node.role} was not ready in {limit:.0f} s:\n{node.output()[-4000:]}")
            time.sleep(0.2)


@contextlib.contextmanager
def running(nodes: list[NodeProcess]) -> Iterator[list[NodeProcess]]:
    """Stops every node in `nodes` (edge first) when the block ends, however it ends."""
    try:
        yield nodes
    finally:
        for node in reversed(nodes):
            node.stop()


def origin_config(public_base: str, store: Path) -> str:
    return (
        f'[origin]\npublic_base = "{public_base}"\nstore = "{store}"\n\n'
        "[synth]\nworkers = 1\n"  # one inference thread: a quicker warm-up on a small CPU
    )


EDGE_CONFIG = (
    f"[upstream]\nconnect_timeout = {CONNECT_TIMEOUT}\n"
    f"first_byte_timeout = {FIRST_BYTE_TIMEOUT}\n\n"
    "[synth]\nworkers = 1\n"
)


# -- 1. nearvoice up ----------------------------------------------------------------------


@dataclass
class Stack:
    proc: subprocess.Popen[bytes]
    data: Path
    base_port: int
    stdout: Path
    stderr: Path
    children: list[int] = field(default_factory=list)

    @property
    def edge(self) -> str:
        return f"http://127.0.0.1:{self.base_port}"

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.base_port + 2}"

    @property
    def ports(self) -> list[int]:
        return [self.base_port + i for i in range(3)]

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")

    def mint(self, body: dict[str, Any]) -> dict[str, Any]:
        token = (self.data / "mint-token").read_text().strip()
        answer = http(
            f"{self.origin}/v1/speech",
            method="POST",
            body=body,
            headers={"Authorization": f"Bearer {token}"},
        )
        assert answer.status == 201, answer.body
        minted = answer.json()
        assert isinstance(minted, dict)
        return minted


def wait_for_line(stack: Stack, line: str, limit: float) -> None:
    deadline = time.monotonic() + limit
    while line not in stack.stdout.read_text(errors="replace"):
        if stack.proc.poll() is not None:
            pytest.fail(f"nearvoice up exited with {stack.proc.returncode}:\n{stack.output()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {line!r} within {limit:.0f} s:\n{stack.output()[-4000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="class")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`nearvoice up` with no secrets in its environment, up and printed ready."""
    where = tmp_path_factory.mktemp("up")
    data = where / "data"
    base_port = free_port_run()
    env = {
        k: v for k, v in os.environ.items() if k not in (KEYS_ENV, ADMIN_TOKEN_ENV, MINT_TOKEN_ENV)
    }
    stdout, stderr = where / "stdout.log", where / "stderr.log"
    argv = [
        sys.executable, "-m", "nearvoice.edge.cli", "up",
        "--data-dir", str(data), "--base-port", str(base_port),
    ]  # fmt: skip
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err
        )
    stack = Stack(proc, data, base_port, stdout, stderr)
    try:
        wait_for_line(stack, "stack is up", START_TIMEOUT)
        stack.children = children_of(proc.pid)
        yield stack
    finally:
        children = stack.children or children_of(proc.pid)
        stop_process(proc, signal.SIGINT)
        for pid in children:
            kill_pid(pid)


class TestUp:
    """`nearvoice up` in a data directory with no secrets in the environment."""

    def test_up_generates_secrets_into_the_data_dir(self, stack: Stack) -> None:
        for name in ("keys", "admin-token", "mint-token"):
            path = stack.data / name
            assert path.read_text().strip(), name
            assert path.stat().st_mode & 0o777 == 0o600, name
        Keyring.parse((stack.data / "keys").read_text().strip())

    def test_up_runs_three_node_processes(self, stack: Stack) -> None:
        assert len(stack.children) == 3
        for port in stack.ports:
            assert http(f"http://127.0.0.1:{port}/readyz", timeout=5).status == 200

    def test_up_nodes_use_the_generated_admin_token(self, stack: Stack) -> None:
        token = (stack.data / "admin-token").read_text().strip()
        answer = http(f"{stack.edge}/admin/stats", headers={"Authorization": f"Bearer {token}"})
        assert answer.status == 200
        assert answer.json()["role"] == "edge"

    def test_up_minted_joe_url_plays_at_the_edge_through_the_tiers(self, stack: Stack) -> None:
        minted = stack.mint(
            {"text": f"Minted at the origin. Case {next(_CASES)}.", "voice": "joe", "format": "wav"}
        )
        assert minted["url"].startswith(f"{stack.edge}/v1/speech/{minted['key']}.wav?")
        before = metrics(stack.edge)
        answer = http(minted["url"])
        after = metrics(stack.edge)
        assert answer.status == 200, answer.body[:300]
        assert answer.headers["Content-Type"] == "audio/wav"
        rate, frames = wav(answer.body)
        assert rate == 22050
        assert frames > 0
        assert delta(before, after, "nearvoice_upstream_requests_total", reason="no_engine") == 1

    def test_up_second_get_of_a_minted_url_is_a_hit(self, stack: Stack) -> None:
        minted = stack.mint(
            {"text": f"Asked for twice. Case {next(_CASES)}.", "voice": "joe", "format": "wav"}
        )
        first = http(minted["url"])
        assert first.status == 200
        settled(minted["url"])
        before = metrics(stack.edge)
        second = http(minted["url"])
        after = metrics(stack.edge)
        assert second.status == 200
        assert second.body == first.body
        assert delta(before, after, "nearvoice_requests_total", result="hit") == 1
        assert delta(before, after, "nearvoice_upstream_requests_total", reason="no_engine") == 0

    def test_up_a_line_fitted_to_its_duration_plays_through_the_tiers(self, stack: Stack) -> None:
        text = f"A dubbed line, fitted at the origin. Case {next(_CASES)}."
        minted = stack.mint({"text": text, "voice": "joe", "format": "wav", "duration": 2.4})
        answer = http(minted["url"])
        assert answer.status == 200, answer.body[:300]
        rate, frames = wav(answer.body)
        assert abs(frames / rate - 2.4) <= max(0.02 * 2.4, 256 / rate)
        token = (stack.data / "mint-token").read_text().strip()
        far = http(
            f"{stack.origin}/v1/speech",
            method="POST",
            body={"text": text, "voice": "joe", "duration": 30.0},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert far.status == 400 and far.json()["error"] == "duration_out_of_range"

    def test_up_stops_cleanly_on_sigint(self, stack: Stack) -> None:
        """Runs last in this class: it stops the stack the tests above use."""
        children = list(stack.children)
        assert children
        stack.proc.send_signal(signal.SIGINT)
        try:
            code = stack.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"nearvoice up did not exit within {STOP_TIMEOUT:.0f} s of SIGINT")
        assert code == 0, stack.output()[-4000:]
        assert [pid for pid in children if is_our_node(pid)] == []
        assert [port for port in stack.ports if not port_is_free(port)] == []


# -- 2a. a dead origin ----------------------------------------------------------------------


@dataclass
class DeadOrigin:
    edge: NodeProcess
    shield: NodeProcess
    origin: NodeProcess
    cached_url: str
    cached_body: bytes
    cached_key: str
    store: Path


@pytest.fixture(scope="class")
def dead_origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeadOrigin]:
    """origin <- shield <- edge as processes; one joe object is cached at the edge, then
    the origin is killed with SIGKILL."""
    where = tmp_path_factory.mktemp("dead-origin")
    store = where / "objects"
    nodes: list[NodeProcess] = []
    with running(nodes):
        origin = start_node("origin", where, config=origin_config("http://127.0.0.1:1", store))
        nodes.append(origin)
        shield = start_node("shield", where, upstreams=[origin.base])
        nodes.append(shield)
        edge = start_node("edge", where, upstreams=[shield.base], config=EDGE_CONFIG)
        nodes.append(edge)
        wait_ready(origin, shield, edge)
        spec = joe("Cached before the origin died.")
        url = edge.base + sign(KEYRING, spec)
        warm = http(url)
        assert warm.status == 200, warm.body[:300]
        settled(url)
        origin.kill()
        assert origin.proc.returncode == -signal.SIGKILL
        yield DeadOrigin(edge, shield, origin, url, warm.body, spec.key, store)


class TestDeadOrigin:
    """origin <- shield <- edge, after the origin was killed with SIGKILL."""

    def test_origin_kept_its_render_in_the_persistent_store(self, dead_origin: DeadOrigin) -> None:
        """Every render is kept for good: the dead origin's store still holds the object, whole."""
        found = FilesystemStore(dead_origin.store).get(dead_origin.cached_key)
        assert found is not None
        meta, body = found
        assert body == dead_origin.cached_body
        assert meta.content_type == "audio/wav"

    def test_cached_object_still_plays_after_the_origin_dies(self, dead_origin: DeadOrigin) -> None:
        before = metrics(dead_origin.edge.base)
        answer = http(dead_origin.cached_url)
        after = metrics(dead_origin.edge.base)
        assert answer.status == 200
        assert answer.body == dead_origin.cached_body
        assert delta(before, after, "nearvoice_requests_total", result="hit") == 1

    def test_heart_miss_still_renders_at_the_edge_after_the_origin_dies(
        self,
        dead_origin: DeadOrigin,
    ) -> None:
        edge = dead_origin.edge.base
        before = metrics(edge)
        answer = http(edge + sign(KEYRING, heart()))
        after = metrics(edge)
        assert answer.status == 200, answer.body[:300]
        rate, frames = wav(answer.body)
        assert rate == 24000 and frames > 0
        assert delta(before, after, "nearvoice_synth_total", engine="hibari") == 1
        for reason in ("no_engine", "overload", "queue", "engine_error"):
            assert delta(before, after, "nearvoice_upstream_requests_total", reason=reason) == 0

    def test_joe_miss_is_a_quick_json_error_after_the_origin_dies(
        self, dead_origin: DeadOrigin
    ) -> None:
        url = dead_origin.edge.base + sign(KEYRING, joe("Nobody can render this now."))
        started = time.monotonic()
        answer = http(url)
        took = time.monotonic() - started
        assert answer.status in (502, 504), answer.body[:300]
        assert answer.headers["Content-Type"].startswith("application/json")
        assert answer.json()["error"].startswith("upstream_")
        assert took < FIRST_BYTE_TIMEOUT + 2.0  # a bound on the fault path, not a speed claim

    def test_shield_reports_the_dead_origin_as_a_json_error(self, dead_origin: DeadOrigin) -> None:
        answer = http(dead_origin.shield.base + sign(KEYRING, joe("Asked of the shield itself.")))
        # After the earlier misses of this class the shield's breaker for its only
        # upstream may be open: then it answers at once, 503 with Retry-After.
        assert answer.status in (502, 503, 504), answer.body[:300]
        error = answer.json()["error"]
        assert error.startswith("upstream_") or error == "circuit_open"
        assert answer.status != 503 or int(answer.headers["Retry-After"]) >= 1


# -- 2b. two shields ------------------------------------------------------------------------


@dataclass
class TwoShields:
    edge: NodeProcess
    shields: dict[str, NodeProcess]
    origin: NodeProcess

    @property
    def bases(self) -> tuple[str, ...]:
        """The edge's upstreams, exactly as given on its command line."""
        return tuple(self.shields)


@pytest.fixture(scope="class")
def two_shields(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoShields]:
    """origin <- shield1, shield2 <- edge (--upstream shield1 --upstream shield2)."""
    where = tmp_path_factory.mktemp("two-shields")
    nodes: list[NodeProcess] = []
    with running(nodes):
        origin = start_node(
            "origin", where, config=origin_config("http://127.0.0.1:1", where / "objects")
        )
        nodes.append(origin)
        shields = [
            start_node("shield", where, upstreams=[origin.base], name=f"shield{i}") for i in (1, 2)
        ]
        nodes += shields
        edge = start_node("edge", where, upstreams=[s.base for s in shields], config=EDGE_CONFIG)
        nodes.append(edge)
        wait_ready(origin, *shields, edge)
        yield TwoShields(edge, {s.base: s for s in shields}, origin)


def shield_misses(text: str) -> float:
    return metric_from(text, "nearvoice_requests_total", result="miss")


class TestTwoShields:
    """origin <- shield1, shield2 <- edge: rendezvous order and failover."""

    def test_a_key_goes_through_its_home_shield_only(self, two_shields: TwoShields) -> None:
        spec = joe("Through the home shield.")
        home, other = rendezvous_order(spec.key, two_shields.bases)
        before = {base: metrics(base) for base in two_shields.bases}
        answer = http(two_shields.edge.base + sign(KEYRING, spec))
        assert answer.status == 200, answer.body[:300]
        after = {base: metrics(base) for base in two_shields.bases}
        assert shield_misses(after[home]) - shield_misses(before[home]) == 1
        assert shield_misses(after[other]) - shield_misses(before[other]) == 0

    def test_key_of_a_dead_home_shield_is_served_through_the_other(
        self, two_shields: TwoShields
    ) -> None:
        """Runs last in this class: it kills a shield."""
        spec = joe("The home shield is gone.")
        home, other = rendezvous_order(spec.key, two_shields.bases)
        two_shields.shields[home].kill()
        before = metrics(other)
        answer = http(two_shields.edge.base + sign(KEYRING, spec))
        after = metrics(other)
        assert answer.status == 200, answer.body[:300]
        rate, frames = wav(answer.body)
        assert rate == 22050 and frames > 0
        assert shield_misses(after) - shield_misses(before) == 1
        assert delta(before, after, "nearvoice_upstream_requests_total", reason="no_engine") == 1


# -- 3. the origin's persistent store is full ------------------------------------------------


LONG_JOE = (
    "The origin's object store is far too small for this line. It renders the audio, "
    "tries to keep it, fails, and must still stream every byte to the listener."
)


@contextlib.contextmanager
def tiny_store(where: Path) -> Iterator[Any]:
    """A 64 KiB tmpfs at `where`; yields None, or, when this host forbids mounting, a
    preexec_fn that gives the origin an RLIMIT_FSIZE of the same size instead."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={STORE_SIZE // 1024}k", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:

        def limit_file_size() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past it fail with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (STORE_SIZE, resource.RLIM_INFINITY))

        yield limit_file_size
        return
    try:
        yield None
    finally:
        subprocess.run(["umount", str(where)], check=True)


@dataclass
class FullStore:
    origin: NodeProcess
    spec: Spec
    answer: Answer
    at_origin: Answer
    origin_metrics: str
    store: Path


@pytest.fixture(scope="class")
def full_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullStore]:
    """origin (store on a 64 KiB tmpfs) <- shield <- edge; one long joe line is fetched."""
    where = tmp_path_factory.mktemp("full-store")
    store = where / "objects"
    with tiny_store(store) as preexec:
        nodes: list[NodeProcess] = []
        with running(nodes):
            origin = start_node(
                "origin", where, config=origin_config("http://127.0.0.1:1", store), preexec=preexec
            )
            nodes.append(origin)
            shield = start_node("shield", where, upstreams=[origin.base])
            nodes.append(shield)
            edge = start_node("edge", where, upstreams=[shield.base], config=EDGE_CONFIG)
            nodes.append(edge)
            wait_ready(origin, shield, edge)
            spec = joe(LONG_JOE)
            target = sign(KEYRING, spec, policy=Policy.HOT)
            answer = http(edge.base + target)
            settled(edge.base + target)
            at_origin = http(origin.base + target)
            yield FullStore(origin, spec, answer, at_origin, metrics(origin.base), store)


class TestFullStore:
    """An origin whose persistent store is a 64 KiB tmpfs."""

    def test_full_origin_store_still_streams_complete_audio(self, full_store: FullStore) -> None:
        answer = full_store.answer
        assert answer.status == 200, answer.body[:300]
        assert CHECKSUM_HEADER not in answer.headers  # streamed as it came, in flight
        assert len(answer.body) > STORE_SIZE  # the object really could not be kept
        rate, frames = wav(answer.body)
        assert rate == 22050
        assert frames * 2 == len(answer.body) - 44  # 16-bit mono after a 44-byte header
        assert full_store.at_origin.status == 200
        assert answer.body == full_store.at_origin.body

    def test_full_origin_store_counts_the_store_error(self, full_store: FullStore) -> None:
        assert metric_from(full_store.origin_metrics, "nearvoice_store_errors_total") >= 1

    def test_full_origin_store_logs_the_store_error(self, full_store: FullStore) -> None:
        lines = [
            line for line in full_store.origin.output().splitlines() if full_store.spec.key in line
        ]
        assert any("store" in line and "ERROR" in line for line in lines), "\n".join(lines)

    def test_full_origin_store_keeps_nothing_half_written(self, full_store: FullStore) -> None:
        leftovers = [p for p in full_store.store.rglob("*") if p.is_file()]
        assert leftovers == []
