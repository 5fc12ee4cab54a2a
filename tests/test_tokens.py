"""The token cache, on an injected clock: no real waiting anywhere, and no counting of event-loop
turns either: a test waits for the refresher to park on the clock again (`FakeClock.step`,
`FakeClock.wait_parked`) or for a fetch to be held open (`ScriptedSource.held`)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator

import pytest

from proxy.errors import AuthUnreachable, BadAuthResponse, CredentialsRejected, RateLimited, TokenUnavailable
from proxy import tokens
from proxy.tokens import RECHECK_INTERVAL, Grant, TokenCache
from tests.fakes import FakeClock


class ScriptedSource:
    """A TokenSource whose answers the test writes; counts calls; can hold a call open."""

    def __init__(self, lifetime: float = 100) -> None:
        self.calls = 0
        self.lifetime = lifetime
        self.failures: list[Exception] = []
        self.gate: asyncio.Event | None = None
        self.held = asyncio.Event()  # set once a call waits at the gate

    async def fetch(self) -> Grant:
        self.calls += 1
        if self.gate is not None:
            self.held.set()
            await self.gate.wait()
        if self.failures:
            raise self.failures.pop(0)
        return Grant(value=f"token-{self.calls}", lifetime=self.lifetime)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def source() -> ScriptedSource:
    return ScriptedSource()


def make_cache(source: ScriptedSource, clock: FakeClock, **kw: float) -> TokenCache:
    args = {"refresh_margin": 60.0, "timeout": 10.0, "backoff_initial": 1.0, "backoff_max": 60.0, **kw}
    return TokenCache(source, clock=clock, rand=lambda: 0.5, **args)


async def held(source: ScriptedSource) -> None:
    """Wait until a fetch is under way and held at the source's gate."""
    await asyncio.wait_for(source.held.wait(), FakeClock.PARK_TIMEOUT)


@pytest.fixture
async def running(source: ScriptedSource, clock: FakeClock) -> AsyncIterator[TokenCache]:
    cache = make_cache(source, clock)
    mark = clock.parks
    task = asyncio.create_task(cache.run())
    await clock.wait_parked(mark)  # the first token is in, the refresher asleep until its renewal
    yield cache
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_concurrent_gets_share_one_fetch(source: ScriptedSource, clock: FakeClock) -> None:
    cache = make_cache(source, clock)
    source.gate = asyncio.Event()
    waiters = [asyncio.create_task(cache.get()) for _ in range(25)]
    await held(source)
    source.gate.set()
    tokens = await asyncio.gather(*waiters)
    assert source.calls == 1
    assert {t.value for t in tokens} == {"token-1"}
    assert {t.generation for t in tokens} == {1}


async def test_waiters_share_a_failure(source: ScriptedSource, clock: FakeClock) -> None:
    cache = make_cache(source, clock)
    source.gate = asyncio.Event()
    source.failures = [AuthUnreachable("down")]
    waiters = [asyncio.create_task(cache.get()) for _ in range(5)]
    await held(source)
    source.gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, TokenUnavailable) for r in results)
    assert source.calls == 1


async def test_valid_token_is_returned_without_a_call(source: ScriptedSource, clock: FakeClock) -> None:
    cache = make_cache(source, clock)
    first = await cache.get()
    for _ in range(100):
        assert await cache.get() is first
    await clock.step(99)
    assert await cache.get() is first
    assert source.calls == 1


async def test_refresher_renews_margin_seconds_before_expiry(running: TokenCache, source: ScriptedSource, clock: FakeClock) -> None:
    source.lifetime = 3600
    mark = clock.parks
    running.invalidate(running.current)  # type: ignore[arg-type]
    await clock.wait_parked(mark)  # renewed, asleep again
    assert running.current is not None and running.current.lifetime == 3600
    calls = source.calls
    await clock.step(3600 - 60 - 1)
    assert source.calls == calls  # not yet
    await clock.step(1)
    assert source.calls == calls + 1


async def test_margin_is_clamped_to_half_the_lifetime(running: TokenCache, source: ScriptedSource, clock: FakeClock) -> None:
    # lifetime 100, margin 60 -> refresh at 50 s, not at 40 s
    assert source.calls == 1
    await clock.step(49)
    assert source.calls == 1
    await clock.step(1)
    assert source.calls == 2


