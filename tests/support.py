"""Plain helpers shared by the application-level tests (not fixtures).

They build real keyrings, configs, specs and signed URLs, insert objects straight into a
node's disk store, and read the node's Prometheus exposition.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner
from prometheus_client.parser import text_string_to_metric_families

from nearvoice.edge.cache.meta import ObjectMeta, etag_for
from nearvoice.edge.config import NodeConfig, SynthSettings
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.handlers.keys import NODE
from nearvoice.edge.http.fastpath import EdgeRunner, EdgeServer
from nearvoice.edge.keyring import Keyring
from nearvoice.edge.node import Node
from nearvoice.edge.policy import Policy, Retention
from nearvoice.edge.spec import Spec
from nearvoice.edge.synth.engine import Audio, Engine
from nearvoice.edge.synth.hibari_engine import hibari_model_id
from nearvoice.edge.token import _b64e, _mac, sign_query, speech_path

KID = "test1"
SECRET = "test-secret-that-is-long-enough-0123456789"
DEFAULT_TEXT = "Hello from the edge."
READY_TIMEOUT = 60.0


class Clock:
    """A monotonic clock that moves only when a test moves it (`now`)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_keyring(*entries: str) -> Keyring:
    """A keyring from `kid:secret` entries; one fixed test key when none are given."""
    return Keyring.parse(",".join(entries) if entries else f"{KID}:{SECRET}")


def make_config(tmp_path: Path, **overrides: Any) -> NodeConfig:
    """An edge config under `tmp_path`: one inference thread, no background recency flush."""
    values: dict[str, Any] = {
        "data_dir": tmp_path / "node",
        "synth": SynthSettings(workers=1),
        "recency_flush": 3600.0,
    }
    values.update(overrides)
    return NodeConfig(**values)


def make_spec(
    text: str = DEFAULT_TEXT,
    *,
    voice: str = "heart",
    fmt: AudioFormat = AudioFormat.WAV,
    speed: float = 1.0,
    seed: int = 0,
    model: str | None = None,
) -> Spec:
    return Spec.create(
        text=text,
        voice=voice,
        format=fmt,
        model=model or hibari_model_id("heart"),
        speed=speed,
        seed=seed,
    )


def signed_fields(
    keyring: Keyring,
    spec: Spec,
    *,
    policy: Policy = Policy.HOT,
    ttl: int = 3600,
    ip: str | None = None,
    now: float | None = None,
) -> dict[str, str]:
    return sign_query(keyring, spec, policy=policy, ttl=ttl, ip=ip, now=now)


def target(path: str, fields: Mapping[str, str] | list[tuple[str, str]]) -> str:
    """A request target: `path?query`, with the query encoded as given (order kept)."""
    return f"{path}?{urlencode(fields)}"


def sign(keyring: Keyring, spec: Spec, **kwargs: Any) -> str:
    """A signed request target (path and query) for `spec`."""
    return target(speech_path(spec), signed_fields(keyring, spec, **kwargs))


def forge(keyring: Keyring, path: str, fields: Mapping[str, str]) -> str:
    """A target for `path` whose fields are signed correctly by the keyring's signer,
    whatever they hold: for URLs that pass the signature check and fail a later one."""
    unsigned = {name: value for name, value in fields.items() if name != "sig"}
    sig = _b64e(_mac(keyring.signer, path, unsigned))
    return target(path, {**unsigned, "sig": sig})


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic, incompressible bytes."""
    return random.Random(seed).randbytes(size)


def node_of(app: web.Application) -> Node:
    return app[NODE]


def put_object(
    app: web.Application,
    spec: Spec,
    body: bytes,
    *,
    policy: Policy = Policy.HOT,
    content_type: str | None = None,
    stored_at: float | None = None,
) -> ObjectMeta:
    """Commits `body` as `spec`'s object straight into the node's disk store."""
    node = app[NODE]
    meta = ObjectMeta(
        key=spec.key,
        content_type=content_type or spec.format.content_type(24000),
        length=len(body),
        etag=etag_for(spec.key),
        sha256=hashlib.sha256(body).hexdigest(),
        policy=policy,
        stored_at=float(int(time.time()) - 60) if stored_at is None else stored_at,
        ttl=Retention().ttl(policy),
    )
    node.store.put(meta, body)
    return meta


def value_files(app: web.Application) -> list[Path]:
    """The body files of every object in the node's disk store."""
    return sorted(app[NODE].store.directory.rglob("*.val"))


