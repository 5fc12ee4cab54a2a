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
# partner (RFC 9110 §11.7). `Proxy-*` as a family is dropped by `_Rules`.
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
#: headers that point at a resource, rewritten when they point at the upstream (RFC 9110 §10.2.2, §8.7)
LOCATIONS = frozenset({b"location", b"content-location"})
#: headers as name/value byte pairs, in order, repeats kept
Headers = Sequence[tuple[bytes, bytes]]


#: Connection values that name no other header
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})

# What happens to a header, by its name as sent. Names repeat from message to message, so a
# verdict is worked out once and looked up after (a few hundred ns a message): see _Rules.
_KEEP, _DROP, _CONNECTION, _LOCATION = range(4)
#: names remembered per direction; past it the memo starts again, so a client sending
#: endless new names costs only the work done without one
_MEMO_SIZE = 1024
#: the longest name remembered: real ones are short, and 1024 names of 64 KiB (a head's
#: limit) would hold 64 MiB
_MEMO_NAME = 64


class _Rules:
    """The verdicts of one direction: which names are dropped, which are Connection, which
    point at a resource (kept, and rebased on the way back)."""

    def __init__(self, drop: frozenset[bytes], locations: frozenset[bytes] = frozenset()) -> None:
        self.drop = drop
        self._locations = locations
        self.memo: dict[bytes, int] = {}

    def judge(self, name: bytes) -> int:
        low = name.lower()
        if low in self.drop or low.startswith(b"proxy-"):
            verdict = _CONNECTION if low == b"connection" else _DROP
        elif b"_" in low and (low.replace(b"_", b"-") in self.drop or low.startswith(b"proxy_")):
            # CGI, PHP and WSGI servers read `Transfer_Encoding` as Transfer-Encoding
            # (nginx drops names with underscores by default)
            verdict = _DROP
        else:
            verdict = _LOCATION if low in self._locations else _KEEP
        if len(name) <= _MEMO_NAME:
            memo = self.memo
            if len(memo) >= _MEMO_SIZE:
                memo.clear()
            memo[name] = verdict
        return verdict


_REQUEST_RULES = _Rules(_REQUEST_DROP)
_RESPONSE_RULES = _Rules(_RESPONSE_DROP, LOCATIONS)


def connection_named(values: Iterable[bytes]) -> frozenset[bytes]:
    """The header names listed in Connection values, lower-cased."""
    names = set()
    for value in values:
        for name in value.split(b","):
            name = name.strip().lower()
            if name:
                names.add(name)
    return frozenset(names)


def _shape(raw: Headers, rules: _Rules, prefixes: tuple[bytes, ...] = (), host: bytes | None = None
           ) -> list[tuple[bytes, bytes]]:
    """The pairs that pass, bytes as they came; a Location rebased (`rebase`) when
    `prefixes` and `host` are given."""
    kept: list[tuple[bytes, bytes]] = []
    named: list[bytes] = []
    memo = rules.memo
    for pair in raw:
        verdict = memo.get(pair[0])
        if verdict is None:
            verdict = rules.judge(pair[0])
        if verdict == _KEEP:
            kept.append(pair)
        elif verdict == _CONNECTION:
            named.append(pair[1])
        elif verdict == _LOCATION:
            kept.append((pair[0], rebase(pair[1], prefixes, host)) if host and prefixes else pair)
    # RFC 9110 §7.6.1: what Connection names is for this hop only. Most messages name only
    # keep-alive or close, which are dropped anyway: no need to split and compare.
    for value in named:
        if value.lower() not in _PLAIN_CONNECTION:
            hop = connection_named(named) - rules.drop
            if hop:
                kept = [pair for pair in kept if pair[0].lower() not in hop]
            break
    return kept


def upstream_request_headers(raw: Headers, *, authorization: bytes, request_id: bytes) -> list[tuple[bytes, bytes]]:
    """Headers for the request to the partner API (no Host, no framing: the pool adds those)."""
    headers = _shape(raw, _REQUEST_RULES)
    headers.append((b"X-Request-ID", request_id))
    headers.append((b"Authorization", authorization))  # last: nothing the client sent can replace it
    return headers


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
    headers = _shape(raw, _RESPONSE_RULES, prefixes, host)
    headers.append((b"X-Request-ID", request_id))
    return headers
