"""Prefetch jobs: warming a list of objects in the background (`POST /admin/prefetch`).

A job takes signed URLs (as players would fetch them) or plain specs (the admin is
trusted, so the node signs them itself), and fills each missing object through the normal
path, so prefetches collapse with player requests and go upstream when rendering here is not
possible. At most `[prefetch] concurrency` objects of a job are in flight at once, a job
holds at most `[prefetch] max_specs` items, and `DELETE /admin/prefetch/{id}` cancels one;
the node keeps the last `KEEP_JOBS` jobs for progress queries. Drafts are refused: they are
never stored, so warming one would only spend a render.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from nearvoice.edge import controls
from nearvoice.edge.cache.fill import FillFailed
from nearvoice.edge.checks import between
from nearvoice.edge.errors import BadRequest, RequestError
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.policy import Policy
from nearvoice.edge.spec import Spec, SpecError
from nearvoice.edge.synth.priority import Priority
from nearvoice.edge.token import Grant, sign_url
from nearvoice.edge.voices import UnknownVoice, resolve

if TYPE_CHECKING:
    from nearvoice.edge.node import Node

log = logging.getLogger("nearvoice.prefetch")
KEEP_JOBS = 100  # finished jobs remembered for progress queries
SPEC_TTL = 3600  # seconds the node's own signature on a spec item stays valid
_SPEECH = "/v1/speech/"


@dataclass(frozen=True, slots=True)
class PrefetchSettings:
    max_specs: int = 1000
    """Items (URLs and specs together) one prefetch job may hold; a longer list is
    refused with 400, so no single request can keep the renderers busy for hours."""
    concurrency: int = 2
    """Objects of one job produced at once."""

    def validate(self) -> None:
        between(self, "max_specs", 1, 100_000)
        between(self, "concurrency", 1, 64)


@dataclass(slots=True)
class Job:
    id: str
    total: int
    done: int = 0
    cached: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    cancelled: bool = False

    @property
    def state(self) -> str:
        if self.cancelled:
            return "cancelled"
        return "finished" if self.finished_at is not None else "running"

    def report(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "total": self.total,
            "done": self.done,
            "already_cached": self.cached,
            "failed": self.failed,
            "errors": self.errors[:20],
        }


class Prefetcher:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def items(self, payload: Any) -> list[tuple[str, Grant | None]]:
        """Validates a request body into (target, grant-or-None) pairs; URLs are authorized
        when the job runs, so an expired one is reported there rather than refused here."""
        if not isinstance(payload, dict):
            raise BadRequest("bad_json", "expected {'urls': [...], 'specs': [...]}")
        urls, specs = payload.get("urls", []), payload.get("specs", [])
        if not isinstance(urls, list) or not isinstance(specs, list):
            raise BadRequest("bad_items", "urls and specs must be lists")
        limit = self.node.config.prefetch.max_specs
        if not urls and not specs:
            raise BadRequest("bad_items", "a job needs at least one URL or spec")
        if len(urls) + len(specs) > limit:
            raise BadRequest("too_many_items", f"a job takes at most {limit} items")
        out: list[tuple[str, Grant | None]] = []
        for url in urls:
            if not isinstance(url, str):
                raise BadRequest("bad_items", "urls must be strings")
            parts = urlsplit(url)
            if not parts.path.startswith(_SPEECH):
                raise BadRequest("bad_items", f"not a speech URL: {url[:80]!r}")
            if ("p", Policy.DRAFT.value) in parse_qsl(parts.query):
                raise BadRequest("draft_prefetch", "drafts are never stored; nothing to warm")
            out.append((f"{parts.path}?{parts.query}", None))
        for item in specs:
            grant = self._grant_for(item)
            # A URL signed without a base is its own request target.
            target = sign_url(self.node.keyring, "", grant.spec, policy=grant.policy, ttl=SPEC_TTL)
            out.append((target, grant))
        return out

    def _grant_for(self, item: Any) -> Grant:
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise BadRequest("bad_items", "a spec needs at least a text")
        seed, speed = item.get("seed", 0), item.get("speed", 1.0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise BadRequest("bad_items", "seed must be an integer")
        if not isinstance(speed, int | float) or isinstance(speed, bool):
            raise BadRequest("bad_items", "speed must be a number")
        try:
            voice = resolve(str(item.get("voice", "heart")), self.node.voices)
            fmt = AudioFormat(str(item.get("format", "wav")))
            policy = Policy(str(item.get("policy", "hot")))
            if not policy.stored:
                raise BadRequest("draft_prefetch", "drafts are never stored; nothing to warm")
            # duration, emotion, lang (docs/contracts.md#spec-and-key)
            extra = controls.from_json(item)
            if "ref_id" in extra:
                raise SpecError("bad_ref", "a spec with a ref is minted by the origin")
            spec = Spec.create(
                text=item["text"],
                voice=voice.name,
                format=fmt,
                model=voice.model_id,
                speed=float(speed),
                seed=seed,
                **extra,
            )
            controls.check_voice(voice, spec)
        except UnknownVoice as exc:
            raise BadRequest("unknown_voice", f"unknown voice {exc.voice!r}") from exc
        except (SpecError, ValueError, TypeError) as exc:
            raise BadRequest("bad_items", str(exc)) from exc
        limit = self.node.config.synth.max_text_chars
        if len(spec.text) > limit:
            raise BadRequest("text_too_long", f"text is longer than {limit} characters")
        return Grant(spec=spec, policy=policy, expires=int(time.time()) + SPEC_TTL)

    def start(self, items: list[tuple[str, Grant | None]]) -> Job:
        job = Job(id=secrets.token_hex(8), total=len(items))
        self.jobs[job.id] = job
        while len(self.jobs) > KEEP_JOBS:
            self.jobs.popitem(last=False)
        task = asyncio.get_running_loop().create_task(self._run(job, items))
        self._tasks[job.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job.id, None))
        return job

    def cancel(self, job_id: str) -> Job | None:
        """Stops a job: no further item of it starts. Renders it already started finish
        (players may have joined them). None for an unknown job."""
        job = self.jobs.get(job_id)
        if job is None:
            return None
        task = self._tasks.get(job_id)
        if task is not None and not task.done():
            job.cancelled = True
            task.cancel()
        return job

    async def _run(self, job: Job, items: list[tuple[str, Grant | None]]) -> None:
        work = iter(items)

        async def worker() -> None:
            for target, grant in work:
                await self._one(job, target, grant)

        try:
            workers = itertools.repeat(None, self.node.config.prefetch.concurrency)
            await asyncio.gather(*(worker() for _ in workers))
        finally:
            job.finished_at = time.time()

    async def _one(self, job: Job, target: str, grant: Grant | None) -> None:
        node = self.node
        try:
            if grant is None:
                grant = self._authorize(target)
            held = await node.lookup(grant.spec.key, hit=False) if grant.policy.stored else None
            if held is not None:
                held.close()
            if held is not None and not held.stale:
                job.cached += 1
            elif not grant.policy.stored:
                raise BadRequest("draft_prefetch", "drafts are never stored; nothing to warm")
            else:
                fill, _ = node.obtain(grant, target, priority=Priority.PREFETCH)
                try:
                    await fill.until_done()
                finally:
                    fill.readers -= 1
        except (RequestError, FillFailed) as exc:
            job.failed += 1
            job.errors.append(f"{target.split('?')[0]}: {getattr(exc, 'code', exc)}")
        except Exception as exc:  # a job must survive any one item
            log.exception("prefetch of %s failed", target.split("?")[0])
            job.failed += 1
            job.errors.append(f"{target.split('?')[0]}: {type(exc).__name__}")
        job.done += 1

    def _authorize(self, target: str) -> Grant:
        path, _, query = target.partition("?")
        name = path[len(_SPEECH) :]
        key, _, ext = name.partition(".")
        fields = parse_qsl(query, keep_blank_values=True)
        flat = dict(fields)

        def parsed() -> tuple[dict[str, str], bool]:
            return flat, len(flat) != len(fields)

        # The admin is trusted, so an IP-bound URL is warmed regardless of the binding.
        return self.node.authorize(target, key, ext, parsed, None, trusted=True)

    async def stop(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        for task in list(self._tasks.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
