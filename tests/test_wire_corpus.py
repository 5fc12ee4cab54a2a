"""A corpus of hostile requests on raw sockets, against a real proxy in front of a raw upstream
that records every byte it gets.

Vectors come from public smuggling corpora: defparam/smuggler's configs and PortSwigger's
http-request-smuggler (Transfer-Encoding mutations), narfindustries/http-garden's TROPHIES
(server and transducer bugs), and nodejs/llhttp's test/request/*.md. Each vector lists the
outcomes that are acceptable: what the client reads back, in order, until the proxy closes
the connection, and exactly which requests (method, target, body) reach the upstream. Most
vectors end with END, a request that must be answered only when nothing before it broke the
stream (once its answer is in, the client shuts its side and reads to the end). Every forwarded request must carry one real bearer token and no
hop-by-hop, client-credential, trailer or smuggled header; afterwards the proxy must still
answer a fresh connection.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from proxy.app import Proxy
from tests.conftest import StartProxy
from tests.fakes import FakeNdovu

API = "/api/v3/partners"
LIMIT = 8192  # limits.max_header_bytes for every vector but those that set their own
TIMEOUT = 5.0
CODES = {400: "bad_request", 403: "path_not_allowed", 405: "method_not_allowed", 413: "body_too_large",
         431: "headers_too_large"}
Seen = tuple[str, str, bytes]  # method, target, body as the upstream got them
Outcome = tuple[tuple[int, ...], tuple[Seen, ...]]  # statuses the client read; requests forwarded


# --- building requests ---------------------------------------------------------------------------


def _b(s: str | bytes) -> bytes:
    return s if isinstance(s, bytes) else s.encode("latin-1")


def r(start: str | bytes, *headers: str | bytes, body: bytes = b"") -> bytes:
    """A request, bytes verbatim: start line, header lines, the empty line, the body."""
    return b"".join([_b(start), b"\r\n", *(_b(h) + b"\r\n" for h in headers), b"\r\n", body])


def get(path: str | bytes, *headers: str | bytes) -> bytes:
    return r(b"GET " + _b(API) + _b(path) + b" HTTP/1.1", "Host: x", *headers)


def post(path: str, body: bytes, *headers: str | bytes) -> bytes:
    return r(f"POST {API}{path} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}", *headers, body=body)


def chunked(path: str, raw: bytes, *headers: str | bytes, te: str | bytes = "Transfer-Encoding: chunked") -> bytes:
    return r(f"POST {API}{path} HTTP/1.1", "Host: x", te, *headers, body=raw)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


END_PATH = f"{API}/end"
END = get("/end")
E: Seen = ("GET", END_PATH, b"")
SMUG = get("/SMUGGLED")  # a request hidden in another; must never reach the upstream as one
HELLO = b"5\r\nhello\r\n0\r\n\r\n"


def P(path: str, body: bytes = b"", method: str = "POST") -> Seen:
    return (method, API + path, body)


def G(path: str) -> Seen:
    return ("GET", API + path, b"")


def OK(*seen: Seen) -> Outcome:
    """Everything forwarded and answered 200, END last."""
    return (200,) * (len(seen) + 1), (*seen, E)


def BAD(status: int = 400, *before: Seen) -> Outcome:
    """The requests before the bad one are forwarded; the bad one gets `status` and the
    connection closes: nothing after it is read as a request (END included)."""
    return (200,) * len(before) + (status,), before


def REFUSED(status: int) -> Outcome:
    """Read whole, refused by the proxy's rules, and the connection kept: END is answered."""
    return (status, 200), (E,)


@dataclass
class V:
    id: str
    data: bytes
    outcomes: list[Outcome]
    end: bool = True  # END follows the vector's bytes
    limit: int = LIMIT
    header: tuple[bytes, bytes] | None = None  # the first forwarded request carries it, verbatim


VECTORS: list[V] = []


def add(id: str, data: bytes, *outcomes: Outcome, **kw: Any) -> None:
    VECTORS.append(V(id, data, list(outcomes), **kw))


# --- CL / TE conflicts, Content-Length forms -------------------------------------------------------

add("cl_then_te", r(f"POST {API}/p HTTP/1.1", "Host: x", "Content-Length: 6", "Transfer-Encoding: chunked",
                    body=b"0\r\n\r\n" + SMUG), BAD())
add("te_then_cl", r(f"POST {API}/p HTTP/1.1", "Host: x", "Transfer-Encoding: chunked", "Content-Length: 3",
                    body=b"0\r\n\r\n" + SMUG), BAD())
add("te_identity_and_cl", r(f"POST {API}/p HTTP/1.1", "Host: x", "Transfer-Encoding: identity", "Content-Length: 5",
                            body=b"hello"), BAD())
add("te_comma_chunked_and_cl", r(f"POST {API}/p HTTP/1.1", "Host: x", "Transfer-Encoding: ,chunked",
                                 "Content-Length: 5", body=b"0\r\n\r\n"), BAD())  # http-garden T15/T18
add("te_empty_and_cl", r(f"POST {API}/p HTTP/1.1", "Host: x", "Content-Length: 10", "Transfer-Encoding:",
                         body=b"2\r\nAA\r\n0\r\n\r\n"), BAD())  # llhttp transfer-encoding.md
add("cl_0_then_cl_31", r(f"POST {API}/p HTTP/1.1", "Host: x", "Content-Length: 0", f"Content-Length: {len(SMUG)}",
                         body=SMUG), BAD())  # http-garden T22
add("cl_same_twice", r(f"POST {API}/p HTTP/1.1", "Host: x", "Content-Length: 5", "Content-Length: 5",
                       body=b"hello"), OK(P("/p", b"hello")), BAD())
