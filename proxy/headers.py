"""Pure functions that shape headers on their way through the proxy, in both directions.

Order, after Go's httputil.ReverseProxy: strip hop-by-hop headers (the fixed list and every
header the `Connection` header names), remove what the client sent for auth, then set the
bearer token last, so nothing the client sends can replace it.

They work on name/value byte pairs as the parser gave them and give pairs for the writer:
names and values pass byte for byte, and no header multidict is built per request.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

# RFC 9110 §7.6.1: Connection, and the headers it names, are for one hop only; so are the
# older Keep-Alive, Proxy-Connection, TE, Trailer, Transfer-Encoding and Upgrade (RFC 9110
# §7.6.1, §7.8, RFC 9112 §6.1). Proxy-Authenticate/-Authorization are for this proxy, not the
# partner (RFC 9110 §11.7). `Proxy-*` as a family is dropped by `_shape`.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)

#: what the client may send for its own auth; never forwarded (the proxy sets Authorization)
CLIENT_CREDENTIALS = frozenset(h.lower() for h in ("Authorization", "X-Proxy-Token"))

#: set by the proxy itself on the way up: the upstream's Host and our request id.
#: Expect is answered by this proxy's own server (RFC 9110 §10.1.1); the body is on its way.
REQUEST_OWN = frozenset(h.lower() for h in ("Host", "X-Request-ID", "Expect"))

#: headers that mean "the proxy said this"; an upstream must not be able to fake them
PROXY_SIGNALS = frozenset(h.lower() for h in ("X-Ndovu-Proxy-Error", "X-Ndovu-Proxy-Retried"))

#: framing is set by whoever writes the message, from the body it actually sends
_FRAMING = frozenset({"content-length"})

_REQUEST_DROP = frozenset(n.encode() for n in HOP_BY_HOP | CLIENT_CREDENTIALS | REQUEST_OWN | _FRAMING)
_RESPONSE_DROP = frozenset(n.encode() for n in HOP_BY_HOP | PROXY_SIGNALS | _FRAMING | {"x-request-id"})
#: headers as name/value byte pairs, in order, repeats kept
Headers = Sequence[tuple[bytes, bytes]]


#: Connection values that name no other header
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})


def connection_named(values: Iterable[bytes]) -> frozenset[bytes]:
    """The header names listed in Connection values, lower-cased."""
    names = set()
    for value in values:
        for name in value.split(b","):
            name = name.strip().lower()
            if name:
                names.add(name)
    return frozenset(names)


def _shape(raw: Headers, drop: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    """The pairs that pass, bytes as they came."""
    kept: list[tuple[bytes, bytes]] = []
    named: list[bytes] = []
    for name, value in raw:
        low = name.lower()
        if low in drop or low.startswith(b"proxy-"):
            if low == b"connection":
                named.append(value)
            continue
        if b"_" in low and (low.replace(b"_", b"-") in drop or low.startswith(b"proxy_")):
            # CGI, PHP and WSGI servers read `Transfer_Encoding` as Transfer-Encoding
            # (nginx drops names with underscores by default)
            continue
        kept.append((name, value))
    # RFC 9110 §7.6.1: what Connection names is for this hop only. Most messages name only
    # keep-alive or close, which are dropped anyway: no need to split and compare.
    if named and not all(value.lower() in _PLAIN_CONNECTION for value in named):
        hop = connection_named(named) - drop
        if hop:
            kept = [pair for pair in kept if pair[0].lower() not in hop]
    return kept


def upstream_request_headers(raw: Headers, *, authorization: bytes, request_id: bytes) -> list[tuple[bytes, bytes]]:
    """Headers for the request to the partner API (no Host, no framing: the pool adds those)."""
    headers = _shape(raw, _REQUEST_DROP)
    headers.append((b"X-Request-ID", request_id))
    headers.append((b"Authorization", authorization))  # last: nothing the client sent can replace it
    return headers


#: headers that point at a resource, rewritten when they point at the upstream (RFC 9110 §10.2.2, §8.7)
LOCATIONS = frozenset({b"location", b"content-location"})


def upstream_prefixes(url: str) -> tuple[bytes, ...]:
    """The spellings of `upstream.url` a Location may start with, lower case: the port given
    or left out when it is the scheme's default."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    default = {"http": 80, "https": 443}.get(parts.scheme)
    port = parts.port or default
    base = parts.path.rstrip("/")
    hosts = [f"{host}:{port}"] + ([host] if port == default else [])
    return tuple(f"{parts.scheme}://{h}{base}".lower().encode() for h in hosts)


def rebase(value: bytes, prefixes: tuple[bytes, ...], host: bytes) -> bytes:
    """A Location on the upstream, pointed at the proxy instead (`http://` + the request's
    Host), as nginx's `proxy_redirect default` does; relative ones and other hosts as they are."""
    low = value.lower()
    for prefix in prefixes:
        if low.startswith(prefix) and (len(low) == len(prefix) or low[len(prefix)] in b"/?#"):
            return b"http://" + host + value[len(prefix):]
    return value


def client_response_headers(raw: Headers, *, request_id: bytes, prefixes: tuple[bytes, ...] = (),
                            host: bytes | None = None) -> list[tuple[bytes, bytes]]:
    """Headers for the answer to the app (no framing: the writer sets it). Content-Encoding
    and everything else end-to-end pass untouched; trailers never get here. With `prefixes`
    (from `upstream_prefixes`) and the request's `host`, a Location or Content-Location on the
    upstream is rewritten to the proxy, so that following it keeps the token behind the proxy."""
    headers = _shape(raw, _RESPONSE_DROP)
    if host and prefixes:
        for i, (name, value) in enumerate(headers):
            if name.lower() in LOCATIONS:
                headers[i] = (name, rebase(value, prefixes, host))
    headers.append((b"X-Request-ID", request_id))
    return headers
