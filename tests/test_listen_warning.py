"""The warning for a proxy anyone on the network can spend the credentials through."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from proxy.app import is_loopback
from tests.conftest import StartProxy


def warnings(log_buffer: io.StringIO) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in log_buffer.getvalue().splitlines() if line.startswith("{")]
    return [e for e in events if e.get("event") == "listen_unrestricted"]


async def test_an_open_listen_address_is_warned_about_once(start_proxy: StartProxy, log_buffer: io.StringIO) -> None:
    proxy = await start_proxy({"listen": "0.0.0.0:0"})
    [warning] = warnings(log_buffer)
    assert warning["level"] == "warning"
    assert warning["address"] == str(proxy.address) and str(proxy.address).startswith("0.0.0.0:")
    assert f"anyone who can reach {proxy.address}" in warning["risk"]
    assert "forwarding.allowed_clients" in warning["fix"] and "forwarding.inbound_token" in warning["fix"]


@pytest.mark.parametrize(
    "cfg",
    [
        {"listen": "127.0.0.1:0"},
        {"listen": "127.0.0.2:0"},
        {"listen": "localhost:0"},
        {"listen": "[::1]:0"},
        {"listen": "0.0.0.0:0", "forwarding.allowed_clients": "127.0.0.1/32"},
        {"listen": "0.0.0.0:0", "forwarding.inbound_token": "inbound-tok-1"},
    ],
)
async def test_no_warning_on_loopback_or_with_a_restriction(start_proxy: StartProxy, log_buffer: io.StringIO, cfg: dict[str, Any]) -> None:
    await start_proxy(cfg)
    assert '"listening"' in log_buffer.getvalue()
    assert warnings(log_buffer) == []


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("localhost", True), ("LOCALHOST", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("192.168.1.10", False),
        ("example.internal", False), ("", False), ("::ffff:10.0.0.1", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