add("cl_list", r(f"POST {API}/p HTTP/1.1", "Host: x", "Content-Length: 5, 5", body=b"hello"), OK(P("/p", b"hello")), BAD())
add("cl_empty", r(f"POST {API}/p HTTP/1.1", "Host: x", "Content-Length: "), BAD())  # http-garden 16/38
add("cl_empty_then_cl", r(f"GET {API}/p HTTP/1.1", "Host: x", "Content-Length: ", f"Content-Length: {len(SMUG)}",
                          body=SMUG), BAD())  # http-garden 42/T11
for name, value in [("plus", "+5"), ("minus", "-5"), ("hex", "0x5"), ("underscore", "0_5"), ("inner_space", "0 5"),
                    ("overflow", "99999999999999999999999")]:
    add(f"cl_{name}", r(f"POST {API}/p HTTP/1.1", "Host: x", f"Content-Length: {value}", body=b"hello"), BAD())
add("cl_leading_zeros", r(f"POST {API}/p HTTP/1.1", "Host: x", "Content-Length: 005", body=b"hello"),
    OK(P("/p", b"hello")))  # http-garden 32: 005 is 5, not octal
# RFC 9110 §5.5: leading and trailing whitespace is not part of a field value
for name, value in [("leading_spaces", "Content-Length:   5"), ("trailing_space", "Content-Length: 5 "),
                    ("trailing_tab", "Content-Length: 5\t")]:
    add(f"cl_{name}", r(f"POST {API}/p HTTP/1.1", "Host: x", value, body=b"hello"), OK(P("/p", b"hello")), BAD())
add("get_with_cl_body", r(f"GET {API}/g HTTP/1.1", "Host: x", "Content-Length: 5", body=b"hello"),
    OK(P("/g", b"hello", "GET")))  # http-garden T21: the body is not dropped while its length stays
