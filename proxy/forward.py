"""The catch-all handler: admit a request, send it upstream with a token, stream the answer back.

Per request:
1. admit: refuse CONNECT and absolute-form targets (405), check `allowed_clients` and
   `inbound_token` (403), normalise the path and check `allowed_paths` (403/400);
2. body: bodies up to `replay_buffer_bytes` are read whole so they can be replayed after a
   401; larger ones stream, counted against `max_body_bytes` (413);
3. send with the current token; on a 401 that blames the token, drop that token (only if it
   is still current) and replay once when the body was kept;
4. stream the response back chunk by chunk. Once it has started, an upstream failure can
   only abort the client's connection: a cut-short body is never passed off as complete.

Every failure becomes one of the proxy's own errors in `_upstream_error`, the one error path.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import itertools
import json
import re
import secrets
import time
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Protocol

import aiohttp
import structlog
from aiohttp import StreamReader
from aiohttp.http_exceptions import HttpProcessingError

from proxy import paths
from proxy.config import Settings
from proxy.errors import (
    BadRequest,
    BodyTooLarge,
    ClientNotAllowed,
    MethodNotAllowed,
    ProxyError,
    TokenUnavailable,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.headers import client_response_head, upstream_request_head
from proxy.listener import HTTP_10, HTTP_11, NO_BODY, Request
from proxy.logs import AccessLog
from proxy.metrics import Stats
from proxy.tokens import Token
from proxy.upstream import ConnectFailed, Exchange, Upstream

log = structlog.get_logger("proxy.forward")

RETRIED_HEADER = "X-Ndovu-Proxy-Retried"
RETRIED_LINE = f"{RETRIED_HEADER}: 1\r\n".encode()
ERROR_HEADER = "X-Ndovu-Proxy-Error"
#: status logged when the client went away before an answer (nginx's convention)
CLIENT_CLOSED = 499
#: a 401 body up to this size is read and dropped before a replay, to keep the connection
DISCARD_READ_LIMIT = 65536

_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,200}")
# RFC 6750 §3: error="..." in a Bearer challenge
_CHALLENGE_ERROR = re.compile(r'(?:^|[\s,])error\s*=\s*"?([^",\s]*)', re.IGNORECASE)


class TokenProvider(Protocol):
    """All the forwarder knows of tokens."""

    async def get(self) -> Token: ...
    def invalidate(self, stale: Token) -> bool: ...


def blames_token(www_authenticate: str | None) -> bool:
    """True unless the 401's challenge names an error other than invalid_token (RFC 6750 §3.1)."""
    if not www_authenticate:
        return True
    m = _CHALLENGE_ERROR.search(www_authenticate)
    return m is None or m.group(1).lower() in ("", "invalid_token")


def send_error(request: Request, exc: ProxyError, request_id: str) -> None:
    """The proxy's own answer: JSON `{"error", "message"}` and X-Ndovu-Proxy-Error."""
    headers = (f"Content-Type: application/json; charset=utf-8\r\n{ERROR_HEADER}: {exc.code}\r\n"
               f"X-Request-ID: {request_id}\r\n")
    if isinstance(exc, TokenUnavailable):
        headers += f"Retry-After: {exc.retry_after}\r\n"
    body = json.dumps({"error": exc.code, "message": exc.message}).encode()
    request.respond(exc.status, HTTPStatus(exc.status).phrase, headers.encode(), body)


class _Body:
    """A request body: kept whole (replayable) or streamed once."""

    __slots__ = ("data", "length", "replayable", "too_large")

    def __init__(self) -> None:
        self.data: bytes | AsyncIterator[bytes] | None = None
        self.length: int | None = None  # of a streamed body, when the client said it
        self.replayable = True
        self.too_large = False


#: the body of every request without one (never changed: only streamed bodies are)
_NO_BODY = _Body()


class _Outcome:
    """What the access log says of one request."""

    __slots__ = ("status", "upstream_status", "replayed")

    def __init__(self) -> None:
        self.status = 0
        self.upstream_status: int | None = None
        self.replayed = False