def metric_from(text: str, sample: str, **labels: str) -> float:
    """The value of the sample named `sample` with exactly these labels (0 if absent)."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == sample and found.labels == labels:
                return float(found.value)
    return 0.0


async def scrape(client: TestClient[Any, Any]) -> str:
    async with client.get("/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


async def metric(client: TestClient[Any, Any], sample: str, **labels: str) -> float:
    return metric_from(await scrape(client), sample, **labels)


async def wait_ready(client: TestClient[Any, Any]) -> None:
    """Polls /readyz until the node's engines are warm (model load and a warm-up render)."""
    async with asyncio.timeout(READY_TIMEOUT):
        while True:
            async with client.get("/readyz") as resp:
                if resp.status == 200:
                    return
            await asyncio.sleep(0.05)


async def eventually(predicate: Callable[[], bool], seconds: float = 10.0) -> None:
    """Waits until `predicate()` holds; fails the test if it never does."""
    async with asyncio.timeout(seconds):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.02)


async def scrape_until(
    client: TestClient[Any, Any], predicate: Callable[[str], bool], seconds: float = 10.0
) -> str:
    """The node's metrics once `predicate` holds for them. A client that read a body of
    known length has every byte before the handler records the request and the render
    thread its timings: this waits for those, not a fixed time."""
    async with asyncio.timeout(seconds):
        while True:
            text = await scrape(client)
            if predicate(text):
                return text
            await asyncio.sleep(0.02)


async def wait_process_ready(
    session: aiohttp.ClientSession,
    base: str,
    proc: asyncio.subprocess.Process,
    limit: float,
) -> None:
    """Polls a node process's /readyz until 200; fails if the process exits first."""
    async with asyncio.timeout(limit):
        while True:
            assert proc.returncode is None, "the node exited during start-up"
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{base}/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)


class EdgeTestServer(TestServer):
    """aiohttp's test server on the node's own runner, as `nearvoice edge` serves: the
    fast path (edge.http.fastpath) is live when the config enables it. `runner_kwargs`
    go to the runner (e.g. keepalive_timeout)."""

    def __init__(self, app: web.Application, **runner_kwargs: Any) -> None:
        super().__init__(app)
        self._runner_kwargs = runner_kwargs

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return EdgeRunner(self.app, **{**kwargs, **self._runner_kwargs})


def fast_answers(client: TestClient[Any, Any]) -> int:
    """Requests the client's server answered on the fast path (0 when it has none)."""
    server = client.server.handler
    return server.fast_answers if isinstance(server, EdgeServer) else 0


async def render_through_node(
    aiohttp_client: Any, config: NodeConfig, voice: str, text: str
) -> tuple[TestClient[Any, Any], Any, int]:
    """A ready node built from `config`, and the decoded audio (and rate) of its 200
    answer to a URL for `text` in `voice` with the model the configuration names."""
    import io

    import soundfile

    from nearvoice.edge.app import create_app
    from nearvoice.edge.voices import for_config

    keyring = make_keyring()
    client = await aiohttp_client(create_app(config, keyring))
    await wait_ready(client)
    spec = make_spec(text, voice=voice, model=for_config(config)[voice].model_id)
    async with client.get(sign(keyring, spec)) as resp:
        assert resp.status == 200
        body = await resp.read()
    audio, rate = soundfile.read(io.BytesIO(body))
    return client, audio, int(rate)


class WrappedEngine:
    """A real engine passed through unchanged: fault and pause injectors subclass it and
    override what they change. It has no `help_count`, so a render beside its duration
    pass waits for that pass (`samples`) rather than counting around it."""

    def __init__(self, inner: Engine) -> None:
        self._inner = inner
        self.name = inner.name
        self.sample_rate = inner.sample_rate
        self.voices = inner.voices
        self.controls = inner.controls

    def model_id(self, voice: str) -> str:
        return self._inner.model_id(voice)

    def refuses(self, spec: Spec) -> str | None:
        return self._inner.refuses(spec)

    def warmup(self) -> None:
        self._inner.warmup()

    def samples(self, text: str, voice: str, speed: float) -> int | None:
        return self._inner.samples(text, voice, speed)

    def stream(self, text: str, voice: str, speed: float, seed: int) -> Iterator[Audio]:
        return self._inner.stream(text, voice, speed, seed)


class MiscountingEngine(WrappedEngine):
    """The real engine, whose duration pass is off by `error` samples: the disagreement
    between pass and render that a broken pass would cause."""

    def __init__(self, inner: Engine, error: int) -> None:
        super().__init__(inner)
        self.error = error

    def samples(self, text: str, voice: str, speed: float) -> int | None:
        counted = self._inner.samples(text, voice, speed)
        return None if counted is None else counted + self.error
