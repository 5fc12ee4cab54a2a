"""Running the real `ndovu-proxy` command in a subprocess, reading its JSON log lines."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from tests.fakes import CLIENT_ID, CLIENT_SECRET, FakeNdovu


class Command:
    """`python -m proxy ARGS` with its stdout and stderr read as they come."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("NDOVU_")}
        self.env.update(env or {})
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._new_line = asyncio.Event()
        self.proc: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []

    async def start(self) -> Command:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", *self.args, env=self.env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._read(self.proc.stdout, self.stdout)),
            asyncio.create_task(self._read(self.proc.stderr, self.stderr)),
        ]
        return self

    async def _read(self, stream: asyncio.StreamReader, into: list[str]) -> None:
        async for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            into.append(line)
            if into is self.stderr and line.startswith("{"):
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    pass
            self._new_line.set()

    async def wait_for(self, predicate: Any, timeout: float = 10) -> Any:
        """The first log event (or stdout line) for which predicate is true."""
        async def scan() -> Any:
            while True:
                self._new_line.clear()
                for item in [*self.events, *self.stdout]:
                    if predicate(item):
                        return item
                if self.proc is not None and self.proc.returncode is not None:
                    raise AssertionError(f"exited {self.proc.returncode}: {self.output()}")
                await self._new_line.wait()

        return await asyncio.wait_for(scan(), timeout)

    async def event(self, name: str, timeout: float = 10) -> dict[str, Any]:
        return await self.wait_for(lambda e: isinstance(e, dict) and e.get("event") == name, timeout)  # type: ignore[no-any-return]

    async def listening(self) -> tuple[str, str | None]:
        e = await self.event("listening")
        return e["address"], e["admin_address"]

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 15) -> int:
        assert self.proc is not None
        rc = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.gather(*self._readers)
        return rc

    async def run(self, timeout: float = 20) -> int:
        await self.start()
        return await self.wait(timeout)

    def output(self) -> str:
        return "\n".join(self.stdout + self.stderr)

    async def stop(self) -> None:
        """End the process if the test left it running (only this one, by its own handle)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for task in self._readers:
            task.cancel()


#: the `command` fixture's type (tests/conftest.py)
MakeCommand = Callable[..., Command]


def proxy_env(fake: FakeNdovu, **extra: str) -> dict[str, str]:
    """The environment of a `serve` in front of `fake`: its credentials, free loopback ports,
    debug-level JSON lines (what Command reads events from); `extra` on top."""
    return {
        "NDOVU_CLIENT_ID": CLIENT_ID,
        "NDOVU_CLIENT_SECRET": CLIENT_SECRET,
        "NDOVU_UPSTREAM_URL": fake.url,  # type: ignore[attr-defined]
        "NDOVU_PROXY_LISTEN": "127.0.0.1:0",
        "NDOVU_PROXY_ADMIN_LISTEN": "127.0.0.1:0",
        "NDOVU_PROXY_LOG_LEVEL": "debug",
        "NDOVU_PROXY_LOG_FORMAT": "json",
        **extra,
    }
