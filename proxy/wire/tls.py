"""TLS to the origin on `ssl.MemoryBIO`, between the socket and the origin's protocol.

Why not the event loop's own TLS transport (`create_connection(ssl=...)`): on the bench's
HTTPS upstream it cost about 20 us of CPU a request, uvloop's and asyncio's alike (one
design), a third of the proxy's CPU a request; encrypting a request and decrypting its answer
with `ssl.SSLObject` costs about 2 us. The difference is the general transport's machinery
(state machine, buffering, flow control of its own), which one keep-alive HTTP/1.1
connection does not need: here a write is encrypted and handed to the socket's transport at
once, and flow control is the socket's.

`TLSLayer` is the socket's protocol and the origin protocol's transport. Invariants:
- the origin protocol's `connection_made` comes only after a verified handshake; a failed
  one fails `ready` with the ssl module's error (an OSError) and closes the socket;
- decrypted bytes reach the protocol in order; once everything received is decrypted, no
  further read is made that would only say "no more bytes yet" (the ssl module raises for
  it, which costs more than the read);
- the origin protocol's `read_timeout` counts decrypted bytes: a record dripped slower than
  it would time out although bytes arrive (as with the event loop's TLS transport);
- an end without the origin's close_notify is a truncation: the protocol's
  `connection_lost` hears a ConnectionResetError, so a body that ends at close is never taken
  as whole (RFC 9112 §9.8); a close_notify is a clean close;
- once `close()` or `abort()` is called, no more bytes reach the protocol, only
  `connection_lost` (and the socket's write pauses, which touch nothing but its Drain).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

#: the most decrypted bytes one read returns (a TLS record holds at most 16 KiB)
READ_SIZE = 2**18


class TLSLayer(asyncio.Protocol):
    """TLS over one socket, for `app` (an asyncio protocol): its transport is this object."""

    def __init__(self, loop: asyncio.AbstractEventLoop, app: asyncio.Protocol, context: ssl.SSLContext,
                 server_hostname: str) -> None:
        self.app = app
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        # SNI and, with the context's check_hostname, the name the certificate must carry
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_hostname=server_hostname)
        self._raw: asyncio.Transport | None = None
        #: done once the handshake is: its result, or why it failed
        self.ready: asyncio.Future[None] = loop.create_future()
        # a failure nobody waits for any more (the pool gave up on a timeout) is not an error
        self.ready.add_done_callback(_retrieve)
        self._handshaking = True
        self._connected = False  # the protocol's connection_made was called, and returned
        self._closing = False
        self._close_notified = False  # the origin ended TLS properly
        self._failure: ssl.SSLError | None = None  # why TLS failed after the handshake

    # --- the socket's protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        self._handshake()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._incoming.write(data)
        if self._handshaking:
            self._handshake()
            if self._handshaking or self._closing:
                return
        self._read()

    def eof_received(self) -> bool:
        return False  # the socket closes; connection_lost says whether TLS had ended

    def connection_lost(self, exc: Exception | None) -> None:
        self._raw = None
        self._handshaking = False
        if exc is None:
            exc = self._failure
        if not self.ready.done():  # the handshake never ended
            self.ready.set_exception(
                exc if exc is not None else ConnectionResetError("the connection closed during the TLS handshake"))
        if not self._connected:  # the protocol never saw the connection
            self._closing = True
            return
        if exc is None and not self._close_notified and not self._closing:
            exc = ConnectionResetError("the origin ended the connection without a TLS close_notify")
        self._closing = True
        self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        self.app.pause_writing()

    def resume_writing(self) -> None:
        self.app.resume_writing()

    # --- the protocol's transport -----------------------------------------------------------

    def write(self, data: bytes) -> None:
        raw = self._raw
        if raw is None or self._closing:
            return  # as a closing transport does
        try:
            self._ssl.write(data)  # into the memory BIO: whole, in records
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        raw.write(self._outgoing.read())

    def close(self) -> None:
        """Say close_notify and close the socket (the origin's close_notify is not waited for)."""
        if self._closing:
            return
        self._closing = True
        raw = self._raw
        if raw is None:
            return
        if not self._handshaking:
            try:
                self._ssl.unwrap()  # writes close_notify, then wants the origin's: not waited for
            except ssl.SSLError:
                pass
            if self._outgoing.pending:
                raw.write(self._outgoing.read())
        raw.close()

    def abort(self) -> None:
        self._closing = True
        if self._raw is not None:
            self._raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self._raw is None or self._raw.is_closing()

    def pause_reading(self) -> None:
        if self._raw is not None:
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        if self._raw is not None:
            self._raw.resume_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The socket's (peername, sockname, socket)."""
        return self._raw.get_extra_info(name, default) if self._raw is not None else default

    # --- TLS ----------------------------------------------------------------------------------

    def _handshake(self) -> None:
        raw = self._raw
        assert raw is not None
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            if self._outgoing.pending:
                raw.write(self._outgoing.read())
            return
        except ssl.SSLError as exc:  # a certificate that does not verify, an alert from the origin
            if self._outgoing.pending:
                raw.write(self._outgoing.read())  # our alert, so the origin knows why
            self._handshaking = False
            self._closing = True
            if not self.ready.done():
                self.ready.set_exception(exc)
            raw.close()
            return
        if self._outgoing.pending:
            raw.write(self._outgoing.read())
        self._handshaking = False
        try:
            self.app.connection_made(self)  # type: ignore[arg-type]  # a transport in all but name
        except Exception as exc:  # a bug: the pool hears it now, not at its connect timeout
            if not self.ready.done():
                self.ready.set_exception(exc)
            self.abort()
            return
        self._connected = True
        if not self.ready.done():
            self.ready.set_result(None)

    def _read(self) -> None:
        tls = self._ssl
        incoming = self._incoming
        app = self.app
        try:
            while not self._closing:
                data = tls.read(READ_SIZE)
                if not data:  # close_notify: TLS ended properly
                    self._close_notified = True
                    break
                app.data_received(data)
                if not incoming.pending and not tls.pending():
                    break  # all decrypted: a further read would only raise SSLWantReadError
        except ssl.SSLWantReadError:
            pass  # the rest of a record is still on its way
        except ssl.SSLError as exc:  # a bad record, an alert
            self._fail(exc)
            return
        if self._outgoing.pending and self._raw is not None and not self._closing:
            self._raw.write(self._outgoing.read())  # what TLS itself answers (a key update)
        if self._close_notified:
            self.close()

    def _fail(self, exc: ssl.SSLError) -> None:
        """A TLS failure after the handshake: the socket is cut and the protocol hears why."""
        self._failure = exc  # connection_lost follows the abort, with no exception of its own
        self._closing = True
        if self._raw is not None:
            self._raw.abort()


def _retrieve(ready: asyncio.Future[None]) -> None:
    if not ready.cancelled():
        ready.exception()
