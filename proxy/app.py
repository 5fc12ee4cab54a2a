"""Assembles the running proxy: the token cache and its refresher, the upstream pool, the
proxy listener and the admin listener; and how they start, reload and stop.

Both listeners are `proxy.wire`'s: the proxy's hands every request to the forwarder (a
proxy has no routes; a router would answer `CONNECT host:port` with 404 before any
handler could refuse it properly), the admin one to `proxy.admin`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import socket
import ssl
from collections.abc import Callable

import aiohttp
import structlog

from proxy import logs
from proxy.admin import Admin
from proxy.config import Address, Settings, read_secret_file
from proxy.errors import ConfigError
from proxy.forward import Forwarder
from proxy.logs import Redactor
from proxy.metrics import Stats
from proxy.ndovu import NdovuAuth
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
#: seconds a scrape in flight at shutdown may take to finish
ADMIN_DRAIN = 1.0


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (also as ::ffff:127.x.x.x) and localhost: only this machine reaches it."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def tls_context(settings: Settings) -> ssl.SSLContext | bool:
    up = settings.upstream
    if not up.tls_verify:
        return False
    if up.ca_file:
        return ssl.create_default_context(cafile=up.ca_file)
    return True


def make_upstream(settings: Settings) -> Pool:
    up = settings.upstream
    return Pool(up.url, tls=tls_context(settings), limit=up.max_connections,
                    connect_timeout=up.connect_timeout, read_timeout=up.read_timeout)


def make_session(settings: Settings) -> aiohttp.ClientSession:
    """The session for token requests (few, and simple)."""
    up = settings.upstream
    tls = tls_context(settings)
    connector = aiohttp.TCPConnector(limit=up.max_connections, limit_per_host=0, ssl=tls, ttl_dns_cache=60)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=up.connect_timeout, sock_read=up.read_timeout),
        auto_decompress=False,  # Content-Encoding passes through untouched
        cookie_jar=aiohttp.DummyCookieJar(),  # one app's cookies must never reach another's request
        skip_auto_headers=NO_AUTO_HEADERS,
    )


def secret_reader(settings: Settings, redactor: Redactor) -> Callable[[], str]:
    """The client secret, read again at every token request when it lives in a file."""
    auth = settings.auth
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


class Proxy:
    """The proxy as one object: `start()`, `reload()`, `stop()`.

    A `start()` that fails (a listener cannot bind) releases what it opened, logs nothing and
    raises; `stop()` after it is quiet. Nothing goes to the auth endpoint before both listeners
    are bound."""

    def __init__(self, settings: Settings, *, redactor: Redactor | None = None, clock: Clock | None = None) -> None:
        self.settings = settings
        self.redactor = redactor or Redactor()
        self._clock = clock
        self.stats = Stats()
        self.session: aiohttp.ClientSession | None = None
        self.tokens: TokenCache | None = None
        self.upstream: Pool | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._listener: Listener | None = None
        self._admin: Listener | None = None
        self._admin_handler: Admin | None = None
        self.draining = False
        self.address: Address | None = None
        self.admin_address: Address | None = None
        self._started = False

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self._release()
            raise
        self._started = True

    async def _start(self) -> None:
        s = self.settings
        if s.forwarding.inbound_token is not None:
            self.redactor.add(s.forwarding.inbound_token.reveal())
        self.session = make_session(s)
        source = NdovuAuth(
            self.session, s.auth.token_url, s.auth.client_id, secret_reader(s, self.redactor),
            timeout=s.auth.timeout, user_agent=USER_AGENT,
        )
        self.tokens = TokenCache(
            source,
            refresh_margin=s.auth.refresh_margin,
            timeout=s.auth.timeout,
            backoff_initial=s.auth.backoff_initial,
            backoff_max=s.auth.backoff_max,
            clock=self._clock,
            on_token=lambda t: self.redactor.add(t.value),
        )
        access = logs.access_logger(self.redactor) if s.logging.access_log else None
        self.upstream = make_upstream(s)
        forwarder = Forwarder(s, self.upstream, self.tokens, self.stats, access)
        # the admin listener binds first: it never asks for a token, while a request on the
        # proxy's would; so no token is asked for until both are bound
        if s.admin_listen is not None:
            admin = self._admin_handler = Admin(self.tokens, self.stats)
            self._admin = Listener(admin, idle_timeout=CLIENT_IDLE_TIMEOUT, body_timeout=ADMIN_BODY_TIMEOUT)
            self.admin_address = await bind(self._admin, "admin_listen", s.admin_listen)
        self._listener = Listener(forwarder, idle_timeout=CLIENT_IDLE_TIMEOUT, body_timeout=s.upstream.read_timeout,
                                  max_head=s.limits.max_header_bytes)
        self.address = await bind(self._listener, "listen", s.listen)
        # the first token is fetched in the background: the proxy already listens
        self._refresher = asyncio.create_task(self.tokens.run(), name="token-refresher")
        log.info(
            "listening",
            address=str(self.address),
            admin_address=str(self.admin_address) if self.admin_address else None,
            upstream=s.upstream.url,
        )
        if not is_loopback(s.listen.host) and not s.forwarding.allowed_clients and s.forwarding.inbound_token is None:
            log.warning(
                "listen_unrestricted",
                address=str(self.address),
                risk=f"anyone who can reach {self.address} can call the partner API with these credentials",
                fix="set forwarding.allowed_clients (CIDRs) and/or forwarding.inbound_token "
                    "(apps send it in X-Proxy-Token), or listen on 127.0.0.1",
            )

    async def reload(self) -> None:
        """SIGHUP: a token with the credentials as they now stand; the current one stays on failure."""
        assert self.tokens is not None
        log.info("reload", action="fetching a token with the current credentials")
        try:
            token = await self.tokens.refresh_now()
        except Exception as exc:  # noqa: BLE001 - already logged as token_refresh_failed
            log.error("reload_failed", reason=getattr(exc, "kind", type(exc).__name__))
        else:
            log.info("reload_done", generation=token.generation)

    def begin_draining(self) -> None:
        """From SIGTERM on: /readyz answers 503 "draining"; the listener still accepts (for
        shutdown_delay, in `serve`) until `stop()` closes it."""
        if self.draining:
            return
        self.draining = True
        if self._admin_handler is not None:
            self._admin_handler.draining = True
        log.info("shutting_down", in_flight=self.stats.in_flight, delay_s=self.settings.shutdown_delay,
                 drain_timeout_s=self.settings.shutdown_timeout)

    async def _release(self) -> None:
        """Close whatever a failed `start()` opened, quietly: it never served."""
        for listener in (self._listener, self._admin):
            if listener is not None:
                listener.close()
                await listener.drain(0)
        self._listener = self._admin = None
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        if self.tokens is not None:
            await self.tokens.close()
        if self.upstream is not None:
            await self.upstream.close()
            self.upstream = None
        if self.session is not None:
            await self.session.close()
            self.session = None
        logs.flush()

    async def stop(self) -> None:
        """Close the listeners at once, drain in-flight requests up to shutdown_timeout, then
        cut what is left. Quiet for a proxy that never started."""
        if not self._started:
            await self._release()
            return
        self.begin_draining()
        in_flight = self.stats.in_flight
        if self._listener is not None:
            self._listener.close()  # new connections refused, idle ones closed
            log.info("listener_closed", address=str(self.address))
            # the admin listener answers meanwhile
            if not await self._listener.drain(self.settings.shutdown_timeout):
                log.warning("shutdown_cut", reason="requests still running past shutdown_timeout")
            self._listener = None
        if self._admin is not None:
            self._admin.close()
            await self._admin.drain(ADMIN_DRAIN)
            self._admin = None
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if self.tokens is not None:
            await self.tokens.close()
        if self.upstream is not None:
            await self.upstream.close()
        if self.session is not None:
            await self.session.close()
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
        await proxy.stop()
