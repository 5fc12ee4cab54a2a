"""The real command in a subprocess: exit codes, signals, what it prints and logs."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests import fakes
from tests.conftest import assert_no_secrets
from tests.fakes import CLIENT_SECRET, FakeNdovu
from tests.procs import Command, MakeCommand, proxy_env

API = "/api/v3/partners"



@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NDOVU_CLIENT_ID": "x"}, "auth.client_secret: missing; set NDOVU_CLIENT_SECRET or auth.client_secret_file"),
        ({"NDOVU_CLIENT_ID": "x", "NDOVU_CLIENT_SECRET": "y", "NDOVU_UPSTREAM_URL": "localhost:80"}, "upstream.url: not a valid http(s) URL"),
        ({"NDOVU_CLIENT_ID": "a:b", "NDOVU_CLIENT_SECRET": "y"}, "auth.client_id: must not contain ':' with auth.style ndovu"),
    ],
)
async def test_bad_config_exits_1_with_one_message_naming_the_key(command: MakeCommand, env: dict[str, str], message: str) -> None:
    cmd = command("serve", env=env)
    assert await cmd.run() == 1
    assert cmd.stderr == [f"ndovu-proxy: config error: {message}"]
    assert "y" not in cmd.stdout


async def test_unknown_key_in_the_file_exits_1(command: MakeCommand, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("forwarding:\n  retry_on_410: true\n")
    cmd = command("serve", "--config", str(path), env={"NDOVU_CLIENT_ID": "x", "NDOVU_CLIENT_SECRET": "y"})
    assert await cmd.run() == 1
    assert cmd.stderr == ["ndovu-proxy: config error: forwarding.retry_on_410: unknown key; "
                          "did you mean forwarding.retry_on_401?"]


async def test_sigterm_closes_the_listener_and_drains_a_slow_request(command: MakeCommand, fake: FakeNdovu) -> None:
    slow = fake.api_faults["slow"] = fakes.Gate("slow done")
    cmd = await command("serve", env=proxy_env(fake)).start()
    address, _ = await cmd.listening()
    await cmd.event("token_acquired")
    host, port = address.rsplit(":", 1)
    async with aiohttp.ClientSession() as http:
        pending = asyncio.create_task(http.get(f"http://{address}{API}/slow"))
        await asyncio.wait_for(slow.reached.wait(), 5)
        cmd.signal(signal.SIGTERM)
        await cmd.event("listener_closed")
        # new connections are refused, while the slow request is still in flight
        with pytest.raises(OSError):
            await asyncio.open_connection(host, int(port))
        assert not pending.done()
        slow.release.set()
        resp = await asyncio.wait_for(pending, 5)
        assert resp.status == 200
        assert await resp.text() == "slow done"
    assert await cmd.wait() == 0
    assert_no_secrets(cmd.output(), fake)


async def test_drain_is_bounded_by_shutdown_timeout(command: MakeCommand, fake: FakeNdovu, tmp_path: Path) -> None:
    reached = asyncio.Event()

    async def stuck(_request: web.Request) -> web.StreamResponse:
        reached.set()
        await asyncio.Event().wait()  # never answers
        raise AssertionError

    fake.api_faults["stuck"] = stuck
    path = tmp_path / "c.yaml"
    path.write_text("shutdown_timeout: 0.5\n")
    cmd = await command("serve", "--config", str(path), env=proxy_env(fake)).start()
    address, _ = await cmd.listening()
    await cmd.event("token_acquired")
    async with aiohttp.ClientSession() as http:
        pending = asyncio.create_task(http.get(f"http://{address}{API}/stuck"))
        await asyncio.wait_for(reached.wait(), 5)
        began = time.monotonic()
        cmd.signal(signal.SIGTERM)
        assert await cmd.wait() == 0
        assert time.monotonic() - began < 5
        with pytest.raises(aiohttp.ClientError):
            await pending


async def test_sighup_picks_up_a_fixed_secret_file_without_a_restart(command: MakeCommand, fake: FakeNdovu, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("not-the-secret\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("auth:\n  backoff_initial: 600\n  backoff_max: 600\n")
    env = proxy_env(fake, NDOVU_CLIENT_SECRET_FILE=str(secret))
    cmd = await command("serve", "--config", str(cfg), env=env).start()
    address, admin = await cmd.listening()
    failure = await cmd.event("token_refresh_failed")
    assert failure["level"] == "error" and failure["reason"] == "credentials_rejected"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{admin}/readyz") as resp:
            assert resp.status == 503
        async with http.get(f"http://{address}{API}/x") as resp:
            assert resp.status == 503
        secret.write_text(CLIENT_SECRET + "\n")
        cmd.signal(signal.SIGHUP)
        await cmd.event("reload_done")
        async with http.get(f"http://{admin}/readyz") as resp:
            assert resp.status == 200
        async with http.get(f"http://{address}{API}/x") as resp:
            assert resp.status == 200
    assert fake.auth_calls == 2
    cmd.signal(signal.SIGTERM)
    assert await cmd.wait() == 0
    assert_no_secrets(cmd.output(), fake)
    assert "not-the-secret" not in cmd.output()


async def test_failed_sighup_keeps_the_current_token(command: MakeCommand, fake: FakeNdovu) -> None:
    cmd = await command("serve", env=proxy_env(fake)).start()
    address, _ = await cmd.listening()
    await cmd.event("token_acquired")
    fake.auth_faults = [fakes.status(500)]
    cmd.signal(signal.SIGHUP)
    await cmd.event("reload_failed")
    async with aiohttp.ClientSession() as http, http.get(f"http://{address}{API}/x") as resp:
        assert resp.status == 200
    assert fake.api_log[-1].headers["Authorization"] == f"Bearer {fake.issued[0]}"
    cmd.signal(signal.SIGINT)
    assert await cmd.wait() == 0


async def test_sighup_during_shutdown_is_no_failure(command: MakeCommand, fake: FakeNdovu) -> None:
    cmd = await command("serve", env=proxy_env(fake)).start()
    await cmd.listening()
    await cmd.event("token_acquired")
    gate = fakes.Gate()
    fake.auth_faults = [gate]
    cmd.signal(signal.SIGHUP)
    await gate.reached.wait()  # the reload's token call is under way ...
    cmd.signal(signal.SIGTERM)  # ... when shutdown comes
    assert await cmd.wait() == 0
    gate.release.set()
    output = cmd.output()
    assert '"reload"' in output and "reload_failed" not in output and "Traceback" not in output


async def test_logs_are_json_lines_on_stderr_and_never_hold_credentials(command: MakeCommand, fake: FakeNdovu) -> None:
    cmd = await command("serve", env=proxy_env(fake)).start()
    address, _ = await cmd.listening()
    await cmd.event("token_acquired")
    fake.expire_all()
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": "Bearer app-own-token-123", "Cookie": "jar=cookie-456", "X-Proxy-Token": "pt-789"}
        async with http.post(f"http://{address}{API}/x?q=1", data=b"body", headers=headers) as resp:
            assert resp.status == 200
    access = await cmd.event("access")
    assert access["replayed"] is True and access["path"] == f"{API}/x"
    cmd.signal(signal.SIGTERM)
    assert await cmd.wait() == 0
    assert cmd.stdout == []
    assert all(line.startswith("{") for line in cmd.stderr)
    out = cmd.output()
    assert_no_secrets(out, fake)
    for value in ("app-own-token-123", "cookie-456", "pt-789"):
        assert value not in out


async def test_a_taken_port_exits_1(command: MakeCommand, fake: FakeNdovu) -> None:
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    try:
        cmd = command("serve", env=proxy_env(fake, NDOVU_PROXY_LISTEN=f"127.0.0.1:{port}"))
        assert await cmd.run() == 1
        assert f"listen 127.0.0.1:{port}: address already in use" in cmd.output()
    finally:
        blocker.close()


async def test_help_lists_the_commands(command: MakeCommand) -> None:
    cmd = command("--help")
    assert await cmd.run() == 0
    text = "\n".join(cmd.stdout)
    for word in ("serve", "check", "demo", "mock-upstream", "NDOVU_CLIENT_SECRET_FILE"):
        assert word in text


async def test_check_exit_0_says_where_and_how_long_never_the_token(command: MakeCommand, fake: FakeNdovu) -> None:
    cmd = command("check", env=proxy_env(fake))
    assert await cmd.run() == 0, cmd.output()
    out = "\n".join(cmd.stdout)
    assert f"POST {fake.url}/api/v3/partners/auth" in out  # type: ignore[attr-defined]
    assert "lifetime 3600 s" in out
    assert_no_secrets(cmd.output(), fake)


@pytest.mark.parametrize(
    ("fault", "code", "words"),
    [
        (fakes.status(401), 2, "raw client secret"),
        (fakes.status(400), 2, "malformed"),
        (fakes.status(503), 3, "503"),
        (fakes.raw(b"<html>"), 3, "not JSON"),
        (fakes.status(429, headers={"Retry-After": "5"}), 3, "429"),
    ],
)
async def test_check_exit_codes_for_each_failure(command: MakeCommand, fake: FakeNdovu, fault: fakes.Fault, code: int, words: str) -> None:
    fake.auth_faults = [fault]
    cmd = command("check", env=proxy_env(fake))
    assert await cmd.run() == code, cmd.output()
    assert words in "\n".join(cmd.stdout)
    assert_no_secrets(cmd.output(), fake)


async def test_check_exit_3_when_unreachable_and_1_for_bad_config(command: MakeCommand, fake: FakeNdovu) -> None:
    cmd = command("check", env=proxy_env(fake, NDOVU_UPSTREAM_URL="http://127.0.0.1:9"))
    assert await cmd.run() == 3
    cmd = command("check", env={"NDOVU_CLIENT_ID": "x"})
    assert await cmd.run() == 1
    assert "auth.client_secret: missing" in cmd.output()


async def test_demo_runs_with_no_credentials_and_prints_a_curl_line(command: MakeCommand) -> None:
    cmd = await command("demo", "--listen", "127.0.0.1:0").start()
    line = await cmd.wait_for(lambda item: isinstance(item, str) and "curl -s http" in item and "products" in item)
    target = line.split("curl -s ", 1)[1].strip()
    async with aiohttp.ClientSession() as http, http.get(target) as resp:
        assert resp.status == 200
        assert (await resp.json())["count"] == 4
    e = await cmd.event("listening")
    assert e["admin_address"] is None  # no admin listener unless asked
    cmd.signal(signal.SIGINT)
    assert await cmd.wait() == 0


async def test_serve_runs_on_uvloop_where_it_is_a_dependency_and_says_so(command: MakeCommand, fake: FakeNdovu) -> None:
    cmd = await command("serve", env=proxy_env(fake)).start()
    e = await cmd.event("listening")
    # pyproject.toml installs uvloop on Linux and macOS; elsewhere asyncio's own loop runs
    assert e["loop"] == ("uvloop" if sys.platform in ("linux", "darwin") else "asyncio")
    cmd.signal(signal.SIGTERM)
    assert await cmd.wait() == 0


async def test_mock_upstream_command(command: MakeCommand) -> None:
    cmd = await command("mock-upstream", "--listen", "127.0.0.1:0", "--client-id", "me", "--client-secret", "pw", "--token-ttl", "60").start()
    line = await cmd.wait_for(lambda item: isinstance(item, str) and item.startswith("fake Ndovu Partner API on "))
    base = line.rsplit(" ", 1)[1]
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/api/v3/partners/auth", headers={"Authorization": "Basic bWU6cHc="}) as resp:  # me:pw
            assert resp.status == 200
            grant = await resp.json()
        assert grant["expires_in"] == 60 and grant["token_type"] == "Bearer"
        headers = {"Authorization": f"Bearer {grant['access_token']}"}
        async with http.get(f"{base}/api/v3/partners/products", headers=headers) as resp:
            assert resp.status == 200
    cmd.signal(signal.SIGTERM)
    assert await cmd.wait() == 0


async def test_console_logs_are_coloured_on_a_terminal(command: MakeCommand) -> None:
    import os
    import pty

    main_fd, sub_fd = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "demo", "--listen", "127.0.0.1:0",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=sub_fd,
        env={k: v for k, v in os.environ.items() if not k.startswith("NDOVU_")},
    )
    os.close(sub_fd)
    seen = b""
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while b"listening" not in seen and loop.time() < deadline:
            seen += await asyncio.wait_for(loop.run_in_executor(None, os.read, main_fd, 4096), 15)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 10)
        os.close(main_fd)
    assert b"listening" in seen
    assert b"\x1b[" in seen  # ANSI colours: auto picked the console format on a TTY
    assert not seen.lstrip().startswith(b"{")



def test_mock_upstream_help_names_the_demo_credentials(capsys: pytest.CaptureFixture[str]) -> None:
    from proxy import cli, mock

    with pytest.raises(SystemExit):
        cli.main(["mock-upstream", "--help"])
    out = capsys.readouterr().out
    assert f"(default {mock.DEMO_CLIENT_ID})" in out and f"(default {mock.DEMO_CLIENT_SECRET})" in out


def test_serve_does_not_load_the_fake_api_or_aiohttp_web() -> None:
    """`serve` stays lean: aiohttp's web framework is only for demo and mock-upstream."""
    import subprocess

    probe = "import sys, proxy.cli, proxy.app; print('aiohttp.web' in sys.modules, 'proxy.mock' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.split() == ["False", "False"]


