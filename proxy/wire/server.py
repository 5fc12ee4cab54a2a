"""One client connection: HTTP/1.1 on an asyncio protocol and httptools' callback parser
(llhttp). `proxy.wire.listener` accepts connections; `proxy.wire.request` answers requests.

The parser is the judge of syntax; this module frames what it hands the parser, so that
every request line reaches it whole and fixed (bytes 0x80-0xFF of the target
percent-encoded), a body the parser will not frame (after `Connection: Upgrade`) is framed
all the same, and the head's size is counted before it is buffered.

Invariants:
- requests on one connection are answered one at a time, in order (pipelined requests wait
  in a short queue; reading pauses when it is full, or when a body's buffer is);
- the bytes of a request are read as that request and nothing else: a body is framed by its
  Content-Length or chunks, whatever `Upgrade` says; after a malformed request, or CONNECT,
  nothing more is parsed;
- trailers are counted against the head limit and dropped: they never become headers;
- a response is either complete, or the connection is aborted;
- a connection is kept only when both sides allow it, the request body came in to the end
  and the response's length was known; else it closes after the response, lingering so the
  client reads the answer rather than a reset;
- a connection idle, or with a head unfinished, for `idle_timeout` is closed; a body with
  no byte for `body_timeout`, or a response the client does not take for as long, ends;
- when the client goes away, its FIN seen even while reading is paused, the handler working
  for it is cancelled.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import struct
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools
import structlog

from proxy.wire.chunks import ChunkScanner, TooLong
from proxy.wire.errors import BadFraming, ClientGone
from proxy.wire.http import HEAD_END, HTTP_10, HTTP_11, content_length, cut_at_head_end
from proxy.wire.request import Request, State, encode_high
from proxy.wire.stream import Body, Drain

if TYPE_CHECKING:
    from proxy.wire.listener import Listener

log = structlog.get_logger("proxy.wire")

#: pipelined requests held before reading from the client pauses
MAX_PIPELINE = 16
#: an unread request body up to this many bytes is read and dropped after the response, and
#: the connection kept; past it, the connection closes once the rest has been drained
DISCARD_LIMIT = 2**16
#: seconds a closing connection keeps reading what the client still sends, so that it reads
#: the answer rather than a reset (nginx's lingering close)
LINGER = 2.0
_TCP_CLOSE_WAIT = 8  # tcp_states.h: the peer has sent its FIN
# why reading is paused, as bits
_QUEUE_FULL = 1
_BODY_FULL = 2

#: what `malformed_request` reports; the proxy's own kinds, never the bytes
MALFORMED = ("invalid_syntax", "invalid_method", "invalid_target", "invalid_framing", "headers_too_large",
             "method_not_allowed")


class Malformed(Exception):
    """A request that cannot be read; `kind` is one of MALFORMED."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class Failed:
    """In the queue: a request whose reading hit a bug, to be answered 500 in turn."""

    __slots__ = ("exc",)

    def __init__(self, exc: Exception) -> None:
        self.exc = exc


class Reading(enum.Enum):
    """Where the connection's reader is in the byte stream."""

    START = "start"  # the next byte begins a request line
    LINE = "line"  # a request line fed in pieces
    HEAD = "head"  # the rest of a head (request line fed)
    LENGTH = "length"  # a body of known length
    CHUNKED = "chunked"  # a chunked body
    STOPPED = "stopped"  # nothing more is parsed (malformed, CONNECT, closing)


# The members under module-level names, for the hot path: on Python 3.11 reading an Enum
# member through its class costs about 90 ns, a global about 10 (3.12 made it 25).
_START, _LINE, _HEAD, _LENGTH, _CHUNKED, _STOPPED = (
    Reading.START, Reading.LINE, Reading.HEAD, Reading.LENGTH, Reading.CHUNKED, Reading.STOPPED)
_IDLE, _ACTIVE, _CLOSING, _CLOSED = State.IDLE, State.ACTIVE, State.CLOSING, State.CLOSED


