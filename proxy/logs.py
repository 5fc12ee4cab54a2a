"""structlog set-up: one event per line on stderr, and a redaction processor in front of
every renderer.

Redaction works three ways, so that a value a developer later logs by mistake is still
caught: keys that name credentials are blanked whatever their value; registered values (the
client secret, the inbound token, every token obtained) are cut out of any string; and
strings shaped like credentials (`Bearer …`, `Basic …`, a JWT) are masked.
"""

from __future__ import annotations

import logging
import re
import sys
from collections import deque
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog
from aiohttp.http_exceptions import HttpProcessingError

REDACTED = "[redacted]"

SENSITIVE_KEYS = frozenset(
    {
        "authorization", "proxy-authorization", "proxy_authorization", "cookie", "set-cookie",
        "x-proxy-token", "x_proxy_token", "inbound_token", "token", "access_token",
        "client_secret", "secret", "password",
    }
)
_SHAPES = re.compile(
    r"(?i)\b(bearer|basic)\s+[A-Za-z0-9\-._~+/]+=*"  # RFC 6750 / RFC 7617 credentials
    r"|eyJ[A-Za-z0-9_\-]*\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*"  # a JWT
)
_SHAPE_HINTS = re.compile("(?i:bearer|basic)|eyJ")  # a cheap first look before _SHAPES
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class Redactor:
    """The structlog processor that keeps secrets out of every line."""

    def __init__(self, keep: int = 16) -> None:
        self._values: deque[str] = deque(maxlen=keep)

    def add(self, value: str | None) -> None:
        """Never log `value` (a secret or a token). The newest `keep` values are remembered."""
        if value and value not in self._values:
            self._values.append(value)

    def __call__(self, _logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in event.items():
            if key.lower() in SENSITIVE_KEYS:
                event[key] = REDACTED
            elif isinstance(value, str):
                event[key] = self.scrub(value)
            elif isinstance(value, dict | list | tuple):
                event[key] = self._deep(value)
        return event

    def scrub(self, text: str) -> str:
        for secret in self._values:
            if secret in text:
                text = text.replace(secret, REDACTED)
        if _SHAPE_HINTS.search(text):
            text = _SHAPES.sub(lambda m: (m[1] + " " if m[1] else "") + REDACTED, text)
        return text

    def _deep(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: REDACTED if str(k).lower() in SENSITIVE_KEYS else self._deep(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._deep(v) for v in value]
        if isinstance(value, str):
            return self.scrub(value)
        return value


class _TerseParseErrors(logging.Filter):
    """aiohttp logs a malformed request with the offending bytes, which may hold a header value;
    keep the status and the kind of error, drop the bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = "rejected a malformed HTTP request: %s (%s)"
            record.args = (type(exc).__name__, exc.code)
            record.exc_info = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def configure(
    level: str = "info",
    fmt: str = "auto",
    *,
    redactor: Redactor | None = None,
    stream: TextIO | None = None,
    cache: bool = True,
) -> Redactor:
    """Route structlog and the stdlib's loggers (aiohttp's, asyncio's) to one stream."""
    stream = stream or sys.stderr
    redactor = redactor or Redactor()
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty(), pad_event_to=18)
    else:
        renderer = structlog.processors.JSONRenderer()
    shared: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # tracebacks become text before the redactor, so it scrubs them too
    tail: list[Any] = [structlog.processors.format_exc_info, redactor, renderer]
    structlog.configure(
        processors=[*shared, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=cache,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
        )
    )
    handler.addFilter(_TerseParseErrors())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(LEVELS[level], logging.INFO))  # aiohttp's debug chatter is not ours
    return redactor