DOUBLED_MESSAGE = (
    "upstream.url: the base path /api/v3/partners would be doubled: the token URL would be "
    "http://127.0.0.1:9/api/v3/partners/api/v3/partners/auth; use http://127.0.0.1:9"
)


@pytest.mark.parametrize("subcommand", ["serve", "check"])
async def test_a_doubled_base_path_exits_1_naming_upstream_url(command: MakeCommand, subcommand: str) -> None:
    env = {"NDOVU_CLIENT_ID": "x", "NDOVU_CLIENT_SECRET": "y", "NDOVU_UPSTREAM_URL": "http://127.0.0.1:9/api/v3/partners",
           "NDOVU_PROXY_LISTEN": "127.0.0.1:0", "NDOVU_PROXY_ADMIN_LISTEN": "off"}
    cmd = command(subcommand, env=env)
    assert await cmd.run() == 1
    assert cmd.stderr == [f"ndovu-proxy: config error: {DOUBLED_MESSAGE}"]


async def test_a_gateway_base_path_still_serves(command: MakeCommand, fake: FakeNdovu) -> None:
    # one segment in common with the API's path: a gateway prefix, not a slip
    cmd = command("check", env=proxy_env(fake, NDOVU_UPSTREAM_URL=f"{fake.url}/gw/api"))  # type: ignore[attr-defined]
    await cmd.run()
    assert "config error" not in cmd.output()
    assert f"POST {fake.url}/gw/api/api/v3/partners/auth" in "\n".join(cmd.stdout)  # type: ignore[attr-defined]


