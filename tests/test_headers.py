"""Header shaping, both ways."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.headers import HOP_BY_HOP, client_response_headers, connection_named, upstream_request_headers


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_request_headers_drop_hop_by_hop_and_credentials_and_set_the_token_last() -> None:
    out = upstream_request_headers(
        headers(
            ("Host", "proxy.local"), ("Connection", "close, X-Trace"), ("X-Trace", "1"),
            ("Authorization", "Basic abc"), ("authorization", "Bearer app"), ("X-Proxy-Token", "t"),
            ("Proxy-Authorization", "p"), ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"),
            ("Accept", "a"), ("Accept", "b"), ("X-Request-ID", "client-given"), ("Expect", "100-continue"),
        ),
        authorization="Bearer T", request_id="rid",
    )
    assert list(out.items()) == [("Accept", "a"), ("Accept", "b"), ("X-Request-ID", "rid"), ("Authorization", "Bearer T")]


def test_response_headers_keep_framing_and_encoding_but_not_hops_or_forged_signals() -> None:
    out = client_response_headers(
        headers(
            ("Content-Length", "10"), ("Content-Encoding", "gzip"), ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "1"), ("Keep-Alive", "timeout=5"), ("Transfer-Encoding", "chunked"),
            ("X-Ndovu-Proxy-Error", "forged"), ("X-Ndovu-Proxy-Retried", "1"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
        ),
        request_id="rid",
    )
    assert out.getall("Set-Cookie") == ["a=1", "b=2"]
    assert out["Content-Length"] == "10" and out["Content-Encoding"] == "gzip"
    assert {k.lower() for k in out} == {"content-length", "content-encoding", "set-cookie", "x-request-id"}


def test_connection_names_are_parsed_loosely() -> None:
    assert connection_named([" Keep-Alive ,,X-A", "x-b"]) == {"keep-alive", "x-a", "x-b"}


_names = st.from_regex(r"[A-Za-z][A-Za-z0-9\-]{0,20}", fullmatch=True)
_values = st.from_regex(r"[ -~]{0,30}", fullmatch=True)


@given(st.lists(st.tuples(_names, _values), max_size=30), st.lists(_names, max_size=4))
def test_shaping_properties(pairs: list[tuple[str, str]], named: list[str]) -> None:
    incoming = headers(*pairs, ("Connection", ", ".join(named)))
    out = upstream_request_headers(incoming, authorization="Bearer T", request_id="r")
    names = [k.lower() for k in out]
    # exactly one Authorization, ours, and last
    assert out.getall("Authorization") == ["Bearer T"]
    assert names[-1] == "authorization"
    dropped = HOP_BY_HOP | {n.lower() for n in named}
    assert not any(n in dropped or n.startswith("proxy-") or n == "x-proxy-token" or n == "host" for n in names)
    # everything else passes, in order, values untouched
    kept = [(k, v) for k, v in pairs if k.lower() not in dropped | {"authorization", "x-proxy-token", "host", "x-request-id", "expect"} and not k.lower().startswith("proxy-")]
    assert [(k, v) for k, v in out.items()][:-2] == kept
    back = client_response_headers(incoming, request_id="r")
    assert not any(k.lower() in dropped or k.lower().startswith("proxy-") for k in back)
