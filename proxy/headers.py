"""Pure functions that shape headers on their way through the proxy, in both directions.

Order, after Go's httputil.ReverseProxy: strip hop-by-hop headers (the fixed list and every
header the `Connection` header names), remove what the client sent for auth, then set the
bearer token last, so nothing the client sends can replace it.
"""

from __future__ import annotations

from collections.abc import Iterable

from multidict import CIMultiDict, CIMultiDictProxy, istr

# RFC 9110 §7.6.1: Connection, and the headers it names, are for one hop only; so are the
# older Keep-Alive, Proxy-Connection, TE, Trailer, Transfer-Encoding and Upgrade (RFC 9110
# §7.6.1, §7.8, RFC 9112 §6.1). Proxy-Authenticate/-Authorization are for this proxy, not the
# partner (RFC 9110 §11.7). `Proxy-*` as a family is dropped by `_is_hop_by_hop`.
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

_REQUEST_DROP = HOP_BY_HOP | CLIENT_CREDENTIALS | REQUEST_OWN
_RESPONSE_DROP = HOP_BY_HOP | PROXY_SIGNALS

AUTHORIZATION = istr("Authorization")
CONNECTION = istr("Connection")
X_REQUEST_ID = istr("X-Request-ID")


def connection_named(values: Iterable[str]) -> frozenset[str]:
    """The header names listed in Connection values, lower-cased."""
    names = set()
    for value in values:
        for name in value.split(","):
            name = name.strip().lower()
            if name:
                names.add(name)
    return frozenset(names)


def _shape(headers: CIMultiDictProxy[str], drop: frozenset[str]) -> CIMultiDict[str]:
    named = connection_named(headers.getall(CONNECTION, ()))
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        low = name.lower()
        if low in drop or low in named or low.startswith("proxy-"):
            continue
        out.add(name, value)
    return out


def upstream_request_headers(
    incoming: CIMultiDictProxy[str], *, authorization: str, request_id: str
) -> CIMultiDict[str]:
    """Headers for the request to the partner API."""
    out = _shape(incoming, _REQUEST_DROP)
    out[X_REQUEST_ID] = request_id
    out[AUTHORIZATION] = authorization  # last: nothing the client sent can replace it
    return out


def client_response_headers(upstream: CIMultiDictProxy[str], *, request_id: str) -> CIMultiDict[str]:
    """Headers for the answer to the app. Content-Length and Content-Encoding pass untouched."""
    out = _shape(upstream, _RESPONSE_DROP)
    out[X_REQUEST_ID] = request_id
    return out
