"""Prometheus metrics with the contract names of DESIGN.md section 5."""

from __future__ import annotations

import os
from enum import StrEnum

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# `*_created` series double the exposition size and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Result(StrEnum):
    HIT = "hit"
    MISS = "miss"
    STALE = "stale"
    COLLAPSED = "collapsed"
    BYPASS = "bypass"
    REJECTED = "rejected"
    ERROR = "error"


class Source(StrEnum):
    CACHE = "cache"
    SYNTH = "synth"
    UPSTREAM = "upstream"


RATE_LIMIT_SCOPES = ("hit", "miss", "api", "realtime")
"""`nearvoice_rate_limited_total{scope}` (edge.limits)."""
API_ENDPOINTS = ("speech", "models", "voices")
API_CODES: dict[str, tuple[int, ...]] = {
    "speech": (200, 400, 401, 413, 429, 500, 502, 503, 504),
    "models": (200, 401),
    "voices": (200, 401),
}
"""Every status each API endpoint answers with, created at zero when the node starts."""

# Time to first byte spans a memory hit (~100 us) to a long render (seconds).
TTFB_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
SYNTH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "nearvoice_requests", "Speech requests by cache result.", ["result"], registry=r
        )
        self.response_bytes = Counter(
            "nearvoice_response_bytes", "Body bytes sent, by source.", ["source"], registry=r
        )
        self.ttfb = Histogram(
            "nearvoice_ttfb_seconds",
            "Seconds from request to the first body byte, by result.",
            ["result"],
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        self.synth = Counter("nearvoice_synth", "Renders started.", ["engine"], registry=r)
        self.synth_seconds = Histogram(
            "nearvoice_synth_seconds", "Seconds per render.", buckets=SYNTH_BUCKETS, registry=r
        )
        self.synth_audio = Counter(
            "nearvoice_synth_audio_seconds", "Seconds of audio rendered.", registry=r
        )
        self.render_queue = Gauge(
            "nearvoice_render_queue_depth",
            "Renders waiting or running.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.upstream = Counter(
            "nearvoice_upstream_requests", "Upstream fetches, by reason.", ["reason"], registry=r
        )
        # Every worker reads the same shared store, so the latest reading is the answer.
        self.cache_bytes = Gauge(
            "nearvoice_cache_bytes",
            "Bytes held by the disk cache.",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.cache_objects = Gauge(
            "nearvoice_cache_objects",
            "Objects held by the disk cache.",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.evictions = Counter("nearvoice_evictions", "Objects evicted for space.", registry=r)
        self.token_rejections = Counter(
            "nearvoice_token_rejections", "Refused signed URLs, by reason.", ["reason"], registry=r
        )
        self.engine_provider = Gauge(
            "nearvoice_engine_provider",
            "1 for the execution provider each engine runs on.",
            ["engine", "provider"],
            registry=r,
            multiprocess_mode="max",
        )
        self.store_errors = Counter(
            "nearvoice_store_errors",
            "Objects that could not be stored (disk full, I/O).",
            registry=r,
        )
        self.length_mismatches = Counter(
            "nearvoice_length_mismatches",
            "Renders aborted because the duration pass and the render disagreed, by engine.",
            ["engine"],
            registry=r,
        )
        self.rate_limited = Counter(
            "nearvoice_rate_limited",
            "Requests refused by a rate limit, by scope (hit|miss|api|realtime).",
            ["scope"],
            registry=r,
        )
        self.api_requests = Counter(
            "nearvoice_api_requests",
            "OpenAI-compatible API requests, by endpoint and HTTP status.",
            ["endpoint", "code"],
            registry=r,
        )
        for scope in RATE_LIMIT_SCOPES:
            self.rate_limited.labels(scope)
        for endpoint in API_ENDPOINTS:
            for code in API_CODES[endpoint]:
                self.api_requests.labels(endpoint, str(code))
        # Pre-create the label sets of the contract so dashboards see zeros, not gaps, and
        # keep the children: a `labels()` lookup per request is a visible hot-path cost.
        self.requests_by = {result: self.requests.labels(result.value) for result in Result}
        self.bytes_by = {source: self.response_bytes.labels(source.value) for source in Source}
        self.ttfb_by = {result: self.ttfb.labels(result.value) for result in Result}

    def render(self) -> bytes:
        """The exposition. With `--workers N` every worker writes its values under
        $PROMETHEUS_MULTIPROC_DIR and any worker answers for the sum of all of them."""
        directory = os.environ.get(MULTIPROC_ENV)
        if directory:
            merged = CollectorRegistry()
            MultiProcessCollector(merged, path=directory)  # type: ignore[no-untyped-call]
            return generate_latest(merged)
        return generate_latest(self.registry)
