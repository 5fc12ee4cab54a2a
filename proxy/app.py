"""Assembles the running proxy and how it starts, reloads and stops: per route (one, named
`default`, without `routes:`) a listener, an upstream pool, its counters and a token cache,
caches shared by routes with the same `cache_key`; per cache a refresher and, for
a secret file, a watcher; one admin listener for all.

Every listener is `proxy.wire`'s: a route's hands every request to its forwarder (a proxy has
no URL routes; a router would answer `CONNECT host:port` with 404 before any handler could
refuse it properly), the admin one to `proxy.admin`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import structlog

from proxy import logs
from proxy.admin import Admin
from proxy.config import Address, AuthSettings, Route, Settings, UpstreamSettings, read_secret_file
from proxy.egress import is_loopback
from proxy.errors import ConfigError
from proxy.forward import Forwarder
from proxy.logs import Redactor
from proxy.metrics import Stats
from proxy.ndovu import NdovuAuth
from proxy.rotation import SecretFileWatcher
from proxy.tokens import Clock, TokenCache
from proxy.wire import Listener, Pool

log = structlog.get_logger("proxy.app")

USER_AGENT = "ndovu-proxy"
#: headers aiohttp's client would add on its own; a transparent proxy must not invent them
#: (an invented Accept-Encoding would get the app a compressed body it never asked for)
NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
#: seconds a client connection may sit idle, or with a request's headers unfinished, before it
#: is closed: a slow-header client cannot hold a connection longer than this
CLIENT_IDLE_TIMEOUT = 75.0
#: seconds the admin listener waits for a byte of a request body (its endpoints take none)
ADMIN_BODY_TIMEOUT = 10.0
#: allocations between two young-generation collections (the default is 700): a request
#: allocates a few hundred objects that refcounting frees, so the default collects every
#: few requests for nothing
GC_THRESHOLD = 20_000
#: seconds a scrape in flight at shutdown may take to finish
ADMIN_DRAIN = 1.0


def tls_context(upstream: UpstreamSettings) -> ssl.SSLContext | bool:
    """What the upstream's certificate is verified with: the system's CAs, and `ca_file` as
    well when set (an extra bundle, as SPEC says: `create_default_context(cafile=...)` alone
    would trust that file only)."""
    if not upstream.tls_verify:
        return False
    if upstream.ca_file:
        context = ssl.create_default_context()
        context.load_verify_locations(cafile=upstream.ca_file)
        return context
    return True


def make_upstream(upstream: UpstreamSettings) -> Pool:
    return Pool(upstream.url, tls=tls_context(upstream), limit=upstream.max_connections,
                connect_timeout=upstream.connect_timeout, read_timeout=upstream.read_timeout,
                via=upstream.egress.proxy_for(upstream.url))


def make_session(upstream: UpstreamSettings) -> aiohttp.ClientSession:
    """The session for token requests (few, and simple)."""
    connector = aiohttp.TCPConnector(limit=upstream.max_connections, limit_per_host=0, ssl=tls_context(upstream),
                                     ttl_dns_cache=60)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=upstream.connect_timeout,
                                      sock_read=upstream.read_timeout),
        auto_decompress=False,  # Content-Encoding passes through untouched
        cookie_jar=aiohttp.DummyCookieJar(),  # one app's cookies must never reach another's request
        skip_auto_headers=NO_AUTO_HEADERS,
    )


def secret_reader(auth: AuthSettings, redactor: Redactor) -> Callable[[], str]:
    """The client secret, read again at every token request when it lives in a file."""
    if auth.client_secret_file is not None:
        path = auth.client_secret_file

        def from_file() -> str:
            value = read_secret_file(path)
            redactor.add(value)
            return value

        return from_file
    assert auth.client_secret is not None
    value = auth.client_secret.reveal()
    redactor.add(value)
    return lambda: value


def token_source(route: Route, session: aiohttp.ClientSession, redactor: Redactor) -> NdovuAuth:
    """The route's token endpoint, reached through the egress proxy its URL calls for."""
    auth = route.auth
    via = route.upstream.egress.proxy_for(auth.token_url)
    if via is not None and via.authorization is not None:
        redactor.add(via.authorization.decode())
    return NdovuAuth(
        session, auth.token_url, auth.client_id, secret_reader(auth, redactor),
        timeout=auth.timeout, user_agent=USER_AGENT, style=auth.style, scope=auth.scope,
        audience=auth.audience, extra_params=auth.extra_params,
        egress_proxy=via.url if via is not None else None,
        proxy_authorization=via.authorization.decode() if via is not None and via.authorization else None,
    )


