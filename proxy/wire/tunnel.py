"""Reaching the origin through an egress (forward) proxy: an HTTP CONNECT tunnel (RFC 9110
§9.3.6) for an https origin. An http origin needs no tunnel: the pool sends its requests to
the proxy in absolute form (RFC 9112 §3.2.2).

`open_tunnel()` returns a connected, non-blocking socket past the proxy's 2xx answer, on
which the pool starts TLS with the origin's name; only public asyncio calls are used
(`getaddrinfo`, `sock_connect`, `sock_sendall`, `sock_recv`), so it runs on uvloop alike.

Invariants:
- the origin's name goes to the proxy in the CONNECT line and is never resolved here: the
  proxy resolves it (a corporate network's names may resolve only there);
- the proxy's answer is read up to its head's end and no further, and no more than
  MAX_TUNNEL_ANSWER bytes of it; anything but 2xx fails with ConnectFailed naming the
  proxy, the origin and the status, never the credentials;
- the socket is closed on every failure, cancellation included.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
from typing import Protocol

from proxy.wire.errors import ConnectFailed
from proxy.wire.http import HEAD_END

#: the largest answer head to CONNECT read (squid's is some 40 bytes; a 407 with its
#: Proxy-Authenticate a few hundred)
MAX_TUNNEL_ANSWER = 16 * 1024
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: ([^\r\n]*))?")


class Via(Protocol):
    """A forward proxy as the pool needs it (`proxy.egress.ProxyURL` is one): where it is,
    and the whole Proxy-Authorization value when it wants one. `str()` must not show it."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def authorization(self) -> bytes | None: ...


def authority(host: str, port: int) -> str:
    """`host:port`, an IPv6 address in brackets (RFC 9110 §7.2)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def reason_of(exc: OSError) -> str:
    """An OSError in plain words: `Connection refused` rather than asyncio's `Connect call
    failed ('10.0.0.1', 3128)`; a TLS error as the ssl module says it."""
    if exc.errno and exc.errno > 0 and not isinstance(exc, (ssl.SSLError, socket.gaierror)):
        return os.strerror(exc.errno)
    if exc.strerror or str(exc):
        return exc.strerror or str(exc)
    # a bare ConnectionResetError(), as a TLS handshake over a closed tunnel raises
    return "the connection was closed" if isinstance(exc, ConnectionError) else type(exc).__name__


def connect_request(host: str, port: int, authorization: bytes | None) -> bytes:
    """The CONNECT request for `host:port`: the authority as its target and its Host."""
    target = authority(host, port).encode("idna" if not host.isascii() else "ascii")
    credentials = b"Proxy-Authorization: %s\r\n" % authorization if authorization is not None else b""
    return b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (target, target, credentials)


def answer_status(head: bytes) -> tuple[int, str] | None:
    """The status and the reason phrase (`printable`) of an answer's head, or None when its
    first line is no HTTP/1.x status line."""
    match = _STATUS_LINE.fullmatch(head.split(b"\r\n", 1)[0])
    if match is None:
        return None
    return int(match.group(1)), printable(match.group(2) or b"")


def printable(reason: bytes) -> str:
    """A reason phrase fit for a log line: printable ASCII only, at most 80 characters."""
    return "".join(c for c in reason.decode("latin-1") if " " <= c <= "~")[:80].strip()


async def connect_to(loop: asyncio.AbstractEventLoop, via: Via) -> socket.socket:
    """A non-blocking socket connected to the proxy: each of its addresses in turn, as
    `loop.create_connection` does."""
    where = authority(via.host, via.port)
    try:
        infos = await loop.getaddrinfo(via.host, via.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConnectFailed(f"cannot resolve the egress proxy {where}: {reason_of(exc)}") from exc
    last: OSError | None = None
    for family, type_, proto, _, address in infos:
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    reason = reason_of(last) if last is not None else "no address"
    raise ConnectFailed(f"cannot connect to the egress proxy {where}: {reason}") from last


async def open_tunnel(loop: asyncio.AbstractEventLoop, via: Via, host: str, port: int) -> socket.socket:
    """A socket to the proxy on which `CONNECT host:port` was answered 2xx: from here on, its
    bytes are the origin's. The caller bounds the time (the pool's connect_timeout)."""
    where, to = authority(via.host, via.port), authority(host, port)
    sock = await connect_to(loop, via)
    try:
        await loop.sock_sendall(sock, connect_request(host, port, via.authorization))
        head = b""
        while (end := head.find(HEAD_END)) < 0:
            if len(head) > MAX_TUNNEL_ANSWER:
                raise ConnectFailed(f"the egress proxy {where} answered CONNECT {to} with a head over "
                                    f"{MAX_TUNNEL_ANSWER} bytes")
            data = await loop.sock_recv(sock, 4096)
            if not data:
                raise ConnectFailed(f"the egress proxy {where} closed the connection before answering "
                                    f"CONNECT {to}")
            head += data
        status = answer_status(head)
        if status is None:
            raise ConnectFailed(f"the egress proxy {where} answered CONNECT {to} with something that is not HTTP/1.1")
        code, reason = status
        if not 200 <= code < 300:
            raise ConnectFailed(f"the egress proxy {where} refused the tunnel to {to}: {code} {reason}".rstrip())
        if len(head) > end + 4:
            # the origin speaks only after our TLS ClientHello: these bytes are no one's
            raise ConnectFailed(f"the egress proxy {where} sent bytes past its answer to CONNECT {to}")
    except OSError as exc:
        sock.close()
        raise ConnectFailed(f"the connection to the egress proxy {where} failed during CONNECT {to}: "
                            f"{reason_of(exc)}") from exc
    except BaseException:
        sock.close()
        raise
    return sock
