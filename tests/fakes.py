"""Test doubles that are real: a fake Ndovu API (the product's mock plus recording and fault
knobs) served on loopback by pytest-aiohttp, and a clock the tests move by hand."""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from proxy.mock import API, MockNdovu

CLIENT_ID = "partner-7"
# a raw secret with characters that base64 and naive quoting get wrong
CLIENT_SECRET = "s3cr3t/+=:é-raw"

Fault = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Recorded:
    method: str
    path_qs: str
    raw_path: str
    headers: dict[str, str]
    body: bytes


class FakeNdovu(MockNdovu):
    """The mock with what tests need: every request recorded, and scripted faults."""

    def __init__(self) -> None:
        super().__init__(CLIENT_ID, CLIENT_SECRET, 3600)
        self.auth_faults: list[Fault] = []  # consumed one per auth call
        self.api_faults: dict[str, Fault] = {}  # by the path after /api/v3/partners/
        self.auth_log: list[Recorded] = []
        self.api_log: list[Recorded] = []
        self.issued: list[str] = []
        self.auth_gate: asyncio.Event | None = None  # when set, auth calls wait for it

    def issue(self) -> str:
        token = super().issue()
        self.issued.append(token)
        return token

    def revoke(self, token: str) -> None:
        self._tokens.pop(token, None)

    @staticmethod
    async def _record(request: web.Request, into: list[Recorded]) -> Recorded:
        body = await request.read()
        rec = Recorded(request.method, request.path_qs, request.raw_path, dict(request.headers), body)
        into.append(rec)
        return rec

    async def auth(self, request: web.Request) -> web.Response:
        rec = await self._record(request, self.auth_log)
        if self.auth_gate is not None:
            await self.auth_gate.wait()
        if self.auth_faults:
            self.auth_calls += 1
            return await self.auth_faults.pop(0)(request)  # type: ignore[return-value]
        if rec.body and self.style == "ndovu":  # the oauth2 style wants a form body
            self.auth_calls += 1
            return web.json_response({"error": "invalid_request"}, status=400)
        return await super().auth(request)

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        tail = request.match_info["tail"]
        fault = self.api_faults.get(tail)
        if fault is not None:
            return await fault(request)
        rec = await self._record(request, self.api_log)
        if not self._authorised(request):
            return self._unauthorised()
        if tail == "products" and request.method == "GET":
            return await self.products(request)
        self.api_calls += 1
        return web.json_response(
            {
                "method": request.method,
                "path": request.path,
                "raw_path": request.raw_path,
                "query": request.raw_path.partition("?")[2],
                "headers": rec.headers,
                "body_length": len(rec.body),
                "body_sha256": hashlib.sha256(rec.body).hexdigest(),
            }
        )

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.router.add_post(f"{API}/auth", self.auth)
        app.router.add_route("*", API + "/{tail:.*}", self.dispatch)
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        return app


# --- scripted faults ----------------------------------------------------------------------


def status(code: int, body: object = None, headers: dict[str, str] | None = None) -> Fault:
    async def fault(_request: web.Request) -> web.StreamResponse:
        doc = body if body is not None else {"error": "scripted"}
        return web.json_response(doc, status=code, headers=headers)

    return fault


def raw(body: bytes, code: int = 200, content_type: str = "application/json") -> Fault:
    async def fault(_request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, status=code, content_type=content_type)

    return fault


def stall(event: asyncio.Event, then: Fault | None = None) -> Fault:
    """Answer nothing until `event` is set."""

    async def fault(request: web.Request) -> web.StreamResponse:
        await event.wait()
        if then is not None:
            return await then(request)
        return web.Response(text="late")

    return fault


class Gate:
    """A fault that holds every request until `release` is set, then answers `text`;
    `reached` is set as soon as one request is held."""

    def __init__(self, text: str = "late") -> None:
        self.reached, self.release = asyncio.Event(), asyncio.Event()
        self._text = text

    async def __call__(self, _request: web.Request) -> web.StreamResponse:
        self.reached.set()
        await self.release.wait()
        return web.Response(text=self._text)