class ListenError(ConfigError):
    """A listener could not bind: `listen 127.0.0.1:8080: address already in use` (the key,
    the address as configured, the reason). A ConfigError, so the CLI reports it and exits 1."""

    def __init__(self, key: str, address: Address, reason: str) -> None:
        super().__init__(key, f"{address}: {reason}")
        self.address = address
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.key} {self.address}: {self.reason}"


def bind_failure(exc: OSError) -> str:
    """Why a bind failed, as the C library says it ("address already in use", "cannot assign
    requested address"), without the loop's own wrapping of the message."""
    if isinstance(exc, socket.gaierror) or not exc.errno or exc.errno < 0:
        text = exc.strerror or str(exc)
    else:
        text = os.strerror(exc.errno)
    return text[:1].lower() + text[1:]


async def bind(listener: Listener, key: str, where: Address) -> Address:
    try:
        return Address(*await listener.start(where.host, where.port))
    except OSError as exc:
        raise ListenError(key, where, bind_failure(exc)) from None


def cache_key(route: Route) -> tuple[object, ...]:
    """Routes with one key share a token cache: the same credentials (AuthSettings.cache_key),
    fetched the same way (the TLS trust and the egress proxy of the token call)."""
    up = route.upstream
    return (route.auth.cache_key, up.tls_verify, up.ca_file, up.egress.proxy_for(route.auth.token_url))


@dataclass(eq=False)
class Lane:
    """One route at run time: its listener, its pool, its counters, and the token cache it
    uses (shared with every route whose auth has the same cache key)."""

    route: Route
    tokens: TokenCache
    stats: Stats
    upstream: Pool
    listener: Listener | None = None
    address: Address | None = None


