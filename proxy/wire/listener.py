"""The listening socket: accepts connections, closes and drains them at shutdown, and looks
for the FIN of clients whose reading is paused (the kernel holds it behind unread bytes,
where `eof_received` cannot see it)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from email.utils import formatdate
from typing import Protocol

from proxy.wire.request import Request
from proxy.wire.server import Connection

#: seconds between looks for a FIN from clients whose reading is paused
FIN_CHECK = 1.0


class Handler(Protocol):
    """What the listener hands requests to."""

    def __call__(self, request: Request) -> Awaitable[None]: ...
    def refuse(self, request: Request, kind: str) -> None:
        """Answer a request that could not be read (`kind` is one of MALFORMED)."""
    def fail(self, request: Request, exc: Exception) -> None:
        """Answer (500) for a bug in the handler; called only if nothing was sent yet."""


class Listener:
    """A listening socket and its connections."""

    def __init__(self, handler: Handler, *, idle_timeout: float, body_timeout: float,
                 max_head: int = 2**16) -> None:
        self.loop = asyncio.get_running_loop()
        self.handler = handler
        self.idle_timeout = idle_timeout
        self.body_timeout = body_timeout
        self.max_head = max_head
        self.connections: set[Connection] = set()
        self.paused: set[Connection] = set()  # reading paused: watched for a FIN
        self._watcher: asyncio.TimerHandle | None = None
        self._server: asyncio.Server | None = None
        self._date = b""
        self._date_at = 0

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await self.loop.create_server(
            lambda: Connection(self), host, port, reuse_address=True, backlog=1024,
        )
        name = self._server.sockets[0].getsockname()
        return name[0], name[1]

    def close(self) -> None:
        """Refuse new connections; idle ones close now, busy ones after their response."""
        if self._server is not None:
            self._server.close()
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        for conn in list(self.connections):
            conn.shut()

    async def drain(self, timeout: float) -> bool:
        """Wait for open connections to finish, up to `timeout`; then cut what is left.
        True if everything finished in time."""
        tasks = {c._task for c in self.connections if c._task is not None}
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        for conn in list(self.connections):
            conn.abort()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        return not pending

    def watch(self, conn: Connection) -> None:
        """Look for a FIN from `conn` while its reading is paused."""
        self.paused.add(conn)
        if self._watcher is None:
            self._watcher = self.loop.call_later(FIN_CHECK, self._check_paused)

    def _check_paused(self) -> None:
        self._watcher = None
        for conn in list(self.paused):
            if conn.transport is None:
                self.paused.discard(conn)
            elif conn.peer_closed():
                self.paused.discard(conn)
                conn.abort()  # connection_lost cancels what works for it
        if self.paused:
            self._watcher = self.loop.call_later(FIN_CHECK, self._check_paused)

    def date_line(self) -> bytes:
        """`Date: ...\\r\\n`, formatted once a second (RFC 9110 §6.6.1)."""
        now = int(time.time())
        if now != self._date_at:
            self._date_at = now
            self._date = f"Date: {formatdate(now, usegmt=True)}\r\n".encode()
        return self._date