async def _serve_until_token_then_stop(cmd: Command) -> list[dict[str, object]]:
    await cmd.start()
    await cmd.listening()
    await cmd.event("token_acquired")
    cmd.signal(signal.SIGTERM)
    assert await cmd.wait() == 0, cmd.output()
    return [e for e in cmd.events if e.get("event") == "listen_unrestricted"]


async def test_serve_on_an_open_address_warns_once_who_can_spend_the_credentials(command: MakeCommand, fake: FakeNdovu) -> None:
    cmd = command("serve", env=proxy_env(fake, NDOVU_PROXY_LISTEN="0.0.0.0:0", NDOVU_PROXY_ADMIN_LISTEN="off"))
    [warning] = await _serve_until_token_then_stop(cmd)
    assert warning["level"] == "warning"
    address = warning["address"]
    assert isinstance(address, str) and address.startswith("0.0.0.0:")
    assert f"anyone who can reach {address} can call the partner API" in str(warning["risk"])
    assert "forwarding.allowed_clients" in str(warning["fix"]) and "forwarding.inbound_token" in str(warning["fix"])


async def test_serve_on_loopback_does_not_warn(command: MakeCommand, fake: FakeNdovu) -> None:
    cmd = command("serve", env=proxy_env(fake))
    assert await _serve_until_token_then_stop(cmd) == []