class Proxy:
    """The proxy as one object: `start()`, `reload()`, `stop()`.

    A `start()` that fails (a listener cannot bind) releases what it opened, logs nothing and
    raises; `stop()` after it is quiet. Nothing goes to the auth endpoint before every listener
    is bound. `tokens`, `stats`, `upstream` and `address` are the first route's (the only one
    without `routes:`); `lanes` has them all."""

    def __init__(self, settings: Settings, *, redactor: Redactor | None = None, clock: Clock | None = None) -> None:
        self.settings = settings
        self.redactor = redactor or Redactor()
        self._clock = clock
        self.lanes: list[Lane] = []
        #: token caches by cache_key(route), with the session each fetches through
        self._caches: dict[tuple[object, ...], tuple[TokenCache, aiohttp.ClientSession]] = {}
        self._refreshers: list[asyncio.Task[None]] = []
        self._admin: Listener | None = None
        self._admin_handler: Admin | None = None
        self.draining = False
        self.admin_address: Address | None = None
        self._started = False

    # the first route's, for the common case of one
    @property
    def tokens(self) -> TokenCache | None:
        return self.lanes[0].tokens if self.lanes else None

    @property
    def stats(self) -> Stats:
        return self.lanes[0].stats if self.lanes else Stats()

    @property
    def upstream(self) -> Pool | None:
        return self.lanes[0].upstream if self.lanes else None

    @property
    def address(self) -> Address | None:
        return self.lanes[0].address if self.lanes else None

    @property
    def in_flight(self) -> int:
        return sum(lane.stats.in_flight for lane in self.lanes)

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self._release()
            raise
        self._started = True

    def _cache_for(self, route: Route, users: list[str]) -> TokenCache:
        key = cache_key(route)
        if key not in self._caches:
            auth = route.auth
            session = make_session(route.upstream)
            fields = {"route": ",".join(users)} if self.settings.named_routes else None
            cache = TokenCache(
                token_source(route, session, self.redactor),
                refresh_margin=auth.refresh_margin,
                timeout=auth.timeout,
                backoff_initial=auth.backoff_initial,
                backoff_max=auth.backoff_max,
                clock=self._clock,
                on_token=lambda t: self.redactor.add(t.value),
                log_fields=fields,
            )
            self._caches[key] = (cache, session)
        return self._caches[key][0]

    async def _start(self) -> None:
        s = self.settings
        users: dict[tuple[object, ...], list[str]] = {}
        for route in s.routes:
            users.setdefault(cache_key(route), []).append(route.name)
        for route in s.routes:
            if route.forwarding.inbound_token is not None:
                self.redactor.add(route.forwarding.inbound_token.reveal())
            tokens = self._cache_for(route, users[cache_key(route)])
            self.lanes.append(Lane(route, tokens, Stats(), make_upstream(route.upstream)))
        # the admin listener binds first: it never asks for a token, while a request on a
        # route's would; so no token is asked for until every listener is bound
        if s.admin_listen is not None:
            admin = self._admin_handler = Admin(
                [(lane.route.name, lane.tokens, lane.stats, lane.upstream) for lane in self.lanes], named=s.named_routes)
            self._admin = Listener(admin, idle_timeout=CLIENT_IDLE_TIMEOUT, body_timeout=ADMIN_BODY_TIMEOUT)
            self.admin_address = await bind(self._admin, "admin_listen", s.admin_listen)
        for lane in self.lanes:
            route = lane.route
            name = route.name if s.named_routes else None
            access = logs.access_logger(self.redactor, name) if s.logging.access_log else None
            forwarder = Forwarder(route, lane.upstream, lane.tokens, lane.stats, access)
            lane.listener = Listener(forwarder, idle_timeout=CLIENT_IDLE_TIMEOUT,
                                     body_timeout=route.upstream.read_timeout, max_head=s.limits.max_header_bytes)
            lane.address = await bind(lane.listener, f"routes[{name}].listen" if name else "listen", route.listen)
        # a secret file is watched from before the first fetch, so no change is missed
        watchers = [SecretFileWatcher(path, cache.refresh_now) for path, cache in self._secret_files()]
        # the first tokens are fetched in the background: the proxy already listens
        for cache, _ in self._caches.values():
            self._refreshers.append(asyncio.create_task(cache.run(), name="token-refresher"))
        for watcher in watchers:
            self._refreshers.append(asyncio.create_task(watcher.run(), name="secret-file-watcher"))
        loop = "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
        for lane in self.lanes:
            route = lane.route
            fields = {"route": route.name} if s.named_routes else {}
            via = route.upstream.egress.proxy_for(route.upstream.url)
            log.info(
                "listening",
                address=str(lane.address),
                loop=loop,
                admin_address=str(self.admin_address) if self.admin_address else None,
                upstream=route.upstream.url,
                **({"via": str(via)} if via is not None else {}),
                **fields,
            )
            fwd = route.forwarding
            if not is_loopback(route.listen.host) and not fwd.allowed_clients and fwd.inbound_token is None:
                log.warning(
                    "listen_unrestricted",
                    address=str(lane.address),
                    risk=f"anyone who can reach {lane.address} can call the partner API with these credentials",
                    fix="set forwarding.allowed_clients (CIDRs) and/or forwarding.inbound_token "
                        "(apps send it in X-Proxy-Token), or listen on 127.0.0.1",
                    **fields,
                )

    def _secret_files(self) -> list[tuple[str, TokenCache]]:
        """(secret file, the token cache that reads it), once each: a rotated file means a
        new token (SPEC: Shutdown and reload)."""
        seen: dict[tuple[object, ...], str] = {}
        for lane in self.lanes:
            path = lane.route.auth.client_secret_file
            if path is not None:
                seen.setdefault(cache_key(lane.route), path)
        return [(path, self._caches[key][0]) for key, path in seen.items()]

    async def reload(self) -> None:
        """SIGHUP: a token with the credentials as they now stand, for every token cache; the
        current one stays on failure."""
        log.info("reload", action="fetching a token with the current credentials")
        results = await asyncio.gather(*(cache.refresh_now() for cache, _ in self._caches.values()),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, asyncio.CancelledError):
                continue  # shutdown stopped the fetch: nothing failed
            if isinstance(result, BaseException):  # already logged as token_refresh_failed
                log.error("reload_failed", reason=getattr(result, "kind", type(result).__name__))
            else:
                log.info("reload_done", generation=result.generation)

    def begin_draining(self) -> None:
        """From SIGTERM on: /readyz answers 503 "draining"; the listeners still accept (for
        shutdown_delay, in `serve`) until `stop()` closes them."""
        if self.draining:
            return
        self.draining = True
        if self._admin_handler is not None:
            self._admin_handler.draining = True
        log.info("shutting_down", in_flight=self.in_flight, delay_s=self.settings.shutdown_delay,
                 drain_timeout_s=self.settings.shutdown_timeout)

    async def _close_background(self) -> None:
        for task in self._refreshers:
            task.cancel()
        for task in self._refreshers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._refreshers = []
        for cache, session in self._caches.values():
            await cache.close()
            await session.close()
        self._caches = {}
        for lane in self.lanes:
            await lane.upstream.close()

    async def _release(self) -> None:
        """Close whatever a failed `start()` opened, quietly: it never served."""
        for lane in self.lanes:
            if lane.listener is not None:
                lane.listener.close()
                await lane.listener.drain(0)
                lane.listener = None
        if self._admin is not None:
            self._admin.close()
            await self._admin.drain(0)
            self._admin = None
        await self._close_background()
        self.lanes = []
        logs.flush()

    async def stop(self) -> None:
        """Close the listeners at once, drain in-flight requests up to shutdown_timeout, then
        cut what is left. Quiet for a proxy that never started."""
        if not self._started:
            await self._release()
            return
        self.begin_draining()
        in_flight = self.in_flight
        listening = [lane for lane in self.lanes if lane.listener is not None]
        for lane in listening:
            assert lane.listener is not None
            lane.listener.close()  # new connections refused, idle ones closed
            log.info("listener_closed", address=str(lane.address))
        # the admin listener answers meanwhile; every route drains within one shared bound
        drained = await asyncio.gather(*(lane.listener.drain(self.settings.shutdown_timeout)
                                         for lane in listening if lane.listener is not None))
        if not all(drained):
            log.warning("shutdown_cut", reason="requests still running past shutdown_timeout")
        for lane in listening:
            lane.listener = None
        if self._admin is not None:
            self._admin.close()
            await self._admin.drain(ADMIN_DRAIN)
            self._admin = None
        await self._close_background()
        log.info("stopped", drained=in_flight)
        logs.flush()


async def serve(proxy: Proxy, *, started: Callable[[Proxy], None] | None = None) -> None:
    """Run until SIGTERM or SIGINT; SIGHUP reloads the token. After the signal, /readyz says
    draining at once while the listener keeps accepting for shutdown_delay seconds (a second
    signal cuts that short), so load balancers stop sending before it closes; then `stop()`."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        task = loop.create_task(proxy.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await proxy.start()
        # what start-up made lives as long as the process: out of the collector's sight, so
        # the collections that requests' allocations trigger have less to walk
        gc.freeze()
        gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
        if started is not None:
            started(proxy)
        await stop.wait()
        proxy.begin_draining()
        if proxy.settings.shutdown_delay > 0:
            stop.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), proxy.settings.shutdown_delay)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        for task in reloads:  # a reload under way when shutdown came: over, not failed
            task.cancel()
        await asyncio.gather(*reloads, return_exceptions=True)
        await proxy.stop()
