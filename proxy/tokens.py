"""The token cache: one valid bearer token, kept fresh, shared by every request.

Invariants:
- `get()` never waits while the current token is valid; it is a field read.
- At most one token request is in flight (single flight); everyone who needs it shares its
  result, success or failure.
- Each token has a generation. `invalidate(token)` drops it only while it is still the current
  one, so a burst of 401s on one token costs one fetch.
- A failed refresh keeps the current token until its real expiry. Failures back off
  exponentially (`backoff_initial` doubled up to `backoff_max`, with jitter that never exceeds
  the cap; a 429's Retry-After is a floor). During a backoff with no valid token, `get()`
  fails at once with `TokenUnavailable` and starts nothing.
- The background refresher renews `refresh_margin` seconds before expiry, clamped to half
  the lifetime so a short-lived token is not renewed continuously.

- Lifetimes are counted on a clock that keeps running while the machine is suspended
  (CLOCK_BOOTTIME on Linux), so a token that expired during a laptop's sleep is never sent;
  since asyncio's timers stand still during a suspend, the refresher looks at the clock at
  least every RECHECK_INTERVAL seconds rather than sleeping until the renewal is due.

The clock and the random source are injected, so tests drive time by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from proxy.errors import (
    AuthError,
    AuthUnreachable,
    CredentialsRejected,
    RateLimited,
    SecretUnreadable,
    TokenUnavailable,
)

log = structlog.get_logger("proxy.tokens")


#: the longest the refresher sleeps before it looks at the clock again: asyncio's timers stop
#: while the machine is suspended, so a laptop that slept past the refresh time wakes into a
#: refresher still waiting for it; a bounded sleep notices within this many seconds
RECHECK_INTERVAL = 5.0


def elapsed_clock() -> Callable[[], float]:
    """CLOCK_BOOTTIME where there is one (Linux): `time.monotonic()` stops while a Linux
    machine is suspended, so a one-hour token would look fresh after a two-hour sleep; the
    boot-time clock keeps counting. Elsewhere `time.monotonic()` (which on macOS and Windows
    already counts suspended time). Never the wall clock, which can jump."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if boottime is None:
        return time.monotonic
    try:
        time.clock_gettime(boottime)
    except OSError:
        return time.monotonic
    return functools.partial(time.clock_gettime, boottime)


class Clock(Protocol):
    def monotonic(self) -> float: ...  # seconds that keep counting while the machine sleeps
    def time(self) -> float: ...
    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    monotonic = staticmethod(elapsed_clock())
    time = staticmethod(time.time)
    sleep = staticmethod(asyncio.sleep)


@dataclass(frozen=True, slots=True)
class Grant:
    """What a token source hands back: the token and how long it lives, in seconds."""

    value: str
    lifetime: float

    def __repr__(self) -> str:
        return f"Grant(lifetime={self.lifetime}, value=<hidden>)"


class TokenSource(Protocol):
    async def fetch(self) -> Grant: ...


@dataclass(frozen=True, slots=True, repr=False)
class Token:
    value: str
    generation: int
    lifetime: float
    obtained_at: float  # clock.monotonic()
    obtained_wall: float  # clock.time(), for display
    #: the whole `Authorization` value as sent, built once per token rather than per request
    header: bytes = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "header", f"Bearer {self.value}".encode())

    @property
    def expires_at(self) -> float:
        return self.obtained_at + self.lifetime

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.value.encode()).hexdigest()[:12]

    def __repr__(self) -> str:
        return f"Token(generation={self.generation}, fingerprint={self.fingerprint})"


