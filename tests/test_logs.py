"""The redaction processor and the log format."""

from __future__ import annotations

import io
import json
import logging

import structlog

from proxy import logs


def capture(level: str = "debug") -> tuple[io.StringIO, logs.Redactor]:
    buf = io.StringIO()
    redactor = logs.configure(level, "json", stream=buf, cache=False)
    return buf, redactor


def test_every_line_is_one_json_object_with_level_and_time() -> None:
    buf, _ = capture()
    structlog.get_logger("t").info("hello", n=1)
    logging.getLogger("aiohttp.server").warning("from the stdlib %s", "too")
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [e["event"] for e in lines] == ["hello", "from the stdlib too"]
    assert all("timestamp" in e and "level" in e for e in lines)


def test_secrets_are_redacted_whatever_a_developer_logs() -> None:
    buf, redactor = capture()
    redactor.add("raw-client-secret")
    redactor.add("tok.en.value")
    log = structlog.get_logger("t")
    log.info("oops", authorization="Bearer abc", cookie="s=1", x_proxy_token="pt", client_secret="raw-client-secret")
    log.info("oops2", note="the secret is raw-client-secret and the token tok.en.value")
    log.info("oops3", headers={"Authorization": "Basic Zm9vOmJhcg==", "X-Proxy-Token": "pt2", "Accept": "json"})
    log.info("oops4", text="sent Authorization: Bearer eyJhbGciOi.eyJzdWIi.c2ln to the API")
    try:
        raise ValueError("failed with raw-client-secret inside")
    except ValueError:
        log.exception("boom")
    out = buf.getvalue()
    for secret in ("abc", "s=1", '"pt"', "raw-client-secret", "tok.en.value", "Zm9vOmJhcg==", "pt2", "eyJhbGciOi.eyJzdWIi.c2ln"):
        assert secret not in out, secret
    assert '"Accept": "json"' in out
    assert out.count(logs.REDACTED) >= 8


def test_level_filters() -> None:
    buf, _ = capture("warning")
    structlog.get_logger("t").info("quiet")
    structlog.get_logger("t").warning("loud")
    assert "quiet" not in buf.getvalue() and "loud" in buf.getvalue()


def test_malformed_request_logs_hold_no_bytes_of_the_request() -> None:
    from aiohttp.http_exceptions import BadHttpMessage

    buf, _ = capture()
    try:
        raise BadHttpMessage("Invalid header value char: b'Authorization: Bearer leaked-value\\x01'")
    except BadHttpMessage:
        logging.getLogger("aiohttp.server").exception("Error handling request from 127.0.0.1")
    out = buf.getvalue()
    assert "leaked-value" not in out
    assert "BadHttpMessage" in out


def test_console_format_is_readable() -> None:
    buf = io.StringIO()
    logs.configure("info", "console", stream=buf, cache=False)
    structlog.get_logger("t").info("access", status=200)
    line = buf.getvalue()
    assert "access" in line and "status=200" in line and not line.startswith("{")


def test_the_fast_access_renderer_says_what_the_generic_chain_says() -> None:
    fields = dict(method="GET", path='/api/v3/partners/a"b\\c\u00e9', status=201, upstream_status=None,
                  duration_ms=1.25, replayed=True, request_id="rid-1")
    generic_buf, redactor = capture("info")
    structlog.get_logger("t").info("access", **fields)
    fast_buf = io.StringIO()
    logs.configure("info", "json", stream=fast_buf, cache=False)
    access = logs.access_logger(redactor)
    assert access is not None
    access(**fields)
    generic, fast = json.loads(generic_buf.getvalue()), json.loads(fast_buf.getvalue())
    assert generic.pop("timestamp")[:10] == fast.pop("timestamp")[:10]
    assert fast == generic


def test_the_fast_access_renderer_scrubs_what_clients_control() -> None:
    buf = io.StringIO()
    redactor = logs.configure("info", "json", stream=buf, cache=False)
    redactor.add("known-secret-value")
    access = logs.access_logger(redactor)
    assert access is not None
    access(method="GET", path="/x/known-secret-value", status=200, upstream_status=200,
           duration_ms=1.0, replayed=False, request_id="Bearer abc.def")
    out = buf.getvalue()
    assert "known-secret-value" not in out and "abc.def" not in out


def test_info_lines_are_batched_and_errors_flush_at_once() -> None:
    buf = io.StringIO()
    logs.configure("info", "json", stream=buf, cache=False, buffered=True)
    log = structlog.get_logger("t")
    log.info("first")  # no running loop here: written at once rather than never
    assert "first" in buf.getvalue()
    log.error("second")
    assert "second" in buf.getvalue()


async def test_info_lines_wait_for_the_flush_inside_the_loop() -> None:
    import asyncio

    buf = io.StringIO()
    logs.configure("info", "json", stream=buf, cache=False, buffered=True)
    log = structlog.get_logger("t")
    log.info("batched")
    assert buf.getvalue() == ""
    log.warning("urgent")  # a warning takes what waits with it, in order
    lines = [json.loads(line)["event"] for line in buf.getvalue().splitlines()]
    assert lines == ["batched", "urgent"]
    log.info("later")
    await asyncio.sleep(logs.FLUSH_INTERVAL * 2)  # the subject: the timed flush
    assert "later" in buf.getvalue()


def test_access_events_follow_the_level_and_the_format() -> None:
    fields = dict(method="GET", path="/p", status=200, upstream_status=200, duration_ms=0.5, replayed=False,
                  request_id="rid-2")
    buf = io.StringIO()
    redactor = logs.configure("warning", "json", stream=buf, cache=False)
    assert logs.access_logger(redactor) is None  # info lines hidden: nothing to render
    redactor = logs.configure("info", "console", stream=buf, cache=False)
    access = logs.access_logger(redactor)
    assert access is not None
    access(**fields)
    line = buf.getvalue()
    assert "access" in line and "request_id=rid-2" in line and not line.startswith("{")
