"""Node configuration: dataclasses with documented defaults, loaded from TOML by `load()`.
Secrets never live here; they come from the environment (`NEARVOICE_KEYS`,
`NEARVOICE_ADMIN_TOKEN`)."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
import typing
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from nearvoice.edge.cache.hot import HotSettings
from nearvoice.edge.cache.store import StoreSettings
from nearvoice.edge.checks import (
    ConfigError,
    at_least,
    between,
    http_url,
    in_section,
    one_of,
    positive,
    require,
)
from nearvoice.edge.http.tls import TlsSettings
from nearvoice.edge.limits import LimitSettings, Rates
from nearvoice.edge.memory import MemorySettings
from nearvoice.edge.nodeauth import NodeAuthSettings
from nearvoice.edge.policy import Policy, Retention
from nearvoice.edge.prefetch import PrefetchSettings
from nearvoice.edge.realtime.settings import RealtimeSettings
from nearvoice.edge.synth.torch_layout import TorchSettings, check_unique
from nearvoice.edge.upstream import UpstreamSettings

ADMIN_TOKEN_ENV = "NEARVOICE_ADMIN_TOKEN"  # noqa: S105 (the variable name, not a secret)
MINT_TOKEN_ENV = "NEARVOICE_MINT_TOKEN"  # noqa: S105 (the variable name, not a secret)
PROVIDERS = ("tensorrt", "cuda", "cpu")
MAX_THREADS = 1024  # more inference threads or worker processes than this is a typo
MAX_CLOCK_SKEW = 3600.0  # seconds: more grace than an hour is no longer a clock's error
MIN_LINE_SIZE = 8190  # bytes: aiohttp's own default request-line limit
SECTIONS = (
    "upstream", "store", "hot", "retention", "synth", "http", "prefetch", "memory", "realtime",
    "tls", "nodeauth",
)  # fmt: skip
"""The settings tables every role checks ([origin] and [[external]] are checked apart)."""


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
    """onnxruntime intra-op threads per inference thread. Renders change in their last
    bits with it: every node that renders must use the same value (docs/operations.md)."""
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

    def validate(self) -> None:
        between(self, "workers", 0, MAX_THREADS)
        between(self, "ort_threads", 1, MAX_THREADS)
        at_least(self, "max_text_chars", 1)
        at_least(self, "max_queue", 1)
        require(bool(self.providers), "providers", "must name at least one provider")
        for provider in self.providers:
            require(
                provider in PROVIDERS,
                "providers",
                f"{provider!r} is not one of {', '.join(PROVIDERS)}",
            )


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

    def validate(self) -> None:
        at_least(self, "max_ranges", 1)
        between(self, "clock_skew", 0, MAX_CLOCK_SKEW)
        at_least(self, "max_line_size", MIN_LINE_SIZE)
        at_least(self, "header_timeout", 0)
        at_least(self, "max_connections_per_client", 0)
        one_of(self, "access_log_format", ("text", "json"))
        for cidr in self.trusted_proxies:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ConfigError(f"trusted_proxies: {cidr!r} is not a CIDR") from None
        require(
            not self.proxy_protocol or bool(self.trusted_proxies),
            "proxy_protocol",
            "needs trusted_proxies: only their connections start with a PROXY header",
        )


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

    def validate(self) -> None:
        for name in ("name", "remote", "model_id"):
            require(bool(getattr(self, name)), name, "must not be empty")


@dataclass(frozen=True, slots=True)
class ExternalSettings:
    """An external TTS server the origin renders through (origin/external.py). Every node
    lists it too, so its voices are known and forwarded upstream; only origins call it."""

    name: str = "external"
    """Engine name, as reported in metrics."""
    base_url: str = ""
    protocol: str = "openai"
    """"openai" (POST /v1/audio/speech, streamed PCM), "piper" (POST /synthesize) or
    "indextts2" (index-tts-vllm's POST /tts_url, WAV)."""
    sample_rate: int = 24000
    """Hz of the audio the server returns."""
    timeout: float = 30.0
    """Seconds per connect or read."""
    api_key_env: str = ""
    """Environment variable holding the server's bearer token (never the token itself)."""
    voices: tuple[ExternalVoiceSettings, ...] = ()
    controls: tuple[str, ...] = ()
    """Optional spec controls the server honours (duration, emotion, ref, lang, ipa,
    pinyin; docs/contracts.md#spec-and-key): only the operator knows what its model supports."""
    clip_dir: str = ""
    """indextts2: a directory shared with the server, where reference clips are written."""
    remote_clip_dir: str = ""
    """indextts2: that directory as the server sees it (empty: the same path)."""
    seconds_per_char: float = 0.065
    """indextts2: seconds of speech per character at factor 1, to turn a spec's duration
    into IndexTTS 2.5's `duration_factor` (the achieved length is measured)."""

    def validate(self) -> None:
        require(bool(self.name), "name", "must not be empty")
        http_url("base_url", self.base_url)
        one_of(self, "protocol", ("openai", "piper", "indextts2"))
        positive(self, "seconds_per_char")
        positive(self, "sample_rate")
        positive(self, "timeout")
        for i, voice in enumerate(self.voices):
            in_section(f"voices[{i}]", voice)


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

    def validate(self) -> None:
        http_url("public_base", self.public_base)
        for edge in self.push_edges:
            http_url("push_edges", edge)
        positive(self, "default_ttl")
        require(
            self.max_ttl >= self.default_ttl,
            "max_ttl",
            f"{self.max_ttl} is less than default_ttl ({self.default_ttl})",
        )


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
    torch: tuple[TorchSettings, ...] = ()
    """transformers VITS checkpoints rendered with torch at the origin (`[[torch]]`)."""
    api: ApiSettings = field(default_factory=ApiSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    realtime: RealtimeSettings = field(default_factory=RealtimeSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    nodeauth: NodeAuthSettings = field(default_factory=NodeAuthSettings)
    hotkeys_capacity: int = 1024
    """Counters kept for the hot-keys report (bounded memory, Space-Saving)."""
    recency_flush: float = 30.0
    """Seconds between write-backs of hit recency to the disk index."""
    prefetch: PrefetchSettings = field(default_factory=PrefetchSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)

    def validate(self) -> NodeConfig:
        """Checks every setting's range and the rules between them; raises ConfigError
        naming the first one out of bounds. Returns the config, for chaining."""
        require(bool(self.host), "host", "must not be empty")
        between(self, "port", 1, 65535)
        between(self, "workers", 1, MAX_THREADS)
        at_least(self, "hotkeys_capacity", 1)
        positive(self, "recency_flush")
        for base in self.upstreams:
            http_url("upstreams", base)
        for name in SECTIONS:
            in_section(name, getattr(self, name))
        _check_api(self.api)
        _check_limits(self.limits)
        if self.role is Role.ORIGIN:
            in_section("origin", self.origin)
        for i, server in enumerate(self.external):
            in_section(f"external[{i}]", server)
        for i, voice in enumerate(self.torch):
            in_section(f"torch[{i}]", voice)
        check_unique(self.torch)
        return self

    @property
    def admin_token(self) -> str | None:
        return os.environ.get(ADMIN_TOKEN_ENV) or None

    def replace(self, **changes: Any) -> NodeConfig:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


_RATES = ("hit_rate", "hit_burst", "miss_rate", "miss_burst")


def _check_rates(section: str, rates: Any) -> None:
    for name in _RATES:
        try:
            at_least(rates, name, 0)
        except ConfigError as exc:
            raise ConfigError(f"[{section}] {exc}") from None


def _check_api(api: ApiSettings) -> None:
    for name in ("max_input_chars", "max_body_bytes", "url_ttl"):
        in_section("api", _Bound(api, name, 1))
    if api.public_base:
        in_section("api", _Url("public_base", api.public_base))
    for tenant, settings in api.tenants.items():
        _check_rates(f"api.tenants.{tenant}", settings)
        in_section(f"api.tenants.{tenant}", _Bound(settings, "realtime_sessions", 0))
        in_section(f"api.tenants.{tenant}", _Bound(settings, "realtime_chars_per_second", 0))


def _check_limits(limits: LimitSettings) -> None:
    _check_rates("limits", limits)
    in_section("limits", _Bound(limits, "max_buckets", 1))
    for policy, rates in limits.policy.items():
        if Policy.parse(policy) is None:
            raise ConfigError(f"[limits.policy] {policy!r} is not one of hot, personal, draft")
        _check_rates(f"limits.policy.{policy}", rates)


@dataclass(frozen=True, slots=True)
class _Bound:
    """One lower bound on a setting of a section whose class has no `validate`."""

    settings: Any
    name: str
    low: float

    def validate(self) -> None:
        at_least(self.settings, self.name, self.low)


@dataclass(frozen=True, slots=True)
class _Url:
    name: str
    value: str

    def validate(self) -> None:
        http_url(self.name, self.value)


def _build(cls: type[Any], data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"[{where}] must be a table, not {_shown(data)}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting(s) in [{where}]: {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        place = f"{where}.{name}".strip(".")
        if dataclasses.is_dataclass(default):
            values[name] = _build(type(default), value, place)
        elif (cls, name) in _TABLE_MAPS:
            item = _TABLE_MAPS[(cls, name)]
            if not isinstance(value, dict):
                raise ConfigError(f"[{place}] must be a table, not {_shown(value)}")
            values[name] = {
                str(key): _build(item, entry, f"{place}.{key}") for key, entry in value.items()
            }
        elif (cls, name) in _TABLE_ARRAYS:
            item = _TABLE_ARRAYS[(cls, name)]
            if not isinstance(value, list):
                raise ConfigError(f"{place}: must be an array of tables, not {_shown(value)}")
            values[name] = tuple(
                _build(item, entry, f"{place}[{i}]") for i, entry in enumerate(value)
            )
        else:
            values[name] = _typed(value, hints[name], place)
    return cls(**values)


def _typed(value: Any, hint: Any, place: str) -> Any:
    """`value` as a setting of type `hint`, or a ConfigError naming `place`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{place}: must be an array, not {_shown(value)}")
        return tuple(_typed(v, args[0], f"{place}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{place}: must be a table, not {_shown(value)}")
        return {str(k): _typed(v, args[1], f"{place}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{place}: must be true or false, not {_shown(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{place}: must be an integer, not {_shown(value)}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{place}: must be a number, not {_shown(value)}")
    if hint is str or hint is Path:
        if isinstance(value, str):
            return hint(value)
        raise ConfigError(f"{place}: must be a string, not {_shown(value)}")
    if isinstance(hint, type) and issubclass(hint, StrEnum):
        allowed = [m.value for m in hint]
        if value in allowed:
            return hint(value)
        raise ConfigError(f"{place}: must be one of {', '.join(allowed)}, not {_shown(value)}")
    raise ConfigError(f"{place}: unsupported setting type {hint!r}")  # pragma: no cover


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_TABLE_ARRAYS: dict[tuple[type[Any], str], type[Any]] = {
    (NodeConfig, "external"): ExternalSettings,
    (ExternalSettings, "voices"): ExternalVoiceSettings,
    (NodeConfig, "torch"): TorchSettings,
}
"""Settings that are arrays of tables, and the dataclass of each element."""

_TABLE_MAPS: dict[tuple[type[Any], str], type[Any]] = {
    (ApiSettings, "tenants"): TenantSettings,
    (LimitSettings, "policy"): Rates,
}
"""Settings that are tables of tables (name -> table), and the dataclass of each value."""


def load(
    path: Path | None = None,
    role: Role | None = Role.EDGE,
    defaults: dict[str, Any] | None = None,
) -> NodeConfig:
    """The role's defaults, overlaid with the TOML file at `path` if given. A file of
    another role is refused; `role=None` takes the file's own role (edge if it names none),
    for commands that read a node's settings without running it.

    `defaults`, if given, is a TOML table standing in for the role's built-in defaults
    (`nearvoice config show` passes the packaged configs/<role>.toml, which
    tests/test_config.py holds equal to them); the file overlays it the same way."""
    data: dict[str, Any] = {}
    if path is not None:
        with path.open("rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        named = data.get("role", Role.EDGE.value if role is None else role.value)
        if role is None:
            role = _typed(named, Role, "role")
        if named != role.value:
            raise ConfigError(
                f"{path} sets role = {named!r}, but this command runs the {role.value!r} role"
            )
    role = Role.EDGE if role is None else role
    base = _role_defaults(role) if defaults is None else {**defaults, "role": role.value}
    if path is not None:
        for name, value in data.items():
            if isinstance(value, dict) and isinstance(base.get(name), dict):
                base[name] = {**base[name], **value}
            else:
                base[name] = value
    try:
        config: NodeConfig = _build(NodeConfig, base, "")
        return config.validate()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None


def _role_defaults(role: Role) -> dict[str, Any]:
    """Where a role's defaults differ from the dataclasses' (the files in configs/ list
    the result)."""
    base: dict[str, Any] = {"role": role.value}
    if role is Role.SHIELD:
        base["synth"] = {"enabled": False}
        base["data_dir"] = ".nearvoice/shield"
        base["port"] = 8081
    if role is Role.ORIGIN:
        base["synth"] = {"voices": ["heart", "joe"], "providers": ["tensorrt", "cuda", "cpu"]}
        base["data_dir"] = ".nearvoice/origin"
        base["port"] = 8082
    return base
