"""Header shaping, both ways, on (name, value) byte pairs as the parser gave them."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.headers import (
    HOP_BY_HOP,
    client_response_headers,
    connection_named,
    rebase,
    upstream_prefixes,
    upstream_request_headers,
)


def raw(*pairs: tuple[str, str]) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((n.encode(), v.encode()) for n, v in pairs)


def lines(pairs: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(name.decode(), value.decode()) for name, value in pairs]


def test_request_headers_drop_hop_by_hop_and_credentials_and_set_the_token_last() -> None:
    out = upstream_request_headers(
        raw(
            ("Host", "proxy.local"), ("Connection", "close, X-Trace"), ("X-Trace", "1"),
            ("Authorization", "Basic abc"), ("authorization", "Bearer app"), ("X-Proxy-Token", "t"),
            ("Proxy-Authorization", "p"), ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"),
            ("Accept", "a"), ("Accept", "b"), ("X-Request-ID", "client-given"), ("Expect", "100-continue"),
            ("Content-Length", "5"),
        ),
        authorization=b"Bearer T", request_id=b"rid",
    )
    # framing (Content-Length) is the upstream client's to set, from the body it sends
    assert lines(out) == [("Accept", "a"), ("Accept", "b"), ("X-Request-ID", "rid"), ("Authorization", "Bearer T")]


def test_response_headers_keep_encoding_but_not_hops_framing_or_forged_signals() -> None:
    out = client_response_headers(
        raw(
            ("Content-Length", "10"), ("Content-Encoding", "gzip"), ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "1"), ("Keep-Alive", "timeout=5"), ("Transfer-Encoding", "chunked"),
            ("X-Ndovu-Proxy-Error", "forged"), ("X-Ndovu-Proxy-Retried", "1"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
            ("x-request-id", "upstream-own"),
        ),
        request_id=b"rid",
    )
    assert lines(out) == [("Content-Encoding", "gzip"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
                          ("X-Request-ID", "rid")]


def test_names_and_values_pass_byte_for_byte() -> None:
    out = client_response_headers(((b"X-Caf\xc3\xa9", b"na\xefve \xff"),), request_id=b"r")
    assert out[0] == (b"X-Caf\xc3\xa9", b"na\xefve \xff")


def test_connection_names_are_parsed_loosely() -> None:
    assert connection_named([b" Keep-Alive ,,X-A", b"x-b"]) == {b"keep-alive", b"x-a", b"x-b"}


_names = st.from_regex(r"[A-Za-z][A-Za-z0-9\-]{0,20}", fullmatch=True)
_values = st.from_regex(r"[ -~]{0,30}", fullmatch=True).map(str.strip)


@given(st.lists(st.tuples(_names, _values), max_size=30), st.lists(_names, max_size=4))
def test_shaping_properties(pairs: list[tuple[str, str]], named: list[str]) -> None:
    incoming = raw(*pairs, ("Connection", ", ".join(named)))
    out = lines(upstream_request_headers(incoming, authorization=b"Bearer T", request_id=b"r"))
    names = [k.lower() for k, _ in out]
    # exactly one Authorization, ours, and last
    assert [v for k, v in out if k.lower() == "authorization"] == ["Bearer T"]
    assert names[-1] == "authorization"
    dropped = HOP_BY_HOP | {n.lower() for n in named}
    assert not any(n in dropped or n.startswith("proxy-") or n == "x-proxy-token" or n == "host" for n in names)
    # everything else passes, in order, values untouched
    own = {"authorization", "x-proxy-token", "host", "x-request-id", "expect", "content-length"}
    kept = [(k, v) for k, v in pairs if k.lower() not in dropped | own and not k.lower().startswith("proxy-")]
    assert out[:-2] == kept
    back = lines(client_response_headers(incoming, request_id=b"r"))
    assert not any(k.lower() in dropped or k.lower().startswith("proxy-") for k, _ in back)


def test_upstream_prefixes_spell_the_default_port_both_ways() -> None:
    assert upstream_prefixes("https://API.example") == (b"https://api.example:443", b"https://api.example")
    assert upstream_prefixes("http://h:8081/gw/") == (b"http://h:8081/gw",)
    assert upstream_prefixes("http://[::1]:80") == (b"http://[::1]:80", b"http://[::1]")


def test_rebase_points_locations_on_the_upstream_at_the_proxy() -> None:
    prefixes = upstream_prefixes("https://api.example/gw")
    host = b"127.0.0.1:8080"
    assert rebase(b"https://api.example/gw/a?b#c", prefixes, host) == b"http://127.0.0.1:8080/a?b#c"
    assert rebase(b"https://api.example:443/gw", prefixes, host) == b"http://127.0.0.1:8080"
    assert rebase(b"https://api.example/gwx/a", prefixes, host) == b"https://api.example/gwx/a"  # not under /gw
    assert rebase(b"https://api.example.evil/gw/a", prefixes, host) == b"https://api.example.evil/gw/a"
    assert rebase(b"http://api.example/gw/a", prefixes, host) == b"http://api.example/gw/a"  # another scheme
    assert rebase(b"/gw/a", prefixes, host) == b"/gw/a"


def test_verdicts_are_remembered_within_a_bound_and_hold_after_it_is_reached() -> None:
    from proxy import headers

    # a client sending endless new names: the memo stays bounded ...
    for i in range(headers._MEMO_SIZE * 3):
        upstream_request_headers(((b"X-N%d" % i, b"v"),), authorization=b"Bearer T", request_id=b"r")
    assert len(headers._REQUEST_RULES.memo) <= headers._MEMO_SIZE
    # ... and every name is judged the same whether it was remembered or not
    for _ in range(2):
        out = upstream_request_headers(
            raw(("Transfer_Encoding", "chunked"), ("PROXY-X", "1"), ("Connection", "X-Gone"), ("x-gone", "1"),
                ("X-Kept", "1")),
            authorization=b"Bearer T", request_id=b"r")
        assert [n for n, _ in lines(out)] == ["X-Kept", "X-Request-ID", "Authorization"]
        back = client_response_headers(raw(("Location", "https://api.example/a"), ("Server", "s")),
                                       request_id=b"r", prefixes=upstream_prefixes("https://api.example"),
                                       host=b"127.0.0.1:8080")
        assert lines(back)[:2] == [("Location", "http://127.0.0.1:8080/a"), ("Server", "s")]