class Connection(asyncio.Protocol):
    """One client connection: frames and parses requests, hands them to the handler in order."""

    def __init__(self, server: Listener) -> None:
        self.server = server
        self._loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.state = _IDLE
        self.drain = Drain(self._loop)
        self._parser = httptools.HttpRequestParser(self)
        self._reading = _START
        self._line_start = b""  # the bytes that began the request line being read
        self._tail = b""  # the last bytes of the head fed so far (its end may straddle reads)
        self._head_size = 0
        self._remaining = 0  # of a body of known length
        self._chunks: ChunkScanner | None = None  # measures a chunked body's end
        self._pieces: list[bytes] = []  # body bytes parsed from the current read
        self._done = False  # the parser finished a message
        self._synthetic = False  # the parser is fed a made-up head to frame an upgrade request's body
        # the message being parsed
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._index: dict[bytes, bytes] = {}
        self._body: Body | None = None
        self._upgrade_framing: tuple[Reading, int] | None = None
        self._last = False  # no request may follow the one being parsed
        self._raised: Exception | None = None  # what a parser callback raised
        # answering
        self._queue: deque[Request | Malformed | Failed] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._request: Request | None = None
        self._pauses = 0  # why reading is paused: _QUEUE_FULL | _BODY_FULL
        self._idle: asyncio.TimerHandle | None = None
        self._idle_since: float | None = None  # None while a request is being answered

    @property
    def reading_on(self) -> bool:
        """More requests may follow on this connection."""
        return self._reading is not _STOPPED

    @property
    def body_timeout(self) -> float:
        return self.server.body_timeout

    def date_line(self) -> bytes:
        return self.server.date_line()

    @property
    def queued(self) -> bool:
        """Requests (or a refusal) already read wait for their answer behind this one."""
        return bool(self._queue)

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        try:
            peer = transport.get_extra_info("peername")
            self.remote = peer[0] if isinstance(peer, tuple) else None
            self.server.connections.add(self)
            self._idle_since = self._loop.time()
            self._idle = self._loop.call_at(self._idle_since + self.server.idle_timeout, self._on_idle)
            self._task = self._loop.create_task(self._serve())
        except Exception as exc:  # a bug, or a socket gone already: this connection only
            log.error("request_failed", error=type(exc).__name__, stage="connection_made", exc_info=exc)
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._reading is _STOPPED:
            return
        try:
            self._frame(data)
            self._flush_body()
        except Malformed as exc:
            self._malformed(exc.kind)
        except httptools.HttpParserCallbackError as exc:
            # what a callback raised: kept here, since httptools only chains it as __context__
            cause, self._raised = self._raised or exc.__context__, None
            if isinstance(cause, Malformed):
                self._malformed(cause.kind)
            else:
                self._failed(cause if isinstance(cause, Exception) else exc)
        except httptools.HttpParserInvalidMethodError:
            # llhttp knows no TRACK, which echoes like TRACE: refused the same way
            self._malformed("method_not_allowed" if self._line_start.startswith(b"TRACK ") else "invalid_method")
        except httptools.HttpParserInvalidURLError:
            self._malformed("invalid_target")
        except httptools.HttpParserError:
            self._malformed("invalid_syntax")
        except Exception as exc:  # a bug: this connection goes, the listener stays
            self._failed(exc)

    def eof_received(self) -> bool:
        # A client's FIN: it is gone, and whatever works for it is cancelled, as nginx takes it
        # ("client prematurely closed connection"); a half-closed request is rare, a client
        # that gave up is not, and its place in the upstream queue must come back.
        return False

    def pause_writing(self) -> None:
        self.drain.pause()

    def resume_writing(self) -> None:
        self.drain.resume()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.state = _CLOSED
        self.transport = None
        self.server.connections.discard(self)
        self.server.paused.discard(self)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        gone = ClientGone("the client went away")
        self.drain.lost(gone)
        for item in self._queue:
            if isinstance(item, Request) and item.body is not None:
                item.body.fail(gone)
        if self._request is not None and self._request.body is not None:
            self._request.body.fail(gone)
        if self._body is not None:
            self._body.fail(gone)
        if self._task is not None and self._request is not None:
            self._task.cancel()  # whatever the handler waits for, nobody will read its answer
        self._wake()

    # --- framing: what the parser is fed, and when ------------------------------------------

    def _frame(self, data: bytes) -> None:
        """Feed `data` to the parser in pieces that never cross the start of a request line,
        the end of a head or the end of a body of known length."""
        limit = self.server.max_head
        while data:
            reading = self._reading
            if reading is _START:
                data = data.lstrip(b"\r\n")  # empty lines before a request line (RFC 9112 §2.2)
                if not data:
                    return
                self._head_size = 0
                self._line_start = data[:6]
                nl = data.find(b"\n")
                if nl < 0 or not (data.isascii() or data[:nl].isascii()):
                    self._reading = _LINE  # the line in pieces, or with bytes to encode
                    self._tail = b""
                    continue
                # most requests: the whole head at hand, fed at once
                end = data.find(HEAD_END, max(nl - 1, 0))
                cut = nl + 1 if end < 0 else end + 4
                piece, data = (data, b"") if cut == len(data) else (data[:cut], data[cut:])
                self._head_size = len(piece)
                if self._head_size > limit:
                    raise Malformed("headers_too_large")
                self._tail = b"" if end >= 0 else piece[-3:]
                self._reading = _HEAD
                self._feed_head(piece)
            elif reading is _LINE:
                # fed as it comes, so a broken line is refused at once, its bytes 0x80-0xFF
                # percent-encoded first (llhttp takes none; curl sends a UTF-8 query as it is)
                nl = data.find(b"\n")
                piece, data = (data, b"") if nl < 0 else (data[:nl + 1], data[nl + 1:])
                if not piece.isascii():
                    piece = encode_high(piece)
                self._head_size += len(piece)
                if self._head_size > limit:
                    raise Malformed("headers_too_large")
                self._tail = (self._tail + piece)[-3:]  # a head's end may begin in the line
                if nl >= 0:
                    self._reading = _HEAD
                self._feed_head(piece)
            elif reading is _LENGTH:
                piece, data = data[:self._remaining], data[self._remaining:]
                self._remaining -= len(piece)
                self._parser.feed_data(piece)
            elif reading is _HEAD:
                # the rest of a head: fed up to its end and no further
                piece, data, self._tail = cut_at_head_end(self._tail, data)
                self._head_size += len(piece)
                if self._head_size > limit:
                    raise Malformed("headers_too_large")
                self._feed_head(piece)
            else:
                # chunks: fed up to the end the scanner measures, and the parser must agree
                assert self._chunks is not None
                try:
                    end = self._chunks.scan(data)
                except TooLong:
                    raise Malformed("headers_too_large") from None
                piece, data = (data, b"") if end < 0 or end == len(data) else (data[:end], data[end:])
                self._parser.feed_data(piece)
                if self._done is (end < 0):
                    raise Malformed("invalid_framing")
            if self._done:
                self._done = False
                if self._reading is not _STOPPED:
                    self._reading = _START
            if self._reading is _STOPPED:
                return

    def _feed_head(self, piece: bytes) -> None:
        try:
            self._parser.feed_data(piece)
        except httptools.HttpParserUpgrade:
            self._upgraded()

    def _upgraded(self) -> None:
        """The parser stops at the end of a head with `Connection: Upgrade` (or CONNECT) and
        frames no body. No upgrade is supported: the request is a plain one, so its body is
        framed here, by feeding the parser a made-up head with the same framing, then the
        body, from a clean state."""
        framing = self._upgrade_framing
        self._upgrade_framing = None
        if framing is None:  # CONNECT: what follows is a tunnel's bytes, never HTTP
            self._stop()
            return
        reading, length = framing
        # a new parser, rather than the one that stopped: how a parser resumes after an
        # upgrade is its own affair (httptools resumes it now, llhttp alone would not)
        self._parser = httptools.HttpRequestParser(self)
        if reading is _START:
            return  # no body: the next bytes begin the next request
        self._synthetic = True
        head = (b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" if reading is _CHUNKED
                else b"PUT / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % length)
        self._parser.feed_data(head)
        self._synthetic = False
        self._done = False
        self._reading = reading
        self._remaining = length
        if reading is _CHUNKED:
            self._chunks = ChunkScanner(self.server.max_head)

    # --- parser callbacks -----------------------------------------------------------------

    def _reject(self, kind: str) -> Malformed:
        """The error a callback raises for a request that cannot be read, kept for
        data_received (the parser reports only that a callback failed)."""
        self._raised = Malformed(kind)
        return self._raised

    def on_message_begin(self) -> None:
        if self._synthetic:
            return
        if self._done or self._reading is not _HEAD and self._reading is not _LINE:
            # the parser sees a request where the framing here sees none: never forwarded
            raise self._reject("invalid_framing")
        self._url = b""
        self._headers = []
        self._index = {}
        self._body = None

    def on_url(self, url: bytes) -> None:
        if not self._synthetic:
            self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._synthetic:
            return
        if self._reading is not _HEAD:
            # a trailer (RFC 9112 §7.1.2): counted, and dropped, as nginx does
            self._head_size += len(name) + len(value) + 4
            if self._head_size > self.server.max_head:
                raise self._reject("headers_too_large")
            return
        self._headers.append((name, value))
        self._index.setdefault(name.lower(), value)

    def on_headers_complete(self) -> None:
        if self._synthetic:
            return
        parser = self._parser
        index = self._index
        method = parser.get_method().decode("ascii")
        version = parser.get_http_version()
        if version != HTTP_11 and version != HTTP_10:
            # llhttp reads a line without a version as HTTP/0.9, headers and body included:
            # no such request is read on (RFC 9112 §2.3 has no HTTP/0.9 with headers)
            raise self._reject("invalid_syntax")
        keep_alive = parser.should_keep_alive()
        reading, length = _START, 0
        declared: int | None = None
        if b"transfer-encoding" in index:
            # only `chunked`, once, on HTTP/1.1 (RFC 9112 §6.1): any other coding would reach
            # the partner API decoded differently from how it was framed here
            codings = [v for n, v in self._headers if n.lower() == b"transfer-encoding"]
            if version != HTTP_11 or len(codings) != 1 or codings[0].strip().lower() != b"chunked":
                raise self._reject("invalid_framing")
            reading = _CHUNKED
        elif b"content-length" in index:
            declared = content_length(index[b"content-length"])
            if declared is None:  # the parser took it; this framing must read it alike
                raise self._reject("invalid_framing")
            length = declared
            if length:
                reading = _LENGTH
        body = None
        if reading is not _START:
            body = self._body = Body(self._loop, self._pause_body, self._resume_body,
                                     timeout=self.server.body_timeout)
        if method == "CONNECT":
            keep_alive = False
            self._upgrade_framing = None
        elif b"upgrade" in index and parser.should_upgrade():
            self._upgrade_framing = (reading, length)
        self._last = not keep_alive
        target = self._url.decode("ascii", "surrogateescape")
        request = Request(self, method, target, version, self._headers, index, body,
                          keep_alive and self.state is not _CLOSING, declared)
        self._reading = reading if reading is not _START else _HEAD
        self._remaining = length
        if reading is _CHUNKED:
            self._chunks = ChunkScanner(self.server.max_head)
        self._enqueue(request)

    def on_body(self, data: bytes) -> None:
        if self._body is not None:
            self._pieces.append(data)  # fed to the body once the read is parsed

    def _flush_body(self) -> None:
        pieces = self._pieces
        if pieces and self._body is not None:
            self._body.feed(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        pieces.clear()

    def on_message_complete(self) -> None:
        if self._synthetic:
            return
        if self._upgrade_framing is not None and self._upgrade_framing[0] is not _START:
            return  # an upgrade request's body is framed next, not ended
        if self._body is not None:
            self._flush_body()
            self._body.end()
            self._body = None
        self._done = True
        if self._last:
            self._stop()

    # --- the queue, and the connection's one task ------------------------------------------

    def _enqueue(self, item: Request | Malformed | Failed) -> None:
        if self.state is _CLOSING and isinstance(item, Request) and self._request is not None:
            return  # shutting down: requests pipelined behind the current one go unanswered
        self._queue.append(item)
        self._idle_since = None
        self._wake()
        if len(self._queue) >= MAX_PIPELINE:
            self._pause(_QUEUE_FULL)

    def _malformed(self, kind: str) -> None:
        self._stop()  # nothing after a malformed request can be trusted
        if self._body is not None and not self._body.complete:
            # the request was handed over already: it is answered (or cut) by whoever reads
            # its body, and no other answer follows
            self._body.fail(BadFraming(kind))
            return
        self._enqueue(Malformed(kind))

    def _failed(self, exc: Exception) -> None:
        """A bug while reading a request: logged, answered 500 in turn, and the connection
        reads no more."""
        log.error("request_failed", error=type(exc).__name__, stage="parsing", exc_info=exc)
        self._stop()
        if self._body is not None and not self._body.complete:
            self._body.fail(exc)  # handed over already: its reader meets the bug, and answers 500
            return
        self._enqueue(Failed(exc))

    def _stop(self) -> None:
        self._reading = _STOPPED

    async def _serve(self) -> None:
        handler = self.server.handler
        queue = self._queue
        request: Request | None = None
        try:
            while self.state is not _CLOSING:
                if not queue:
                    if self.transport is None or self._reading is _STOPPED:
                        break
                    self._waiter = self._loop.create_future()
                    await self._waiter
                    continue
                item = queue.popleft()
                if self._pauses and len(queue) < MAX_PIPELINE // 2:
                    self._resume(_QUEUE_FULL)
                if self.state is _IDLE:
                    self.state = _ACTIVE
                if isinstance(item, (Malformed, Failed)):  # a tuple: `A | B` would build a union each time
                    request = Request(self, "GET", "", HTTP_11, (), {}, None, False)
                    self._request = request
                    if isinstance(item, Malformed):
                        handler.refuse(request, item.kind)
                    else:
                        handler.fail(request, item.exc)
                    await self._linger()
                    break
                request = self._request = item
                await handler(request)
                self._request = None
                if self.drain.paused:  # the client reads no answers: no more until it does
                    try:
                        await self.drain.wait(self.server.body_timeout)
                    except TimeoutError:
                        self.abort()
                        break
                if not request._done or self.transport is None:  # cut short
                    break
                body = request.body
                if body is not None and not body.complete and not await self._finish_body(request):
                    break
                if not request.keep_alive:
                    break
                if self.state is _ACTIVE:
                    self.state = _IDLE
                if not queue:
                    self._idle_since = self._loop.time()
        except asyncio.CancelledError:
            pass  # the client left, or shutdown ran out of time
        except Exception as exc:  # a bug: this connection goes, the listener stays
            log.error("request_failed", error=type(exc).__name__, exc_info=exc)
            if request is not None and not request.answered and self.transport is not None:
                try:
                    request.keep_alive = False
                    self.server.handler.fail(request, exc)
                    await self._linger()
                except Exception:  # noqa: BLE001 - the bug's answer failed too: cut
                    self.abort()
            else:
                self.abort()  # cut, so no answer looks whole
        finally:
            self._request = None
            if self.transport is not None:
                self.transport.close()

    async def _finish_body(self, request: Request) -> bool:
        """The rest of a request body the handler did not read (it was refused, say). A short
        rest is read and dropped and the connection kept; past DISCARD_LIMIT our side is shut
        for writing and the rest drained for at most LINGER seconds. True if the connection
        can be kept."""
        body = request.body
        if body is None or request.body_withheld:
            return False  # the client will not send it: nothing to wait for
        transport = self.transport
        dropped, keep = 0, True
        try:
            async with asyncio.timeout(LINGER):
                while chunk := await body.read_chunk():
                    dropped += len(chunk)
                    if keep and dropped > DISCARD_LIMIT and transport is not None and transport.can_write_eof():
                        keep = False
                        transport.write_eof()
        except BadFraming:
            await self._linger()  # the client may still be sending the broken body
            return False
        except (Exception, TimeoutError):
            return False
        return keep

    async def _linger(self) -> None:
        """Before closing on a client that may still be sending: shut our side for writing and
        let what it sends be read and dropped, for at most LINGER seconds, so that it reads the
        answer rather than a reset (closing with unread bytes makes the kernel send one)."""
        transport = self.transport
        if transport is None or not transport.can_write_eof():
            return
        self._stop()
        self._resume(self._pauses)  # read, and drop, whatever still comes
        transport.write_eof()
        self._waiter = self._loop.create_future()  # woken when the client closes too
        try:
            async with asyncio.timeout(LINGER):
                await self._waiter
        except TimeoutError:
            pass

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # --- reading pauses ---------------------------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self._pauses and self.transport is not None:
            self.transport.pause_reading()
            self.server.watch(self)
        self._pauses |= reason

    def _resume(self, reason: int) -> None:
        if not self._pauses & reason:
            return
        self._pauses &= ~reason
        if not self._pauses and self.transport is not None:
            self.server.paused.discard(self)
            self.transport.resume_reading()

    def _pause_body(self) -> None:
        self._pause(_BODY_FULL)

    def _resume_body(self) -> None:
        self._resume(_BODY_FULL)

    def peer_closed(self) -> bool:
        """The client's FIN has arrived, though reading is paused (Linux: TCP_INFO)."""
        transport = self.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None or not hasattr(socket, "TCP_INFO"):
            return False
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
        except OSError:
            return False
        return bool(info) and struct.unpack_from("B", info)[0] == _TCP_CLOSE_WAIT

    # --- timers and writes ----------------------------------------------------------------

    def _on_idle(self) -> None:
        """The idle timer, checked when it fires rather than re-armed for every request."""
        if self.transport is None:
            self._idle = None
            return
        now, timeout, since = self._loop.time(), self.server.idle_timeout, self._idle_since
        if since is not None and now - since >= timeout and self._request is None:
            self._idle = None
            self.transport.close()
            return
        self._idle = self._loop.call_at((now if since is None else since) + timeout, self._on_idle)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def shut(self) -> None:
        """Shutdown: an idle connection closes now, a busy one after its current response."""
        self.state = _CLOSING
        if self._request is None and not self._queue and self.transport is not None:
            self.transport.close()
        self._wake()