async def test_requests_never_wait_for_a_refresh_while_the_token_is_valid(running: TokenCache, source: ScriptedSource, clock: FakeClock) -> None:
    source.gate = asyncio.Event()
    clock.move(50)  # refresh starts and hangs
    await held(source)
    assert source.calls == 2
    token = await asyncio.wait_for(running.get(), 0.5)  # answered at once
    assert token.generation == 1
    mark = clock.parks
    source.gate.set()
    await clock.wait_parked(mark)  # the refresh is in, the refresher asleep again
    assert (await running.get()).generation == 2


async def test_failed_refresh_keeps_the_token_until_real_expiry(running: TokenCache, source: ScriptedSource, clock: FakeClock) -> None:
    source.failures = [AuthUnreachable("down")] * 50
    await clock.step(50)  # refresh fails
    assert running.last_error == "auth_unreachable"
    await clock.step(49.9)
    assert (await running.get()).generation == 1
    await clock.step(0.2)  # expired now
    with pytest.raises(TokenUnavailable):
        await running.get()


async def test_backoff_doubles_with_jitter_never_above_the_cap(source: ScriptedSource, clock: FakeClock) -> None:
    cache = make_cache(source, clock, backoff_initial=1, backoff_max=8)
    for rand in (0.0, 0.5, 0.999999):
        cache._rand = lambda r=rand: r  # type: ignore[misc]
        delays = [cache.backoff_delay(n) for n in range(1, 10)]
        assert all(d <= 8 for d in delays)
        assert delays[0] >= 0.5 and delays[-1] >= 4
    cache._rand = lambda: 0.999999  # type: ignore[misc]
    assert [round(cache.backoff_delay(n)) for n in range(1, 6)] == [1, 2, 4, 8, 8]


async def test_refresher_retries_with_backoff(running: TokenCache, source: ScriptedSource, clock: FakeClock) -> None:
    mark = clock.parks
    running.invalidate(running.current)  # type: ignore[arg-type]
    source.failures = [AuthUnreachable("down")] * 4
    await clock.wait_parked(mark)  # the first retry failed; backing off
    # rand=0.5 -> delays 0.75, 1.5, 3, 6
    calls = []
    for step in (0.75, 1.5, 3, 6):
        calls.append(source.calls)
        await clock.step(step)
    assert calls == [2, 3, 4, 5]
    assert source.calls == 6
    assert running.current is not None and running.last_error is None


async def test_during_backoff_get_fails_at_once_and_starts_nothing(source: ScriptedSource, clock: FakeClock) -> None:
    cache = make_cache(source, clock, backoff_initial=10, backoff_max=60)
    source.failures = [CredentialsRejected("401", status=401, hint="raw secret")]
    with pytest.raises(TokenUnavailable) as first:
        await cache.get()
    assert source.calls == 1
    for _ in range(20):
        with pytest.raises(TokenUnavailable) as again:
            await cache.get()
    assert source.calls == 1
    assert 1 <= again.value.retry_after <= 10
    assert first.value.retry_after >= 1
    await clock.step(10)
    assert (await cache.get()).value == "token-2"


async def test_retry_after_of_a_429_is_honoured(source: ScriptedSource, clock: FakeClock) -> None:
    cache = make_cache(source, clock, backoff_initial=1, backoff_max=4)
    source.failures = [RateLimited("429", retry_after=30)]
    with pytest.raises(TokenUnavailable) as err:
        await cache.get()
    assert err.value.retry_after == 30
    await clock.step(29)
    with pytest.raises(TokenUnavailable):
        await cache.get()
    assert source.calls == 1
    await clock.step(1)
    await cache.get()
    assert source.calls == 2


async def test_invalidate_drops_only_the_current_generation(source: ScriptedSource, clock: FakeClock) -> None:
    cache = make_cache(source, clock)
    old = await cache.get()
    assert cache.invalidate(old) is True
    new = await cache.get()
    assert new.generation == 2
    # late 401s on the old token change nothing
    for _ in range(10):
        assert cache.invalidate(old) is False
    assert cache.current is new
    assert source.calls == 2


