"""`nearvoice edge --workers 2` as a real process: the workers produce each key once.

The kernel spreads connections over the workers (SO_REUSEPORT), and a connection stays
with the worker that accepted it, so each test opens keep-alive connections first and asks
each one which worker answers it (`/admin/stats`). Then:

1. 100 concurrent cold requests for one key, over connections to both workers, give one
   render and byte-identical bodies; the other worker's followers get Range answers from
   the in-flight object (no digest header: it is not known until the object is complete).
2. A purge through one worker is honoured by the other: its hot tier forgets the object,
   and a render in flight in both (owner and relay) is forgotten too.
3. `/admin/hotkeys` counts the hits of both workers, `/admin/stats` answers for the node,
   and a prefetch job started through one worker renders each key once and reports
   through the other.
4. A killed owner worker does not make its keys fail: the other worker produces them
   itself, and once the supervisor has started the owner again it relays to it again. An
   owner killed mid-stream breaks the relayed transfer; nothing short is stored.

Plus the pieces without processes: which worker owns a key, where the sockets live, and
the merge of Space-Saving summaries.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from nearvoice.edge import activity
from nearvoice.edge.config import ADMIN_TOKEN_ENV
from nearvoice.edge.handlers.admin import merge_hotkeys
from nearvoice.edge.keyring import KEYS_ENV
from nearvoice.edge.metrics import Result
from nearvoice.edge.spec import Spec
from nearvoice.edge.upstream import CHECKSUM_HEADER
from nearvoice.edge.workers import channel_dir, owner_of
from tests.support import KID, SECRET, make_keyring, make_spec, metric_from, sign
from tests.test_stack import (
    REPO,
    START_TIMEOUT,
    NodeProcess,
    free_port,
    start_node,
    stop_process,
    wait_listening,
    wait_ready,
)

pytestmark = pytest.mark.slow

KEYRING = make_keyring()
T = TypeVar("T")
ADMIN = "workers-test-admin-token"
WORKERS = 2
CONCURRENT = 100
TIMEOUT = 120.0  # seconds for one request that renders on a small CPU
CONFIG = f"workers = {WORKERS}\n\n[synth]\nworkers = 1\n"
# Long enough that its render is still running while 100 requests arrive.
LONG_TEXT = (
    "The harbour lights came on one by one, and the fishing boats drifted home. "
    "Nobody on the pier said a word about the storm that was gathering in the west. "
    "An old man folded his nets with slow and careful hands. "
    "Children ran along the sea wall, chasing gulls that would not be caught. "
    "By nine the rain had started, soft at first and then in heavy sheets."
)


class Connection:
    """One keep-alive connection, and the worker that accepted it."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        stats = self.admin("GET", "/admin/stats")
        self.worker = int(stats["worker"])

    def admin(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        headers = {"Authorization": f"Bearer {ADMIN}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        self.conn.request(method, path, body=data, headers=headers)
        response = self.conn.getresponse()
        payload = response.read()
        assert response.status == status, payload
        return json.loads(payload)

    def settle(self) -> None:
        """Returns once this connection's earlier requests are counted in the metrics. A
        handler counts its request after the last byte went out, which the client may
        have read already; requests on one connection are handled one after the other."""
        self.admin("GET", "/admin/hotkeys?k=1")

    def get(self, target: str, headers: dict[str, str] | None = None) -> Answer:
        self.conn.request("GET", target, headers=headers or {})
        response = self.conn.getresponse()
        return Answer(response.status, dict(response.getheaders()), response.read())

    def close(self) -> None:
        self.conn.close()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Node:
    process: NodeProcess
    data: Path

    @property
    def port(self) -> int:
        return self.process.port

    def metrics(self) -> str:
        return metrics_of(self.port)

    def metric(self, sample: str, **labels: str) -> float:
        return metric_from(self.metrics(), sample, **labels)

    def connections(self, count: int) -> list[Connection]:
        """`count` connections, with at least one to each worker."""
        opened = [Connection(self.port) for _ in range(count)]
        seen = {c.worker for c in opened}
        while seen != set(range(WORKERS)):  # 2**-count likely; open more until both
            extra = Connection(self.port)
            seen.add(extra.worker)
            opened.append(extra)
        return opened

    def pinned(self) -> dict[int, Connection]:
        """One connection to each worker."""
        by_worker: dict[int, Connection] = {}
        for conn in self.connections(WORKERS * 2):
            if conn.worker in by_worker:
                conn.close()
            else:
                by_worker[conn.worker] = conn
        return by_worker

    def pids(self) -> dict[int, int]:
        conn = reconnecting(lambda: Connection(self.port))
        try:
            stats = conn.admin("GET", "/admin/stats")
        finally:
            conn.close()
        return {int(w["worker"]): int(w["pid"]) for w in stats["workers"]}


RECONNECTS = 50  # a connection accepted by a worker just killed is reset: connect again


def reconnecting(attempt: Callable[[], T]) -> T:
    """`attempt()`, again while its connection is reset. Right after a worker is killed,
    the kernel may still hand a new connection to its dying listener (SO_REUSEPORT), and
    a client can only connect again; any other failure is raised."""
    for _ in range(RECONNECTS - 1):
        try:
            return attempt()
        except (ConnectionResetError, http.client.RemoteDisconnected):
            continue
    return attempt()


def metrics_of(port: int) -> str:
    def scrape() -> str:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            return conn.getresponse().read().decode()
        finally:
            conn.close()

    return reconnecting(scrape)


def node_env() -> dict[str, str]:
    return {**os.environ, KEYS_ENV: f"{KID}:{SECRET}", ADMIN_TOKEN_ENV: ADMIN}


def wait_all_ready(node: Node, limit: float = START_TIMEOUT) -> None:
    """Until every worker answers /readyz 200, asked over connections it accepted."""
    deadline = time.monotonic() + limit
    ready: set[int] = set()
    while ready != set(range(WORKERS)):
        assert node.process.proc.poll() is None, node.process.output()[-4000:]
        assert time.monotonic() < deadline, f"workers not ready:\n{node.process.output()[-4000:]}"
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = Connection(node.port)
            try:
                conn.conn.request("GET", "/readyz")
                response = conn.conn.getresponse()
                response.read()
                if response.status == 200:
                    ready.add(conn.worker)
            finally:
                conn.close()
        if ready != set(range(WORKERS)):
            time.sleep(0.1)


@contextlib.contextmanager
def workers_node(
    where: Path, config: str, upstream: str | None = None, env: Mapping[str, str] | None = None
) -> Iterator[Node]:
    """`python -m nearvoice edge` with `config` (which sets `workers`), all workers ready;
    `env` adds to its environment."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "node.toml").write_text(config)
    port = free_port()
    argv = [
        sys.executable, "-m", "nearvoice.edge.cli", "edge", "--port", str(port),
        "--data-dir", str(where / "data"), "--config", str(where / "node.toml"),
    ]  # fmt: skip
    if upstream is not None:
        argv += ["--upstream", upstream]
    log = where / "node.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env={**node_env(), **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    process = NodeProcess("edge", port, proc, log)
    try:
        assert wait_listening(process), process.output()
        started = Node(process, where / "data")
        wait_all_ready(started)
        yield started
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with workers_node(tmp_path_factory.mktemp("workers"), CONFIG) as started:
        yield started


_cases = iter(range(1, 1000))


def fresh(text: str = LONG_TEXT) -> Spec:
    return make_spec(f"{text} Case {next(_cases)}.")


def fire(conns: list[Connection], target: str, ranged: set[int]) -> list[Answer]:
    """GETs `target` on every connection at once (bounded ranges on the `ranged` ones)."""
    barrier = threading.Barrier(len(conns))

    def one(i: int) -> Answer:
        headers = {"Range": "bytes=100-4195"} if i in ranged else {}
        barrier.wait()
        return conns[i].get(target, headers)

    with ThreadPoolExecutor(len(conns)) as pool:
        return list(pool.map(one, range(len(conns))))


def counted_after(node: Node, before: str, requests: int) -> str:
    """The node's metrics once `requests` more speech requests than in `before` have been
    counted (see `Connection.settle`)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        after = node.metrics()
        counted = sum(
            metric_from(after, "nearvoice_requests_total", result=r.value)
            - metric_from(before, "nearvoice_requests_total", result=r.value)
            for r in Result
        )
        if counted >= requests:
            return after
        assert time.monotonic() < deadline, f"{counted} of {requests} requests counted"
        time.sleep(0.02)


def complete(conn: Connection, target: str) -> Answer:
    """GETs `target` until the answer is the complete object, which carries its digest.
    The owner's fill ends (and a relayed answer with it) once every byte exists; its
    commit follows, and only then is the object anyone's to hit."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        answer = conn.get(target)
        assert answer.status == 200
        if CHECKSUM_HEADER in answer.headers:
            return answer
        assert time.monotonic() < deadline, "the object was never complete"


def hotkey_hits(conn: Connection, key: str) -> int:
    top = conn.admin("GET", "/admin/hotkeys?k=1000")["keys"]
    return sum(int(entry["hits"]) for entry in top if entry["key"] == key)


def relays(node: Node, worker: int, outcome: str) -> float:
    return node.metric("nearvoice_worker_relays_total", worker=str(worker), outcome=outcome)


def renders(node: Node) -> float:
    return node.metric("nearvoice_synth_total", engine="hibari")


# -- 1. one render for 100 concurrent requests ---------------------------------------------


def test_hundred_concurrent_cold_requests_over_both_workers_render_once(node: Node) -> None:
    spec = fresh()
    target = sign(KEYRING, spec)
    owner = owner_of(spec.key, WORKERS)
    conns = node.connections(CONCURRENT)
    before = node.metrics()
    # Every fourth request asks for a bounded range, as players do when they seek.
    ranged = {i for i in range(len(conns)) if i % 4 == 1}
    answers = fire(conns, target, ranged)
    after = counted_after(node, before, len(conns))
    for conn in conns:
        conn.close()

    assert (
        metric_from(after, "nearvoice_synth_total", engine="hibari")
        - metric_from(before, "nearvoice_synth_total", engine="hibari")
        == 1
    )
    full = [a for i, a in enumerate(answers) if i not in ranged]
    assert all(a.status == 200 for a in full), [a.status for a in full]
    body = full[0].body
    assert len(body) > 4196
    assert all(a.body == body for a in full)
    for i in ranged:
        assert answers[i].status == 206
        assert answers[i].body == body[100:4196]
        assert answers[i].headers["Content-Range"].startswith("bytes 100-4195/")
    # Both workers answered players; the other one relayed its single fill from the owner.
    workers = {conn.worker for conn in conns}
    assert workers == {0, 1}
    other = 1 - owner

    def delta(sample: str, **labels: str) -> float:
        return metric_from(after, sample, **labels) - metric_from(before, sample, **labels)

    relayed = delta("nearvoice_worker_relays_total", worker=str(other), outcome="relayed")
    served = delta("nearvoice_worker_relays_total", worker=str(owner), outcome="served")
    # One relay, or a few when followers came after it ended and before the owner's
    # commit: each joined the owner's fill, which stays joinable until after its commit.
    assert relayed >= 1 and served == relayed
    assert delta("nearvoice_worker_relays_total", worker=str(other), outcome="fallback") == 0
    # Each player request is counted once; the owner's internal request is not.
    results = ("hit", "miss", "collapsed")
    counted = sum(delta("nearvoice_requests_total", result=r) for r in results)
    assert counted == len(conns)
    assert delta("nearvoice_requests_total", result="error") == 0
    # Range answers from the in-flight object, in the worker that does not own the key: a
    # stream of an object still being produced has no digest yet.
    in_flight = [
        answers[i]
        for i in ranged
        if conns[i].worker == other and CHECKSUM_HEADER not in answers[i].headers
    ]
    assert in_flight, "no ranged follower in the other worker read the in-flight object"


def test_the_workers_share_their_activity_in_one_file(node: Node) -> None:
    """A first piece spins only while the node is quiet (edge.activity): each worker keeps
    its renders in flight and its latest request's time in its own slot of one file, which
    the others read. (That a render's count ends with it is tests/test_activity.py's.)"""
    spec = fresh("Counted while it renders, and not after.")
    target = sign(KEYRING, spec)
    started = time.monotonic()  # CLOCK_MONOTONIC, system-wide: the workers' clock too
    for conn in node.pinned().values():
        for _ in range(2):  # a miss (or a relay), then a hit on the same connection
            answer = conn.get(target)
            assert answer.status == 200
        conn.close()
    data = (node.data / "activity").read_bytes()
    assert len(data) == activity.SLOT.size * WORKERS
    slots = [activity.SLOT.unpack_from(data, i * activity.SLOT.size) for i in range(WORKERS)]
    # Each worker wrote its slot when it read its requests, before it answered them.
    assert all(started <= latest <= time.monotonic() for _, latest in slots)


def test_a_key_from_upstream_is_fetched_by_one_worker_only(
    node: Node, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Workers that do not render fetch through the owner: one upstream request for 100
    concurrent players, counted once with its real reason; relays are not counted."""
    where = tmp_path_factory.mktemp("fetching")
    upstream = start_node("edge", where, config="[synth]\nworkers = 1\n", name="upstream")
    try:
        wait_ready(upstream)
        config = f"workers = {WORKERS}\n\n[synth]\nenabled = false\n"
        with workers_node(where / "workers", config, upstream.base) as fetching:
            spec = fresh()
            conns = fetching.connections(CONCURRENT)
            before, upstream_before = fetching.metrics(), metrics_of(upstream.port)
            answers = fire(conns, sign(KEYRING, spec), set())
            after = counted_after(fetching, before, len(conns))
            upstream_after = metrics_of(upstream.port)
            for conn in conns:
                conn.close()
    finally:
        upstream.stop()
    assert {a.status for a in answers} == {200}
    assert len({a.body for a in answers}) == 1
    assert {c.worker for c in conns} == {0, 1}

    def delta(before: str, after: str, sample: str, **labels: str) -> float:
        return metric_from(after, sample, **labels) - metric_from(before, sample, **labels)

    assert delta(upstream_before, upstream_after, "nearvoice_synth_total", engine="hibari") == 1
    fetched = delta(before, after, "nearvoice_upstream_requests_total", reason="no_engine")
    assert fetched == 1
    other = str(1 - owner_of(spec.key, WORKERS))
    assert delta(before, after, "nearvoice_worker_relays_total", worker=other, outcome="relayed")
    # The relaying worker's players got upstream bytes, and say so.
    sent = delta(before, after, "nearvoice_response_bytes_total", source="upstream")
    assert sent == sum(len(a.body) for a in answers)


@contextlib.contextmanager
def gone_upstream() -> Iterator[tuple[str, list[str]]]:
    """A real HTTP server on loopback that answers every GET 410 with a node's JSON error
    (a cloned line whose voice was deleted); yields its base URL and the paths asked."""
    asked: list[str] = []

    class Gone(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            body = json.dumps({"error": "unknown_ref", "message": "the voice was deleted"})
            self.send_response(410)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gone)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()


def test_an_upstreams_410_relayed_by_the_owner_is_final_in_the_other_worker(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The owner relays the upstream's 410; the worker that asked it passes it on instead
    of fetching the key again itself."""
    config = f"workers = {WORKERS}\n\n[synth]\nenabled = false\n"
    with (
        gone_upstream() as (base, asked),
        workers_node(tmp_path_factory.mktemp("gone"), config, base) as fetching,
    ):
        spec = fresh()
        other = 1 - owner_of(spec.key, WORKERS)
        pinned = fetching.pinned()
        conn = pinned[other]
        before = fetching.metrics()
        answer = conn.get(sign(KEYRING, spec))
        conn.settle()
        after = fetching.metrics()
        for each in pinned.values():
            each.close()
    assert answer.status == 410
    assert json.loads(answer.body)["error"] == "unknown_ref"
    assert len(asked) == 1  # by the owner; the other worker did not ask again
    for outcome in ("relayed", "fallback"):
        moved = metric_from(after, "nearvoice_worker_relays_total", worker=str(other),
                            outcome=outcome) - metric_from(
            before, "nearvoice_worker_relays_total", worker=str(other), outcome=outcome
        )  # fmt: skip
        assert moved == 0, outcome


def test_a_player_hanging_up_in_the_relaying_worker_stops_nothing(node: Node) -> None:
    spec = fresh()
    target = sign(KEYRING, spec)
    other = 1 - owner_of(spec.key, WORKERS)
    pinned = node.pinned()
    try:
        rendered = renders(node)
        pinned[other].conn.request("GET", target)
        streaming = pinned[other].conn.getresponse()
        assert streaming.status == 200
        assert streaming.read(64)
        pinned[other].close()  # the only player of the relay hangs up mid-object
        listener = reconnecting(lambda: Connection(node.port))
        try:
            whole = complete(listener, target)  # rendered to the end and stored all the same
        finally:
            listener.close()
        assert whole.body[:4] == b"RIFF"
        assert renders(node) == rendered + 1
    finally:
        for conn in pinned.values():
            conn.close()


# -- 2. purges ----------------------------------------------------------------------------


def test_purge_through_one_worker_is_honoured_by_the_other(node: Node) -> None:
    spec = fresh("A short line to purge.")
    target = sign(KEYRING, spec)
    pinned = node.pinned()
    try:
        first = complete(pinned[0], target)
        for worker in (0, 1):  # into both hot tiers
            assert pinned[worker].get(target).body == first.body
            pinned[worker].settle()
        hits = node.metric("nearvoice_requests_total", result="hit")
        rendered = renders(node)
        answer = pinned[0].admin("POST", "/admin/purge", {"keys": [spec.key]})
        assert answer["purged"] == [spec.key]
        assert answer["workers"] == {"acknowledged": [1], "unreachable": []}
        again = pinned[1].get(target)  # at once: no waiting for the purge stamp
        assert again.status == 200 and again.body == first.body
        pinned[1].settle()
        assert node.metric("nearvoice_requests_total", result="hit") == hits
        assert renders(node) == rendered + 1
    finally:
        for conn in pinned.values():
            conn.close()


def test_purge_forgets_a_fill_in_flight_in_every_worker(node: Node) -> None:
    spec = fresh()
    target = sign(KEYRING, spec)
    owner = owner_of(spec.key, WORKERS)
    other = 1 - owner
    pinned = node.pinned()
    try:
        rendered = renders(node)
        # A player of the worker that relays: a fill there, and the owner's fill.
        listener_conn = pinned[other]
        listener_conn.conn.request("GET", target)
        streaming = listener_conn.conn.getresponse()
        assert streaming.status == 200
        assert streaming.read(64)  # the object is on its way
        answer = pinned[owner].admin("POST", "/admin/purge", {"keys": [spec.key]})
        assert answer["workers"]["acknowledged"] == [other]
        # A new request to the relaying worker must not join the forgotten fills.
        fresh_conn = Connection(node.port)
        while fresh_conn.worker != other:
            fresh_conn.close()
            fresh_conn = Connection(node.port)
        again = fresh_conn.get(target)
        fresh_conn.close()
        rest = streaming.read()
        assert again.status == 200
        assert renders(node) == rendered + 2
        # The stream already under way was not cut: the purged render, complete.
        assert len(rest) + 64 == len(again.body)
    finally:
        for conn in pinned.values():
            conn.close()


# -- 3. hot keys --------------------------------------------------------------------------


def test_hotkeys_add_up_both_workers(node: Node) -> None:
    spec = fresh("A popular line.")
    target = sign(KEYRING, spec)
    pinned = node.pinned()
    try:
        complete(pinned[0], target)
        before = hotkey_hits(pinned[0], spec.key)  # 0, or the hits while it was committed
        for worker, count in ((0, 3), (1, 4)):
            for _ in range(count):
                assert pinned[worker].get(target).status == 200
        for worker in (0, 1):
            top = pinned[worker].admin("GET", "/admin/hotkeys?k=1000")["keys"]
            found = [entry for entry in top if entry["key"] == spec.key]
            assert found == [{"key": spec.key, "hits": before + 7, "error": 0}]
        # /admin/stats answers for the node too, whichever worker is asked.
        stats = [pinned[worker].admin("GET", "/admin/stats") for worker in (0, 1)]
        assert [s["worker"] for s in stats] == [0, 1]
        assert stats[0]["requests"] == stats[1]["requests"]
        assert stats[0]["requests"]["hit"] == node.metric("nearvoice_requests_total", result="hit")
        for s in stats:
            assert [w["worker"] for w in s["workers"]] == [0, 1]
            assert s["hot"]["objects"] == sum(w["hot"]["objects"] for w in s["workers"])
            assert all(w["hot"]["objects"] >= 1 for w in s["workers"])  # the line, in each
    finally:
        for conn in pinned.values():
            conn.close()


def test_a_prefetch_job_renders_each_key_once_and_any_worker_reports_it(node: Node) -> None:
    specs = [fresh("A line to warm up.") for _ in range(8)]
    by_owner = {owner_of(s.key, WORKERS): s for s in specs}
    assert set(by_owner) == {0, 1}
    targets = [sign(KEYRING, s) for s in by_owner.values()]
    pinned = node.pinned()
    try:
        rendered = renders(node)
        job = pinned[0].admin("POST", "/admin/prefetch", {"urls": targets}, status=202)
        deadline = time.monotonic() + TIMEOUT
        while True:  # asked of the worker that does not run the job
            report = pinned[1].admin("GET", job["progress"])
            if report["state"] == "finished":
                break
            assert time.monotonic() < deadline, report
            time.sleep(0.05)
        assert report["id"] == job["id"]
        assert (report["done"], report["failed"]) == (2, 0)
        assert renders(node) == rendered + 2
        hits = node.metric("nearvoice_requests_total", result="hit")
        for target in targets:
            assert pinned[1].get(target).status == 200
        pinned[1].settle()
        assert node.metric("nearvoice_requests_total", result="hit") == hits + 2
    finally:
        for conn in pinned.values():
            conn.close()


def test_every_worker_owns_some_keys_and_all_agree_on_which() -> None:
    keys = [make_spec(f"Line {i}.").key for i in range(64)]
    owners = [owner_of(key, 3) for key in keys]
    assert set(owners) == {0, 1, 2}
    assert owners == [owner_of(key, 3) for key in keys]
    assert {owner_of(key, 1) for key in keys} == {0}


def test_the_channel_directory_fits_a_socket_address(tmp_path: Path) -> None:
    assert channel_dir(tmp_path) == tmp_path.resolve() / "workers"
    deep = tmp_path / ("d" * 120)
    chosen = channel_dir(deep)
    assert len(str(chosen / "999.sock").encode()) <= 100
    assert chosen == channel_dir(deep)  # every worker of the node finds the same one
    assert chosen != channel_dir(tmp_path / ("e" * 120))


def test_merged_hotkeys_keep_the_space_saving_bound() -> None:
    """A key missing from a full summary may have been counted there, up to its smallest
    counter: merged counts over-estimate, by at most `error`, never under-estimate."""
    full = {"capacity": 2, "keys": [["a", 10, 0], ["b", 4, 1]]}
    roomy = {"capacity": 8, "keys": [["c", 9, 0], ["a", 1, 0]]}
    merged = {h.key: (h.hits, h.error) for h in merge_hotkeys([full, roomy], 10)}
    assert merged == {"a": (11, 0), "c": (13, 4), "b": (4, 1)}
    assert [h.key for h in merge_hotkeys([full, roomy], 2)] == ["c", "a"]


def test_the_channel_refuses_requests_without_a_node_signature(node: Node) -> None:
    """Only siblings speak on a worker's socket: an unsigned request gets 403."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(str(channel_dir(node.data) / "0.sock"))
        sock.sendall(b"GET /worker/hotkeys HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
    assert b"bad_node_signature" in answer


# -- 4. a dead owner ----------------------------------------------------------------------


def wait_restarted(node: Node, index: int, old_pid: int) -> None:
    """Until worker `index` runs again under a new pid and answers on its channel."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        with contextlib.suppress(OSError, http.client.HTTPException, AssertionError):
            if node.pids().get(index) not in (None, old_pid):
                return
        assert time.monotonic() < deadline, node.process.output()[-4000:]
        time.sleep(0.2)


def test_an_owner_dying_mid_stream_aborts_the_relay_and_stores_nothing_short(node: Node) -> None:
    spec = make_spec(" ".join([LONG_TEXT] * 6) + f" Case {next(_cases)}.")
    target = sign(KEYRING, spec)
    owner = owner_of(spec.key, WORKERS)
    pids = node.pids()
    pinned = node.pinned()
    try:
        listener = pinned[1 - owner].conn
        listener.request("GET", target)
        streaming = listener.getresponse()
        assert streaming.status == 200
        head = streaming.read(64)
        os.kill(pids[owner], signal.SIGKILL)
        try:
            body: bytes | None = head + streaming.read()
        except (http.client.IncompleteRead, ConnectionError):
            body = None  # the transfer broke: the listener knows it is incomplete
    finally:
        for conn in pinned.values():
            conn.close()
    # Whichever worker answers next, it serves the whole object: produced afresh, or
    # complete from the store, never a stored prefix.
    conn = reconnecting(lambda: Connection(node.port))
    try:
        again = conn.get(target)
    finally:
        conn.close()
    assert again.status == 200
    digest = hashlib.sha256(again.body).hexdigest()
    assert again.headers.get(CHECKSUM_HEADER, digest) == digest
    assert again.body[:4] == b"RIFF"
    if body is not None:
        assert body == again.body
    wait_restarted(node, owner, pids[owner])


def test_a_killed_owner_worker_does_not_make_its_keys_fail(node: Node) -> None:
    pids = node.pids()
    victim = 0
    survivor = 1
    specs = [fresh("A line whose owner dies.") for _ in range(40)]
    owned = [s for s in specs if owner_of(s.key, WORKERS) == victim]
    assert len(owned) >= 2
    pinned = node.pinned()
    try:
        fallbacks = relays(node, survivor, "fallback") + relays(node, survivor, "relayed")
        os.kill(pids[victim], signal.SIGKILL)
        answer = pinned[survivor].get(sign(KEYRING, owned[0]))
        assert answer.status == 200 and answer.body[:4] == b"RIFF"
        assert relays(node, survivor, "fallback") + relays(node, survivor, "relayed") == (
            fallbacks + 1
        )
        # The supervisor starts the owner again under its index; its keys go back to it.
        wait_restarted(node, victim, pids[victim])
        relayed = relays(node, survivor, "relayed")
        answer = pinned[survivor].get(sign(KEYRING, owned[1]))
        assert answer.status == 200 and answer.body[:4] == b"RIFF"
        assert relays(node, survivor, "relayed") == relayed + 1
    finally:
        for conn in pinned.values():
            conn.close()