class TokenCache:
    """Decorates a `TokenSource` with caching, single flight, refresh and backoff."""

    def __init__(
        self,
        source: TokenSource,
        *,
        refresh_margin: float,
        timeout: float,
        backoff_initial: float,
        backoff_max: float,
        clock: Clock | None = None,
        rand: Callable[[], float] = random.random,
        on_token: Callable[[Token], None] | None = None,
        log_fields: Mapping[str, object] | None = None,
    ) -> None:
        self._source = source
        #: token events carry these (the routes that share the cache, when the config names routes)
        self._log = log.bind(**log_fields) if log_fields else log
        self._refresh_margin = refresh_margin
        self._timeout = timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._clock: Clock = clock or SystemClock()
        self._rand = rand
        self._on_token = on_token  # e.g. the log redactor, which must learn every token
        self._token: Token | None = None
        self._generation = 0
        self._inflight: asyncio.Task[Token] | None = None
        self._failures = 0
        self._next_attempt_at = 0.0
        self._changed = asyncio.Event()
        self.last_error: str | None = None
        #: token requests by result: success, rejected, error
        self.fetches: Counter[str] = Counter()

    # --- what requests use ----------------------------------------------------------

    @property
    def current(self) -> Token | None:
        """The token in use, valid or not (None before the first one or after a 401)."""
        return self._token

    def valid_token(self) -> Token | None:
        token = self._token
        if token is not None and token.expires_at > self._clock.monotonic():
            return token
        return None

    async def get(self) -> Token:
        token = self._token
        if token is not None and token.expires_at > self._clock.monotonic():
            return token
        inflight = self._inflight
        if inflight is None:
            wait = self._next_attempt_at - self._clock.monotonic()
            if wait > 0:
                raise TokenUnavailable(
                    f"no valid token; next token request in {math.ceil(wait)}s ({self.last_error})",
                    retry_after=math.ceil(wait),
                )
            inflight = self._start_fetch()
        try:
            return await asyncio.wait_for(asyncio.shield(inflight), self._timeout)
        except AuthError as exc:
            wait = self._next_attempt_at - self._clock.monotonic()
            raise TokenUnavailable(
                f"no valid token: {exc.kind}", retry_after=math.ceil(wait)
            ) from exc
        except TimeoutError as exc:
            raise TokenUnavailable("no valid token: the token request is slow", retry_after=1) from exc

    def invalidate(self, stale: Token) -> bool:
        """Drop `stale` if it is still current (the upstream said 401 to it). True if dropped."""
        if self._token is not None and self._token.generation == stale.generation:
            self._token = None
            self._log.info("token_invalidated", generation=stale.generation)
            self._changed.set()
            return True
        return False

    # --- refreshing ---------------------------------------------------------------------

    async def refresh_now(self) -> Token:
        """Fetch a token now with the credentials as they now stand, whatever the state (SIGHUP,
        a rotated secret file). On failure the current one stays."""
        inflight = self._inflight
        if inflight is not None:
            # a fetch already under way may have read the secret before it changed: let it
            # end, then ask again
            with contextlib.suppress(AuthError):
                await asyncio.shield(inflight)
        # shielded: a cancelled caller must neither cancel the shared fetch nor, should the
        # fetch finish at that moment, lose its own cancellation
        return await asyncio.shield(self._start_fetch())

    async def run(self) -> None:
        """The background refresher; runs until cancelled."""
        while True:
            self._changed.clear()
            delay = self._next_refresh_in()
            if delay > 0:
                await self._sleep_or_change(min(delay, RECHECK_INTERVAL))
                continue
            with contextlib.suppress(AuthError):
                await asyncio.shield(self._start_fetch())

    async def close(self) -> None:
        """Cancel a token request in flight (at shutdown)."""
        inflight = self._inflight
        if inflight is not None:
            inflight.cancel()
            with contextlib.suppress(asyncio.CancelledError, AuthError):
                await inflight

    def _next_refresh_in(self) -> float:
        now = self._clock.monotonic()
        if self._inflight is not None:
            return math.inf  # its completion sets _changed
        if self._next_attempt_at > now:
            return self._next_attempt_at - now
        token = self._token
        if token is None:
            return 0.0
        margin = min(self._refresh_margin, token.lifetime / 2)
        return token.expires_at - margin - now

    async def _sleep_or_change(self, delay: float) -> None:
        changed = asyncio.ensure_future(self._changed.wait())
        sleeper = asyncio.ensure_future(self._clock.sleep(delay)) if delay != math.inf else None
        waiters = {changed} if sleeper is None else {changed, sleeper}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    def _start_fetch(self) -> asyncio.Task[Token]:
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._fetch())
            # a failure nobody awaits (the refresher's) is still recorded: see _fetch
            self._inflight.add_done_callback(_consume_exception)
        return self._inflight

    async def _fetch(self) -> Token:
        try:
            try:
                grant = await asyncio.wait_for(self._source.fetch(), self._timeout)
            except TimeoutError:
                raise AuthUnreachable(f"no answer within auth.timeout ({self._timeout:g}s)") from None
        except AuthError as exc:
            self._failed(exc)
            raise
        else:
            return self._acquired(grant)
        finally:
            self._inflight = None
            self._changed.set()

    def _acquired(self, grant: Grant) -> Token:
        self._generation += 1
        token = Token(
            value=grant.value,
            generation=self._generation,
            lifetime=grant.lifetime,
            obtained_at=self._clock.monotonic(),
            obtained_wall=self._clock.time(),
        )
        if self._on_token is not None:
            self._on_token(token)
        self._token = token
        self._failures = 0
        self._next_attempt_at = 0.0
        self.last_error = None
        self.fetches["success"] += 1
        self._log.info("token_acquired", lifetime_s=round(grant.lifetime, 3), generation=token.generation)
        return token

    def _failed(self, exc: AuthError) -> None:
        self._failures += 1
        delay = self.backoff_delay(self._failures)
        if isinstance(exc, RateLimited) and exc.retry_after is not None:
            delay = max(delay, exc.retry_after)
        self._next_attempt_at = self._clock.monotonic() + delay
        self.last_error = exc.kind
        self.fetches[exc.result] += 1
        fields = {"reason": exc.kind, "detail": exc.detail, "next_attempt_in_s": round(delay, 3)}
        if isinstance(exc, CredentialsRejected):
            self._log.error("token_refresh_failed", status=exc.status, hint=exc.hint, **fields)
        elif isinstance(exc, SecretUnreadable):  # no request was sent; the operator must act
            self._log.error("token_refresh_failed", **fields)
        else:
            self._log.warning("token_refresh_failed", **fields)

    def backoff_delay(self, failures: int) -> float:
        """Delay before attempt `failures + 1`: half fixed, half jitter, never above the cap."""
        base: float = min(self._backoff_max, self._backoff_initial * 2.0 ** min(failures - 1, 62))
        return base / 2 + self._rand() * base / 2

    def seconds_left(self) -> float | None:
        """Seconds until the current token expires (negative once it has); None without one."""
        token = self._token
        return None if token is None else token.expires_at - self._clock.monotonic()


def _consume_exception(task: asyncio.Task[Token]) -> None:
    if not task.cancelled():
        task.exception()
