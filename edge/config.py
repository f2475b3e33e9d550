"""Node configuration: dataclasses with documented defaults, loaded from TOML by `load()`.
Secrets never live here; they come from the environment (`NEARVOICE_KEYS`,
`NEARVOICE_ADMIN_TOKEN`)."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from edge.cache.hot import HotSettings
from edge.cache.store import StoreSettings
from edge.http.tls import TlsSettings
from edge.limits import LimitSettings, Rates
from edge.nodeauth import NodeAuthSettings
from edge.policy import Policy, Retention
from edge.upstream import UpstreamSettings

ADMIN_TOKEN_ENV = "NEARVOICE_ADMIN_TOKEN"  # noqa: S105 (the variable name, not a secret)
MINT_TOKEN_ENV = "NEARVOICE_MINT_TOKEN"  # noqa: S105 (the variable name, not a secret)


class Role(StrEnum):
    EDGE = "edge"
    SHIELD = "shield"
    ORIGIN = "origin"


@dataclass(frozen=True, slots=True)
class SynthSettings:
    enabled: bool = True
    """Render misses locally. Off by default on a shield."""
    voices: tuple[str, ...] = ("heart",)
    """Voices this node renders itself."""
    workers: int = 0
    """Inference threads; 0 means one per CPU core."""
    ort_threads: int = 1
    """onnxruntime intra-op threads per inference thread."""
    max_text_chars: int = 5000
    """Longest text, in characters after normalization, that a URL may carry."""
    max_queue: int = 64
    """Renders queued or running per engine before misses go upstream (or get 503)."""
    providers: tuple[str, ...] = ("cpu",)
    """onnxruntime execution providers to try, best first: "tensorrt", "cuda", "cpu"."""
    exports: dict[str, str] = field(default_factory=dict)
    """Voice -> export directory written by `nearvoice export optimize`: the voice renders
    the fastest variant there that passed parity on the first provider in `providers`."""
    variants: dict[str, str] = field(default_factory=dict)
    """Voice -> variant name, pinning an export's variant instead of choosing by speed:
    tiers that pin the same variant render the same URLs."""


@dataclass(frozen=True, slots=True)
class HttpSettings:
    max_ranges: int = 16
    """Most ranges one request may ask for before the Range header is ignored (200)."""
    sendfile: bool = True
    """Send large bodies with sendfile(2); off falls back to read-and-write."""
    clock_skew: float = 30.0
    """Seconds past `exp` a URL is still accepted, for clocks that disagree."""
    max_line_size: int = 65536
    """Bytes allowed in the request line: sealed specs of long texts make long URLs."""
    access_log: bool = False
    """Log every request (edge.http.logs; the fast path writes its records too)."""
    fast_path: bool = True
    """Answer simple in-memory hits beneath aiohttp's request machinery (edge.http.fastpath)."""
    trusted_proxies: tuple[str, ...] = ()
    """CIDRs of proxies and load balancers whose X-Forwarded-For (or PROXY header) names
    the client (edge.http.proxies); from any other peer such headers are ignored."""
    proxy_protocol: bool = False
    """Connections from trusted proxies start with a PROXY protocol v1/v2 header."""
    header_timeout: float = 10.0
    """Seconds a client may take to send a complete request head (slowloris); 0: off."""
    max_connections_per_client: int = 1024
    """Open connections per client address (per worker); trusted proxies and node-signed
    tiers are exempt; 0: unlimited."""
    access_log_format: str = "text"
    """"text" (aiohttp's line) or "json" (one object per request, the fast path's too)."""


@dataclass(frozen=True, slots=True)
class ExternalVoiceSettings:
    name: str = ""
    """The nearvoice voice name players' URLs carry."""
    remote: str = ""
    """The external server's own voice id."""
    model_id: str = ""
    """Identity in specs, `<engine>-<voice>@<version>`: change it when the model changes."""
    remote_model: str = "tts-1"
    """The OpenAI `model` field (openai protocol only)."""


@dataclass(frozen=True, slots=True)
class ExternalSettings:
    """An external TTS server the origin renders through (origin/external.py). Every node
    lists it too, so its voices are known and forwarded upstream; only origins call it."""

    name: str = "external"
    """Engine name, as reported in metrics."""
    base_url: str = ""
    protocol: str = "openai"
    """"openai" (POST /v1/audio/speech, streamed PCM) or "piper" (POST /synthesize)."""
    sample_rate: int = 24000
    """Hz of the audio the server returns."""
    timeout: float = 30.0
    """Seconds per connect or read."""
    api_key_env: str = ""
    """Environment variable holding the server's bearer token (never the token itself)."""
    voices: tuple[ExternalVoiceSettings, ...] = ()


@dataclass(frozen=True, slots=True)
class OriginSettings:
    public_base: str = "http://127.0.0.1:8080"
    """Base URL of the public edge tier that minted URLs point at."""
    store: str = ""
    """Persistent object store: a path or file:// URL, or s3://bucket/prefix?endpoint=URL
    (credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY). Empty: none."""
    push_edges: tuple[str, ...] = ()
    """Edges told to prefetch every `hot` object this origin renders."""
    default_ttl: int = 3600
    """Seconds a minted URL stays valid when the request names no ttl."""
    max_ttl: int = 30 * 86400
    """Longest validity a minted URL may ask for, in seconds."""


