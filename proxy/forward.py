"""The catch-all handler: admit a request, send it upstream with a token, stream the answer back.

Per request:
1. admit: refuse CONNECT, TRACE, TRACK and absolute-form targets (405), check
   `allowed_clients` and `inbound_token` (403), normalise the path and check
   `allowed_paths` (403/400);
2. body: bodies up to `replay_buffer_bytes` are read whole so they can be replayed after a
   401; larger ones stream, counted against `max_body_bytes` (413);
3. send with the current token; on a 401 that blames the token, drop that token (only if it
   is still current) and replay once when the body was kept;
4. stream the response back chunk by chunk. Once it has started, an upstream failure can
   only abort the client's connection: a cut-short body is never passed off as complete.

Every failure of the wire (`proxy.wire.errors`) reaches `__call__` and becomes one of the
proxy's own errors in `_wire_error`, the one error path (once an answer has started, the
connection is cut instead); anything else is a bug, answered 500 by the listener.
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
from typing import Protocol

import structlog

from proxy import paths
from proxy.config import Route
from proxy.errors import (
    BadRequest,
    BodyTooLarge,
    ClientNotAllowed,
    HeadersTooLarge,
    InternalError,
    MethodNotAllowed,
    ProxyError,
    RequestTimeout,
    TokenUnavailable,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.headers import client_response_headers, upstream_prefixes, upstream_request_headers
from proxy.logs import AccessLog
from proxy.metrics import Stats
from proxy.tokens import Token
from proxy.wire import HTTP_10, HTTP_11, NO_BODY, Body, Pool, Request, Response, errors as wire

log = structlog.get_logger("proxy.forward")

RETRIED = (b"X-Ndovu-Proxy-Retried", b"1")
ERROR_HEADER = b"X-Ndovu-Proxy-Error"
#: methods refused whatever the path: CONNECT would tunnel past upstream.url; TRACE and TRACK
#: echo the request, token included, back to the app (RFC 9110 §9.3.8)
REFUSED_METHODS = frozenset({"CONNECT", "TRACE", "TRACK"})
ALLOW = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
#: status logged when the client went away before an answer (nginx's convention)
CLIENT_CLOSED = 499
#: a 401 body up to this size is read and dropped before a replay, to keep the connection
DISCARD_READ_LIMIT = 65536

_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,200}")
# RFC 6750 §3: error="..." in a Bearer challenge
_CHALLENGE_ERROR = re.compile(r'(?:^|[\s,])error\s*=\s*"?([^",\s]*)', re.IGNORECASE)


class TokenProvider(Protocol):
    """All the forwarder knows of tokens."""

    def valid_token(self) -> Token | None: ...
    async def get(self) -> Token: ...
    def invalidate(self, stale: Token) -> bool: ...


def blames_token(www_authenticate: bytes | None) -> bool:
    """True unless the 401's challenge names an error other than invalid_token (RFC 6750 §3.1)."""
    if not www_authenticate:
        return True
    m = _CHALLENGE_ERROR.search(www_authenticate.decode("latin-1"))
    return m is None or m.group(1).lower() in ("", "invalid_token")


def send_error(request: Request, exc: ProxyError, request_id: str) -> None:
    """The proxy's own answer: JSON `{"error", "message"}` and X-Ndovu-Proxy-Error."""
    headers = [(b"Content-Type", b"application/json; charset=utf-8"), (ERROR_HEADER, exc.code.encode()),
               (b"X-Request-ID", request_id.encode())]
    if isinstance(exc, TokenUnavailable):
        headers.append((b"Retry-After", b"%d" % exc.retry_after))
    if isinstance(exc, MethodNotAllowed):
        headers.append((b"Allow", ALLOW))
    if isinstance(exc, HeadersTooLarge | RequestTimeout | InternalError):
        request.keep_alive = False  # what follows on the connection cannot be read as requests
    body = json.dumps({"error": exc.code, "message": exc.message}).encode()
    request.respond(exc.status, headers, body)


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