async def test_sigterm_reports_draining_while_the_listener_still_accepts_for_shutdown_delay(
    command: MakeCommand, fake: FakeNdovu, tmp_path: Path
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("shutdown_delay: 2\n")
    cmd = await command("serve", "--config", str(path), env=proxy_env(fake)).start()
    address, admin = await cmd.listening()
    await cmd.event("token_acquired")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{admin}/readyz") as resp:
            assert resp.status == 200
        began = time.monotonic()
        cmd.signal(signal.SIGTERM)
        shutting = await cmd.event("shutting_down")  # logged once /readyz says draining
        assert shutting["delay_s"] == 2
        async with http.get(f"http://{admin}/readyz") as resp:
            assert resp.status == 503
            assert await resp.json() == {"ready": False, "reason": "draining", "last_error": None}
    # a new connection to the proxy is still accepted and served during the delay
    fresh = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=fresh) as http, http.get(f"http://{address}{API}/x") as resp:
        assert resp.status == 200
    assert not any(e.get("event") == "listener_closed" for e in cmd.events)
    assert await cmd.wait() == 0
    assert time.monotonic() - began >= 2  # the listener was kept open for the delay
    names = [e.get("event") for e in cmd.events]
    assert names.index("shutting_down") < names.index("listener_closed") < names.index("stopped")