@dataclass(frozen=True, slots=True)
class TenantSettings:
    """`[api.tenants.<name>]`: one API key's tenant (the key itself comes from
    NEARVOICE_API_KEYS). A tenant without a table gets these defaults."""

    policy: Policy = Policy.HOT
    """Caching policy of the tenant's objects: hot, personal or draft (never stored)."""
    hit_rate: float = 0.0
    """API requests per second that start no render (hits, joins); 0: unlimited."""
    hit_burst: float = 0.0
    """Hits allowed at once above `hit_rate`; 0 means `hit_rate`."""
    miss_rate: float = 0.0
    """API requests per second that start a render or an upstream fetch; 0: unlimited."""
    miss_burst: float = 0.0
    """Misses allowed at once above `miss_rate`; 0 means `miss_rate`."""
    realtime_sessions: int = 4
    """Realtime sessions the tenant may hold open at once."""
    realtime_chars_per_second: float = 0.0
    """Text characters per second a realtime session may send; 0: unlimited."""

    @property
    def rates(self) -> Rates:
        return Rates(self.hit_rate, self.hit_burst, self.miss_rate, self.miss_burst)


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """`[api]`: the OpenAI-compatible speech API (edge.handlers.openai)."""

    max_input_chars: int = 4096
    """Longest `input`, in characters (OpenAI's limit)."""
    max_body_bytes: int = 65536
    """Largest request body in bytes (4,096 characters of UTF-8 plus the other fields)."""
    public_base: str = ""
    """Base URL of the signed CDN URL each answer names in Content-Location; empty: the
    node the request came to (its Host)."""
    url_ttl: int = 86400
    """Seconds the Content-Location URL stays valid."""
    voices: dict[str, str] = field(default_factory=dict)
    """`[api.voices]`: alias = voice, e.g. `alloy = "heart"`; aliases name the same object
    as the voice itself."""
    tenants: dict[str, TenantSettings] = field(default_factory=dict)
    """`[api.tenants.<name>]`: per-tenant policy and limits."""

    def tenant(self, name: str) -> TenantSettings:
        return self.tenants.get(name) or _DEFAULT_TENANT


_DEFAULT_TENANT = TenantSettings()


@dataclass(frozen=True, slots=True)
class NodeConfig:
    role: Role = Role.EDGE
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path(".nearvoice/edge")
    workers: int = 1
    """Processes sharing the port with SO_REUSEPORT."""
    upstreams: tuple[str, ...] = ()
    """Base URLs of the next tier (shields, then origins), tried in rendezvous order."""
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    hot: HotSettings = field(default_factory=HotSettings)
    retention: Retention = field(default_factory=Retention)
    synth: SynthSettings = field(default_factory=SynthSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    origin: OriginSettings = field(default_factory=OriginSettings)
    external: tuple[ExternalSettings, ...] = ()
    """External TTS servers (`[[external]]` tables)."""
    api: ApiSettings = field(default_factory=ApiSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    nodeauth: NodeAuthSettings = field(default_factory=NodeAuthSettings)
    hotkeys_capacity: int = 1024
    """Counters kept for the hot-keys report (bounded memory, Space-Saving)."""
    recency_flush: float = 30.0
    """Seconds between write-backs of hit recency to the disk index."""

    @property
    def admin_token(self) -> str | None:
        return os.environ.get(ADMIN_TOKEN_ENV) or None

    def replace(self, **changes: Any) -> NodeConfig:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def _build(cls: type[Any], data: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown setting(s) in [{where}]: {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            values[name] = _build(type(default), value, f"{where}.{name}".strip("."))
        elif (cls, name) in _TABLE_MAPS:
            item = _TABLE_MAPS[(cls, name)]
            if not isinstance(value, dict):
                raise ValueError(f"[{where}.{name}] must be a table".replace("[.", "["))
            values[name] = {
                str(key): _build(item, entry, f"{where}.{name}.{key}".strip("."))
                for key, entry in value.items()
            }
        elif (cls, name) in _TABLE_ARRAYS:
            item = _TABLE_ARRAYS[(cls, name)]
            values[name] = tuple(
                _build(item, entry, f"{where}.{name}[{i}]".strip("."))
                for i, entry in enumerate(value)
            )
        elif isinstance(default, tuple):
            values[name] = tuple(value)
        elif isinstance(default, Path):
            values[name] = Path(value)
        elif isinstance(default, StrEnum):
            values[name] = type(default)(value)
        else:
            values[name] = value
    return cls(**values)


_TABLE_ARRAYS: dict[tuple[type[Any], str], type[Any]] = {
    (NodeConfig, "external"): ExternalSettings,
    (ExternalSettings, "voices"): ExternalVoiceSettings,
}
"""Settings that are arrays of tables, and the dataclass of each element."""

_TABLE_MAPS: dict[tuple[type[Any], str], type[Any]] = {
    (ApiSettings, "tenants"): TenantSettings,
    (LimitSettings, "policy"): Rates,
}
"""Settings that are tables of tables (name -> table), and the dataclass of each value."""


def load(path: Path | None = None, role: Role = Role.EDGE) -> NodeConfig:
    """The role's defaults, overlaid with the TOML file at `path` if given."""
    base: dict[str, Any] = {"role": role.value}
    if role is Role.SHIELD:
        base["synth"] = {"enabled": False}
        base["data_dir"] = ".nearvoice/shield"
    if role is Role.ORIGIN:
        base["synth"] = {"voices": ["heart", "joe"], "providers": ["tensorrt", "cuda", "cpu"]}
        base["data_dir"] = ".nearvoice/origin"
    if path is not None:
        with path.open("rb") as f:
            data = tomllib.load(f)
        for name, value in data.items():
            if isinstance(value, dict) and isinstance(base.get(name), dict):
                base[name] = {**base[name], **value}
            else:
                base[name] = value
    config: NodeConfig = _build(NodeConfig, base, "")
    return config