class Forwarder:
    def __init__(
        self, route: Route, upstream: Pool, tokens: TokenProvider, stats: Stats,
        access_log: AccessLog | None = None,
    ) -> None:
        self._upstream = upstream
        self._tokens = tokens
        self._stats = stats
        fwd = route.forwarding
        self._allowed_paths = fwd.allowed_paths
        self._allowed_clients = fwd.allowed_clients
        self._inbound_token = fwd.inbound_token.reveal().encode() if fwd.inbound_token else None
        self._retry_on_401 = fwd.retry_on_401
        self._replay_limit = fwd.replay_buffer_bytes if fwd.retry_on_401 else 0
        self._max_body = fwd.max_body_bytes
        self._body_timeout = route.upstream.read_timeout
        self._upstream_prefixes = upstream_prefixes(route.upstream.url)
        self._access_log = access_log
        # request ids: unique, not secret; a random per-process prefix and a counter cost far
        # less than 16 random bytes a request
        self._id_prefix = secrets.token_hex(8)
        self._ids = itertools.count(1)

    def _new_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):016x}"

    async def __call__(self, request: Request) -> None:
        """Answer one request: admit, read or stream its body, send it with a token, replay
        once on a 401 that blames the token, answer back. One coroutine, with the steps as
        plain calls: on the hot path every frame the answer resumes through costs."""
        started = time.perf_counter()
        sent_id = request.get(b"x-request-id")
        request_id = sent_id.decode("ascii") if sent_id and _REQUEST_ID.fullmatch(sent_id) else self._new_id()
        status = 0  # what the access log says
        upstream_status: int | None = None
        replayed = False
        stats = self._stats
        stats.in_flight += 1
        body = _NO_BODY
        try:
            try:
                target = self._admit(request)
                if request.body is not None:
                    body = await self._read_body(request)
                # the common case, a valid token at hand, without a coroutine of its own
                token = self._tokens.valid_token() or await self._tokens.get()
                upstream = await self._send(request, target, token, body, request_id)
                try:
                    upstream_status = upstream.status
                    if upstream.status == 401 and blames_token(upstream.get(b"www-authenticate")):
                        self._tokens.invalidate(token)
                        if self._retry_on_401 and body.replayable:
                            await _discard(upstream)
                            token = await self._tokens.get()
                            upstream = await self._send(request, target, token, body, request_id)
                            upstream_status = upstream.status
                            replayed = True
                            stats.replays += 1
                    status = upstream.status
                    if not self._answer_whole(request, upstream, request_id, replayed):
                        await self._stream_back(request, upstream, request_id, replayed)
                except BaseException:
                    # whatever happened (the client left mid-answer, no token for the replay),
                    # the connection is not reused and its slot comes back; a no-op once released
                    upstream.close()
                    raise
            except wire.ClientGone:
                status = CLIENT_CLOSED  # gone while its body or answer was on the way
                request.abort()
            except (ProxyError, wire.WireError) as exc:
                error = exc if isinstance(exc, ProxyError) else self._wire_error(exc, request_id, body)
                if request.answered:  # too late for an error answer: cut the connection
                    request.abort()
                else:
                    send_error(request, error, request_id)
                status = error.status
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        except Exception:
            status = 500  # a bug: the listener logs it and answers 500 or cuts
            raise
        finally:
            stats.in_flight -= 1
            if status != CLIENT_CLOSED:
                stats.count_response(request.method, status)
            if self._access_log is not None:
                self._access_log(request.method, request.target.partition("?")[0], status, upstream_status,
                                 (time.perf_counter() - started) * 1000, replayed, request_id)

    def refuse(self, request: Request, kind: str) -> None:
        """A request the listener could not read (`kind`: proxy.wire.MALFORMED): 400, 431 for
        an oversized head, 405 for TRACK; the connection closes."""
        request_id = self._new_id()
        error = self._refusal(kind, request_id)
        self._stats.count_response("other", error.status)
        send_error(request, error, request_id)

    def _wire_error(self, exc: wire.WireError, request_id: str, body: _Body) -> ProxyError:
        """The one place that turns a failure on the wire into the proxy's error."""
        if body.too_large:  # the pool cut the body at the limit: that is the answer
            return BodyTooLarge(f"the request body is over {self._max_body} bytes")
        if isinstance(exc, wire.BodyTimeout):
            return RequestTimeout(f"no byte of the request body for {self._body_timeout:g} s")
        if isinstance(exc, wire.BadFraming):  # the app's body turned out malformed
            return self._refusal(exc.kind, request_id)
        if isinstance(exc, wire.OriginError):
            # the app's answer says only "cannot connect"; the operator needs the why (refused,
            # a TLS failure, an egress proxy's 407): the pool's words hold no secret
            log.warning("upstream_failed", error=type(exc).__name__, reason=str(exc), request_id=request_id)
        if isinstance(exc, wire.OriginTimeout):
            return UpstreamTimeout("the partner API did not answer in time")
        if isinstance(exc, wire.ConnectFailed):
            return UpstreamUnreachable("cannot connect to the partner API")
        return UpstreamUnreachable("the connection to the partner API failed")

    @staticmethod
    def _refusal(kind: str, request_id: str) -> ProxyError:
        """The answer to a request that cannot be read, logged without its bytes (they may hold
        a secret)."""
        log.info("malformed_request", error=kind, request_id=request_id)
        if kind == "headers_too_large":
            return HeadersTooLarge("the request line, headers and trailers are over limits.max_header_bytes")
        if kind == "method_not_allowed":
            return MethodNotAllowed("the proxy does not forward TRACK requests")
        return BadRequest("the request is not valid HTTP/1.1")

    def fail(self, request: Request, exc: Exception) -> None:
        """A bug while answering (logged as request_failed by the listener): 500."""
        send_error(request, InternalError("the proxy failed to handle this request"), self._new_id())

    # --- the steps --------------------------------------------------------------------

    def _admit(self, request: Request) -> str:
        """The request target to forward, once the request passes every rule."""
        target = request.target
        if request.method in REFUSED_METHODS or not target.startswith("/") and "://" in target:
            # the proxy only ever talks to upstream.url, and never echoes a token (SPEC: Forwarding)
            raise MethodNotAllowed(f"the proxy does not forward {request.method} requests"
                                   if request.method in REFUSED_METHODS else "the proxy forwards origin-form requests only")
        if request.version != HTTP_11 and request.version != HTTP_10:
            # HTTP/0.9 has no headers: no way to carry a request id or a body length
            raise BadRequest("HTTP/1.0 or HTTP/1.1 is required")
        if self._allowed_clients and not self._client_allowed(request.remote):
            raise ClientNotAllowed("this address may not use the proxy")
        if self._inbound_token is not None:
            sent = request.get(b"x-proxy-token") or b""
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
        content = request.body
        assert content is not None
        body = _Body()
        length = request.content_length
        if length is not None and length > self._max_body:
            raise BodyTooLarge(f"the request body is over {self._max_body} bytes")
        if request.version == HTTP_11 and (request.get(b"expect") or b"").lower() == b"100-continue":
            # the client holds its body back until told to go on (RFC 9110 §10.1.1); .NET's
            # HttpWebRequest does this for every POST. Said only once the request is admitted.
            request.send_continue()
        if length is not None and length <= self._replay_limit:
            # most bodies came in with the headers: no need to wait for them
            body.data = content.read_nowait() if content.complete else await content.read_all()
            return body
        prefix = bytearray()
        if length is None:  # chunked: keep what fits in the replay buffer, stream the rest
            while len(prefix) <= self._replay_limit:
                chunk = await content.read_chunk()
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

    async def _stream_body(self, content: Body, prefix: bytes, body: _Body) -> AsyncIterator[bytes]:
        total = len(prefix)
        if prefix:
            yield prefix
        while chunk := await content.read_chunk():
            total += len(chunk)
            if total > self._max_body:
                # cut at the limit: the upstream request is aborted, the client gets 413
                body.too_large = True
                raise BodyTooLarge(f"the request body is over {self._max_body} bytes")
            yield chunk

    async def _send(self, request: Request, target: str, token: Token, body: _Body, request_id: str) -> Response:
        headers = upstream_request_headers(request.headers, authorization=token.header, request_id=request_id.encode())
        started = time.perf_counter()
        try:
            # redirects are never followed: they go back to the client, the token stays here
            return await self._upstream.send(request.method, target, headers, body.data, body.length)
        finally:
            self._stats.observe_upstream(time.perf_counter() - started)

    def _answer_whole(self, request: Request, upstream: Response, request_id: str, replayed: bool) -> bool:
        """When the whole body came in with the headers (most partner API answers): status,
        headers and body in one write, and True. A chunked answer becomes a sized one."""
        content = upstream.body
        if content is None or not content.complete or request.method == "HEAD":
            return False
        data = content.read_nowait()
        upstream.release()
        request.respond(upstream.status, self._response_headers(request, upstream, request_id, replayed), data,
                        reason=upstream.reason or None, dated=upstream.get(b"date") is not None)
        return True

    async def _stream_back(self, request: Request, upstream: Response, request_id: str, replayed: bool) -> None:
        content = upstream.body
        headers = self._response_headers(request, upstream, request_id, replayed)
        dated = upstream.get(b"date") is not None
        if content is None:  # HEAD, 204, 304: the head says it all
            length = upstream.content_length if upstream.status not in NO_BODY else None
            upstream.release()
            request.start(upstream.status, headers, length, reason=upstream.reason or None, dated=dated)
            request.end()
            return
        first = content.read_nowait()  # what came with the headers goes out with them
        request.start(upstream.status, headers, upstream.content_length, first, reason=upstream.reason or None, dated=dated)
        try:
            while chunk := await content.read_chunk():
                await request.write(chunk)
        except wire.WireError as exc:
            # mid-body, the upstream failed, or the app's own upload did (broken chunks, a
            # stall): abort, so the client cannot take a short body for a whole one (a clean
            # end would look complete for a chunked response)
            if isinstance(exc, wire.OriginError):
                log.warning("upstream_aborted", error=type(exc).__name__, request_id=request_id)
            upstream.close()
            request.abort()
            return
        upstream.release()
        request.end()

    def _response_headers(self, request: Request, upstream: Response, request_id: str,
                          replayed: bool) -> list[tuple[bytes, bytes]]:
        headers = client_response_headers(upstream.headers, request_id=request_id.encode(),
                                          prefixes=self._upstream_prefixes, host=request.get(b"host"))
        if replayed:
            headers.append(RETRIED)
        return headers


async def _discard(response: Response) -> None:
    """Finish with an answer nobody will see; a small body is read so the connection is kept."""
    length = response.content_length
    if response.body is None or (length is not None and length <= DISCARD_READ_LIMIT):
        if response.body is not None:
            try:
                await response.body.read_all()
            except wire.OriginError:
                pass
        response.release()
    else:
        response.close()


