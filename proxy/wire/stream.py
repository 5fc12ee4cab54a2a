"""Flow control on the public asyncio transport API, both ways (after uvicorn's FlowControl).

`Body` is a message body arriving in pieces: the protocol feeds it, one reader takes the
pieces as they come. Past HIGH_WATER buffered bytes it asks its protocol to stop reading
from the socket; once the reader has taken what is buffered (a read takes all of it), to read
again.

`Drain` is the other way: a protocol's `pause_writing`/`resume_writing` as something a
writer can wait for, with a bound.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from proxy.wire.errors import BodyTimeout
from proxy.wire.http import HIGH_WATER


class Body:
    """One message body. Invariants: `feed` never blocks (the protocol pauses reading
    instead); after `end()` or `fail()` nothing more is fed; the reader sees every byte fed,
    in order, then either the end (b"") or the failure."""

    __slots__ = ("_loop", "_chunks", "_size", "_eof", "_exc", "_waiter", "_pause", "_resume", "_paused",
                 "_timeout", "received")

    def __init__(self, loop: asyncio.AbstractEventLoop, pause: Callable[[], None], resume: Callable[[], None],
                 *, timeout: float | None = None) -> None:
        self._loop = loop
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._pause = pause
        self._resume = resume
        self._paused = False
        self._timeout = timeout  # seconds a read may wait for the next byte
        self.received = 0  # bytes fed so far

    # --- the protocol's side ----------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        self.received += len(data)
        if self._size > HIGH_WATER and not self._paused:
            self._paused = True
            self._pause()
        if self._waiter is not None:  # most bodies are fed before anyone waits
            self._wake()

    def end(self) -> None:
        """Every byte is in. A no-op once failed: a failed body never looks whole."""
        if self._exc is None:
            self._eof = True
            if self._waiter is not None:
                self._wake()

    def fail(self, exc: BaseException) -> None:
        """The body will not come to its end; the reader hears `exc` once the bytes before
        it are read. A no-op once ended."""
        if not self._eof and self._exc is None:
            self._exc = exc
            self._wake()

    @property
    def paused(self) -> bool:
        return self._paused

    # --- the reader's side ------------------------------------------------------------------

    @property
    def at_eof(self) -> bool:
        """Ended, and every byte taken."""
        return self._eof and not self._chunks

    @property
    def complete(self) -> bool:
        """Every byte is in (some may still be unread)."""
        return self._eof

    def read_nowait(self) -> bytes:
        """Everything buffered now, maybe b"" (raises the failure when nothing is left)."""
        if not self._chunks:
            if self._exc is not None:
                raise self._exc
            return b""
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        if self._paused:
            self._paused = False
            self._resume()
        return data

    async def read_chunk(self) -> bytes:
        """Every byte buffered now, at least one, waiting if need be; b"" at the end. Pieces
        fed one by one (many small chunks of a chunked upload) come out as one."""
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            await self._wait()
        return self.read_nowait()

    async def read_all(self) -> bytes:
        """The whole body, taken as it comes (so that reading never stays paused)."""
        parts = [self.read_nowait()]
        while chunk := await self.read_chunk():
            parts.append(chunk)
        return b"".join(parts)

    async def _wait(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        timer = None if self._timeout is None else self._loop.call_later(self._timeout, self._expire, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _expire(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(BodyTimeout(f"no byte of the body for {self._timeout:g} s"))

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Drain:
    """Write-side flow control for one protocol: `pause()`/`resume()` from the transport's
    callbacks, `wait(timeout)` for a writer. True from `wait` means the socket drained."""

    __slots__ = ("_loop", "_paused", "_waiter", "_lost")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._lost: BaseException | None = None

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._release()

    def lost(self, exc: BaseException) -> None:
        """The connection is gone: writers waiting, and any later, hear `exc`."""
        self._lost = exc
        self._release(exc)

    async def wait(self, timeout: float | None) -> None:
        """Until the transport takes more bytes. Raises TimeoutError after `timeout` seconds
        without it, or the reason the connection was lost."""
        if self._lost is not None:
            raise self._lost
        if not self._paused:
            return
        waiter = self._waiter
        if waiter is None or waiter.done():
            waiter = self._waiter = self._loop.create_future()
        if timeout is None:
            await asyncio.shield(waiter)
            return
        async with asyncio.timeout(timeout):
            await asyncio.shield(waiter)

    def _release(self, exc: BaseException | None = None) -> None:
        waiter = self._waiter
        self._waiter = None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)
                waiter.exception()  # retrieved here: nobody may be waiting
