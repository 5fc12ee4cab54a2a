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


def test_endless_new_header_names_hold_no_memory() -> None:
    import tracemalloc

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for i in range(3000):  # past the memo's size: it starts over, and long names stay out
            name = b"X-%d-" % i + (b"n" * 30_000 if i % 10 == 0 else b"")
            upstream_request_headers(((name, b"v"),), authorization=b"Bearer T", request_id=b"r")
            client_response_headers(((name, b"v"),), request_id=b"r")
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    # at most one long name at a time; remembered, a memo's worth would be 100 of 30 KB each way
    assert peak < 1_000_000


def test_every_name_is_judged_alike_however_many_came_before() -> None:
    for i in range(2500):  # the memo fills and starts over (at 1024 names) twice
        upstream_request_headers(((b"X-N%d" % i, b"v"),), authorization=b"Bearer T", request_id=b"r")
    for _ in range(2):  # the names seen before and after: the same verdicts
        out = upstream_request_headers(
            raw(("Transfer_Encoding", "chunked"), ("PROXY-X", "1"), ("Connection", "X-Gone"), ("x-gone", "1"),
                ("X-Kept", "1"), ("X-" + "k" * 100, "long")),
            authorization=b"Bearer T", request_id=b"r")
        assert [n for n, _ in lines(out)] == ["X-Kept", "X-" + "k" * 100, "X-Request-ID", "Authorization"]
        back = client_response_headers(raw(("Location", "https://api.example/a"), ("Server", "s")),
                                       request_id=b"r", prefixes=upstream_prefixes("https://api.example"),
                                       host=b"127.0.0.1:8080")
        assert lines(back)[:2] == [("Location", "http://127.0.0.1:8080/a"), ("Server", "s")]
