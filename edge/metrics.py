"""Prometheus metrics with the contract names of docs/contracts.md#metrics."""

from __future__ import annotations

import os
from collections.abc import Iterable
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


API_ENDPOINTS = ("speech", "models", "voices")
API_CODES: dict[str, tuple[int, ...]] = {
    "speech": (200, 400, 401, 413, 429, 500, 502, 503, 504),
    "models": (200, 401),
    "voices": (200, 401),
}
"""Every status each API endpoint answers with, created at zero when the node starts."""


class LimitScope(StrEnum):
    """What a rate-limited request was refused for (`nearvoice_rate_limited_total{scope}`)."""

    HIT = "hit"
    MISS = "miss"
    API = "api"
    REALTIME = "realtime"


TOKEN_REJECTION_REASONS = (
    # edge.token: the URL's shape, signature, seal and use
    "unknown_parameter",
    "repeated_parameter",
    "missing_parameter",
    "bad_signature",
    "unknown_kid",
    "bad_seal",
    "bad_expiry",
    "bad_policy",
    "bad_ip",
    "key_mismatch",
    "expired",
    "ip_mismatch",
    # edge.spec: a sealed spec that does not parse
    "bad_spec",
    "empty_text",
    "bad_speed",
    # edge.node: the path against the spec and this node's limits and voices
    "malformed_key",
    "unsupported_format",
    "format_mismatch",
    "text_too_long",
    "unknown_voice",
)
"""Every `reason` of `nearvoice_token_rejections_total` that a signed URL can be refused
for (the `error` codes of the authorize step), created at zero when a node starts."""


REALTIME_SEGMENT_RESULTS = ("hit", "miss", "collapsed")
REALTIME_CLOSE_REASONS = (
    "done",
    "client",
    "binary_frame",
    "token_expired",
    "message_too_big",
    "rate_limit",
    "idle",
    "too_many_sessions",
    "slow_reader",
)
"""Every `reason` of `nearvoice_realtime_closes_total` (edge.realtime.protocol.Close)."""
FIRST_AUDIO_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5)

# Time to first byte spans a memory hit (~100 us) to a long render (seconds).
TTFB_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
SYNTH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Utterances per batch, from a lone render to the largest batch a GPU takes."""


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
        self.batch_size = Histogram(
            "nearvoice_batch_size",
            "Utterances per batch run by engines that batch, by engine.",
            ["engine"],
            buckets=BATCH_BUCKETS,
            registry=r,
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
        self.hot_bytes = Gauge(
            "nearvoice_hot_bytes",
            "Bytes of object bodies held in memory by the hot tier (at most [hot] memory_budget"
            " per process).",
            registry=r,
            multiprocess_mode="livesum",
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
        # |achieved - target| / target of every render fitted to a spec's duration, by
        # engine: local fits stay within 2 % or a frame, external servers say nothing.
        self.duration_error = Histogram(
            "nearvoice_duration_error_ratio",
            "Relative error of fitted durations (|achieved - target| / target), by engine.",
            ["engine"],
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5),
            registry=r,
        )
        self.api_requests = Counter(
            "nearvoice_api_requests",
            "OpenAI-compatible API requests, by endpoint and HTTP status.",
            ["endpoint", "code"],
            registry=r,
        )
        for endpoint in API_ENDPOINTS:
            for code in API_CODES[endpoint]:
                self.api_requests.labels(endpoint, str(code))
        self.rate_limited = Counter(
            "nearvoice_rate_limited",
            "Requests refused with 429, by the budget they were over.",
            ["scope"],
            registry=r,
        )
        # 1 while an upstream's circuit breaker is not closed (open, or half-open waiting
        # for its trial request); with workers, any worker's open breaker shows.
        self.upstream_circuit_open = Gauge(
            "nearvoice_upstream_circuit_open",
            "1 while the upstream's circuit breaker is open or half-open.",
            ["upstream"],
            registry=r,
            multiprocess_mode="livemax",
        )
        # 1 once the engines are warm (what /readyz answers); with workers, the least ready.
        self.ready = Gauge(
            "nearvoice_ready",
            "1 once the node's engines are warm and it takes traffic.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.realtime_sessions = Gauge(
            "nearvoice_realtime_sessions",
            "Realtime sessions open.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.realtime_first_audio = Histogram(
            "nearvoice_realtime_first_audio_seconds",
            "Seconds from a realtime segment's last text byte to its first audio byte.",
            buckets=FIRST_AUDIO_BUCKETS,
            registry=r,
        )
        self.realtime_segments = Counter(
            "nearvoice_realtime_segments",
            "Realtime segments, by what the cache had.",
            ["result"],
            registry=r,
        )
        self.realtime_closes = Counter(
            "nearvoice_realtime_closes",
            "Realtime sessions ended, by reason.",
            ["reason"],
            registry=r,
        )
        for result in REALTIME_SEGMENT_RESULTS:
            self.realtime_segments.labels(result)
        for reason in REALTIME_CLOSE_REASONS:
            self.realtime_closes.labels(reason)
        for scope in LimitScope:
            self.rate_limited.labels(scope.value)
        for reason in TOKEN_REJECTION_REASONS:
            self.token_rejections.labels(reason)
        # Pre-create the label sets of the contract so dashboards see zeros, not gaps, and
        # keep the children: a `labels()` lookup per request is a visible hot-path cost.
        self.requests_by = {result: self.requests.labels(result.value) for result in Result}
        self.bytes_by = {source: self.response_bytes.labels(source.value) for source in Source}
        self.ttfb_by = {result: self.ttfb.labels(result.value) for result in Result}

    def expect(
        self,
        *,
        engines: Iterable[str] = (),
        upstream_reasons: Iterable[str] = (),
        batching: Iterable[str] = (),
    ) -> None:
        """Creates the series this node can emit at zero (docs/contracts.md#metrics), so that
        dashboards and alerts see them before their first event."""
        for engine in engines:
            self.synth.labels(engine)
        for engine in batching:
            self.batch_size.labels(engine)
        for reason in upstream_reasons:
            self.upstream.labels(reason)

    def circuit(self, upstream: str, is_open: bool) -> None:
        """Records a change of `upstream`'s circuit breaker (edge.upstream)."""
        self.upstream_circuit_open.labels(upstream).set(1 if is_open else 0)

    def render(self) -> bytes:
        """The exposition. With `--workers N` every worker writes its values under
        $PROMETHEUS_MULTIPROC_DIR and any worker answers for the sum of all of them."""
        directory = os.environ.get(MULTIPROC_ENV)
        if directory:
            merged = CollectorRegistry()
            MultiProcessCollector(merged, path=directory)  # type: ignore[no-untyped-call]
            return generate_latest(merged)
        return generate_latest(self.registry)