# A Content-Length the parser reads as 5 but the framing as none; then a body whose first line holds
# bytes 0x80-0xFF: read as a request line, they would be %-encoded (each 1 byte -> 3) and the body
# would end early, its tail parsed as a request.
_smug = get("/SMUGGLED", "X: 12")
assert len(_smug) % 2 == 0  # so that the expansion is exactly its length
_line = b"x " + b"\xff" * (len(_smug) // 2) + b" y\n"
add("cl_trailing_space_then_binary_body",
    r(f"POST {API}/a HTTP/1.1", "Host: x", "Content-Length: 1 ", body=b"Z") + post("/b", _line + _smug),
    OK(P("/a", b"Z"), P("/b", _line + _smug)), BAD(400))

# --- Transfer-Encoding obfuscations (smuggler / DesyncBox / http-garden) --------------------------

TE_BAD: dict[str, str | bytes] = {
    "nameprefix1": "Foo: bar\r\n Transfer-Encoding: chunked",
    "nameprefix2": "Foo: bar\r\n\tTransfer-Encoding: chunked",
    "badwrap": "X-Blah-Ignore: x\r\n Transfer-Encoding: chunked",
    "tabwrap": "Transfer-Encoding: \r\n\tchunked",
    "vertwrap": "Transfer-Encoding: \n\x0bchunked",
    "linewrapped1": "Transfer-Encoding:\n chunked",
    "gareth1": "Transfer-Encoding\n : chunked",
    "tabprefix2": "Transfer-Encoding\t:\tchunked",
    "spacejoin1": "Transfer Encoding: chunked",
    "smashed": "Transfer Encoding:chunked",
    "space1": "Transfer-Encoding : chunked",
    "spjunk": "Transfer-Encoding x: chunked",
    "backslash": "Transfer\\Encoding: chunked",
    "vertprefix1": "Transfer-Encoding:\x0bchunked",
    "commaCow": "Transfer-Encoding: chunked, identity",
    "cowComma": "Transfer-Encoding: identity, chunked",
    "comma_chunked": "Transfer-Encoding: ,chunked",
    "nested": "Transfer-Encoding: identity, chunked, identity",
    "quoted": 'Transfer-Encoding: "chunked"',
    "aposed": "Transfer-Encoding: 'chunked'",
    "lazygrep": "Transfer-Encoding: chunk",
    "xchunked": "Transfer-Encoding: xchunked",
    "chunkedchunked": "Transfer-Encoding: chunkedchunked",
    "chunked_comma_chunked": "Transfer-Encoding: chunked, chunked",
    "gzip_comma_chunked": "Transfer-Encoding: gzip, chunked",
    "gzip_then_chunked_headers": "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked",
    "chunked_twice_headers": "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
    "dualchunk": "Transfer-Encoding: chunked\r\nTransfer-encoding: identity",
    "revdualchunk": "Transfer-Encoding: identity\r\nTransfer-Encoding: chunked",
    "identity": "Transfer-Encoding: identity",
    "empty": "Transfer-Encoding:",
    "0dsuffix": "Transfer-Encoding: chunked\r",
    "0dspam": "Tra\rnsfer-Encoding: chunked",
    "0dwrap": "Foo: bar\r\n\rTransfer-Encoding: chunked",
    "badsetupCR": "Foo: bar\rTransfer-Encoding: chunked",
    "badsetupLF": "Foo: bar\nTransfer-Encoding: chunked",
    "x_rout": "X: X\rTransfer-Encoding: chunked",
    "x_nout": "X: X\nTransfer-Encoding: chunked",
    "name_continued": "Transfer-\r\nEncoding: chunked",  # http-garden 37
    "accentTE": b"Transf\x82r-Encoding: chunked",
    "accentCH": b"Transfer-Encoding: ch\x96nked",
    "spaceFF": b"Transfer-Encoding:\xffchunked",
    "unispace": b"Transfer-Encoding:\xa0chunked",
    "ff_around": b"Transfer-Encoding: \xffchunked\xff",  # http-garden 46
}
TE_VALID: dict[str, str] = {  # valid syntax: forwarded whole, or refused; never split
    "yelling": "TRANSFER-ENCODING: CHUNKED",
    "sarcasm": "TrAnSFer-EnCODinG: cHuNkeD",
    "nospace1": "Transfer-Encoding:chunked",
    "valueprefix1": "Transfer-Encoding:  chunked",
    "tabprefix1": "Transfer-Encoding:\tchunked",
    "spacesuffix": "Transfer-Encoding: chunked ",
    "tabsuffix": "Transfer-Encoding: chunked\t",
}
for name, line in TE_BAD.items():
    add(f"te_{name}", chunked("/te", HELLO, te=line), BAD())
for name, line in TE_VALID.items():
    add(f"te_{name}", chunked("/te", HELLO, te=line), OK(P("/te", b"hello")), BAD())
for c in (0x00, 0x09, 0x0B, 0x0C, 0x0D, 0x20, 0x7F, 0xA0, 0xFF):  # smuggler exhaustive.py, DesyncBox specials
    ch = bytes((c,))
    for where, line in [("mid", b"Transfer-Encoding:" + ch + b"chunked"), ("post", b"Transfer-Encoding" + ch + b": chunked"),
                        ("pre", ch + b"Transfer-Encoding: chunked"), ("end", b"Transfer-Encoding: chunked" + ch)]:
        valid = c in (0x09, 0x20) and where in ("mid", "end")
        add(f"te_{where}_{c:02x}", chunked("/te", HELLO, te=line), *([OK(P("/te", b"hello"))] if valid else []), BAD())
# not a Transfer-Encoding at all: framed by Content-Length
for name, line in [("underjoin1", "Transfer_Encoding: chunked"), ("contentEnc", "Content-Encoding: chunked"),
                   ("encode", "Transfer-%45ncoding: chunked")]:
    add(f"te_{name}_with_cl", post("/te", b"hello", line), OK(P("/te", b"hello")), BAD())
add("te_on_http10", r(f"POST {API}/p HTTP/1.0", "Host: x", "Transfer-Encoding: chunked", body=HELLO), BAD())
add("te_on_http10_with_cl", r(f"POST {API}/p HTTP/1.0", "Host: x", "Transfer-Encoding: chunked", "Content-Length: 5",
                              body=HELLO), BAD())

# --- line endings -------------------------------------------------------------------------------

add("bare_lf_everywhere", b"GET " + _b(API) + b"/p HTTP/1.1\nHost: x\n\n", BAD())  # http-garden T16
add("bare_lf_in_headers", b"GET " + _b(API) + b"/p HTTP/1.1\r\nHost: x\nX: y\r\n\r\n", BAD())
add("bare_lf_ends_head", b"GET " + _b(API) + b"/p HTTP/1.1\r\nHost: x\r\n\n", BAD())
add("lf_in_request_line", b"GET /\nHTTP/1.1\r\n\r\n", BAD())  # http-garden 9
add("bare_cr_in_value", get("/p", "X: a\rInjected-SMUGGLED: 1"), BAD())  # http-garden 13/34
add("bare_cr_ends_request_line", b"GET " + _b(API) + b"/p HTTP/1.1\rHost: x\r\n\r\n", BAD())
add("bare_cr_head_end", b"GET / HTTP/1.1\r\nHost: a\r\n\rZGET /SMUGGLED: HTTP/1.1\r\nHost: a\r\n\r\n", BAD())  # garden 30
add("bare_cr_only_no_lf", b"GET " + _b(API) + b"/p HTTP/1.1\rHost: x\r\r", BAD(), end=False)
add("tls_client_hello", bytes.fromhex("16030100c4010000c00303") + bytes(range(0x10, 0x30)) + b"\x00\x02\x13\x01\x01\x00",
    BAD(), end=False)  # a TLS client on the plain port: no LF in it

# --- chunk sizes, extensions, data ------------------------------------------------------------------

for name, raw in {
    "size_leading_space": b" 5\r\nhello\r\n0\r\n\r\n",
    "size_leading_spaces_zero": b"           0\r\n\r\n" + SMUG,  # http-garden T24
    "size_trailing_space": b"5 \r\nhello\r\n0\r\n\r\n",  # llhttp: space after chunk header
    "size_trailing_tab": b"5\t\r\nhello\r\n0\r\n\r\n",
    "size_0x_prefix": b"0x5\r\nhello\r\n0\r\n\r\n",
    "size_underscore": b"0_2e\r\n\r\n" + r("GET / HTTP/1.1", "Host: a", "Content-Length: 5", body=b"0\r\n\r\n"),  # garden 1
    "size_minus": b"-1\r\nhello\r\n0\r\n\r\n",
    "size_minus_0x0": b"-0x0\r\n\r\n",  # http-garden T19
    "size_plus": b"+5\r\nhello\r\n0\r\n\r\n",
    "size_overflow": b"ffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    "size_17_hex_digits": b"10000000000000000\r\nhello\r\n0\r\n\r\n",
    "size_empty": b"\r\n\r\n",  # http-garden 17
    "size_invalid": b"Z\r\nZZ\r\nZZZ\r\n\r\n",  # http-garden T2
    "size_prefix_junk": b"1these-bytes-never-get-validated\r\nZ\r\n0\r\n\r\n",  # http-garden T7
    "size_ext_no_semicolon": b"2 erfrferferf\r\naa\r\n0 rrrr\r\n\r\n",  # llhttp
    "ext_empty": b"2;\r\naa\r\n0\r\n\r\n",  # llhttp
    "ext_unbalanced_quote": b'5;ilovew3="abc";somuchlove="def; ghi\r\nhello\r\n0\r\n\r\n',  # llhttp
    "ext_cr_in_quotes": b'5;a="x\ry"\r\nhello\r\n0\r\n\r\n',
    "ext_lf_in_quotes": b'5;a="x\ny"\r\nhello\r\n0\r\n\r\n',
    "ext_bare_cr_after_size": b"5\r\r;ABCD\r\n34\r\nE\r\n0\r\n\r\n" + SMUG,  # http-garden 31
    "ext_cr_in_ows": b"2\r\r;a\r\n02\r\n41\r\n0\r\n\r\n" + SMUG,  # http-garden T3
    "data_no_crlf": b"5\r\nhello0\r\n\r\n",  # llhttp: chunk data not terminated by CRLF
    "data_wrong_length": b"5\r\nhelloXX\r\n0\r\n\r\n",
    "data_bare_lf": b"a\r\n0123456789\n0\r\n\r\n",  # http-garden T13
    "size_bare_lf": b"5\nhello\r\n0\r\n\r\n",
    "size_bare_cr": b"1\r0\n",  # http-garden T4
    "no_last_chunk": b"3\r\nfoo\r\n\r\n",  # llhttp: missing last-chunk
    "extra_crlf_before_last": b"17\r\n0\r\n\r\nGET /SMUGGLED HTTP/1.1\r\n\r\n\r\n\r\n0\r\n\r\n",  # http-garden T17
    "invalid_then_request": b"INVALID!!!\r\n" + SMUG,  # http-garden 47
}.items():
    add(f"chunk_{name}", chunked("/c", raw), BAD())
for name, raw, body in [
    ("ext_token", b"5;foo=bar;baz\r\nhello\r\n0;last\r\n\r\n", b"hello"),
    ("ext_quoted", b'5;ilovew3="I \\"love\\"; \\\\extensions\\\\";somuchlove="aretheseparametersfor";blah;foo=bar\r\n'
                   b'hello\r\n6;blahblah;blah\r\n world\r\n0\r\n\r\n', b"hello world"),  # llhttp
    ("size_uppercase", b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
    ("size_leading_zeros", b"0005\r\nhello\r\n000\r\n\r\n", b"hello"),
    ("data_holds_crlfcrlf_and_last_chunk", chunk(b"ab\r\n\r\n0\r\n\r\n" + SMUG) + b"0\r\n\r\n", b"ab\r\n\r\n0\r\n\r\n" + SMUG),
    ("data_split_on_crlfs", chunk(b"\r\n") + chunk(b"\r\n\r\n") + b"0\r\n\r\n", b"\r\n\r\n\r\n"),
    ("many_small_chunks", b"".join(chunk(bytes([65 + i % 26])) for i in range(300)) + b"0\r\n\r\n",
     bytes(65 + i % 26 for i in range(300))),
]:
    add(f"chunk_{name}", chunked("/c", raw), OK(P("/c", body)))
add("chunk_then_nul_byte", chunked("/c", b"0\r\n\r\n\x00"), BAD(400, P("/c")))  # http-garden bonus 3

# --- trailers: counted, dropped -------------------------------------------------------------------

add("trailer_dropped", chunked("/t", b"5\r\nhello\r\n0\r\nX-Trailer-Evil: 1\r\nAuthorization: Bearer SMUGGLED\r\n"
                                     b"X-Proxy-Token: SMUGGLED\r\nHost: SMUGGLED\r\n\r\n"), OK(P("/t", b"hello")))
add("trailer_framing_fields", chunked("/t", b"5\r\nhello\r\n0\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n"),
    OK(P("/t", b"hello")), BAD())
add("trailer_looks_like_request", chunked("/t", b"1\r\nZ\r\n0\r\nX:POST /SMUGGLED HTTP/1.1\r\n\r\n"),
    OK(P("/t", b"Z")))  # http-garden 39
add("trailer_on_empty_body", chunked("/t", b"0\r\nX-Trailer-A: 1\r\n\r\n") + get("/n"), OK(P("/t"), G("/n")))
add("trailer_no_colon", chunked("/t", b"0\r\nJUSTANAME\r\n\r\n"), BAD())
add("trailer_obs_fold", chunked("/t", b"0\r\nX-Trailer-A: a\r\n b\r\n\r\n"), BAD())
add("trailer_nul", chunked("/t", b"0\r\nX-Trailer-A: a\x00b\r\n\r\n"), BAD())
add("trailer_over_limit", chunked("/t", b"1\r\nZ\r\n0\r\nX-Trailer-Big: " + b"t" * (2 * LIMIT) + b"\r\n\r\n"), BAD(431))
add("trailers_limit_is_per_request",
    b"".join(chunked(f"/t{i}", b"0\r\nX-Trailer-Pad: " + b"p" * (LIMIT * 3 // 8) + b"\r\n\r\n") for i in range(3)),
    OK(P("/t0"), P("/t1"), P("/t2")))
add("many_empty_chunked_bodies", b"".join(chunked("/e", b"0\r\n\r\n") for _ in range(210)),
    OK(*[P("/e")] * 210), limit=1024)  # Go's client sends an empty body of unknown length so

# --- obs-fold, CTLs, names ---------------------------------------------------------------------------

add("obs_fold_space", get("/p", "X-Folded: a", " b"), BAD())
add("obs_fold_tab", get("/p", "X-Folded: a", "\tb"), BAD())
add("obs_fold_first_line", r(f"GET {API}/p HTTP/1.1", " Host: x"), BAD())
add("obs_fold_after_te", chunked("/p", HELLO, "  abc"), BAD())  # llhttp: invalid OBS fold after chunked
add("first_header_tab_cl", r(f"GET {API}/p HTTP/1.1", "\tContent-Length: 1", body=b"X"), BAD())  # http-garden 4
add("nul_in_name", get("/p", "X\x00A: b"), BAD())
add("nul_in_value", get("/p", "X-A: a\x00b"), BAD())  # http-garden 35/43/T12
add("nul_after_value", get("/p", "X-A: evil\x00"), BAD())
add("ctl_in_value", get("/p", "X-A: a\x01b"), BAD())
add("del_in_value", get("/p", "X-A: a\x7fb"), BAD())
add("ctls_in_name", get("/p", b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\t\x0b\x0c\x0e\x0f\x10\x1f \"(),/;<=>?@[/]{}: w"),
    BAD())  # http-garden 14
add("high_byte_in_name", get("/p", b"\xefoo: bar"), BAD())  # http-garden 8
add("high_byte_name_suffix", get("/p", b"Header\x85: value"), BAD())  # http-garden T6
add("no_colon", get("/p", "JustAName"), BAD())
add("no_colon_lf_split", get("/p", "Te\nst: test"), BAD())  # http-garden T14
add("empty_name", get("/p", ": ignored"), BAD())  # http-garden 18
add("nul_line", get("/p", "a:b", "c\x00"), BAD())  # http-garden T20
add("space_before_colon_cl", r(f"POST {API}/p HTTP/1.1", "Host: x", f"Content-Length : {len(SMUG)}", body=SMUG),
    BAD())  # http-garden 3
add("tab_before_colon", get("/p", "X-A\t: b"), BAD())
add("space_before_colon_host", r(f"GET {API}/p HTTP/1.1", "Host : x"), BAD())
add("obs_text_value_verbatim", get("/p", b"X-Name: caf\xc3\xa9 \xff\x85"), OK(G("/p")),
    header=(b"X-Name", b"caf\xc3\xa9 \xff\x85"))
add("credentials_and_hop_headers_dropped",
    get("/p", "Authorization: Bearer SMUGGLED", "X-Proxy-Token: SMUGGLED", "Proxy-Authorization: SMUGGLED",
        "Connection: X-Secret", "X-Secret: SMUGGLED", "TE: trailers", "Keep-Alive: SMUGGLED", "Upgrade: SMUGGLED"),
    OK(G("/p")))

# --- pipelining -----------------------------------------------------------------------------------

add("pipeline_good_bad_good", get("/a") + b"G@T /b HTTP/1.1\r\n\r\n" + SMUG, BAD(400, G("/a")))
add("pipeline_bad_first", b"BAD\r\n\r\n" + SMUG, BAD())
add("pipeline_body_then_bad", post("/a", b"hello") + get("/b", "X: \x00") + SMUG, BAD(400, P("/a", b"hello")))
add("pipeline_body_then_bad_chunk", post("/a", b"hello") + chunked("/b", b"zz\r\nhello\r\n0\r\n\r\n") + SMUG,
    BAD(400, P("/a", b"hello")))
add("pipeline_40_then_bad", b"".join(get(f"/q{i}") for i in range(40)) + b"\x01\r\n\r\n" + SMUG,
    BAD(400, *[G(f"/q{i}") for i in range(40)]))
add("pipeline_then_connection_close", get("/a") + get("/b", "Connection: close"), ((200, 200), (G("/a"), G("/b"))),
    end=False)
add("pipeline_then_http10", get("/a") + r(f"GET {API}/b HTTP/1.0", "Host: x"), ((200, 200), (G("/a"), G("/b"))),
    end=False)
add("pipeline_after_connection_close", get("/a", "Connection: close") + SMUG, ((200,), (G("/a"),)))
add("pipeline_after_http10", r(f"GET {API}/a HTTP/1.0", "Host: x") + SMUG, ((200,), (G("/a"),)))
add("pipeline_close_then_invalid", get("/a", "Connection: close") + b"Invalid\r\n\r\n",
    ((200,), (G("/a"),)), end=False)  # http-garden 45
add("pipeline_cl0_then_cl_body", post("/a", b"", "Connection: keep-alive") + post("/b", get("/c")),
    OK(P("/a"), P("/b", get("/c"))))  # http-garden 48
add("refused_path_body_not_parsed", r("POST /admin HTTP/1.1", "Host: x", f"Content-Length: {len(SMUG)}", body=SMUG),
    REFUSED(403))
add("refused_path_chunked_body_not_parsed", r("POST /admin HTTP/1.1", "Host: x", "Transfer-Encoding: chunked",
                                              body=chunk(SMUG) + b"0\r\n\r\n"), REFUSED(403))

# --- upgrades, CONNECT, TRACE -------------------------------------------------------------------------

H2C = ("Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: AAEAAEAAAAIAAAABAAMAAABkAAQBAAAAAAUAAEAA")
add("h2c_post_cl_body", post("/up", b"hello", *H2C, "Content-Type: text/plain"), OK(P("/up", b"hello")))  # Java
add("h2c_post_body_holds_request", post("/up", SMUG, *H2C), OK(P("/up", SMUG)))
add("h2c_post_chunked_body", chunked("/up", chunk(b"hel") + chunk(b"lo") + b"0\r\nX-Trailer-A: 1\r\n\r\n", *H2C),
    OK(P("/up", b"hello")))
add("h2c_post_chunked_holds_request", chunked("/up", chunk(SMUG) + b"0\r\n\r\n", *H2C), OK(P("/up", SMUG)))
add("h2c_post_bad_chunk", chunked("/up", b"zz\r\n" + SMUG, *H2C), BAD())
add("h2c_get_no_body", get("/up", *H2C), OK(G("/up")))
add("h2c_post_cl_trailing_space_body", r(f"POST {API}/up HTTP/1.1", "Host: x", *H2C, f"Content-Length: {len(SMUG)} ",
                                         body=SMUG), OK(P("/up", SMUG)), BAD())
WS = ("Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13")
add("websocket_get", get("/ws", *WS), OK(G("/ws")))
add("websocket_get_with_body", r(f"GET {API}/ws HTTP/1.1", "Host: x", *WS, "Content-Length: 5", body=b"hello"),
    OK(P("/ws", b"hello", "GET")))
add("websocket_then_frame", get("/ws", *WS) + b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58", BAD(400, G("/ws")),
    end=False)  # a masked "Hello" frame: not HTTP
add("upgrade_http10", r(f"GET {API}/ws HTTP/1.0", "Host: x", "Connection: Upgrade", "Upgrade: websocket") + SMUG,
    ((200,), (G("/ws"),)))
add("connect", r("CONNECT 127.0.0.1:443 HTTP/1.1", "Host: 127.0.0.1:443") + SMUG, BAD(405))
add("connect_with_body", r("CONNECT 127.0.0.1:443 HTTP/1.1", "Host: x", "Content-Length: 5", body=b"hello") + SMUG,
    BAD(405))
add("connect_to_api_path", r(f"CONNECT {API}/x HTTP/1.1", "Host: x") + SMUG, BAD(405), BAD(400))
add("trace", r(f"TRACE {API}/x HTTP/1.1", "Host: x"), REFUSED(405))
add("trace_with_body", r(f"TRACE {API}/x HTTP/1.1", "Host: x", "Content-Length: 5", body=b"hello"), REFUSED(405))
add("track", r(f"TRACK {API}/x HTTP/1.1", "Host: x"), REFUSED(405), BAD(405), BAD(400))
add("trace_lowercase", r(f"trace {API}/x HTTP/1.1", "Host: x"), BAD())

# --- request targets ------------------------------------------------------------------------------

add("utf8_target", get(b"/caf\xc3\xa9?q=\xe2\x82\xac"), OK(G("/caf%C3%A9?q=%E2%82%AC")))
add("utf8_target_after_leading_lf", b"\n" + get(b"/caf\xc3\xa9"), OK(G("/caf%C3%A9")))
add("utf8_target_after_leading_crlf", b"\r\n" + get(b"/caf\xc3\xa9"), OK(G("/caf%C3%A9")))
add("high_byte_in_query", get(b"/x?q=\xff"), OK(G("/x?q=%FF")))
add("high_byte_path_not_utf8", get(b"/\xff\xfe"), REFUSED(400))
add("utf8_target_outside_allowed", b"GET /admin/caf\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", REFUSED(403))
add("utf8_dotdot_escape", get(b"/caf\xc3\xa9/../../admin"), REFUSED(403))
add("high_byte_in_method", b"G\xc3\xa9T " + _b(API) + b"/x HTTP/1.1\r\nHost: x\r\n\r\n", BAD())
add("high_byte_in_version", b"GET " + _b(API) + b"/x HTTP/1.1\xff\r\nHost: x\r\n\r\n", BAD())
add("high_byte_target_http09", b"GET " + _b(API) + b"/\xff\r\n\r\n", BAD())
add("high_byte_and_space_in_target", b"GET " + _b(API) + b"/a\xff b HTTP/1.1\r\nHost: x\r\n\r\n", BAD())
for name, path in [("semicolon_dotdot", "/..;/..;/admin"), ("semicolon_dotdot_encoded", "/..%3B/..%3B/admin"),
                   ("semicolon_dotdot_encoded_lower", "/..%3b/..%3b/admin"), ("semicolon_dot_encoded", "/%2e%2e;/%2e%2e;/admin"),
                   ("semicolon_param_dotdot", "/x;a=b/..;/..;/..;/admin"), ("double_encoded_dotdot", "/%252e%252e/%252e%252e/admin"),
                   ("backslash_dotdot", "/..\\..\\admin"), ("encoded_slash_dotdot", "/..%2F..%2Fadmin")]:
    add(f"target_{name}", get(path), REFUSED(403))
add("target_bad_escape", get("/a%zz"), REFUSED(400))
add("target_encoded_nul", get("/a%00b"), REFUSED(400))
add("absolute_form", r(f"GET http://127.0.0.1:9{API}/x HTTP/1.1", "Host: x"), REFUSED(405))
add("absolute_form_upper_https", r(f"GET HTTPS://evil.example{API}/x HTTP/1.1", "Host: evil.example"), REFUSED(405))
add("absolute_form_post_body", r(f"POST http://evil.example{API}/x HTTP/1.1", "Host: x", "Content-Length: 5",
                                 body=b"hello"), REFUSED(405))
add("scheme_relative_target", r(f"GET //evil.example{API}/x HTTP/1.1", "Host: x"), REFUSED(403))
add("asterisk_form_options", r("OPTIONS * HTTP/1.1", "Host: x"), REFUSED(400))
add("asterisk_form_get", r("GET * HTTP/1.1", "Host: x"), REFUSED(400))
add("authority_form_get", r("GET 127.0.0.1:80 HTTP/1.1", "Host: x"), BAD())
add("target_with_space", r(f"GET {API}/a b HTTP/1.1", "Host: x"), BAD())
add("target_crlf_injection", b"GET " + _b(API) + b"/x\r\nX-SMUGGLED: 1 HTTP/1.1\r\nHost: x\r\n\r\n", BAD())

# --- methods, versions, HTTP/0.9, HTTP/2 --------------------------------------------------------------

add("method_garbage", b'G=":<>(e),[T];?" /get HTTP/1.1\r\nHost: x\r\n\r\n', BAD())  # http-garden 6
add("method_lowercase", r(f"get {API}/x HTTP/1.1", "Host: x"), BAD())
add("method_nul", b"\x00 / HTTP/............0596.7407.\r\n\r\n", BAD())  # http-garden 40
add("version_1_32", r(f"GET {API}/x HTTP/1.32", "Host: x"), BAD())  # http-garden 5
add("version_cr", b"GET / HTTP/\r\r1.1\r\n\r\n", BAD())  # http-garden 15
add("version_2_0", r(f"GET {API}/x HTTP/2.0", "Host: x"), REFUSED(400), BAD())
add("http09", b"GET " + _b(API) + b"/x\r\n", BAD())
add("http09_blank_line", b"GET " + _b(API) + b"/x\r\n\r\n", BAD())
# llhttp reads a line without a version as HTTP/0.9 with headers, a body and keep-alive: it is
# refused, and nothing after it is read (found by mutation: a space deleted before HTTP/1.1)
add("http09_with_headers_and_body", b"POST " + _b(API) + b"/a\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\n"
    b"hello" + b"GET " + _b(API) + b"/next HTTP/1.1\r\nHost: x\r\n\r\n", BAD())
add("http2_preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00", BAD())
add("http2_preface_alone", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", BAD(), end=False)

# --- empty lines before a request line -----------------------------------------------------------------

add("leading_crlf", b"\r\n\r\n" + get("/a"), OK(G("/a")))
add("leading_lf", b"\n" + get("/a"), OK(G("/a")))
add("crlf_between_pipelined", get("/a") + b"\r\n", OK(G("/a")))
add("leading_crlf_flood", b"\r\n" * (4 * LIMIT), OK())

# --- head size limits --------------------------------------------------------------------------------


def sized(total: int) -> bytes:
    """A GET whose head, request line to the empty line, is `total` bytes."""
    bare = get("/lim", "X-Pad: ")
    return get("/lim", "X-Pad: " + "p" * (total - len(bare)))


assert len(sized(LIMIT - 8)) == LIMIT - 8
add("head_just_under_limit", sized(LIMIT - 8), OK(G("/lim")))
add("head_just_over_limit", sized(LIMIT + 8), BAD(431))
add("many_headers_over_limit", get("/p", *[f"X-N{i}: 1" for i in range(LIMIT // 8)]), BAD(431))
add("request_line_over_limit", get("/" + "a" * LIMIT), BAD(431))
add("request_line_never_ends", b"GET " + _b(API) + b"/" + b"a" * (64 * LIMIT), BAD(431), end=False)
add("header_line_never_ends", get("/p")[:-2] + b"X-Big: " + b"b" * (1 << 20), BAD(431), end=False)
add("chunk_ext_never_ends", chunked("/c", b"5;" + b"e" * (64 * LIMIT)), BAD(431), end=False)
# a long extension that ends, in the same read as its chunk's data: llhttp buffers no extension
# and the proxy forwards none (it frames the body anew), so either answer is safe
add("chunk_ext_over_limit", chunked("/c", b"5;" + b"e" * (2 * LIMIT) + b"\r\nhello\r\n0\r\n\r\n"), BAD(431),
    OK(P("/c", b"hello")))


# --- the recording upstream ------------------------------------------------------------------------


@dataclass
class Request:
    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    body: bytes


class Recorder:
    """A raw HTTP/1.1 origin on loopback: records every byte and every request it parses
    (strictly), answers each with a 200 whose body is the request's target."""

    def __init__(self) -> None:
        self.raw = bytearray()
        self.requests: list[Request] = []
        self.problems: list[str] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=1 << 22)
        self.url = "http://127.0.0.1:%d" % self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()

    async def _read(self, reader: asyncio.StreamReader, sep: bytes) -> bytes:
        data = await reader.readuntil(sep)
        self.raw += data
        return data

    async def _exactly(self, reader: asyncio.StreamReader, n: int) -> bytes:
        data = await reader.readexactly(n)
        self.raw += data
        return data

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            while True:
                try:
                    head = await self._read(reader, b"\r\n\r\n")
                except asyncio.IncompleteReadError as exc:
                    self.raw += exc.partial
                    if exc.partial:
                        self.problems.append(f"head cut short: {exc.partial[:200]!r}")
                    return
                lines = head[:-4].split(b"\r\n")
                for line in lines:
                    if any(c in line for c in (b"\r", b"\n", b"\x00")):
                        self.problems.append(f"bad line: {line[:200]!r}")
                method, target, version = lines[0].split(b" ")
                assert version == b"HTTP/1.1", lines[0]
                headers = []
                for line in lines[1:]:
                    name, colon, value = line.partition(b":")
                    if not colon or not name or name != name.strip():
                        self.problems.append(f"bad header line: {line[:200]!r}")
                    headers.append((name, value.strip(b" \t")))
                names = [n.lower() for n, _ in headers]
                body = b""
                if b"transfer-encoding" in names:
                    while True:
                        size = int((await self._read(reader, b"\r\n"))[:-2].split(b";")[0], 16)
                        if size == 0:
                            break
                        body += (await self._exactly(reader, size + 2))[:-2]
                    if (trailer := await self._read(reader, b"\r\n")) != b"\r\n":
                        self.problems.append(f"trailer forwarded: {trailer!r}")
                        await self._read(reader, b"\r\n\r\n")
                elif b"content-length" in names:
                    body = await self._exactly(reader, int(dict(zip(names, (v for _, v in headers)))[b"content-length"]))
                self.requests.append(Request(method.decode(), target.decode("latin-1"), headers, body))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(target), target))
                await writer.drain()
        except Exception as exc:  # noqa: BLE001 - recorded, checked by the test
            self.problems.append(f"upstream parser: {exc!r}")
        finally:
            writer.transport.abort()

    def seen(self) -> list[Seen]:
        return [(q.method, q.target, q.body) for q in self.requests]


@pytest.fixture
async def recorder() -> Any:
    rec = Recorder()
    await rec.start()
    yield rec
    rec.close()


# --- the client side --------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


async def read_reply(reader: asyncio.StreamReader) -> Reply | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    status = int(lines[0].split(" ")[1])
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
    return Reply(status, headers, body)


async def exchange(proxy: Proxy, data: bytes) -> tuple[list[Reply], str]:
    """Send `data` on a new connection; every response read until the proxy closes it (or, once
    END is answered, until the proxy closes after the client shut its side), and how the
    connection ended: "eof" (closed cleanly), "reset", "cut" (mid-response) or "timeout"
    (still open after TIMEOUT s)."""
    assert proxy.address is not None
    reader, writer = await asyncio.open_connection(proxy.address.host, proxy.address.port, limit=1 << 22)
    writer.write(data)
    replies: list[Reply] = []
    how = "eof"
    try:
        async with asyncio.timeout(TIMEOUT):
            while (reply := await read_reply(reader)) is not None:
                replies.append(reply)
                if reply.body == END_PATH.encode() and "x-ndovu-proxy-error" not in reply.headers:
                    writer.write_eof()  # nothing more will come: whatever else arrives is extra
    except TimeoutError:
        how = "timeout"
    except ConnectionResetError:
        how = "reset"
    except asyncio.IncompleteReadError:
        how = "cut"
    finally:
        writer.transport.abort()
    return replies, how


# --- the test --------------------------------------------------------------------------------------


FORBIDDEN = {b"connection", b"keep-alive", b"upgrade", b"http2-settings", b"te", b"trailer", b"expect",
             b"proxy-authorization", b"proxy-connection", b"x-proxy-token", b"x-secret", b"sec-websocket-extensions"}
FRAMING = {b"content-length", b"transfer-encoding"}


def check_forwarded(rec: Recorder, fake: FakeNdovu) -> None:
    host = rec.url.removeprefix("http://").encode()
    tokens = {b"Bearer " + t.encode() for t in fake.issued}
    for q in rec.requests:
        where = f"{q.method} {q.target}: {q.headers}"
        assert "SMUGGLED" not in q.target, where
        names = [n.lower() for n, _ in q.headers]
        assert [v for n, v in q.headers if n.lower() == b"authorization"] in ([t] for t in tokens), where
        assert [v for n, v in q.headers if n.lower() == b"host"] == [host], where
        assert sum(n in FRAMING for n in names) <= 1, where
        for name, value in q.headers:
            low = name.lower()
            assert b"SMUGGLED" not in name and b"SMUGGLED" not in value, where
            assert low not in FORBIDDEN and not low.startswith(b"x-trailer"), where
            # a name some servers (CGI, PHP, WSGI) read as a framing header
            assert low in FRAMING or low.replace(b"_", b"-") not in FRAMING, where
            if low == b"transfer-encoding":
                assert value == b"chunked", where


@pytest.mark.parametrize("v", VECTORS, ids=[v.id for v in VECTORS])
async def test_vector(v: V, start_proxy: StartProxy, fake: FakeNdovu, recorder: Recorder) -> None:
    proxy = await start_proxy({"upstream.url": recorder.url, "auth.token_path": f"{fake.url}{API}/auth",  # type: ignore[attr-defined]
                               "limits.max_header_bytes": v.limit})
    replies, how = await exchange(proxy, v.data + (END if v.end else b""))
    got: Outcome = (tuple(r.status for r in replies), tuple(recorder.seen()))
    detail = f"client read {got[0]} then {how}; upstream saw {got[1]}; upstream problems {recorder.problems}"
    assert got in v.outcomes, detail
    assert how == "eof", detail  # every answer read, then a clean close: no reset, no hang
    assert not recorder.problems, detail
    for reply in replies:
        if reply.status >= 400:
            assert reply.headers.get("x-ndovu-proxy-error") == CODES[reply.status], (reply, detail)
        else:
            assert "x-ndovu-proxy-error" not in reply.headers, (reply, detail)
    check_forwarded(recorder, fake)
    if v.header is not None:
        assert v.header in recorder.requests[0].headers, recorder.requests[0].headers
    # still healthy: a fresh connection is answered, and only its request reaches the upstream
    before = len(recorder.requests)
    replies, how = await exchange(proxy, END)
    assert [r.status for r in replies] == [200] and how == "eof", (replies, how)
    assert recorder.seen()[before:] == [E]


async def _one_by_one(proxy: Proxy, requests: list[bytes]) -> list[int | str]:
    """Each request on one keep-alive connection once the previous one is answered."""
    assert proxy.address is not None
    reader, writer = await asyncio.open_connection(proxy.address.host, proxy.address.port)
    statuses: list[int | str] = []
    try:
        for data in requests:
            writer.write(data)
            reply = await asyncio.wait_for(read_reply(reader), TIMEOUT)
            statuses.append("closed" if reply is None else reply.status)
            if reply is None:
                break
    except (OSError, asyncio.IncompleteReadError) as exc:
        statuses.append(type(exc).__name__)
    finally:
        writer.transport.abort()
    return statuses


@pytest.mark.parametrize("requests", [
    [chunked("/e", b"0\r\n\r\n")] * 300,  # an empty body of unknown length (Go's client sends these)
    [chunked(f"/t{i}", b"0\r\nX-Trailer-Pad: " + b"p" * 300 + b"\r\n\r\n") for i in range(10)],
], ids=["empty_chunked_bodies", "small_trailers"])
async def test_chunk_framing_is_bounded_per_request_not_per_connection(
        requests: list[bytes], start_proxy: StartProxy, fake: FakeNdovu, recorder: Recorder) -> None:
    """The head limit bounds each request's sizes, extensions and trailers, not their sum over a
    keep-alive connection (limit 1024: each request here is far below it)."""
    proxy = await start_proxy({"upstream.url": recorder.url, "auth.token_path": f"{fake.url}{API}/auth",  # type: ignore[attr-defined]
                               "limits.max_header_bytes": 1024})
    statuses = await _one_by_one(proxy, requests)
    assert statuses == [200] * len(requests), f"first failure at request {next(i for i, s in enumerate(statuses) if s != 200)}: {statuses[-3:]}"
    assert len(recorder.requests) == len(requests)
