"""`nearvoice config show`: a node's effective configuration, as TOML.

The layers are the ones a node applies: the role's defaults, read from the packaged
`nearvoice/configs/<role>.toml` with importlib.resources (so the command works from an
installed wheel, not only from a checkout; tests/test_config.py holds those files equal
to the built-in defaults a node starts from), then `--config FILE` over them, validated as
the node would. What the node takes from the environment follows as comments, and the
output parses back to the same configuration: `nearvoice config show > node.toml` is a
valid `--config`.

Secrets only ever come from the environment (docs/operations.md), and none is printed:
signing keys show their key ids, API keys their tenants, tokens and cloud credentials only
whether they are set. A password inside a URL setting is masked too.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from enum import Enum
from pathlib import Path
from typing import Any

from nearvoice.edge.apikeys import API_KEYS_ENV, ApiKeys
from nearvoice.edge.config import ADMIN_TOKEN_ENV, MINT_TOKEN_ENV, NodeConfig, Role, load
from nearvoice.edge.keyring import KEYS_ENV, Keyring

MASK = "********"
LOG_LEVEL_ENV = "NEARVOICE_LOG_LEVEL"
AWS_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
AWS_REGIONS = ("AWS_REGION", "AWS_DEFAULT_REGION")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/@:\s]*):[^/@\s]*@", re.I)


def packaged_defaults(role: Role) -> dict[str, Any]:
    """The packaged configs/<role>.toml, parsed."""
    text = importlib.resources.files("nearvoice").joinpath("configs", f"{role.value}.toml")
    return tomllib.loads(text.read_text(encoding="utf-8"))


def effective(role: Role | None, path: Path | None) -> NodeConfig:
    """The configuration a node of `role` started with `--config path` runs with (role
    None: the file's own, else edge). Raises ConfigError or OSError."""
    if role is None and path is not None:
        role = load(path, role=None).role
    role = role or Role.EDGE
    return load(path, role, defaults=packaged_defaults(role))


def show(config: NodeConfig, environ: Mapping[str, str] | None = None) -> str:
    """`config` as TOML, then the environment's part as comments, secrets masked."""
    env = os.environ if environ is None else environ
    data = _plain(config)
    if config.role is not Role.ORIGIN:
        del data["origin"]  # only an origin reads [origin]; the role files leave it out
    lines = [
        f"# Effective configuration of the {config.role.value} role: packaged defaults, then",
        "# --config, as the node validates them. Secrets come from the environment only.",
        *_table(data, ()),
        "",
        "# From the environment (secrets masked):",
        *(f"#   {name} = {value}" for name, value in environment(config, env)),
    ]
    return "\n".join(lines) + "\n"


def environment(config: NodeConfig, env: Mapping[str, str]) -> list[tuple[str, str]]:
    """What the node reads from the environment, as (variable, shown value) pairs; a secret
    is shown as set or not, never itself."""
    out = [(KEYS_ENV, _keys(env.get(KEYS_ENV))), (ADMIN_TOKEN_ENV, _set(env, ADMIN_TOKEN_ENV))]
    out.append((API_KEYS_ENV, _tenants(env.get(API_KEYS_ENV))))
    if config.role is Role.ORIGIN:
        out.append((MINT_TOKEN_ENV, _set(env, MINT_TOKEN_ENV)))
        if config.origin.store.startswith("s3://"):
            out += [(name, _set(env, name)) for name in AWS_SECRETS]
            out += [(name, json.dumps(env[name])) for name in AWS_REGIONS if name in env]
    for server in config.external:
        if server.api_key_env:
            out.append((server.api_key_env, _set(env, server.api_key_env)))
    if LOG_LEVEL_ENV in env:
        out.append((LOG_LEVEL_ENV, json.dumps(env[LOG_LEVEL_ENV])))
    return out


def _set(env: Mapping[str, str], name: str) -> str:
    return f"{MASK} (set)" if env.get(name) else "(not set)"


def _keys(raw: str | None) -> str:
    return _names(raw, lambda text: Keyring.parse(text).kids)


def _tenants(raw: str | None) -> str:
    return _names(raw, lambda text: ApiKeys.parse(text).tenants)


def _names(raw: str | None, names: Callable[[str], Iterable[str]]) -> str:
    """A `name:secret,…` variable as its names, each secret masked."""
    if not raw:
        return "(not set)"
    try:
        listed = names(raw)
    except ValueError:  # KeyringError is one
        return f"{MASK} (set, but not valid: `nearvoice edge` says why)"
    return ", ".join(f"{name}:{MASK}" for name in listed)


def _plain(value: Any) -> Any:
    """Settings as TOML's types: tables, arrays, strings, numbers, booleans."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str):
        return _URL_PASSWORD.sub(rf"\g<head>:{MASK}@", value)
    return value


def _is_tables(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _table(table: dict[str, Any], path: tuple[str, ...], array: bool = False) -> list[str]:
    """One table: its header (none at the top), its plain keys, then its sub-tables and
    arrays of tables, as TOML requires."""
    lines: list[str] = []
    if path:
        name = ".".join(_key(p) for p in path)
        lines += ["", f"[[{name}]]" if array else f"[{name}]"]
    for key, value in table.items():
        if not isinstance(value, dict) and not _is_tables(value):
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in table.items():
        if isinstance(value, dict):
            lines += _table(value, (*path, key))
        elif _is_tables(value):
            for item in value:
                lines += _table(item, (*path, key), array=True)
    return lines


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")  # pragma: no cover - settings are typed
