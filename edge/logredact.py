"""Keeps credentials out of logged request lines.

A browser's realtime session token travels in the query (`?token=`,
docs/contracts.md#realtime-speech), since a WebSocket cannot carry headers from a page;
aiohttp's access log writes the request line (`%r`) as it came. A filter on the
`aiohttp.access` logger rewrites every record's message with the value of `token` replaced,
whatever format the log uses.
"""

from __future__ import annotations

import logging
import re

SECRET_PARAMS = ("token",)
_PATTERN = re.compile(r"([?&](?:" + "|".join(SECRET_PARAMS) + r")=)[^&\s\"]*")
ACCESS_LOGGER = "aiohttp.access"


def redact(text: str) -> str:
    """`text` with the value of every secret query parameter replaced by `REDACTED`."""
    return _PATTERN.sub(r"\1REDACTED", text)


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def install(logger_name: str = ACCESS_LOGGER) -> None:
    """Adds the filter to the access logger, once."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, RedactSecrets) for f in logger.filters):
        logger.addFilter(RedactSecrets())