async def test_slow_fetch_answers_waiters_with_503_after_the_timeout(source: ScriptedSource, clock: FakeClock) -> None:
    cache = make_cache(source, clock, timeout=0.05)
    source.gate = asyncio.Event()
    with pytest.raises(TokenUnavailable):
        await cache.get()
    source.gate.set()


async def test_fetch_counts_by_result(source: ScriptedSource, clock: FakeClock) -> None:
    cache = make_cache(source, clock, backoff_initial=1, backoff_max=1)
    source.failures = [CredentialsRejected("x", status=401, hint=""), BadAuthResponse("y")]
    for _ in range(2):
        with pytest.raises(TokenUnavailable):
            await cache.get()
        await clock.step(1)
    await cache.get()
    assert dict(cache.fetches) == {"rejected": 1, "error": 1, "success": 1}


def test_token_repr_hides_the_value() -> None:
    from proxy.tokens import Token

    token = Token(value="very-secret-token", generation=3, lifetime=10, obtained_at=0, obtained_wall=0)
    assert "very-secret-token" not in repr(token)
    assert "very-secret-token" not in repr(Grant(value="very-secret-token", lifetime=1))
    assert token.header == b"Bearer very-secret-token"
    assert len(token.fingerprint) == 12


async def test_cancelling_the_refresher_ends_it_even_as_a_fetch_completes(source: ScriptedSource, clock: FakeClock) -> None:
    cache = make_cache(source, clock)
    source.gate = asyncio.Event()
    refresher = asyncio.create_task(cache.run())
    await held(source)  # the refresher's first fetch is in flight, held open
    assert source.calls == 1
    source.gate.set()  # the fetch completes in the same loop turn as the cancel
    refresher.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(refresher, 2)
    await cache.close()


# --- a laptop that sleeps ---------------------------------------------------------------------


async def test_a_token_that_expired_while_the_machine_slept_is_never_used(
    running: TokenCache, source: ScriptedSource, clock: FakeClock,
) -> None:
    first = await running.get()
    clock.suspend(2 * 3600)  # a two-hour sleep; the refresher's timer has not fired
    token = await running.get()
    assert token.value != first.value and source.calls == 2


async def test_the_refresher_notices_a_sleep_within_its_recheck_interval(
    running: TokenCache, source: ScriptedSource, clock: FakeClock,
) -> None:
    # the token (lifetime 100, margin clamped to 50) is due for renewal at +50; the machine
    # sleeps for an hour at +10. Awake again, the refresher looks within RECHECK_INTERVAL
    # seconds of timer time and renews before any request asks.
    await clock.step(10)
    clock.suspend(3600)
    assert running.valid_token() is None
    await clock.step(RECHECK_INTERVAL)
    assert source.calls == 2 and running.valid_token() is not None


def test_lifetimes_count_on_a_clock_that_runs_through_suspend(monkeypatch: pytest.MonkeyPatch) -> None:
    # on a machine that never slept, monotonic and boot time read alike: the test looks at
    # which clock is read, not at the figures
    if hasattr(time, "CLOCK_BOOTTIME"):
        clock = tokens.elapsed_clock()
        assert isinstance(clock, functools.partial) and clock.func is time.clock_gettime
        assert clock.args == (time.CLOCK_BOOTTIME,)
    monkeypatch.delattr(time, "CLOCK_BOOTTIME", raising=False)  # macOS, Windows
    assert tokens.elapsed_clock() is time.monotonic


async def test_refresh_now_during_a_fetch_asks_again_after_it(source: ScriptedSource, clock: FakeClock) -> None:
    # SIGHUP or a rotated secret while a renewal is under way: that renewal may have read the
    # old secret, so a new request follows it
    cache = make_cache(source, clock)
    source.gate = asyncio.Event()
    renewal = asyncio.create_task(cache.get())
    await held(source)
    reload = asyncio.create_task(cache.refresh_now())
    source.gate.set()
    assert (await renewal).generation == 1
    token = await reload
    assert source.calls == 2 and token.generation == 2 and cache.current is token
