"""Start-up failures read as failures: a listener that cannot bind names its key and address,
exits 1, asks the auth endpoint for nothing and logs no shutdown; a normal start still fetches
the token and serves."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import socket
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from proxy.app import ListenError, Proxy
from proxy.wire import Listener
from tests.conftest import assert_no_secrets, proxy_settings
from tests.fakes import FakeNdovu
from tests.procs import Command, MakeCommand, proxy_env

API = "/api/v3/partners"
SHUTDOWN_EVENTS = {"shutting_down", "listener_closed", "shutdown_cut", "stopped"}
#: TEST-NET-1 (RFC 5737): never an address of this machine, so binding it fails locally
FOREIGN = "192.0.2.1"



@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port held by a plain listening socket for the whole test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def foreign_address_is_not_ours() -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((FOREIGN, 0))
        except OSError:
            return True
    return False


async def assert_failed_quietly(cmd: Command, fake: FakeNdovu, message: str) -> None:
    assert await cmd.wait() == 1, cmd.output()
    plain = [line for line in cmd.stderr if not line.startswith("{")]
    assert len(plain) == 1 and plain[0].startswith("ndovu-proxy: "), cmd.output()
    assert plain[0].endswith(message), cmd.output()
    assert not [e["event"] for e in cmd.events if e.get("event") in SHUTDOWN_EVENTS], cmd.output()
    assert not [e for e in cmd.events if e.get("event") in {"listening", "auth_request", "token_acquired"}]
    assert fake.auth_log == [] and fake.auth_calls == 0
    assert_no_secrets(cmd.output(), fake)


async def test_a_taken_listen_port_names_the_key_and_address(command: MakeCommand, fake: FakeNdovu,
                                                             taken_port: int) -> None:
    cmd = await command("serve", "--listen", f"127.0.0.1:{taken_port}", env=proxy_env(fake)).start()
    await assert_failed_quietly(cmd, fake, f"listen 127.0.0.1:{taken_port}: address already in use")


async def test_a_taken_admin_port_names_admin_listen(command: MakeCommand, fake: FakeNdovu, taken_port: int) -> None:
    cmd = await command("serve", "--admin-listen", f"127.0.0.1:{taken_port}", env=proxy_env(fake)).start()
    await assert_failed_quietly(cmd, fake, f"admin_listen 127.0.0.1:{taken_port}: address already in use")


@pytest.mark.skipif(not foreign_address_is_not_ours(), reason=f"{FOREIGN} is an address of this machine")
async def test_an_address_not_on_this_machine_says_so(command: MakeCommand, fake: FakeNdovu) -> None:
    cmd = await command("serve", "--listen", f"{FOREIGN}:8080", env=proxy_env(fake)).start()
    await assert_failed_quietly(cmd, fake, f"listen {FOREIGN}:8080: cannot assign requested address")


async def test_a_normal_start_fetches_the_token_and_serves(command: MakeCommand, fake: FakeNdovu) -> None:
    cmd = await command("serve", env=proxy_env(fake)).start()
    address, admin = await cmd.listening()
    assert admin is not None
    await cmd.event("token_acquired")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{address}{API}/products") as resp:
            assert resp.status == 200
            assert "X-Ndovu-Proxy-Error" not in resp.headers
        async with http.get(f"http://{admin}/readyz") as resp:
            assert resp.status == 200
    assert fake.auth_calls == 1
    names = [e.get("event") for e in cmd.events]
    assert names.index("listening") < names.index("token_acquired")
    cmd.signal(signal.SIGTERM)
    assert await cmd.wait() == 0
    assert "stopped" in [e.get("event") for e in cmd.events]
    assert_no_secrets(cmd.output(), fake)


# --- in-process: what a failed start() leaves behind, and when the refresher starts --------------


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def test_a_failed_start_releases_what_it_opened_and_stops_silently(
    fake: FakeNdovu, log_buffer: io.StringIO, taken_port: int,
) -> None:
    # the admin port is found free, then handed to the proxy, which binds it before failing on listen
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        admin_port = probe.getsockname()[1]
    proxy = Proxy(proxy_settings(fake.url, {  # type: ignore[attr-defined]
        "listen": f"127.0.0.1:{taken_port}", "admin_listen": f"127.0.0.1:{admin_port}",
    }))
    with pytest.raises(ListenError) as caught:
        await proxy.start()
    assert str(caught.value) == f"listen 127.0.0.1:{taken_port}: address already in use"
    assert caught.value.key == "listen"
    assert port_is_free(admin_port)  # the listener it did bind is closed again
    assert proxy.tokens is None and proxy.upstream is None
    await proxy.stop()  # as serve() does in its finally: nothing to say
    events = [json.loads(line)["event"] for line in log_buffer.getvalue().splitlines() if line]
    assert not SHUTDOWN_EVENTS & set(events), events
    assert "listening" not in events
    assert fake.auth_log == []


async def test_the_refresher_starts_only_once_both_listeners_are_bound(
    fake: FakeNdovu, log_buffer: io.StringIO, monkeypatch: pytest.MonkeyPatch,
) -> None:
    binds: list[bool] = []  # per bind: was the token refresher already running?
    real_start = Listener.start

    async def start(self: Listener, host: str, port: int) -> Any:
        binds.append(any(t.get_name() == "token-refresher" for t in asyncio.all_tasks()))
        return await real_start(self, host, port)

    monkeypatch.setattr(Listener, "start", start)
    proxy = Proxy(proxy_settings(fake.url))  # type: ignore[attr-defined]
    await proxy.start()
    try:
        assert binds == [False, False]
        assert proxy.tokens is not None
        await asyncio.wait_for(proxy.tokens.get(), 5)
        assert fake.auth_calls == 1
    finally:
        await proxy.stop()