class Forwarder:
    def __init__(
        self, settings: Settings, upstream: Upstream, tokens: TokenProvider, stats: Stats,
        access_log: AccessLog | None = None,
    ) -> None:
        self._upstream = upstream
        self._tokens = tokens
        self._stats = stats
        fwd = settings.forwarding
        self._allowed_paths = fwd.allowed_paths
        self._allowed_clients = fwd.allowed_clients
        self._inbound_token = fwd.inbound_token.reveal().encode() if fwd.inbound_token else None
        self._retry_on_401 = fwd.retry_on_401
        self._replay_limit = fwd.replay_buffer_bytes if fwd.retry_on_401 else 0
        self._max_body = fwd.max_body_bytes
        self._access_log = access_log
        # request ids: unique, not secret; a random per-process prefix and a counter cost far
        # less than 16 random bytes a request
        self._id_prefix = secrets.token_hex(8)
        self._ids = itertools.count(1)

    async def __call__(self, request: Request) -> None:
        started = time.perf_counter()
        request_id = request.headers.get("X-Request-ID")
        if request_id is None or not _REQUEST_ID.fullmatch(request_id):
            request_id = f"{self._id_prefix}{next(self._ids):016x}"
        outcome = _Outcome()
        self._stats.in_flight += 1
        try:
            try:
                await self._forward(request, request_id, outcome)
            except ProxyError as exc:
                if request.answered:  # too late for an error answer: cut the connection
                    request.abort()
                else:
                    send_error(request, exc, request_id)
                outcome.status = exc.status
        except asyncio.CancelledError:
            outcome.status = CLIENT_CLOSED
            raise
        except Exception:
            outcome.status = 500  # a bug: the listener logs it and cuts the connection
            raise
        finally:
            self._stats.in_flight -= 1
            if outcome.status != CLIENT_CLOSED:
                self._stats.count_response(request.method, outcome.status)
            if self._access_log is not None:
                self._access_log(
                    request.method, request.target.partition("?")[0], outcome.status, outcome.upstream_status,
                    (time.perf_counter() - started) * 1000, outcome.replayed, request_id,
                )

    def refuse(self, request: Request, exc: HttpProcessingError) -> None:
        """A request the parser could not read: 400, and the connection closes. The bytes it
        came with are not logged (they may hold a header value)."""
        request_id = f"{self._id_prefix}{next(self._ids):016x}"
        log.info("malformed_request", error=type(exc).__name__, request_id=request_id)
        self._stats.count_response("other", 400)
        send_error(request, BadRequest("the request is not valid HTTP/1.1"), request_id)

    # --- the steps --------------------------------------------------------------------

    async def _forward(self, request: Request, request_id: str, outcome: _Outcome) -> None:
        target = self._admit(request)
        body = await self._read_body(request) if request.body_exists else _NO_BODY
        token = await self._tokens.get()
        upstream = await self._send(request, target, token, body, request_id)
        try:
            outcome.upstream_status = upstream.status
            if upstream.status == 401 and blames_token(upstream.headers.get("WWW-Authenticate")):
                self._tokens.invalidate(token)
                if self._retry_on_401 and body.replayable:
                    await _discard(upstream)
                    token = await self._tokens.get()
                    upstream = await self._send(request, target, token, body, request_id)
                    outcome.upstream_status = upstream.status
                    outcome.replayed = True
                    self._stats.replays += 1
            outcome.status = upstream.status
            if not self._answer_whole(request, upstream, request_id, outcome.replayed):
                await self._stream_back(request, upstream, request_id, outcome.replayed)
        except BaseException:
            # whatever happened (the client left mid-answer, no token for the replay), the
            # connection is not reused and its slot comes back; a no-op once released
            upstream.close()
            raise

    def _admit(self, request: Request) -> str:
        """The request target to forward, once the request passes every rule."""
        target = request.target
        if request.method == "CONNECT" or not target.startswith("/") and "://" in target:
            # the proxy only ever talks to upstream.url (SPEC: Forwarding)
            raise MethodNotAllowed("the proxy forwards origin-form requests only; no CONNECT")
        if request.version < HTTP_10:
            # HTTP/0.9 has no headers: no way to carry a request id or a body length
            raise BadRequest("HTTP/1.0 or later is required")
        if self._allowed_clients and not self._client_allowed(request.remote):
            raise ClientNotAllowed("this address may not use the proxy")
        if self._inbound_token is not None:
            sent = request.headers.get("X-Proxy-Token", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(sent, self._inbound_token):
                raise ClientNotAllowed("missing or wrong X-Proxy-Token")
        path = target.partition("?")[0]
        if not path.startswith("/"):
            raise BadRequest("the request target is not a path")
        paths.check(path, self._allowed_paths)
        return target

    def _client_allowed(self, remote: str | None) -> bool:
        if remote is None:
            return False
        try:
            addr = ipaddress.ip_address(remote)
        except ValueError:
            return False
        return any(addr in net for net in self._allowed_clients)

    async def _read_body(self, request: Request) -> _Body:
        body = _Body()
        length = request.content_length
        if length is not None and length > self._max_body:
            raise BodyTooLarge(f"the request body is over {self._max_body} bytes")
        if request.version >= HTTP_11 and request.headers.get("Expect", "").lower() == "100-continue":
            # the client holds its body back until told to go on (RFC 9110 §10.1.1); .NET's
            # HttpWebRequest does this for every POST. Said only once the request is admitted.
            request.send_continue()
        content = request.content
        if length is not None and length <= self._replay_limit:
            # most bodies came in with the headers: no need to wait for them
            body.data = content.read_nowait(-1) if content.is_eof() else await content.read()
            return body
        prefix = bytearray()
        if length is None:  # chunked: keep what fits in the replay buffer, stream the rest
            while len(prefix) <= self._replay_limit:
                chunk = await content.readany()
                if not chunk:
                    body.data = bytes(prefix)
                    return body
                prefix += chunk
                if len(prefix) > self._max_body:
                    raise BodyTooLarge(f"the request body is over {self._max_body} bytes")
        body.replayable = False
        body.length = length
        body.data = self._stream_body(content, bytes(prefix), body)
        return body

    async def _stream_body(
        self, content: StreamReader, prefix: bytes, body: _Body
    ) -> AsyncIterator[bytes]:
        total = len(prefix)
        if prefix:
            yield prefix
        async for chunk in content.iter_any():
            total += len(chunk)
            if total > self._max_body:
                # cut at the limit: the upstream request is aborted, the client gets 413
                body.too_large = True
                raise BodyTooLarge(f"the request body is over {self._max_body} bytes")
            yield chunk

    async def _send(
        self, request: Request, target: str, token: Token, body: _Body, request_id: str
    ) -> Exchange:
        headers = upstream_request_head(request.raw_headers, authorization=token.header, request_id=request_id.encode())
        started = time.perf_counter()
        try:
            # redirects are never followed: they go back to the client, the token stays here
            response = await self._upstream.send(request.method, target, headers, body.data, body.length)
        except Exception as exc:
            if body.too_large:
                raise BodyTooLarge(f"the request body is over {self._max_body} bytes") from exc
            raise _upstream_error(exc) from exc
        finally:
            self._stats.observe_upstream(time.perf_counter() - started)
        return response

    def _answer_whole(self, request: Request, upstream: Exchange, request_id: str, replayed: bool) -> bool:
        """When the whole body came in with the headers (most partner API answers): status,
        headers and body in one write, and True. A chunked answer becomes a sized one."""
        content = upstream.content
        if not content.is_eof() or request.method == "HEAD" or upstream.status in NO_BODY:
            return False
        body = content.read_nowait(-1)
        upstream.release()
        request.respond(upstream.status, upstream.reason, self._response_head(upstream, request_id, replayed), body,
                        dated="Date" in upstream.headers)
        return True

    async def _stream_back(self, request: Request, upstream: Exchange, request_id: str, replayed: bool) -> None:
        content = upstream.content
        try:
            first = content.read_nowait(-1)  # what came with the headers goes out with them
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _upstream_error(exc) from exc
        request.start(upstream.status, upstream.reason, self._response_head(upstream, request_id, replayed),
                      upstream.content_length, first, dated="Date" in upstream.headers)
        try:
            async for chunk in content.iter_any():
                await request.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # the upstream failed mid-body: abort so the client cannot take a short body
            # for a whole one (a clean end would look complete for a chunked response)
            log.warning("upstream_aborted", error=type(exc).__name__, request_id=request_id)
            upstream.close()
            request.abort()
            return
        upstream.release()
        request.end()

    @staticmethod
    def _response_head(upstream: Exchange, request_id: str, replayed: bool) -> bytes:
        headers = client_response_head(upstream.raw_headers, request_id=request_id.encode())
        return headers + RETRIED_LINE if replayed else headers


async def _discard(response: Exchange) -> None:
    """Finish with an answer nobody will see; a small body is read so the connection is kept."""
    length = response.content_length
    if length is not None and length <= DISCARD_READ_LIMIT:
        try:
            await response.content.read()
        except (aiohttp.ClientError, TimeoutError):
            pass
        response.release()
    else:
        response.close()


def _upstream_error(exc: BaseException) -> ProxyError:
    """The one place that turns a client-side failure into the proxy's error."""
    if isinstance(exc, TimeoutError):  # aiohttp's ServerTimeoutError is one too
        return UpstreamTimeout("the partner API did not answer in time")
    if isinstance(exc, ConnectFailed):
        return UpstreamUnreachable("cannot connect to the partner API")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return UpstreamUnreachable("the connection to the partner API failed")
    return UpstreamUnreachable(f"the request to the partner API failed ({type(exc).__name__})")