def reset() -> Fault:
    """Drop the connection without an answer."""

    async def fault(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        return web.Response()

    return fault


# --- a clock the test moves -----------------------------------------------------------------


class FakeClock:
    """monotonic(), time() and sleep() driven by the test; no real waiting.

    `step()` moves time on and returns once every sleeper it woke has parked on the clock again
    (`sleep()` called anew), which the token refresher does after each wake-up whatever it led
    to (a renewal, a failure and its backoff, or nothing yet): a signal, not a count of loop
    turns. When a wake-up is expected to block elsewhere instead (a fetch held open), `move()`
    wakes the sleepers without waiting and the test waits on that other thing. `mark = parks`
    then `wait_parked(mark)` waits for the next park after something else woke the refresher.
    `advance()`, for a clock that drives a running refresher (the proxy's), first waits until
    something sleeps on the clock (the refresher may still be on its way there), then steps.
    """

    #: real seconds to wait for a sleeper to park before failing the test
    PARK_TIMEOUT = 10.0

    def __init__(self) -> None:
        self.now = 1000.0
        self._wall_offset = 1_790_000_000.0 - self.now
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        #: `sleep()` calls so far: mark it, then `wait_parked(mark)` for the next one
        self.parks = 0
        self._parked = asyncio.Event()  # set, and replaced, at every sleep()

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now + self._wall_offset

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, next(self._seq), fut))
        self.parks += 1
        self._parked.set()
        self._parked = asyncio.Event()
        await fut

    def move(self, seconds: float) -> int:
        """Move time on and wake every sleeper now due, without waiting; how many woke."""
        self.now += seconds
        woken = 0
        while self._sleepers and self._sleepers[0][0] <= self.now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)
                woken += 1
        return woken

    def suspend(self, seconds: float) -> None:
        """The machine sleeps: the clock that counts lifetimes (CLOCK_BOOTTIME) moves on, while
        timers, like asyncio's, stand still: every sleeper's wake-up moves as far, and none wakes."""
        self.now += seconds
        self._sleepers = [(due + seconds, seq, fut) for due, seq, fut in self._sleepers]
        heapq.heapify(self._sleepers)

    async def step(self, seconds: float) -> None:
        """Move time on, wake every sleeper now due, and wait until each has parked again."""
        mark = self.parks
        woken = self.move(seconds)
        while woken:
            await self.wait_parked(mark, woken)
            mark = self.parks
            woken = self.move(0)  # one that parked with a deadline already due

    async def advance(self, seconds: float) -> None:
        """Wait until a sleeper is parked on the clock (a refresher that just got its token, or
        just failed, parks a moment later), then `step()`."""
        await self._until(lambda: any(not fut.done() for _, _, fut in self._sleepers), "nothing parked")
        await self.step(seconds)

    async def wait_parked(self, mark: int, count: int = 1) -> None:
        """Wait until `sleep()` has been called `count` times since `parks` was `mark`."""
        await self._until(lambda: self.parks >= mark + count, f"{count} sleeper(s) did not park")

    async def _until(self, parked: Callable[[], bool], failure: str) -> None:
        """Wait until `parked()`, checked again at every `sleep()`: the only way it changes."""
        try:
            async with asyncio.timeout(self.PARK_TIMEOUT):
                while not parked():
                    await self._parked.wait()
        except TimeoutError:
            raise AssertionError(f"{failure} on the fake clock within {self.PARK_TIMEOUT:g} s") from None


async def eventually(condition: Callable[[], bool], timeout: float = 5.0, step: float = 0.005) -> bool:
    """Poll `condition` until it holds, for at most `timeout` real seconds; its last value.

    Only for a state nothing can be awaited for (a counter, the set of tasks, a queue inside
    the pool): wait on an event, a task, a response or the fake clock wherever there is one.
    The short sleeps here only pace the polling; the test waits on the condition."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() >= deadline:
            return condition()
        await asyncio.sleep(step)
    return True
