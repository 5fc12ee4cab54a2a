"""structlog set-up: one event per line on stderr, and a redaction processor in front of
every renderer.

Redaction works three ways, so that a value a developer later logs by mistake is still
caught: keys that name credentials are blanked whatever their value; registered values (the
client secret, the inbound token, every token obtained) are cut out of any string; and
strings shaped like credentials (`Bearer …`, `Basic …`, a JWT) are masked.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import re
import sys
import time
from collections import deque
from collections.abc import Callable, MutableMapping
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii as _json_str
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
        # a cheap first look before _SHAPES (a superset of what it matches): most strings pass
        if "eyJ" in text or "bearer" in (low := text.lower()) or "basic" in low:
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


#: the longest a debug or info line waits in the buffer, and the most the buffer holds
FLUSH_INTERVAL = 0.2
FLUSH_BYTES = 64 * 1024


class LineWriter:
    """structlog's output: debug and info lines (the access log) are written in batches, at
    most FLUSH_INTERVAL seconds late, instead of one write and flush per request; warnings
    and errors flush at once. One writer serves every logger, so lines keep their order."""

    def __init__(self, stream: TextIO, *, buffered: bool) -> None:
        self._stream = stream
        self._buffered = buffered
        self._lines: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None

    def info(self, line: str) -> None:
        self._lines.append(line)
        self._size += len(line)
        if not self._buffered or self._size >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self.flush)
            except RuntimeError:  # no event loop: nothing would flush later
                self.flush()

    debug = msg = info

    def error(self, line: str) -> None:
        self._lines.append(line)
        self.flush()

    warning = warn = err = critical = exception = fatal = error

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        data = "\n".join(self._lines) + "\n"
        self._lines.clear()
        self._size = 0
        try:
            self._stream.write(data)
            self._stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr must not take the proxy down
            pass


class _OrderedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stdlib's lines (aiohttp's, asyncio's) go out after what structlog buffered before them."""

    def __init__(self, stream: TextIO, writer: LineWriter) -> None:
        super().__init__(stream)
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        self._writer.flush()
        super().emit(record)


_writer: LineWriter | None = None
_format = "json"
_level = "info"


def flush() -> None:
    """Write out what the log buffer holds (at shutdown)."""
    if _writer is not None:
        _writer.flush()


atexit.register(flush)


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
    buffered: bool = False,
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
    global _writer, _format, _level
    flush()
    writer = _writer = LineWriter(stream, buffered=buffered)
    _format, _level = fmt, level
    structlog.configure(
        processors=[*shared, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=lambda *_args: writer,
        cache_logger_on_first_use=cache,
    )
    handler = _OrderedHandler(stream, writer)
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


class _Clock:
    """RFC 3339 UTC timestamps, the seconds part formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        second, micros = divmod(time.time_ns() // 1000, 1_000_000)
        if second != self._second:
            self._second = second
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{micros:06d}Z"


#: what the forwarder calls once a request: method, path, status, upstream_status,
#: duration_ms (logged to the microsecond), replayed, request_id
AccessLog = Callable[[str, str, int, "int | None", float, bool, str], None]


def access_logger(redactor: Redactor, route: str | None = None) -> AccessLog | None:
    """The one event per request, `access`; None when the level hides info lines. `route`,
    when given (the config has `routes:`), is a key of every line.

    In JSON it is one function that renders the known fields straight to a line (the same
    keys and values as the processor chain would give) and hands it to the writer: no
    bound logger, no event dict, no processor chain, a third of the cost a request. The two
    strings a client controls, path and request id, are still scrubbed. In console format it
    goes through the ordinary logger, for people.
    """
    if LEVELS[_level] > logging.INFO:
        return None
    if _format != "json" or _writer is None:
        logger = structlog.get_logger("proxy.access")
        if route is not None:
            logger = logger.bind(route=route)

        def console(method: str, path: str, status: int, upstream_status: int | None,
                    duration_ms: float, replayed: bool, request_id: str) -> None:
            logger.info("access", method=method, path=path, status=status, upstream_status=upstream_status,
                        duration_ms=round(duration_ms, 3), replayed=replayed, request_id=request_id)

        return console
    clock = _Clock()
    scrub = redactor.scrub
    write = _writer.info
    route_field = f'"route": {_json_str(route)}, ' if route is not None else ""

    def access(method: str, path: str, status: int, upstream_status: int | None,
               duration_ms: float, replayed: bool, request_id: str) -> None:
        write(
            f'{{"method": {_json_str(method)}, "path": {_json_str(scrub(path))}, '
            f'"status": {status}, "upstream_status": {"null" if upstream_status is None else upstream_status}, '
            f'"duration_ms": {duration_ms:.3f}, "replayed": {"true" if replayed else "false"}, '
            f'"request_id": {_json_str(scrub(request_id))}, {route_field}"event": "access", "level": "info", '
            f'"timestamp": "{clock.now()}"}}'
        )

    return access
