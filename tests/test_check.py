"""`check` against `serve`: one validation, exit codes that mean one thing each, where the
credentials came from, and network errors in plain words. The real command in a subprocess."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import assert_no_secrets
from tests.fakes import CLIENT_ID, CLIENT_SECRET, FakeNdovu
from tests.procs import MakeCommand
from tests.procs import proxy_env


CREDS = {"NDOVU_CLIENT_ID": "x", "NDOVU_CLIENT_SECRET": "y", "NDOVU_PROXY_LISTEN": "127.0.0.1:0",
         "NDOVU_PROXY_ADMIN_LISTEN": "off"}


# --- 1. check validates exactly what serve validates ---------------------------------------


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("logging:\n  level: verbose\n", "logging.level: expected one of debug, info, warning, error, got 'verbose'"),
        ("logging:\n  format: xml\n", "logging.format: expected one of json, console, auto, got 'xml'"),
        ("shutdown_timeout: -1\n", "shutdown_timeout: must not be negative"),
        ("auth:\n  backoff_max: 0.5\n", "auth.backoff_max: must be at least auth.backoff_initial"),
    ],
)
async def test_check_refuses_every_config_serve_refuses(command: MakeCommand, tmp_path: Path, yaml: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml)
    outputs = []
    for sub in ("serve", "check"):
        cmd = command(sub, "--config", str(path), env=CREDS)
        assert await cmd.run() == 1, (sub, cmd.output())
        outputs.append(cmd.stderr)
    assert outputs[0] == outputs[1] == [f"ndovu-proxy: config error: {message}"]


async def test_check_takes_upstream_like_serve(command: MakeCommand, fake: FakeNdovu) -> None:
    env = proxy_env(fake, NDOVU_UPSTREAM_URL="http://127.0.0.1:9")
    cmd = command("check", "--upstream", fake.url, env=env)  # type: ignore[attr-defined]
    assert await cmd.run() == 0, cmd.output()
    assert f"POST {fake.url}/api/v3/partners/auth" in "\n".join(cmd.stdout)  # type: ignore[attr-defined]
    for sub in ("serve", "check"):
        cmd = command(sub, "--upstream", "localhost:80", env=CREDS)
        assert await cmd.run() == 1
        assert cmd.stderr == ["ndovu-proxy: config error: upstream.url: not a valid http(s) URL"]


# --- 2. exit codes: a secret file that cannot be used is a config error ---------------------


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda d: d / "absent", "No such file"),
        (lambda d: (d / "dir").mkdir() or d / "dir", "is a directory"),
        (lambda d: (d / "empty").write_text("") and None or d / "empty", "is empty"),
        (lambda d: (d / "newline").write_text("\n") and d / "newline", "is empty"),
    ],
)
@pytest.mark.parametrize("sub", ["check", "serve"])
async def test_an_unusable_secret_file_exits_1_naming_the_key_and_the_reason(
    command: MakeCommand, fake: FakeNdovu, tmp_path: Path, make: object, words: str, sub: str
) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    cmd = command(sub, env=proxy_env(fake, NDOVU_CLIENT_SECRET_FILE=str(path)))
    assert await cmd.run() == 1, cmd.output()
    [line] = cmd.stderr
    assert line.startswith("ndovu-proxy: config error: auth.client_secret_file: ") and words in line
    assert str(path) in line
    assert fake.auth_calls == 0


@pytest.fixture
def unreadable_secret() -> Iterator[Path]:
    """A mode-000 secret file in a directory anyone may enter (pytest's tmp_path is 0700)."""
    where = Path(tempfile.mkdtemp(prefix="ndovu-secret-"))
    try:
        where.chmod(0o755)
        secret = where / "secret"
        secret.write_text(CLIENT_SECRET)
        secret.chmod(0)
        yield secret
    finally:
        shutil.rmtree(where)


def _as_nobody() -> list[str]:
    """A command prefix that drops root, which reads mode-000 files regardless."""
    if os.geteuid() != 0:
        return []  # already unprivileged: mode 000 stops us as it is
    prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    try:
        ok = subprocess.run([*prefix, sys.executable, "-c", "import proxy"], capture_output=True, timeout=60, cwd="/")
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("cannot run as an unprivileged user here (no setpriv)")
    if ok.returncode != 0:
        pytest.skip(f"cannot run as an unprivileged user here: {ok.stderr.decode(errors='replace')[-200:]}")
    return prefix


@pytest.mark.parametrize("sub", ["check", "serve"])
def test_a_secret_file_without_read_permission_exits_1(fake_url_env: dict[str, str], unreadable_secret: Path, sub: str) -> None:
    prefix = _as_nobody()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NDOVU_")}
    env.update(fake_url_env, NDOVU_CLIENT_SECRET_FILE=str(unreadable_secret))
    done = subprocess.run([*prefix, sys.executable, "-m", "proxy", sub], env=env, capture_output=True, text=True,
                          timeout=60, cwd="/")
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.splitlines() == [
        f"ndovu-proxy: config error: auth.client_secret_file: cannot read {unreadable_secret}: Permission denied"
    ]


@pytest.fixture
def fake_url_env() -> dict[str, str]:
    # no auth call is made: the config error comes first
    return {"NDOVU_CLIENT_ID": CLIENT_ID, "NDOVU_UPSTREAM_URL": "http://127.0.0.1:9",
            "NDOVU_PROXY_LISTEN": "127.0.0.1:0", "NDOVU_PROXY_ADMIN_LISTEN": "off"}


async def test_a_secret_file_deleted_while_serving_is_reported_as_unreadable_on_sighup(
    command: MakeCommand, fake: FakeNdovu, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_text(CLIENT_SECRET + "\n")
    cmd = await command("serve", env=proxy_env(fake, NDOVU_CLIENT_SECRET_FILE=str(secret))).start()
    _, admin = await cmd.listening()
    await cmd.event("token_acquired")
    secret.unlink()
    cmd.signal(signal.SIGHUP)
    failure = await cmd.event("token_refresh_failed")
    assert failure["reason"] == "secret_unreadable" and failure["level"] == "error"
    assert failure["detail"] == f"auth.client_secret_file: cannot read {secret}: No such file or directory"
    assert "status" not in failure and "credentials_rejected" not in cmd.output()
    assert (await cmd.event("reload_failed"))["reason"] == "secret_unreadable"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{admin}/tokenz") as resp:
            state = await resp.json()
        assert state["last_error"] == "secret_unreadable" and state["generation"] == 1
        async with http.get(f"http://{admin}/metrics") as resp:
            metrics = await resp.text()
    assert 'ndovu_proxy_token_fetches_total{result="error"} 1.0' in metrics
    assert 'ndovu_proxy_token_fetches_total{result="rejected"} 0.0' in metrics
    assert fake.auth_calls == 1  # nothing was sent without a secret
    cmd.signal(signal.SIGTERM)
    assert await cmd.wait() == 0
    assert_no_secrets(cmd.output(), fake)


# --- 3. check says where the credentials came from --------------------------------------------


def _check_lines(cmd_stdout: list[str]) -> dict[str, str]:
    return {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in cmd_stdout if ":" in line}


async def test_check_names_the_client_the_auth_url_and_the_secret_from_the_environment(command: MakeCommand, fake: FakeNdovu) -> None:
    cmd = command("check", env=proxy_env(fake))
    assert await cmd.run() == 0, cmd.output()
    lines = _check_lines(cmd.stdout)
    assert lines["auth"] == f"POST {fake.url}/api/v3/partners/auth as client {CLIENT_ID!r}"  # type: ignore[attr-defined]
    assert lines["secret"] == "NDOVU_CLIENT_SECRET (the secret itself is never shown)"
    assert_no_secrets(cmd.output(), fake)


async def test_check_names_the_config_file_that_holds_the_secret(command: MakeCommand, fake: FakeNdovu, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"auth:\n  client_secret: {CLIENT_SECRET}\n")
    env = proxy_env(fake)
    del env["NDOVU_CLIENT_SECRET"]
    cmd = command("check", "--config", str(path), env=env)
    assert await cmd.run() == 0, cmd.output()
    assert _check_lines(cmd.stdout)["secret"] == f"auth.client_secret in {path} (the secret itself is never shown)"
    assert_no_secrets(cmd.output(), fake)


async def test_check_says_the_secret_file_wins_over_a_secret(command: MakeCommand, fake: FakeNdovu, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(CLIENT_SECRET + "\n")
    cmd = command("check", env=proxy_env(fake, NDOVU_CLIENT_SECRET="not-the-secret", NDOVU_CLIENT_SECRET_FILE=str(secret)))
    assert await cmd.run() == 0, cmd.output()
    assert _check_lines(cmd.stdout)["secret"] == (
        f"NDOVU_CLIENT_SECRET_FILE: {secret}; NDOVU_CLIENT_SECRET is set too: the file wins "
        "(the secret itself is never shown)"
    )
    path = tmp_path / "c.yaml"
    path.write_text(f"auth:\n  client_secret_file: {secret}\n  client_secret: not-the-secret\n")
    env = proxy_env(fake)
    del env["NDOVU_CLIENT_SECRET"]
    cmd = command("check", "--config", str(path), env=env)
    assert await cmd.run() == 0, cmd.output()
    assert _check_lines(cmd.stdout)["secret"] == (
        f"auth.client_secret_file: {secret} (in {path}); auth.client_secret in {path} is set too: the file wins "
        "(the secret itself is never shown)"
    )
    assert "not-the-secret" not in cmd.output()
    assert_no_secrets(cmd.output(), fake)


# --- 6. network errors in plain words -------------------------------------------------------------


async def test_check_says_the_connection_was_refused(command: MakeCommand, fake: FakeNdovu) -> None:
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    blocker.close()
    await blocker.wait_closed()  # a port that was just free: nothing listens on it now
    cmd = command("check", "--upstream", f"http://127.0.0.1:{port}", env=proxy_env(fake))
    assert await cmd.run() == 3
    assert f"token:    FAILED: connection refused by 127.0.0.1:{port} (auth_unreachable)" in cmd.stdout
    assert "Error" not in cmd.output()


async def test_serve_logs_the_refused_connection_in_plain_words(command: MakeCommand, fake: FakeNdovu, tmp_path: Path) -> None:
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    blocker.close()
    await blocker.wait_closed()
    cmd = await command("serve", "--upstream", f"http://127.0.0.1:{port}", env=proxy_env(fake)).start()
    failure = await cmd.event("token_refresh_failed")
    assert failure["reason"] == "auth_unreachable"
    assert failure["detail"] == f"connection refused by 127.0.0.1:{port}"
    debug = await cmd.event("auth_request")
    assert debug["error"] == f"connection refused by 127.0.0.1:{port}"
    cmd.signal(signal.SIGTERM)
    assert await cmd.wait() == 0
    assert "ClientConnectorError" not in cmd.output()


async def test_check_on_an_https_url_to_a_plain_http_port_says_so(command: MakeCommand, fake: FakeNdovu) -> None:
    plain = fake.url.replace("http://", "https://")  # type: ignore[attr-defined]
    cmd = command("check", "--upstream", plain, env=proxy_env(fake))
    assert await cmd.run() == 3
    [line] = [x for x in cmd.stdout if x.startswith("token:")]
    where = plain.removeprefix("https://")
    assert line.startswith(f"token:    FAILED: TLS handshake with {where} failed: ")
    assert f"the port seems to speak plain HTTP: try http://{where} in upstream.url" in line
    assert "SSLError" not in cmd.output()


def test_check_says_a_host_cannot_be_resolved() -> None:
    """In a network namespace with only loopback: the resolver reaches nothing, and nothing
    leaves the machine."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here")
    probe = subprocess.run(["unshare", "-rn", "sh", "-c", "ip link set lo up"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a network namespace here: {probe.stderr.decode(errors='replace')[-200:]}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NDOVU_")}
    env.update(NDOVU_CLIENT_ID=CLIENT_ID, NDOVU_CLIENT_SECRET=CLIENT_SECRET, NDOVU_UPSTREAM_URL="https://nohost.invalid")
    done = subprocess.run(
        ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$0" -m proxy check', sys.executable],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "token:    FAILED: cannot resolve host nohost.invalid (auth_unreachable)" in done.stdout.splitlines()
    assert CLIENT_SECRET not in done.stdout + done.stderr
