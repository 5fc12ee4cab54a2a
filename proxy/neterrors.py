"""A failed HTTP call, in plain words naming the host and port: what `check` prints and the
token events log (`connection refused by api.example:443`, `cannot resolve host api.example`,
`TLS handshake with api.example:443 failed: certificate verify failed: ...`), never a bare
exception class name. Pure: it reads the exception aiohttp or the OS raised, nothing else.
"""

from __future__ import annotations

import socket
import ssl
from urllib.parse import urlsplit

import aiohttp

_DNS_ERROR: tuple[type[BaseException], ...] = (aiohttp.ClientConnectorDNSError,)
_CONNECT_TIMEOUT: tuple[type[BaseException], ...] = (aiohttp.ConnectionTimeoutError,)
#: what OpenSSL says when the other end answers a ClientHello in plain text
_PLAIN_HTTP_SIGNS = ("wrong_version_number", "wrong version number", "http_request", "http request",
                     "record layer failure", "packet length too long", "unknown protocol")


def host_and_port(url: str) -> tuple[str, str]:
    """(host, host:port) of a URL, the port spelled out even when it is the default."""
    parts = urlsplit(url)
    host = parts.hostname or url
    try:
        port = parts.port
    except ValueError:
        port = None
    port = port or (443 if parts.scheme == "https" else 80)
    return host, (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


def _tls_reason(exc: BaseException) -> str:
    cause = getattr(exc, "certificate_error", None) or getattr(exc, "os_error", None) or exc
    if isinstance(cause, ssl.SSLCertVerificationError) and cause.verify_message:
        return f"certificate verify failed: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError) and cause.reason:
        return str(cause.reason).lower().replace("_", " ")
    text = getattr(cause, "strerror", None) or str(cause)
    return text or "the connection closed during the handshake"


def network_error(exc: BaseException, url: str, *, connect_timeout: float | None, timeout: float | None,
                  proxy: str | None = None) -> str:
    """A failed HTTP call to `url`, in plain words naming the host and port; never a bare
    exception class name. `proxy`: the egress proxy the call went through, if any, named when
    it is the proxy that failed."""
    host, where = host_and_port(url)
    if proxy is not None and isinstance(exc, aiohttp.ClientProxyConnectionError):
        return "egress proxy: " + network_error(exc, proxy, connect_timeout=connect_timeout, timeout=timeout)
    if proxy is not None and isinstance(exc, aiohttp.ClientHttpProxyError):
        words = f"the egress proxy {host_and_port(proxy)[1]} answered {exc.status} to CONNECT {where}"
        if exc.status == 407:
            words += ": its credentials are missing or wrong (upstream.proxy, HTTPS_PROXY)"
        return words
    os_error = getattr(exc, "os_error", None)
    if isinstance(exc, _DNS_ERROR) or isinstance(os_error, socket.gaierror) or isinstance(exc, socket.gaierror):
        return f"cannot resolve host {host}"
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError) or isinstance(os_error, ssl.SSLError):
        reason = _tls_reason(exc)
        words = f"TLS handshake with {where} failed: {reason}"
        if any(sign in repr(os_error or exc).lower() for sign in _PLAIN_HTTP_SIGNS):
            words += f" (the port seems to speak plain HTTP: try http://{where} in upstream.url)"
        return words
    if isinstance(exc, _CONNECT_TIMEOUT):
        after = f" after {connect_timeout:g} s" if connect_timeout else ""
        return f"timed out connecting to {where}{after}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(os_error, ConnectionRefusedError):
            return f"connection refused by {where}"
        if isinstance(os_error, TimeoutError):
            after = f" after {connect_timeout:g} s" if connect_timeout else ""
            return f"timed out connecting to {where}{after}"
        return f"cannot connect to {where}: {_os_words(os_error or exc)}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return f"{where} closed the connection without answering"
    if isinstance(exc, TimeoutError):  # aiohttp's ServerTimeoutError and the total timeout alike
        within = f" within {timeout:g} s" if timeout else ""
        return f"no answer from {where}{within}"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return f"the answer from {where} broke off"
    if isinstance(exc, ConnectionResetError) or isinstance(os_error, ConnectionResetError):
        return f"connection to {where} reset"
    if isinstance(exc, OSError):
        return f"connection to {where} failed: {_os_words(exc)}"
    text = str(exc)
    return f"talking to {where} failed: {text}" if text else f"talking to {where} failed"


def _os_words(exc: BaseException) -> str:
    strerror = getattr(exc, "strerror", None)
    if strerror:
        return str(strerror)
    return str(exc) or "the connection failed"