async def test_a_second_signal_cuts_shutdown_delay_short(command: MakeCommand, fake: FakeNdovu, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("shutdown_delay: 600\n")
    cmd = await command("serve", "--config", str(path), env=proxy_env(fake)).start()
    await cmd.listening()
    cmd.signal(signal.SIGTERM)
    await cmd.event("shutting_down")
    cmd.signal(signal.SIGINT)
    assert await cmd.wait(timeout=15) == 0


async def test_default_shutdown_readyz_says_draining_during_the_drain(command: MakeCommand, fake: FakeNdovu) -> None:
    slow = fake.api_faults["slow"] = fakes.Gate("slow done")
    cmd = await command("serve", env=proxy_env(fake)).start()
    address, admin = await cmd.listening()
    await cmd.event("token_acquired")
    async with aiohttp.ClientSession() as http:
        pending = asyncio.create_task(http.get(f"http://{address}{API}/slow"))
        await asyncio.wait_for(slow.reached.wait(), 5)
        cmd.signal(signal.SIGTERM)
        await cmd.event("listener_closed")
        async with http.get(f"http://{admin}/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["reason"] == "draining"
        slow.release.set()
        resp = await asyncio.wait_for(pending, 5)
        assert resp.status == 200
    assert await cmd.wait() == 0


def test_every_command_and_flag_has_help() -> None:
    import argparse

    from proxy.cli import build_parser

    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001 - argparse has no public walk
    assert {c.dest for c in sub._choices_actions if c.help} == set(sub.choices)  # noqa: SLF001
    for name, command in sub.choices.items():
        for action in command._actions:  # noqa: SLF001
            if not isinstance(action, argparse._HelpAction):  # noqa: SLF001
                assert action.help, f"{name} {action.option_strings} has no help"
    mock_help = sub.choices["mock-upstream"].format_help()
    for endpoint in ("/_mock/expire", "/_mock/revoke", "/_mock/stats"):
        assert endpoint in mock_help
