"""Log lines that leak nothing, and the access log in text or JSON.

A signed URL's `s` (the sealed spec), `sig`, an API `token` and `Authorization` values are
credentials or carry the text: a working URL must not be recoverable from a log. `redact`
masks them in any string; `RedactingFilter`, installed on the root handlers by
`install_redaction`, applies it to every record any logger writes (aiohttp's included),
after formatting its arguments.

The access log (`[http] access_log`) has one record per request, naming the client as
trusted proxies report it (edge.http.proxies), written by
`EdgeAccessLogger` for aiohttp's path and by `write_access` from the fast path
(edge.http.fastpath), so turning it on keeps the fast path: `[http] access_log_format`
"text" gives a combined-log-like line, "json" one JSON object per line.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from nearvoice.edge.http.proxies import client_address

MASK = "REDACTED"
_QUERY_SECRET = re.compile(r"(?i)((?<![\w.-])(?:s|sig|token|api_key)=)[^&\s\"';]*")
_AUTH = re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?\s*(?:\w+\s+)?)[^\s\"',}]+")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',}]+")
_NODE = re.compile(r"(?i)(x-nearvoice-node[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+")


def redact(text: str) -> str:
    """`text` with credential-bearing query values and header values masked."""
    if "=" not in text and ":" not in text and "earer" not in text:
        return text
    text = _QUERY_SECRET.sub(rf"\g<1>{MASK}", text)
    text = _AUTH.sub(rf"\g<1>{MASK}", text)
    text = _BEARER.sub(rf"\g<1>{MASK}", text)
    return _NODE.sub(rf"\g<1>{MASK}", text)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True


def install_redaction(logger: logging.Logger | None = None) -> RedactingFilter:
    """Adds the filter to every handler of `logger` (the root logger by default)."""
    target = logger or logging.getLogger()
    found = RedactingFilter()
    for handler in target.handlers:
        handler.addFilter(found)
    return found


def _record(
    remote: str | None,
    method: str,
    target: str,
    version: str,
    status: int,
    size: int,
    seconds: float,
    agent: str,
) -> dict[str, Any]:
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "remote": remote,
        "method": method,
        "target": redact(target),
        "version": version,
        "status": status,
        "bytes": size,
        "seconds": round(seconds, 6),
        "user_agent": agent[:200],
    }


def format_record(record: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(record, separators=(",", ":"))
    return (
        f'{record["remote"]} "{record["method"]} {record["target"]} HTTP/{record["version"]}" '
        f'{record["status"]} {record["bytes"]} {record["seconds"]:.6f} "{record["user_agent"]}"'
    )


def write_access(
    logger: logging.Logger,
    fmt: str,
    remote: str | None,
    method: str,
    target: str,
    status: int,
    size: int,
    seconds: float,
    agent: str = "",
) -> None:
    """One access record from the fast path, as `EdgeAccessLogger` writes it."""
    record = _record(remote, method, target, "1.1", status, size, seconds, agent)
    logger.info("%s", format_record(record, fmt))


class EdgeAccessLogger(AbstractAccessLogger):
    """aiohttp's access logger interface, writing `format_record` lines."""

    fmt = "text"

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        size = getattr(response, "body_bytes", None)
        if size is None:
            size = response.body_length
        version = f"{request.version.major}.{request.version.minor}"
        record = _record(
            client_address(request),
            request.method,
            request.raw_path,
            version,
            response.status,
            int(size),
            time,
            request.headers.get("User-Agent", ""),
        )
        self.logger.info("%s", format_record(record, self.fmt))


class JsonAccessLogger(EdgeAccessLogger):
    fmt = "json"


def access_logger_class(fmt: str) -> type[EdgeAccessLogger]:
    if fmt not in ("text", "json"):
        raise ValueError(f'[http] access_log_format must be "text" or "json", not {fmt!r}')
    return JsonAccessLogger if fmt == "json" else EdgeAccessLogger
